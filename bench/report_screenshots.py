"""Open runs' report.html in headless Chromium, check every plot is drawn, and save a screenshot of each.

    python bench/report_screenshots.py RUN [RUN ...] [--out docs/] [--width 1200] [--max-height 6000]
    python bench/report_screenshots.py runs/sentiment-lora --out docs/report-sentiment.png

The report is drawn afresh from the run folder by this version of tunesmith into a temporary folder (so the
run folder is only read, and an older run's page shows as `tunesmith report RUN` would write it now). Prints
a line per plot (drawn yes/no, the points or bars it holds) and per table, then saves `report-<run>.png`
under the folder --out (or, for one run, the file --out when it ends in .png): the full page, cut at --max-height pixels (the long raw summary.json at the end is folded
anyway) and written with Pillow's PNG optimizer where Pillow is installed. Exits 1 when a plot is missing
or empty, the console printed an error, or the page fetched anything.

Needs the playwright package and Debian's chromium (`make browser`, or CHROMIUM=path); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.report import browser, html


def shoot(chromium, run: Path, path: Path, width: int, max_height: int) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / html.REPORT
        report.write_text(html.render(run), encoding="utf-8")
        context = chromium.new_context(viewport={"width": width, "height": 900})
        try:
            page = context.new_page()
            result = browser.check_page(page, run, report)
            height = min(max_height, page.evaluate("document.documentElement.scrollHeight"))
            png = page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": width, "height": height})
        finally:
            context.close()
    print(f"{run}:")
    for name, ok, points, why in result.rows:
        print(f"  {'yes' if ok else 'NO ':3}  {points:5d}  {name}" + (f"  ({why})" if why else ""))
    for problem in result.console + result.requests:
        print(f"  NO          {problem}")
    path.write_bytes(_small(png))
    print(f"  -> {path} ({path.stat().st_size // 1024} KiB, {width}x{height})")
    return result.ok


def _small(png: bytes) -> bytes:
    """The PNG re-encoded with a 256-colour palette (plots and text lose nothing visible), if Pillow is here."""
    try:
        from io import BytesIO

        from PIL import Image
    except ImportError:
        return png
    image = Image.open(BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    buffer = BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue() if buffer.tell() < len(png) else png


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--max-height", type=int, default=6000)
    args = p.parse_args()
    try:
        for run in args.runs:
            if not (run / "summary.json").is_file() and not (run / "metrics.jsonl").is_file():
                raise TunesmithError(f"{run} is not a run folder (no summary.json, no metrics.jsonl)")
        if args.out.suffix == ".png":
            if len(args.runs) > 1:
                raise TunesmithError(f"--out {args.out} is one file for {len(args.runs)} runs",
                                     hint="give a folder: each run's screenshot is report-<run>.png in it")
            paths = [args.out]
        else:
            paths = [args.out / f"report-{run.name}.png" for run in args.runs]
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        with browser.chromium() as chromium:
            ok = [shoot(chromium, run, path, args.width, args.max_height) for run, path in zip(args.runs, paths)]
    except TunesmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
