"""Environments an RL objective (ppo, grpo) can train in: `objective.env: {kind: <name>, ...}`.

An environment is played in episodes. The interface (`Env` below) is two methods:

    reset(seed) -> observation                  start episode `seed`; the observation is the first user turn
    step(text)  -> (observation, reward, done)  the model's reply; the next user turn (ignored when done),
                                                the reward for this step, and whether the episode ended

plus `outcome()`, the episode's success counts for evaluation. An episode is rendered through the model's chat
template turn by turn: each observation is a user turn, each reply an assistant turn the model generated. Only the
model's own tokens are trained on (the environment's turns and the template's markup are context); the episode's
reward is the sum of its step rewards. A single-turn task with a verifiable answer is the one-step case (reset
asks, step grades the answer and ends the episode).

Episodes are numbered by seed: training draws seeds 0 .. `train_seeds - 1`, evaluation plays the held-out seeds
`HELD_OUT + 0 .. HELD_OUT + test_seeds - 1` before and after training, decoded as `eval.generate` says.

Adding an environment: a module here with a `Config` (a `Section` with `kind: Literal["<name>"]`, extending
`EnvSection`), `make(cfg) -> Env`, `METRICS` (its outcome names, the success rate first), `SINGLE_TURN` (True when
an episode is decided by its first observation: training then leaves out the seeds whose question a held-out
episode asks) and a line in `ENVS`. Optionally `PLAYERS`, scripted players that set the floor a tuned model must
beat (`{name: (what it does, move(env, rng) -> reply)}`, e.g. nim's random legal mover): they play the same
held-out episodes, and the run reports them beside the starting and the tuned model.
"""

from __future__ import annotations

import random
from typing import Annotated, Any, Protocol, Union, runtime_checkable

from pydantic import Field

from ..schema import Section

HELD_OUT = 1_000_000_000
"""The first held-out seed: training seeds stay below it, so no evaluation episode is one trained on."""


@runtime_checkable
class Env(Protocol):
    """One episode at a time; a fresh `make(cfg)` per episode played in parallel."""

    def reset(self, seed: int) -> str:
        """Start episode `seed` (the same seed always starts the same episode); return the first user turn."""

    def step(self, text: str) -> tuple[str, float, bool]:
        """The model's reply -> (next user turn, reward for this step, episode over)."""

    def outcome(self) -> dict[str, tuple[float, float]]:
        """The episode's counts for the success metrics, `{name: (hits, out of)}`; evaluation reports each metric
        as total hits / total out-of over the held-out episodes (e.g. `accuracy`, `win_rate`, `legal_move_rate`)."""


class EnvSection(Section):
    """Settings every environment takes (its own come after them)."""

    train_seeds: int = Field(2000, ge=1)
    """Training episodes to draw from (seeds 0 .. N-1, in a seeded order; one epoch is N episodes)."""
    test_seeds: int = Field(200, ge=1)
    """Held-out episodes played before and after training (at most `eval.generate.prompts` of them)."""
    max_turns: int = Field(8, ge=1)
    """Most model turns per episode; an episode still running after them ends with the rewards it has."""


from . import arithmetic, nim  # noqa: E402  (the modules extend EnvSection)

ENVS = {
    "arithmetic": arithmetic,
    "nim": nim,
}

EnvConfig: Any = Annotated[Union[tuple(m.Config for m in ENVS.values())], Field(discriminator="kind")]


def make(cfg) -> Env:
    """A fresh environment for one episode."""
    return ENVS[cfg.kind].make(cfg)


def metrics(cfg) -> tuple[str, ...]:
    """The environment's outcome metrics, its success rate first."""
    return ENVS[cfg.kind].METRICS


def single_turn(cfg) -> bool:
    return ENVS[cfg.kind].SINGLE_TURN


def rates(outcomes: list[dict]) -> dict[str, float]:
    """Each outcome as total hits / total out-of over the episodes (see `Env.outcome`)."""
    if not outcomes:
        return {}
    return {name: sum(o[name][0] for o in outcomes) / max(sum(o[name][1] for o in outcomes), 1e-9)
            for name in outcomes[0]}


PLAYER_ROUNDS = 20
"""Plays of every episode by each scripted player, averaged: a random player's score is then its expectation to
about a point, not one draw's luck."""


def baselines(cfg, seeds: list[int]) -> dict[str, dict]:
    """The environment's scripted players (its module's PLAYERS) on episodes `seeds`: `{name: {"about", "reward",
    <outcome rates>}}`, the mean reward per episode and the rates over PLAYER_ROUNDS plays of each episode."""
    out = {}
    for name, (about, move) in getattr(ENVS[cfg.kind], "PLAYERS", {}).items():
        played = [_play(cfg, seed, move, rng) for rng in map(random.Random, range(PLAYER_ROUNDS)) for seed in seeds]
        out[name] = {"about": about, "reward": sum(r for r, _ in played) / max(len(played), 1),
                     **rates([o for _, o in played])}
    return out


def _play(cfg, seed: int, move, rng: random.Random) -> tuple[float, dict]:
    """One episode played by a scripted player: its summed reward and its outcome counts."""
    game, total = make(cfg), 0.0
    game.reset(seed)
    for _ in range(cfg.max_turns):
        _, reward, done = game.step(move(game, rng))
        total += reward
        if done:
            break
    return total, game.outcome()
