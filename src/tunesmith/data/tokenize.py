"""Tokenize text with truncation, counting what was cut and how long examples are."""

from __future__ import annotations

import numpy as np


def tokenize_texts(tokenizer, texts: list[str], max_length: int, pairs: list[str] | None = None) -> tuple[list[list[int]], int]:
    """Token ids truncated to `max_length`, and how many examples had to be truncated."""
    full = tokenizer(texts, pairs, truncation=False, add_special_tokens=True)["input_ids"]
    long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                        truncation=True, max_length=max_length)["input_ids"]
        for i, ids in zip(long, cut):
            full[i] = ids
    return full, len(long)


def length_stats(lengths: list[int], bins: int = 20) -> dict:
    """Percentiles and the maximum, and a histogram (`edges`: each bin's lower edge, `counts`) for the report."""
    if not lengths:
        return {"p50": 0, "p95": 0, "max": 0}
    arr = np.asarray(lengths)
    counts, edges = np.histogram(arr, bins=max(1, min(bins, int(arr.max() - arr.min()) + 1)))
    return {"p50": int(np.percentile(arr, 50)), "p95": int(np.percentile(arr, 95)), "max": int(arr.max()),
            "histogram": {"edges": [round(float(e), 1) for e in edges[:-1]], "counts": counts.tolist()}}
