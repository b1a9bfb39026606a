"""User-facing errors, and the one boundary that turns every failure into a short message.

A `TunesmithError` is bad input, not a bug: the CLI prints it as `error: WHERE: WHAT` plus a `hint:`
line and exits with status 2, never with a traceback. Anything else that escapes a command is a bug:
the CLI prints one line saying so and where the full traceback was written (`bug_log`), and exits 1.
See docs/errors.md.
"""

from __future__ import annotations

import errno
import os
import time
import traceback
from pathlib import Path

EXIT_BAD_INPUT, EXIT_BUG = 2, 1


class TunesmithError(Exception):
    """Bad input or environment, reported to the user without a traceback.

    where: the place to look (`config.yaml:12 (train.lr)`, `data/train.jsonl:5`), if known.
    hint:  what to do about it, if there is something obvious.
    more:  further errors found in the same pass (every bad key of a config is reported at once).
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None,
                 more: list["TunesmithError"] | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        self.more = list(more or [])
        super().__init__(self.render())

    def line(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def render(self) -> str:
        """The text after `error: `: this error, its hint, then each further error on its own `error:` line."""
        text = self.line()
        if self.hint:
            text += f"\n  hint: {self.hint}"
        for other in self.more:
            text += f"\nerror: {other.render()}"
        return text


class ConfigError(TunesmithError):
    """The run config is invalid (unknown key, wrong type, impossible combination)."""


class DataError(TunesmithError):
    """The data cannot be read or does not fit the objective."""


class ModelError(TunesmithError):
    """The model cannot be found or loaded."""


# Errors of the operating system that are about the user's disk or paths, not about tunesmith.
_OS_PROBLEMS = {
    errno.ENOSPC: ("no space left on the device", "free some space (or point output.dir elsewhere) and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free some space (or point output.dir elsewhere) and rerun"),
    errno.EACCES: ("permission denied", "choose a folder you can write to (output.dir) or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to (output.dir)"),
    errno.EROFS: ("the file system is read-only", "point output.dir at a writable folder"),
    errno.ENOTDIR: ("a path component is a file, not a folder", "check the path"),
    errno.EISDIR: ("is a folder, not a file", "check the path"),
    errno.ENAMETOOLONG: ("the file name is too long", "use a shorter name"),
}


def from_os_error(e: OSError) -> TunesmithError | None:
    """An OSError about the user's disk or paths (disk full, permission denied, read-only) as a located
    TunesmithError; None for any other OSError (those stay bugs)."""
    known = _OS_PROBLEMS.get(e.errno)
    if known is None:
        return None
    what, hint = known
    return TunesmithError(what, where=e.filename or None, hint=hint)


def home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith").expanduser()


def bug_log(exc: BaseException, argv: list[str] | None = None) -> Path | None:
    """Write the full traceback of an unexpected error to a log file and return its path: the run folder's
    `error.log` when the run had one (it sets `exc.tunesmith_log`), else `$TUNESMITH_HOME/logs/`."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if argv is not None:
        text = f"tunesmith {' '.join(argv)}\n\n{text}"
    given = getattr(exc, "tunesmith_log", None)
    if given is not None:
        return Path(given)
    try:
        folder = home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(text, encoding="utf-8")
        return path
    except OSError:
        return None
