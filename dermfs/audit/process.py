"""Names of calling processes, read from ``/proc`` and cached briefly per pid.

Caveats:

- FUSE reports the calling thread's id, so the name is that thread's ``comm``.
- Safe to call from several threads; two may read ``/proc`` for the same pid at once.
- A pid can be reused within the cache's lifetime (one second by default); the cost of
  that is a wrong name for a record made in that second, which we accept for not reading
  ``/proc`` on every request.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_TTL = 1.0
DEFAULT_MAX_ENTRIES = 1024


class ProcessNames:
    """Looks up ``(comm, exe)`` of a pid, best effort, with a short per-pid cache."""

    def __init__(
        self,
        proc: Path = Path("/proc"),
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proc = proc
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[int, tuple[float, str | None, str | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, pid: int) -> tuple[str | None, str | None]:
        """Return the process name and executable of *pid*; ``None`` for what is unknown.

        Pid 0 (a request the kernel made itself) and a process that has gone give
        ``(None, None)``.
        """
        if pid <= 0:
            return None, None

        now = self._clock()
        cached = self._cache.get(pid)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]

        comm = self._read_comm(pid)
        exe = self._read_exe(pid)
        with self._lock:
            if len(self._cache) >= self._max_entries:
                self._evict(now)
            self._cache[pid] = (now + self._ttl, comm, exe)
        return comm, exe

    def _read_comm(self, pid: int) -> str | None:
        try:
            data = (self._proc / str(pid) / "comm").read_bytes()
        except OSError:
            return None
        return data.rstrip(b"\n").decode("utf-8", "surrogateescape") or None

    def _read_exe(self, pid: int) -> str | None:
        try:
            return os.readlink(self._proc / str(pid) / "exe")
        except OSError:
            return None

    def _evict(self, now: float) -> None:
        """Drop expired entries; if none had expired, drop the oldest half."""
        expired = [pid for pid, entry in self._cache.items() if entry[0] <= now]
        for pid in expired:
            del self._cache[pid]
        if len(self._cache) >= self._max_entries:
            for pid in list(self._cache)[: self._max_entries // 2]:
                del self._cache[pid]
