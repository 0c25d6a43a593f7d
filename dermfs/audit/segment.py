"""The segment being written: appends, the cut back after a failure, rotation, checkpoints.

:class:`ActiveSegment` owns the file descriptor of ``P`` and knows where its last
durable record ends. Its methods raise :class:`OSError`; the writer turns that into the
failed state (docs/audit.md section 8).
"""

from __future__ import annotations

import errno
import logging
import os

from dermfs.audit.keys import JournalKeys, fsync_directory, write_private_file
from dermfs.audit.layout import (
    SEGMENT_HEADER_SIZE,
    Checkpoint,
    JournalFiles,
    SegmentEntry,
    SegmentHeader,
)

log = logging.getLogger(__name__)


def _create_segment_file(files: JournalFiles, header: bytes) -> int:
    """Write *header* to ``P.next``, fsync it, and return its open descriptor."""
    fd = os.open(files.next, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        _write_all(fd, header, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.EIO, "short write")
        view = view[written:]
        offset += written


class ActiveSegment:
    """The active segment ``P``, open for appending.

    Attributes:
        index: its segment index.
        first_seq: the seq of its first record.
        durable: the offset just after its last durable record.
        sealed: the sealed segments before it, as the checkpoint lists them.
    """

    def __init__(
        self,
        files: JournalFiles,
        keys: JournalKeys,
        fd: int,
        index: int,
        first_seq: int,
        durable: int,
        sealed: list[SegmentEntry],
    ) -> None:
        self.files = files
        self.keys = keys
        self.fd: int | None = fd
        self.index = index
        self.first_seq = first_seq
        self.durable = durable
        self.sealed = sealed
        self._inode = os.fstat(fd).st_ino
        #: Set when bytes past :attr:`durable` may be on disk and must be cut first.
        self.dirty = False

    @classmethod
    def create_first(cls, files: JournalFiles, keys: JournalKeys) -> ActiveSegment:
        """Make segment 1 at ``P``, through ``P.next`` and a rename.

        Raises:
            OSError: it could not be written.
        """
        header = SegmentHeader(1, 1, keys.journal_id, bytes(16)).pack(keys.segment_mac)
        fd = _create_segment_file(files, header)
        try:
            os.replace(files.next, files.active)
            fsync_directory(files.active.parent)
        except BaseException:
            os.close(fd)
            raise
        return cls(files, keys, fd, 1, 1, SEGMENT_HEADER_SIZE, [])

    def close(self) -> None:
        """Close the descriptor."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _descriptor(self) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, "audit journal is closed")
        return self.fd

    def check_in_place(self) -> None:
        """Check that ``P`` is still the file being written.

        Raises:
            OSError: ``P`` was removed, renamed or replaced (``ENOENT``).
        """
        try:
            inode = os.stat(self.files.active).st_ino
        except FileNotFoundError:
            inode = None
        if inode != self._inode:
            raise OSError(errno.ENOENT, "the audit journal file was removed or replaced")

    def append(self, data: bytes | bytearray) -> None:
        """Write *data* after the last durable record and make it durable.

        On failure the file is cut back to :attr:`durable` (or marked :attr:`dirty` when
        even that fails), and the error is raised.

        Raises:
            OSError: the write, the cut or ``fdatasync`` failed, or ``P`` is gone.
        """
        fd = self._descriptor()
        self.check_in_place()
        if self.dirty:
            os.ftruncate(fd, self.durable)
            self.dirty = False
        try:
            _write_all(fd, data, self.durable)
            os.fdatasync(fd)
        except OSError:
            self.dirty = True
            self.cut_back()
            raise
        self.durable += len(data)

    def cut_back(self) -> None:
        """Cut the file back to the end of the last durable record, best effort."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, self.durable)
            self.dirty = False
        except OSError as exc:
            log.debug("audit journal: cut back to %d failed: %s", self.durable, exc)

    def rotate(self, next_seq: int, last_tag: bytes) -> None:
        """Seal this segment as ``P.<index>`` and start the next one at ``P``.

        Raises:
            OSError: the new segment could not be made; this one stays active.
        """
        fd = self._descriptor()
        index = self.index + 1
        header = SegmentHeader(index, next_seq, self.keys.journal_id, last_tag)
        new_fd = _create_segment_file(self.files, header.pack(self.keys.segment_mac))
        try:
            sealed_path = self.files.sealed(self.index)
            try:
                os.link(self.files.active, sealed_path)
            except FileExistsError:
                if os.stat(sealed_path).st_ino != self._inode:
                    raise
            os.replace(self.files.next, self.files.active)
        except BaseException:
            os.close(new_fd)
            raise

        # From here on P is the new segment, whatever else fails.
        self.sealed.append(SegmentEntry(self.index, self.first_seq, self.durable))
        os.close(fd)
        self.fd = new_fd
        self._inode = os.fstat(new_fd).st_ino
        self.index = index
        self.first_seq = next_seq
        self.durable = SEGMENT_HEADER_SIZE
        log.info("audit journal: rotated to segment %d", index)
        fsync_directory(self.files.active.parent)

    def write_checkpoint(self, last_seq: int, last_tag: bytes, clean: bool, time: str) -> None:
        """Rewrite ``P.checkpoint`` atomically for the current tail.

        Raises:
            OSError: it could not be written.
        """
        active = SegmentEntry(self.index, self.first_seq, self.durable)
        checkpoint = Checkpoint(
            self.keys.journal_id, last_seq, last_tag, clean, time, (*self.sealed, active)
        )
        write_private_file(
            self.files.checkpoint,
            self.files.checkpoint_tmp,
            checkpoint.to_bytes(self.keys.checkpoint_mac),
        )
