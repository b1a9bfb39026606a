"""The loop of the RL objectives (train/ppo.py, train/grpo.py): steps of rollouts and updates, each step taking
train.batch_size training prompts (or episode seeds) in a seeded order, with the shared loop's pieces around it:
AdamW parameter groups, the learning-rate schedule, the progress line, checkpoints for `--resume`, metrics.jsonl.

The objective's loop gives one function, `step(rows, seed, state, optimizer, scheduler) -> statistics`; the
statistics named in `logged` are averaged over the steps between metrics lines.

Determinism: step k uses the seed `train.seed * 1_000_003 + k` (rollout sampling, minibatch order), and the
prompts of each epoch are shuffled with the seed and the epoch, so a resumed run repeats an uninterrupted one
exactly on CPU.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from ..errors import TunesmithError
from ..progress import Progress
from . import checkpoint
from .loop import MetricsLog, param_groups, resume_state
from .schedule import make_scheduler

import torch


def fit(*, model, step, rows: int, cfg, run_dir: Path, resume: bool, say, accelerator, state, logged: tuple,
        updates_per_step: int, desc: str, shown: dict) -> tuple[object, int]:
    """Train `model` in place for train.max_steps steps (or train.epochs passes over the `rows` training prompts);
    `state` is the objective's fresh state (a dataclass with step, seconds, answers and window), replaced by the
    checkpoint's under --resume. `shown`: {statistic: format} for the progress line. Returns (state, total steps)."""
    per_epoch = rows // cfg.batch_size
    if per_epoch == 0:
        raise TunesmithError(f"train has {rows} prompts, fewer than one rollout batch", where="train.batch_size")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.warmup, total * updates_per_step)
    ckpt_dir, log = run_dir / "checkpoints", MetricsLog(run_dir / "metrics.jsonl", accelerator)
    state = resume_state(type(state), ckpt_dir, log, model, optimizer, scheduler, resume, say) or state
    save_every = cfg.save_every or cfg.log_every
    progress = Progress(total, state.step, desc=desc)
    model.eval()  # no dropout: the ratios compare the same function before and after each update
    while state.step < total:
        epoch, k = divmod(state.step, per_epoch)
        order = list(range(rows))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        tick = time.perf_counter()
        stats = step(idx, cfg.seed * 1_000_003 + state.step, state, optimizer, scheduler)
        state.step += 1
        state.seconds += time.perf_counter() - tick
        state.answers += stats.pop("answers")
        for key, value in stats.items():
            state.window[key] = state.window.get(key, 0.0) + value
        state.window["n"] = state.window.get("n", 0) + 1
        progress.update(1, **{k: f"{stats[k]:{f}}" for k, f in shown.items() if k in stats})
        if state.step % cfg.log_every == 0 or state.step == total:
            n = state.window.pop("n")
            record = {"step": state.step, **{k: state.window[k] / n for k in logged if k in state.window},
                      "lr": scheduler.get_last_lr()[0], "answers_per_s": state.answers / max(state.seconds, 1e-9)}
            state.window = {}
            log.write(**record)
            progress.line(**{k: f"{record[k]:{f}}" for k, f in shown.items() if k in record},
                          rate=f"{record['answers_per_s']:.1f}ans/s")
        if state.step % save_every == 0 or state.step == total:
            checkpoint.save(ckpt_dir, model, optimizer, scheduler, state.__dict__)
    progress.close()
    return state, total


def summary(state, total: int, rows: int, batch_size: int) -> dict:
    return {"steps": state.step, "total_steps": total, "epochs": round(state.step / (rows // batch_size), 3),
            "train_seconds": round(state.seconds, 2), "answers_per_s": round(state.answers / max(state.seconds, 1e-9), 2)}
