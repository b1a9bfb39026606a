"""The one training loop, shared by every tuning and objective.

For each optimizer step: take `grad_accum` micro-batches, sum their losses' gradients, divide by
the number of loss units (examples or target tokens) across all of them and all processes, add a
regime's penalty gradient (once per step), clip, step. Accumulating this way gives exactly the
gradient of the equivalent large batch.

Around that: warmup + decay schedule, evaluation every N steps or each epoch, early stopping with
best-checkpoint restore, checkpoints that `--resume` continues from bit-for-bit on CPU, a progress
bar, and one JSON line per log step in metrics.jsonl. Each validation line also carries the mean
training loss since the previous evaluation (`train_loss`), so the train/validation gap can be read
from the log.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.collate import collate
from ..errors import TunesmithError
from ..evaluate.score import evaluate
from . import checkpoint
from .batches import shard, train_batches
from .progress import Progress
from .schedule import make_scheduler

LOWER_IS_BETTER = {"loss", "perplexity"}


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
    bad_evals: int = 0
    stopped_early: bool = False
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    """Training time so far, evaluation excluded."""
    evals: list = field(default_factory=list)
    since_eval_loss: float = 0.0
    since_eval_count: float = 0.0
    """Summed training loss and its units since the last evaluation."""


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with the step it belongs to."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

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


def _better(value: float, best: float | None, metric: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if metric in LOWER_IS_BETTER else value > best + min_delta


def fit(*, model, objective, obj_cfg, train_examples: list[dict], val_examples: list[dict] | None, cfg,
        pad_id: int, run_dir: Path, accelerator, resume: bool = False, penalty=None, batches=None) -> dict:
    """Train `model` in place; returns a summary of the training (steps, best, timings).

    penalty: a regime's pull towards the starting weights (`add_gradient()`, `value()`), or None.
    batches: a regime's epoch -> batches of example indices (multitask: one task per batch, tasks drawn in
             shares); a pure function of the epoch, so --resume rebuilds the same order. Default: shuffled,
             grouped by length.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    lengths = [len(e["input_ids"]) for e in train_examples]
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

    ckpt_dir, log = run_dir / "checkpoints", MetricsLog(run_dir / "metrics.jsonl")
    state = LoopState()
    if resume and (found := checkpoint.find(ckpt_dir)) is not None:
        state = LoopState(**checkpoint.load(found, accelerator.unwrap_model(model), optimizer, scheduler))
        if accelerator.is_main_process:
            log.truncate_after(state.step)
        accelerator.print(f"resuming from step {state.step} (epoch {state.epoch})")
    elif resume:
        accelerator.print("no checkpoint found; starting from the beginning")

    es = cfg.early_stopping
    watch = es.metric or objective.MAIN_METRIC
    use_val = bool(val_examples)
    eval_bs = cfg.eval_batch_size or 2 * cfg.batch_size
    progress = Progress(total, state.step, enabled=accelerator.is_main_process)
    window_loss = window_count = 0.0
    last_eval_step = state.evals[-1]["step"] if state.evals else -1

    def run_eval() -> bool:
        """Evaluate on validation; update early stopping; True if training should stop."""
        nonlocal last_eval_step
        last_eval_step = state.step
        scores = evaluate(model, objective, obj_cfg, val_examples, eval_bs, pad_id, accelerator, "validation")
        if state.since_eval_count:
            scores["train_loss"] = state.since_eval_loss / state.since_eval_count
        state.since_eval_loss = state.since_eval_count = 0.0
        state.evals.append({"step": state.step, **scores})
        if accelerator.is_main_process:
            log.write(step=state.step, split="validation", **scores)
        if watch not in scores:
            raise TunesmithError(f"early stopping watches {watch!r}, which evaluation did not report "
                                 f"(reported: {', '.join(scores)})", where="train.early_stopping.metric")
        if _better(scores[watch], state.best, watch, es.min_delta):
            state.best, state.best_step, state.bad_evals = scores[watch], state.step, 0
            if es.enabled and accelerator.is_main_process:
                checkpoint.save_best(ckpt_dir, accelerator.unwrap_model(model))
        else:
            state.bad_evals += 1
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "train_loss")
        accelerator.print(f"step {state.step}: validation {shown}")
        return es.enabled and state.bad_evals >= es.patience

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpoint.save(ckpt_dir, accelerator.unwrap_model(model), optimizer, scheduler, state.__dict__)

    model.train()
    while state.step < total and not state.stopped_early:
        order = shard(epoch_batches(state.epoch), rank, world)
        windows = [order[i:i + cfg.grad_accum] for i in range(0, len(order), cfg.grad_accum)]
        for window in windows[state.window:]:
            tick = time.perf_counter()
            loss_sum, count = _step(model, objective, obj_cfg, train_examples, window, pad_id, accelerator, trainable,
                                    penalty)
            if not math.isfinite(loss_sum):
                raise TrainingDiverged(
                    f"the training loss became {loss_sum} at step {state.step + 1}",
                    hint="lower train.lr or set train.max_grad_norm; the last good checkpoint is kept under "
                         f"{ckpt_dir} (continue from it with --resume after changing the config)",
                )
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.window += 1
            state.examples += sum(len(b) for b in window) * world
            state.tokens += sum(lengths[i] for b in window for i in b) * world
            state.seconds += time.perf_counter() - tick
            window_loss, window_count = window_loss + loss_sum, window_count + count
            state.since_eval_loss += loss_sum
            state.since_eval_count += count
            progress.update(1, loss=f"{loss_sum / max(count, 1):.4f}")

            if state.step % cfg.log_every == 0 or state.step == total:
                record = {
                    "step": state.step,
                    "epoch": round(state.epoch + state.window / len(windows), 4),
                    "loss": window_loss / max(window_count, 1),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "examples_per_s": state.examples / max(state.seconds, 1e-9),
                }
                if penalty is not None:
                    record["penalty"] = penalty.value()
                if accelerator.is_main_process:
                    log.write(**record)
                progress.line(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                              rate=f"{record['examples_per_s']:.1f}ex/s")
                window_loss = window_count = 0.0

            evaluated = False
            if use_val and isinstance(cfg.eval_every, int) and state.step % cfg.eval_every == 0:
                state.stopped_early = run_eval()
                evaluated = True
            if state.window == len(windows):  # end of epoch
                state.epoch, state.window = state.epoch + 1, 0
                if use_val and cfg.eval_every == "epoch":
                    state.stopped_early = run_eval()
                    evaluated = True
            if use_val and state.step == total and last_eval_step != state.step:
                state.stopped_early = run_eval() or state.stopped_early
                evaluated = True
            if (cfg.save_every and state.step % cfg.save_every == 0) or (not cfg.save_every and evaluated):
                save_checkpoint()
            if state.stopped_early or state.step >= total:
                break
    progress.close()

    restored = False
    accelerator.wait_for_everyone()  # the main process may still be writing the best weights
    if use_val and es.enabled and state.best_step is not None and state.best_step != state.step:
        restored = checkpoint.restore_best(ckpt_dir, accelerator.unwrap_model(model))
        if restored:
            accelerator.print(f"restored the best checkpoint (step {state.best_step}, {watch} {state.best:.4f})")
    return {
        "steps": state.step,
        "total_steps": total,
        "epochs": round(state.step / steps_per_epoch, 3),
        "stopped_early": state.stopped_early,
        "best_step": state.best_step,
        "best_metric": {watch: state.best} if state.best is not None else None,
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

