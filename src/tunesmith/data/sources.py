"""Read rows from files, folders and samples into named splits.

A source is `sample:<name>`, a file (.jsonl .json .csv .tsv .parquet .txt), a folder of split files
(`train.jsonl`, `validation.csv`, ...), or a Hugging Face `datasets` folder (`save_to_disk`).
Every row remembers where it came from, so an error can name `file:line`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


@dataclass
class Split:
    """The rows of one split and where each came from."""

    rows: list[dict]
    source: str
    lines: list[int] | None = field(default=None, repr=False)
    """Line number of each row in `source` (text formats), for error messages."""
    origins: list[str] | None = field(default=None, repr=False)
    """Where each row came from, for rows gathered from several sources (replaces source and lines)."""

    def where(self, i: int) -> str:
        if self.origins is not None:
            return self.origins[i]
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source} (row {i})"

    def subset(self, indices: list[int]) -> "Split":
        lines = [self.lines[i] for i in indices] if self.lines is not None else None
        origins = [self.origins[i] for i in indices] if self.origins is not None else None
        return Split([self.rows[i] for i in indices], self.source, lines, origins)

    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows[:1000]:
            seen.update(dict.fromkeys(row))
        return list(seen)


def read(ref: str) -> dict[str, Split] | Split:
    """One source: a folder or sample gives named splits, a file gives one split."""
    if ref.startswith("sample:"):
        from ..samples import pull

        return read_folder(pull(ref[len("sample:"):], kind="dataset"), label=ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return read_folder(path)
    if not path.exists():
        raise DataError(f"data file not found: {ref}", hint="give a path to a file or folder, or sample:<name>")
    return read_file(path)


def read_folder(path: Path, label: str | None = None) -> dict[str, Split]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _read_hf_folder(path)
    splits = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            found = [path / f"{alias}{s}" for s in SUFFIXES if (path / f"{alias}{s}").exists()]
            if found:
                part = read_file(found[0])
                if label:
                    part.source = f"{label}/{found[0].name}"
                splits[split] = part
                break
    if not splits:
        raise DataError(
            f"no split files in folder {path}",
            hint="name files train.jsonl / validation.jsonl / test.jsonl (or .csv, .json, .parquet, .txt)",
        )
    return splits


def read_file(path: Path) -> Split:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
               ".parquet": _read_parquet, ".txt": _read_txt}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported data file type {path.suffix!r}: {path}",
                        hint="use .jsonl, .json, .csv, .tsv, .parquet or .txt")
    return reader(path)


def _read_jsonl(path: Path) -> Split:
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", where=f"{path}:{n}",
                                hint="each line of a .jsonl file must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", where=f"{path}:{n}")
            rows.append(row)
            lines.append(n)
    return Split(rows, str(path), lines)


def _read_json(path: Path) -> Split:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})", where=f"{path}:{e.lineno}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("expected a list of objects (or an object holding exactly one list)", where=str(path))
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"expected a list of objects, got {type(data).__name__}", where=str(path))
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", where=f"{path} (row {i})")
    return Split(data, str(path))


def _read_csv(path: Path) -> Split:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows, lines = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        start = 2  # line 1 is the header
        for row in reader:
            if None in row:
                raise DataError(f"row has more fields than the header ({len(reader.fieldnames or [])})",
                                where=f"{path}:{start}")
            rows.append(row)
            lines.append(start)
            start = reader.line_num + 1
    return Split(rows, str(path), lines)


def _read_parquet(path: Path) -> Split:
    import pyarrow.parquet as pq

    return Split(pq.read_table(path).to_pylist(), str(path))


def _read_txt(path: Path) -> Split:
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rows.append({"text": line.rstrip("\n")})
                lines.append(n)
    return Split(rows, str(path), lines)


def _read_hf_folder(path: Path) -> dict[str, Split]:
    from datasets import Dataset, DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if isinstance(loaded, Dataset):
        loaded = DatasetDict(train=loaded)
    splits = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in loaded:
                splits[split] = Split(loaded[alias].to_list(), f"{path}[{alias}]")
                break
    return splits
