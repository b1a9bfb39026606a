"""Training on tiny models: each tuning trains what it should, and a run's artifacts load back."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.cli import main
from tiny import classify_config


def train(tmp_path, model, data, tuning="{kind: full}", extra="", *args):
    cfg = classify_config(tmp_path / "run.yaml", model, data, tuning, extra)
    assert main(["train", str(cfg), *args]) == 0
    name = next((a.split("=", 1)[1] for a in args if a.startswith("name=")), "tiny")
    return tmp_path / "runs" / name


def test_full_finetune_learns_and_reports_base(in_tmp, tiny_bert, sentiment_dir):
    run = train(in_tmp, tiny_bert, sentiment_dir)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.9
    assert summary["base"]["test"]["accuracy"] <= 0.7
    assert summary["params"]["trainable"] == summary["params"]["total"]
    for key in ("train_seconds", "examples_per_s"):
        assert summary["train"][key] > 0
    assert summary["peak_memory_mb"] > 0
    # a run that learned: no sign of underfitting, and the weights moved
    assert not [u for u in summary["diagnosis"]["underfitting"] if "barely" in u["finding"]]
    assert summary["diagnosis"]["update"]["relative"] > 1e-3
    # full weights load with plain transformers and carry the label names
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l and "split" not in l][:2] == [4, 8]
    assert any(l.get("split") == "validation" for l in lines)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 0 and "torch" in manifest["versions"]
    assert any(k.endswith("train.jsonl") for k in manifest["data_sha256"])
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_lora_adapter_loads_with_peft_and_matches_predictions(in_tmp, tiny_bert, sentiment_dir, capsys):
    run = train(in_tmp, tiny_bert, sentiment_dir, "{kind: lora, r: 4, alpha: 8, targets: all-linear}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights"] == "adapter"
    assert summary["params"]["trainable"] < summary["params"]["total"] / 2
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    texts = ["the movie was great and fun", "a dull and boring film"]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)
    capsys.readouterr()
    assert main(["predict", str(run), *texts]) == 0
    out = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [o["label"] for o in out] == [["neg", "pos"][int(p.argmax())] for p in probs]
    for row, p in zip(out, probs):
        assert row["scores"]["pos"] == pytest.approx(float(p[1]), abs=1e-3)
    # the adapter trained: LoRA B matrices start at zero
    from safetensors.torch import load_file

    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)


def test_freeze_trains_only_head_and_last_block(in_tmp, tiny_bert, sentiment_dir):
    from transformers import AutoModelForSequenceClassification

    run = train(in_tmp, tiny_bert, sentiment_dir, "{kind: freeze, train_last: 1}")
    before = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(run / "model").state_dict()
    changed = {k for k in before if "classifier" not in k and not torch.equal(before[k], after[k])}
    assert changed, "the last block should have trained"
    assert all(k.startswith("bert.encoder.layer.1.") for k in changed), changed


def test_freeze_head_only(in_tmp, tiny_bert, sentiment_dir):
    run = train(in_tmp, tiny_bert, sentiment_dir, "{kind: freeze}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params"]["trainable"] == 32 * 2 + 2  # the classifier: weight 2x32 and bias


def test_eval_command_scores_a_run_on_new_data(in_tmp, tiny_bert, sentiment_dir, capsys):
    run = train(in_tmp, tiny_bert, sentiment_dir)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(sentiment_dir / "test.jsonl")]) == 0
    scores = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert scores["rows"] == 48
    assert scores["accuracy"] == pytest.approx(summary["test"]["accuracy"])


def test_a_finished_run_is_not_overwritten_without_force(in_tmp, tiny_bert, sentiment_dir, capsys):
    train(in_tmp, tiny_bert, sentiment_dir, "{kind: freeze}", "", "train.max_steps=2")
    assert main(["train", str(in_tmp / "run.yaml")]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert main(["train", str(in_tmp / "run.yaml"), "--force", "train.max_steps=2"]) == 0
