"""What the flows share with run.py: the accelerator, and the run folder opened once every input is checked."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from .. import artifacts
from ..config import RunConfig, dump
from ..errors import TunesmithError
from ..report import html, trackers


def one_process(cfg: RunConfig, run_dir: Path) -> Accelerator:
    """These flows train on one process (their schedules are sequential); it carries the run's trackers."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              **trackers.accelerator_kwargs(cfg.train.report_to, run_dir))
    if accelerator.num_processes > 1:
        raise TunesmithError("regimes continual (with tasks) and meta train on one process",
                             hint="run it without torchrun / accelerate launch")
    return accelerator


def open_run_dir(run_dir: Path, cfg: RunConfig, model_kwargs: dict, card: dict, resume: bool, force: bool,
                 accelerator=None):
    """The run folder, locked by this process and marked as running until summary.json is written (as run.py
    opens it), and the accelerator's trackers started. Returns the lock: `artifacts.release` it when the run
    ends, whichever way."""
    lock = artifacts.claim_run_dir(run_dir, resume=resume, force=force)
    artifacts.set_status(run_dir, "running")
    (run_dir / artifacts.CONFIG).write_text(dump(cfg), encoding="utf-8")
    artifacts.write_json(run_dir / artifacts.MANIFEST, artifacts.manifest(cfg, model_kwargs))
    artifacts.write_json(run_dir / "data_card.json", card)
    if accelerator is not None:
        trackers.start(accelerator, cfg, run_dir)
    return lock


def finish(run_dir: Path, summary: dict, accelerator=None) -> None:
    """The run marked completed, summary.json, the report page; the final scores to the trackers."""
    artifacts.set_status(run_dir, "completed")
    artifacts.write_json(run_dir / artifacts.SUMMARY, summary)
    html.write_after_run(run_dir)
    if accelerator is not None:
        trackers.finish(accelerator, summary)
