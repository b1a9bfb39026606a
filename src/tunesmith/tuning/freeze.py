"""Transfer learning by freezing: train only the task head, or the last k blocks plus the head.

The cheapest way to adapt a pretrained encoder to a new label set; the frozen body keeps its
general features, so forgetting is limited to the blocks that train.

The frozen part (the embeddings and the blocks before the first one that trains) is a fixed feature
extractor: it runs in eval mode (no dropout) even while the rest trains. Its outputs then depend on
the tokens alone, so with `cache_features` they are computed once per distinct example and looked up
for every later epoch and evaluation (tuning/feature_cache.py): same numbers, a fraction of the time.
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import Field, field_validator

from ..axes import Change
from ..cache import home
from ..errors import ConfigError
from ..models.anatomy import blocks, head_parameters
from ..schema import Section
from . import feature_cache

MERGEABLE = True  # the trained weights already are a plain model
TRAINS_BASE = True  # the base weights themselves train: stored in fp32, no adapter to switch off
HEADS = frozenset({"sequence-classification", "causal-lm", "masked-lm", "encoder"})
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
    cache_features: Union[bool, Literal["disk"]] = True
    """Compute the frozen part's outputs (embeddings and the frozen blocks) once per distinct example, in memory,
    and train the rest on them: every later epoch and evaluation skips the frozen blocks. Same results either
    way (the frozen part runs without dropout in both); costs memory, one [tokens x hidden] tensor per example.
    Applies when the frozen part has no trained weight (not with a head tied to the input embeddings).
    `disk`: also keep them between runs, under $TUNESMITH_HOME/feature-cache/ (one file per model and frozen
    part, as large as the rows it holds): a later run of the same model (a sweep's next trial, another lr)
    computes only the examples no run computed before."""

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
    frozen, _ = frozen_part(model)
    for module in frozen:  # a fixed feature extractor: no dropout, so its outputs can be cached
        module.register_forward_pre_hook(feature_cache.stay_in_eval)
    return model


def frozen_part(model) -> tuple[list, list]:
    """(modules that run before the first trained block and train nothing, the frozen blocks among them).

    What runs before the blocks is read from structure: on the path from the model down to the block list,
    the children registered before the one that leads to it (the embeddings), as transformers models
    register their parts in the order they run. A part with any trained weight ends the frozen part."""
    prefix, layers = blocks(model)
    before, node = [], model
    for part in prefix.split("."):
        for name, child in node.named_children():
            if name == part:
                break
            before.append(child)
        node = getattr(node, part)
    if any(p.requires_grad for m in before for p in m.parameters()):
        return [], []
    cut = next((i for i, b in enumerate(layers) if any(p.requires_grad for p in b.parameters())), len(layers))
    frozen_blocks = list(layers[:cut])
    return before + frozen_blocks, frozen_blocks


def speed_up(cfg: Config, model) -> str | None:
    """`cache_features`: the frozen blocks' output cached per example (see the module docstring)."""
    if not cfg.cache_features:
        return None
    _, frozen_blocks = frozen_part(model)
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not frozen_blocks or body is None or body is model:
        return ("feature cache: off (the frozen part has trained weights, e.g. a head tied to the input "
                "embeddings, or no frozen block)")
    path = None
    if cfg.cache_features == "disk":
        frozen, _ = frozen_part(model)
        path = home() / "feature-cache" / f"{feature_cache.frozen_key(model, frozen)}.safetensors"
    model.feature_cache = cache = feature_cache.install(body, frozen_blocks, path)
    n = len(frozen_blocks)
    said = (f"feature cache: the outputs of the embeddings and {n} frozen block{'s' * (n > 1)} are computed once "
            "per example and reused")
    if path is not None:
        said += f"; {cache.loaded:,} examples' outputs read from {path}" if cache.loaded else f", and kept in {path}"
    return said


def speed_up_done(cfg: Config, model) -> str | None:
    """After the run: what the cache saved (the frozen part's passes run and read), and with `cache_features: disk`
    the rows this run added, written for the next run."""
    cache = getattr(model, "feature_cache", None)
    if cache is None:
        return None
    said = (f"feature cache: the frozen part ran on {cache.ran:,} examples and {cache.looked_up:,} passes read "
            f"its stored outputs (without the cache it would have run {cache.ran + cache.looked_up:,} times)")
    if cache.save():
        said += f"; {len(cache):,} examples' outputs ({cache.nbytes() / 2**20:,.0f} MiB) written to {cache.path}"
    return said
