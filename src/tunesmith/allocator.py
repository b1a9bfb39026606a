"""The process's memory allocator, set when the `tunesmith` command starts: glibc's mmap threshold, fixed.

glibc's malloc serves a block under its mmap threshold from its heap, and raises that threshold to the size of
every mapped block it frees (up to 32 MiB). A training step frees and reallocates activation tensors of a few to
tens of MiB; once the threshold has risen they live in the heap, where fragmentation keeps freed memory resident
(the heap's holes). A block at or above a fixed threshold is mapped and unmapped on its own: it leaves no hole,
but each fresh mapping is paid for in page faults. Setting the threshold with mallopt also turns the raising off.

Measured on SmolLM2-135M, LoRA sft at 8 x 512 tokens with gradient checkpointing, 4 steps, the same losses
(bench/allocator.py; peak RSS, training time against glibc's default):

    glibc's default (rises to 32 MiB)   5.46 GiB   x1
    fixed 16 MiB (the default here)     3.99 GiB   x1.03
    fixed 4 MiB                         2.42 GiB   x1.33
    fixed 1 MiB                         1.9 GiB    x1.43

16 MiB maps the largest activations (SmolLM2's 1,536-wide MLP tensors, from 2,731 tokens a batch up) and leaves the
many small tensors to the heap, where reuse is free: most of the memory back for a few percent of time. Below it
memory costs time steeply, so it is a setting: TUNESMITH_MMAP_THRESHOLD in bytes (1048576 when memory is what limits
a run; 0 keeps glibc's own rising threshold). Outside glibc (musl, macOS) there is nothing to set. A library user
importing tunesmith keeps their process's allocator: only the command sets it.
"""

from __future__ import annotations

import ctypes
import os

DEFAULT_THRESHOLD = 16 * 2**20  # see the module docstring for the trade
GLIBC_MAX_THRESHOLD = 32 * 2**20  # how far glibc's own threshold rises (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def threshold() -> int:
    """TUNESMITH_MMAP_THRESHOLD in bytes (0: leave glibc's default); DEFAULT_THRESHOLD when unset or unreadable."""
    raw = os.environ.get("TUNESMITH_MMAP_THRESHOLD", "").strip()
    try:
        return max(int(raw), 0) if raw else DEFAULT_THRESHOLD
    except ValueError:
        return DEFAULT_THRESHOLD


def heap_limit() -> int:
    """The size below which a tensor comes from the heap (and may leave a hole there): the fixed threshold, or the
    most glibc's own threshold rises to."""
    return threshold() or GLIBC_MAX_THRESHOLD


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
