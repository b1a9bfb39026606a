"""Trivial baselines a tuned model has to beat, scored on the same held-out rows as the base and tuned model.

A new classifier head starts random, so "base 0.36 -> tuned 0.71" can be a model that learned nothing but
the commonest label. These baselines say what the data gives away for free:

  majority      always the commonest train label; its loss is the cross-entropy of the train label shares
  bag_of_words  a logistic regression on hashed unigram + bigram counts of the train token ids, trained
                here with torch in a few seconds (seeded), skipped with the reason when it would not be cheap
  chance        a preference model that cannot tell chosen from rejected: every pair a tie

Each function returns per-example outputs in the shape of an objective's `eval_step` (e.g. pred, label,
loss), so the objective turns them into its own metrics; which baselines apply is the objective's call
(its `baselines` hook, see axes.py).
"""

from __future__ import annotations

import math
import time
from collections import Counter

import torch
import torch.nn.functional as F

BUCKETS = 2**18
"""Most hash buckets for the unigram and bigram features (fewer for a small train set, or when there are many
classes: see MAX_WEIGHTS)."""
MAX_WEIGHTS = 2**24
"""Most weights (buckets x classes) of the bag-of-words model: 64 MB of float32."""
MAX_TRAIN_POSITIONS = 4_000_000
"""Most unigram + bigram positions of train the bag-of-words model reads (20k rows of 100 tokens): beyond
it the features alone outgrow "a few seconds on a CPU", so the baseline is skipped with this reason."""
STEPS, BATCH, LR = 200, 256, 0.01
"""Adam steps, rows per step, step size: on the 10k-row sentiment sample more steps or a larger step make the
model overconfident (held-out loss above the majority baseline's) without raising its accuracy."""


class Skipped(Exception):
    """A baseline that would not be cheap here; the message says why."""


def majority(train_labels: list[int], labels: list[int], num_classes: int) -> tuple[int, dict[str, list]]:
    """(the commonest train label, outputs {pred, label, loss} on `labels`). The loss reads the train label
    shares, add-one smoothed so a class absent from train costs a finite loss."""
    counts = Counter(train_labels)
    top = max(range(num_classes), key=lambda c: (counts[c], -c))  # ties go to the first class
    total = len(train_labels) + num_classes
    nll = [-math.log((counts[y] + 1) / total) for y in labels]
    return top, {"pred": [top] * len(labels), "label": list(labels), "loss": nll}


def _features(rows: list[list[int]], buckets: int) -> list[torch.Tensor]:
    """Per sequence, its hashed unigram and bigram indices (bigrams keyed apart from unigrams), built in one pass."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    x = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    same_row = row[:-1] == row[1:]  # a bigram never spans two sequences
    keys = torch.cat([x, ((x[:-1] + 1) * (1 << 20) + x[1:])[same_row]])  # vocabularies are below 2**20 ids
    owner = torch.cat([row, row[:-1][same_row]])
    order = torch.argsort(owner, stable=True)
    index = torch.remainder(keys[order] * 2654435761, buckets)  # Knuth's multiplicative hash (int64 wraps alike)
    return list(torch.split(index, torch.bincount(owner, minlength=len(rows)).tolist()))


def _bag(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """EmbeddingBag inputs (flat indices, offsets) for some sequences' features."""
    offsets = torch.tensor([0] + [len(f) for f in feats[:-1]], dtype=torch.long).cumsum(0)
    return torch.cat(feats), offsets


def bag_of_words(train_ids: list[list[int]], train_labels: list[int], held_out: dict[str, tuple[list, list]],
                 num_classes: int, seed: int) -> tuple[dict[str, dict[str, list]], float]:
    """A logistic regression on hashed unigram + bigram counts, trained on train, scored on each held-out split:
    ({split: outputs {pred, label, loss}}, seconds taken). `held_out`: {split: (token id lists, labels)}.
    Raises `Skipped` when it would not be cheap.

    It takes STEPS Adam steps over seeded shuffles of train, whatever its size: hundreds of passes over a small
    set, a few over 20k rows, a few seconds either way."""
    positions = sum(2 * len(ids) for ids in train_ids)
    if positions > MAX_TRAIN_POSITIONS:
        raise Skipped(f"train holds {positions:,d} unigram and bigram positions, over the {MAX_TRAIN_POSITIONS:,d} "
                      "that keep this baseline to a few seconds")
    most = 1 << int(math.log2(MAX_WEIGHTS // max(num_classes, 1)))
    if most < 1024:
        raise Skipped(f"{num_classes} classes leave too few feature buckets for a cheap model")
    # about two buckets per train position, so a small set gets a small table (each step's cost grows with it)
    buckets = min(BUCKETS, most, max(1024, 1 << math.ceil(math.log2(max(positions, 1) * 2))))
    tick = time.perf_counter()
    feats = _features(train_ids, buckets)
    gen = torch.Generator().manual_seed(seed)
    # sparse gradients: a step touches only the batch's buckets (a dense Adam step over them all costs more)
    bag = torch.nn.EmbeddingBag(buckets, num_classes, mode="sum", sparse=True)
    torch.nn.init.zeros_(bag.weight)  # a plain logistic regression starts at zero; the seed orders the batches
    bias = torch.nn.Parameter(torch.zeros(num_classes))
    opts = [torch.optim.SparseAdam([bag.weight], lr=LR), torch.optim.Adam([bias], lr=LR)]
    targets = torch.tensor(train_labels)
    order: list[int] = []
    with torch.enable_grad():
        for _ in range(STEPS):
            if len(order) < min(BATCH, len(feats)):
                order += torch.randperm(len(feats), generator=gen).tolist()
            rows, order = order[:BATCH], order[BATCH:]
            loss = F.cross_entropy(bag(*_bag([feats[i] for i in rows])) + bias, targets[rows])
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
    out = {}
    with torch.no_grad():
        for split, (ids, labels) in held_out.items():
            logits = bag(*_bag(_features(ids, buckets))) + bias
            out[split] = {"pred": logits.argmax(-1).tolist(), "label": list(labels),
                          "loss": F.cross_entropy(logits, torch.tensor(labels), reduction="none").tolist()}
    return out, time.perf_counter() - tick


def chance_pairs(n: int) -> dict[str, list]:
    """A preference model that scores every answer alike: `n` ties (chosen and rejected rewards 0; the
    Bradley-Terry loss of a tie is log 2)."""
    return {"chosen": [0.0] * n, "rejected": [0.0] * n, "loss": [math.log(2)] * n}
