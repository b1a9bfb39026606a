"""Transfer learning by freezing: train only the task head, or the last k blocks plus the head.

The cheapest way to adapt a pretrained encoder to a new label set; the frozen body keeps its
general features, so forgetting is limited to the blocks that train.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from ..axes import Change
from ..errors import ConfigError
from ..models.anatomy import blocks, head_parameters
from ..schema import Section

MERGEABLE = True  # the trained weights already are a plain model
TRAINS_BASE = True  # the base weights themselves train: stored in fp32, no adapter to switch off
HEADS = frozenset({"sequence-classification", "causal-lm", "masked-lm"})
LR_RANGE = (1e-4, 1e-2)  # a head (or a few blocks) on frozen features takes large steps


class Config(Section):
    kind: Literal["freeze"] = "freeze"
    """Freeze the pretrained body; train the head and optionally the last blocks."""
    train_last: int = Field(0, ge=0)
    """How many of the last transformer blocks train (0: the head alone)."""
    train_head: bool = True
    """Train the task head (the new classifier, or the LM head). Turn off only with train_last > 0."""
    also_train: list[str] = []
    """Regular expressions; parameters whose names match also train (e.g. `pooler`, `norm`)."""

    @field_validator("also_train")
    @classmethod
    def _patterns(cls, v):
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"entry {i}, {pattern!r}, is not a regular expression ({e})") from None
        return v


def advice(cfg: Config, symptom: str, head: str) -> list[Change]:
    """Fewer trained blocks for overfitting or forgetting (the head alone is the least); more for underfitting."""
    if symptom == "underfit":
        return [Change("tuning.train_last", cfg.train_last, max(2, cfg.train_last * 2))]
    return [Change("tuning.train_last", cfg.train_last, cfg.train_last // 2)] if cfg.train_last else []


def apply(model, cfg: Config, head: str, tokenizer=None):
    for p in model.parameters():
        p.requires_grad_(False)
    named = dict(model.named_parameters())
    if cfg.train_last:
        prefix, layers = blocks(model)
        if cfg.train_last > len(layers):
            raise ConfigError(
                f"train_last={cfg.train_last} but the model has only {len(layers)} blocks",
                where="tuning.train_last",
                hint=f"use a value from 0 to {len(layers)}",
            )
        for i in range(len(layers) - cfg.train_last, len(layers)):
            for p in layers[i].parameters():
                p.requires_grad_(True)
    if cfg.train_head:
        for p in head_parameters(model):
            p.requires_grad_(True)
    patterns = [re.compile(p) for p in cfg.also_train]
    for name, p in named.items():
        if any(pat.search(name) for pat in patterns):
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("nothing would train", where="tuning", hint="set train_head: true or train_last > 0")
    return model
