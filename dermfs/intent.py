"""The intent log: what a crash could have left half-written (``docs/format.md`` section 8).

The content layer appends a DIRTY record before a file first changes, a SAVED record with
the old bytes of a durable chunk before it is overwritten in place, and a CLEAN record once
the file is complete again. After a crash, :func:`read_pending` lists the files that were
dirty and :func:`dermfs.content.repair` repairs each one.

The log is shared by every open file of a mount; a lock serialises appends.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dermfs import format
from dermfs.cryptocore import Mac, random_id
from dermfs.errors import FormatError, IntegrityError

log = logging.getLogger(__name__)

#: Once no file is dirty, a log larger than this is cut back to its header.
COMPACT_BYTES = 4 << 20


@dataclass
class PendingFile:
    """A file that was dirty when its intent log ended.

    Attributes:
        inode: the backing inode number.
        file_id: the file id from its header, to recognise the file.
        path: the backing path relative to the store, when last marked dirty.
        durable_backing_size: the smallest backing size the file had while dirty; chunks
            below it existed on disk before the dirty period or were saved.
        saved: old bytes of chunks overwritten in place, by chunk index (first copy wins).
    """

    inode: int
    file_id: bytes
    path: str
    durable_backing_size: int
    saved: dict[int, bytes] = field(default_factory=dict)


class IntentLog:
    """The writer side of a volume's intent log."""

    def __init__(self, path: Path, mac: Mac) -> None:
        """Start a new log at *path*, replacing any old one (recover that one first)."""
        self._path = path
        self._mac = mac
        self._session_id = random_id()
        self._lock = threading.Lock()
        self._record_number = 0
        self._dirty: set[int] = set()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.write(self._fd, format.pack_intent_header(self._session_id))
        self._size = format.INTENT_HEADER_SIZE

    def dirty(self, inode: int, file_id: bytes, backing_size: int, path: str) -> None:
        """Record that a file is about to change (again) and how large it is now."""
        with self._lock:
            self._append(format.RECORD_DIRTY, format.dirty_body(inode, file_id, backing_size, path))
            self._dirty.add(inode)

    def saved(self, inode: int, chunk_index: int, sealed: bytes) -> None:
        """Record the old bytes of a chunk about to be overwritten in place."""
        with self._lock:
            self._append(format.RECORD_SAVED, format.saved_body(inode, chunk_index, sealed))

    def sync(self) -> None:
        """Make the records so far durable."""
        os.fdatasync(self._fd)

    def clean(self, inode: int) -> None:
        """Record that a file is complete again; compact the log when nothing is dirty."""
        with self._lock:
            self._append(format.RECORD_CLEAN, format.clean_body(inode))
            self._dirty.discard(inode)
            if not self._dirty and self._size > COMPACT_BYTES:
                os.ftruncate(self._fd, format.INTENT_HEADER_SIZE)
                self._size = format.INTENT_HEADER_SIZE
                self._record_number = 0

    @property
    def dirty_inodes(self) -> frozenset[int]:
        """Inodes marked dirty and not yet clean."""
        with self._lock:
            return frozenset(self._dirty)

    def close(self) -> None:
        """Close the log, and remove it when no file is left dirty (a clean unmount)."""
        with self._lock:
            os.close(self._fd)
            if self._dirty:
                log.warning("intent log closed with %d dirty file(s)", len(self._dirty))
            else:
                self._path.unlink(missing_ok=True)

    def _append(self, record_type: int, body: bytes) -> None:
        record = format.intent_record_body(record_type, body)
        tag = self._mac.tag(format.intent_tag_input(self._session_id, self._record_number, record))
        data = memoryview(record + tag[: format.INTENT_TAG_SIZE])
        offset = self._size
        try:
            while data:
                written = os.pwrite(self._fd, data, offset)
                data = data[written:]
                offset += written
        except OSError:
            # Leave no torn record behind (a disk full writes part of one, then fails).
            os.ftruncate(self._fd, self._size)
            raise
        self._size = offset
        self._record_number += 1


def read_pending(path: Path, mac: Mac) -> list[PendingFile]:
    """Return the files an intent log left dirty; an empty list if there is no log.

    Records after the first one whose tag fails (a torn or forged tail) are ignored. A log
    cut inside its header (a kill between creating the file and writing the header) holds
    no record and counts as empty.

    Raises:
        FormatError: the file is not an intent log.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    if len(data) < format.INTENT_HEADER_SIZE and format.INTENT_MAGIC.startswith(data[:4]):
        return []
    session_id = format.parse_intent_header(data)

    pending: dict[int, PendingFile] = {}
    records = format.split_intent_records(data[format.INTENT_HEADER_SIZE :])
    for record_number, (record_type, body, record, tag) in enumerate(records):
        try:
            expected = mac.tag(format.intent_tag_input(session_id, record_number, record))
            if expected[: format.INTENT_TAG_SIZE] != tag:
                raise IntegrityError("intent record failed to authenticate")
            _apply_record(pending, record_type, body)
        except (IntegrityError, FormatError):
            log.warning("intent log ends at a bad record (number %d)", record_number)
            break
    return list(pending.values())


def _apply_record(pending: dict[int, PendingFile], record_type: int, body: bytes) -> None:
    if record_type == format.RECORD_DIRTY:
        inode, file_id, backing_size, path = format.parse_dirty_body(body)
        entry = pending.get(inode)
        if entry is None or entry.file_id != file_id:
            pending[inode] = PendingFile(inode, file_id, path, backing_size)
        else:
            entry.path = path
            entry.durable_backing_size = min(entry.durable_backing_size, backing_size)
    elif record_type == format.RECORD_SAVED:
        inode, chunk_index, sealed = format.parse_saved_body(body)
        if inode in pending:
            pending[inode].saved.setdefault(chunk_index, sealed)
    elif record_type == format.RECORD_CLEAN:
        pending.pop(format.parse_clean_body(body), None)
    else:
        raise FormatError(f"unknown intent record type {record_type}")
