"""What the benchmarks against a peer tool share (sft_vs_trl.py, dpo_vs_trl.py): each side runs in a fresh
Python, so its peak memory is its own, and answers on its last output line starting with RESULT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# tunesmith's side runs on the allocator the `tunesmith` command runs on (allocator.py): started with it preloaded
# (`env=command_env()`) when one is installed, else with glibc's threshold fixed (AS_THE_COMMAND, put first in its
# code). The peer keeps its own process's defaults unless the bench gives it the same environment.
AS_THE_COMMAND = textwrap.dedent("""
    from tunesmith.allocator import fix_mmap_threshold
    fix_mmap_threshold()
""")


def command_env() -> dict:
    from tunesmith.allocator import preload_environment

    return preload_environment(dict(os.environ)) or dict(os.environ)


def allocators(peer_too: bool) -> str:
    """Which allocator each side runs on, for the bench's header."""
    from tunesmith.allocator import for_command

    ours = for_command(dict(os.environ))
    return f"allocators: tunesmith {ours}, peer {ours if peer_too else 'its process default (glibc)'}"

# Pasted into each side's code: the final training loss both tools report, the mean of the last 10% of steps.
LAST_LOSSES = textwrap.dedent("""
    def last_losses(losses):
        tail = losses[-max(1, len(losses) // 10):]
        return sum(tail) / len(tail)
""")


def child(bench: str, name: str, code: str, *argv, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python with `argv` (and `env`, default this process's); the JSON after its last RESULT
    is the answer. Any failure stops the whole benchmark (no half table), naming the `bench` script and the side."""
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or "RESULT" not in proc.stdout:
        sys.stderr.write(proc.stderr[-4000:])
        sys.exit(f"bench/{bench}: the {name} run failed (exit {proc.returncode}); its stderr is above")
    return json.loads(proc.stdout.rsplit("RESULT", 1)[1])
