"""report.html in every run folder (and `tunesmith report RUN`), and experiment trackers (train.report_to)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from tunesmith.cli import main
from tiny import classify_config, instruction_rows, sentiment_rows, sft_config, write_jsonl

SCRIPT = "<script>alert(1)</script>"


class Page(HTMLParser):
    """The page's plots (class -> data-points) and every src/href it would load or link to."""

    def __init__(self):
        super().__init__()
        self.plots: list[tuple[str, int]] = []
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "svg":
            self.plots.append((a.get("class", ""), int(a.get("data-points", 0))))
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def read_page(run) -> tuple[str, Page]:
    text = (run / "report.html").read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def drawn(page: Page, kind: str) -> list[int]:
    return [n for cls, n in page.plots if kind in cls.split()]


def assert_safe(text: str, page: Page) -> None:
    assert "script" not in page.tags, "markup from the data reached the page"
    assert SCRIPT not in text and "&lt;script&gt;" in text
    assert not [link for link in page.links if re.match(r"\s*(https?:)?//", link)], page.links


@pytest.fixture
def labelled(tmp_path):
    """The tiny sentiment task with its positive label named `<script>...`: a dataset text the page must escape."""
    root = tmp_path / "data"
    for split, n, seed in (("train", 192, 1), ("validation", 48, 2), ("test", 48, 3)):
        rows = [{**r, "label": SCRIPT if r["label"] == "pos" else r["label"]} for r in sentiment_rows(n, seed)]
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


def test_classify_report_has_curves_lengths_confusion_and_escapes_data(in_tmp, tiny_bert, labelled, capsys):
    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, labelled)
    assert main(["train", str(cfg), "train.epochs=2"]) == 0
    run = in_tmp / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    counts = summary["confusion"]["test"]
    assert sum(map(sum, counts)) == 48 and len(counts) == 2
    assert (counts[0][0] + counts[1][1]) / 48 == pytest.approx(summary["test"]["accuracy"])

    text, page = read_page(run)
    for kind in ("loss", "lr", "gap", "metric", "lengths", "confusion"):
        assert drawn(page, kind) and all(n > 0 for n in drawn(page, kind)), (kind, page.plots)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert drawn(page, "loss")[0] == len([l for l in lines if "loss" in l])  # train and validation points
    assert drawn(page, "confusion") == [4, 4]  # test and validation, 2 x 2
    assert "base" in text and "majority" in text  # base vs tuned, with the baselines
    assert_safe(text, page)

    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").read_text(encoding="utf-8") == text


def test_sft_report_shows_generation_samples_escaped(in_tmp, tiny_llama):
    rows = instruction_rows(96, seed=1)
    rows[0]["instruction"] = f"good {SCRIPT}"
    write_jsonl(in_tmp / "train.jsonl", rows[1:65])
    write_jsonl(in_tmp / "test.jsonl", [rows[0]] + rows[65:80])
    cfg = sft_config(in_tmp / "c.yaml", tiny_llama, in_tmp / "train.jsonl",
                     extra=f"")
    assert main(["train", str(cfg), f"data.test={in_tmp / 'test.jsonl'}", "train.epochs=1",
                 "eval.generate.prompts=4", "eval.forgetting.enabled=false"]) == 0
    run = in_tmp / "runs" / "sft"
    text, page = read_page(run)
    assert "Generation samples" in text and text.count('class="sample"') == 4
    for kind in ("loss", "lr", "lengths"):
        assert drawn(page, kind) and all(n > 0 for n in drawn(page, kind)), (kind, page.plots)
    assert not drawn(page, "confusion")
    assert_safe(text, page)


def test_report_of_a_folder_that_is_no_run_is_a_clear_error(in_tmp, capsys):
    (in_tmp / "x").mkdir()
    assert main(["report", str(in_tmp / "x")]) != 0
    assert "not a run folder" in capsys.readouterr().err


def test_trackers_receive_every_metrics_line(in_tmp, tiny_bert, sentiment_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlflow = None
    try:
        import mlflow
    except ImportError:
        pass
    trackers = "[tensorboard, mlflow]" if mlflow else "[tensorboard]"
    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(cfg), "train.epochs=1", f"train.report_to={trackers}"]) == 0
    run = in_tmp / "runs" / "tiny"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for line in lines:
        split = line.get("split", "train")
        for key in ("loss", "lr", "accuracy"):
            if key in line:
                expected.setdefault(f"{split}/{key}", []).append((line["step"], line[key]))
    assert {"train/loss", "train/lr", "validation/loss", "validation/accuracy"} <= set(expected)

    events = EventAccumulator(str(run / "trackers" / "tiny"))
    events.Reload()
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag
    summary = json.loads((run / "summary.json").read_text())
    final = events.Scalars("final/test/accuracy")
    assert final[-1].value == pytest.approx(summary["test"]["accuracy"])

    if mlflow:
        client = mlflow.tracking.MlflowClient((run / "mlruns").resolve().as_uri())
        [found] = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert found.data.params["train.epochs"] == "1.0"
        for tag, points in expected.items():
            history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, tag))
            assert [s for s, _ in history] == [s for s, _ in points], tag
            assert [v for _, v in history] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_a_tracker_that_is_not_installed_is_a_config_error_naming_the_pip_command(in_tmp, tiny_bert, sentiment_dir,
                                                                                  monkeypatch, capsys):
    from tunesmith.report import trackers

    monkeypatch.setitem(trackers.PACKAGES, "wandb", (("tunesmith_no_such_module",), "wandb"))
    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(cfg), "train.report_to=[wandb]"]) != 0
    err = capsys.readouterr().err
    assert "train.report_to" in err and "pip install wandb" in err
    assert not (in_tmp / "runs" / "tiny").exists()
