"""The output projection through a oneDNN-packed copy of its weight, while decoding on a CPU.

A decoding step multiplies a few rows (one per running prompt) by the output projection, a [vocab x hidden]
matrix and the largest in a small model (SmolLM2-135M: 49,152 x 576, a fifth of its weights). For 3 to 8 rows
torch's fp32 matmul (MKL) runs that shape far below the machine's memory bandwidth: on 2 CPU cores, 10.4 ms for
8 rows against 3.0 ms for one. oneDNN, given the weight reordered once into its own blocked layout, takes 4.6 ms
for the same 8 rows; a whole decoding step of 8 rows went from 74.6 to 66.3 ms. Packing the blocks' smaller
matrices too gained nothing (75.6 ms), so only the output projection is packed (bench/generation.py and
docs/performance.md, Generation).

The copy lives only while `packed_output` is open and costs one more output matrix (113 MB for SmolLM2-135M's
49,152 x 576 in fp32). Logits equal torch's to float rounding (another order of summation), as
another batch size would give (checked on two random rows when the copy is made). Where the packed kernel is not
available or does not agree (a torch built without oneDNN, a weight that is not fp32 on the CPU, a head that is
not a plain `nn.Linear`, such as a LoRA-adapted one, a copy larger than a quarter of the available memory) the
head runs as it is.
"""

from __future__ import annotations

import threading
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_LOCK = threading.Lock()
"""Decodings may overlap on one model (the server's worker threads): they share one packed copy, made by the first
and dropped by the last."""


def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight, self.bias, "none", [], "")


def _available_bytes() -> int | None:
    """Memory the system can still hand out (Linux's MemAvailable), or None where it cannot be read cheaply."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _packable(head) -> bool:
    """A plain fp32 linear on the CPU, no gradient wanted, and its copy fits easily: a quarter of the available
    memory at most (a large vocabulary's copy is a GiB; a speed-up must not be what runs a laptop out of memory)."""
    if not (type(head) is nn.Linear and head.weight.device.type == "cpu" and head.weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and not torch.is_grad_enabled()):
        return False
    available = _available_bytes()
    return available is None or head.weight.numel() * 4 <= available // 4


def _enter(head, rows: int) -> bool:
    """Count one more user of the packed path, packing the weight for the first; False if it cannot be packed."""
    with _LOCK:
        if "_packed_users" in head.__dict__:
            head._packed_users += 1
            return True
        if "forward" in head.__dict__:  # someone else's forward on this instance: left as it is
            return False
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(head.weight.detach(), max(1, rows))
            # checked once on two random rows: a build or platform whose kernel fails or differs keeps the matmul
            x = torch.randn(2, head.in_features, generator=torch.Generator().manual_seed(0))  # not the run's RNG
            plain = F.linear(x, head.weight, head.bias)
            ok = torch.allclose(torch.ops.mkldnn._linear_pointwise(x, packed, head.bias, "none", [], ""), plain,
                                rtol=1e-3, atol=1e-3 * float(plain.abs().max()))
        except (AttributeError, RuntimeError, NotImplementedError):  # an op this torch build lacks
            return False
        if not ok:
            return False
        head._packed_weight, head._packed_users = packed, 1
        head.forward = types.MethodType(_packed_forward, head)
        return True


def _exit(head) -> None:
    with _LOCK:
        head._packed_users -= 1
        if not head._packed_users:
            del head.forward, head._packed_weight, head._packed_users


@contextmanager
def packed_output(model: nn.Module, rows: int):
    """Within the block, `model`'s output projection multiplies through a packed copy of its weight (laid out for
    about `rows` rows at a time); outside it, as before. Inference only: the packed path has no gradient, so it
    is not taken while gradients are enabled. The copy is made when the block is entered: weights changed inside
    it (none are, while decoding) would not be seen."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None or not _packable(head) or not _enter(head, rows):
        yield
        return
    try:
        yield
    finally:
        _exit(head)
