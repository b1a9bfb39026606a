"""Continual learning: learn new tasks without forgetting what the model knew.

Two forms share this module:
  one task     (no `tasks`) learn the run's task while keeping the starting model's general knowledge
  a sequence   (`tasks: [...]`) learn the tasks one after another, every task's test split scored after
               each (the accuracy matrix, evaluate/continual.py); the orchestration is flows/continual.py

Mitigations, usable together:
  replay    mix rows from another source into train: general text for a language model, or an
            earlier task's rows (same format and labels) for a classifier; seeded and deterministic
  penalty   pull the trainable weights towards their starting values, added to the loss:
            l2sp  (Li et al., 2018)        weight/2 * sum (w - w0)^2
            ewc   (Kirkpatrick et al., 2017) weight/2 * sum F * (w - w0)^2, with F the diagonal Fisher
                  information of the starting model on general text, scaled to mean 1 so a weight
                  means the same total pull as in l2sp, spent where the old knowledge lives

In the sequence form replay draws from a buffer of earlier tasks' training rows (`replay.per_task`
rows kept from each finished task, seeded), the penalty is anchored at the weights after the previous
task and EWC's Fisher is estimated on each finished task's own training rows with its own loss; per-task
Fishers are summed, each with its own anchor, or folded into one (online EWC, Schwarz et al. 2018:
F <- gamma * F + F_task, anchored at the latest task's weights). `adapters: true` gives each task its own
copy of the run's parameter-efficient tuning (LoRA, bottleneck adapter, ...) over the frozen base,
swapped in by task name: earlier tasks cannot be forgotten.

The penalty's gradient, weight * F * (w - w0), is added once per optimizer step after the task
gradients are averaged over the accumulation window (see `Anchor.add_gradient`), so gradient
accumulation stays exactly the large-batch gradient. A new classifier head has no starting point
worth keeping and is left out.
"""

from __future__ import annotations

import math
import random
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from ..axes import Change
from ..data.collate import collate
from ..data.general import lm_examples, read_rows, texts_of
from ..data.sources import Split
from ..models.anatomy import head_parameters
from ..objectives.lm import lm_losses
from ..schema import Section
from .tasks import TaskConfig, check_tasks

ALTERS_TRAINING = True
GENERAL = ["sample:wiki-demo", "sample:c4-demo"]


class ReplayConfig(Section):
    fraction: float = Field(0.0, ge=0, lt=1)
    """Share of the training mix that is replay rows (0.2: one row in five); 0 turns replay off. With `tasks`:
    the share drawn from the buffer of earlier tasks (0 with `per_task` set: the whole buffer is mixed in)."""
    per_task: Optional[int] = Field(None, ge=1)
    """With `tasks`: training rows kept in the replay buffer from each finished task (seeded draw)."""
    data: list[str] = GENERAL
    """Where replay rows come from (one-task form): general text for a language model (default: the packaged
    Wikipedia and C4 samples), an earlier task's rows with the same labels for a classifier."""
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
    online: Optional[float] = Field(None, gt=0, le=1)
    """ewc with `tasks`: online EWC's decay gamma (one Fisher, F <- gamma * F + F_task, anchored at the latest
    task's weights); null: one penalty per finished task, each anchored at the weights it ended with."""


class Config(Section):
    kind: Literal["continual"] = "continual"
    """Train on new tasks while keeping what the model knew: replay, a penalty, or adapters per task."""
    tasks: Optional[list[TaskConfig]] = None
    """The tasks in training order (each: name, data, objective); null: the run's own task, protected against
    forgetting the starting model's general knowledge."""
    replay: ReplayConfig = ReplayConfig()
    """Rows from general text or earlier tasks mixed into train."""
    penalty: PenaltyConfig = PenaltyConfig()
    """L2-SP or EWC regularisation towards the starting weights (with `tasks`: the previous task's weights)."""
    adapters: bool = False
    """With `tasks`: one copy of the run's parameter-efficient tuning per task over the frozen base, chosen by task
    name when scoring or predicting (no forgetting by construction). Needs a tuning that freezes the base."""

    @model_validator(mode="after")
    def _something_on(self):
        if self.tasks is not None:
            return self._check_tasks()
        if self.replay.per_task is not None or self.penalty.online is not None or self.adapters:
            raise ValueError("regime.replay.per_task, regime.penalty.online and regime.adapters belong to a task "
                             "sequence: list the tasks under regime.tasks")
        if self.replay.fraction == 0 and self.penalty.kind == "none":
            raise ValueError("regime continual: set regime.replay.fraction > 0 and/or regime.penalty.kind "
                             "(l2sp, ewc); with neither it is the single regime")
        return self

    def _check_tasks(self):
        check_tasks(self.tasks, where="tasks", least=2,  # `tasks[1]...`: inside regime:
                    heads_needed="a task sequence is scored by each task's accuracy on a classification head of its own")
        if "data" in self.replay.model_fields_set or "split" in self.replay.model_fields_set:
            raise ValueError("replay.data: with tasks, replay draws from the buffer of earlier tasks' rows "
                             "(set regime.replay.per_task); drop replay.data and replay.split")
        if self.replay.fraction > 0 and self.replay.per_task is None:
            raise ValueError("replay.fraction: with tasks, set regime.replay.per_task too (rows kept from "
                             "each finished task, which the fraction draws from)")
        if self.penalty.kind != "ewc" and self.penalty.online is not None:
            raise ValueError("penalty.online: online EWC needs regime.penalty.kind: ewc")
        if self.adapters and (self.replay.per_task is not None or self.penalty.kind != "none"):
            raise ValueError("adapters: each task has its own adapter and nothing is shared to protect; "
                             "drop regime.replay and regime.penalty (or adapters)")
        return self

    def strategy(self) -> str:
        """The strategy's name for tables: naive, replay, ewc, online-ewc, l2sp, adapters or a combination."""
        if self.adapters:
            return "adapters"
        parts = ["replay"] if self.replay.per_task is not None else []
        if self.penalty.kind != "none":
            parts.append("online-ewc" if self.penalty.online is not None else self.penalty.kind)
        return "+".join(parts) or "naive"


def check(run_cfg, methods) -> None:
    """A task sequence takes each task's objective from its own section. In the one-task form, a new classifier
    head has no pretrained loss (for EWC) and no labels in general text (for replay)."""
    cfg = run_cfg.regime
    if cfg.tasks is not None:
        if "objective" in run_cfg.model_fields_set:
            raise ValueError("objective: a task sequence takes each task's objective from regime.tasks[i].objective; "
                             "leave the top-level objective out")
        return
    if methods.objective.HEAD != "sequence-classification":
        return
    if cfg.penalty.kind == "ewc":
        raise ValueError("regime.penalty.kind: ewc weighs weights by the starting model's own loss on "
                         "general text, which a new classifier head does not have; use l2sp")
    if cfg.replay.fraction > 0 and "data" not in cfg.replay.model_fields_set:
        raise ValueError("regime.replay.data: a classifier replays an earlier task's labelled rows (same "
                         "labels); the default general text has no labels, so name the rows to replay")


def advice(cfg: Config, symptom: str, head: str) -> list[Change]:
    """Forgetting: a stronger pull towards the starting weights, and more replay (a classifier's replay rows are an
    earlier task's, so only a share already set is raised)."""
    if symptom != "forget":
        return []
    pen = cfg.penalty
    found = [Change("regime.penalty.kind", pen.kind, "l2sp") if pen.kind == "none" else
             Change("regime.penalty.weight", pen.weight, pen.weight * 10 if pen.weight else 0.01)]
    fraction = cfg.replay.fraction
    if fraction == 0 and head != "sequence-classification":
        found.append(Change("regime.replay.fraction", fraction, 0.2))
    elif 0 < fraction < 0.5:
        found.append(Change("regime.replay.fraction", fraction, round(min(0.5, fraction * 2), 3)))
    return found


def extra_splits(cfg: Config, train_rows: int, seed: int) -> dict[str, Split]:
    """The `replay` split: round(n * f / (1 - f)) rows drawn with the seed, so they are the fraction f
    of train + replay. Fewer are used when the sources hold fewer."""
    if cfg.replay.fraction == 0 or cfg.tasks is not None:  # a task sequence replays from its buffer
        return {}
    pool = read_rows(cfg.replay.data, cfg.replay.split, where="regime.replay.data")
    want = round(train_rows * cfg.replay.fraction / (1 - cfg.replay.fraction))
    if want > len(pool.rows):
        print(f"replay: {want} rows wanted for a fraction of {cfg.replay.fraction}, but {pool.source} holds "
              f"{len(pool.rows)}; replaying all of them ({len(pool.rows) / (train_rows + len(pool.rows)):.0%} of the mix)")
    picked = sorted(random.Random(seed).sample(range(len(pool.rows)), min(want, len(pool.rows))))
    return {"replay": pool.subset(picked)}


class ReplayBuffer:
    """Training rows kept from finished tasks: `per_task` of each, drawn with the seed and the task's
    position, so a resumed run keeps the same rows. Rows are stored as given (tokenized examples)."""

    def __init__(self, per_task: int, seed: int):
        self.per_task, self.seed = per_task, seed
        self.kept: dict[str, list[int]] = {}
        """Task name -> indices of its kept rows, in its training rows."""
        self.rows: list[dict] = []

    def add(self, name: str, position: int, rows: list[dict]) -> None:
        rng = random.Random(self.seed * 1_000_003 + position)
        picked = sorted(rng.sample(range(len(rows)), min(self.per_task, len(rows))))
        self.kept[name] = picked
        self.rows += [rows[i] for i in picked]

    def draw(self, new_rows: int, fraction: float, position: int) -> list[dict]:
        """The rows mixed into the next task's train: the whole buffer (fraction 0), or round(n * f / (1 - f))
        of them drawn with the seed, so they are the fraction f of the mix (fewer if the buffer holds fewer)."""
        if fraction == 0:
            return list(self.rows)
        want = min(round(new_rows * fraction / (1 - fraction)), len(self.rows))
        rng = random.Random(self.seed * 1_000_003 + 500_009 + position)
        return [self.rows[i] for i in sorted(rng.sample(range(len(self.rows)), want))]


class Anchor:
    """The starting values of the trainable weights, and the pull back towards them."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], weight: float,
                 importance: dict[str, torch.Tensor] | None = None, start: dict[str, torch.Tensor] | None = None):
        """start: the anchor's weights by name (a saved anchor restored); default: the weights now."""
        self.weight = weight
        self.names = [n for n, _ in params]
        self.items = [(p, (start[n].to(p.device, p.dtype) if start else p.detach().clone()),
                       importance[n].to(p.device) if importance else None) for n, p in params]

    def state(self) -> dict[str, torch.Tensor]:
        """Anchor weights and importance by name, to save with a finished task (see `restore`)."""
        out = {}
        for n, (_, start, f) in zip(self.names, self.items):
            out[f"start.{n}"] = start.detach().cpu().contiguous()
            if f is not None:
                out[f"fisher.{n}"] = f.detach().cpu().contiguous()
        return out

    @classmethod
    def restore(cls, params, weight: float, state: dict[str, torch.Tensor]) -> "Anchor":
        start = {n[len("start."):]: v for n, v in state.items() if n.startswith("start.")}
        fisher = {n[len("fisher."):]: v for n, v in state.items() if n.startswith("fisher.")}
        return cls(params, weight, fisher or None, start)

    def importance(self) -> dict[str, torch.Tensor] | None:
        if self.items and self.items[0][2] is None:
            return None
        return {n: f for n, (_, _, f) in zip(self.names, self.items)}

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


class Penalties:
    """Several anchors pulling at once (EWC with one anchor per finished task)."""

    def __init__(self, anchors: list[Anchor]):
        self.anchors = anchors

    def add_gradient(self) -> None:
        for a in self.anchors:
            a.add_gradient()

    def value(self) -> float:
        return sum(a.value() for a in self.anchors)


def needs_fisher(cfg: Config) -> bool:
    """Whether `after_task` weighs the new anchor by the finished task's Fisher (EWC), so the run layer
    estimates it only then (one backward pass per row)."""
    return cfg.penalty.kind == "ewc"


def after_task(cfg: Config, anchors: list[Anchor], params, fisher: dict[str, torch.Tensor] | None) -> list[Anchor]:
    """The anchors once a task has finished, the model holding its end weights: l2sp pulls towards these
    weights only; ewc adds an anchor weighted by the task's Fisher, or (online) folds the Fisher into one
    anchor at these weights."""
    pen = cfg.penalty
    if pen.kind == "none":
        return []
    if pen.kind == "l2sp":
        return [Anchor(params, pen.weight)]
    if fisher is None:
        raise ValueError("ewc needs the finished task's Fisher information")
    if pen.online is not None:
        old = anchors[0].importance() if anchors else None
        merged = {n: f.cpu() + (pen.online * old[n].cpu() if old else 0) for n, f in fisher.items()}
        return [Anchor(params, pen.weight, merged)]
    return anchors + [Anchor(params, pen.weight, fisher)]


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

    def lm_loss(model, batch):
        sums, counts = lm_losses(model, batch, head)
        return sums.sum() / counts.sum().clamp(min=1)

    return empirical_fisher(model, params, examples[:pen.fisher_rows], lm_loss, tokenizer.pad_token_id, device)


def empirical_fisher(model, params, examples: list[dict], loss_fn, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Mean over `examples` of each one's squared gradient of `loss_fn(model, batch)` (the empirical Fisher),
    scaled to mean 1 over all `params`. Eval mode: no dropout noise in the estimate."""
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    was_training = model.training
    model.eval()
    for ex in examples:
        batch = {k: v.to(device) for k, v in collate([ex], pad_id).items()}
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for n, p in params:
            if p.grad is not None:
                fisher[n] += p.grad.float().pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = total / max(count, 1)
    if not math.isfinite(mean) or mean == 0:
        raise RuntimeError("the Fisher estimate is zero or not finite; check the data it is estimated on")
    return {n: f.div_(mean) for n, f in fisher.items()}


class TaskSlices:
    """Several classification tasks on one classifier head: the head's outputs are the tasks' label sets one
    after another, and each row's logits outside its own task's slice are masked to -inf (by a forward hook
    on the output layer, reading the batch's `task` ids). A row's loss then reaches only its task's rows of
    the head, so this is exactly one head per task (task-incremental learning), and rows of several tasks
    (replay) can share a batch."""

    def __init__(self, sizes: list[int]):
        self.bounds, start = [], 0
        for n in sizes:
            self.bounds.append((start, start + n))
            start += n
        self.total = start
        self.current: torch.Tensor | None = None

    def attach(self, layer: torch.nn.Module) -> None:
        layer.register_forward_hook(self._mask)

    def _mask(self, module, args, output):
        if self.current is None:
            return output
        cols = torch.arange(self.total, device=output.device)
        lo = torch.tensor([self.bounds[t][0] for t in self.current.tolist()], device=output.device)
        hi = torch.tensor([self.bounds[t][1] for t in self.current.tolist()], device=output.device)
        outside = (cols[None, :] < lo[:, None]) | (cols[None, :] >= hi[:, None])
        return output.masked_fill(outside, float("-inf"))

    def objective(self, objective):
        """`objective` with every loss and evaluation step masked by the batch's task ids."""
        return _Sliced(objective, self)


class _Sliced:
    def __init__(self, objective, slices: TaskSlices):
        self._objective, self._slices = objective, slices

    def __getattr__(self, name):  # HEAD, METRICS, MAIN_METRIC, metrics, ... as the wrapped objective has them
        return getattr(self._objective, name)

    def _masked(self, fn, model, batch, cfg):
        self._slices.current = batch["task"]
        try:
            return fn(model, batch, cfg)
        finally:
            self._slices.current = None

    def loss(self, model, batch, cfg):
        return self._masked(self._objective.loss, model, batch, cfg)

    def eval_step(self, model, batch, cfg):
        return self._masked(self._objective.eval_step, model, batch, cfg)
