"""Nim against a scripted opponent: a two-player game of several turns, where an illegal move loses.

A pile of stones (between `stones_min` and `stones_max`, drawn from the seed); the players take turns removing
1 to `take` stones; whoever takes the last stone wins. The model moves first. After each legal move the
opponent answers in the next user turn (`I take 2. There are 5 stones left. ...`).

The opponent plays the winning move (leave a multiple of take + 1) with probability `skill` when one exists, else
a random legal move; its choices are drawn from the episode's seed, so an episode replays the same for the same
replies. A perfect opponent (skill 1) cannot be beaten from a pile that is already a multiple of take + 1.

Parse rule: the model's move is the first whole number in its reply ("I take 3" and "3" both take 3). A reply
with no number, or a number outside 1 .. min(take, stones left), is an illegal move: the episode ends as a loss,
rewarded `illegal_reward`. A win is rewarded `win_reward`, a loss `loss_reward`.

Outcomes: `win_rate` (games won) and `legal_move_rate` (the model's moves that were legal, over all its moves).
"""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import Field, model_validator

from . import EnvSection

METRICS = ("win_rate", "legal_move_rate")
SINGLE_TURN = False  # the same opening plays out differently (the opponent draws its moves from the seed)
NUMBER = re.compile(r"\d+")


class Config(EnvSection):
    kind: Literal["nim"] = "nim"
    """Nim against a scripted opponent (multi-turn; an illegal move loses)."""
    stones_min: int = Field(5, ge=1)
    """Fewest stones in the starting pile."""
    stones_max: int = Field(12, ge=1)
    """Most stones in the starting pile."""
    take: int = Field(3, ge=1, le=9)
    """Most stones one move may take (at least 1)."""
    skill: float = Field(0.5, ge=0, le=1)
    """Probability that the opponent plays the winning move when there is one (0: it always moves at random)."""
    win_reward: float = 1.0
    """Reward for taking the last stone."""
    loss_reward: float = 0.0
    """Reward when the opponent takes the last stone."""
    illegal_reward: float = -1.0
    """Reward for an illegal move (it also ends the game)."""

    @model_validator(mode="after")
    def _range(self):
        if self.stones_max < self.stones_min:
            raise ValueError(f"stones_max ({self.stones_max}) is below stones_min ({self.stones_min})")
        return self


def parse(reply: str) -> int | None:
    """The move in a reply: its first whole number (see the module docstring), or None."""
    found = NUMBER.search(reply)
    return int(found.group()) if found else None


class Nim:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stones, self.rng = 0, random.Random(0)
        self.won = self.legal = self.moves = 0

    def _ask(self) -> str:
        return f"How many stones do you take? Reply with a number from 1 to {min(self.cfg.take, self.stones)}."

    def reset(self, seed: int) -> str:
        self.rng = random.Random(seed)
        self.stones = self.rng.randint(self.cfg.stones_min, self.cfg.stones_max)
        self.won = self.legal = self.moves = 0
        return (f"Let's play Nim. There are {self.stones} stones. We take turns removing 1 to {self.cfg.take} "
                f"stones; whoever takes the last stone wins. You go first. {self._ask()}")

    def _opponent_move(self) -> int:
        winning = self.stones % (self.cfg.take + 1)
        if winning and self.rng.random() < self.cfg.skill:
            return winning
        return self.rng.randint(1, min(self.cfg.take, self.stones))

    def step(self, text: str) -> tuple[str, float, bool]:
        move = parse(text)
        self.moves += 1
        if move is None or not 1 <= move <= min(self.cfg.take, self.stones):
            return "", self.cfg.illegal_reward, True
        self.legal += 1
        self.stones -= move
        if self.stones == 0:
            self.won = 1
            return "", self.cfg.win_reward, True
        took = self._opponent_move()
        self.stones -= took
        if self.stones == 0:
            return "", self.cfg.loss_reward, True
        return f"I take {took}. There {'is 1 stone' if self.stones == 1 else f'are {self.stones} stones'} left. " \
               f"{self._ask()}", 0.0, False

    def outcome(self) -> dict[str, tuple[float, float]]:
        return {"win_rate": (float(self.won), 1.0), "legal_move_rate": (float(self.legal), float(self.moves))}


def make(cfg: Config) -> Nim:
    return Nim(cfg)


def _random_move(game: Nim, rng: random.Random) -> str:
    return str(rng.randint(1, min(game.cfg.take, game.stones)))


# The floor a tuned player must beat: legal moves without a plan (the opponent's own moves stay those of the seed).
PLAYERS = {"random": ("legal moves at random", _random_move)}
