"""How tasks are scheduled. One module per regime; `tunesmith/axes.py` (`Regime`, `RegimeHooks`) says what each
module provides."""

from . import continual, multitask, single

REGIMES = {
    "single": single,
    "continual": continual,
    "multitask": multitask,
}

DEFAULT = "single"
"""The regime of a config that names none."""
