"""Freeze tuning (head only) with and without the feature cache, on the same work.

    python bench/freeze_cache.py [--epochs 3] [--rows N] [--model sample:minilm-l6] [--data sample:rotten-tomatoes]

Same model, data, seed and settings; the only difference is `tuning.cache_features`. Each run is a whole
`tunesmith train` in its own process: base scores on validation and test, `--epochs` epochs with a
validation pass after each, tuned scores. Three runs:

- no cache (`cache_features: false`): the frozen body runs in every pass;
- cache (`true`, in memory): the body runs once per distinct example (train, validation and test) and every
  later pass reads its output; the first epoch still pays for the body once;
- cache from disk (`disk`, a second run after a first one that wrote the file, as a sweep's later trial or a
  rerun at another lr would be): no example runs the body at all.

Prints the runs' times (training alone, and the whole run), the ratios to the uncached run, and the metrics
side by side: the cache must change the time, not the numbers. Then the frozen part's passes over examples with
and without the cache (from the cached run's log): their ratio bounds what the in-memory cache can gain in one run. The disk runs use a temporary
TUNESMITH_HOME/feature-cache (samples are still read from the real one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunesmith.cache import home

CONFIG = """\
name: {name}
model: {model}
data: {{train: {data}, max_length: 64{rows}}}
tuning: {{kind: freeze, cache_features: {cache}}}
objective: {{kind: classify}}
train: {{epochs: {epochs}, batch_size: 32, lr: 3.0e-3, eval_every: epoch, early_stopping: {{enabled: false}}, seed: 0}}
eval: {{forgetting: {{enabled: false}}}}
output: {{dir: {out}}}
"""


def run(name: str, cache: str, args, tmp: Path) -> dict:
    cfg = tmp / f"{name}.yaml"
    rows = f", max_rows: {{train: {args.rows}}}" if args.rows else ""
    cfg.write_text(CONFIG.format(name=name, model=args.model, data=args.data, rows=rows, cache=cache,
                                 epochs=args.epochs, out=tmp / "runs"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if cache == "disk":  # a fresh cache folder: the first disk run computes, the second reads
        env["TUNESMITH_HOME"] = str(tmp / "home")
        (tmp / "home").mkdir(exist_ok=True)
        real = home()  # the pulled samples are read from where they already are
        for sub in ("samples", "downloads"):
            if (real / sub).exists() and not (tmp / "home" / sub).exists():
                (tmp / "home" / sub).symlink_to(real / sub)
    tick = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg)], capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - tick
    if proc.returncode != 0:
        sys.exit(f"the {name} run failed:\n{proc.stderr[-3000:] or proc.stdout[-3000:]}")
    summary = json.loads((tmp / "runs" / name / "summary.json").read_text())
    passes = re.search(r"frozen part ran on ([\d,]+) examples and ([\d,]+) passes", proc.stdout + proc.stderr)
    return {"passes": tuple(int(n.replace(",", "")) for n in passes.groups()) if passes else None,
            "process_seconds": seconds, "run_seconds": summary["wall_seconds"],
            "train_seconds": summary["train"]["train_seconds"], "test": summary["test"],
            "validation": summary.get("validation", {}), "peak_memory_mb": summary["peak_memory_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--rows", type=int, default=None, help="train rows (default: the whole train split)")
    parser.add_argument("--model", default="sample:minilm-l6")
    parser.add_argument("--data", default="sample:rotten-tomatoes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"no cache": run("uncached", "false", args, Path(tmp)),
                "cache": run("cached", "true", args, Path(tmp))}
        run("disk-first", "disk", args, Path(tmp))  # writes the file
        runs["cache from disk"] = run("disk-second", "disk", args, Path(tmp))

    plain = runs["no cache"]
    print(f"\nfreeze (head only), {args.epochs:g} epochs, {args.model} on {args.data}")
    print(f"{'':<22}" + "".join(f"{name:>17}" for name in runs) + "".join(f"{'x ' + n:>20}" for n in list(runs)[1:]))
    for key, label in (("train_seconds", "train seconds"), ("run_seconds", "whole run seconds"),
                       ("process_seconds", "process seconds")):
        ratios = [plain[key] / max(r[key], 1e-9) for r in list(runs.values())[1:]]
        print(f"{label:<22}" + "".join(f"{r[key]:>17.1f}" for r in runs.values())
              + "".join(f"{x:>19.2f}x" for x in ratios))
    print(f"{'peak memory MB':<22}" + "".join(f"{r['peak_memory_mb']:>17.0f}" for r in runs.values()))
    same = True
    for split in ("validation", "test"):
        for metric, value in plain[split].items():
            others = [r[split].get(metric, float("nan")) for r in list(runs.values())[1:]]
            same &= all(abs(value - o) <= 1e-4 for o in others)
            print(f"{split + ' ' + metric:<22}{value:>17.4f}" + "".join(f"{o:>17.4f}" for o in others))
    print("metrics identical (to 1e-4): " + ("yes" if same else "NO"))
    if runs["cache"]["passes"]:
        ran, read = runs["cache"]["passes"]
        print(f"\nthe frozen part's passes over examples, whole run: {ran + read:,} without the cache, {ran:,} with it "
              f"in memory (every example once), 0 from disk. Even if the frozen part were all of a run's time, "
              f"the in-memory cache could not be more than x{(ran + read) / ran:.2f} faster over the whole run.")


if __name__ == "__main__":
    main()
