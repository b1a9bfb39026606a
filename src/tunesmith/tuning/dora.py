"""DoRA (Liu et al., 2024) through peft: LoRA's low-rank update, applied to the direction of each weight,
with the magnitude (one value per output row) trained separately.

W' = m * (W + (alpha / r) B A) / ||W + (alpha / r) B A||, the norm taken per output row and m starting at
||W||, so the model is unchanged at step 0. Trainable per layer: r * (in + out) + out. Slower per step than
LoRA (the norm is recomputed every forward); merges into W like LoRA.
"""

from __future__ import annotations

from typing import Literal

from . import lora
from .common import wrap
from .lora import LowRank, activation_values, check_model, peft_config  # noqa: F401  (the same combinations and adapters as LoRA)

MERGEABLE = True
TRAINS_BASE = False
LR_RANGE = lora.LR_RANGE
advice = lora.advice  # the same rank and dropout
HEADS = frozenset({"sequence-classification", "causal-lm", "encoder"})  # not masked-lm: a random MLM head would stay frozen


class Config(LowRank):
    kind: Literal["dora"] = "dora"
    """Weight-decomposed low-rank adaptation: LoRA on each weight's direction plus a trained magnitude."""


def apply(model, cfg: Config, head: str, tokenizer=None):
    return wrap(model, peft_config(model, cfg, head, use_dora=True), head)


def trainable_count(base, cfg: Config, head_params: int) -> int:
    return lora.trainable_count(base, cfg, head_params, magnitude=True)
