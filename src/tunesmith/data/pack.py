"""Packing: several tokenized examples in one sequence, and documents cut into fixed-size blocks.

A packed sequence carries `position_ids` that restart at 0 where each example starts. Causal
models built on transformers' mask utilities (Llama, Mistral, Qwen, Gemma, ...) read restarts as
boundaries and keep attention inside each example, for sdpa, eager and flash attention alike, when
they get no 2-D attention mask and no cache (`objectives/lm.py` calls them so;
`check_packing` there proves it on the model at hand before training). The first token of each
example is not a target: unpacked, nothing precedes it. So the summed loss of a packed sequence
equals the summed loss of its examples run one by one.
"""

from __future__ import annotations

import bisect

from .collate import IGNORE_INDEX


def _join(parts: list[dict]) -> dict:
    ids, labels, positions = [], [], []
    for ex in parts:
        ids += ex["input_ids"]
        labels += [IGNORE_INDEX] + list(ex["labels"][1:])
        positions += range(len(ex["input_ids"]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack(examples: list[dict], capacity: int) -> list[dict]:
    """Best-fit-decreasing bins of at most `capacity` tokens (deterministic), one packed example per bin.

    Longest first, each into the fullest bin it still fits, which leaves little room unused.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        size = len(examples[i]["input_ids"])
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the packing capacity {capacity}")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, b))
    return [_join([examples[i] for i in b]) for b in bins]


def blocks(documents: list[list[int]], size: int, separate: bool) -> list[dict]:
    """Documents (token ids, each already ending with EOS) concatenated and cut into blocks of `size`.

    As in pretraining, nothing is truncated or padded (only the last block is shorter) and a
    document may continue into the next block. With `separate`, attention and targets stay inside
    each document within a block (position ids restart at every document start); without it,
    a block is one sequence, as in GPT-2-style pretraining.
    """
    stream, starts = [], []
    for doc in documents:
        starts.append(len(stream))
        stream += doc
    start_set = set(starts)
    out = []
    for lo in range(0, len(stream), size):
        ids = stream[lo:lo + size]
        if len(ids) < 2:
            continue
        if not separate:
            out.append({"input_ids": ids, "labels": list(ids)})
            continue
        positions, labels, pos = [], [], 0
        for k, tok in enumerate(ids):
            if lo + k in start_set and k > 0:
                pos = 0
            positions.append(pos)
            labels.append(IGNORE_INDEX if pos == 0 else tok)
            pos += 1
        out.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return out
