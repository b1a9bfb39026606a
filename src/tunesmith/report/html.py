"""report.html: one self-contained page (inline CSS and SVG, no script, nothing fetched) that shows a run.

Read from the run folder only: summary.json, config.yaml, metrics.jsonl, data_card.json, manifest.json and
compare.json / generations.json. Written at the end of every run and by `tunesmith report RUN`:

  results     tuned vs base (and the trivial baselines) per held-out split
  training    loss (train and validation), validation metrics, learning rate, the train/validation gap
  data        token-length histograms per split, label balance
  confusion   the classifier's test (and validation) confusion matrix
  findings    data checks (leakage, duplicates, truncation, ...), forgetting, the diagnosis and its advice
  samples     base and tuned answers to the first test prompts of a generative run
  summary     the whole summary.json, for what the sections above do not show

Every text that comes from data or config is escaped: a dataset cannot inject markup into the page.
"""

from __future__ import annotations

import json
import os
import sys
from html import escape
from pathlib import Path

from .. import artifacts
from ..errors import TunesmithError
from . import svg

REPORT = "report.html"
SAMPLES = 8
"""Generation samples shown (the rest stay in compare.md / compare.json)."""

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:12px}svg.plot{border:1px solid #eee;background:#fff;font-size:11px}
svg .frame{fill:none;stroke:#999}svg .grid{stroke:#eee}svg .title{font-weight:bold;font-size:13px}
.warn{color:#a40}.muted{color:#777}pre{background:#f7f7f7;padding:.6em;overflow:auto;white-space:pre-wrap;
max-height:40em}.sample{border:1px solid #ddd;margin:.6em 0;padding:.4em .8em}.sample pre{max-height:12em}
"""


def write(run_dir: Path) -> Path:
    """Build the page from the run folder and write it atomically; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TunesmithError(f"{run_dir} is not a folder", hint="give a run folder, e.g. runs/<name>")
    if not (artifacts.made_by_tunesmith(run_dir) or (run_dir / artifacts.SUMMARY).exists()):
        raise TunesmithError(f"{run_dir} is not a run folder made by tunesmith (no {artifacts.MARKER} and no "
                             f"{artifacts.SUMMARY})", hint="give a run folder, e.g. runs/<name>")
    page = render(run_dir)
    path = run_dir / REPORT
    tmp = path.with_name(REPORT + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_after_run(run_dir: Path) -> None:
    """At the end of a run: the report is a view of what is saved, so a failure to draw it never fails the run."""
    try:
        write(run_dir)
    except Exception as e:  # noqa: BLE001 - the run itself is complete and saved
        print(f"warning: {REPORT} not written ({type(e).__name__}: {e}); "
              f"make it later with `tunesmith report {run_dir}`", file=sys.stderr)


def sections(run_dir: Path) -> dict[str, str]:
    """The report's sections as HTML fragments, by name (empty where the run has nothing to show); the web UI
    (tunesmith ui) shows the same fragments while a run trains."""
    summary = _json(run_dir / artifacts.SUMMARY) or {}
    cfg = _yaml(run_dir / artifacts.CONFIG) or {}
    status = _json(run_dir / artifacts.STATUS) or {}
    card = _json(run_dir / "data_card.json") or {}
    manifest = _json(run_dir / artifacts.MANIFEST) or {}
    return {"about": _about(cfg, summary, status), "stages": _stages(summary), "results": _results(summary),
            "training": _training(read_metrics(run_dir / "metrics.jsonl")), "data": _data(card),
            "confusion": _confusion(summary, manifest), "findings": _findings(summary),
            "samples": _samples(run_dir), "summary": _raw(summary)}


def render(run_dir: Path) -> str:
    summary = _json(run_dir / artifacts.SUMMARY) or {}
    cfg = _yaml(run_dir / artifacts.CONFIG) or {}
    name = summary.get("name") or cfg.get("name") or run_dir.name
    body = "\n".join(p for p in [f"<h1>{escape(str(name))}</h1>", *sections(run_dir).values()] if p)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'; '
            f'img-src data:">'
            f"<title>{escape(str(name))}: tunesmith run report</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f'<p class="muted">made by tunesmith from the run folder {escape(run_dir.name)}</p></body></html>\n')


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's lines (a damaged or partly written line is skipped: the report shows what is readable)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            out.append(record)
    return out


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _yaml(path: Path):
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return escape(str(v))


def _table(head: list[str], rows: list[list], numeric_from: int = 1) -> str:
    out = ["<table><tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="num">{_fmt(v)}</td>' if i >= numeric_from and
                                    isinstance(v, (int, float)) else f"<td>{_fmt(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def _kind(section) -> str:
    return str(section.get("kind", "")) if isinstance(section, dict) else ""


def _about(cfg: dict, summary: dict, status: dict) -> str:
    train = summary.get("train") if isinstance(summary.get("train"), dict) else {}
    params = summary.get("params") if isinstance(summary.get("params"), dict) else {}
    rows = [["status", status.get("state", "completed" if summary else "unknown")],
            ["model", (cfg.get("model") or {}).get("name", "") if isinstance(cfg.get("model"), dict) else
             cfg.get("model", "")],
            ["tuning", _kind(cfg.get("tuning"))], ["objective", _kind(cfg.get("objective"))],
            ["regime", _kind(cfg.get("regime"))]]
    for key in ("steps", "epochs", "stopped_early", "best_step", "train_seconds", "examples_per_s"):
        if key in train:
            rows.append([key.replace("_", " "), train[key]])
    for key, v in params.items():
        rows.append([f"params {key}", v])
    if "wall_seconds" in summary:
        rows.append(["wall seconds", summary["wall_seconds"]])
    if status.get("error"):
        rows.append(["error", status["error"]])
    return _table(["", ""], [r for r in rows if r[1] not in ("", None)])


def _stages(summary: dict) -> str:
    """A staged run's table, each stage linking to its own report (a relative link inside the run folder)."""
    stages = summary.get("stages")
    if not isinstance(stages, list):
        return ""
    out = ["<h2>Stages</h2><table><tr><th>stage</th><th>objective</th><th>tuned</th><th>base</th><th>report</th></tr>"]
    for s in stages:
        if not isinstance(s, dict):
            continue
        tuned = ", ".join(f"{k} {_fmt(v)}" for k, v in (s.get("tuned") or {}).items())
        base = ", ".join(f"{k} {_fmt(v)}" for k, v in (s.get("base") or {}).items())
        link = f'<a href="{escape(str(s.get("run", "")))}/{REPORT}">report</a>' if s.get("run") else ""
        out.append(f"<tr><td>{_fmt(s.get('stage', ''))}</td><td>{_fmt(s.get('objective', ''))}</td>"
                   f"<td>{tuned}</td><td>{base}</td><td>{link}</td></tr>")
    return "".join(out) + "</table>"


def _results(summary: dict) -> str:
    """Per held-out split: one row per metric; columns baselines, base, tuned."""
    base = summary.get("base") if isinstance(summary.get("base"), dict) else {}
    baselines = summary.get("baselines") if isinstance(summary.get("baselines"), dict) else {}
    out = []
    for split in ("test", "validation"):
        tuned = summary.get(split)
        if not isinstance(tuned, dict) or not tuned:
            continue
        columns = {n: (b.get(split) or {}) for n, b in baselines.items() if isinstance(b, dict)}
        columns = {n: c for n, c in columns.items() if isinstance(c, dict) and c}
        columns["base"] = base.get(split) or {}
        columns["tuned"] = tuned
        rows = [[metric] + [c.get(metric, "") for c in columns.values()] for metric in tuned]
        out.append(f"<h3>{escape(split)}</h3>" + _table(["metric", *columns], rows))
    if not out:
        return ""
    notes = "".join(f"<li>{escape(str(n))}: {escape(str(b.get('about', '')))}"
                    + (f' <span class="muted">(skipped: {escape(str(b["skipped"]))})</span>' if b.get("skipped")
                       else "") + "</li>"
                    for n, b in baselines.items() if isinstance(b, dict))
    return "<h2>Results: base vs tuned</h2>" + "".join(out) + (f"<ul>{notes}</ul>" if notes else "")


def _training(lines: list[dict]) -> str:
    """Curves from metrics.jsonl: training lines have no `split`; evaluation lines name theirs."""
    if not lines:
        return ""
    train = [r for r in lines if "split" not in r]
    evals: dict[str, list[dict]] = {}
    for r in lines:
        if "split" in r:
            evals.setdefault(str(r["split"]), []).append(r)
    plots = []
    loss = {"train loss": _points(train, "loss")}
    for split, rs in evals.items():
        loss[f"{split} loss"] = _points(rs, "loss")
    if any(loss.values()):
        plots.append(svg.line_plot("loss", loss, "loss", ylabel="loss"))
    for split, rs in evals.items():
        metrics = [k for k in dict.fromkeys(k for r in rs for k in r) if k not in ("step", "split", "loss", "train_loss")
                   and any(isinstance(r.get(k), (int, float)) for r in rs)]
        for metric in metrics:
            plots.append(svg.line_plot(f"{split} {metric}", {metric: _points(rs, metric)}, "metric", ylabel=metric))
        gap = [(r["step"], r["loss"] - r["train_loss"]) for r in rs
               if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("train_loss"), (int, float))]
        if gap:
            plots.append(svg.line_plot(f"{split} loss - train loss (the gap)", {"gap": gap}, "gap", ylabel="gap"))
    if _points(train, "lr"):
        plots.append(svg.line_plot("learning rate", {"lr": _points(train, "lr")}, "lr", ylabel="lr"))
    if _points(train, "grad_norm"):
        plots.append(svg.line_plot("gradient norm (before clipping)", {"grad_norm": _points(train, "grad_norm")},
                                   "grad-norm"))
    return "<h2>Training</h2>" + '<div class="plots">' + "".join(plots) + "</div>" if plots else ""


def _points(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool)]


def _data(card: dict, title: str = "Data") -> str:
    """Token lengths per split (a histogram where the card has one, else its percentiles) and label balance."""
    plots, balance = [], []
    for split in ("train", "validation", "test", "replay"):
        info = card.get(split)
        if not isinstance(info, dict):
            continue
        tokens = info.get("tokens") or {}
        hist = tokens.get("histogram")
        if isinstance(hist, dict) and hist.get("counts"):
            edges, counts = hist["edges"], hist["counts"]
            bars = [(f"{edges[i]:.0f}", c) for i, c in enumerate(counts)]
            plots.append(svg.bar_plot(f"{split}: tokens per example ({info.get('rows', '?')} rows, "
                                      f"{info.get('truncated', 0)} truncated)", bars, "lengths", ylabel="rows"))
        elif tokens:
            bars = [(k, v) for k, v in tokens.items() if isinstance(v, (int, float))]
            plots.append(svg.bar_plot(f"{split}: tokens per example (percentiles)", bars, "lengths", ylabel="tokens"))
        if isinstance(info.get("label_balance"), dict):
            total = sum(info["label_balance"].values()) or 1
            balance.extend([split, label, n, f"{n / total:.1%}"] for label, n in info["label_balance"].items())
    out = ""
    if plots:
        out += '<div class="plots">' + "".join(plots) + "</div>"
    if balance:
        out += "<h3>label balance</h3>" + _table(["split", "label", "rows", "share"], balance, numeric_from=2)
    tasks = card.get("tasks")
    if isinstance(tasks, dict):
        out += "".join(_data(c, f"Data: task {t}").replace("<h2>", "<h3>").replace("</h2>", "</h3>")
                       for t, c in tasks.items() if isinstance(c, dict))
    return f"<h2>{escape(title)}</h2>" + out if out else ""


def _confusion(summary: dict, manifest: dict) -> str:
    confusion = summary.get("confusion")
    if not isinstance(confusion, dict):
        return ""
    id2label = (manifest.get("model_kwargs") or {}).get("id2label") or {}
    plots = []
    for split in ("test", "validation"):
        counts = confusion.get(split)
        if not isinstance(counts, list) or not counts:
            continue
        labels = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(counts))]
        plots.append(svg.heatmap(f"{split}: confusion matrix", labels, counts))
    return "<h2>Confusion matrix</h2>" + '<div class="plots">' + "".join(plots) + "</div>" if plots else ""


def _findings(summary: dict) -> str:
    items = []
    checks = summary.get("checks") if isinstance(summary.get("checks"), dict) else {}
    for f in checks.get("findings") or []:
        if isinstance(f, dict):
            items.append(f'<li class="{"warn" if f.get("policy") in ("warn", "error") else ""}">'
                         f"<b>{escape(str(f.get('check', '')))}</b> ({escape(str(f.get('policy', '')))}): "
                         f"{escape(str(f.get('message', '')))}</li>")
    if checks and not checks.get("findings"):
        items.append("<li>data checks (leakage, duplicates, empty rows, truncation, label balance): nothing found</li>")
    forgot = summary.get("forgetting")
    if isinstance(forgot, dict):
        items.append(f'<li class="{"warn" if forgot.get("warning") else ""}"><b>forgetting</b>: '
                     f"{escape(str(forgot.get('message', '')))}</li>")
    diagnosis = summary.get("diagnosis") if isinstance(summary.get("diagnosis"), dict) else {}
    for line in diagnosis.get("warnings") or []:
        items.append(f'<li class="warn"><b>diagnosis</b>: {escape(str(line))}</li>')
    for change in diagnosis.get("advice") or []:
        if isinstance(change, dict):
            items.append(f"<li><b>advice</b>: {escape(str(change.get('key', '')))} "
                         f"{escape(str(change.get('now', '')))} -> {escape(str(change.get('to', '')))}"
                         + (f" ({escape(str(change['note']))})" if change.get("note") else "") + "</li>")
    return "<h2>Findings</h2><ul>" + "".join(items) + "</ul>" if items else ""


def _samples(run_dir: Path) -> str:
    """The first test prompts of a generative run: reference, base answer, tuned answer."""
    data = _json(run_dir / "compare.json")
    rows = data.get("rows") if isinstance(data, dict) else _json(run_dir / "generations.json")
    if not isinstance(rows, list) or not rows:
        return ""
    out = [f"<h2>Generation samples</h2><p class=\"muted\">the first {min(SAMPLES, len(rows))} of {len(rows)} test "
           "prompts" + (" (all in compare.md)" if isinstance(data, dict) else "") + "</p>"]
    for row in rows[:SAMPLES]:
        if not isinstance(row, dict):
            continue
        messages = row.get("messages") or []
        prompt = "\n".join(f"[{m.get('role', '')}] {m.get('content', '')}" for m in messages if isinstance(m, dict))
        parts = [("prompt", prompt), ("reference", row.get("reference"))]
        if "base" in row:
            parts.append(("base", row.get("base")))
        parts.append(("tuned", row.get("tuned", row.get("text"))))
        out.append('<div class="sample">' + "".join(f"<b>{name}</b><pre>{escape(str(text))}</pre>"
                                                   for name, text in parts if text is not None) + "</div>")
    return "".join(out)


def _raw(summary: dict) -> str:
    if not summary:
        return ""
    text = json.dumps(summary, indent=1, default=str, ensure_ascii=False)
    return f"<h2>summary.json</h2><details><summary>show</summary><pre>{escape(text)}</pre></details>"
