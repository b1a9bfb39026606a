"""Every pullable sample by name: `tunesmith pull NAME`, or `sample:NAME` in a config."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .cache import Sample
from .data.samples import DATASETS
from .errors import TunesmithError
from .models.samples import MODELS

SAMPLES: dict[str, Sample] = {**MODELS, **DATASETS}


def get(name: str, kind: str | None = None) -> Sample:
    pool = {k: s for k, s in SAMPLES.items() if kind is None or s.kind == kind}
    if name not in pool:
        import difflib

        close = difflib.get_close_matches(name, pool, n=1)
        raise TunesmithError(
            f"no {kind or ''} sample named {name!r}".replace("  ", " "),
            hint=(f"did you mean {close[0]!r}? " if close else "") + "available: " + ", ".join(sorted(pool)),
        )
    return pool[name]


def pull(name: str, kind: str | None = None, log: Callable[[str], None] = print) -> Path:
    return get(name, kind).pull(log)
