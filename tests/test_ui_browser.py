"""`tunesmith ui` and report.html as their users see them: real headless Chromium (Debian's `chromium`, driven by
Playwright; `make browser` installs it, nothing is downloaded by Playwright) on a UI server process over a runs
folder holding a finished tiny sft run and a tiny classifier run. A screenshot of each page is saved under the
test's temp folder.

Without chromium (or the playwright package) these tests are skipped on a developer's machine and fail under CI
(CI=true), so CI can never pass without having run them (the `browser` fixture of conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tunesmith.cli import main
from tiny import classify_config, sentiment_rows, sft_config, write_jsonl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WAIT_MS = 180_000
"""Longest wait for the page to show something (a model load, a chat answer): seconds on an idle machine, much
more on a loaded one."""
RUN_MS = 900_000
"""Longest wait for the tiny run started from the page (a fresh process importing torch, then a few steps)."""


@pytest.fixture
def page(browser, request, tmp_path):
    """A fresh page; whatever a test does, a screenshot of where it ended is saved (`<test name>-end.png`)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    page.screenshot(path=str(tmp_path / f"{request.node.name}-end.png"), full_page=True)
    context.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, tiny_bert, instruction_dir, sentiment_dir):
    """A runs folder with a finished tiny sft run (`chatty`, a chat model) and a tiny classifier run (`clf`)."""
    root = tmp_path_factory.mktemp("ui")
    out = f"output.dir={root / 'runs'}"
    sft = sft_config(root / "sft.yaml", tiny_llama, instruction_dir)
    assert main(["train", str(sft), out, "name=chatty", "train.max_steps=24", "train.log_every=4",
                 "train.eval_every=8", "eval.forgetting.enabled=false"]) == 0
    clf = classify_config(root / "clf.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(clf), out, "name=clf", "train.max_steps=24"]) == 0
    return root / "runs"


class Ui:
    def __init__(self, proc, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def http(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url.rstrip("/") + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=WAIT_MS / 1000) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def ui(runs, tmp_path_factory):
    """`tunesmith ui` on a free port over `runs`, offering the repository's examples."""
    log = tmp_path_factory.mktemp("ui-log") / "ui.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "ui", "--port", "0", "--runs", str(runs),
                                 "--examples", str(EXAMPLES)], stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline, found = time.time() + 120, None
    while found is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        found = re.search(r"tunesmith ui at (http://127\.0\.0\.1:\d+/)", log.read_text())
    assert found, f"the UI did not start:\n{log.read_text()}"
    yield Ui(proc, found.group(1), log)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a model load in progress holds shutdown; the log is still checked
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


def drawn_plots(page) -> list[dict]:
    """Every svg.plot on the page: its class, data-points, and how many of its marks (lines, bars, cells) have a
    visible size in the rendered page."""
    return page.eval_on_selector_all("svg.plot", """plots => plots.map(svg => ({
        kind: svg.getAttribute('class'), points: Number(svg.dataset.points),
        marks: [...svg.querySelectorAll('polyline, rect.bar, rect.cell')].filter(m => {
            const box = m.getBoundingClientRect();
            return (m.tagName === 'polyline' ? m.points.numberOfItems > 1 : box.height > 0) && box.width > 0;
        }).length}))""")


def test_run_list_and_a_run_with_its_curves(page, ui, tmp_path):
    page.goto(ui.url)
    row = page.locator('#runs-table tr[data-run="chatty"]')
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == "completed" and cells[2] == "sft" and cells[3] == "full" and cells[4]
    assert re.fullmatch(r"\d+\.\d{4}", cells[7]), cells  # the tuned main metric
    assert float(cells[7]) < float(cells[5]) and "better" in row.locator("td").nth(7).get_attribute("class")  # loss
    assert page.locator('#runs-table tr[data-run="clf"] td').nth(2).inner_text() == "classify"
    page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)

    row.locator("a").click()
    page.wait_for_selector("#run-sections svg.plot.loss")
    assert page.locator("#run-title").inner_text() == "chatty"
    plots = drawn_plots(page)
    kinds = {k for p in plots for k in p["kind"].split()}
    assert {"loss", "lr", "lengths"} <= kinds, plots
    assert all(p["points"] > 0 and p["marks"] > 0 for p in plots), plots
    lines = (ui_runs(ui) / "chatty" / "metrics.jsonl").read_text().splitlines()
    loss = next(p for p in plots if "loss" in p["kind"].split())
    assert loss["points"] == len([l for l in lines if '"loss"' in l])  # every logged loss is drawn
    assert "objective:" in page.locator("#run-config").inner_text()
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)


def ui_runs(ui) -> Path:
    return Path(ui.http("GET", "/api/runs")[1]["dir"])


def test_start_a_run_from_the_page_and_watch_it_finish(page, ui, tmp_path, tiny_bert, capsys):
    data = write_jsonl(tmp_path / "data" / "train.jsonl", sentiment_rows(64, seed=4))
    page.goto(ui.url + "#/new")
    page.wait_for_selector("#example option[value='sentiment-lora']", state="attached")

    # a typo: the page shows the CLI's own error text for the same file
    page.fill("#config", f"name: from-page\nmodel: {tiny_bert}\ndata: {{train: {data}}}\ntuning: {{kind: lorra}}\n")
    page.click("#start")
    page.wait_for_selector("#start-error:not([hidden])")
    shown = page.locator("#start-error").inner_text()
    capsys.readouterr()
    assert main(["check", str(ui_runs(ui) / ".ui" / "from-page.yaml")]) == 2
    assert "lorra" in shown and shown.strip() == capsys.readouterr().err.strip()

    config = (f"name: from-page\nmodel: {tiny_bert}\ndata: {{train: {data}, max_length: 32}}\n"
              "tuning: {kind: full}\nobjective: {kind: classify}\n"
              "train: {max_steps: 4, batch_size: 16, lr: 1.0e-2, log_every: 1, eval_every: 2}\n"
              "eval: {compare_base: false, forgetting: {enabled: false}}\n")
    page.fill("#config", config)
    page.click("#start")
    page.wait_for_selector("#job:not([hidden])")
    assert page.locator("#start-error").is_hidden()
    from playwright.sync_api import expect

    expect(page.locator("#job-state")).not_to_have_text("running", timeout=RUN_MS)
    log = page.locator("#job-log").inner_text()
    assert page.locator("#job-state").inner_text() == "completed", log
    assert "from-page" in log and "accuracy" in log, log
    page.screenshot(path=str(tmp_path / "new.png"), full_page=True)

    page.click("#job-run")  # the run it started, with its curves
    page.wait_for_selector("#run-sections svg.plot.loss")
    assert page.locator("#run-status").inner_text() == "completed"
    assert (ui_runs(ui) / "from-page" / "summary.json").is_file()


def test_chat_with_a_tuned_run_answers_as_the_run_measured(page, ui, tmp_path):
    row = next(r for r in json.loads((ui_runs(ui) / "chatty" / "compare.json").read_text())["rows"]
               if len(r["messages"]) == 1 and r["tuned"])
    page.goto(ui.url + "#/chat/chatty")
    page.wait_for_selector("#chat-run option[value='chatty']", state="attached")
    assert page.locator("#chat-run option[value='clf']").count() == 0  # a classifier does not chat
    page.fill("#chat-input", row["messages"][0]["content"])
    page.click("#chat-send")
    answer = page.locator(".turn.assistant").first
    answer.wait_for()
    assert answer.locator(".text").inner_text() == row["tuned"]  # greedy, the run's own generation settings
    assert answer.locator(".cut").count() == (0 if row["tuned_stopped"] else 1)
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)


def test_compare_two_runs_side_by_side(page, ui, tmp_path):
    page.goto(ui.url + "#/compare")
    page.wait_for_selector("#compare-a option[value='clf']", state="attached")
    page.select_option("#compare-a", "clf")
    page.select_option("#compare-b", "chatty")
    page.click("#compare-go")
    page.wait_for_selector("#compare-table:not([hidden])")
    text = page.locator("#compare-table").inner_text()
    assert "test accuracy" in text and "classify" in text and "sft" in text, text
    summary = json.loads((ui_runs(ui) / "clf" / "summary.json").read_text())
    assert f"{summary['test']['accuracy']:.4f}" in text
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)


def test_api_errors_are_json_messages(ui):
    status, body = ui.http("GET", "/api/runs/nope")
    assert status == 400 and "no run named 'nope'" in body["error"]["message"]
    status, body = ui.http("POST", "/api/chat", json.dumps({"run": "clf", "messages": [{"role": "user",
                                                                                           "content": "hi"}]}).encode(),
                           {"Content-Type": "application/json"})
    assert status == 400 and "not a chat model" in body["error"]["message"], body
    status, body = ui.http("POST", "/api/jobs", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    # another site cannot start runs here: a form post (not JSON) or a foreign Origin is refused
    status, body = ui.http("POST", "/api/jobs", b"yaml=x", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    status, body = ui.http("POST", "/api/jobs", b'{"yaml": "x"}', {"Content-Type": "application/json",
                                                                  "Origin": "http://evil.example"})
    assert status == 403


@pytest.mark.parametrize("name, kinds", [("clf", {"loss", "lr", "gap", "metric", "lengths", "confusion"}),
                                         ("chatty", {"loss", "lr", "gap", "metric", "lengths"})])
def test_report_html_draws_every_plot_in_chromium(page, runs, tmp_path, name, kinds):
    page.goto((runs / name / "report.html").as_uri())
    plots = drawn_plots(page)
    assert kinds <= {k for p in plots for k in p["kind"].split()}, plots
    assert plots and all(p["points"] > 0 and p["marks"] > 0 for p in plots), plots
    page.screenshot(path=str(tmp_path / f"report-{name}.png"), full_page=True)
