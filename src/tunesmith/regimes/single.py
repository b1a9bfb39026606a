"""The default regime: one task, one dataset, one training run."""

from __future__ import annotations

from typing import Literal

from ..schema import Section

ALTERS_TRAINING = False


class Config(Section):
    kind: Literal["single"] = "single"
    """Train on one task's data."""


def extra_splits(cfg: Config, train_rows: int, seed: int) -> dict:
    return {}


def make_penalty(cfg: Config, model, head: str, tokenizer, device, log=print):
    return None
