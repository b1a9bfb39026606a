"""TUNESMITH_MMAP_THRESHOLD fixes glibc's mmap threshold, so freed activation-sized blocks leave the process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith import allocator

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A 16 MiB block freed after glibc raised its threshold (a 24 MiB block freed first) sits in the heap below small
# live blocks and stays resident; with the threshold fixed it is its own mapping and goes back at once.
PROBE = """
import sys
def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
if sys.argv[1] == "fix":
    from tunesmith.allocator import fix_mmap_threshold
    assert fix_mmap_threshold()
MB = 1 << 20
x = bytearray(24 * MB); del x
a = bytearray(16 * MB)
keep = [bytearray(64) for _ in range(1000)]
before = rss(); del a; after = rss()
print(round((before - after) / MB))
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def freed_mib(mode: str, **env) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": SRC, **env})
    return int(out.stdout.strip())


@glibc
def test_a_freed_block_leaves_the_process_only_with_the_threshold_fixed():
    assert freed_mib("default") == 0
    assert freed_mib("fix", TUNESMITH_MMAP_THRESHOLD=str(1 << 20)) == 16


def test_threshold_setting(monkeypatch):
    monkeypatch.delenv("TUNESMITH_MMAP_THRESHOLD", raising=False)
    assert allocator.threshold() == allocator.heap_limit() == 16 << 20  # fixed at 16 MiB unless told otherwise
    monkeypatch.setenv("TUNESMITH_MMAP_THRESHOLD", "0")  # glibc's own: nothing set, its threshold rises to 32 MiB
    assert allocator.threshold() == 0 and allocator.fix_mmap_threshold() is False
    assert allocator.heap_limit() == 32 << 20
    monkeypatch.setenv("TUNESMITH_MMAP_THRESHOLD", "4194304")
    assert allocator.threshold() == 4 << 20
    monkeypatch.setenv("TUNESMITH_MMAP_THRESHOLD", "lots")
    assert allocator.threshold() == allocator.DEFAULT_THRESHOLD
