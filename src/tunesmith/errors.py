"""User-facing errors.

A `TunesmithError` is bad input, not a bug: the CLI prints it as one short message (where it
happened, what was wrong, what to do) and exits with status 2, never with a traceback.
"""

from __future__ import annotations


class TunesmithError(Exception):
    """Bad input or environment, reported to the user without a traceback.

    where: the place to look (`config.yaml:12 (train.lr)`, `data/train.jsonl:5`), if known.
    hint:  what to do about it, if there is something obvious.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(TunesmithError):
    """The run config is invalid (unknown key, wrong type, impossible combination)."""


class DataError(TunesmithError):
    """The data cannot be read or does not fit the objective."""


class ModelError(TunesmithError):
    """The model cannot be found or loaded."""
