"""What the page shows of runs, read from their folders: the list (the rows of `tunesmith runs`), one run (its
row, config, data card and the report's sections: curves, results, findings), and two runs side by side.

The plots are report.html's own (report/html.py draws them as inline SVG), recomputed from metrics.jsonl at
each request, so a page polling a running run sees its curves grow.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import artifacts
from ..config import RUN_NAME
from ..errors import TunesmithError
from ..report import html
from ..serve.runs import describe, find


def run_dir(runs: Path, name: str) -> Path:
    """The folder of run `name` directly under `runs` (a name is one folder name, never a path)."""
    folder = runs / name
    if not RUN_NAME.fullmatch(name) or not folder.is_dir() or folder.is_symlink() or \
            not (artifacts.made_by_tunesmith(folder) or (folder / artifacts.CONFIG).is_file()):
        raise TunesmithError(f"no run named {name!r} in {runs}", hint="the run list shows the runs there")
    return folder


def _facts(row: dict) -> dict:
    """The row with what its objective says about it: `generates` (its model writes text, so the page offers a
    chat) and `verdict` (the tuned main metric is `better` or `worse` than the base's, by the metric's
    direction; None when either is missing or the metric has no direction)."""
    from ..axes import better, metric_directions
    from ..objectives import OBJECTIVES

    objective = OBJECTIVES.get(row["objective"])
    direction = metric_directions(objective).get(row["metric"]) if objective is not None else None
    verdict = None
    if direction is not None and row["base"] is not None and row["tuned"] is not None:
        verdict = "better" if better(direction, row["tuned"], row["base"]) else \
            "worse" if better(direction, row["base"], row["tuned"]) else "same"
    return {**row, "generates": getattr(objective, "HEAD", None) == "causal-lm", "verdict": verdict}


def run_list(runs: Path) -> list[dict]:
    return [_facts(row) for row in find([runs])]


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_view(runs: Path, name: str) -> dict:
    """One run: its row, config.yaml, data_card.json, and report.html's sections (HTML fragments, escaped)."""
    folder = run_dir(runs, name)
    return {"run": _facts(describe(folder)), "config": _text(folder / artifacts.CONFIG),
            "data_card": _json(folder / "data_card.json"), "sections": html.sections(folder),
            "report": (folder / html.REPORT).is_file()}


def _part(data, key: str) -> dict:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def comparison(runs: Path, a: str, b: str) -> dict:
    """Two runs' rows and held-out metrics side by side: per split and metric, base and tuned of each."""
    folders = [run_dir(runs, a), run_dir(runs, b)]
    summaries = [_json(f / artifacts.SUMMARY) or {} for f in folders]
    rows = []
    for split in ("test", "validation"):
        for metric in dict.fromkeys(k for s in summaries for k in _part(s, split)):
            values = [v for s in summaries for v in (_part(_part(s, "base"), split).get(metric),
                                                     _part(s, split).get(metric))]
            rows.append({"split": split, "metric": metric, "values": values})
    return {"runs": [describe(f) for f in folders], "metrics": rows,
            "results": [html.sections(f)["results"] for f in folders]}
