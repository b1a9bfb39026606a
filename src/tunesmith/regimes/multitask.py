"""Multi-task learning: one shared body, one classification head per task, trained on all tasks at once.

    regime:
      kind: multitask
      tasks:
        - {name: sentiment, data: {train: sample:rotten-tomatoes}}
        - {name: topic, data: {train: sample:reuters-r8}}
      sampling: temperature        # proportional | temperature | equal
      temperature: 2.0
      early_stopping: mean         # the mean of the tasks' main metrics, or a task's name

Heads. Each task has its own linear head over the shared body. The heads are stored as consecutive row blocks
of the model's one classifier layer (task k owns rows offset_k .. offset_k + n_k), and each task's softmax and
loss run over its own rows only: the same function, gradients and AdamW updates as separate heads (each row of
a linear layer is independent), while every tuning (full, freeze, lora, ...) and the run's one artifact treat
it as the ordinary head they already train, save and reload. The label names in the saved config are
`<task>:<label>`, so the artifact says which rows belong to which task.

Sampling. Each optimizer micro-batch holds one task's examples. Per epoch there are as many batches as the
tasks' own batches together; task k gets a share p_k of them, p_k proportional to its train rows n_k
(`proportional`), to n_k^(1/T) (`temperature`: T = 1 is proportional, large T tends to equal), or 1/K (`equal`).
The counts are exact: round(total * p_k) by largest remainders. Their order and each task's batches are seeded
shuffles of (seed, epoch), so a resumed run draws exactly what the interrupted one would have.

Everything is per task: data card, data checks (leakage also across tasks: task A's test rows in task B's
train), base and tuned metrics (`<task>/accuracy`, ...; `main_mean` is the mean of the tasks' main metrics),
and `predict RUN --task NAME` / `eval RUN --task NAME --data FILE`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..data.checks import Report, check_card, check_rows, trained_rows
from ..errors import TunesmithError
from ..objectives import DEFAULT as DEFAULT_OBJECTIVE
from ..objectives import OBJECTIVES
from ..objectives.common import Loss, Prepared
from ..schema import Section
from .tasks import TaskConfig, check_tasks, load_task_splits

ALTERS_TRAINING = True
"""It chooses which task each batch comes from and trains a head per task."""

MEAN = "main_mean"
SEP = ":"
"""Between a task's name and a label name in the saved head's label names (task names cannot hold it)."""


class Config(Section):
    kind: Literal["multitask"] = "multitask"
    """Several tasks on one shared body, a head per task."""
    tasks: list[TaskConfig]
    """The tasks: each a name, its own data section and its objective (classify)."""
    sampling: Literal["proportional", "temperature", "equal"] = "proportional"
    """How often each task's batches come: in proportion to its train rows, to rows^(1/temperature), or equally."""
    temperature: float = Field(2.0, gt=0)
    """T of temperature sampling: 1 is proportional, larger values move towards equal."""
    early_stopping: str = "mean"
    """What early stopping watches on validation: `mean` (the mean of the tasks' main metrics) or a task's name
    (its main metric)."""

    @model_validator(mode="after")
    def _tasks_fit(self):
        check_tasks(self.tasks, where="tasks", least=2,  # `tasks[1]...`: inside regime:
                    heads_needed="multitask trains a classification head per task")
        for i, task in enumerate(self.tasks):
            if getattr(task.objective, "distill", None) is not None:
                raise ValueError(f"tasks[{i}].objective.distill: a multitask run does not distil")
        names = [t.name for t in self.tasks]
        if self.early_stopping != "mean" and self.early_stopping not in names:
            raise ValueError(f"early_stopping: {self.early_stopping!r} is neither `mean` nor a task "
                             f"(tasks: {', '.join(names)})")
        return self


def check(run_cfg, methods=None) -> None:
    """Rules across sections, at config validation: the tasks carry the objectives, so the top level's is the
    default, untouched."""
    if run_cfg.objective != OBJECTIVES[DEFAULT_OBJECTIVE].Config():
        raise ValueError("objective: a multitask run takes each task's objective from regime.tasks[i].objective; "
                         "leave the top-level objective out")
    if run_cfg.train.early_stopping.metric is not None:
        raise ValueError("train.early_stopping.metric: a multitask run watches regime.early_stopping (`mean` or a "
                         "task's name)")


def extra_splits(cfg: Config, train_rows: int, seed: int) -> dict:
    return {}


def make_penalty(cfg: Config, model, head: str, tokenizer, device, log=print):
    return None


# ---------------------------------------------------------------------------------------------
# Data: every task read, checked (within and across tasks) and tokenized; one example list per split


@dataclasses.dataclass
class TaskHead:
    """Where a task's head sits in the shared classifier."""

    name: str
    labels: list[str]
    offset: int


def prepare(run_cfg, tokenizer):
    """(Prepared, Report) over all tasks: examples carry their `task` index and labels offset into the task's
    rows of the classifier; the data card and the checks' findings are per task."""
    cfg, seed = run_cfg.regime, run_cfg.train.seed
    report = Report()
    splits = []
    for i, task in enumerate(cfg.tasks):
        found, rep = check_rows(load_task_splits(task, i, seed), task.data.checks)
        _adopt(report, rep, f"{task.name}: ", task.name)
        splits.append(found)
    splits = _cross_task_leakage(cfg.tasks, splits, report)
    report.trained = trained_rows([parts["train"] for parts in splits])

    examples: dict[str, list[dict]] = {}
    card: dict = {"tasks": {}}
    heads, offset = [], 0
    for k, (task, parts) in enumerate(zip(cfg.tasks, splits)):
        prepared = OBJECTIVES[task.objective.kind].prepare(parts, tokenizer, task.objective, task.data)
        labels = prepared.card["labels"]
        for found in check_card(prepared.card, task.data.checks, task.data.max_length):
            found.message = f"{task.name}: {found.message}"
            report.findings.append(found)
        for split, rows in prepared.examples.items():
            examples.setdefault(split, []).extend({**ex, "labels": ex["labels"] + offset, "task": k} for ex in rows)
        card["tasks"][task.name] = prepared.card
        heads.append(TaskHead(task.name, labels, offset))
        offset += len(labels)
    names = [f"{h.name}{SEP}{label}" for h in heads for label in h.labels]
    model_kwargs = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                    "label2id": {n: i for i, n in enumerate(names)}}
    card["checks"] = report.to_dict()
    return Prepared(examples, model_kwargs, card), report


def _adopt(report, other, prefix: str, task: str) -> None:
    for f in other.findings:
        f.message = prefix + f.message
        report.findings.append(f)
    for split, n in other.dropped.items():
        report.dropped[f"{task}/{split}"] = report.dropped.get(f"{task}/{split}", 0) + n


def _cross_task_leakage(tasks, splits: list[dict], report) -> list[dict]:
    """Task A's validation and test rows that reappear in task B's train, under task A's leakage policy (a drop
    removes the copies from B's train: held-out rows never change)."""
    out = [dict(s) for s in splits]
    for a, task in enumerate(tasks):
        leak_only = task.data.checks.model_copy(update={"duplicates": "off", "empty": "off"})
        for b, other in enumerate(tasks):
            if a == b:
                continue
            for held in ("validation", "test"):
                if held not in out[a]:
                    continue
                kept, rep = check_rows({"train": out[b]["train"], "test": out[a][held]}, leak_only)
                for f in rep.findings:
                    f.message = f"{task.name} {held} ~ {other.name} train: " + f.message.replace(" test rows", f" {held} rows")
                    f.splits = f"{other.name}/train~{task.name}/{held}"
                    report.findings.append(f)
                if rep.dropped.get("train"):
                    out[b]["train"] = kept["train"]
                    key = f"{other.name}/train"
                    report.dropped[key] = report.dropped.get(key, 0) + rep.dropped["train"]
    return out


# ---------------------------------------------------------------------------------------------
# Sampling


def shares(sizes: list[int], sampling: str, temperature: float) -> list[float]:
    """Each task's share of the batches."""
    if sampling == "equal":
        weights = [1.0] * len(sizes)
    elif sampling == "temperature":
        weights = [n ** (1 / temperature) for n in sizes]
    else:
        weights = [float(n) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


def counts(total: int, p: list[float]) -> list[int]:
    """round(total * p_k), summing to total exactly (largest remainders; ties to the earlier task)."""
    raw = [total * x for x in p]
    out = [int(r) for r in raw]
    order = sorted(range(len(p)), key=lambda k: (-(raw[k] - out[k]), k))
    for k in order[:total - sum(out)]:
        out[k] += 1
    return out


def schedule(task_ids: list[int], lengths: list[int], cfg: Config, batch_size: int, seed: int, epoch: int,
             group_by_length: bool = True, *, within) -> list[list[int]]:
    """One epoch's batches of example indices, each from one task, tasks drawn in the configured shares.

    within(lengths, batch_size, seed, epoch, group_by_length) -> batches: how one task's rows are batched (the
    loop's own shuffled, length-grouped batching, `data.batches.train_batches`, passed in by the run layer)."""
    n_tasks = max(task_ids) + 1
    members = [[i for i, t in enumerate(task_ids) if t == k] for k in range(n_tasks)]
    own = [-(-len(m) // batch_size) for m in members]  # each task's batches per pass over its rows
    wanted = counts(sum(own), shares([len(m) for m in members], cfg.sampling, cfg.temperature))
    rng = random.Random(seed * 1_000_003 + epoch)
    order = [k for k in range(n_tasks) for _ in range(wanted[k])]
    rng.shuffle(order)
    streams = []
    for k, rows in enumerate(members):
        stream, rounds = [], 0
        while len(stream) < wanted[k]:  # a task drawn more often than it has batches goes round again, reshuffled
            local = within([lengths[i] for i in rows], batch_size, seed + 7919 * (k + 1), epoch * 1000 + rounds,
                           group_by_length)
            stream += [[rows[j] for j in b] for b in local]
            rounds += 1
        streams.append(iter(stream))
    return [next(streams[k]) for k in order]


def batches(cfg: Config, examples: list[dict], train_cfg, within):
    """The loop's batch maker for this regime: epoch -> batches (`within`: see `schedule`)."""
    task_ids = [ex["task"] for ex in examples]
    lengths = [len(ex["input_ids"]) for ex in examples]
    return lambda epoch: schedule(task_ids, lengths, cfg, train_cfg.batch_size, train_cfg.seed, epoch,
                                  train_cfg.group_by_length, within=within)


# ---------------------------------------------------------------------------------------------
# The objective over all tasks


def heads_of(id2label: dict) -> list[TaskHead]:
    """The tasks' heads from a classifier's label names (`<task>:<label>`, in row order)."""
    heads: list[TaskHead] = []
    id2label = {int(k): v for k, v in id2label.items()}  # a JSON round trip makes the keys strings
    for i in range(len(id2label)):
        task, _, label = str(id2label[i]).partition(SEP)
        if not heads or heads[-1].name != task:
            heads.append(TaskHead(task, [], i))
        heads[-1].labels.append(label)
    return heads


class MultiTask:
    """Each task's loss and metrics over its own rows of the shared classifier; what the loop and evaluation
    call in place of an objective module."""

    HEAD = "sequence-classification"

    def __init__(self, task_module, heads: list[TaskHead], watch: str):
        self.task, self.heads = task_module, heads
        per = {f"{h.name}/{m}": d for h in heads for m, d in task_module.METRICS.items()}
        per[MEAN] = task_module.METRICS[task_module.MAIN_METRIC]  # a mean of main metrics: better in their direction
        self.METRICS = per
        self.MAIN_METRIC = MEAN if watch == "mean" else f"{watch}/{task_module.MAIN_METRIC}"

    def _logits(self, model, batch) -> torch.Tensor:
        """Logits with every column outside the row's task at -inf: softmax and argmax stay within its head."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        cols = torch.arange(logits.size(-1), device=logits.device)
        start = torch.tensor([h.offset for h in self.heads], device=logits.device)[batch["task"]]
        size = torch.tensor([len(h.labels) for h in self.heads], device=logits.device)[batch["task"]]
        inside = (cols >= start[:, None]) & (cols < (start + size)[:, None])
        return logits.masked_fill(~inside, float("-inf"))

    def loss(self, model, batch, cfg):
        total = F.cross_entropy(self._logits(model, batch), batch["labels"], reduction="sum")
        return Loss(total, batch["labels"].numel())

    @torch.no_grad()
    def eval_step(self, model, batch, cfg) -> dict[str, list]:
        logits = self._logits(model, batch)
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        return {"pred": logits.argmax(-1).tolist(), "label": batch["labels"].tolist(), "loss": losses.tolist(),
                "task": batch["task"].tolist()}

    def metrics(self, outputs: dict[str, list], cfg) -> dict[str, float]:
        scores, mains = {}, []
        for k, head in enumerate(self.heads):
            rows = [i for i, t in enumerate(outputs["task"]) if t == k]
            if not rows:
                continue
            mine = self.task.metrics({key: [outputs[key][i] for i in rows] for key in ("pred", "label", "loss")}, cfg)
            scores.update({f"{head.name}/{m}": v for m, v in mine.items()})
            mains.append(mine[self.task.MAIN_METRIC])
        scores[MEAN] = sum(mains) / len(mains) if mains else float("nan")
        return scores

    def per_task(self, results: dict, base: dict | None) -> dict:
        """summary.json's `tasks`: each task's tuned and base metrics per held-out split."""
        out = {}
        for head in self.heads:
            prefix = f"{head.name}/"
            mine = {split: {k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)} for split, m in results.items()}
            theirs = {split: {k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}
                      for split, m in (base or {}).items()}
            out[head.name] = {**mine, "base": theirs or None, "labels": head.labels}
        return out


def wrap_objective(objective, cfg: Config, prepared):
    """The run's objective for these tasks (every task is classify, checked in Config)."""
    return MultiTask(objective, heads_of(prepared.model_kwargs["id2label"]), cfg.early_stopping)


# ---------------------------------------------------------------------------------------------
# One task of a finished run: `predict RUN --task NAME`, `eval RUN --task NAME --data FILE`


class TaskSlice(torch.nn.Module):
    """The shared model seen through one task's head: its logits are the task's rows, its config names the task's
    own labels, so the task's objective module predicts and scores with it unchanged."""

    def __init__(self, model, head: TaskHead):
        super().__init__()
        self.model, self.head = model, head
        self.config = _ConfigView(dict(enumerate(head.labels)))

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        return _Output(out.logits[:, self.head.offset:self.head.offset + len(self.head.labels)])


@dataclasses.dataclass
class _ConfigView:
    id2label: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor


def task_view(trained, name: str | None):
    """`trained` (trained.Trained) narrowed to one task: its model slice, objective config and data section."""
    cfg = trained.cfg.regime
    names = [t.name for t in cfg.tasks]
    if name is None:
        raise TunesmithError(f"this run trained {len(names)} tasks ({', '.join(names)}); name one",
                             where="--task", hint=f"e.g. --task {names[0]}")
    if name not in names:
        raise TunesmithError(f"{name!r} is not a task of this run (tasks: {', '.join(names)})", where="--task")
    task = cfg.tasks[names.index(name)]
    head = next(h for h in heads_of(trained.model.config.id2label) if h.name == name)
    obj_cfg = task.objective.model_copy(update={"labels": head.labels})
    return dataclasses.replace(trained, model=TaskSlice(trained.model, head).eval(), obj_cfg=obj_cfg,
                               data_cfg=task.data, name=f"{trained.name} --task {name}")
