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


def test_the_command_reruns_itself_with_an_installed_allocator(monkeypatch, tmp_path):
    lib = tmp_path / allocator.PRELOADS["tcmalloc"][0]
    lib.write_bytes(b"")
    monkeypatch.setattr(allocator, "LIBRARY_DIRS", (str(tmp_path),))  # only tcmalloc "installed"
    monkeypatch.setattr(allocator, "active", lambda: "glibc")
    monkeypatch.delenv("TUNESMITH_ALLOCATOR", raising=False)
    env = allocator.preload_environment({"LD_PRELOAD": "/opt/mine.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{lib}:/opt/mine.so" and env["PATH"] == "/bin"
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)  # no stderr line per large tensor
    assert env[allocator._MARK] == "/opt/mine.so"  # what the re-run process puts back
    monkeypatch.setenv("TUNESMITH_ALLOCATOR", "jemalloc")  # asked for one that is missing: glibc it is
    assert allocator.preload_environment({}) is None
    monkeypatch.setenv("TUNESMITH_ALLOCATOR", "glibc")
    assert allocator.preload_environment({}) is None
    (tmp_path / allocator.PRELOADS["jemalloc"][0]).write_bytes(b"")
    monkeypatch.setenv("TUNESMITH_ALLOCATOR", "auto")
    env = allocator.preload_environment({"MALLOC_CONF": "narenas:1"})  # jemalloc first; the user's conf is kept
    assert env["LD_PRELOAD"].endswith("libjemalloc.so.2") and env["MALLOC_CONF"] == "narenas:1"
    assert allocator.for_command({}) == "jemalloc"
    assert allocator.preload_environment({allocator._MARK: ""}) is None  # the re-run itself: never again
    monkeypatch.setattr(allocator, "active", lambda: "jemalloc")
    assert allocator.preload_environment({}) is None and allocator.heap_limit() == 0  # no glibc heap holes
    assert allocator.for_command({}) == "jemalloc"  # already on it: children started from here stay on it


def test_the_rerun_process_puts_ld_preload_back(monkeypatch):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("ran again"))
    monkeypatch.setenv(allocator._MARK, "/opt/mine.so")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2:/opt/mine.so")
    allocator.preload()
    assert os.environ["LD_PRELOAD"] == "/opt/mine.so" and allocator._MARK not in os.environ
    monkeypatch.setenv(allocator._MARK, "")
    allocator.preload()
    assert "LD_PRELOAD" not in os.environ  # children (a browser, a server) never inherit the library


@pytest.mark.skipif(not any(allocator.library(n) for n in allocator.PRELOADS), reason="no jemalloc or tcmalloc")
def test_the_command_runs_on_the_installed_allocator():
    first = next(n for n in allocator.PRELOADS if allocator.library(n))
    env = {k: v for k, v in os.environ.items() if k not in ("TUNESMITH_ALLOCATOR", "LD_PRELOAD")}
    env["PYTHONPATH"] = SRC
    plan = subprocess.run([sys.executable, "-m", "tunesmith", "plan", str(Path(SRC).parent / "examples" /
                           "sentiment-lora.yaml")], capture_output=True, text=True, env=env)
    assert plan.returncode == 0, plan.stderr
    assert f"allocator {first})" in plan.stdout
