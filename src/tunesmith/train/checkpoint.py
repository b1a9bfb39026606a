"""Checkpoints for `--resume`: trainable weights, optimizer, schedule, RNG and loop state.

Weights are safetensors. Optimizer and RNG state are torch files read back with
`weights_only=True` (tensors and plain containers only, no arbitrary objects). A checkpoint is
written to a temporary folder, each file fsynced and its sha256 recorded in `checksums.json`, then
renamed into place; the one before it is kept as `previous/`. A kill mid-write leaves the previous
one; a damaged latest one (a bad disk, a copy cut short) is noticed by its checksums on --resume,
which then continues from the one before, saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LAST, PREVIOUS, BEST, CHECKSUMS = "last", "previous", "best.safetensors", "checksums.json"
MID_SWAP = ".last-old"  # where `last` briefly is while a new one is renamed in (older runs: their only spare)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or folder to the disk, so a rename after it never points at unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: Path, model, optimizer, scheduler, loop_state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp, old, final, previous = folder / ".last-tmp", folder / MID_SWAP, folder / LAST, folder / PREVIOUS
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(loop_state, indent=1))
    sums = {}
    for f in ("trainable.safetensors", "optimizer.pt", "state.json"):
        _fsync(tmp / f)
        sums[f] = _sha256(tmp / f)
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    _fsync(tmp / CHECKSUMS)
    _fsync(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync(folder)
    if old.exists():  # the checkpoint before this one stays as the fallback
        shutil.rmtree(previous, ignore_errors=True)
        old.rename(previous)
        _fsync(folder)


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None if it is whole (its checksums match; a
    checkpoint from before checksums were recorded: its state reads and its weights header is whole)."""
    sums_file = path / CHECKSUMS
    try:
        if sums_file.exists():
            sums = json.loads(sums_file.read_text())
            for name, digest in sums.items():
                if not (path / name).is_file():
                    return f"{name} is missing"
                if _sha256(path / name) != digest:
                    return f"{name} does not match its checksum"
            return None if {"trainable.safetensors", "optimizer.pt", "state.json"} <= set(sums) else "incomplete"
        json.loads((path / "state.json").read_text())
        from ..models.load import check_safetensors

        check_safetensors(path / "trainable.safetensors")
        return None if (path / "optimizer.pt").is_file() else "optimizer.pt is missing"
    except Exception as e:  # noqa: BLE001 - any failure to read it means it is not usable
        return f"unreadable ({getattr(e, 'message', None) or type(e).__name__})"


def find(folder: Path, say=print) -> Path | None:
    """The newest whole checkpoint: `last`, else (damaged, or mid-swap after a kill) the one before it; a
    damaged one is reported through `say`. None if there is no checkpoint; an error if none is whole."""
    damaged = []
    for name in (LAST, MID_SWAP, PREVIOUS):
        path = folder / name
        if not path.is_dir():
            continue
        problem = damage(path)
        if problem is None:
            for bad, why in damaged:
                say(f"warning: checkpoint {bad} is damaged ({why}); resuming from the one before it, {path}")
            return path
        damaged.append((path, problem))
    if damaged:
        from ..errors import TunesmithError

        raise TunesmithError("no whole checkpoint to resume from: " +
                             "; ".join(f"{p.name} {why}" for p, why in damaged), where=str(folder),
                             hint="start over with --force")
    return None


def load(path: Path, model, optimizer, scheduler) -> dict:
    load_trainable(model, load_file(path / "trainable.safetensors"))
    extra = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return json.loads((path / "state.json").read_text())


def save_best(folder: Path, model) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (BEST + ".tmp")
    save_file(trainable_state(model), tmp)
    tmp.replace(folder / BEST)


def restore_best(folder: Path, model) -> bool:
    path = folder / BEST
    if not path.exists():
        return False
    load_trainable(model, load_file(path))
    return True
