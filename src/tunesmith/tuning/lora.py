"""LoRA (Hu et al., 2021) through peft: frozen base, trainable low-rank updates B·A on chosen layers.

Each adapted layer W (out x in) gains A (r x in) and B (out x r), B starting at zero, and computes
W x + (alpha / r) B A x: r * (in + out) trainable values per layer. The adapter is saved in peft's format,
so `PeftModel.from_pretrained(base, run/adapter)` loads it anywhere, and it folds into W for export.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from ..axes import Change
from ..schema import Section
from . import fused_lora
from . import targets as targeting
from .common import check_head, head_to_train, wrap

MERGEABLE = True
TRAINS_BASE = False
HEADS = frozenset({"sequence-classification", "causal-lm", "encoder"})  # not masked-lm: a random MLM head would stay frozen
LR_RANGE = (5e-5, 1e-3)  # low-rank updates start at zero and need a larger step than full fine-tuning


class LowRank(Section):
    """The fields lora, dora and qlora share (their configs extend this one; no behaviour lives here)."""

    kind: str
    """The tuning method."""
    r: int = Field(8, ge=1)
    """Rank of the update matrices."""
    alpha: float = Field(16, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    targets: targeting.Targets = "all-linear"
    """Layers to adapt: a list of module names (`query`, `v_proj`, `self_attn.o_proj`; each matched at the end of
    the full name and required to match), `all-linear` (every linear layer of the body, not the task or LM head),
    or a regular expression written `re:<pattern>`, matched against the whole of each full module name."""
    layers: targeting.Layers = None
    """Only adapt target layers inside these transformer blocks: a list of block indices (`[0, 1, -1]`; negative
    counts from the end) or a slice `start:stop` (`"-4:"` is the last four blocks). null: every block."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train alongside the adapters."""
    train_head: bool = True
    """Train the new classification head in full (it starts random); a pretrained LM head stays frozen."""


class Config(LowRank):
    kind: Literal["lora"] = "lora"
    """Low-rank adapters on the target layers; the base stays frozen."""


def check_model(cfg: LowRank, model_config, head: str) -> None:
    check_head(head, cfg.train_head)
    if cfg.layers is not None:
        n = getattr(model_config, "num_hidden_layers", None)
        if n:
            targeting.layer_indices(cfg.layers, n)


def peft_config(model, cfg: LowRank, head: str, **extra):
    """peft's LoraConfig for `model`, targets resolved to full module names."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=targeting.select(model, cfg.targets, cfg.layers), bias=cfg.bias,
                      modules_to_save=head_to_train(model, head, cfg.train_head), **extra)


def apply(model, cfg: Config, head: str, tokenizer=None):
    return wrap(model, peft_config(model, cfg, head), head)


def speed_up(cfg: Config, model) -> str | None:
    """The adapter's product added into the base layer's output in place (tuning/fused_lora.py)."""
    n = fused_lora.fuse(model)
    return f"lora: adapter products added into the base outputs in place ({n} layers)" if n else None


def advice(cfg: LowRank, symptom: str, head: str) -> list[Change]:
    """Overfitting: a lower rank and more adapter dropout; forgetting: a lower rank; underfitting: a higher rank,
    and every linear layer adapted if the run adapts fewer."""
    if symptom == "underfit":
        wider = [Change("tuning.targets", cfg.targets, "all-linear")] if cfg.targets != "all-linear" else []
        return [Change("tuning.r", cfg.r, cfg.r * 2)] + wider
    lower = [Change("tuning.r", cfg.r, cfg.r // 2)] if cfg.r > 1 else []
    if symptom == "overfit" and cfg.dropout < 0.3:
        lower.append(Change("tuning.dropout", cfg.dropout, round(min(0.3, max(0.1, cfg.dropout * 2)), 3)))
    return lower


def trainable_count(base, cfg: LowRank, head_params: int, magnitude: bool = False) -> int:
    """Trainable values with `cfg`'s rank and targets, counted on a meta-device model (plan): r * (in + out) per
    layer, plus one magnitude per output row for DoRA."""
    total = head_params
    for name in targeting.select(base, cfg.targets, cfg.layers):
        module = base.get_submodule(name)
        out_f, in_f = (module.weight.shape if type(module).__name__ != "Conv1D" else module.weight.shape[::-1])
        total += cfg.r * (in_f + out_f) + (out_f if magnitude else 0)
    return total


def activation_values(model, cfg: LowRank) -> float:
    """Values per token that the adapters keep for backward, over all layers (for `tunesmith plan`): each
    adapted module's low-rank input (r values) and, in training mode with dropout > 0, a dropped copy of the
    module's input plus the dropped positions (models/dropout.py: -ln(1 - p) 8-byte indices per input feature,
    2 values of 4 bytes each, counted in fp32 terms)."""
    kept = 1 + 2 * -math.log1p(-cfg.dropout)
    values = 0.0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "in_features") and module.lora_A:
            values += cfg.r + (kept * module.in_features if cfg.dropout > 0 else 0)
    return values
