"""No scoring on trained rows: the data given to `tunesmith eval RUN --data` or `compare BASE RUN --data`, checked
against the rows the run trained on, with the training checks' own functions (data/checks.py).

  exact   every row's views (the whole example, its prompt) normalised and digested, looked up in the run
          folder's train_rows.json (written at train time)
  near    the run's training split read again from its config (when its data is still there), narrowed to the
          rows the record holds, and the leakage check of training run between it and the data

Rows found are left out by default, with the count said; `--allow-train-overlap` keeps them with a warning.
A run folder without train_rows.json (older runs, task sequences) is said to be unchecked, once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunesmithError


@dataclass
class Overlap:
    """What the check found for one data set."""

    rows: list[int]
    """Indices of the data's rows that the run trained on."""
    total: int
    """Rows of the data checked."""
    checked: str
    """Which copies were looked for: "exact and near copies", "exact copies" (the training data could not be
    read again), or "" (the run keeps no record of its training rows)."""


def find(trained, part) -> Overlap | None:
    """The rows of `part` (renamed to the run's columns) that the run `trained` trained on; None for a plain
    model folder (no run, no training rows)."""
    from .. import artifacts
    from ..data.checks import near_copies, trained_on

    if trained.cfg is None:
        return None
    path = Path(trained.name) / artifacts.TRAIN_ROWS
    if not path.exists():
        return Overlap([], len(part.rows), "")
    record = artifacts.read_json(path)
    try:
        rows = set(trained_on(record, part))
    except (ValueError, TypeError, AttributeError):  # not the digests tunesmith wrote (binascii.Error is a ValueError)
        raise TunesmithError("damaged file, not the digests of the run's training rows", where=str(path),
                             hint="the run folder is corrupt: train it again") from None
    train = _training_split(trained.cfg, record)
    if train is None:
        return Overlap(sorted(rows), len(part.rows), "exact copies")
    rows |= set(near_copies(train, part, trained.data_cfg.checks.leakage))
    return Overlap(sorted(rows), len(part.rows), "exact and near copies")


def _training_split(cfg, record: dict):
    """The run's train split read again from its config, only the rows the record holds (rows the run's checks
    dropped did not train); None if it cannot be read any more, or the rows come from several tasks."""
    from ..data.checks import trained_on
    from ..data.load import load_splits
    from ..regimes import REGIMES

    if hasattr(REGIMES[cfg.regime.kind], "prepare"):  # its tasks' data: exact copies only
        return None
    try:
        train = load_splits(cfg.data, cfg.train.seed)["train"]
    except (TunesmithError, OSError):
        return None
    return train.subset(trained_on(record, train))


def apply(found: Overlap | None, part, allow: bool, run: str, data: str):
    """`part` without the overlapping rows (all of it with `allow`), and the JSON facts {rows, excluded, checked}
    (None for a plain model folder). Says what happened on stderr; every row overlapping and excluded is an error."""
    if found is None:
        return part, None
    if not found.checked:
        print(f"note: {run} keeps no record of its training rows (no train_rows.json: a run from an older tunesmith, "
              f"or a task sequence), so {data} is not checked against them", file=sys.stderr)
        return part, {"checked": False}
    n, total = len(found.rows), found.total
    info = {"rows": n, "of": total, "excluded": n > 0 and not allow, "checked": found.checked}
    if not n:
        return part, info
    if allow:
        info["warning"] = (f"{n:,d} of {total:,d} rows are rows {run} trained on ({found.checked}): their scores "
                           "flatter the model")
        print(f"warning: {info['warning']}; kept (--allow-train-overlap)", file=sys.stderr)
        return part, info
    if n == total:
        raise TunesmithError(f"every row of {data} ({total:,d}) is a row {run} trained on ({found.checked}), so "
                             "nothing is left to score", where="--data",
                             hint="score held-out data (e.g. the run's test split), or pass --allow-train-overlap "
                                  "to score the trained rows anyway")
    print(f"note: excluded {n:,d} of {total:,d} rows that {run} trained on ({found.checked}); "
          "--allow-train-overlap keeps them", file=sys.stderr)
    skip = set(found.rows)
    return part.subset([i for i in range(total) if i not in skip]), info
