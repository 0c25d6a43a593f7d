"""Group commit: sealing a batch of records, making it durable, and failing closed.

docs/audit.md sections 6 and 8. A :class:`Committer` owns the active segment and the
chain's tail. Each :meth:`Committer.commit` seals the records it is given after those
still pending, writes all pending bytes with one ``pwrite`` and one ``fdatasync``,
rotates when the segment is full, and rewrites the checkpoint. An :class:`OSError` on the
way puts it into the failed state; the pending bytes are kept and written again by the
next commit.

Concurrency: one lock serialises commits and close; callers need no other.
"""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

from dermfs.audit.forward import Forwarder, checkpoint_line
from dermfs.audit.keys import JournalKeys
from dermfs.audit.layout import FLAG_COMMIT, frame_header
from dermfs.audit.record import Record, RecordClock
from dermfs.audit.segment import ActiveSegment
from dermfs.audit.walk import ChainPoint
from dermfs.cryptocore import SEAL_OVERHEAD, TAG_SIZE

log = logging.getLogger(__name__)


class Committer:
    """Makes records durable in order; see the module docstring.

    Attributes:
        durable: the chain at the last durable record.
        failure: the errno name that stopped the journal, or ``None``.
    """

    def __init__(
        self,
        path: Path,
        keys: JournalKeys,
        segment: ActiveSegment,
        point: ChainPoint,
        deny: bool,
        max_bytes: int,
        forwarder: Forwarder | None,
    ) -> None:
        self.path = path
        self._keys = keys
        self._segment = segment
        self._deny = deny
        self._max_bytes = max_bytes
        self._forwarder = forwarder
        self._clock = RecordClock()
        self._lock = threading.Lock()
        self.durable = point
        self._pending = bytearray()
        self._pending_json: list[str] = []
        self._pending_point = point
        self._checkpoint_due = True
        self._rotation_failing = False
        self.failure: str | None = None

    def __repr__(self) -> str:
        return f"<Committer {self.path}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._segment.fd is None

    def commit(self, batch: list[Record], clean: bool = False) -> tuple[bool, str | None]:
        """Seal *batch* and write everything pending, then the checkpoint.

        Args:
            batch: records in seq order, following those already given.
            clean: mark the checkpoint as written by a clean close.

        Returns:
            ``(ok, resumed)``: *ok* is whether everything is durable and the checkpoint
            current; *resumed* is the errno name of a failure this commit ended.
        """
        with self._lock:
            if self.closed:
                return self.failure is None, None
            if batch:
                self._seal(batch)
            if not self._pending and not self._checkpoint_due and not clean:
                return self.failure is None, None
            try:
                self._write(clean)
            except OSError as exc:
                self._fail(exc)
                return False, None

            resumed, self.failure = self.failure, None
            if resumed is not None:
                log.info("audit journal %s can be written again (after %s)", self.path, resumed)
            return True, resumed

    def _write(self, clean: bool) -> None:
        if self._pending:
            self._segment.append(self._pending)
            self.durable = self._pending_point
            sent, self._pending_json, self._pending = self._pending_json, [], bytearray()
            self._forward(sent)
            self._rotate_if_full()
        self._checkpoint_due = True
        self._segment.write_checkpoint(self.durable.seq, self.durable.tag, clean, self._clock.now())
        self._checkpoint_due = False

    def _seal(self, batch: list[Record]) -> None:
        """Seal *batch* onto the pending bytes, chained after the pending tail."""
        aead = self._keys.record_aead
        journal_id = self._keys.journal_id
        seq, tag = self._pending_point.seq, self._pending_point.tag
        out = self._pending
        last = len(batch) - 1
        for number, record in enumerate(batch):
            if record.seq != seq + 1:
                raise RuntimeError(f"audit record {record.seq} out of order after {seq}")
            text = record.to_json()
            plaintext = text.encode()
            flags = FLAG_COMMIT if number == last else 0
            header = frame_header(len(plaintext) + SEAL_OVERHEAD, flags, record.seq, journal_id)
            sealed = aead.seal(plaintext, header + tag)
            out += header
            out += sealed
            seq, tag = record.seq, sealed[-TAG_SIZE:]
            if self._forwarder is not None:
                self._pending_json.append(text)
        self._pending_point = ChainPoint(seq, tag)

    def _forward(self, sent: list[str]) -> None:
        if self._forwarder is None:
            return
        line = checkpoint_line(self._keys.journal_id, self.durable.seq, self.durable.tag)
        self._forwarder.send(sent, line)

    def _rotate_if_full(self) -> None:
        if self._segment.durable < self._max_bytes:
            return
        try:
            self._segment.rotate(self.durable.seq + 1, self.durable.tag)
        except OSError as exc:
            if not self._rotation_failing:
                log.warning("audit journal %s: rotation failed, will retry: %s", self.path, exc)
            self._rotation_failing = True
        else:
            self._rotation_failing = False

    def _fail(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or errno.EIO, "EIO")
        if self.failure is None:
            then = "refusing opens and reads" if self._deny else "on_failure is allow: continuing"
            log.error(
                "audit journal %s cannot be written (%s: %s); %s until it can; "
                "%d record(s) kept in memory",
                self.path,
                name,
                exc.strerror,
                then,
                self._pending_point.seq - self.durable.seq,
            )
        self.failure = name

    def close(self) -> None:
        """Close the active segment; later commits do nothing."""
        with self._lock:
            self._segment.close()
