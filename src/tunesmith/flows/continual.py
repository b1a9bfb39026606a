"""Continual learning over a sequence of tasks (`regime: {kind: continual, tasks: [...]}`), top to bottom:

config -> every task's data (read, split, checks, tokenize with its own objective) -> run folder
       -> model (load once, tune once; classification tasks share one head, sliced per task)
       -> every task's test split scored before training (forward transfer's reference)
       -> for each task in order: its train rows (+ replay rows of earlier tasks) -> the shared loop
          (with the penalty anchored at the previous task's weights) -> every task's test split scored
          (a row of the accuracy matrix) -> the task's end state saved (the resume point) -> replay buffer
          and penalty updated from the finished task
       -> the R table, average accuracy, BWT, FWT, forgetting -> artifacts (final weights, summary.json)

Run folder: tasks/<name>/ holds a task's loop output (metrics.jsonl, checkpoints while it trains) and,
once finished, `end.safetensors` (its trainable weights: with `adapters`, that task's adapter and head
slice) and `penalty.safetensors` (the anchors after it). progress.json lists the finished tasks and the
rows of R; `--resume` continues at the first unfinished task, from its own last checkpoint if it has one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import set_seed

from .. import artifacts
from ..config import RunConfig
from ..data.checks import check_card, check_rows, raise_for_errors
from ..errors import ConfigError
from ..evaluate import continual as measure
from ..evaluate.score import evaluate
from ..models.load import build_on_meta, load_tokenizer
from ..models.params import count_parameters, format_parameters
from ..objectives import OBJECTIVES
from ..regimes import continual as regime
from ..regimes.tasks import load_task_splits
from ..train.checkpoint import load_trainable, trainable_state
from ..train.loop import fit
from ..tuning import TUNINGS
from ..build import apply_tuning, check_before_loading, load_base
from ..report import trackers
from .common import finish, one_process, open_run_dir

PROGRESS = "progress.json"


def applies(cfg: RunConfig) -> bool:
    return cfg.regime.tasks is not None


class Task:
    """One task of the sequence, prepared: its examples, its (sliced) objective and where it writes."""

    def __init__(self, index: int, cfg, prepared, objective, run_dir: Path):
        self.index, self.name, self.cfg = index, cfg.name, cfg
        self.examples, self.card, self.objective = prepared.examples, prepared.card, objective
        self.dir = run_dir / "tasks" / cfg.name

    @property
    def metric(self) -> str:
        return self.objective.MAIN_METRIC


def prepare_tasks(cfg: RunConfig, tokenizer, run_dir: Path) -> tuple[list[Task], dict, regime.TaskSlices]:
    """Every task's splits, checks and examples, and one classifier head over all their labels: task i's labels
    at its own offset, named `<task>:<label>`, its examples tagged with `task: i`. Returns (tasks, model kwargs,
    slices)."""
    prepared_all = []
    for i, task in enumerate(cfg.regime.tasks):
        objective = OBJECTIVES[task.objective.kind]
        splits, report = check_rows(load_task_splits(task, i, cfg.train.seed), task.data.checks)
        prepared = objective.prepare(splits, tokenizer, task.objective, task.data)
        report.findings += check_card(prepared.card, task.data.checks, task.data.max_length)
        prepared.card["checks"] = report.to_dict()
        print(f"task {i} {task.name!r}: {report.render()}")
        raise_for_errors(report)
        if not prepared.examples.get("test"):
            raise ConfigError(f"task {task.name!r} has no test split: every task is scored after each task",
                              where=f"regime.tasks[{i}].data.split.test")
        prepared_all.append((task, objective, prepared))

    # the config allows classification tasks only (regime.continual checks): one head, a slice per task
    slices = regime.TaskSlices([p.model_kwargs["num_labels"] for _, _, p in prepared_all])
    names = []
    for i, (task, _, prepared) in enumerate(prepared_all):
        offset = slices.bounds[i][0]
        labels = prepared.model_kwargs["id2label"]
        names += [f"{task.name}:{labels[k]}" for k in range(prepared.model_kwargs["num_labels"])]
        prepared.examples = {s: [{**e, "labels": e["labels"] + offset, "task": i} for e in ex]
                             for s, ex in prepared.examples.items()}
    kwargs = {"num_labels": len(names), "id2label": dict(enumerate(names)),
              "label2id": {n: i for i, n in enumerate(names)}}
    tasks = [Task(i, task, prepared, slices.objective(objective), run_dir)
             for i, (task, objective, prepared) in enumerate(prepared_all)]
    return tasks, kwargs, slices


def check_adapters_freeze_base(cfg: RunConfig, head: str, kwargs: dict) -> None:
    """`adapters` keeps earlier tasks intact only if the tuning leaves every base weight frozen: checked on
    the model built on the meta device (no weights read)."""
    model = build_on_meta(cfg.model, head, kwargs)
    from ..models.anatomy import head_parameters

    original = {id(p) for p in model.parameters()} - {id(p) for p in head_parameters(model)}
    with torch.device("meta"):
        tuned = TUNINGS[cfg.tuning.kind].apply(model, cfg.tuning, head)
    if any(p.requires_grad and id(p) in original for p in tuned.parameters()):
        raise ConfigError(f"regime.adapters gives each task its own adapter over a frozen base, and tuning "
                          f"{cfg.tuning.kind!r} trains base weights", where="tuning.kind",
                          hint="use a tuning that freezes the base (lora, adapter, ia3, ...), or drop regime.adapters")


def train(cfg: RunConfig, *, resume: bool = False, force: bool = False) -> dict:
    from ..run import params_summary

    started = time.perf_counter()
    reg = cfg.regime
    run_dir = Path(cfg.output.dir) / cfg.name
    accelerator = one_process(cfg, run_dir)
    artifacts.check_run_dir(run_dir, resume=resume, force=force)
    tokenizer = load_tokenizer(cfg.model)
    tasks, kwargs, slices = prepare_tasks(cfg, tokenizer, run_dir)
    head = OBJECTIVES[cfg.regime.tasks[0].objective.kind].HEAD
    # the tuning on this architecture, for the run's head (the first task's objective stands for all)
    check_before_loading(cfg.model_copy(update={"objective": cfg.regime.tasks[0].objective}), kwargs)
    if reg.adapters:
        check_adapters_freeze_base(cfg, head, kwargs)

    lock = open_run_dir(run_dir, cfg, kwargs, {t.name: t.card for t in tasks}, resume, force, accelerator)
    try:
        summary = _run(run_dir, cfg, tasks, kwargs, slices, head, tokenizer, accelerator, resume, started,
                       params_summary)
        trackers.finish(accelerator, summary)
        return summary
    except BaseException as e:
        artifacts.set_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        artifacts.release(lock)


def _run(run_dir, cfg, tasks, kwargs, slices, head, tokenizer, accelerator, resume, started, params_summary) -> dict:
    from ..models.anatomy import logits_layer

    reg, device, pad_id = cfg.regime, accelerator.device, tokenizer.pad_token_id
    eval_bs = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    set_seed(cfg.train.seed)
    model = load_base(cfg, head, kwargs, torch.float32, pad_id)
    model = apply_tuning(model, TUNINGS[cfg.tuning.kind], cfg, head, tokenizer, print).to(device)
    slices.attach(logits_layer(model, slices.total))
    trainable, total = count_parameters(model)
    print(format_parameters(trainable, total))
    fresh = trainable_state(model)  # with adapters: every task's adapter starts here
    states: dict[str, dict] = {}    # with adapters: each finished task's adapter, swapped in to score it

    def score_all(after: int) -> list[float]:
        """Every task's main test metric, the model as it stands after task `after` (-1: before training)."""
        row = []
        current = trainable_state(model) if reg.adapters else None
        for t in tasks:
            if reg.adapters:
                load_trainable(model, states.get(t.name, fresh))
            scores = evaluate(model, t.objective, t.cfg.objective, t.examples["test"], eval_bs, pad_id, accelerator,
                              f"test {t.name}")
            row.append(scores[t.metric])
        if reg.adapters:
            load_trainable(model, current)
        return row

    progress = artifacts.read_json(run_dir / PROGRESS) if resume and (run_dir / PROGRESS).exists() else {}
    base = progress.get("base")
    if base is None and cfg.eval.compare_base:
        base = score_all(-1)
        artifacts.write_json(run_dir / PROGRESS, {"base": base, "done": [], "R": [], "train": {}})
        progress = artifacts.read_json(run_dir / PROGRESS)
    progress = progress or {"base": base, "done": [], "R": [], "train": {}}
    R, done = progress["R"], progress["done"]

    params = regime.anchored_parameters(model, head)
    buffer = regime.ReplayBuffer(reg.replay.per_task, cfg.train.seed) if reg.replay.per_task else None
    anchors: list[regime.Anchor] = []
    for t in tasks[:len(done)]:  # finished before an interruption: their end states, buffer rows and anchors
        end = load_file(t.dir / "end.safetensors")
        if reg.adapters:
            states[t.name] = end
        if buffer is not None:
            buffer.add(t.name, t.index, t.examples["train"])
    if done:
        last = tasks[len(done) - 1]
        load_trainable(model, load_file(last.dir / "end.safetensors"))  # with adapters, the next task loads fresh
        anchors = _restore_anchors(last.dir, params, reg.penalty.weight)
        print(f"resuming after task {len(done)} of {len(tasks)} ({last.name})")

    seq = _Sequence(run_dir, cfg, tasks, params, buffer, states, fresh, progress, score_all, accelerator, pad_id,
                    resume)
    for t in tasks[len(done):]:
        model, anchors = _train_task(seq, t, model, anchors)

    return _finish_sequence(run_dir, cfg, tasks, model, tokenizer, base, progress, buffer, (trainable, total),
                            started, params_summary)


@dataclass
class _Sequence:
    """What every task of one sequence shares."""

    run_dir: Path
    cfg: RunConfig
    tasks: list
    params: dict
    buffer: object
    states: dict
    """With adapters: each finished task's adapter, swapped in to score it."""
    fresh: dict
    """The trainable weights before any task (with adapters, every task's adapter starts here)."""
    progress: dict
    score_all: object
    accelerator: object
    pad_id: int
    resume: bool


def _train_task(seq: _Sequence, t, model, anchors):
    """One task of the sequence: train it (with replay and the penalties so far), then store its end state,
    score every task and record the resume point. Returns the model and the anchors for the next task."""
    cfg, tasks, buffer, states, progress, accelerator = seq.cfg, seq.tasks, seq.buffer, seq.states, seq.progress, \
        seq.accelerator
    reg, pad_id, params, run_dir, resume = cfg.regime, seq.pad_id, seq.params, seq.run_dir, seq.resume
    fresh, score_all, device = seq.fresh, seq.score_all, accelerator.device
    print(f"\n== task {t.index + 1}/{len(tasks)}: {t.name} ({reg.strategy()})")
    set_seed(cfg.train.seed + t.index)
    if reg.adapters:
        load_trainable(model, fresh)
    rows = list(t.examples["train"])
    if buffer is not None and buffer.rows:
        replay = buffer.draw(len(rows), reg.replay.fraction, t.index)
        print(f"replay: {len(replay)} rows of {', '.join(buffer.kept)} mixed into {len(rows)} rows")
        rows += replay
    t.dir.mkdir(parents=True, exist_ok=True)
    trained = fit(model=model, objective=t.objective, obj_cfg=t.cfg.objective, train_examples=rows,
                  val_examples=t.examples.get("validation"), cfg=cfg.train, pad_id=pad_id, run_dir=t.dir,
                  accelerator=accelerator, resume=resume, penalty=regime.Penalties(anchors) if anchors else None)
    model = accelerator.unwrap_model(model)
    end = trainable_state(model)
    if reg.adapters:
        states[t.name] = end
    if buffer is not None:
        buffer.add(t.name, t.index, t.examples["train"])
    fisher = task_fisher(model, params, t, reg.penalty.fisher_rows, pad_id, device) if regime.needs_fisher(reg) else None
    anchors = regime.after_task(reg, anchors, params, fisher)
    row = score_all(t.index)
    print("after " + t.name + ": " + ", ".join(f"{x.name} {v:.4f}" for x, v in zip(tasks, row)))
    # the resume point: end weights and anchors first, then the progress that names them
    save_file(end, t.dir / "end.safetensors")
    save_file(_anchor_state(anchors), t.dir / "penalty.safetensors")
    progress["R"].append(row)
    progress["done"].append(t.name)
    progress["train"][t.name] = {k: v for k, v in trained.items() if k != "validation_history"}
    artifacts.write_json(run_dir / PROGRESS, progress)

    return model, anchors


def _finish_sequence(run_dir, cfg, tasks, model, tokenizer, base, progress, buffer, counts, started,
                     params_summary) -> dict:
    """The R table, average accuracy, BWT and forgetting in summary.json; the weights; the table printed."""
    reg, R = cfg.regime, progress["R"]
    trainable, total = counts
    names = [t.name for t in tasks]
    result = measure.summary(R, names, base)
    result.update(strategy=reg.strategy(), metric={t.name: t.metric for t in tasks},
                  replay_rows=dict((k, len(v)) for k, v in buffer.kept.items()) if buffer else None)
    summary = {
        "name": cfg.name,
        "test": {f"{n}/{t.metric}": v for n, t, v in zip(names, tasks, R[-1])},
        "base": {"test": {f"{n}/{t.metric}": v for n, t, v in zip(names, tasks, base)}} if base else None,
        "continual": result,
        "train": progress["train"],
        "params": params_summary(trainable, total),
        "peak_memory_mb": artifacts.peak_memory_mb(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    save = getattr(TUNINGS[cfg.tuning.kind], "save", None) or artifacts.save_weights
    summary["weights"] = save(run_dir, model, tokenizer)
    finish(run_dir, summary)
    print(f"\n{reg.strategy()}: {', '.join(sorted({t.metric for t in tasks}))} on each task's test split")
    print(measure.table(R, names, base))
    print(f"\nrun saved to {run_dir}")
    return summary


def task_fisher(model, params, task: Task, rows: int, pad_id: int, device) -> dict[str, torch.Tensor]:
    """EWC's Fisher for a finished task: on its own training rows, with its own loss (the first `rows`)."""
    def loss(model, batch):
        out = task.objective.loss(model, batch, task.cfg.objective)
        return out.total / out.count

    print(f"ewc: Fisher information of {task.name} from {min(rows, len(task.examples['train']))} of its training rows")
    return regime.empirical_fisher(model, params, task.examples["train"][:rows], loss, pad_id, device)


def _anchor_state(anchors: list[regime.Anchor]) -> dict[str, torch.Tensor]:
    out = {}
    for i, a in enumerate(anchors):
        out.update({f"{i}.{k}": v for k, v in a.state().items()})
    return out or {"none": torch.zeros(0)}


def _restore_anchors(task_dir: Path, params, weight: float) -> list[regime.Anchor]:
    state = load_file(task_dir / "penalty.safetensors")
    count = len({k.split(".", 1)[0] for k in state if k != "none"})
    return [regime.Anchor.restore(params, weight, {k[len(f"{i}."):]: v for k, v in state.items()
                                                   if k.startswith(f"{i}.")}) for i in range(count)]


def select_task(model, run_dir: Path, name: str) -> None:
    """Put task `name`'s weights in place (its adapter, with `adapters`), for scoring or predicting that task."""
    path = Path(run_dir) / "tasks" / name / "end.safetensors"
    if not path.exists():
        raise ConfigError(f"no finished task {name!r} in {run_dir}", where="--task")
    load_trainable(model, load_file(path))
