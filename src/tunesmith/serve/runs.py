"""`tunesmith runs [DIR ...] [--json]`: the run folders under DIR (default `runs/`), one row each.

A row says what the run is (objective, tuning, base model), how it ended (status: completed, running,
failed, or interrupted when it says running but no process holds it), its main metric on the base
model and on the tuned one, and how long it took. It reads only the small files of each folder
(status.json, config.yaml, summary.json), so it answers at once.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import yaml

from .. import artifacts


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else \
            yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _held(run_dir: Path) -> bool:
    """Some process holds the run's lock (it is being trained now)."""
    if not (run_dir / artifacts.LOCK).is_file():
        return False
    with open(run_dir / artifacts.LOCK, "a+", encoding="utf-8") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def _main_metric(objective: str | None, summary: dict) -> tuple[str | None, float | None, float | None]:
    """(metric, base, tuned) on the test split (else validation) by the objective's main metric."""
    from ..objectives import OBJECTIVES

    metric = getattr(OBJECTIVES.get(objective), "MAIN_METRIC", None)
    for split in ("test", "validation"):
        tuned = (summary.get(split) or {}).get(metric) if isinstance(summary.get(split), dict) else None
        if tuned is not None:
            base = ((summary.get("base") or {}).get(split) or {}).get(metric)
            return metric, base, tuned
    return metric, None, None


def describe(run_dir: Path) -> dict:
    """One run folder as a row."""
    status = _read(run_dir / artifacts.STATUS) or {}
    config = _read(run_dir / artifacts.CONFIG) or {}
    summary = _read(run_dir / artifacts.SUMMARY) or {}
    state = status.get("state") or ("completed" if summary else "unknown")
    if state == "running" and not _held(run_dir):
        state = "interrupted"
    section = lambda key: config.get(key) if isinstance(config.get(key), dict) else {}  # noqa: E731
    objective = section("objective").get("kind")
    metric, base, tuned = _main_metric(objective, summary if isinstance(summary, dict) else {})
    seconds = summary.get("wall_seconds") or (summary.get("train") or {}).get("train_seconds")
    return {"name": run_dir.name, "path": str(run_dir), "status": state, "objective": objective,
            "tuning": section("tuning").get("kind"), "regime": section("regime").get("kind"),
            "model": section("model").get("name"), "metric": metric, "base": base, "tuned": tuned,
            "seconds": seconds, "updated": status.get("time"), "error": status.get("error")}


def find(dirs: list[Path]) -> list[dict]:
    """Every run folder directly under each of `dirs`, newest first."""
    rows = []
    for parent in dirs:
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            if child.is_dir() and (artifacts.made_by_tunesmith(child) or (child / artifacts.CONFIG).is_file()):
                rows.append(describe(child))
    return sorted(rows, key=lambda r: r["updated"] or "", reverse=True)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _clock(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def table(rows: list[dict]) -> str:
    header = ["name", "status", "objective", "tuning", "metric", "base", "tuned", "time", "updated"]
    lines = [[r["name"], r["status"], r["objective"] or "-", r["tuning"] or "-", r["metric"] or "-",
              _number(r["base"]), _number(r["tuned"]), _clock(r["seconds"]), r["updated"] or "-"] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *lines])
