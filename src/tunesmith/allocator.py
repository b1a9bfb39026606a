"""The process's memory allocator, set when the `tunesmith` command starts: jemalloc or tcmalloc when installed,
else glibc with its mmap threshold fixed.

glibc's malloc serves a block under its mmap threshold from its heap, and raises that threshold to the size of
every mapped block it frees (up to 32 MiB). A training step frees and reallocates activation tensors of a few to
tens of MiB; once the threshold has risen they live in the heap, where fragmentation keeps freed memory resident
(the heap's holes). A block at or above a fixed threshold is mapped and unmapped on its own: it leaves no hole,
but each fresh mapping is paid for in page faults. Setting the threshold with mallopt also turns the raising off.

Measured on SmolLM2-135M, LoRA sft at 8 x 512 tokens with gradient checkpointing, 4 steps, the same losses
(bench/allocator.py; peak RSS, training time against glibc's default):

    glibc's default (rises to 32 MiB)   5.46 GiB   x1
    fixed 16 MiB (glibc's default here) 3.99 GiB   x1.03
    fixed 4 MiB                         2.42 GiB   x1.33
    fixed 1 MiB                         1.9 GiB    x1.43

16 MiB maps the largest activations (SmolLM2's 1,536-wide MLP tensors, from 2,731 tokens a batch up) and leaves the
many small tensors to the heap, where reuse is free: most of the memory back for a few percent of time. Below it
memory costs time steeply, so it is a setting: TUNESMITH_MMAP_THRESHOLD in bytes (1048576 when memory is what limits
a run; 0 keeps glibc's own rising threshold). Outside glibc (musl, macOS) there is nothing to set. A library user
importing tunesmith keeps their process's allocator: only the command sets it.

Better than any threshold: an allocator with size classes. When jemalloc (Debian: libjemalloc2) or tcmalloc
(libtcmalloc-minimal4) is installed, the command runs itself again at once with it preloaded (`LD_PRELOAD`; the
variable is then restored, so no child process, a browser say, inherits it). jemalloc runs with its decay off
(`MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`): freed pages stay mapped for reuse, so no time goes to page
faults, and its size classes leave few holes. Measured the same way (another invocation):

    jemalloc, decay off (the default when installed)   2.22 GiB   x0.76
    tcmalloc                                            1.97 GiB   x0.78
    glibc, fixed 16 MiB                                 4.19 GiB   x0.94     (glibc's default 5.48 GiB, x1)

TUNESMITH_ALLOCATOR picks: `auto` (the default: jemalloc, else tcmalloc, else glibc), `jemalloc`, `tcmalloc` or
`glibc`. A MALLOC_CONF of the user's own is kept.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

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
    """The size below which a tensor comes from glibc's heap (and may leave a hole there): the fixed threshold, or
    the most glibc's own threshold rises to; 0 when this process runs on another allocator (no such holes)."""
    if active() != "glibc":
        return 0
    return threshold() or GLIBC_MAX_THRESHOLD


def fix_mmap_threshold() -> bool:
    """Set glibc's mmap threshold (see the module docstring); True when it was set."""
    value = threshold()
    if value == 0 or active() != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, min(value, 2**31 - 1)) == 1


# ------------------------------------------------------------------------------ a preloaded allocator

PRELOADS = {  # name -> (library file, environment it runs with unless the user set it)
    "jemalloc": ("libjemalloc.so.2", {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
    # gperftools reports every allocation over 1 GiB on stderr unless told not to
    "tcmalloc": ("libtcmalloc_minimal.so.4", {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}),
}
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_MARK = "TUNESMITH_PRELOADED"  # set for the re-run process only: the LD_PRELOAD it had before (restored at start)


def wanted() -> str:
    """TUNESMITH_ALLOCATOR: auto (default), jemalloc, tcmalloc or glibc; anything else reads as auto."""
    value = os.environ.get("TUNESMITH_ALLOCATOR", "auto").strip().lower()
    return value if value in ("auto", "glibc", *PRELOADS) else "auto"


def active() -> str:
    """The allocator this process runs on: a preloaded one when its library is mapped, else glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return next((name for name, (lib, _) in PRELOADS.items() if lib.split(".so")[0] + ".so" in maps), "glibc")


def describe() -> str:
    """This process's allocator in a few words, for the run's manifest."""
    name = active()
    if name != "glibc":
        conf = {k: os.environ[k] for k in PRELOADS[name][1] if k in os.environ}
        return name + "".join(f", {k}={v}" for k, v in conf.items())
    limit = threshold()
    return f"glibc, mmap threshold fixed at {limit / 2**20:g} MiB" if limit else "glibc, its own mmap threshold"


def library(name: str) -> Path | None:
    """Where `name`'s library is installed, or None."""
    lib = PRELOADS[name][0]
    return next((Path(d) / lib for d in LIBRARY_DIRS if (Path(d) / lib).exists()), None)


def chosen(environ: dict) -> str | None:
    """The allocator the command, started with `environ`, runs itself again on; None when glibc is asked for, off
    Linux, already on one, in the re-run itself, or when none is installed."""
    choice = wanted()
    if choice == "glibc" or not sys.platform.startswith("linux") or active() != "glibc" or _MARK in environ:
        return None
    return next((n for n in ((choice,) if choice != "auto" else tuple(PRELOADS)) if library(n) is not None), None)


def for_command(environ: dict) -> str:
    """The allocator a `tunesmith` command started from this process with `environ` ends up on."""
    return chosen(environ) or active()


def preload_environment(environ: dict) -> dict | None:
    """`environ` for running the command again on the `chosen` allocator, or None when there is none."""
    name = chosen(environ)
    if name is None:
        return None
    before = environ.get("LD_PRELOAD", "")
    path = library(name)
    return {**PRELOADS[name][1], **environ, _MARK: before, "LD_PRELOAD": f"{path}:{before}" if before else str(path)}


def preload() -> None:
    """Run this command again at once with a preloaded allocator (see the module docstring), when one is installed;
    in the re-run process, put LD_PRELOAD back as it was so child processes do not inherit the library."""
    if _MARK in os.environ:
        before = os.environ.pop(_MARK)
        if before:
            os.environ["LD_PRELOAD"] = before
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    env = preload_environment(dict(os.environ))
    if env is None:
        return
    # the same entry point again: `python -m tunesmith` as such, the console script as a script (never `-m` there,
    # which would put the working folder first on the path)
    script = sys.argv[0]
    argv = ["-m", "tunesmith"] if Path(script).name == "__main__.py" or not Path(script).is_file() else [script]
    sys.stdout.flush(), sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv, *sys.argv[1:]], env)
    except OSError:
        return  # cannot re-run: stay on glibc
