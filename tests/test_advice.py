"""Advice after a run is made from the run's config: over every (tuning, symptom), no hint proposes the run's own
tuning or a value it already uses, every hint names its config key with the run's current value, and the
config the hint describes is a valid config."""

from __future__ import annotations

import pytest

from tunesmith.config import load_config
from tunesmith.evaluate import advice
from tunesmith.objectives import OBJECTIVES
from tunesmith.tuning import TUNINGS

SYMPTOMS = {"overfit": advice.overfitting, "underfit": advice.underfitting, "forget": advice.forgetting}
NOT_DEFAULT = {"lora": ["tuning.r=16"], "dora": ["tuning.r=4", "tuning.dropout=0.1"], "qlora": ["tuning.r=2"],
               "freeze": ["tuning.train_last=2"], "prefix": ["tuning.tokens=10"],
               "adapter": ["tuning.reduction_factor=8"],
               "ia3": ["tuning.layers=[0, 1]"]}
"""Some runs with values other than the defaults, so a hint that ignores the config shows."""


def config(tmp_path, kind: str, *overrides: str, objective: str = "classify"):
    path = tmp_path / "run.yaml"
    path.write_text(f"name: t\nmodel: sample:minilm-l6\ndata: {{train: data.jsonl}}\ntuning: {{kind: {kind}}}\n"
                    f"objective: {{kind: {objective}}}\n")
    return load_config(path, [*NOT_DEFAULT.get(kind, []), *overrides])


def value_at(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _yaml(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@pytest.mark.parametrize("symptom", SYMPTOMS)
@pytest.mark.parametrize("kind", TUNINGS)
@pytest.mark.parametrize("objective", ["classify", "clm", "mlm"])
def test_no_hint_proposes_what_the_run_already_does(tmp_path, kind, symptom, objective):
    head = OBJECTIVES[objective].HEAD
    if head not in TUNINGS[kind].HEADS:
        pytest.skip(f"{kind} does not train a {head} head")
    cfg = config(tmp_path, kind, objective=objective)
    changes = SYMPTOMS[symptom](cfg)
    assert changes, "every symptom has something to try"
    text = advice.render(changes)
    applied = []
    for c in changes:
        if c.key == "data.train":
            continue  # "add training rows": no value to compare
        assert c.now == value_at(cfg, c.key), f"{c.key}: the hint's 'now' is not the run's value"
        assert c.to != c.now, f"{c.key}: proposes the value the run already uses"
        assert f"{c.key} ({advice._value(c.now)} -> {advice._value(c.to)})" in text
        if c.key == "tuning.kind":
            assert c.to != kind and head in TUNINGS[c.to].HEADS  # another tuning, one that can train this head
        if not c.note:
            applied.append(f"{c.key}={_yaml(c.to)}")
    if not any(c.key == "tuning.kind" for c in changes):
        config(tmp_path, kind, *applied, objective=objective)  # the advised config is valid


@pytest.mark.parametrize("kind", TUNINGS)
def test_learning_rate_advice_stays_within_the_tunings_usual_range(tmp_path, kind):
    low, high = TUNINGS[kind].LR_RANGE
    keys = lambda changes: {c.key for c in changes}  # noqa: E731
    assert "train.lr" not in keys(advice.overfitting(config(tmp_path, kind, f"train.lr={low}")))
    assert "train.lr" not in keys(advice.forgetting(config(tmp_path, kind, f"train.lr={low}")))
    assert "train.lr" not in keys(advice.underfitting(config(tmp_path, kind, f"train.lr={high}")))
    lower = {c.key: c for c in advice.overfitting(config(tmp_path, kind, f"train.lr={high}"))}["train.lr"]
    assert low <= lower.to < high


def test_an_overfit_lora_run_is_told_to_lower_its_rank_not_to_use_lora(tmp_path):
    """The issue's example: a LoRA run was told "a tuning that trains fewer weights (lora)"."""
    from tunesmith.evaluate.diagnose import _overfitting

    cfg = config(tmp_path, "lora", "train.epochs=10", "train.weight_decay=0.05")
    evals = [{"split": "validation", "step": s, "loss": v, "train_loss": t}
             for s, v, t in ((10, 0.60, 0.65), (20, 0.50, 0.45), (30, 0.70, 0.20), (40, 0.90, 0.05))]
    trained = {"best_step": 20, "total_steps": 100, "steps": 40, "restored_best": True, "train_rows": 1000}
    info = _overfitting(evals, "loss", "min", trained, cfg)
    assert info["warning"]
    message = info["message"]
    assert "lower tuning.r (16 -> 8), raise tuning.dropout (0.05 -> 0.1)" in message
    assert "lower train.epochs (10 -> 2)" in message  # where validation was best: step 20 of 100
    assert "raise train.weight_decay (0.05 -> 0.1)" in message and "add training rows (now 1,000)" in message
    assert "lora" not in message.replace("tuning.", "")  # never its own tuning
    assert {"key": "tuning.r", "now": 16, "to": 8} in info["advice"]


def test_an_overfit_full_run_is_told_to_try_lora_and_early_stopping_if_off(tmp_path):
    from tunesmith.evaluate.diagnose import _overfitting

    cfg = config(tmp_path, "full", "train.early_stopping.enabled=false", "train.max_steps=200")
    evals = [{"split": "validation", "step": s, "loss": v, "train_loss": t}
             for s, v, t in ((50, 0.5, 0.5), (100, 0.7, 0.2), (150, 0.9, 0.1))]
    message = _overfitting(evals, "loss", "min", {"best_step": 50, "total_steps": 200, "steps": 200}, cfg)["message"]
    assert "set tuning.kind (full -> lora)" in message
    assert "set train.early_stopping.enabled (false -> true)" in message
    assert "lower train.max_steps (200 -> 50)" in message


def test_forgetting_advice_follows_the_regime_already_in_use(tmp_path):
    single = advice.render(advice.forgetting(config(tmp_path, "lora", objective="clm")))
    assert "set regime.kind (single -> continual)" in single
    cont = advice.forgetting(config(tmp_path, "lora", "regime={kind: continual, replay: {fraction: 0.2}, "
                                                      "penalty: {kind: l2sp, weight: 0.01}}", objective="clm"))
    text = advice.render(cont)
    assert "regime.kind" not in text  # it already is continual
    assert "raise regime.penalty.weight (0.01 -> 0.1)" in text and "raise regime.replay.fraction (0.2 -> 0.4)" in text


def test_the_forgetting_warning_advises_from_the_run(tmp_path):
    from tunesmith.evaluate.forgetting import Probe, compare

    cfg = config(tmp_path, "lora", "train.lr=1e-4", objective="clm")
    probe = Probe([{"input_ids": [1, 2]}], "causal-lm", ["general"], 2)
    out = compare({"perplexity": 10.0, "loss": 2.30}, {"perplexity": 20.0, "loss": 3.0}, cfg.eval.forgetting, probe,
                  cfg)
    assert out["warning"]
    assert "lower tuning.r (16 -> 8)" in out["message"] and "lower train.lr (0.0001 -> 5e-05)" in out["message"]
    assert "set regime.kind (single -> continual) and regime.replay.fraction 0.2" in out["message"]
    assert "lora" not in out["message"].replace("tuning.", "")
    assert {"key": "tuning.r", "now": 16, "to": 8} in out["advice"]


def test_no_better_than_base_advises_from_the_run(tmp_path):
    from tunesmith.evaluate.diagnose import _underfitting

    cfg = config(tmp_path, "lora", "train.lr=1e-4")
    base, tuned = {"validation": {"accuracy": 0.6}}, {"validation": {"accuracy": 0.5}}
    found = _underfitting([], [], {"train_rows": 500}, cfg, "accuracy", "max", base, tuned, None, overfit=False)
    assert "raise train.lr (0.0001 -> 0.001), raise train.epochs (3 -> 6), or raise tuning.r (16 -> 32)" \
        in found[0]["suggestion"]
    found = _underfitting([], [], {"train_rows": 500}, cfg, "accuracy", "max", base, tuned, None, overfit=True)
    assert "lower tuning.r (16 -> 8)" in found[0]["suggestion"] and "add training rows (now 500)" in found[0]["suggestion"]
    assert "lora" not in found[0]["suggestion"].replace("tuning.", "")
