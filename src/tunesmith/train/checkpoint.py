"""Checkpoints for `--resume`: trainable weights, optimizer, schedule, RNG and loop state.

Weights are safetensors. Optimizer and RNG state are torch files read back with
`weights_only=True` (tensors and plain containers only, no arbitrary objects). A checkpoint is
written to a temporary folder and swapped in whole, so a kill mid-write leaves the previous one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LAST, BEST = "last", "best.safetensors"


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


def save(folder: Path, model, optimizer, scheduler, loop_state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp, old, final = folder / ".last-tmp", folder / ".last-old", folder / LAST
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(loop_state, indent=1))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find(folder: Path) -> Path | None:
    """The newest complete checkpoint (also one left mid-swap by a kill)."""
    for name in (LAST, ".last-old"):
        if (folder / name / "state.json").exists():
            return folder / name
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
