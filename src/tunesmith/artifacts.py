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
  .tunesmith-run   marker: tunesmith made this folder (only such a folder is replaced by --force)

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
MARKER = ".tunesmith-run"
"""Written into every run folder tunesmith creates; --force deletes only folders that carry it."""
LOCK = ".lock"
"""Held (flock) by the process writing the run, so two runs of one name never share a folder."""


def write_json(path: Path, data) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def is_finished(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).exists()


def made_by_tunesmith(run_dir: Path) -> bool:
    """The folder carries the marker tunesmith writes into every run folder it creates."""
    return (run_dir / MARKER).is_file() and not run_dir.is_symlink()


def _is_empty(run_dir: Path) -> bool:
    return not any(p.name != LOCK for p in run_dir.iterdir())


def check_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to clobber an existing run unless told how (only reads; nothing is written).

    `--force` replaces only a folder tunesmith made (it holds the marker file): never a folder of the user's
    that happens to have the run's name."""
    if not run_dir.exists() or (run_dir.is_dir() and not run_dir.is_symlink() and _is_empty(run_dir)):
        return
    if not made_by_tunesmith(run_dir):
        raise TunesmithError(f"{run_dir} exists and is not a run folder made by tunesmith (it has no {MARKER} marker); "
                             "tunesmith neither writes into it nor deletes it, --force included",
                             hint="give the run another name (name=...) or another output.dir, or move that folder")
    if force:
        return
    if is_finished(run_dir):
        raise TunesmithError(f"{run_dir} already holds a finished run",
                             hint="pass --force to overwrite it, or give the run another name (name=...)")
    if not resume:
        state = read_json(run_dir / STATUS).get("state", "?") if (run_dir / STATUS).exists() else "unknown"
        raise TunesmithError(f"{run_dir} holds an unfinished run (status: {state})",
                             hint="pass --resume to continue from its last checkpoint, or --force to start over")


def clear_run_dir(run_dir: Path) -> None:
    """Empty a run folder tunesmith made (for --force); anything else is refused, whatever the caller checked."""
    if not run_dir.exists():
        return
    if not made_by_tunesmith(run_dir):
        raise TunesmithError(f"refusing to delete {run_dir}: it is not a run folder made by tunesmith (no {MARKER})")
    for child in run_dir.iterdir():
        if child.name == LOCK:
            continue  # held by this process while it replaces the run
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def mark_run_dir(run_dir: Path) -> None:
    """Create the run folder with its marker: the proof that --force may later replace it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("a tunesmith run folder: `tunesmith train --force` may replace it\n", encoding="utf-8")


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
    data_refs = [r for r in (cfg.data.train, cfg.data.validation, cfg.data.test) if r]
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
