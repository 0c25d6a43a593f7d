"""Calling ``flush()`` once a second: as a trio task, or in a plain thread.

The mount runs :func:`flush_periodically` in its nursery: each flush runs in a worker
thread (``trio.to_thread.run_sync``), so an fsync never blocks the event loop. Tools that
write a few records outside trio (rekey, rewrap) can use :class:`PeriodicFlusher`, or just
call ``flush()`` and ``close()`` themselves. Either way, ``close()`` flushes at the end.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import trio

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0


class Flushable(Protocol):
    """What the flushers need: the journal's ``flush()``."""

    def flush(self) -> bool: ...


async def flush_periodically(journal: Flushable, interval: float = DEFAULT_INTERVAL) -> None:
    """Flush *journal* every *interval* seconds until cancelled.

    Cancel it (its nursery's cancel scope) before calling ``journal.close()``. A flush
    already running in its worker thread is not abandoned: the task returns after it.
    """
    while True:
        await trio.sleep(interval)
        await trio.to_thread.run_sync(journal.flush)


class PeriodicFlusher:
    """A daemon thread that flushes a journal every *interval* seconds until stopped."""

    def __init__(self, journal: Flushable, interval: float = DEFAULT_INTERVAL) -> None:
        self._journal = journal
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dermfs-audit-flush", daemon=True)

    def __repr__(self) -> str:
        return f"<PeriodicFlusher every {self._interval}s>"

    def start(self) -> None:
        """Start flushing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop flushing and wait for the thread to end (it does not flush again)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self._journal.flush()
            except Exception:
                log.exception("audit journal: periodic flush failed")
