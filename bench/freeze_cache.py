"""Freeze tuning (head only) with and without the feature cache, on the same work.

    python bench/freeze_cache.py [--epochs 3] [--rows N] [--model sample:minilm-l6] [--data sample:rotten-tomatoes]

Same model, data, seed and settings; the only difference is `tuning.cache_features`. Each run is a whole
`tunesmith train` in its own process: base scores on validation and test, `--epochs` epochs with a
validation pass after each, tuned scores. With the cache the frozen body runs once per distinct example
(train, validation and test) and every later pass reads its output; without it the body runs every time.
Prints both runs' times (training alone, and the whole run), the ratios, and the test metrics side by
side: the cache must change the time, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def run(cache: bool, args, tmp: Path) -> dict:
    name = "cached" if cache else "uncached"
    cfg = tmp / f"{name}.yaml"
    rows = f", max_rows: {{train: {args.rows}}}" if args.rows else ""
    cfg.write_text(CONFIG.format(name=name, model=args.model, data=args.data, rows=rows, cache=str(cache).lower(),
                                 epochs=args.epochs, out=tmp / "runs"))
    tick = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg)], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - tick
    if proc.returncode != 0:
        sys.exit(f"the {name} run failed:\n{proc.stderr[-3000:] or proc.stdout[-3000:]}")
    summary = json.loads((tmp / "runs" / name / "summary.json").read_text())
    return {"process_seconds": seconds, "run_seconds": summary["wall_seconds"],
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
        plain = run(False, args, Path(tmp))
        cached = run(True, args, Path(tmp))

    print(f"\nfreeze (head only), {args.epochs:g} epochs, {args.model} on {args.data}")
    print(f"{'':<26}{'no cache':>12}{'cache':>12}{'ratio':>10}")
    for key, label in (("train_seconds", "train seconds"), ("run_seconds", "whole run seconds"),
                       ("process_seconds", "process seconds")):
        print(f"{label:<26}{plain[key]:>12.1f}{cached[key]:>12.1f}{plain[key] / max(cached[key], 1e-9):>9.2f}x")
    print(f"{'peak memory MB':<26}{plain['peak_memory_mb']:>12.0f}{cached['peak_memory_mb']:>12.0f}")
    same = True
    for split in ("validation", "test"):
        for metric, value in plain[split].items():
            other = cached[split].get(metric, float("nan"))
            same &= abs(value - other) <= 1e-4
            print(f"{split + ' ' + metric:<26}{value:>12.4f}{other:>12.4f}")
    print("metrics identical (to 1e-4): " + ("yes" if same else "NO"))


if __name__ == "__main__":
    main()
