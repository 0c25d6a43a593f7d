"""Content encryption: a random-access plaintext view of one encrypted backing file.

:class:`ContentFile` turns reads and writes at any offset into whole-chunk reads and
writes of the backing file (``docs/format.md`` section 4). It keeps the rules of the
format at every step: at least one chunk, the final chunk flagged, encrypted zeros instead
of holes.

Crash safety comes from the intent log (:class:`dermfs.intent.IntentLog`, format section
8): before a file first changes it is marked dirty; before a chunk that was already on disk
is rewritten in place, its old bytes are saved in the log. :func:`repair` uses that to put a
file that was being written when the daemon died back into a valid state.

Concurrency: every public method of :class:`ContentFile` takes the object's lock, so one
object may be shared by several threads. There must be at most one object per backing
inode at a time, because the object caches the plaintext size and the final chunk.

Caveats:

- Sparse files are stored dense: extending a file writes encrypted zero chunks, so a
  1 GiB hole costs 1 GiB of disk and of writing.
- The intent log is made durable (fdatasync) only before chunks that were already on disk
  are overwritten. Against power loss that protects durable data; a file being written
  without fsync at the moment of a power cut may lose the unsynced part, as on ext4.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from dermfs import format
from dermfs.cryptocore import Aead
from dermfs.errors import FormatError, IntegrityError
from dermfs.intent import IntentLog, PendingFile

log = logging.getLogger(__name__)


@dataclass
class FileKeys:
    """What is needed to seal and open one file's chunks."""

    volume_id: bytes
    file_id: bytes
    cipher: Aead
    geometry: format.ChunkGeometry

    def aad(self, chunk_index: int, last: bool) -> bytes:
        """Return the associated data of chunk *chunk_index*."""
        return format.chunk_aad(self.volume_id, self.file_id, chunk_index, last)

    def seal(self, chunk_index: int, plaintext: bytes | bytearray, last: bool) -> bytes:
        """Seal one chunk."""
        return self.cipher.seal(plaintext, self.aad(chunk_index, last))

    def seal_into(
        self,
        chunk_index: int,
        plaintext: bytes | bytearray | memoryview,
        last: bool,
        out: memoryview,
    ) -> None:
        """Seal one chunk into *out*, which is ``len(plaintext) + 28`` bytes long."""
        self.cipher.seal_into(plaintext, self.aad(chunk_index, last), out)

    def open_into(
        self, chunk_index: int, sealed: bytes | bytearray | memoryview, last: bool, out: memoryview
    ) -> None:
        """Open one chunk into *out*, which is ``len(sealed) - 28`` bytes long.

        Raises:
            IntegrityError: the chunk does not authenticate at this index with this flag.
        """
        self.cipher.open_into(sealed, self.aad(chunk_index, last), out)

    def open(self, chunk_index: int, sealed: bytes | memoryview, last: bool) -> bytes:
        """Open one chunk.

        Raises:
            IntegrityError: the chunk does not authenticate at this index with this flag.
        """
        return self.cipher.open(sealed, self.aad(chunk_index, last))

    def open_either(self, chunk_index: int, sealed: bytes | memoryview) -> tuple[bytes, bool]:
        """Open a chunk whose final flag is not known; return plaintext and flag.

        Raises:
            IntegrityError: the chunk authenticates with neither flag.
        """
        for last in (True, False):
            try:
                return self.open(chunk_index, sealed, last), last
            except IntegrityError:
                continue
        raise IntegrityError(f"chunk {chunk_index} failed to authenticate")


@dataclass
class _DirtyState:
    """What the intent log knows about a file since it last became dirty."""

    durable_count: int
    saved: set[int] = field(default_factory=set)


class ContentFile:
    """The plaintext of one backing file, read and written at any offset."""

    def __init__(
        self,
        fd: int,
        inode: int,
        keys: FileKeys,
        intent: IntentLog | None,
        path_hint: str = "",
    ) -> None:
        """Wrap an open backing file whose header has been read.

        Args:
            fd: the backing file, open for reading (and writing, to change it).
            inode: the backing file's inode number, the intent log's key.
            keys: the file's id, cipher and chunk geometry.
            intent: the volume's intent log; ``None`` only for read-only use.
            path_hint: the backing path relative to the store, recorded in the intent log
                to find the file again after a crash.
        """
        self._fd = fd
        self.inode = inode
        self._keys = keys
        self._geometry = keys.geometry
        self._intent = intent
        self.path_hint = path_hint
        self._lock = threading.Lock()
        self._dirty: _DirtyState | None = None
        self._tail: tuple[int, bytes] | None = None
        # Scratch space for the sealed bytes of one call, reused to spare the allocator;
        # reading and writing have their own, because a write reads old chunks.
        self._read_scratch = bytearray()
        self._write_scratch = bytearray()
        self._size = self._geometry.plaintext_size_lenient(os.fstat(fd).st_size)

    @property
    def file_id(self) -> bytes:
        """The file's id, from its header."""
        return self._keys.file_id

    @property
    def size(self) -> int:
        """The plaintext size in bytes."""
        return self._size

    def read(self, offset: int, length: int) -> bytearray:
        """Return up to *length* bytes from *offset*; fewer at the end of the file.

        Raises:
            IntegrityError: a chunk in the range does not authenticate.
            OSError: the backing file could not be read.
        """
        with self._lock:
            return self._read(offset, length)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write *data* at *offset*, growing the file (with zeros) as needed.

        Returns:
            The number of bytes written, always ``len(data)``.

        Raises:
            IntegrityError: a chunk that must be merged with the new data is damaged.
            OSError: the backing file could not be written; the file is left as it was
                before the call (a failure while extending is rolled back).
        """
        if offset < 0:
            raise ValueError("negative offset")
        with self._lock:
            if data:
                self._apply(offset, data, max(self._size, offset + len(data)))
            return len(data)

    def truncate(self, size: int) -> None:
        """Make the file *size* bytes long, cutting or appending zeros.

        Raises:
            IntegrityError: the chunk that becomes the final one is damaged.
            OSError: the backing file could not be changed.
        """
        if size < 0:
            raise ValueError("negative size")
        with self._lock:
            if size > self._size:
                self._apply(self._size, b"", size)
            elif size < self._size:
                self._shrink(size)

    def sync(self, datasync: bool = False) -> None:
        """Make everything written so far durable, and mark the file clean."""
        with self._lock:
            if datasync:
                os.fdatasync(self._fd)
            else:
                os.fsync(self._fd)
            self._mark_clean()

    def checkpoint(self) -> None:
        """Mark the file clean without forcing it to disk: its writes are all complete.

        Call this at the last close of a file. Data written so far survives a kill of the
        daemon (it is in the kernel's page cache); :meth:`sync` is for power loss too.
        """
        with self._lock:
            self._mark_clean()

    # -------------------------------------------------------------------------- reading

    def _read(self, offset: int, length: int) -> bytearray:
        size = self._size
        if offset >= size or length <= 0:
            return bytearray()
        end = min(size, offset + length)

        geometry = self._geometry
        chunk_size = geometry.chunk_size
        first = offset // chunk_size
        last_needed = (end - 1) // chunk_size
        final_index = geometry.chunk_count(size) - 1
        start_byte = geometry.chunk_offset(first)
        stop_byte = (
            geometry.chunk_offset(last_needed)
            + format.CHUNK_OVERHEAD
            + geometry.chunk_length(size, last_needed)
        )
        self._read_scratch = _at_least(self._read_scratch, stop_byte - start_byte)
        blob = memoryview(self._read_scratch)[: stop_byte - start_byte]
        if os.preadv(self._fd, [blob], start_byte) != len(blob):
            raise IntegrityError(f"inode {self.inode}: chunk {last_needed} is cut short")

        result = bytearray(end - offset)
        out = memoryview(result)
        position = 0
        for chunk_index in range(first, last_needed + 1):
            chunk_length = geometry.chunk_length(size, chunk_index)
            sealed = blob[position : position + chunk_length + format.CHUNK_OVERHEAD]
            position += chunk_length + format.CHUNK_OVERHEAD
            chunk_start = chunk_index * chunk_size
            lo = max(offset, chunk_start)
            hi = min(end, chunk_start + chunk_length)
            last = chunk_index == final_index
            if (lo, hi) == (chunk_start, chunk_start + chunk_length):
                self._open_chunk_into(chunk_index, sealed, last, out[lo - offset : hi - offset])
            else:
                whole = bytearray(chunk_length)
                self._open_chunk_into(chunk_index, sealed, last, memoryview(whole))
                out[lo - offset : hi - offset] = whole[lo - chunk_start : hi - chunk_start]
        return result

    def _open_chunk_into(
        self, chunk_index: int, sealed: memoryview, last: bool, out: memoryview
    ) -> None:
        try:
            self._keys.open_into(chunk_index, sealed, last, out)
        except IntegrityError:
            raise IntegrityError(
                f"inode {self.inode}: chunk {chunk_index} failed to authenticate"
            ) from None

    def _old_plaintext(self, chunk_index: int, old_size: int) -> bytes | bytearray:
        """Return the current plaintext of one existing chunk, from the cache or the disk."""
        if self._tail is not None and self._tail[0] == chunk_index:
            return self._tail[1]
        chunk_start = chunk_index * self._geometry.chunk_size
        length = self._geometry.chunk_length(old_size, chunk_index)
        return self._read(chunk_start, length) if length else b""

    # -------------------------------------------------------------------------- writing

    def _apply(self, offset: int, data: bytes | memoryview, new_size: int) -> None:
        """Write *data* at *offset* and/or grow the file to *new_size* with zeros."""
        geometry = self._geometry
        chunk_size = geometry.chunk_size
        old_size = self._size
        old_count = geometry.chunk_count(old_size)
        new_count = geometry.chunk_count(new_size)
        write_end = offset + len(data)

        # The chunks whose bytes or final flag change.
        region_start = min(offset, old_size)
        region_end = new_size if new_size > old_size else write_end
        first = region_start // chunk_size
        last = (region_end - 1) // chunk_size
        if new_count > old_count:
            first = min(first, old_count - 1)

        self._mark_dirty()
        self._save_before_overwrite(range(first, min(last, old_count - 1) + 1))

        start = geometry.chunk_offset(first)
        image_size = geometry.chunk_offset(last) + format.CHUNK_OVERHEAD
        image_size += geometry.chunk_length(new_size, last) - start
        self._write_scratch = _at_least(self._write_scratch, image_size)
        image = memoryview(self._write_scratch)[:image_size]
        position = 0
        plaintext: bytes | bytearray | memoryview = b""
        for chunk_index in range(first, last + 1):
            plaintext = self._merged_chunk(chunk_index, offset, data, old_size, new_size)
            sealed_length = len(plaintext) + format.CHUNK_OVERHEAD
            final = chunk_index == new_count - 1
            self._keys.seal_into(
                chunk_index, plaintext, final, image[position : position + sealed_length]
            )
            position += sealed_length

        # Everything past the old end first: new chunks, and the bytes by which the old
        # final chunk grows. Running out of space there leaves the existing chunks
        # untouched; the bytes rewritten in place afterwards need no new space.
        old_end = geometry.backing_size(old_size)
        self._tail = None
        if start + len(image) > old_end:
            try:
                _pwrite_all(self._fd, image[old_end - start :], old_end)
            except OSError:
                os.ftruncate(self._fd, old_end)
                raise
        _pwrite_all(self._fd, image[: old_end - start], start)
        self._size = new_size
        self._tail = (last, bytes(plaintext))

    def _merged_chunk(
        self, chunk_index: int, offset: int, data: bytes | memoryview, old_size: int, new_size: int
    ) -> bytearray | memoryview:
        """Return the new plaintext of one chunk: old bytes, zeros, and the new data."""
        chunk_size = self._geometry.chunk_size
        chunk_start = chunk_index * chunk_size
        new_length = self._geometry.chunk_length(new_size, chunk_index)
        old_length = self._geometry.chunk_length(old_size, chunk_index)
        data_lo = max(offset, chunk_start) - chunk_start
        data_hi = min(offset + len(data), chunk_start + new_length) - chunk_start

        if data_lo == 0 and data_hi == new_length:
            # The new data covers the whole chunk: seal it where it lies.
            source_lo = chunk_start - offset
            return memoryview(data)[source_lo : source_lo + new_length]

        plaintext = bytearray(new_length)
        covered = data_hi > data_lo and data_lo == 0 and data_hi >= old_length
        if old_length and not covered:
            plaintext[:old_length] = self._old_plaintext(chunk_index, old_size)
        if data_hi > data_lo:
            source_lo = chunk_start + data_lo - offset
            plaintext[data_lo:data_hi] = data[source_lo : source_lo + data_hi - data_lo]
        return plaintext

    def _shrink(self, new_size: int) -> None:
        """Cut the file to *new_size* bytes, smaller than now."""
        geometry = self._geometry
        old_size = self._size
        final = geometry.chunk_count(new_size) - 1
        final_length = geometry.chunk_length(new_size, final)

        self._mark_dirty()
        self._save_before_overwrite(range(final, final + 1))
        kept = self._old_plaintext(final, old_size)[:final_length] if final_length else b""
        sealed = self._keys.seal(final, kept, True)
        # From here on, chunks past the new end count as new ones (format section 8).
        assert self._dirty is not None
        if self._dirty.durable_count > final + 1:
            self._log_dirty(geometry.chunk_offset(final) + len(sealed))
            self._dirty.durable_count = final + 1

        _pwrite_all(self._fd, sealed, geometry.chunk_offset(final))
        os.ftruncate(self._fd, geometry.chunk_offset(final) + len(sealed))
        self._size = new_size
        self._tail = (final, bytes(kept))

    # -------------------------------------------------------------------------- intent log

    def _mark_dirty(self) -> None:
        if self._dirty is not None:
            return
        if self._intent is None:
            raise PermissionError("file was opened read-only")
        count = self._geometry.chunk_count(self._size)
        self._log_dirty(self._geometry.backing_size(self._size))
        self._dirty = _DirtyState(durable_count=count)

    def _log_dirty(self, backing_size: int) -> None:
        assert self._intent is not None
        self._intent.dirty(self.inode, self._keys.file_id, backing_size, self.path_hint)

    def _save_before_overwrite(self, chunk_indexes: range) -> None:
        """Save the on-disk bytes of durable chunks about to be overwritten in place.

        The empty final chunk of an empty file holds no data and is not saved, so that
        writing a new file costs no fdatasync of the intent log (format section 8).
        """
        assert self._dirty is not None and self._intent is not None
        to_save = [
            chunk_index
            for chunk_index in chunk_indexes
            if chunk_index < self._dirty.durable_count
            and chunk_index not in self._dirty.saved
            and self._geometry.chunk_length(self._size, chunk_index) > 0
        ]
        if not to_save:
            return

        geometry = self._geometry
        for chunk_index in to_save:
            length = geometry.chunk_length(self._size, chunk_index) + format.CHUNK_OVERHEAD
            sealed = os.pread(self._fd, length, geometry.chunk_offset(chunk_index))
            self._intent.saved(self.inode, chunk_index, sealed)
            self._dirty.saved.add(chunk_index)
        self._intent.sync()

    def _mark_clean(self) -> None:
        if self._dirty is None:
            return
        assert self._intent is not None
        self._intent.clean(self.inode)
        self._dirty = None


def _at_least(buffer: bytearray, size: int) -> bytearray:
    """Return *buffer* if it holds *size* bytes, else a new, larger one."""
    return buffer if len(buffer) >= size else bytearray(max(size, 2 * len(buffer)))


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


# ------------------------------------------------------------------------------ creating


def write_new_file(fd: int, header: bytes, keys: FileKeys) -> None:
    """Write the header and the empty final chunk of a new, empty file."""
    _pwrite_all(fd, header + keys.seal(0, b"", True), 0)


# ------------------------------------------------------------------------------ checking


def iter_chunks(fd: int, keys: FileKeys) -> Iterator[tuple[int, IntegrityError | None]]:
    """Authenticate every chunk of a backing file, for fsck.

    Yields:
        ``(chunk_index, None)`` for a good chunk and ``(chunk_index, error)`` for a bad
        one. A size that does not end on a chunk yields one error at the final index.
    """
    geometry = keys.geometry
    backing_size = os.fstat(fd).st_size
    try:
        size = geometry.plaintext_size(backing_size)
        size_error = None
    except FormatError as exc:
        size = geometry.plaintext_size_lenient(backing_size)
        size_error = IntegrityError(str(exc))

    final_index = geometry.chunk_count(size) - 1
    for chunk_index in range(final_index + 1):
        length = geometry.chunk_length(size, chunk_index) + format.CHUNK_OVERHEAD
        sealed = os.pread(fd, length, geometry.chunk_offset(chunk_index))
        try:
            keys.open(chunk_index, sealed, chunk_index == final_index)
        except IntegrityError as exc:
            yield chunk_index, exc
            continue
        yield chunk_index, None
    if size_error is not None:
        yield final_index + 1, size_error


# ------------------------------------------------------------------------------ repairing


def repair(fd: int, keys: FileKeys, pending: PendingFile) -> bool:
    """Put a file that was dirty at a crash back into a valid state (format section 8).

    Args:
        fd: the backing file, open for reading and writing.
        keys: the file's keys.
        pending: what the intent log recorded about the file.

    Returns:
        ``True`` if the file is valid afterwards; ``False`` if a chunk that was durable
        before the crash is damaged, in which case nothing is truncated.
    """
    geometry = keys.geometry
    slot_size = geometry.slot_size
    backing_size = os.fstat(fd).st_size
    # Chunks that held data when the file became dirty; an empty file's empty final chunk
    # holds none and is never saved, so it does not count.
    durable_count = -(
        -geometry.plaintext_size_lenient(pending.durable_backing_size) // geometry.chunk_size
    )
    start = min([*pending.saved, max(durable_count - 1, 0)])

    accepted: list[tuple[int, bytes, bool]] = []
    chunk_index = start
    end_offset = geometry.chunk_offset(start)
    while True:
        offset = geometry.chunk_offset(chunk_index)
        if offset >= backing_size and chunk_index not in pending.saved:
            break
        sealed = os.pread(fd, slot_size, offset)
        opened = _try_open(keys, chunk_index, sealed)
        if opened is None and chunk_index in pending.saved:
            sealed = pending.saved[chunk_index]
            _pwrite_all(fd, sealed, offset)
            opened = _try_open(keys, chunk_index, sealed)
        if opened is None:
            if chunk_index < durable_count:
                log.warning(
                    "inode %d: chunk %d was durable before the crash and is damaged; not repairing",
                    pending.inode,
                    chunk_index,
                )
                return False
            break
        plaintext, last = opened
        accepted.append((chunk_index, plaintext, last))
        end_offset = offset + len(plaintext) + format.CHUNK_OVERHEAD
        chunk_index += 1
        if len(plaintext) < geometry.chunk_size:
            break

    if not accepted:
        if start > 0:
            # Nothing from *start* on survived; the chunk before it becomes the final one.
            previous = geometry.chunk_offset(start - 1)
            sealed = os.pread(fd, slot_size, previous)
            opened = _try_open(keys, start - 1, sealed)
            if opened is None:
                return False
            accepted.append((start - 1, opened[0], opened[1]))
            end_offset = geometry.chunk_offset(start)
        else:
            _pwrite_all(fd, keys.seal(0, b"", True), geometry.chunk_offset(0))
            os.ftruncate(fd, geometry.chunk_offset(0) + format.CHUNK_OVERHEAD)
            os.fsync(fd)
            return True

    os.ftruncate(fd, end_offset)
    final_index = accepted[-1][0]
    for chunk_index, plaintext, last in accepted:
        if last != (chunk_index == final_index):
            sealed = keys.seal(chunk_index, plaintext, chunk_index == final_index)
            _pwrite_all(fd, sealed, geometry.chunk_offset(chunk_index))
    os.fsync(fd)
    return True


def _try_open(keys: FileKeys, chunk_index: int, sealed: bytes) -> tuple[bytes, bool] | None:
    """Open a chunk read from a slot: a full chunk, or a shorter final one at the end."""
    if len(sealed) < format.CHUNK_OVERHEAD:
        return None
    try:
        return keys.open_either(chunk_index, sealed)
    except IntegrityError:
        return None
