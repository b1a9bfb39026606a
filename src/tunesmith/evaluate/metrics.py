"""Task metrics, computed from plain lists so they are easy to check by hand."""

from __future__ import annotations

import math
import re
import string
from collections import Counter


def accuracy(preds: list, labels: list) -> float:
    if not labels:
        return float("nan")
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds: list, labels: list) -> float:
    """F1 per class, averaged over the classes that occur in labels or predictions (as scikit-learn does)."""
    classes = set(labels) | set(preds)
    if not classes:
        return float("nan")
    tp = Counter(p for p, y in zip(preds, labels) if p == y)
    n_pred, n_true = Counter(preds), Counter(labels)
    scores = []
    for c in classes:
        denom = n_pred[c] + n_true[c]
        scores.append(2 * tp[c] / denom if denom else 0.0)
    return sum(scores) / len(scores)


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if mean_loss < 50 else float("inf")


# ---------------------------------------------------------------------------------------------
# Text metrics for generated answers. ROUGE follows Google's rouge-score package (Lin, 2004) with
# its default tokenizer and no stemming: lowercase, every run of characters other than a-z and 0-9
# splits tokens; F1 per pair, averaged over pairs.


def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_n(pred: str, ref: str, n: int) -> float:
    """ROUGE-N F1: overlap of word n-grams (each counted at most as often as it occurs in both)."""
    def grams(tokens):
        return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))

    p, r = grams(rouge_tokens(pred)), grams(rouge_tokens(ref))
    return _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words, as a share of each side."""
    p, r = rouge_tokens(pred), rouge_tokens(ref)
    return _f1(_lcs(p, r), len(p), len(r))


def normalise_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(pred: str, ref: str) -> float:
    return float(normalise_answer(pred) == normalise_answer(ref))


TEXT_METRICS = {
    "rouge1": lambda p, r: rouge_n(p, r, 1),
    "rouge2": lambda p, r: rouge_n(p, r, 2),
    "rougeL": rouge_l,
    "exact_match": exact_match,
}


def text_metrics(preds: list[str], refs: list[str], names: list[str]) -> dict[str, float]:
    """Each named metric averaged over (prediction, reference) pairs."""
    return {name: sum(TEXT_METRICS[name](p, r) for p, r in zip(preds, refs)) / max(1, len(refs)) for name in names}
