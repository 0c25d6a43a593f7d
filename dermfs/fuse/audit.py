"""The frontend's side of the audit journal (docs/audit.md section 14).

:class:`Auditor` wraps the mount's :class:`~dermfs.audit.AuditJournal`, or nothing when
the journal could not be opened and ``audit.on_failure`` is ``allow``. The handlers call
:meth:`Auditor.admit` before they allow an open, a create or a read (it refuses with
EACCES while the journal cannot be written, records the attempt and a ``denied`` record,
and logs why, at most once a minute), :meth:`Auditor.open_handle` after a successful
open or create, and :meth:`Auditor.done` or :meth:`Auditor.outcome` for the other events.

Paths are plaintext paths inside the mount: they go only into the (encrypted) journal,
never into the log.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dermfs.audit import AuditJournal, AuditUnavailable, Caller, Event, HandleLog
from dermfs.errors import DermfsError, IntegrityError
from dermfs.metadata import TooLongError

log = logging.getLogger(__name__)

#: At most one WARNING about refused requests per this many seconds.
DENIED_LOG_INTERVAL = 60.0


def errno_of(exc: BaseException) -> int:
    """Return the errno the error boundary answers for *exc* (``boundary.boundary``)."""
    if isinstance(exc, IntegrityError):
        return errno.EIO
    if isinstance(exc, TooLongError):
        return errno.ENAMETOOLONG
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    if isinstance(exc, ValueError):
        return errno.EINVAL
    number = getattr(exc, "errno", None)  # pyfuse3.FUSEError
    if isinstance(number, int) and not isinstance(exc, DermfsError):
        return number
    return errno.EIO


class Auditor:
    """The journal as the handlers use it; see the module docstring."""

    def __init__(self, journal: AuditJournal | None) -> None:
        self.journal = journal
        self._last_warning = -DENIED_LOG_INTERVAL
        self._refused_since_warning = 0

    def __repr__(self) -> str:
        return f"<Auditor {self.journal!r}>"

    def admit(
        self,
        event: Event,
        caller: Caller,
        path: str | bytes | None,
        handle_log: HandleLog | None = None,
        offset: int = 0,
        length: int = 0,
    ) -> None:
        """Allow an open, create or read only while the journal can be written.

        A refused read is recorded through *handle_log* (with *offset* and *length*),
        other refusals as *event* with result ``EACCES``; a ``denied`` record follows.

        Raises:
            PermissionError: EACCES, the journal cannot be written and ``on_failure``
                is ``deny``.
        """
        journal = self.journal
        if journal is None:
            return
        try:
            journal.ensure_writable()
        except AuditUnavailable as exc:
            if handle_log is not None:
                handle_log.read(offset, length, result=errno.EACCES)
                journal.record(Event.DENIED, handle_log.who, path, result=errno.EACCES)
            else:
                journal.record(event, caller, path, result=errno.EACCES)
                journal.record(Event.DENIED, caller, path, result=errno.EACCES)
            self._warn(event, exc)
            raise PermissionError(errno.EACCES, "the audit journal cannot be written") from None

    def _warn(self, event: Event, exc: AuditUnavailable) -> None:
        now = time.monotonic()
        self._refused_since_warning += 1
        if now - self._last_warning < DENIED_LOG_INTERVAL:
            return
        log.warning(
            "refusing %s with EACCES (%d request(s) refused since the last such line): %s",
            event.value,
            self._refused_since_warning,
            exc,
        )
        self._last_warning = now
        self._refused_since_warning = 0

    def open_handle(
        self, caller: Caller, path: str | bytes | None, event: Event
    ) -> HandleLog | None:
        """Record a successful open or create; return the handle's log."""
        if self.journal is None:
            return None
        return self.journal.open_handle(caller, path, event=event)

    def record(
        self,
        event: Event,
        caller: Caller,
        path: str | bytes | None,
        result: str | int = "ok",
        new_path: str | bytes | None = None,
    ) -> None:
        """Record one event."""
        if self.journal is not None:
            self.journal.record(event, caller, path, result=result, new_path=new_path)

    def failed(
        self, event: Event, caller: Caller, path: str | bytes | None, exc: BaseException
    ) -> None:
        """Record *event* as failed with the errno that *exc* is answered with."""
        self.record(event, caller, path, result=errno_of(exc))

    @contextmanager
    def outcome(
        self,
        event: Event,
        caller: Caller,
        path: str | bytes | None,
        new_path: str | bytes | None = None,
    ) -> Iterator[None]:
        """Record *event* when the block ends: ``ok``, or the errno of its exception.

        Cancellation and other ``BaseException`` s that are not errors are not recorded.
        """
        try:
            yield
        except Exception as exc:
            self.record(event, caller, path, result=errno_of(exc), new_path=new_path)
            raise
        self.record(event, caller, path, new_path=new_path)

    def integrity(self, caller: Caller, path: str | bytes | None) -> None:
        """Record that stored data failed to authenticate, so the request got EIO."""
        self.record(Event.INTEGRITY, caller, path, result=errno.EIO)
