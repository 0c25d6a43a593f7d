"""Per-handle merging of reads and writes into byte ranges (docs/audit.md section 6).

A :class:`HandleLog` belongs to one open file handle. Consecutive contiguous reads (or
writes) extend one range ``[offset, offset + length)``; anything else closes the range
and records it. The journal closes every open range at each flush, and the handle's own
range at release, so no byte is left out and none waits longer than a flush interval.

Concurrency: every method takes the journal's lock (shared by all handles), so the trio
thread can call them while ``flush()`` runs in a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from dermfs.audit.record import OK, Event, RecordClock, result_name


@dataclass(frozen=True, slots=True)
class Who:
    """The caller's identity as it goes into records."""

    uid: int
    gid: int
    pid: int
    process: str | None
    exe: str | None


#: How a handle hands a record to its journal, called with the journal's lock held:
#: ``emit(event, who, path, result, offset, length, time)``.
Emit = Callable[[Event, Who, str | None, str, int | None, int | None, str], None]


class HandleLog:
    """The audit side of one open file handle; made by :meth:`AuditJournal.open_handle`.

    Reads and writes are attributed to the caller that opened the handle: pyfuse3 passes
    no caller to ``read`` and ``write``.
    """

    __slots__ = (
        "_clock",
        "_emit",
        "_end",
        "_forget",
        "_kind",
        "_lock",
        "_path",
        "_released",
        "_start",
        "_time",
        "who",
    )

    def __init__(
        self,
        lock: threading.Lock,
        emit: Emit,
        forget: Callable[[HandleLog], None],
        clock: RecordClock,
        who: Who,
        path: str | None,
    ) -> None:
        self._lock = lock
        self._emit = emit
        self._forget = forget
        self._clock = clock
        self.who = who
        self._path = path
        self._kind: Event | None = None
        self._start = 0
        self._end = 0
        self._time = ""
        self._released = False

    def __repr__(self) -> str:
        return f"<HandleLog pid={self.who.pid}>"

    @property
    def path(self) -> str | None:
        """The path the handle's records carry."""
        return self._path

    def read(self, offset: int, length: int, result: str | int = OK) -> None:
        """Record a read of *length* bytes at *offset* (the bytes actually returned)."""
        self._access(Event.READ, offset, length, result)

    def write(self, offset: int, length: int, result: str | int = OK) -> None:
        """Record a write of *length* bytes at *offset* (the bytes actually written)."""
        self._access(Event.WRITE, offset, length, result)

    def _access(self, kind: Event, offset: int, length: int, result: str | int) -> None:
        result = result_name(result)
        with self._lock:
            if result == OK and kind is self._kind and offset == self._end:
                self._end += length
                return

            self._close_run_locked()
            now = self._clock.now()
            if result != OK or self._released:
                self._emit(kind, self.who, self._path, result, offset, length, now)
                return
            self._kind = kind
            self._start = offset
            self._end = offset + length
            self._time = now

    def moved(self, new_path: str | None) -> None:
        """The open file was renamed: record what was read so far, then use *new_path*."""
        with self._lock:
            self._close_run_locked()
            self._path = new_path

    def release(self) -> None:
        """The handle is released: record its open range. Safe to call twice."""
        with self._lock:
            self._close_run_locked()
            self._released = True
        self._forget(self)

    def close_run_locked(self) -> None:
        """Record the open range, if any; the caller holds the journal's lock."""
        self._close_run_locked()

    def _close_run_locked(self) -> None:
        kind = self._kind
        if kind is None:
            return
        self._kind = None
        length = self._end - self._start
        self._emit(kind, self.who, self._path, OK, self._start, length, self._time)
