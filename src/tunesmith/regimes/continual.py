"""Continual learning: learn the new task without forgetting what the model knew.

Two kinds of mitigation, usable together:
  replay    mix rows from another source into train: general text for a language model, or an
            earlier task's rows (same format and labels) for a classifier; seeded and deterministic
  penalty   pull the trainable weights towards their starting values, added to the loss:
            l2sp  (Li et al., 2018)        weight/2 * sum (w - w0)^2
            ewc   (Kirkpatrick et al., 2017) weight/2 * sum F * (w - w0)^2, with F the diagonal Fisher
                  information of the starting model on general text, scaled to mean 1 so a weight
                  means the same total pull as in l2sp, spent where the old knowledge lives

The penalty's gradient, weight * F * (w - w0), is added once per optimizer step after the task
gradients are averaged over the accumulation window (see `Anchor.add_gradient`), so gradient
accumulation stays exactly the large-batch gradient. A new classifier head has no starting point
worth keeping and is left out.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..data.collate import collate
from ..data.general import lm_examples, read_rows, texts_of
from ..data.sources import Split
from ..models.anatomy import head_parameters
from ..objectives.lm import lm_losses
from ..schema import Section

ALTERS_TRAINING = True
GENERAL = ["sample:wiki-demo", "sample:c4-demo"]


class ReplayConfig(Section):
    fraction: float = Field(0.0, ge=0, lt=1)
    """Share of the training mix that is replay rows (0.2: one row in five); 0 turns replay off."""
    data: list[str] = GENERAL
    """Where replay rows come from: general text for a language model (default: the packaged Wikipedia
    and C4 samples), an earlier task's rows with the same labels for a classifier."""
    split: str = "train"
    """Which split of those sources is replayed (the forgetting probe scores their test split)."""


class PenaltyConfig(Section):
    kind: Literal["none", "l2sp", "ewc"] = "none"
    """none, l2sp (every weight pulled equally) or ewc (pulled by its Fisher importance; language models)."""
    weight: float = Field(0.01, ge=0)
    """Strength of the pull towards the starting weights."""
    fisher_data: list[str] = GENERAL
    """ewc: general text the Fisher information is estimated on (its `train` split)."""
    fisher_rows: int = Field(64, ge=1)
    """ewc: examples used for the estimate (one backward pass each; a one-off cost before training)."""
    fisher_max_length: int = Field(256, ge=8)
    """ewc: tokens per Fisher example."""


class Config(Section):
    kind: Literal["continual"] = "continual"
    """Train on the new task while keeping the starting model's knowledge: replay and/or a penalty."""
    replay: ReplayConfig = ReplayConfig()
    """Rows from general text or an earlier task mixed into train."""
    penalty: PenaltyConfig = PenaltyConfig()
    """L2-SP or EWC regularisation towards the starting weights."""

    @model_validator(mode="after")
    def _something_on(self):
        if self.replay.fraction == 0 and self.penalty.kind == "none":
            raise ValueError("regime continual: set regime.replay.fraction > 0 and/or regime.penalty.kind "
                             "(l2sp, ewc); with neither it is the single regime")
        return self


def check(run_cfg, methods) -> None:
    """A new classifier head has no pretrained loss (for EWC) and no labels in general text (for replay)."""
    if methods.objective.HEAD != "sequence-classification":
        return
    cfg = run_cfg.regime
    if cfg.penalty.kind == "ewc":
        raise ValueError("regime.penalty.kind: ewc weighs weights by the starting model's own loss on "
                         "general text, which a new classifier head does not have; use l2sp")
    if cfg.replay.fraction > 0 and "data" not in cfg.replay.model_fields_set:
        raise ValueError("regime.replay.data: a classifier replays an earlier task's labelled rows (same "
                         "labels); the default general text has no labels, so name the rows to replay")


def extra_splits(cfg: Config, train_rows: int, seed: int) -> dict[str, Split]:
    """The `replay` split: round(n * f / (1 - f)) rows drawn with the seed, so they are the fraction f
    of train + replay. Fewer are used when the sources hold fewer."""
    if cfg.replay.fraction == 0:
        return {}
    pool = read_rows(cfg.replay.data, cfg.replay.split, where="regime.replay.data")
    want = round(train_rows * cfg.replay.fraction / (1 - cfg.replay.fraction))
    if want > len(pool.rows):
        print(f"replay: {want} rows wanted for a fraction of {cfg.replay.fraction}, but {pool.source} holds "
              f"{len(pool.rows)}; replaying all of them ({len(pool.rows) / (train_rows + len(pool.rows)):.0%} of the mix)")
    picked = sorted(random.Random(seed).sample(range(len(pool.rows)), min(want, len(pool.rows))))
    return {"replay": pool.subset(picked)}


class Anchor:
    """The starting values of the trainable weights, and the pull back towards them."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], weight: float,
                 importance: dict[str, torch.Tensor] | None = None):
        self.weight = weight
        self.items = [(p, p.detach().clone(), importance[n] if importance else None) for n, p in params]

    @torch.no_grad()
    def add_gradient(self) -> None:
        """Add weight * F * (w - w0) to each gradient: the gradient of `value()`, once per step."""
        for p, start, f in self.items:
            pull = (p - start).mul_(self.weight)
            if f is not None:
                pull.mul_(f)
            if p.grad is None:
                p.grad = pull.to(p.dtype)
            else:
                p.grad.add_(pull.to(p.grad.dtype))

    @torch.no_grad()
    def value(self) -> float:
        """weight/2 * sum F * (w - w0)^2 (F = 1 for l2sp)."""
        total = 0.0
        for p, start, f in self.items:
            d = (p.float() - start.float()).pow_(2)
            total += float((d * f).sum() if f is not None else d.sum())
        return 0.5 * self.weight * total


def anchored_parameters(model, head: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters with a meaningful starting value: all but a newly initialised classifier head."""
    new = {id(p) for p in head_parameters(model)} if head == "sequence-classification" else set()
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in new]


def make_penalty(cfg: Config, model, head: str, tokenizer, device, log=print) -> Anchor | None:
    """The penalty of `cfg`, anchored at the model's current (starting) weights."""
    pen = cfg.penalty
    if pen.kind == "none":
        return None
    params = anchored_parameters(model, head)
    importance = None
    if pen.kind == "ewc":
        importance = fisher_diagonal(model, params, pen, head, tokenizer, device)
        log(f"ewc: diagonal Fisher information from {pen.fisher_rows} examples of {', '.join(pen.fisher_data)}")
    return Anchor(params, pen.weight, importance)


def fisher_diagonal(model, params, pen: PenaltyConfig, head: str, tokenizer, device) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of the language-model loss on general text (the empirical
    Fisher), scaled to mean 1 over all anchored weights. Eval mode: no dropout noise in the estimate."""
    part = read_rows(pen.fisher_data, "train", where="regime.penalty.fisher_data")
    examples = lm_examples(tokenizer, texts_of(part, "regime.penalty.fisher_data"), pen.fisher_max_length, head)
    examples = examples[:pen.fisher_rows]
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    was_training = model.training
    model.eval()
    for ex in examples:
        batch = {k: v.to(device) for k, v in collate([ex], tokenizer.pad_token_id).items()}
        model.zero_grad(set_to_none=True)
        sums, counts = lm_losses(model, batch, head)
        (sums.sum() / counts.sum().clamp(min=1)).backward()
        for n, p in params:
            if p.grad is not None:
                fisher[n] += p.grad.float().pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = total / max(count, 1)
    if not math.isfinite(mean) or mean == 0:
        raise RuntimeError("the Fisher estimate is zero or not finite; check regime.penalty.fisher_data")
    return {n: f.div_(mean) for n, f in fisher.items()}
