"""How tasks are scheduled. One module per regime; `tunesmith/axes.py` (`Regime`, `RegimeHooks`) says what each
module provides.

A regime that orchestrates several trainings (a task sequence, meta-learning episodes) has its run layer in
flows/ (the regime module stays a leaf: it never imports the loop or the artifacts)."""

from . import continual, meta, multitask, single

REGIMES = {
    "single": single,
    "continual": continual,
    "meta": meta,
    "multitask": multitask,
}

DEFAULT = "single"
"""The regime of a config that names none."""
