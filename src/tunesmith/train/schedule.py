"""Learning-rate schedules: linear warmup, then linear or cosine decay to zero, or constant."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(warmup: float, total: int) -> int:
    """`warmup` < 1 is a fraction of all steps, otherwise a number of steps."""
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def make_scheduler(optimizer, kind: str, warmup: float, total: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_lambda(kind, warmup_steps(warmup, total), total))
