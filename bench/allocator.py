"""Peak memory and training speed with glibc's default malloc, fixed mmap thresholds, and jemalloc.

    python bench/allocator.py [--config examples/X.yaml ...] [--steps 4] [--repeats 2] [--set key=value ...]
                              [--sides SIDE ...] [--thresholds BYTES ...]

For each config, short runs of `tunesmith train CONFIG train.max_steps=--steps` (no evaluation inside the loop, no
base scoring, forgetting probe or generation) alternate between TUNESMITH_MMAP_THRESHOLD=0 (glibc's default:
the threshold rises with every large block freed, src/tunesmith/allocator.py), a 1 MiB fixed threshold
(TUNESMITH_MMAP_THRESHOLD=1048576; the command's default is 16 MiB, run it with --thresholds 16777216), the same
with glibc's huge pages, and, when its library is installed (Debian: libjemalloc2), jemalloc preloaded
(LD_PRELOAD, glibc's threshold left alone), --repeats times each, every run in a fresh process; --sides picks
among them and --thresholds adds fixed thresholds. Printed per config: the peak RSS of each side (the child's
ru_maxrss), its training seconds (summary.json's train.train_seconds, the median over repeats), the ratios to
glibc's default, and the final training loss of each (they must match: the allocator changes where memory lives,
not the numbers).

Run it on an otherwise idle machine: the time ratio is the price of the page faults of fresh mappings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from plan_vs_measured import measured  # run as `python bench/allocator.py`: bench/ is on the path

DEFAULT_CONFIGS = ["examples/sft-alpaca-lora.yaml", "examples/sentiment-lora.yaml"]
JEMALLOC = next((str(p) for p in (Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
                                   Path("/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")) if p.exists()), None)
TCMALLOC = next((str(p) for p in (Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                                   Path("/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")) if p.exists()), None)
SIDES = {"glibc default": {"TUNESMITH_MMAP_THRESHOLD": "0"},  # the environment of each side
         "fixed 1 MiB": {"TUNESMITH_MMAP_THRESHOLD": str(1 << 20)},
         # the fixed threshold with glibc's transparent huge pages for its mappings (glibc 2.35+, THP on "madvise"
         # or "always"): one fault per 2 MiB instead of per 4 KiB page
         "fixed, huge pages": {"TUNESMITH_MMAP_THRESHOLD": str(1 << 20), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
         **({"jemalloc": {"TUNESMITH_MMAP_THRESHOLD": "0", "LD_PRELOAD": JEMALLOC},
             # freed pages kept for reuse (never purged): no page faults of fresh memory, jemalloc's size classes
             # keep fragmentation low
             "jemalloc, no decay": {"TUNESMITH_MMAP_THRESHOLD": "0", "LD_PRELOAD": JEMALLOC,
                                    "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}} if JEMALLOC else {}),
         **({"tcmalloc": {"TUNESMITH_MMAP_THRESHOLD": "0", "LD_PRELOAD": TCMALLOC}} if TCMALLOC else {})}


def short_run(steps: int) -> list[str]:
    return [f"train.max_steps={steps}", f"train.eval_every={steps}", "data.max_rows.validation=8",
            "data.max_rows.test=8", "eval.compare_base=false", "eval.forgetting.enabled=false",
            "eval.generate.prompts=0"]


def one_run(config: str, overrides: list[str], side_env: dict) -> dict:
    """Peak RSS (GiB), training seconds and last logged loss of one fresh `tunesmith train` process."""
    env = {**os.environ, **side_env}
    with tempfile.TemporaryDirectory() as tmp:
        peak = measured(config, [*overrides, f"output.dir={tmp}", "--force"], env)
        summary = json.loads(next(Path(tmp).glob("*/summary.json")).read_text())
        losses = [json.loads(line)["loss"] for line in next(Path(tmp).glob("*/metrics.jsonl")).read_text().splitlines()
                  if '"loss"' in line and '"split"' not in line]
    return {"peak_gib": peak, "train_seconds": summary["train"]["train_seconds"], "loss": losses[-1] if losses else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES),
                    help="which allocators to run (glibc's default is always run: the ratios are to it)")
    ap.add_argument("--thresholds", nargs="+", type=int, default=[],
                    help="more fixed mmap thresholds to run, in bytes (each a side of its own)")
    args = ap.parse_args(argv)
    sides = {name: env for name, env in SIDES.items() if name == "glibc default" or name in args.sides}
    sides |= {f"fixed {t / 2**20:g} MiB": {"TUNESMITH_MMAP_THRESHOLD": str(t)} for t in args.thresholds}
    table = []
    for config in args.config or DEFAULT_CONFIGS:
        overrides = short_run(args.steps) + args.overrides
        runs = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side, side_env in sides.items():
                runs[side].append(one_run(config, overrides, side_env))
        row = {"config": config}
        for side, results in runs.items():
            row[side] = {"peak_gib": round(max(r["peak_gib"] for r in results), 2),
                         "train_seconds": round(statistics.median(r["train_seconds"] for r in results), 1),
                         "loss": results[-1]["loss"]}
        old = row["glibc default"]
        row["ratios"] = {side: {"peak": round(row[side]["peak_gib"] / old["peak_gib"], 3),
                                "time": round(row[side]["train_seconds"] / old["train_seconds"], 3)}
                         for side in sides if side != "glibc default"}
        table.append(row)
    print(f"{'config':<34}{'side':<22}{'peak GiB':>10}{'train s':>10}{'last loss':>12}")
    for row in table:
        for side in sides:
            r = row[side]
            print(f"{row['config']:<34}{side:<22}{r['peak_gib']:>10.2f}{r['train_seconds']:>10.1f}{r['loss']:>12.4f}")
        for side, ratio in row["ratios"].items():
            print(f"{'':<34}{side[:14] + ' / glibc':<22}{ratio['peak']:>10.3f}{ratio['time']:>10.3f}")
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
