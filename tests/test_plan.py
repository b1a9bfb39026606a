"""`tunesmith plan`: exact parameter counts from the meta device, and no weights touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.plan import plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_distilbert_lora_plan_prints_peft_count(capsys):
    assert main(["plan", str(EXAMPLES / "seed-distilbert-lora.yaml")]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 628,994 || all params: 67,584,004 || trainable%: 0.9307" in out.splitlines()


def test_plan_allocates_nothing(monkeypatch):
    """Building on the meta device: parameters have no storage, and no weight file is opened."""
    import torch

    from tunesmith import plan as plan_module
    from tunesmith.models import load as load_module

    captured = {}
    real = load_module.build_on_meta

    def spy(*args, **kwargs):
        captured["model"] = real(*args, **kwargs)
        return captured["model"]

    monkeypatch.setattr(plan_module, "build_on_meta", spy)
    monkeypatch.setattr(torch.serialization, "load", lambda *a, **k: pytest.fail("plan read weights"))
    result = plan(load_config(EXAMPLES / "seed-distilbert-lora.yaml"))
    assert all(p.device.type == "meta" for p in captured["model"].parameters())
    assert result["trainable"] == 628_994


@pytest.mark.parametrize("tuning,trainable", [
    ("{kind: full}", 66_955_010),
    ("{kind: freeze}", 768 * 768 + 768 + 768 * 2 + 2),  # pre_classifier + classifier
    ("{kind: freeze, train_last: 1}", 768 * 768 + 768 + 768 * 2 + 2 + 7_087_872),
])
def test_plan_counts_each_tuning(tmp_path, tuning, trainable):
    cfg = (EXAMPLES / "seed-distilbert-lora.yaml").read_text().replace(
        "{kind: lora, r: 4, alpha: 32, dropout: 0.1, targets: [q_lin]}", tuning)
    (tmp_path / "c.yaml").write_text(cfg)
    result = plan(load_config(tmp_path / "c.yaml"))
    assert result["trainable"] == trainable and result["total"] == 66_955_010
    mem = result["memory"]
    assert mem["gradients"] == 4 * trainable and mem["optimizer"] == 8 * trainable
    assert mem["weights"] == 4 * 66_955_010
