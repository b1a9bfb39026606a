"""Trivial baselines beside base and tuned (evaluate/baselines.py), the underfitting warning that names them, and
ties on the watched metric broken by the validation loss."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest

from tunesmith.axes import improves
from tunesmith.cli import main
from tunesmith.evaluate import baselines
from tunesmith.evaluate.diagnose import diagnose
from tunesmith.objectives import classify, reward
from tunesmith.objectives.common import Prepared
from tiny import classify_config, sentiment_rows, write_jsonl


def read(run, name="summary.json"):
    return json.loads((run / name).read_text())


def toy(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Token id rows whose class (60% class 0) is set by one id among random fillers: separable by a bag of words."""
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        y = 0 if rng.random() < 0.6 else 1
        row = [rng.randrange(10, 100) for _ in range(rng.randint(3, 10))]
        row.insert(rng.randrange(len(row) + 1), 5 if y == 0 else 6)
        ids.append(row)
        labels.append(y)
    return ids, labels


def test_majority_baseline_predicts_the_commonest_train_label_with_its_share_as_loss():
    top, out = baselines.majority([1, 1, 1, 0], [0, 1, 1, 2], num_classes=3)
    assert top == 1 and out["pred"] == [1, 1, 1, 1] and out["label"] == [0, 1, 1, 2]
    # add-one shares over 4 train labels and 3 classes: 0 -> 2/7, 1 -> 4/7, 2 (unseen) -> 1/7
    assert out["loss"] == pytest.approx([-math.log(2 / 7), -math.log(4 / 7), -math.log(4 / 7), -math.log(1 / 7)])


def test_bag_of_words_beats_majority_on_a_separable_set_and_is_seeded():
    train, test = toy(1000, 0), toy(100, 1)
    _, maj = baselines.majority(train[1], test[1], 2)
    bow, seconds = baselines.bag_of_words(*train, {"test": test}, 2, seed=0)
    def acc(o):
        return sum(p == y for p, y in zip(o["pred"], o["label"])) / len(o["label"])

    assert acc(maj) == pytest.approx(test[1].count(0) / 100)
    assert acc(bow["test"]) >= 0.9 > acc(maj) + 0.2
    assert sum(bow["test"]["loss"]) < sum(maj["loss"])
    again, _ = baselines.bag_of_words(*train, {"test": test}, 2, seed=0)
    assert again["test"]["loss"] == bow["test"]["loss"]


def test_bag_of_words_is_skipped_with_the_reason_when_it_would_not_be_cheap(monkeypatch):
    monkeypatch.setattr(baselines, "MAX_TRAIN_POSITIONS", 100)
    with pytest.raises(baselines.Skipped, match="unigram and bigram positions"):
        baselines.bag_of_words(*toy(20, 0), {"test": toy(5, 1)}, 2, seed=0)
    prepared = _prepared(toy(20, 0), toy(5, 1))
    found = classify.baselines(prepared, classify.Config(), seed=0)
    assert "skipped" in found["bag_of_words"] and "test" not in found["bag_of_words"]
    assert "test" in found["majority"]


def _prepared(train, test) -> Prepared:
    def rows(part):
        return [{"input_ids": x, "labels": y} for x, y in zip(*part)]

    return Prepared({"train": rows(train), "test": rows(test)}, {"id2label": {0: "neg", 1: "pos"}})


def test_classify_names_its_baselines_and_scores_them_with_its_own_metrics():
    found = classify.baselines(_prepared(toy(1000, 0), toy(100, 1)), classify.Config(), seed=0)
    assert set(found) == {"majority", "bag_of_words"}
    assert found["majority"]["about"] == "always predicting 'neg'"
    assert set(found["majority"]["test"]) == set(classify.METRICS)
    assert found["bag_of_words"]["test"]["accuracy"] > found["majority"]["test"]["accuracy"]


def test_reward_baseline_is_chance():
    prepared = Prepared({"train": [{}] * 4, "validation": [{}] * 3})
    found = reward.baselines(prepared, reward.Config(), seed=0)
    assert found["chance"]["validation"] == {"accuracy": 0.5, "margin": 0.0, "loss": pytest.approx(math.log(2))}


# --- in a run: the table, the summary, the warning ----------------------------------------------------


def test_a_run_shows_its_baselines_in_the_table_and_the_summary(in_tmp, tiny_bert, sentiment_dir, capsys):
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(cfg), "train.max_steps=24"]) == 0
    summary = read(in_tmp / "runs" / "tiny")
    test_labels = [json.loads(line)["label"] for line in (sentiment_dir / "test.jsonl").read_text().splitlines()]
    train_labels = [json.loads(line)["label"] for line in (sentiment_dir / "train.jsonl").read_text().splitlines()]
    top = max(sorted(set(train_labels)), key=train_labels.count)
    maj = summary["baselines"]["majority"]
    assert maj["about"] == f"always predicting {top!r}"
    assert maj["test"]["accuracy"] == pytest.approx(test_labels.count(top) / len(test_labels))
    assert set(maj) == {"about", "validation", "test"}
    assert summary["baselines"]["bag_of_words"]["test"]["accuracy"] > 0.5
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("test ") and "tuned" in line)
    assert header.split() == ["test", "majority", "bag_of_words", "base", "tuned"]
    row = next(line for line in out.splitlines() if line.startswith("accuracy "))
    assert row.split()[1] == f"{maj['test']['accuracy']:.4f}"


def test_a_run_that_learned_nothing_is_told_it_is_no_better_than_the_majority(in_tmp, tiny_bert):
    """A learning rate too small to move anything on 80% 'pos' data: the tuned model is the random base, and
    however its head splits the rows it cannot beat always predicting 'pos'."""
    rng = random.Random(5)

    def skewed(n, seed):
        return [dict(r, label="pos" if rng.random() < 0.8 else "neg") for r in sentiment_rows(n, seed)]

    d = in_tmp / "skewed"
    for split, n, seed in (("train", 64, 1), ("validation", 32, 2), ("test", 40, 3)):
        write_jsonl(d / f"{split}.jsonl", skewed(n, seed))
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, d)
    assert main(["train", str(cfg), "train.lr=1e-12", "train.max_steps=8", "train.eval_every=4"]) == 0
    summary = read(in_tmp / "runs" / "tiny")
    maj = summary["baselines"]["majority"]["test"]["accuracy"]
    warning = next(w for w in summary["diagnosis"]["warnings"] if "baseline" in w)
    assert (f"tuned test accuracy {summary['test']['accuracy']:.4f} is no better than always predicting 'pos' "
            f"(majority baseline {maj:.4f})") in warning
    assert "then raise train.lr (1e-12 -> " in warning  # the low end of the tuning's usual range


def _cfg(**train):
    return SimpleNamespace(train=SimpleNamespace(**{"lr": 1e-3, "epochs": 2, "max_steps": None, "weight_decay": 0.0,
                                                    **train},
                                                 early_stopping=SimpleNamespace(enabled=True, patience=3)))


def test_validation_at_the_majority_rate_at_every_evaluation_is_an_underfitting_warning():
    """The issue's head-only run: tuned test accuracy above a random base, validation stuck on one class."""
    trivial = {"majority": {"about": "always predicting 'neg'", "validation": {"accuracy": 0.625},
                            "test": {"accuracy": 0.6}},
               "bag_of_words": {"about": "a logistic regression", "validation": {"accuracy": 0.7},
                                "test": {"accuracy": 0.75}}}
    history = [{"step": s, "split": "validation", "accuracy": 0.625, "loss": 0.69 - s / 1000, "train_loss": 0.7}
               for s in (10, 20, 30)]
    trained = {"steps": 30, "best_step": 10, "best_metric": {"accuracy": 0.625}}
    base, results = {"validation": {"accuracy": 0.4}}, {"validation": {"accuracy": 0.625}, "test": {"accuracy": 0.7}}
    diag = diagnose(history, trained, _cfg(), "accuracy", "max", base, results, None, trivial)
    found = " | ".join(u["finding"] for u in diag["underfitting"])
    assert "validation accuracy sat at 0.6250, the majority baseline's (always predicting 'neg'), at all 3" in found
    # test accuracy 0.7 beats the majority but not the bag of words: the best trivial baseline is named
    assert "tuned test accuracy 0.7000 is no better than a logistic regression (bag_of_words baseline 0.7500)" in found
    assert "raise train.epochs (2 -> 4)" in diag["warnings"][-1]
    # one evaluation off the rate, and a tuned model above every baseline: nothing to say
    history[1]["accuracy"] = 0.65
    results["test"]["accuracy"] = 0.8
    diag = diagnose(history, trained, _cfg(), "accuracy", "max", base, results, None, trivial)
    assert not any("baseline" in u["finding"] for u in diag["underfitting"])
    # below both: both named, the weakest first
    results["test"]["accuracy"] = 0.55
    diag = diagnose(history, trained, _cfg(), "accuracy", "max", base, results, None, trivial)
    assert ("tuned test accuracy 0.5500 is no better than always predicting 'neg' (majority baseline 0.6000), "
            "nor than a logistic regression (bag_of_words baseline 0.7500)") in diag["warnings"][-1]


# --- ties on the watched metric ---------------------------------------------------------------------


def test_a_tie_on_the_watched_metric_goes_to_the_lower_loss():
    assert improves("max", 0.8, 0.8, 0.0, loss=0.4, best_loss=0.5)
    assert not improves("max", 0.8, 0.8, 0.0, loss=0.6, best_loss=0.5)
    assert not improves("max", 0.79, 0.8, 0.0, loss=0.1, best_loss=0.5)  # a worse score never wins on loss
    assert improves("max", 0.805, 0.8, 0.01, loss=0.4, best_loss=0.5)  # within min_delta: a tie
    assert not improves("max", 0.805, 0.8, 0.01, loss=0.6, best_loss=0.5)
    assert improves("min", 1.0, 1.0, 0.0, loss=0.4, best_loss=0.5)
    assert improves("max", 0.9, 0.8, 0.0, loss=0.9, best_loss=0.5)  # better on the metric wins whatever the loss
    assert not improves("max", 0.8, 0.8, 0.0)  # no losses: a tie keeps the first


def test_early_stopping_restores_the_later_of_two_tied_evaluations_when_its_loss_is_lower(in_tmp, tiny_bert,
                                                                                          sentiment_dir, monkeypatch):
    """Validation accuracy ties at every evaluation (scripted) while the validation loss is lowest at the second:
    that evaluation is the best, and the run ends with its weights (read back by scoring the restored model)."""
    import tunesmith.train.loop as loop

    real = loop.evaluate
    script = iter([(0.5, 0.70), (0.5, 0.50), (0.5, 0.60), (0.5, 0.65)])
    seen = []

    def scripted(model, *args, **kwargs):
        scores = real(model, *args, **kwargs)
        seen.append(scores)  # the real scores of the weights at this evaluation
        accuracy, loss = next(script)
        return {**scores, "accuracy": accuracy, "loss": loss}

    monkeypatch.setattr(loop, "evaluate", scripted)
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(cfg), "train.max_steps=40", "train.eval_every=4",
                 "train.early_stopping={metric: accuracy, patience: 2}"]) == 0
    summary = read(in_tmp / "runs" / "tiny")
    assert summary["train"]["stopped_early"] and summary["train"]["steps"] == 16
    assert summary["train"]["best_step"] == 8 and summary["train"]["restored_best"]
    # the final validation scores are the real ones of step 8's weights, not of step 4's or the last
    assert summary["validation"]["loss"] == pytest.approx(seen[1]["loss"], rel=1e-6)
    assert seen[1]["loss"] != pytest.approx(seen[0]["loss"], rel=1e-6)
    assert seen[1]["loss"] != pytest.approx(seen[3]["loss"], rel=1e-6)


def test_patience_running_out_at_the_last_evaluation_is_not_an_early_stop(in_tmp, tiny_bert, sentiment_dir,
                                                                         monkeypatch, capsys):
    """The last of 16 steps is the second evaluation without improvement (patience 2): every step was trained,
    so the run says so instead of "stopped early at step 16 of 16"."""
    import tunesmith.train.loop as loop

    real = loop.evaluate
    script = iter([(0.50, 0.5), (0.70, 0.5), (0.60, 0.5), (0.65, 0.5)])  # (accuracy, loss)

    def scripted(model, *args, **kwargs):
        accuracy, loss = next(script)
        return {**real(model, *args, **kwargs), "accuracy": accuracy, "loss": loss}

    monkeypatch.setattr(loop, "evaluate", scripted)
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(cfg), "train.max_steps=16", "train.eval_every=4",
                 "train.early_stopping={metric: accuracy, patience: 2}"]) == 0
    summary = read(in_tmp / "runs" / "tiny")
    assert summary["train"]["steps"] == 16 and not summary["train"]["stopped_early"]
    assert summary["train"]["best_step"] == 8 and summary["train"]["restored_best"]
    out = capsys.readouterr().out
    assert "ran all 16 steps" in out and "stopped early" not in out
