"""(IA)^3 (Liu et al., 2022) through peft: learned vectors that rescale activations inside each block.

Each target layer gets one trainable vector: attention targets (keys, values) scale their output, one
value per output feature; feed-forward targets scale their input, one value per input feature. Vectors
start at one, so the model is unchanged at step 0. The fewest trainable values of any method here, and
it merges into the weights (a row or column scaling).
"""

from __future__ import annotations

from typing import Literal, Optional

from ..axes import Change
from ..errors import ConfigError
from ..schema import Section
from . import lora
from . import targets as targeting
from .common import check_head, head_to_train, wrap

MERGEABLE = True
TRAINS_BASE = False
HEADS = frozenset({"sequence-classification", "causal-lm", "encoder"})  # not masked-lm: a random MLM head would stay frozen
LR_RANGE = (1e-3, 1e-2)  # rescaling vectors start at one and need large steps


class Config(Section):
    kind: Literal["ia3"] = "ia3"
    """Learned rescaling vectors on keys, values and the feed-forward layers; the base stays frozen."""
    targets: Optional[targeting.Targets] = None
    """Layers to rescale, as for lora (names, `all-linear`, `re:<pattern>`); null: peft's choice for the
    architecture (e.g. `k_proj, v_proj, down_proj` for Llama; `key, value, output.dense` for BERT)."""
    feedforward: Optional[list[str]] = None
    """Which targets are feed-forward layers (rescaled at their input); names matched at the end of the full
    name. null: peft's choice for the architecture when targets is null, else none."""
    layers: targeting.Layers = None
    """Only rescale layers inside these transformer blocks (block indices or a slice `start:stop`); null: all."""
    train_head: bool = True
    """Train the new classification head in full (it starts random); a pretrained LM head stays frozen."""


def _defaults(model_type: str) -> tuple[list[str], list[str]] | None:
    from peft.utils import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    # BERT-family encoders share RoBERTa's layer names, which is the entry peft keeps.
    key = "roberta" if model_type in ("bert", "electra", "camembert", "xlm-roberta") else model_type
    if key not in TARGETS:
        return None
    return list(TARGETS[key]), list(FEEDFORWARD.get(key, []))


def check_model(cfg: Config, model_config, head: str) -> None:
    check_head(head, cfg.train_head)
    if cfg.targets is None and _defaults(model_config.model_type) is None:
        raise ConfigError(f"(IA)^3 has no default target layers for {model_config.model_type!r} models",
                          where="tuning.targets",
                          hint="name them, e.g. targets: [k_proj, v_proj, down_proj] and feedforward: [down_proj]")
    if cfg.feedforward and isinstance(cfg.targets, list):
        stray = [f for f in cfg.feedforward if f not in cfg.targets]
        if stray:
            raise ConfigError(f"feedforward layer {stray[0]!r} is not among the targets", where="tuning.feedforward",
                              hint="every feedforward name must also be listed in targets")
    n = getattr(model_config, "num_hidden_layers", None)
    if cfg.layers is not None and n:
        targeting.layer_indices(cfg.layers, n)


def advice(cfg: Config, symptom: str, head: str) -> list[Change]:
    """(IA)^3 trains the fewest weights of any tuning: nothing smaller to try. Underfitting: every block rescaled,
    or low-rank adapters, which train more."""
    if symptom != "underfit":
        return []
    if cfg.layers is not None:
        return [Change("tuning.layers", cfg.layers, None)]
    if head not in lora.HEADS:
        return []
    return [Change("tuning.kind", cfg.kind, lora.Config().kind, "which trains more weights")]


def apply(model, cfg: Config, head: str, tokenizer=None):
    from peft import IA3Config

    targets, feedforward = cfg.targets, cfg.feedforward
    if targets is None:
        targets, default_ff = _defaults(model.config.model_type)
        feedforward = default_ff if feedforward is None else feedforward
    chosen = targeting.select(model, targets, cfg.layers)
    ff = [n for n in chosen if any(n == k or n.endswith("." + k) for k in feedforward or [])]
    peft_cfg = IA3Config(target_modules=chosen, feedforward_modules=ff,
                         modules_to_save=head_to_train(model, head, cfg.train_head))
    return wrap(model, peft_cfg, head)
