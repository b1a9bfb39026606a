"""From `data:` in the config to three named splits of rows with canonical column names.

read sources -> rename columns -> carve missing validation/test from train (seeded) -> cap rows
-> refuse empty splits.
"""

from __future__ import annotations

import random

from ..errors import DataError
from .sources import Split, read

SPLITS = ("train", "validation", "test")


def load_splits(data, seed: int) -> dict[str, Split]:
    """Rows for train, validation and test (a split may be absent only if its fraction is 0)."""
    found = read(data.train, data.encoding)
    if isinstance(found, Split):
        splits = {"train": found}
    else:
        if "train" not in found:
            raise DataError(f"{data.train} has no train split (found: {', '.join(found)})", where="data.train")
        splits = dict(found)
        # A folder's own validation/test splits are used unless the config names others.
        for name in ("validation", "test"):
            if getattr(data, name) is not None:
                splits.pop(name, None)
    for name in ("validation", "test"):
        ref = getattr(data, name)
        if ref is None:
            continue
        got = read(ref, data.encoding)
        if isinstance(got, dict):
            if name not in got:
                raise DataError(f"{ref} has no {name} split (found: {', '.join(got)})", where=f"data.{name}")
            got = got[name]
        splits[name] = got

    splits = {k: rename_columns(v, data.columns) for k, v in splits.items()}
    splits = carve(splits, data.split.validation, data.split.test, seed if data.split.seed is None else data.split.seed)
    for name, cap in data.max_rows.items():
        if name in splits and cap is not None and len(splits[name].rows) > cap:
            splits[name] = splits[name].subset(list(range(cap)))
    for name, part in splits.items():
        if not part.rows:
            raise DataError(f"the {name} split is empty", where=part.source,
                            hint="give it rows, or set its fraction under data.split to 0")
    return splits


def rename_columns(part: Split, columns: dict[str, str]) -> Split:
    """Map source column names onto the names the format expects (`columns: {text: review}`)."""
    if not columns or not part.rows:
        return part
    present = part.columns()
    for canonical, source in columns.items():
        if source not in present:
            raise DataError(
                f"column {source!r} (data.columns.{canonical}) not found; columns found: {', '.join(present)}",
                where=part.source,
            )
    rename = {source: canonical for canonical, source in columns.items() if source != canonical}
    if not rename:
        return part
    rows = [{rename.get(k, k): v for k, v in row.items()} for row in part.rows]
    return Split(rows, part.source, part.lines)


def carve(splits: dict[str, Split], validation: float, test: float, seed: int) -> dict[str, Split]:
    """Take the missing held-out splits from a seeded shuffle of train."""
    wanted = {name: frac for name, frac in (("test", test), ("validation", validation))
              if name not in splits and frac > 0}
    if not wanted:
        return splits
    train = splits["train"]
    order = list(range(len(train.rows)))
    random.Random(seed).shuffle(order)
    out = dict(splits)
    start = 0
    for name, frac in wanted.items():
        n = max(1, round(len(order) * frac))
        if start + n >= len(order):
            raise DataError(
                f"train has {len(order)} rows, too few to carve a {name} split of {frac:.0%}",
                where=train.source, hint=f"add rows, give data.{name} explicitly, or set data.split.{name}: 0",
            )
        out[name] = train.subset(sorted(order[start:start + n]))
        start += n
    out["train"] = train.subset(sorted(order[start:]))
    return out
