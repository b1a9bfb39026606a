"""Progress output: a live bar on a terminal, one line per log step elsewhere (CI logs, files)."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Steps done out of `total`, with loss, throughput and an ETA."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
        self.total, self.done, self.desc, self.enabled = total, initial, desc, enabled
        self.start, self.start_done = time.perf_counter(), initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **stats) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix(stats, refresh=False)

    def line(self, **stats) -> None:
        """At a log step: the bar shows stats itself; without a bar, print one line."""
        if not self.enabled or self.bar is not None:
            return
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        parts = " ".join(f"{k} {v}" for k, v in stats.items())
        print(f"{self.desc} {self.done}/{self.total} {parts} elapsed {_clock(elapsed)} eta {_clock(eta)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def bar(iterable, desc: str, total: int | None = None):
    """A transient bar for short loops (evaluation), shown only on a terminal."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
