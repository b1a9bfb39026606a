"""report.html as a reader sees it: a tiny classifier run and a tiny sft run, each report opened from its file
in headless Chromium (Debian's `chromium` through Playwright, the `browser` fixture of conftest.py: skipped
without it, failed under CI=true). Every plot the run folder calls for must be there and draw its data, the
base-vs-tuned table and the sft samples must be filled, the console must print no error and the page must
fetch nothing but itself. A full-page screenshot of each report goes to the test's temp folder.
"""

from __future__ import annotations

import pytest

from tunesmith.cli import main
from tunesmith.report import browser as check
from tiny import classify_config, sft_config

MINIMUM = {"classify": {"loss", "metric", "gap", "lr", "grad-norm", "lengths", "confusion"},
           "sft": {"loss", "metric", "gap", "lr", "grad-norm", "lengths"}}
"""The plot kinds each objective's report holds at least (so a run folder that calls for nothing cannot pass)."""


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_bert, tiny_llama, sentiment_dir, instruction_dir):
    root = tmp_path_factory.mktemp("report-runs")
    out = f"output.dir={root / 'runs'}"
    clf = classify_config(root / "clf.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(clf), out, "name=clf", "train.max_steps=16", "train.eval_every=4"]) == 0
    sft = sft_config(root / "sft.yaml", tiny_llama, instruction_dir)
    assert main(["train", str(sft), out, "name=sft", "train.max_steps=12", "train.log_every=2",
                 "train.eval_every=4", "eval.generate.prompts=4", "eval.forgetting.enabled=false"]) == 0
    return {"classify": root / "runs" / "clf", "sft": root / "runs" / "sft"}


@pytest.mark.parametrize("objective", ["classify", "sft"])
def test_report_html_draws_every_plot_in_chromium(browser, tiny_runs, tmp_path, objective):
    run = tiny_runs[objective]
    expected = check.expected_plots(run)
    assert MINIMUM[objective] <= {e.kind for e in expected}, expected
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    try:
        result = check.check_page(page, run, run / "report.html")
        page.screenshot(path=str(tmp_path / f"report-{objective}.png"), full_page=True)
    finally:
        context.close()
    assert result.ok, "\n".join(result.problems())
    names = [name for name, *_ in result.rows]
    assert len([n for n in names if not n.startswith(("table", "samples"))]) == len(expected), names
    assert "table: results base vs tuned" in names
    assert ("samples: generation samples" in names) == (objective == "sft")
    assert (tmp_path / f"report-{objective}.png").stat().st_size > 10_000
