"""Text metrics against values worked out by hand (rouge-score's defaults: no stemming, a-z0-9 tokens)."""

from __future__ import annotations

import pytest

from tunesmith.evaluate.generation import Generation, metric_names, score
from tunesmith.evaluate.metrics import exact_match, rouge_l, rouge_n, text_metrics


def test_rouge_on_a_worked_example():
    pred, ref = "The cat sat on the mat.", "the cat is on the mat"
    # unigrams: the x2, cat, on, mat shared = 5 of 6 each side
    assert rouge_n(pred, ref, 1) == pytest.approx(5 / 6)
    # bigrams: "the cat", "on the", "the mat" shared = 3 of 5 each side
    assert rouge_n(pred, ref, 2) == pytest.approx(3 / 5)
    # longest common subsequence: the cat on the mat = 5
    assert rouge_l(pred, ref) == pytest.approx(5 / 6)
    # precision and recall differ: 2 of 2 predicted words are right, 2 of 4 reference words found
    assert rouge_n("cat mat", "the cat the mat", 1) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rouge_n("", "a b", 1) == 0.0 and rouge_l("x", "") == 0.0


def test_exact_match_normalises_case_punctuation_and_articles():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert text_metrics(["Rome", "Milan"], ["rome", "Rome"], ["exact_match"]) == {"exact_match": 0.5}


def test_exact_match_is_added_only_for_short_references_and_stop_rate_always():
    assert metric_names(["yes", "no", "a short answer"], None) == ["rouge1", "rouge2", "rougeL", "exact_match"]
    assert "exact_match" not in metric_names(["a reference of many more words than ten, a whole summary"], None)
    assert metric_names(["x"], ["rougeL"]) == ["rougeL"]
    gens = [Generation("yes", 2, True), Generation("no no no", 8, False)]
    s = score(gens, ["yes", "no"], ["exact_match"])
    assert s == {"exact_match": 0.5, "stop_rate": 0.5, "new_tokens": 5.0}
