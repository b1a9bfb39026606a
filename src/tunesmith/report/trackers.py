"""Experiment trackers (`train.report_to`) through accelerate's trackers: the config at the start, every
metrics.jsonl line as it is written (training lines as `train/<key>`, evaluations as `<split>/<key>`, at the
line's step), and the summary's final scores at the end.

Stores are local unless the environment says otherwise: TensorBoard event files under `<run>/trackers/`,
an MLflow file store at `<run>/mlruns` (unless MLFLOW_TRACKING_URI is set), W&B in offline mode under the
run folder (unless WANDB_MODE is set).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

# tracker -> (modules that provide it (any one), what to pip install)
PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow-skinny"),
    "wandb": (("wandb",), "wandb"),
}


def missing(names: list[str]) -> str | None:
    """Why the trackers cannot run here (a package is not installed, naming the pip command), or None."""
    absent = [n for n in dict.fromkeys(names) if not any(importlib.util.find_spec(m) for m in PACKAGES[n][0])]
    if not absent:
        return None
    pips = " ".join(PACKAGES[n][1] for n in absent)
    return (f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed: "
            f"pip install {pips} (or pip install 'tunesmith[trackers]'), or remove it from train.report_to")


def accelerator_kwargs(report_to: list[str], run_dir: Path) -> dict:
    """What `Accelerator(...)` needs to log to these trackers (nothing when there are none)."""
    if not report_to:
        return {}
    return {"log_with": list(dict.fromkeys(report_to)), "project_dir": str(run_dir / "trackers")}


def start(accelerator, cfg, run_dir: Path) -> None:
    """Open the trackers (main process only, as accelerate does) with the resolved config as parameters."""
    names = cfg.train.report_to
    if not names:
        return
    init: dict = {}
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        # a file store inside the run folder: nothing to set up, travels with the run (MLflow 3 wants an opt-in)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        init["mlflow"] = {"run_name": cfg.name}
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")  # never reach the network unless the user asks to
        init["wandb"] = {"dir": str(run_dir), "name": cfg.name}
    accelerator.init_trackers(cfg.name, config=_flat(json.loads(cfg.model_dump_json())), init_kwargs=init)


def log(accelerator, record: dict) -> None:
    """One metrics.jsonl line to the trackers: its numbers, named by the split they belong to."""
    if not getattr(accelerator, "trackers", None):
        return
    split = record.get("split", "train")
    values = {f"{split}/{k}": v for k, v in record.items()
              if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    accelerator.log(values, step=record["step"])


def finish(accelerator, summary: dict | None) -> None:
    """The summary's held-out scores (tuned, base) at the last step, then close the trackers."""
    if not getattr(accelerator, "trackers", None):
        return
    if summary:
        values = {}
        for split in ("validation", "test"):
            for k, v in (summary.get(split) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values[f"final/{split}/{k}"] = v
            for k, v in ((summary.get("base") or {}).get(split) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values[f"final/base/{split}/{k}"] = v
        if values:
            accelerator.log(values, step=(summary.get("train") or {}).get("steps"))
    accelerator.end_training()


def _flat(data, prefix: str = "") -> dict:
    """Nested config -> {"train.lr": 0.001, ...}; lists and None as text (trackers take scalars)."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    value = data if isinstance(data, (int, float, str, bool)) else json.dumps(data)
    return {prefix[:-1]: value}
