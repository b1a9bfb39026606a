"""Precision choices: accelerate's mixed-precision mode and the dtype the base weights are stored in."""

from __future__ import annotations

import torch

from ..tuning import TUNINGS


def precision_and_dtype(cfg) -> tuple[str, torch.dtype]:
    """accelerate's mixed-precision mode and the dtype of the base weights.

    CPUs here have no bf16 units (bf16 runs 20-30x slower), so auto means fp32 on CPU and bf16
    autocast on a GPU that supports it; a frozen base (a tuning that does not train the base weights)
    can then also be stored in bf16.
    """
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    mode = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}.get(cfg.train.precision, "bf16" if gpu_bf16 else "no")
    if cfg.model.dtype != "auto":
        dtype = getattr(torch, cfg.model.dtype)
    elif gpu_bf16 and not TUNINGS[cfg.tuning.kind].TRAINS_BASE:
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    return mode, dtype
