"""The audit journal: encrypted, chained, checkpointed records of every access.

See ``docs/audit.md``. The FUSE frontend uses :class:`AuditJournal` (``open_for_volume``,
``record``, ``open_handle``, ``ensure_writable``, ``flush``, ``close``), the
:class:`HandleLog` it returns per open file, and :func:`flush_periodically`. The
commands use :func:`verify` and :func:`read_records`.

Modules: ``record`` (fields, events), ``process`` (``/proc`` names), ``layout`` (bytes),
``keys`` (journal key), ``segment`` and ``commit`` (writing), ``recovery`` (opening),
``merger`` (read and write ranges), ``writer`` (the journal), ``flusher``, ``forward``
(syslog), ``walk`` and ``verify`` (reading), ``query`` and ``report`` (output), ``cli``.
"""

from __future__ import annotations

from dermfs.audit.errors import AuditUnavailable, Damage, DamageKind, JournalDamaged
from dermfs.audit.flusher import PeriodicFlusher, flush_periodically
from dermfs.audit.forward import Forwarder, SyslogForwarder
from dermfs.audit.keys import rewrap_journal_key
from dermfs.audit.merger import HandleLog
from dermfs.audit.record import FIELDS, Caller, Event, ProcessCaller, Record, daemon_caller
from dermfs.audit.verify import VerifyResult, read_records, verify
from dermfs.audit.writer import AuditJournal

__all__ = [
    "FIELDS",
    "AuditJournal",
    "AuditUnavailable",
    "Caller",
    "Damage",
    "DamageKind",
    "Event",
    "Forwarder",
    "HandleLog",
    "JournalDamaged",
    "PeriodicFlusher",
    "ProcessCaller",
    "Record",
    "SyslogForwarder",
    "VerifyResult",
    "daemon_caller",
    "flush_periodically",
    "read_records",
    "rewrap_journal_key",
    "verify",
]
