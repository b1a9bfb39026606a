"""The run folder, `<output.dir>/<name>/`, and what is in it.

  config.yaml      the resolved config (every default filled in)
  manifest.json    library versions, data file hashes, seed, git commit, model head arguments
  status.json      running / failed (with the error) / completed
  data_card.json   rows, label balance, token lengths, truncation per split
  metrics.jsonl    one line per log step and per evaluation
  checkpoints/     for --resume, and the best weights for early stopping
  adapter/         peft adapter + tokenizer (parameter-efficient tunings), or
  model/           full weights (safetensors) + tokenizer
  summary.json     final metrics of the tuned model and of its base; written last

A run is finished only when summary.json exists, and it is written last, by an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from .errors import TunesmithError

SUMMARY, STATUS, CONFIG, MANIFEST = "summary.json", "status.json", "config.yaml", "manifest.json"


def write_json(path: Path, data) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def is_finished(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).exists()


def check_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to clobber an existing run unless told how (only reads; nothing is written)."""
    if not run_dir.exists() or force:
        return
    if is_finished(run_dir):
        raise TunesmithError(f"{run_dir} already holds a finished run",
                             hint="pass --force to overwrite it, or give the run another name (name=...)")
    if not resume:
        state = read_json(run_dir / STATUS).get("state", "?") if (run_dir / STATUS).exists() else "unknown"
        raise TunesmithError(f"{run_dir} holds an unfinished run (status: {state})",
                             hint="pass --resume to continue from its last checkpoint, or --force to start over")


def clear_run_dir(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)


def set_status(run_dir: Path, state: str, **extra) -> None:
    write_json(run_dir / STATUS, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})


def file_hashes(refs: list[str]) -> dict[str, str]:
    """sha256 of every data file a run read (folders: each file inside; samples: their folder)."""
    from .cache import home

    out = {}
    for ref in refs:
        path = home() / "samples" / ref[len("sample:"):] if ref.startswith("sample:") else Path(ref)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.exists():
                out[f"{ref}:{f.name}" if path.is_dir() else ref] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def manifest(cfg, model_kwargs: dict) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("tunesmith", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    sections = [cfg.data] + [task.data for task in getattr(cfg.regime, "tasks", [])]
    data_refs = list(dict.fromkeys(r for d in sections for r in (d.train, d.validation, d.test) if r))
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "seed": cfg.train.seed,
        "git_commit": commit or None,
        "data_sha256": file_hashes(data_refs),
        "model": cfg.model.name,
        "model_kwargs": model_kwargs,
    }


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def save_weights(run_dir: Path, model, tokenizer) -> str:
    """Adapter (peft format) for parameter-efficient runs, full safetensors weights otherwise."""
    from .models.load import quiet_transformers

    is_peft = hasattr(model, "peft_config")
    out = run_dir / ("adapter" if is_peft else "model")
    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return out.name
