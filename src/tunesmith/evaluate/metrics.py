"""Task metrics, computed from plain lists so they are easy to check by hand."""

from __future__ import annotations

import math
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
