"""Checkable arithmetic word problems: one question, one answer, an exact-answer reward.

`reset(seed)` asks a problem drawn from the seed (two numbers of up to `digits` digits and one of `operations`,
told as a short story, or as a bare expression with `words: false`); `step(reply)` grades the reply and ends the
episode. The reward is 1 when the reply's answer is exact, else 0, plus `format_reward` when the reply is the
number alone, as the question asks.

Parse rule: the answer is the last whole number in the reply (an optional minus sign; digit-group commas are
read through, `1,234` is 1234), so "12 + 30 = 42" and "The answer is 42." both answer 42; a reply with no number
is wrong. A subtraction's answer is never negative (the larger number comes first).
"""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import Field

from . import EnvSection

METRICS = ("accuracy", "format_rate")
SINGLE_TURN = True  # an episode is its question: training leaves out the questions of held-out episodes
NUMBER = re.compile(r"-?\d+(?:,\d{3})*")
ALONE = re.compile(r"\s*-?\d+(?:,\d{3})*\.?\s*")
NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kai", "Lena")
THINGS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards", "stickers", "beads")
STORIES = {
    "+": "{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?",
    "-": "{name} has {a} {things} and gives away {b}. How many {things} does {name} have left?",
    "*": "{name} buys {a} bags with {b} {things} in each bag. How many {things} does {name} buy?",
}
ASK = " Reply with the number only."


class Config(EnvSection):
    kind: Literal["arithmetic"] = "arithmetic"
    """Arithmetic word problems with an exact answer (single turn)."""
    digits: int = Field(2, ge=1, le=6)
    """Each number has 1 to this many digits."""
    operations: list[Literal["+", "-", "*"]] = ["+", "-"]
    """Operations to draw from (one per problem)."""
    words: bool = True
    """Tell each problem as a short story; false: a bare expression (`What is 23 + 58?`)."""
    format_reward: float = Field(0.0, ge=0)
    """Added to the reward when the reply is the number alone (as the question asks), right or wrong."""


def problem(cfg: Config, seed: int) -> tuple[str, int]:
    """The question of episode `seed` and its answer."""
    rng = random.Random(seed)
    op = rng.choice(cfg.operations)
    a, b = (rng.randint(0 if cfg.digits == 1 else 1, 10 ** cfg.digits - 1) for _ in range(2))
    if op == "-" and b > a:
        a, b = b, a
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    if not cfg.words:
        return f"What is {a} {op} {b}?{ASK}", answer
    story = STORIES[op].format(name=rng.choice(NAMES), things=rng.choice(THINGS), a=a, b=b)
    return story + ASK, answer


def parse(reply: str) -> int | None:
    """The reply's answer: its last whole number (see the module docstring), or None."""
    found = NUMBER.findall(reply)
    return int(found[-1].replace(",", "")) if found else None


class Arithmetic:
    def __init__(self, cfg: Config):
        self.cfg, self.answer, self.correct, self.formatted = cfg, None, 0.0, 0.0

    def reset(self, seed: int) -> str:
        question, self.answer = problem(self.cfg, seed)
        self.correct = self.formatted = 0.0
        return question

    def step(self, text: str) -> tuple[str, float, bool]:
        self.correct = float(parse(text) == self.answer)
        self.formatted = float(ALONE.fullmatch(text) is not None)
        return "", self.correct + self.cfg.format_reward * self.formatted, True

    def outcome(self) -> dict[str, tuple[float, float]]:
        return {"accuracy": (self.correct, 1.0), "format_rate": (self.formatted, 1.0)}


def make(cfg: Config) -> Arithmetic:
    return Arithmetic(cfg)
