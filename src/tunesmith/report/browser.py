"""Open a run's report.html in headless Chromium and check that every plot it should hold is drawn.

Which plots a report should hold is read from the run folder here, apart from the renderer (html.py): a loss
plot where metrics.jsonl logs a loss, one plot per validation metric, the train/validation gap where an
evaluation line has both losses, the learning rate, the gradient norm, a token-length histogram per split
of data_card.json, a confusion matrix per split of summary.json's `confusion`; and, besides plots, the
base-vs-tuned table and a generative run's samples. So a renderer that drops a plot, or draws it empty, fails
the check. "Drawn" is measured in the rendered page, not in the HTML text: the plot is visible with a
non-zero box, every line has at least two points (or one dot when the series has a single point), bars and
cells have a size, every confusion cell shows its count.

Used by the browser tests and by bench/report_screenshots.py. Playwright and Chromium are needed only here:
Debian's `chromium` (`make browser`), or the executable named by $CHROMIUM; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TunesmithError

SAMPLES = 8
"""Generation samples a report shows at most (html.SAMPLES; repeated so the check does not trust the renderer)."""


def chromium_path() -> str | None:
    """The system's Chromium: $CHROMIUM, else `chromium` or `chromium-browser` on PATH."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> str | None:
    """Why a browser cannot be launched here (None when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -c constraints.txt -e '.[dev]')"
    if chromium_path() is None:
        return "no chromium executable (apt-get install chromium, or `make browser`; or set CHROMIUM=path)"
    return None


@contextmanager
def chromium():
    """Headless Chromium launched by Playwright from the system's executable; a clear error when there is none."""
    why = missing()
    if why:
        raise TunesmithError(f"cannot open a browser: {why}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to start as root (containers, CI)
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Expected:
    """A plot the report should hold: its kind (the svg's class) and its title (exact, or the start of it)."""

    kind: str
    title: str
    prefix: bool = False

    def matches(self, plot: dict) -> bool:
        label = plot["title"]
        return self.kind in plot["kind"].split() and (label.startswith(self.title) if self.prefix
                                                      else label == self.title)


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def expected_plots(run_dir: Path) -> list[Expected]:
    """The plots the run folder's files call for (see the module's docstring)."""
    lines = []
    path = run_dir / "metrics.jsonl"
    for line in (path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _number(record.get("step")):
            lines.append(record)
    out = []
    if any(_number(r.get("loss")) for r in lines):
        out.append(Expected("loss", "loss"))
    evals: dict[str, list[dict]] = {}
    for r in lines:
        if "split" in r:
            evals.setdefault(str(r["split"]), []).append(r)
    for split, rs in evals.items():
        metrics = dict.fromkeys(k for r in rs for k, v in r.items() if _number(v))
        out += [Expected("metric", f"{split} {m}") for m in metrics if m not in ("step", "loss", "train_loss")]
        if any(_number(r.get("loss")) and _number(r.get("train_loss")) for r in rs):
            out.append(Expected("gap", f"{split} loss - train loss (the gap)"))
    train = [r for r in lines if "split" not in r]
    if any(_number(r.get("lr")) for r in train):
        out.append(Expected("lr", "learning rate"))
    if any(_number(r.get("grad_norm")) for r in train):
        out.append(Expected("grad-norm", "gradient norm (before clipping)"))
    out += _length_plots(_json(run_dir / "data_card.json") or {})
    confusion = (_json(run_dir / "summary.json") or {}).get("confusion")
    if isinstance(confusion, dict):
        out += [Expected("confusion", f"{split}: confusion matrix") for split in ("test", "validation")
                if isinstance(confusion.get(split), list) and confusion[split]]
    return out


def _length_plots(card: dict) -> list[Expected]:
    out = [Expected("lengths", f"{split}: tokens per example", prefix=True)
           for split in ("train", "validation", "test", "replay")
           if isinstance(card.get(split), dict) and card[split].get("tokens")]
    for sub in (card.get("tasks") or {}).values() if isinstance(card.get("tasks"), dict) else ():
        if isinstance(sub, dict):
            out += _length_plots(sub)
    return out


def expected_samples(run_dir: Path) -> int:
    """How many generation samples the report should show (a generative run's first test prompts)."""
    data = _json(run_dir / "compare.json")
    rows = data.get("rows") if isinstance(data, dict) else _json(run_dir / "generations.json")
    return min(SAMPLES, len(rows)) if isinstance(rows, list) else 0


MEASURE = """() => {
  const visible = el => { const b = el.getBoundingClientRect(), s = getComputedStyle(el);
    return b.width > 0 && b.height > 0 && s.visibility !== 'hidden' && s.display !== 'none' && +s.opacity > 0; };
  const plots = [...document.querySelectorAll('svg.plot')].map(svg => {
    const box = svg.getBoundingClientRect();
    return {
      kind: svg.getAttribute('class') || '', title: svg.getAttribute('aria-label') || '',
      points: Number(svg.dataset.points || 0), visible: visible(svg), width: box.width, height: box.height,
      lines: [...svg.querySelectorAll('polyline')].map(l => ({n: l.points.numberOfItems,
                                                          width: l.getBoundingClientRect().width})),
      dots: [...svg.querySelectorAll('circle.point')].filter(visible).length,
      bars: [...svg.querySelectorAll('rect.bar')].map(r => r.getBoundingClientRect().height),
      cells: [...svg.querySelectorAll('rect.cell')].map(r => {
        const b = r.getBoundingClientRect();
        const label = [...svg.querySelectorAll('text')].find(t => { const c = t.getBoundingClientRect();
          return c.x >= b.x && c.right <= b.right + 1 && c.y >= b.y && c.bottom <= b.bottom + 1; });
        return {width: b.width, height: b.height, text: label ? label.textContent.trim() : null}; }),
      empty: [...svg.querySelectorAll('text')].some(t => t.textContent.trim() === 'no data'),
    }; });
  const tables = [...document.querySelectorAll('h2')].filter(h => h.textContent.startsWith('Results'))
    .map(h => { let el = h.nextElementSibling; const rows = [];
      while (el && el.tagName !== 'H2') {
        if (el.tagName === 'TABLE' && visible(el)) {
          const head = [...el.rows[0].cells].map(c => c.textContent.trim());
          for (const r of [...el.rows].slice(1)) rows.push(Object.fromEntries(
            [...r.cells].map((c, i) => [head[i], c.textContent.trim()])));
        }
        el = el.nextElementSibling; }
      return rows; });
  const samples = [...document.querySelectorAll('div.sample')].filter(visible).map(s =>
    Object.fromEntries([...s.querySelectorAll('b')].map(b => [b.textContent.trim(),
      (b.nextElementSibling && b.nextElementSibling.tagName === 'PRE') ? b.nextElementSibling.textContent : ''])));
  return {plots, results: tables.flat(), samples};
}"""
"""Measured in the page: every svg.plot's box, lines, dots, bars and confusion cells (with the count each
shows), the base-vs-tuned table's rows, and the generation samples."""


def drawn(plot: dict) -> tuple[bool, str]:
    """Whether a measured plot draws data, and why not."""
    if not plot["visible"] or plot["width"] <= 0 or plot["height"] <= 0:
        return False, "not visible or zero size"
    if plot["empty"] or plot["points"] <= 0:
        return False, "no data"
    kinds = plot["kind"].split()
    if plot["cells"] or "confusion" in kinds:
        cells = plot["cells"]
        if len(cells) != plot["points"] or not all(c["width"] > 0 and c["height"] > 0 for c in cells):
            return False, f"{len(cells)} sized cells for {plot['points']} counts"
        if not all(c["text"] is not None and c["text"].isdigit() for c in cells):
            return False, "a cell shows no count"
        if sum(int(c["text"]) for c in cells) <= 0:
            return False, "every count is 0"
        return True, ""
    if plot["bars"] or "lengths" in kinds:
        if len(plot["bars"]) != plot["points"] or not any(h > 0 for h in plot["bars"]):
            return False, f"{sum(h > 0 for h in plot['bars'])} bars with a height for {plot['points']} values"
        return True, ""
    lines = plot["lines"]
    if not lines or plot["dots"] != plot["points"]:
        return False, f"{len(lines)} lines and {plot['dots']} visible dots for {plot['points']} points"
    if not any(l["n"] >= 2 and l["width"] > 0 for l in lines) and plot["points"] > len(lines):
        return False, "no line with two points"
    return True, ""


@dataclass
class Check:
    """One page's verdict: a row per plot (and per table), the errors the console printed, what it fetched."""

    rows: list[tuple[str, bool, int, str]] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r[1] for r in self.rows) and not self.console and not self.requests

    def problems(self) -> list[str]:
        return ([f"{name}: {why}" for name, ok, _, why in self.rows if not ok]
                + [f"console: {m}" for m in self.console] + [f"fetched: {u}" for u in self.requests])


def check_page(page, run_dir: Path, report: Path) -> Check:
    """Open `report` (the run's report.html, or one rendered from `run_dir` elsewhere) in `page` and check it."""
    url = report.resolve().as_uri()
    result = Check()
    page.on("console", lambda m: result.console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: result.console.append(str(e)))
    page.on("request", lambda r: result.requests.append(r.url) if r.url != url else None)
    page.goto(url)
    page.wait_for_load_state("load")
    measured = page.evaluate(MEASURE)
    plots = measured["plots"]
    claimed = set()
    for want in expected_plots(run_dir):
        found = [i for i, p in enumerate(plots) if i not in claimed and want.matches(p)]
        if not found:
            result.rows.append((f"{want.kind}: {want.title}", False, 0, "missing"))
            continue
        claimed.add(found[0])
    for i, plot in enumerate(plots):  # every plot on the page, expected or not, must draw something
        ok, why = drawn(plot)
        result.rows.append((f"{plot['kind'].replace('plot ', '')}: {plot['title']}", ok, plot["points"], why))
    summary = _json(run_dir / "summary.json") or {}
    tuned = {split: summary[split] for split in ("test", "validation") if isinstance(summary.get(split), dict)
             and summary[split]}
    if tuned:
        rows = measured["results"]
        want = sum(len(m) for m in tuned.values())
        has_base = isinstance(summary.get("base"), dict) and any(summary["base"].get(s) for s in tuned)
        filled = [r for r in rows if r.get("tuned") and (r.get("base") or not has_base)]
        result.rows.append(("table: results base vs tuned", len(filled) == want, len(filled),
                            "" if len(filled) == want else f"{len(filled)} rows with tuned"
                            f"{' and base' if has_base else ''} values for {want} metrics"))
    samples = expected_samples(run_dir)
    if samples:
        shown = [s for s in measured["samples"] if s.get("prompt") and s.get("tuned") is not None]
        result.rows.append(("samples: generation samples", len(shown) == samples, len(shown),
                            "" if len(shown) == samples else f"{len(shown)} shown for {samples}"))
    return result
