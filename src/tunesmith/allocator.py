"""The process's memory allocator, set when the `tunesmith` command starts if TUNESMITH_MMAP_THRESHOLD asks.

glibc's malloc serves a block under its mmap threshold from its heap, and raises that threshold to the size of
every mapped block it frees (up to 32 MiB). A training step frees and reallocates activation tensors of a few to
tens of MiB; once the threshold has risen they live in the heap, where fragmentation keeps freed memory resident.
Measured on SmolLM2-135M, LoRA sft at 8 x 512 tokens with gradient checkpointing, two steps: peak RSS 4.68 GiB
with glibc's default, 1.89 GiB with a fixed 1 MiB threshold (each tensor of 1 MiB or more mapped and unmapped on
its own), the same losses. Setting the threshold with mallopt also turns the raising off. Its price is page
faults on every fresh mapping, and it is high: bench/allocator.py, 4 steps, training time x1.43 (sft-alpaca-lora)
and x1.64 (sentiment-lora). So it is off unless asked for: TUNESMITH_MMAP_THRESHOLD=1048576 (bytes) when memory
is what limits a run, 0 or unset keeps glibc's behaviour. Outside glibc (musl, macOS) there is nothing to set. A
library user importing tunesmith keeps their process's allocator: only the command sets it.
"""

from __future__ import annotations

import ctypes
import os

DEFAULT_THRESHOLD = 0  # off: see the module docstring for the trade
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def threshold() -> int:
    """TUNESMITH_MMAP_THRESHOLD in bytes (0: leave glibc's default); DEFAULT_THRESHOLD (off) when unset or unreadable."""
    raw = os.environ.get("TUNESMITH_MMAP_THRESHOLD", "").strip()
    try:
        return max(int(raw), 0) if raw else DEFAULT_THRESHOLD
    except ValueError:
        return DEFAULT_THRESHOLD


def fix_mmap_threshold() -> bool:
    """Set glibc's mmap threshold (see the module docstring); True when it was set."""
    value = threshold()
    if value == 0:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, min(value, 2**31 - 1)) == 1
