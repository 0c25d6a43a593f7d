"""The journal writer: records in memory, group commit, and failing closed.

docs/audit.md sections 6, 8 and 9. :meth:`AuditJournal.record` only buffers; a
:meth:`AuditJournal.flush` seals the buffer, writes it with one ``pwrite`` and one
``fdatasync``, and rewrites the checkpoint. When that fails the journal is *failed*: it
keeps every record, :meth:`AuditJournal.ensure_writable` raises (unless
``on_failure`` is ``allow``), and each later flush retries.

Concurrency (invariants):

- ``_lock`` guards the buffer, the next seq and the handles' open ranges. It is held only
  for list and integer operations, never for I/O, so the trio thread never waits for an
  fsync.
- A record gets its seq and enters the buffer in one critical section, so the buffer is
  always in seq order; :meth:`flush` takes the buffer and hands it to the
  :class:`~dermfs.audit.commit.Committer` under ``_flush_lock``, so batches reach it in
  seq order too, and sealing in that order keeps the chain.
- The committer's own lock guards the segment, the pending bytes and the chain's tail.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Protocol

from dermfs.audit.commit import Committer
from dermfs.audit.errors import AuditUnavailable
from dermfs.audit.flusher import PeriodicFlusher
from dermfs.audit.forward import Forwarder, SyslogForwarder
from dermfs.audit.layout import JournalFiles
from dermfs.audit.merger import HandleLog, Who
from dermfs.audit.process import ProcessNames
from dermfs.audit.record import (
    OK,
    Caller,
    Event,
    PatientMatcher,
    Record,
    RecordClock,
    daemon_caller,
    mount_path,
    result_name,
)
from dermfs.audit.recovery import open_files, take_lock
from dermfs.cryptocore import SecretKey

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20
ON_FAILURE = ("deny", "allow")


class AuditSettings(Protocol):
    """The ``audit`` section of the configuration (``dermfs.config.AuditConfig``)."""

    @property
    def journal(self) -> Path: ...

    @property
    def patient_id(self) -> re.Pattern[str]: ...

    @property
    def on_failure(self) -> str: ...

    @property
    def syslog(self) -> bool: ...

    @property
    def max_bytes(self) -> int: ...


class AuditVolume(Protocol):
    """What the journal needs of an open ``dermfs.volume.Volume``."""

    volume_id: bytes

    def audit_key(self) -> SecretKey: ...


class AuditJournal:
    """An open journal, appended to by one process; see the module docstring."""

    def __init__(
        self,
        committer: Committer,
        next_seq: int,
        lock_fd: int,
        patients: PatientMatcher,
        deny: bool,
        process_names: ProcessNames,
    ) -> None:
        """Use :meth:`open`."""
        self.path = committer.path
        self._committer = committer
        self._lock_fd: int | None = lock_fd
        self._patients = patients
        self._deny = deny
        self._names = process_names
        self._clock = RecordClock()

        self._lock = threading.Lock()
        self._buffer: list[Record] = []
        self._next_seq = next_seq
        self._handles: set[HandleLog] = set()
        self._closed = False

        self._flush_lock = threading.Lock()
        self._flusher: PeriodicFlusher | None = None

    def __repr__(self) -> str:
        return f"<AuditJournal {self.path}>"

    # ------------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: Path,
        journal_id: bytes,
        audit_key: SecretKey,
        *,
        patient_id: re.Pattern[str],
        on_failure: str = "deny",
        max_bytes: int = DEFAULT_MAX_BYTES,
        forwarder: Forwarder | None = None,
        process_names: ProcessNames | None = None,
    ) -> AuditJournal:
        """Open (or, at first use, create) the journal at *path* for appending.

        After an unclean stop the torn tail is cut and an ``unclean-stop`` record is
        written before this returns. If that first write fails, the journal is returned
        in the failed state (see :meth:`ensure_writable`), and retries at each flush.

        Args:
            path: ``audit.journal``; its directory must exist.
            journal_id: the volume id.
            audit_key: ``Volume.audit_key()``.
            patient_id: ``audit.patient_id``, with a group named ``patient``.
            on_failure: ``deny`` or ``allow`` (docs/audit.md section 8).
            max_bytes: the segment size at which the journal rotates.
            forwarder: where durable records are copied (syslog), if anywhere.
            process_names: the ``/proc`` look-up to use (tests pass their own).

        Raises:
            AuditUnavailable: the directory is missing, the journal is in use by another
                process, or its files cannot be read or written.
            JournalDamaged: the journal does not match its checkpoint; it is left as it is.
        """
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}")
        patients = PatientMatcher(patient_id)
        files = JournalFiles(path)
        if not files.path.parent.is_dir():
            raise AuditUnavailable(f"audit journal directory {files.path.parent} does not exist")

        lock_fd = take_lock(files)
        try:
            keys, segment, point, unclean = open_files(files, journal_id, audit_key)
        except OSError as exc:
            os.close(lock_fd)
            raise AuditUnavailable(
                f"cannot open the audit journal {path}: {exc.strerror}"
            ) from None
        except BaseException:
            os.close(lock_fd)
            raise

        deny = on_failure == "deny"
        committer = Committer(path, keys, segment, point, deny, max_bytes, forwarder)
        journal = cls(
            committer, point.seq + 1, lock_fd, patients, deny, process_names or ProcessNames()
        )
        if unclean:
            log.warning("audit journal %s was not closed cleanly", path)
            journal.record(Event.UNCLEAN_STOP, daemon_caller(), None)
        journal.flush()
        return journal

    @classmethod
    def open_for_volume(
        cls,
        settings: AuditSettings,
        volume: AuditVolume,
        *,
        forwarder: Forwarder | None = None,
        process_names: ProcessNames | None = None,
    ) -> AuditJournal:
        """Open the journal that the configuration's ``audit`` section names, for *volume*.

        With ``audit.syslog`` set and no *forwarder* given, records go to syslog.

        Raises:
            AuditUnavailable: as :meth:`open`.
            JournalDamaged: as :meth:`open`.
        """
        if forwarder is None and settings.syslog:
            forwarder = SyslogForwarder()
        audit_key = volume.audit_key()
        try:
            return cls.open(
                settings.journal,
                volume.volume_id,
                audit_key,
                patient_id=settings.patient_id,
                on_failure=settings.on_failure,
                max_bytes=settings.max_bytes,
                forwarder=forwarder,
                process_names=process_names,
            )
        finally:
            audit_key.wipe()

    # ------------------------------------------------------------------------ recording

    def record(
        self,
        event: Event,
        caller: Caller,
        path: str | bytes | None,
        *,
        result: str | int = OK,
        offset: int | None = None,
        length: int | None = None,
        new_path: str | bytes | None = None,
    ) -> None:
        """Add one record to the buffer; no I/O. It is written at the next flush.

        Args:
            event: what happened.
            caller: who asked (pyfuse3's ``RequestContext``, or :func:`daemon_caller`).
            path: the path inside the mount, or ``None`` for events about the volume.
            result: ``"ok"``, an errno name, or an errno number.
            offset: for an unmerged read or write, where it began.
            length: for an unmerged read or write, how many bytes.
            new_path: for ``rename``, the new path.

        Raises:
            AuditUnavailable: the journal is closed.
        """
        who = self._who(caller)
        path = mount_path(path)
        new_path = mount_path(new_path)
        now = self._clock.now()
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the audit journal is closed")
            self._emit_locked(event, who, path, result_name(result), offset, length, now, new_path)

    def open_handle(
        self, caller: Caller, path: str | bytes | None, *, event: Event = Event.OPEN
    ) -> HandleLog:
        """Record a successful open (or ``create``) and return the handle's merger.

        Call :meth:`HandleLog.read` and :meth:`HandleLog.write` for its requests, and
        :meth:`HandleLog.release` at release.

        Raises:
            AuditUnavailable: the journal is closed.
        """
        who = self._who(caller)
        path = mount_path(path)
        now = self._clock.now()
        handle = HandleLog(self._lock, self._emit_locked, self._forget, self._clock, who, path)
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the audit journal is closed")
            self._emit_locked(event, who, path, OK, None, None, now)
            self._handles.add(handle)
        return handle

    def _who(self, caller: Caller) -> Who:
        process, exe = self._names.lookup(caller.pid)
        return Who(caller.uid, caller.gid, caller.pid, process, exe)

    def _emit_locked(
        self,
        event: Event,
        who: Who,
        path: str | None,
        result: str,
        offset: int | None,
        length: int | None,
        time: str,
        new_path: str | None = None,
    ) -> None:
        """Give the next seq to a record and buffer it; ``_lock`` is held."""
        patients = self._patients
        record = Record(
            time,
            self._next_seq,
            event.value,
            result,
            who.uid,
            who.gid,
            who.pid,
            who.process,
            who.exe,
            path,
            patients.patient_of(path),
            offset,
            length,
            new_path,
            None if new_path is None else patients.patient_of(new_path),
        )
        self._next_seq += 1
        self._buffer.append(record)

    def _forget(self, handle: HandleLog) -> None:
        with self._lock:
            self._handles.discard(handle)

    # ------------------------------------------------------------------------ failing closed

    @property
    def failure(self) -> str | None:
        """The errno name that stopped the journal, or ``None`` while it can be written."""
        return self._committer.failure

    def ensure_writable(self) -> None:
        """Refuse if the journal cannot be written and ``on_failure`` is ``deny``.

        The frontend calls this before it allows an open or a read, and answers
        ``EACCES`` when it raises. It costs one attribute read.

        Raises:
            AuditUnavailable: the last flush failed and ``on_failure`` is ``deny``.
        """
        failure = self._committer.failure
        if failure is not None and self._deny:
            raise AuditUnavailable(f"the audit journal {self.path} cannot be written ({failure})")

    # ------------------------------------------------------------------------ flushing

    def flush(self) -> bool:
        """Write every buffered record and open range, then the checkpoint.

        Never raises for I/O errors: they put the journal into the failed state, and the
        next flush retries.

        Returns:
            ``True`` when everything recorded so far is durable and the checkpoint is
            current; ``False`` when the journal is failed.
        """
        with self._flush_lock:
            return self._flush_locked(clean=False)

    def _flush_locked(self, clean: bool) -> bool:
        with self._lock:
            for handle in self._handles:
                handle.close_run_locked()
            batch, self._buffer = self._buffer, []
        ok, resumed = self._committer.commit(batch, clean)
        if resumed is not None:
            self.record(Event.AUDIT_RESUMED, daemon_caller(), None, result=resumed)
        return ok

    def start_flusher(self, interval: float = 1.0) -> PeriodicFlusher:
        """Start a thread that flushes every *interval* seconds; :meth:`close` stops it."""
        flusher = PeriodicFlusher(self, interval)
        flusher.start()
        self._flusher = flusher
        return flusher

    # ------------------------------------------------------------------------ closing

    def close(self) -> None:
        """Record every open range, flush, mark the checkpoint clean, and release the lock.

        Raises:
            AuditUnavailable: the last flush failed; the records it could not write are
                lost, and the checkpoint stays marked unclean.
        """
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        with self._flush_lock:
            if self._committer.closed:
                return
            ok = self._flush_locked(clean=True)
            if ok and self._buffer:
                ok = self._flush_locked(clean=True)
            with self._lock:
                self._closed = True
                self._handles.clear()
                lost = self._next_seq - 1 - self._committer.durable.seq
            self._committer.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        if not ok:
            raise AuditUnavailable(
                f"the audit journal {self.path} cannot be written ({self.failure}); "
                f"{lost} record(s) are lost"
            )
