"""Prefix tuning (Li & Liang, 2021) through peft: trained key/value vectors prepended in every attention layer.

The prefix enters each layer as cached keys and values (`past_key_values`), so every token attends to it
while the model's own weights stay frozen. Trainable: tokens x layers x 2 (key and value) x the key/value
width (num_key_value_heads x head_dim); with `projection`, the prefix is produced by a two-layer MLP during
training instead (more stable, larger). Not mergeable: a prefix is extra input, not a weight update.

It needs a model whose forward accepts `past_key_values` (decoders, and BERT-style encoders whose backbone
does); `check_model` finds out from the model's classes before anything is loaded.
"""

from __future__ import annotations

import inspect
from typing import Literal

from pydantic import Field

from ..axes import Change
from ..errors import ConfigError
from ..models.load import head_class
from ..schema import Section
from .common import check_head, head_to_train, wrap

MERGEABLE = False
TRAINS_BASE = False
HEADS = frozenset({"sequence-classification", "causal-lm"})  # not masked-lm: a random MLM head would stay frozen
LR_RANGE = (1e-4, 1e-2)  # virtual key/values are few


class Config(Section):
    kind: Literal["prefix"] = "prefix"
    """Trained key/value prefixes in every attention layer; the base stays frozen."""
    tokens: int = Field(20, ge=1)
    """Length of the prefix (virtual tokens per layer)."""
    projection: bool = False
    """Produce the prefix with a two-layer MLP during training (Li & Liang's reparametrisation)."""
    projection_size: int = Field(512, ge=1)
    """Hidden width of that MLP."""
    train_head: bool = True
    """Train the new classification head in full (it starts random); a pretrained LM head stays frozen."""


def _accepts_cache(cls) -> bool:
    return cls is not None and "past_key_values" in inspect.signature(cls.forward).parameters


def check_model(cfg: Config, model_config, head: str) -> None:
    from transformers import AutoModel

    check_head(head, cfg.train_head)
    head_cls = head_class(head)._model_mapping.get(type(model_config), None)
    backbone = AutoModel._model_mapping.get(type(model_config), None)
    # peft runs a classifier's backbone itself when the head class does not take the cache.
    if _accepts_cache(head_cls) or (head == "sequence-classification" and _accepts_cache(backbone)):
        return
    name = (head_cls or backbone or type(model_config)).__name__
    raise ConfigError(f"prefix tuning feeds its prefix to every layer as past_key_values, which {name} "
                      f"({model_config.model_type}) does not accept", where="tuning.kind",
                      hint="use prompt tuning, lora or ia3 with this model")


def advice(cfg: Config, symptom: str, head: str) -> list[Change]:
    """Fewer virtual tokens for overfitting or forgetting, more for underfitting."""
    if symptom != "underfit":
        return [Change("tuning.tokens", cfg.tokens, cfg.tokens // 2)] if cfg.tokens > 1 else []
    more = [Change("tuning.tokens", cfg.tokens, cfg.tokens * 2)]
    if symptom == "underfit" and not getattr(cfg, "projection", True):
        more.append(Change("tuning.projection", False, True))
    return more


def apply(model, cfg: Config, head: str, tokenizer=None):
    from peft import PrefixTuningConfig

    peft_cfg = PrefixTuningConfig(num_virtual_tokens=cfg.tokens, prefix_projection=cfg.projection,
                                  encoder_hidden_size=cfg.projection_size,
                                  modules_to_save=head_to_train(model, head, cfg.train_head))
    return wrap(model, peft_cfg, head)
