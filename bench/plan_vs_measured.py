"""`tunesmith plan`'s peak-memory estimate next to the measured peak RSS of short real runs.

    python bench/plan_vs_measured.py [--steps 4] [--eval-rows 8] [--config examples/X.yaml ...] [--set key=value ...]

For each config (default: the classify, sft, dpo and clm examples), one fresh process runs
`tunesmith train CONFIG` with train.max_steps=--steps, at most --eval-rows validation and test rows, evaluation
and generation as configured (generation prompts capped at --eval-rows), into a temporary output folder; its
peak RSS is getrusage(RUSAGE_CHILDREN).ru_maxrss of that child alone (each run is its own child of a fresh
measuring process). The plan is `tunesmith.plan.plan` of the same config and overrides. The table prints
planned and measured GiB, their ratio, and PASS when the plan is within -10%..+30% of the measured peak.

Each run takes minutes on the real models: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

DEFAULT_CONFIGS = ["examples/sentiment-lora.yaml", "examples/sft-alpaca-lora.yaml", "examples/dpo-lora.yaml",
                   "examples/clm-shakespeare.yaml"]
LOW, HIGH = 0.9, 1.3  # plan / measured


def short_run(steps: int, eval_rows: int, out: str) -> list[str]:
    return [f"train.max_steps={steps}", f"data.max_rows.validation={eval_rows}", f"data.max_rows.test={eval_rows}",
            f"eval.generate.prompts={eval_rows}", f"output.dir={out}"]


def measured(config: str, overrides: list[str], env: dict | None = None) -> float:
    """Peak RSS in GiB of `tunesmith train` in a child of a fresh process (so the children's maxrss is its own)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "tunesmith", "train", config, *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "-1"
    if int(last) < 0:
        raise SystemExit(f"{config}: the run failed:\n{out.stderr[-2000:]}")
    return int(last) / 2**20  # KiB on Linux


def planned(config: str, overrides: list[str]) -> float:
    """The plan for the allocator the measured `tunesmith train` runs on (it may preload one this process lacks)."""
    from tunesmith import allocator
    from tunesmith.config import load_config
    from tunesmith.plan import plan

    name = allocator.for_command(dict(os.environ))
    allocator.active = lambda: name  # plan.py asks which allocator it plans for
    return sum(plan(load_config(config, overrides))["memory"].values()) / 2**30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--eval-rows", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args(argv)
    rows, ok = [], True
    for config in args.config or DEFAULT_CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            overrides = short_run(args.steps, args.eval_rows, tmp) + args.overrides
            plan_gib, peak_gib = planned(config, overrides), measured(config, overrides)
        ratio = plan_gib / peak_gib
        verdict = "PASS" if LOW <= ratio <= HIGH else "FAIL"
        ok &= verdict == "PASS"
        rows.append({"config": config, "planned_gib": round(plan_gib, 2), "measured_gib": round(peak_gib, 2),
                     "ratio": round(ratio, 3), "verdict": verdict})
    print(f"{'config':<40}{'planned GiB':>12}{'measured GiB':>14}{'ratio':>8}  verdict")
    for r in rows:
        print(f"{r['config']:<40}{r['planned_gib']:>12.2f}{r['measured_gib']:>14.2f}{r['ratio']:>8.3f}  {r['verdict']}")
    print(json.dumps(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
