"""A faster forward for peft's LoRA linear layers, same values.

peft computes `result = base(x) + lora_B(lora_A(dropout(x))) * scaling`: the rank-r product is written out at the
layer's full output width, then scaled (a second full-width tensor) and added (a third). On a CPU these passes
over memory cost more than the adapter's arithmetic: in a LoRA classification step of MiniLM-L6 the B product,
the scaling and the addition took 17% of the step, against 4% for the adapter products themselves. Here the
adapter's B product is added into the base output in place by one `addmm_` (result += scaling * a @ B^T), whose
backward is the same products without the extra tensors.

The fast path covers the common case: one active adapter, not merged, plain LoRA (no DoRA or other variant, no
adapter bias) on an `nn.Linear` without hooks, no autocast, all in one dtype. Anything else (the adapter switched
off for a reference pass, a quantized base, mixed-precision autocast) runs peft's own forward unchanged.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not _fusable(self, x):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
    rows = x.reshape(-1, x.shape[-1])
    out = F.linear(rows, base.weight, base.bias)  # a new tensor, not needed by its own backward: safe to add into
    low = lora_a(self.lora_dropout[name](rows))
    out.addmm_(low, lora_b.weight.t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


def _fusable(layer, x: torch.Tensor) -> bool:
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or torch.is_autocast_enabled(x.device.type):
        return False
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if (type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base)
            or lora_b.bias is not None):  # hooks or a replaced forward (accelerate's offloading) must run
        return False
    return x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype


def fuse(model: nn.Module) -> int:
    """Give every peft LoRA linear layer of `model` the fused forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear]
    for layer in layers:
        layer.forward = MethodType(_forward, layer)
    return len(layers)
