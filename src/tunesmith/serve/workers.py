"""Model work off the event loop: at most `workers` jobs run at once in threads, at most `queue` more wait,
and a request beyond that is refused at once (`Busy`, answered 429), so a burst cannot pile up unbounded.

A job gets a cancel event: set when its request times out, its client goes away or the server stops;
a waiting job then never starts and a running generation stops at its next token (generating.Halt).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor


class Busy(Exception):
    """Every worker is busy and the queue is full."""


class Workers:
    def __init__(self, workers: int, queue: int):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tunesmith-serve")
        self.limit = workers + queue
        self.admitted = 0
        """Jobs running or waiting; only changed on the event loop's thread, so it needs no lock."""
        self.cancels: set[threading.Event] = set()

    def submit(self, job, cancel: threading.Event) -> asyncio.Future:
        """Start `job()` in a worker (or queue it), or raise Busy. The slot is freed when the job ends, not when
        its request gives up on it: a timed-out generation holds its worker until it has stopped."""
        if self.admitted >= self.limit:
            raise Busy()
        self.admitted += 1
        self.cancels.add(cancel)
        future = asyncio.get_running_loop().run_in_executor(self.pool, job)

        def done(_):
            self.admitted -= 1
            self.cancels.discard(cancel)

        future.add_done_callback(done)
        return future

    async def run(self, job, cancel: threading.Event, timeout: float):
        """`job()`'s result, or asyncio.TimeoutError after `timeout` seconds, waiting included (the job is then
        cancelled)."""
        future = self.submit(job, cancel)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            cancel.set()
            raise

    def close(self) -> None:
        """Cancel every job and wait for the workers to end (server shutdown)."""
        for cancel in list(self.cancels):
            cancel.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
