"""How tasks are scheduled. One module per regime, each with a `Config`."""

from . import single

REGIMES = {
    "single": single,
}
