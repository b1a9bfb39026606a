"""The default regime: one task, one dataset, one training run."""

from __future__ import annotations

from typing import Literal

from ..axes import Change
from ..schema import Section
from . import continual

ALTERS_TRAINING = False


class Config(Section):
    kind: Literal["single"] = "single"
    """Train on one task's data."""


def extra_splits(cfg: Config, train_rows: int, seed: int) -> dict:
    return {}


def make_penalty(cfg: Config, model, head: str, tokenizer, device, log=print):
    return None


def advice(cfg: Config, symptom: str, head: str) -> list[Change]:
    """Forgetting: the continual regime protects what the starting model knew (replay of general text for a
    language model, an L2-SP pull towards the starting weights for any model)."""
    if symptom != "forget":
        return []
    how = "and regime.penalty.kind l2sp" if head == "sequence-classification" else \
        "and regime.replay.fraction 0.2 (or regime.penalty.kind l2sp)"
    return [Change("regime.kind", cfg.kind, continual.Config.model_fields["kind"].default, how)]
