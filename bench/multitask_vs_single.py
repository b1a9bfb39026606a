"""One multi-task model against one model per task, with the same optimizer steps per task.

    python bench/multitask_vs_single.py                                  # examples/multitask-minilm.yaml
    python bench/multitask_vs_single.py examples/multitask-minilm.yaml train.epochs=1   # overrides as for train

1. Trains the multitask config (or reuses its finished run folder).
2. Counts how many optimizer steps went to each task: the steps the run took, replayed through the same
   seeded task schedule it trained with (regimes/multitask.py).
3. Trains one single-task run per task: the same model, tuning, train section and seed, the task's own data
   section, `train.max_steps` = that task's step count (early stopping as configured).
4. Prints per-task test accuracy side by side, with the artifacts' size on disk (one folder vs one per task),
   and writes the table to <output.dir>/<name>-vs-single.json.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith import artifacts  # noqa: E402
from tunesmith.config import load_config  # noqa: E402
from tunesmith.distilling import folder_mb  # noqa: E402
from tunesmith.models.load import load_tokenizer  # noqa: E402
from tunesmith.regimes import multitask  # noqa: E402
from tunesmith.run import train  # noqa: E402
from tunesmith.data.batches import train_batches  # noqa: E402


def steps_per_task(cfg, steps: int) -> dict[str, int]:
    """Optimizer steps each task got in the first `steps` steps of the run's schedule."""
    prepared, _ = multitask.prepare(cfg, load_tokenizer(cfg.model))
    examples = prepared.examples["train"]
    make = multitask.batches(cfg.regime, examples, cfg.train, train_batches)
    taken: Counter = Counter()
    epoch, done = 0, 0
    while done < steps:
        batches = make(epoch)
        windows = [batches[i:i + cfg.train.grad_accum] for i in range(0, len(batches), cfg.train.grad_accum)]
        for window in windows[:steps - done]:
            for b in window:
                taken[examples[b[0]]["task"]] += 1
        done += min(len(windows), steps - done)
        epoch += 1
    return {task.name: math.ceil(taken[k] / cfg.train.grad_accum) for k, task in enumerate(cfg.regime.tasks)}


def size_mb(run_dir: Path, summary: dict) -> float:
    """The run's weights folder (an adapter's base model is shared by all runs and not counted)."""
    return folder_mb(run_dir / summary["weights"])


def main(argv: list[str]) -> None:
    path = argv[0] if argv and "=" not in argv[0] else "examples/multitask-minilm.yaml"
    overrides = [a for a in argv if "=" in a]
    cfg = load_config(path, overrides)
    run_dir = Path(cfg.output.dir) / cfg.name
    summary = artifacts.read_json(run_dir / artifacts.SUMMARY) if artifacts.is_finished(run_dir) else train(cfg)
    steps = steps_per_task(cfg, summary["train"]["steps"])
    print(f"steps per task in the multitask run ({summary['train']['steps']} in all): {steps}")
    rows = []
    for task in cfg.regime.tasks:
        if steps[task.name] == 0:  # a very short run may never draw a task
            rows.append({"task": task.name, "steps": 0, "multitask": summary["tasks"][task.name]["test"]["accuracy"],
                         "single": float("nan"), "single_steps_taken": 0, "single_mb": 0.0})
            continue
        name = f"{cfg.name}-single-{task.name}"
        single = cfg.model_copy(update={
            "name": name, "data": task.data, "objective": task.objective,
            "regime": {"kind": "single"}, "train": cfg.train.model_copy(update={"max_steps": steps[task.name]})})
        single = type(cfg).model_validate(single.model_dump())
        single_dir = Path(cfg.output.dir) / name
        alone = artifacts.read_json(single_dir / artifacts.SUMMARY) if artifacts.is_finished(single_dir) \
            else train(single)
        rows.append({"task": task.name, "steps": steps[task.name],
                     "multitask": summary["tasks"][task.name]["test"]["accuracy"],
                     "single": alone["test"]["accuracy"], "single_steps_taken": alone["train"]["steps"],
                     "single_mb": size_mb(single_dir, alone)})
    shared_mb = size_mb(run_dir, summary)
    print(f"\n{'task':<14}{'steps':>8}{'multitask':>11}{'single':>9}")
    for r in rows:
        print(f"{r['task']:<14}{r['steps']:>8}{r['multitask']:>11.4f}{r['single']:>9.4f}")
    mean_multi = sum(r["multitask"] for r in rows) / len(rows)
    mean_single = sum(r["single"] for r in rows) / len(rows)
    print(f"{'mean':<14}{'':>8}{mean_multi:>11.4f}{mean_single:>9.4f}")
    print(f"weights on disk: one multitask artifact {shared_mb:.2f} MB vs {len(rows)} single-task artifacts "
          f"{sum(r['single_mb'] for r in rows):.2f} MB (the base model, shared by adapters, not counted)")
    out = Path(cfg.output.dir) / f"{cfg.name}-vs-single.json"
    out.write_text(json.dumps({"config": path, "overrides": overrides, "tasks": rows, "multitask_mb": shared_mb,
                               "multitask_steps": summary["train"]["steps"]}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
