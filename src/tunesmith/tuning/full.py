"""Full fine-tuning: every parameter of the model trains.

The strongest and most memory-hungry choice: gradients and AdamW state for every weight
(about 16 bytes per parameter in fp32 on top of the weights).
"""

from __future__ import annotations

from typing import Literal

from ..axes import Change
from ..schema import Section
from . import freeze, lora

MERGEABLE = True  # the trained weights already are a plain model
TRAINS_BASE = True  # the base weights themselves train: stored in fp32, no adapter to switch off
HEADS = frozenset({"sequence-classification", "causal-lm", "masked-lm", "encoder"})
LR_RANGE = (1e-5, 1e-4)  # every pretrained weight moves: small steps


class Config(Section):
    kind: Literal["full"] = "full"
    """Train every parameter of the model."""
    freeze_embeddings: bool = False
    """Keep the input embeddings frozen (saves memory on large vocabularies; the head still trains)."""


def advice(cfg: Config, symptom: str, head: str) -> list[Change]:
    """Every weight already trains: for overfitting or forgetting, low-rank adapters over a frozen base (a head
    LoRA cannot train: the last blocks alone)."""
    if symptom == "underfit":
        return []
    if head in lora.HEADS:
        return [Change("tuning.kind", cfg.kind, lora.Config().kind, "so the base stays frozen")]
    return [Change("tuning.kind", cfg.kind, freeze.Config().kind, "with tuning.train_last 2")]


def apply(model, cfg: Config, head: str, tokenizer=None):
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.freeze_embeddings:
        emb = model.get_input_embeddings()
        # Tied output heads share this tensor; freezing it freezes them too, which is the point.
        for p in emb.parameters():
            p.requires_grad_(False)
    return model
