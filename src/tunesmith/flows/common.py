"""What the flows share with run.py: the accelerator, and the run folder opened once every input is checked."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from .. import artifacts
from ..config import RunConfig, dump
from ..errors import TunesmithError


def one_process() -> Accelerator:
    """These flows train on one process (their schedules are sequential)."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1:
        raise TunesmithError("regimes continual (with tasks) and meta train on one process",
                             hint="run it without torchrun / accelerate launch")
    return accelerator


def open_run_dir(run_dir: Path, cfg: RunConfig, model_kwargs: dict, card: dict, resume: bool, force: bool):
    """The run folder, locked by this process and marked as running until summary.json is written (as run.py
    opens it). Returns the lock: `artifacts.release` it when the run ends, whichever way."""
    lock = artifacts.claim_run_dir(run_dir, resume=resume, force=force)
    artifacts.set_status(run_dir, "running")
    (run_dir / artifacts.CONFIG).write_text(dump(cfg), encoding="utf-8")
    artifacts.write_json(run_dir / artifacts.MANIFEST, artifacts.manifest(cfg, model_kwargs))
    artifacts.write_json(run_dir / "data_card.json", card)
    return lock


def finish(run_dir: Path, summary: dict) -> None:
    artifacts.set_status(run_dir, "completed")
    artifacts.write_json(run_dir / artifacts.SUMMARY, summary)
