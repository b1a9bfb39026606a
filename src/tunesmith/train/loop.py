"""The one training loop, shared by every tuning and objective.

For each optimizer step: take `grad_accum` micro-batches, sum their losses' gradients, divide by
the number of loss units (examples or target tokens) across all of them and all processes, add a
regime's penalty gradient (once per step), clip, step. Accumulating this way gives exactly the
gradient of the equivalent large batch.

Around that: warmup + decay schedule, evaluation every N steps or each epoch, early stopping with
best-checkpoint restore (a tie on the watched metric goes to the lower validation loss), checkpoints
that `--resume` continues from bit-for-bit on CPU, a progress bar, and one JSON line per log step in
metrics.jsonl. Each validation line also carries the mean training loss since the previous evaluation
(`train_loss`), so the train/validation gap can be read from the log.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..axes import improves
from ..data.batches import shard, train_batches
from ..data.collate import collate
from ..errors import TunesmithError
from ..evaluate.score import evaluate
from ..progress import Progress
from ..report import trackers
from . import checkpoint
from .schedule import make_scheduler


class TrainingDiverged(TunesmithError):
    """The loss became NaN or infinite."""


@dataclass
class LoopState:
    """Everything needed to continue a run exactly where it stopped (saved in each checkpoint)."""

    step: int = 0
    epoch: int = 0
    window: int = 0
    """Optimizer steps already taken within the current epoch."""
    best: float | None = None
    best_step: int | None = None
    best_loss: float | None = None
    """The validation loss at the best step: a later evaluation that ties the best score wins with a lower loss."""
    bad_evals: int = 0
    stopped_early: bool = False
    halted: bool = False
    """The caller's `on_eval` asked to stop (a sweep pruning a trial): training ends as after early stopping."""
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    """Training time so far, evaluation excluded."""
    evals: list = field(default_factory=list)
    since_eval_loss: float = 0.0
    since_eval_count: float = 0.0
    """Summed training loss and its units since the last evaluation."""


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with the step it belongs to; each line also goes to the
    run's trackers (`train.report_to`) when an accelerator carrying them is given."""

    def __init__(self, path: Path, accelerator=None):
        self.path = path
        self.accelerator = accelerator

    def write(self, **record) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None:
            trackers.log(self.accelerator, record)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step`, so a resumed run's log reads like an uninterrupted one."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resume_state(state_cls, ckpt_dir: Path, log: MetricsLog, model, optimizer, scheduler, resume: bool, say,
                 main: bool = True):
    """The loop state to start from: the latest checkpoint's (weights, optimizer, schedule and RNG restored, the
    metrics log cut back to its step) under `--resume`, else a fresh one. Shared by every stepper's loop."""
    if resume and (found := checkpoint.find(ckpt_dir)) is not None:
        state = state_cls(**checkpoint.load(found, model, optimizer, scheduler))
        if main:
            log.truncate_after(state.step)
        say(f"resuming from step {state.step}" + (f" (epoch {state.epoch})" if hasattr(state, "epoch") else ""))
        return state
    if resume:
        say("no checkpoint found; starting from the beginning")
    return None


@dataclass
class Fit:
    """What one supervised training run carries from step to step: the model, its optimizer and schedule, the
    resumable state, the metrics log and what early stopping watches."""

    model: object
    objective: object
    obj_cfg: object
    examples: list[dict]
    val_examples: list[dict] | None
    cfg: object
    pad_id: int
    accelerator: object
    penalty: object
    optimizer: object
    scheduler: object
    trainable: list
    lengths: list[int]
    epoch_batches: Callable[[int], list[list[int]]]
    """epoch -> micro-batches of example indices, before sharding."""
    total: int
    steps_per_epoch: int
    ckpt_dir: Path
    log: MetricsLog
    state: LoopState
    watch: str
    direction: str | None
    progress: Progress
    window_loss: float = 0.0
    window_count: float = 0.0
    """Training loss summed since the last metrics line."""
    last_eval_step: int = -1
    on_eval: Callable[[int, dict], bool] | None = None
    """Called after each validation with (step, scores); True stops training (see `fit`)."""

    @property
    def use_val(self) -> bool:
        return bool(self.val_examples)


def fit(*, model, objective, obj_cfg, train_examples: list[dict], val_examples: list[dict] | None, cfg,
        pad_id: int, run_dir: Path, accelerator, resume: bool = False, penalty=None, batches=None,
        on_eval: Callable[[int, dict], bool] | None = None) -> dict:
    """Train `model` in place; returns a summary of the training (steps, best, timings).

    penalty: a regime's pull towards the starting weights (`add_gradient()`, `value()`), or None.
    batches: a regime's epoch -> batches of example indices (multitask: one task per batch, tasks drawn in
             shares); a pure function of the epoch, so --resume rebuilds the same order. Default: shuffled,
             grouped by length.
    on_eval: called after each validation with (step, validation scores); returning True stops training there,
             and the run ends as after early stopping (best weights restored, `halted` in the summary). How a
             caller outside the loop (a sweep's pruner) watches and stops a run without the loop knowing it.
    """
    run = _setup(model, objective, obj_cfg, train_examples, val_examples, cfg, pad_id, run_dir, accelerator, resume,
                 penalty, batches)
    run.on_eval = on_eval
    state = run.state
    run.model.train()
    while state.step < run.total and not (state.stopped_early or state.halted):
        windows = _windows(run, state.epoch)
        for window in windows[state.window:]:
            _optimizer_step(run, window, len(windows))
            evaluated = _evaluate_when_due(run, len(windows))
            if (cfg.save_every and state.step % cfg.save_every == 0) or (not cfg.save_every and evaluated):
                _save_checkpoint(run)
            if state.stopped_early or state.halted or state.step >= run.total:
                break
    run.progress.close()
    return _summary(run, _restore_best(run))


def _setup(model, objective, obj_cfg, train_examples, val_examples, cfg, pad_id, run_dir, accelerator, resume,
           penalty, batches=None) -> Fit:
    """Batches per epoch and total steps, the optimizer and schedule, the state (fresh or resumed)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    length = getattr(objective, "example_length", None)
    lengths = [length(e, obj_cfg) if length else len(e["input_ids"]) for e in train_examples]
    epoch_batches = batches or (lambda epoch: train_batches(lengths, cfg.batch_size, cfg.seed, epoch,
                                                            cfg.group_by_length))
    micro_per_epoch = len(shard(epoch_batches(0), rank, world))
    if micro_per_epoch == 0:
        raise TunesmithError(f"train has {len(lengths)} examples, fewer than one batch per process",
                             where="train.batch_size")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.warmup, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]

    ckpt_dir, log = run_dir / "checkpoints", MetricsLog(run_dir / "metrics.jsonl", accelerator)
    state = resume_state(LoopState, ckpt_dir, log, accelerator.unwrap_model(model), optimizer, scheduler, resume,
                         accelerator.print, accelerator.is_main_process) or LoopState()
    watch = cfg.early_stopping.metric or objective.MAIN_METRIC
    direction = objective.METRICS[watch]  # the objective's own: "min" for a loss or an error, "max" for a score
    progress = Progress(total, state.step, enabled=accelerator.is_main_process)
    return Fit(model, objective, obj_cfg, train_examples, val_examples, cfg, pad_id, accelerator, penalty, optimizer,
               scheduler, trainable, lengths, epoch_batches, total, steps_per_epoch, ckpt_dir, log, state, watch,
               direction, progress,
               last_eval_step=state.evals[-1]["step"] if state.evals else -1)


def _windows(run: Fit, epoch: int) -> list[list[list[int]]]:
    """This process's micro-batches of an epoch, grouped into accumulation windows (one optimizer step each)."""
    cfg, acc = run.cfg, run.accelerator
    batches = shard(run.epoch_batches(epoch), acc.process_index, acc.num_processes)
    return [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]


def _optimizer_step(run: Fit, window: list[list[int]], n_windows: int) -> None:
    """Forward and backward over one window, the NaN stop, clipping, the step, the counters and the log line."""
    state, cfg, acc = run.state, run.cfg, run.accelerator
    tick = time.perf_counter()
    loss_sum, count = _step(run.model, run.objective, run.obj_cfg, run.examples, window, run.pad_id, acc,
                            run.trainable, run.penalty)
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(
            f"the training loss became {loss_sum} at step {state.step + 1}",
            hint="lower train.lr or set train.max_grad_norm; the last good checkpoint is kept under "
                 f"{run.ckpt_dir} (continue from it with --resume after changing the config)",
        )
    grad_norm = acc.clip_grad_norm_(run.trainable, cfg.max_grad_norm or float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    world = acc.num_processes
    state.step += 1
    state.window += 1
    state.examples += sum(len(b) for b in window) * world
    state.tokens += sum(run.lengths[i] for b in window for i in b) * world
    state.seconds += time.perf_counter() - tick
    run.window_loss, run.window_count = run.window_loss + loss_sum, run.window_count + count
    state.since_eval_loss += loss_sum
    state.since_eval_count += count
    run.progress.update(1, loss=f"{loss_sum / max(count, 1):.4f}")
    if state.step % cfg.log_every == 0 or state.step == run.total:
        _log_line(run, grad_norm, n_windows)


def _log_line(run: Fit, grad_norm, n_windows: int) -> None:
    state = run.state
    record = {
        "step": state.step,
        "epoch": round(state.epoch + state.window / n_windows, 4),
        "loss": run.window_loss / max(run.window_count, 1),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "examples_per_s": state.examples / max(state.seconds, 1e-9),
    }
    if run.penalty is not None:
        record["penalty"] = run.penalty.value()
    if run.accelerator.is_main_process:
        run.log.write(**record)
    run.progress.line(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", rate=f"{record['examples_per_s']:.1f}ex/s")
    run.window_loss = run.window_count = 0.0


def _evaluate_when_due(run: Fit, n_windows: int) -> bool:
    """Evaluate every `eval_every` steps, at each epoch's end (`eval_every: epoch`) and at the last step; moves
    the epoch counter on at its end. True if an evaluation ran."""
    state, cfg = run.state, run.cfg
    evaluated = False
    if run.use_val and isinstance(cfg.eval_every, int) and state.step % cfg.eval_every == 0:
        state.stopped_early = _evaluate(run)
        evaluated = True
    if state.window == n_windows:  # end of epoch
        state.epoch, state.window = state.epoch + 1, 0
        if run.use_val and cfg.eval_every == "epoch":
            state.stopped_early = _evaluate(run)
            evaluated = True
    if run.use_val and state.step == run.total and run.last_eval_step != state.step:
        state.stopped_early = _evaluate(run) or state.stopped_early
        evaluated = True
    return evaluated


def _evaluate(run: Fit) -> bool:
    """Evaluate on validation; update early stopping (keeping the best weights); True if training should stop."""
    state, acc, es = run.state, run.accelerator, run.cfg.early_stopping
    run.last_eval_step = state.step
    eval_bs = run.cfg.eval_batch_size or 2 * run.cfg.batch_size
    scores = evaluate(run.model, run.objective, run.obj_cfg, run.val_examples, eval_bs, run.pad_id, acc, "validation")
    if state.since_eval_count:
        scores["train_loss"] = state.since_eval_loss / state.since_eval_count
    state.since_eval_loss = state.since_eval_count = 0.0
    state.evals.append({"step": state.step, **scores})
    if acc.is_main_process:
        run.log.write(step=state.step, split="validation", **scores)
    if run.watch not in scores:
        raise TunesmithError(f"early stopping watches {run.watch!r}, which evaluation did not report "
                             f"(reported: {', '.join(scores)})", where="train.early_stopping.metric")
    loss = scores.get("loss") if run.objective.METRICS.get("loss") == "min" else None
    if improves(run.direction, scores[run.watch], state.best, es.min_delta, loss, state.best_loss):
        state.best, state.best_step, state.best_loss, state.bad_evals = scores[run.watch], state.step, loss, 0
        if es.enabled and acc.is_main_process:
            checkpoint.save_best(run.ckpt_dir, acc.unwrap_model(run.model))
    else:
        state.bad_evals += 1
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "train_loss")
    acc.print(f"step {state.step}: validation {shown}")
    if run.on_eval is not None and run.on_eval(state.step, scores):
        state.halted = True
        acc.print(f"step {state.step}: stopped by the caller (on_eval)")
    return es.enabled and state.bad_evals >= es.patience


def _save_checkpoint(run: Fit) -> None:
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        checkpoint.save(run.ckpt_dir, run.accelerator.unwrap_model(run.model), run.optimizer, run.scheduler,
                        run.state.__dict__)


def _restore_best(run: Fit) -> bool:
    state, acc = run.state, run.accelerator
    acc.wait_for_everyone()  # the main process may still be writing the best weights
    if not (run.use_val and run.cfg.early_stopping.enabled and state.best_step is not None
            and state.best_step != state.step):
        return False
    restored = checkpoint.restore_best(run.ckpt_dir, acc.unwrap_model(run.model))
    if restored:
        acc.print(f"restored the best checkpoint (step {state.best_step}, {run.watch} {state.best:.4f})")
    return restored


def _summary(run: Fit, restored: bool) -> dict:
    state = run.state
    return {
        "steps": state.step,
        "total_steps": run.total,
        "epochs": round(state.step / run.steps_per_epoch, 3),
        "stopped_early": state.stopped_early and state.step < run.total,  # patience out at the last step cut nothing
        "halted": state.halted,
        "best_step": state.best_step,
        "best_metric": {run.watch: state.best} if state.best is not None else None,
        "restored_best": restored,
        "train_seconds": round(state.seconds, 2),
        "examples_per_s": round(state.examples / max(state.seconds, 1e-9), 2),
        "tokens_per_s": round(state.tokens / max(state.seconds, 1e-9), 1),
        "validation_history": state.evals,
    }


def _step(model, objective, obj_cfg, examples, window, pad_id, accelerator, trainable, penalty=None
          ) -> tuple[float, float]:
    """Forward and backward over one accumulation window; leaves gradients scaled to a mean per loss unit,
    plus the penalty's gradient (added once, after scaling: it belongs to the step, not to a micro-batch).
    Returns the summed task loss and its unit count."""
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    for i, idx in enumerate(window):
        batch = {k: v.to(accelerator.device) for k, v in collate([examples[j] for j in idx], pad_id).items()}
        sync = i == len(window) - 1
        with accelerator.no_sync(model) if not sync and accelerator.num_processes > 1 else nullcontext():
            with accelerator.autocast():
                out = objective.loss(model, batch, obj_cfg)
            accelerator.backward(out.total)
        loss_sum += out.total.detach().float()
        count += out.count
    # DDP averages gradients over processes; dividing by the global count per process undoes that.
    global_count = accelerator.reduce(count.clone(), "sum") if accelerator.num_processes > 1 else count
    scale = accelerator.num_processes / global_count.clamp(min=1)
    for p in trainable:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    if penalty is not None:
        penalty.add_gradient()
    global_loss = accelerator.reduce(loss_sum.clone(), "sum") if accelerator.num_processes > 1 else loss_sum
    return float(global_loss), float(global_count)

