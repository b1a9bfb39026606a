"""Dropout that costs little on a CPU.

torch's dropout draws one random number per element (`bernoulli_`), and on a CPU that draw is single-threaded
and slow: in a LoRA classification step of MiniLM-L6 (batch 32 x 40) dropout's draws took 29% of the time,
more than all the matrix products of the adapters; in a LoRA DPO step of SmolLM2-135M, 25%.

Here a layer draws only the positions it drops. Each element's number of "hits" is Poisson(lam) when
Poisson(n lam) hits fall uniformly on n elements, independently of the others; an element is dropped when it
gets at least one, which happens with probability 1 - exp(-lam) = p for lam = -ln(1 - p). So every element is
dropped independently with probability exactly p, as torch's dropout drops it, from about n p random draws
instead of n (forward and backward 2.5-3.9x faster than torch's at p = 0.05-0.1 on the examples' shapes, by
bench/dropout.py). The survivors are scaled by
1 / (1 - p), as torch does. Backward keeps the dropped positions (8 bytes each, ~0.8 byte per element at p = 0.1;
torch keeps a 1-byte mask per element).

The draws come from torch's default generator, so a seed repeats a run exactly and gradient checkpointing's
replay of the random state redraws the same positions. On other devices (a GPU's fused dropout is fast) the
layer is torch's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _zeroed(flat: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return flat.index_put_((positions,), flat.new_zeros(()))  # the fastest of index_put_/index_fill_/scatter_ here


class _Drop(torch.autograd.Function):
    """Zero the flat positions `dropped` of x * scale; backward: the same on the gradient (no mask kept, no copy)."""

    @staticmethod
    def forward(ctx, x, dropped, scale):
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return _zeroed(x.reshape(-1) * scale, dropped).view(x.shape)  # a new tensor: x stays as it was

    @staticmethod
    def backward(ctx, grad):
        (dropped,) = ctx.saved_tensors
        return _zeroed(grad.reshape(-1) * ctx.scale, dropped).view(grad.shape), None, None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """`x` with each element zeroed with probability `p` and the others scaled by 1 / (1 - p) (training mode)."""
    if p <= 0:
        return x
    if p >= 1:
        return x * 0
    n = x.numel()
    hits = int(torch.poisson(torch.tensor(n * -math.log1p(-p), dtype=torch.float64)))
    dropped = torch.randint(0, n, (hits,), device=x.device)
    return _Drop.apply(x, dropped, 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout with `dropout` above on CPU tensors (a subclass, so code that finds dropout layers by type,
    such as trl's `disable_dropout_in_model`, still finds it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True, self.inplace)
        return dropout(x, self.p)  # never in place: backward needs only the dropped positions, not x


def disable_dropout(model: nn.Module) -> int:
    """Set p = 0 in every dropout layer of `model` (peft's adapter dropout included; as trl's
    `disable_dropout_in_model`); returns how many had p > 0."""
    turned_off = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            turned_off += 1
    return turned_off


def swap_dropout(model: nn.Module) -> int:
    """Replace every nn.Dropout layer of `model` (peft's adapter dropout included) by `Dropout`, same p; returns
    how many were replaced. Other dropout kinds (2-d, alpha) and dropout inside attention kernels stay."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                module._modules[name] = Dropout(child.p, child.inplace)
                swapped += 1
    return swapped
