"""The four pitfalls, end to end on tiny models: leakage refused before a run folder exists, overfitting
stopped and reported, underfitting diagnosed, forgetting measured and reduced by the continual regime."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tunesmith.cli import main
from tiny import FILLER, classify_config, clm_config, patterned_rows, sentiment_rows, write_jsonl


def read(run, name="summary.json"):
    return json.loads((run / name).read_text())


def data_dir(root, train, validation, test, name="data"):
    d = root / name
    write_jsonl(d / "train.jsonl", train)
    write_jsonl(d / "validation.jsonl", validation)
    write_jsonl(d / "test.jsonl", test)
    return d


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    """General-ish text for the probe, replay and EWC: filler words in random order (train and test differ)."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("general")
    for split, n in (("train", 64), ("test", 16)):
        write_jsonl(root / f"{split}.jsonl", [{"text": " ".join(rng.choice(FILLER) for _ in range(24))}
                                             for _ in range(n)])
    return root


# --- leakage -------------------------------------------------------------------------------------


def test_check_finds_leaked_rows_and_train_refuses_before_any_run_folder(in_tmp, tiny_bert, capsys):
    test = sentiment_rows(16, 3)
    train = sentiment_rows(64, 1) + [dict(r, text=r["text"].upper() + " !") for r in test[:3]]
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, data_dir(in_tmp, train, sentiment_rows(16, 2), test))

    assert main(["check", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert "3 test rows have their text in train (exact copies" in err and "data.checks.leakage.exact" in err
    assert "ERROR" in out and "data card" in out  # the report lists the pairs
    assert main(["train", str(cfg)]) == 2
    assert "data checks failed" in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()

    # the drop policy removes the copies from train and says how many, in the data card and the summary
    assert main(["train", str(cfg), "data.checks.leakage.exact=drop", "train.max_steps=2"]) == 0
    run = in_tmp / "runs" / "tiny"
    assert read(run, "data_card.json")["checks"]["dropped"] == {"train": 3}
    assert read(run, "data_card.json")["train"]["rows"] == 64
    assert read(run)["checks"]["dropped"] == {"train": 3}


def test_check_passes_clean_data(in_tmp, tiny_bert, sentiment_dir, capsys):
    assert main(["check", str(classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir))]) == 0
    assert not (in_tmp / "runs").exists()


# --- overfitting and underfitting ------------------------------------------------------------------


def test_overlong_run_stops_early_restores_the_best_and_reports_the_gap(in_tmp, tiny_bert, capsys):
    """Random labels on 32 rows: the model can only memorise, so validation loss rises as training loss falls."""
    rng = random.Random(0)

    def noise(rows):
        return [dict(r, label=rng.choice(["pos", "neg"])) for r in rows]

    d = data_dir(in_tmp, noise(sentiment_rows(32, 1)), noise(sentiment_rows(48, 2)), noise(sentiment_rows(16, 3)))
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, d)
    assert main(["train", str(cfg), "train={epochs: 80, batch_size: 8, lr: 3.0e-3, eval_every: 4, log_every: 2, "
                 "early_stopping: {metric: loss, patience: 3}}"]) == 0
    summary = read(in_tmp / "runs" / "tiny")
    es, over = summary["diagnosis"]["early_stopping"], summary["diagnosis"]["overfitting"]
    assert es["stopped_early"] and es["restored_best"] and summary["train"]["steps"] < 320
    assert summary["validation"]["loss"] == pytest.approx(summary["train"]["best_metric"]["loss"], rel=1e-6)
    assert over["warning"] and "overfitting: validation loss rose" in over["message"]
    gap = summary["diagnosis"]["gap"]
    assert len(gap) >= 4 and gap[-1]["gap"] > gap[0]["gap"]
    assert gap[-1]["train_loss"] < gap[0]["train_loss"]
    out = capsys.readouterr().out
    assert "stopped early at step" in out and "warning: overfitting" in out


def test_a_run_that_barely_learned_is_diagnosed_with_the_change_to_try(in_tmp, tiny_bert, sentiment_dir):
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(cfg), "train.lr=1e-7", "train.max_steps=16", "train.eval_every=8"]) == 0
    diag = read(in_tmp / "runs" / "tiny")["diagnosis"]
    findings = " | ".join(f"{u['finding']} -> {u['suggestion']}" for u in diag["underfitting"])
    assert "training loss barely moved" in findings and "the weights barely changed" in findings
    assert "raise train.lr (1e-07 -> " in findings  # the suggested learning rate
    assert diag["update"]["relative"] < 1e-3
    assert diag["warnings"]


# --- forgetting -----------------------------------------------------------------------------------


def _clm_run(root, model, probe, name, regime=""):
    d = root / "lm"
    if not d.exists():
        data_dir(root, patterned_rows(64, 1), patterned_rows(8, 2), patterned_rows(8, 3), "lm")
    probe_cfg = f"eval: {{forgetting: {{data: [{probe}], max_rows: 16, max_length: 32}}}}\n"
    cfg = clm_config(root / f"{name}.yaml", model, d, extra=regime + probe_cfg)
    assert main(["train", str(cfg), f"name={name}", "train.lr=1e-2", "train.epochs=2"]) == 0
    return read(root / "runs" / name)


def test_forgetting_probe_measures_general_text_before_and_after(in_tmp, tiny_llama, probe_dir):
    summary = _clm_run(in_tmp, tiny_llama, probe_dir, "plain")
    f = summary["forgetting"]
    assert f["measure"] == "perplexity" and "16 texts" in f["probe"]
    assert f["relative"] == pytest.approx(f["after"] / f["before"] - 1, abs=1e-3)
    # "before" is the starting model's perplexity on the probe text, computed here independently
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(tiny_llama), AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    texts = [json.loads(l)["text"] for l in (probe_dir / "test.jsonl").read_text().splitlines()]
    total = count = 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text, truncation=True, max_length=32)["input_ids"]])
            logits = model(ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert f["before"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-4)
    # training on narrow patterned text costs the model its (random-text) general ability
    assert f["relative"] > 0.1 and f["warning"] and "forgetting general knowledge" in f["message"]


def test_replay_l2sp_and_ewc_reduce_forgetting(in_tmp, tiny_llama, probe_dir):
    plain = _clm_run(in_tmp, tiny_llama, probe_dir, "plain")["forgetting"]["relative"]
    replay = _clm_run(in_tmp, tiny_llama, probe_dir, "replay",
                      f"regime: {{kind: continual, replay: {{fraction: 0.3, data: [{probe_dir}]}}}}\n")
    l2sp = _clm_run(in_tmp, tiny_llama, probe_dir, "l2sp",
                    "regime: {kind: continual, penalty: {kind: l2sp, weight: 1.0}}\n")
    ewc = _clm_run(in_tmp, tiny_llama, probe_dir, "ewc",
                   f"regime: {{kind: continual, penalty: {{kind: ewc, weight: 1.0, fisher_data: [{probe_dir}], "
                   f"fisher_rows: 16}}}}\n")
    assert replay["forgetting"]["relative"] < plain / 2
    assert l2sp["forgetting"]["relative"] < plain / 2
    assert ewc["forgetting"]["relative"] < plain / 2
    card = read(in_tmp / "runs" / "replay", "data_card.json")
    assert card["replay"]["rows"] == round(64 * 0.3 / 0.7)  # replay is 30% of train + replay
    lines = [json.loads(l) for l in (in_tmp / "runs" / "l2sp" / "metrics.jsonl").read_text().splitlines()]
    assert any(l.get("penalty", 0) > 0 for l in lines)


def test_classifier_probe_reports_representation_drift(in_tmp, tiny_bert, sentiment_dir, probe_dir):
    extra = f"eval: {{forgetting: {{data: [{probe_dir}], max_length: 32}}}}\n"
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir, extra=extra)
    assert main(["train", str(cfg), "name=full", "train.max_steps=24"]) == 0
    assert main(["train", str(cfg), "name=head", "tuning={kind: freeze}", "train.max_steps=24"]) == 0
    full, head = (read(in_tmp / "runs" / n)["forgetting"] for n in ("full", "head"))
    assert full["measure"].startswith("representation drift") and 0 < full["drift"] <= 1
    assert full["drift"] == pytest.approx(sum(full["per_layer"]) / len(full["per_layer"]), abs=1e-3)
    assert len(full["per_layer"]) == 3  # embeddings + 2 blocks
    # training only the head leaves the body, and so its representations, exactly as they were
    assert head["drift"] == pytest.approx(0, abs=1e-6) and head["mean_cosine_last_layer"] == pytest.approx(1, abs=1e-6)


def test_ewc_fisher_is_normalised_and_uneven(tiny_llama, probe_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.regimes import continual

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = continual.Config(penalty={"kind": "ewc", "weight": 2.0, "fisher_data": [str(probe_dir)], "fisher_rows": 8})
    anchor = continual.make_penalty(cfg, model, "causal-lm", AutoTokenizer.from_pretrained(tiny_llama), "cpu",
                                    log=lambda _: None)
    fisher = torch.cat([f.flatten() for _, _, f in anchor.items])
    assert fisher.mean().item() == pytest.approx(1.0, rel=1e-4) and fisher.std().item() > 0.5
    assert anchor.value() == 0.0  # at the start
    with torch.no_grad():
        for p, _, _ in anchor.items:
            p.add_(0.1)
    assert anchor.value() == pytest.approx(0.5 * 2.0 * 0.01 * fisher.sum().item(), rel=1e-3)


@pytest.mark.parametrize("regime,message", [
    ("{kind: continual}", "with neither it is the single regime"),
    ("{kind: continual, penalty: {kind: ewc}}", "use l2sp"),
    ("{kind: continual, replay: {fraction: 0.2}}", "name the rows to replay"),
])
def test_continual_config_mistakes(tmp_path, regime, message):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(f"model: sample:minilm-l6\ndata: {{train: x.jsonl}}\nregime: {regime}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_replay_rows_are_seeded_and_a_fraction_of_the_mix(probe_dir):
    from tunesmith.regimes import continual

    cfg = continual.Config(replay={"fraction": 0.2, "data": [str(probe_dir)]})
    a, b = (continual.extra_splits(cfg, train_rows=100, seed=0)["replay"] for _ in range(2))
    c = continual.extra_splits(cfg, train_rows=100, seed=1)["replay"]
    assert len(a.rows) == 25  # 25 / (100 + 25) = 20%
    assert a.rows == b.rows and a.rows != c.rows
    assert a.where(0).startswith(str(probe_dir / "train.jsonl") + ":")  # each row knows its file and line
    # fewer rows in the sources than asked: all of them
    assert len(continual.extra_splits(cfg, train_rows=1000, seed=0)["replay"].rows) == 64


def test_masked_lm_probe_masks_a_fixed_share_and_scores_only_masked_tokens(tiny_bert, probe_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from tunesmith.config import ForgettingConfig
    from tunesmith.data.collate import IGNORE_INDEX
    from tunesmith.evaluate.forgetting import load_probe, measure

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    cfg = ForgettingConfig(data=[str(probe_dir)], max_length=32)
    probe = load_probe(cfg, tok, "masked-lm")
    assert probe.examples == load_probe(cfg, tok, "masked-lm").examples  # the same mask every time
    for ex in probe.examples:
        targets = [i for i, y in enumerate(ex["labels"]) if y != IGNORE_INDEX]
        assert len(targets) == round(0.15 * (len(ex["input_ids"]) - 2))  # [CLS] and [SEP] are never masked
        assert all(ex["input_ids"][i] == tok.mask_token_id for i in targets)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    scores = measure(model, probe, tok.pad_token_id, 8, "cpu")
    assert scores["perplexity"] == pytest.approx(torch.tensor(scores["loss"]).exp().item(), rel=1e-5)
    assert 1 < scores["perplexity"] < 10 * len(tok)  # a random model: about the vocabulary size


def test_probe_longer_than_the_model_reads_is_cut_to_its_positions(tiny_bert):
    """eval.forgetting.max_length (256 by default) may exceed a model's positions (tiny_bert has 128)."""
    from transformers import AutoModelForSequenceClassification

    from tunesmith.evaluate.forgetting import Probe, measure

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    long = {"input_ids": [5] * 200, "attention_mask": [1] * 200}
    out = measure(model, Probe([long, {"input_ids": [6] * 10, "attention_mask": [1] * 10}], "sequence-classification",
                               ["x"], 210), pad_id=0, batch_size=2, device="cpu")
    assert out["features"].shape[:2] == (2, 3)  # both texts, embeddings + 2 blocks


def test_flat_loss_that_rose_first_asks_for_a_lower_learning_rate():
    """A loss that climbs above its start and settles back was pushed too hard: raising lr would be wrong."""
    from types import SimpleNamespace

    from tunesmith.evaluate.diagnose import _underfitting

    cfg = SimpleNamespace(train=SimpleNamespace(lr=1e-3, epochs=1, max_steps=40))
    rose = [{"step": 5, "loss": 4.14}, {"step": 15, "loss": 4.70}, {"step": 40, "loss": 4.27}]
    calm = [{"step": 5, "loss": 4.14}, {"step": 15, "loss": 4.10}, {"step": 40, "loss": 4.05}]
    found = _underfitting(rose, [], {}, cfg, "loss", "min", None, {}, None, overfit=False)
    assert "lower train.lr (0.001 -> 0.0001)" in found[0]["suggestion"] and "step 15" in found[0]["finding"]
    found = _underfitting(calm, [], {}, cfg, "loss", "min", None, {}, None, overfit=False)
    assert "raise train.lr (0.001 -> 0.01)" in found[0]["suggestion"]


def test_flat_loss_reads_a_short_last_log_with_the_one_before():
    """The last log of a run often covers only the steps left at the epoch's end; a 2-step mean must not
    decide that the loss rose (and flip the advice to a lower learning rate)."""
    from types import SimpleNamespace

    from tunesmith.evaluate.diagnose import _even_windows, _underfitting

    cfg = SimpleNamespace(train=SimpleNamespace(lr=5e-4, epochs=1, max_steps=32))
    logs = [{"step": 10, "loss": 1.7067}, {"step": 20, "loss": 1.6897}, {"step": 30, "loss": 1.6296},
            {"step": 32, "loss": 2.0579}]
    windows = _even_windows(logs)
    assert [w["step"] for w in windows] == [10, 20, 32]
    assert abs(windows[-1]["loss"] - (1.6296 * 10 + 2.0579 * 2) / 12) < 1e-9
    found = _underfitting(logs, [], {}, cfg, "loss", "min", None, {}, None, overfit=False)
    assert "over steps 21-32" in found[0]["finding"] and "after rising" not in found[0]["finding"]
    assert "raise train.lr" in found[0]["suggestion"]
    # the same flat training loss with validation loss 6.7% below the base model's: the run learned
    base = {"validation": {"loss": 1.4987}}
    found = _underfitting(logs, [], {}, cfg, "loss", "min", base, {"validation": {"loss": 1.3985}}, None, overfit=False)
    assert not any("barely moved" in f["finding"] for f in found)
    found = _underfitting(logs, [], {}, cfg, "loss", "min", base, {"validation": {"loss": 1.47}}, None, overfit=False)
    assert "barely moved" in found[0]["finding"]
