"""Meta-learning: learn a starting point that adapts to new classes from a few examples.

The labelled dataset's classes are split once into meta-train and meta-test classes (seeded, or named
in the config); an episode never mixes them. An episode is an N-way K-shot task: `ways` classes, `shots`
support rows and `queries` query rows of each, relabelled 0..N-1 in a random order. Episodes are drawn
with the seed and the episode's number, so episode 37 is the same episode in every run and after a resume.

Per episode the model gets a fresh N-way head and adapts with `inner_steps` plain SGD steps (`inner_lr`)
on the support set, from the meta-learned start theta, giving adapted weights phi. Then the start moves:

  reptile (Nichol et al. 2018)         theta <- theta + meta_lr * mean_i (phi_i - theta)
  fomaml  (Finn et al. 2017, first order)  theta <- theta - meta_lr * mean_i grad L_query(phi_i)

over `meta_batch` episodes per update. Only the body's trainable weights are meta-learned (all of them
under full tuning; the adapter's weights under LoRA etc., i.e. the adapter's initialisation); the head is
rebuilt every episode. The adapted weights are read out and then discarded: the start changes only
through these two formulas.

The head is prototype-initialised (Triantafillou et al. 2020, "Proto-MAML"): row c of the weight is
2 * p_c and its bias -|p_c|^2, p_c the mean support feature of class c, so before any step the head
ranks classes by squared distance to their prototype, as a prototypical network does. A zero head would
start at chance and, since the body's gradient flows through the head's weights, give the body no
gradient on the first inner step; a random head would tie arbitrary rows to episode labels that are
themselves an arbitrary permutation. `head_init: zero` is kept for comparison.

This module holds the pieces (class split, episode sampler, the steps, the head, confidence intervals);
the run that calls the loop and writes the run folder is flows/meta.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..data.sources import Split
from ..errors import ConfigError, DataError
from ..models.anatomy import logits_layer
from ..schema import Section


class Config(Section):
    kind: Literal["meta"] = "meta"
    """Meta-learning over N-way K-shot episodes of a labelled dataset with many classes."""
    algorithm: Literal["reptile", "fomaml"] = "reptile"
    """reptile: move the start towards each episode's adapted weights; fomaml: first-order MAML, step the start
    along the query-set gradient at the adapted weights."""
    ways: int = Field(5, ge=2)
    """Classes per episode (N)."""
    shots: int = Field(5, ge=1)
    """Support rows per class (K): what the model adapts on."""
    queries: int = Field(15, ge=1)
    """Query rows per class: what an episode is scored on (and, for fomaml, what its gradient comes from)."""
    inner_steps: int = Field(5, ge=1)
    """SGD steps on the support set per episode."""
    inner_lr: float = Field(1e-2, gt=0)
    """Learning rate of the inner SGD steps."""
    meta_lr: float = Field(0.5, gt=0)
    """Step size of the meta update: reptile's epsilon, or fomaml's SGD learning rate."""
    meta_batch: int = Field(4, ge=1)
    """Episodes per meta update."""
    episodes: int = Field(400, ge=1)
    """Meta-training episodes in all (meta updates: episodes / meta_batch, rounded up)."""
    test_classes: Union[int, list[str]] = 5
    """Meta-test classes, never seen in meta-training: how many (drawn with the seed) or their names."""
    eval_episodes: int = Field(100, ge=1)
    """Held-out episodes (meta-test classes, test split) each start is scored on; 100 or more for the report."""
    eval_steps: Optional[int] = Field(None, ge=0)
    """Adaptation steps in evaluation episodes; null: inner_steps."""
    transfer_steps: int = Field(200, ge=0)
    """The transfer baseline: a conventional fine-tune on all meta-train classes (train.lr, train.batch_size) for
    this many steps, whose body is then adapted like the others; 0: no baseline."""
    head_init: Literal["prototype", "zero"] = "prototype"
    """The fresh N-way head of each episode: prototype (class means of the support features) or zero."""
    save_every: int = Field(10, ge=1)
    """Checkpoint the start every this many meta updates (for --resume)."""

    @model_validator(mode="after")
    def _named_classes(self):
        if isinstance(self.test_classes, list):
            if len(set(self.test_classes)) != len(self.test_classes):
                raise ValueError("test_classes: a class is named twice")
            if len(self.test_classes) < self.ways:
                raise ValueError(f"test_classes: {len(self.test_classes)} classes named, fewer than "
                                 f"regime.ways ({self.ways}): an evaluation episode needs {self.ways}")
        elif self.test_classes < self.ways:
            raise ValueError(f"test_classes: {self.test_classes} is fewer than regime.ways ({self.ways})")
        return self


ALTERS_TRAINING = True


def check(run_cfg, methods) -> None:
    """Meta-learning adapts a classifier head per episode: the objective must train one, in the shared loop."""
    if methods.objective.HEAD != "sequence-classification" or getattr(methods.objective, "OWNS_STEP", False):
        raise ValueError(f"regime.kind: meta learns N-way classification episodes; objective {run_cfg.objective.kind!r} "
                         "is not supported (use objective.kind: classify)")


def extra_splits(cfg: Config, train_rows: int, seed: int) -> dict[str, Split]:
    return {}


def make_penalty(cfg: Config, model, head: str, tokenizer, device, log=print):
    return None


# ------------------------------------------------------------------------------------------- classes


def split_classes(classes: list[str], cfg: Config, seed: int) -> tuple[list[str], list[str]]:
    """(meta-train classes, meta-test classes): disjoint, together all classes. Named test classes are
    taken as given; a count is drawn from the sorted classes with the seed."""
    classes = sorted(classes)
    if isinstance(cfg.test_classes, list):
        unknown = [c for c in cfg.test_classes if c not in classes]
        if unknown:
            raise ConfigError(f"test classes {unknown} are not labels of the data (labels: {', '.join(classes)})",
                              where="regime.test_classes")
        test = sorted(cfg.test_classes)
    else:
        order = list(classes)
        random.Random(seed).shuffle(order)
        test = sorted(order[:cfg.test_classes])
    train = [c for c in classes if c not in test]
    if len(train) < cfg.ways:
        raise ConfigError(f"{len(train)} meta-train classes are left, fewer than regime.ways ({cfg.ways})",
                          where="regime.test_classes", hint="name fewer test classes, or lower regime.ways")
    return train, test


# ------------------------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    classes: list[str]
    """The episode's classes; class i has episode label i."""
    support: list[tuple[int, int]]
    """(row index, episode label) of the support rows."""
    query: list[tuple[int, int]]
    """(row index, episode label) of the query rows."""


class EpisodeSampler:
    """N-way K-shot episodes from the rows of the given classes; episode `i` depends only on the seed and i."""

    def __init__(self, labels: list[str], classes: list[str], cfg: Config, seed: int, where: str = "data"):
        """labels: the class of each row; classes: the classes episodes may use (others' rows are never drawn)."""
        self.ways, self.shots, self.queries, self.seed = cfg.ways, cfg.shots, cfg.queries, seed
        by_class: dict[str, list[int]] = {c: [] for c in classes}
        for i, label in enumerate(labels):
            if label in by_class:
                by_class[label].append(i)
        need = cfg.shots + cfg.queries
        self.rows = {c: idx for c, idx in sorted(by_class.items()) if len(idx) >= need}
        if len(self.rows) < cfg.ways:
            short = {c: len(idx) for c, idx in by_class.items() if len(idx) < need}
            raise DataError(f"only {len(self.rows)} classes have the {need} rows an episode needs (shots + queries); "
                            f"regime.ways is {cfg.ways}; classes short of rows: {short}", where=where,
                            hint="lower regime.shots / regime.queries / regime.ways, or give more rows")
        self.classes = list(self.rows)

    def episode(self, index: int) -> Episode:
        rng = random.Random(self.seed * 1_000_003 + index)
        classes = rng.sample(self.classes, self.ways)
        support, query = [], []
        for label, c in enumerate(classes):
            rows = rng.sample(self.rows[c], self.shots + self.queries)
            support += [(r, label) for r in rows[:self.shots]]
            query += [(r, label) for r in rows[self.shots:]]
        return Episode(classes, support, query)


# ------------------------------------------------------------------------------------------- steps


def reptile_step(theta: dict[str, torch.Tensor], phis: list[dict[str, torch.Tensor]], eps: float
                 ) -> dict[str, torch.Tensor]:
    """theta + eps * (mean_i phi_i - theta)."""
    return {n: t + eps * (torch.stack([phi[n] for phi in phis]).mean(0) - t) for n, t in theta.items()}


def fomaml_step(theta: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]], lr: float
                ) -> dict[str, torch.Tensor]:
    """theta - lr * mean_i g_i, g_i the query-set gradient at episode i's adapted weights."""
    return {n: t - lr * torch.stack([g[n] for g in grads]).mean(0) for n, t in theta.items()}


def mean_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.cross_entropy(logits, batch["labels"])


def gradient(model, params: dict[str, torch.nn.Parameter], batch) -> dict[str, torch.Tensor]:
    """The gradient of the batch's mean loss with respect to `params`, at the model's current weights."""
    model.zero_grad(set_to_none=True)
    mean_loss(model, batch).backward()
    out = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    return out


def adapt(model, trainable: list[torch.nn.Parameter], batch, steps: int, lr: float) -> None:
    """`steps` plain SGD steps on the batch's mean loss, in place, over `trainable` (body and head)."""
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        mean_loss(model, batch).backward()
        with torch.no_grad():
            for p in trainable:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def accuracy(model, batch) -> float:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float((logits.argmax(-1) == batch["labels"]).float().mean())


# ------------------------------------------------------------------------------------------- the head


@torch.no_grad()
def init_head(model, batch, ways: int, how: str) -> None:
    """A fresh N-way head: prototypes of the support features (see the module docstring), or zero."""
    layer = logits_layer(model, ways)
    if how == "zero":
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()
        return
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().float()))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        hook.remove()
    features, labels = seen[-1], batch["labels"]
    protos = torch.stack([features[labels == c].mean(0) for c in range(ways)])
    layer.weight.copy_(2 * protos)
    if layer.bias is not None:
        layer.bias.copy_(-protos.pow(2).sum(-1))


# ------------------------------------------------------------------------------------------- reporting


def interval(values: list[float]) -> dict:
    """Mean and its 95% confidence interval (normal approximation: mean +- 1.96 * sd / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"accuracy": mean, "ci95": half, "low": mean - half, "high": mean + half, "episodes": n}
