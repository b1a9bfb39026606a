"""Read rows from files, folders and samples into named splits.

A source is `sample:<name>`, a file (.jsonl .json .csv .tsv .parquet .txt), a folder of split files
(`train.jsonl`, `validation.csv`, ...), or a Hugging Face `datasets` folder (`save_to_disk`).
Every row remembers where it came from, so an error can name `file:line`.
"""

from __future__ import annotations

import csv
import io
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


def read(ref: str, encoding: str | None = None) -> dict[str, Split] | Split:
    """One source: a folder or sample gives named splits, a file gives one split. `encoding`: of text files
    (data.encoding); None reads UTF-8 with or without a byte-order mark, and UTF-16/32 with one."""
    if ref.startswith("sample:"):
        from ..samples import pull

        return read_folder(pull(ref[len("sample:"):], kind="dataset"), label=ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return read_folder(path, encoding=encoding)
    if not path.exists():
        raise DataError("data file not found", where=str(path),
                        hint="give a path to a file or folder, or sample:<name>; a relative path in a config file "
                             "is read from the config file's folder")
    return read_file(path, encoding)


def read_folder(path: Path, label: str | None = None, encoding: str | None = None) -> dict[str, Split]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _read_hf_folder(path)
    splits = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            found = [path / f"{alias}{s}" for s in SUFFIXES if (path / f"{alias}{s}").exists()]
            if found:
                part = read_file(found[0], encoding)
                if label:
                    part.source = f"{label}/{found[0].name}"
                splits[split] = part
                break
    if not splits:
        raise DataError(
            "no split files in this folder", where=str(path),
            hint="name files train.jsonl / validation.jsonl / test.jsonl (or .csv, .json, .parquet, .txt)",
        )
    return splits


def read_file(path: Path, encoding: str | None = None) -> Split:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
               ".txt": _read_txt}
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    reader = readers.get(suffix)
    if reader is None:
        raise DataError(f"unsupported data file type {path.suffix!r}: {path}",
                        hint="use .jsonl, .json, .csv, .tsv, .parquet or .txt")
    if not path.is_file():
        raise DataError("not a regular file", where=str(path), hint="give a path to a data file or folder")
    return reader(path, _text(path, encoding))


def _text(path: Path, encoding: str | None) -> str:
    from ..textfile import decode

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or e}", where=str(path)) from None
    hint = ("set data.encoding to the file's encoding (e.g. cp1252, latin-1), or save it as UTF-8"
            if encoding is None else "check data.encoding")
    return decode(raw, str(path), encoding, error=DataError, hint=hint)


def _json(text: str, where: str, hint: str | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = where if ":" in where.rsplit("/", 1)[-1] else f"{where}:{e.lineno}"
        raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", where=line, hint=hint) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"cannot read this JSON value ({str(e)[:120]})", where=where, hint=hint) from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", where=where,
                        hint="rows are flat objects (or messages: lists of {role, content})") from None


def _read_jsonl(path: Path, text: str) -> Split:
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row = _json(line, f"{path}:{n}", hint="each line of a .jsonl file must be one JSON object")
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", where=f"{path}:{n}")
        rows.append(row)
        lines.append(n)
    return Split(rows, str(path), lines)


def _read_json(path: Path, text: str) -> Split:
    data = _json(text, str(path))
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


def _read_csv(path: Path, text: str) -> Split:
    """CSV with standard quoting; TSV without any (a field may start with a quote: `"Sharp" and fun`)."""
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    rows, lines, header, start = [], [], None, 1
    try:
        for record in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(field.strip() for field in record):
                continue
            if header is None:
                header = record
                if len(set(header)) != len(header):
                    raise DataError(f"the header names a column twice: {', '.join(header)}", where=where)
                continue
            if len(record) != len(header):
                what = "more" if len(record) > len(header) else "fewer"
                hint = None
                if tsv and len(header) == 1 and "," in header[0]:
                    hint = "this .tsv file looks comma-separated: rename it to .csv"
                raise DataError(f"row has {len(record)} field{'s' * (len(record) != 1)}, {what} than the header's "
                                f"{len(header)} ({', '.join(header)})", where=where, hint=hint)
            rows.append(dict(zip(header, record)))
            lines.append(int(where.rsplit(":", 1)[1]))
    except csv.Error as e:
        limit = "field larger than field limit" in str(e)
        raise DataError(f"cannot parse: {e}" + (" (fields are limited to 128 KiB)" if limit else ""),
                        where=f"{path}:{reader.line_num}",
                        hint="use .jsonl for long texts" if limit else "check the quoting on this line") from None
    if tsv and header is not None and len(header) == 1 and "," in header[0]:
        raise DataError(f"one column named {header[0]!r}: this .tsv file looks comma-separated", where=f"{path}:1",
                        hint="rename it to .csv (or separate its columns with tabs)")
    return Split(rows, str(path), lines)


def _read_parquet(path: Path) -> Split:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return Split(pq.read_table(path).to_pylist(), str(path))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable parquet file ({str(e)[:200]})", where=str(path),
                        hint="write it with pandas/pyarrow `to_parquet`, or use .jsonl / .csv") from None


def _read_txt(path: Path, text: str) -> Split:
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            rows.append({"text": line.rstrip("\r")})
            lines.append(n)
    return Split(rows, str(path), lines)


def _read_hf_folder(path: Path) -> dict[str, Split]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a damaged folder; all are bad input
        raise DataError(f"not a readable Hugging Face datasets folder ({type(e).__name__}: {str(e)[:200]})",
                        where=str(path), hint="write it with `save_to_disk`, or use split files") from None
    if isinstance(loaded, Dataset):
        loaded = DatasetDict(train=loaded)
    splits = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in loaded:
                splits[split] = Split(loaded[alias].to_list(), f"{path}[{alias}]")
                break
    if not splits:
        raise DataError(f"no train, validation or test split in this datasets folder (found: "
                        f"{', '.join(loaded) or 'none'})", where=str(path), hint="name its splits train / validation / test")
    return splits
