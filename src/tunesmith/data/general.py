"""General-domain text beside the task data: the forgetting probe, replay rows and EWC's Fisher data.

Sources are named like data sources (`sample:wiki-demo`, a file, a folder); from a folder or sample
one split is taken (the probe reads held-out `test` text, replay and Fisher read `train` text, so
what is mixed into training is never what the probe scores).
"""

from __future__ import annotations

import random

from ..errors import DataError
from .collate import IGNORE_INDEX
from .sources import Split, read

MASK_SHARE = 0.15
"""Share of tokens masked when a masked LM is scored (as in BERT's pretraining)."""


def read_rows(refs: list[str], split: str, where: str, max_rows: int | None = None) -> Split:
    """Rows of `split` from each source (at most `max_rows` per source, from its start), as one Split."""
    rows, origin = [], []
    for ref in refs:
        found = read(ref)
        if isinstance(found, dict):
            if split not in found:
                raise DataError(f"{ref} has no {split} split (found: {', '.join(found)})", where=where)
            found = found[split]
        part = found.rows[:max_rows] if max_rows else found.rows
        rows += part
        origin += [found.where(i) for i in range(len(part))]
    if not rows:
        raise DataError(f"no rows in {', '.join(refs) or '(no sources)'}", where=where)
    return Split(rows, " + ".join(refs), None, origin)


def texts_of(part: Split, where: str) -> list[str]:
    texts = []
    for i, row in enumerate(part.rows):
        if not isinstance(row.get("text"), str):
            raise DataError(f"row has no 'text' string; columns found: {', '.join(row)}", where=part.where(i),
                            hint=f"{where} takes plain text rows with a 'text' column")
        if row["text"].strip():
            texts.append(row["text"])
    return texts


def lm_examples(tokenizer, texts: list[str], max_length: int, head: str, seed: int = 0) -> list[dict]:
    """Token ids with language-model targets for `head`: every next token (causal-lm), or a fixed,
    seeded 15% of tokens masked (masked-lm); for a classifier, ids only (its body is probed)."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ids = [x for x in ids if len(x) > 1]
    if head == "causal-lm":
        return [{"input_ids": x, "labels": list(x)} for x in ids]
    if head == "masked-lm":
        rng, special = random.Random(seed), set(tokenizer.all_special_ids)
        out = []
        for x in ids:
            labels, masked = [IGNORE_INDEX] * len(x), list(x)
            candidates = [i for i, t in enumerate(x) if t not in special]
            for i in rng.sample(candidates, max(1, round(MASK_SHARE * len(candidates)))) if candidates else []:
                labels[i], masked[i] = x[i], tokenizer.mask_token_id
            out.append({"input_ids": masked, "labels": labels})
        return out
    return [{"input_ids": x} for x in ids]
