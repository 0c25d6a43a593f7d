"""Opening an existing journal for writing: checks, and the cut of a torn tail.

docs/audit.md section 9. The writer trusts what the checkpoint covers after a few cheap
checks (the listed segments exist and are long enough, the record at the checkpoint's
position has its tag), and verifies only what comes after. Damage found here is raised as
:class:`JournalDamaged`, so that the writer never appends to, and never cuts, evidence.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dermfs.audit.errors import AuditUnavailable, Damage, DamageKind, JournalDamaged
from dermfs.audit.keys import JournalKeys, create_journal_key, load_journal_key
from dermfs.audit.layout import (
    SEGMENT_HEADER_SIZE,
    ZERO_TAG,
    Checkpoint,
    JournalFiles,
    SegmentEntry,
    SegmentHeader,
    parse_checkpoint,
)
from dermfs.audit.record import RecordClock
from dermfs.audit.segment import ActiveSegment
from dermfs.audit.walk import ChainPoint, SegmentFile, check_segment_header, walk_frames
from dermfs.cryptocore import TAG_SIZE, SecretKey
from dermfs.errors import IntegrityError

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    """An existing journal, opened for appending.

    Attributes:
        segment: the active segment, positioned after its last good record.
        point: the chain at that record.
        unclean: whether the last writer did not close the journal.
        cut: bytes of torn tail that were cut off.
    """

    segment: ActiveSegment
    point: ChainPoint
    unclean: bool
    cut: int


def _damaged(kind: DamageKind, seq: int | None, file: Path, what: str) -> JournalDamaged:
    return JournalDamaged(Damage(kind, seq, file, None, what))


def remove_leftovers(files: JournalFiles) -> None:
    """Remove temporary files a crash may have left."""
    for leftover in (files.next, files.checkpoint_tmp, files.state_tmp):
        leftover.unlink(missing_ok=True)


def read_checkpoint(files: JournalFiles, keys: JournalKeys) -> Checkpoint | None:
    """Return the authenticated checkpoint, or ``None`` if there is none.

    Raises:
        JournalDamaged: it does not authenticate or belongs to another journal.
    """
    try:
        data = files.checkpoint.read_bytes()
    except FileNotFoundError:
        return None
    try:
        checkpoint = parse_checkpoint(data, keys.checkpoint_mac)
    except IntegrityError:
        raise _damaged(
            DamageKind.TAMPERED, None, files.checkpoint, "the checkpoint does not authenticate"
        ) from None
    if checkpoint.journal_id != keys.journal_id:
        raise _damaged(
            DamageKind.FOREIGN, None, files.checkpoint, "the checkpoint is another journal's"
        )
    return checkpoint


def open_existing(files: JournalFiles, keys: JournalKeys, checkpoint: Checkpoint) -> Recovered:
    """Open the journal that *checkpoint* describes, cutting a torn tail.

    Raises:
        JournalDamaged: the journal does not match its checkpoint.
        OSError: a file could not be read, cut or opened.
    """
    fd = os.open(files.active, os.O_RDWR | os.O_CLOEXEC)
    try:
        return _recover(files, keys, checkpoint, fd)
    except BaseException:
        os.close(fd)
        raise


def _recover(files: JournalFiles, keys: JournalKeys, checkpoint: Checkpoint, fd: int) -> Recovered:
    active_inode = os.fstat(fd).st_ino
    sealed = files.sealed_segments()
    for index, path in list(sealed.items()):
        if os.stat(path).st_ino == active_inode:
            log.info("audit journal: finishing an interrupted rotation of segment %d", index)
            path.unlink()
            del sealed[index]

    active = SegmentFile(files.active, None, _read_all(fd))
    header, kind, what = check_segment_header(active, keys)
    if kind is not None or header is None:
        raise _damaged(kind or DamageKind.TAMPERED, None, files.active, what)
    _check_listed(files, checkpoint, sealed, header)

    point = ChainPoint(checkpoint.last_seq, checkpoint.last_tag)
    entries = [entry for entry in checkpoint.segments if entry.index < checkpoint.active.index]
    end = checkpoint.active.size
    for index in range(checkpoint.active.index, header.index + 1):
        segment = active if index == header.index else _read_segment(files, index)
        this = header if index == header.index else _header_of(segment, keys)
        start = SEGMENT_HEADER_SIZE
        if index == checkpoint.active.index:
            start = checkpoint.active.size
            _check_position(segment, this, checkpoint)
        elif this.first_seq != point.seq + 1 or this.prev_tag != point.tag:
            raise _damaged(
                DamageKind.MISSING, point.seq + 1, segment.path, "a segment does not follow on"
            )

        walk = walk_frames(segment.data, start, point, keys)
        point, end = walk.point, walk.end
        if walk.stop is not None:
            if index != header.index or walk.stop.kind not in (None, DamageKind.TAMPERED):
                kind = walk.stop.kind or DamageKind.TRUNCATED
                raise _damaged(kind, walk.stop.seq, segment.path, walk.stop.what)
            if checkpoint.clean:
                raise _damaged(
                    walk.stop.kind or DamageKind.TRUNCATED,
                    walk.stop.seq,
                    segment.path,
                    "bytes follow the last record of a journal that was closed cleanly",
                )
        if index != header.index:
            entries.append(SegmentEntry(index, this.first_seq, len(segment.data)))

    cut = len(active.data) - end
    if cut:
        log.warning(
            "audit journal %s: cutting %d byte(s) of torn tail after record %d",
            files.active,
            cut,
            point.seq,
        )
        os.ftruncate(fd, end)
        os.fsync(fd)
    writer = ActiveSegment(files, keys, fd, header.index, header.first_seq, end, entries)
    return Recovered(writer, point, unclean=not checkpoint.clean or cut > 0, cut=cut)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_segment(files: JournalFiles, index: int) -> SegmentFile:
    path = files.sealed(index)
    try:
        return SegmentFile(path, index, path.read_bytes())
    except FileNotFoundError:
        raise _damaged(DamageKind.MISSING, None, path, f"segment {index} is missing") from None


def _header_of(segment: SegmentFile, keys: JournalKeys) -> SegmentHeader:
    header, kind, what = check_segment_header(segment, keys)
    if kind is not None or header is None:
        raise _damaged(kind or DamageKind.TAMPERED, None, segment.path, what)
    return header


def _check_listed(
    files: JournalFiles, checkpoint: Checkpoint, sealed: dict[int, Path], header: SegmentHeader
) -> None:
    """Every segment the checkpoint lists is there, and ``P`` is not older than it says."""
    if header.index < checkpoint.active.index:
        raise _damaged(
            DamageKind.ROLLED_BACK,
            checkpoint.last_seq,
            files.active,
            f"segment {header.index} is older than the checkpoint's segment "
            f"{checkpoint.active.index}",
        )
    for entry in checkpoint.segments:
        if entry.index == header.index:
            continue
        path = files.sealed(entry.index)
        if entry.index not in sealed:
            raise _damaged(
                DamageKind.MISSING, entry.first_seq, path, f"segment {entry.index} is missing"
            )
        if entry.index < checkpoint.active.index and os.stat(path).st_size < entry.size:
            raise _damaged(DamageKind.TRUNCATED, None, path, f"segment {entry.index} was cut short")


def _check_position(segment: SegmentFile, header: SegmentHeader, checkpoint: Checkpoint) -> None:
    """The segment reaches the checkpoint's position, and the record there is its last."""
    size = checkpoint.active.size
    data = segment.data
    if len(data) < size:
        raise _damaged(
            DamageKind.ROLLED_BACK,
            checkpoint.last_seq,
            segment.path,
            f"the journal ends before record {checkpoint.last_seq}, which the checkpoint names",
        )
    if size == SEGMENT_HEADER_SIZE:
        in_place = header.first_seq == checkpoint.last_seq + 1
        in_place = in_place and header.prev_tag == checkpoint.last_tag
    else:
        in_place = data[size - TAG_SIZE : size] == checkpoint.last_tag
    if not in_place:
        raise _damaged(
            DamageKind.TAMPERED,
            checkpoint.last_seq,
            segment.path,
            f"record {checkpoint.last_seq} is not the one the checkpoint names",
        )


# ------------------------------------------------------------------------------ opening


def take_lock(files: JournalFiles) -> int:
    """Take ``P.lock`` and return its descriptor, which holds the lock until closed.

    Raises:
        AuditUnavailable: another process holds it, or it cannot be opened.
    """
    try:
        fd = os.open(files.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AuditUnavailable(
            f"cannot open the audit journal {files.path}: {exc.strerror}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise AuditUnavailable(
                f"the audit journal {files.path} is in use by another process"
            ) from None
        raise AuditUnavailable(
            f"cannot lock the audit journal {files.path}: {exc.strerror}"
        ) from None
    return fd


def open_files(
    files: JournalFiles, journal_id: bytes, audit_key: SecretKey
) -> tuple[JournalKeys, ActiveSegment, ChainPoint, bool]:
    """Open or create the journal's files; return keys, segment, chain tail, unclean.

    Raises:
        JournalDamaged: the files do not fit together.
        OSError: a file could not be read or written.
    """
    remove_leftovers(files)
    empty = ChainPoint(0, ZERO_TAG)
    if not files.state.exists():
        if files.any_exist():
            raise JournalDamaged(
                Damage(
                    DamageKind.MISSING, None, files.state, None, "the journal's key file is missing"
                )
            )
        keys = create_journal_key(files, journal_id, audit_key, RecordClock().now())
        log.info("audit journal %s: created", files.path)
        return keys, ActiveSegment.create_first(files, keys), empty, False

    try:
        keys = load_journal_key(files, journal_id, audit_key)
    except IntegrityError:
        raise JournalDamaged(
            Damage(
                DamageKind.TAMPERED,
                None,
                files.state,
                None,
                "the journal's key file does not unwrap under this volume's audit key "
                "(changed, another volume's, or not rewrapped after a rekey)",
            )
        ) from None

    checkpoint = read_checkpoint(files, keys)
    if checkpoint is not None:
        if not files.active.exists():
            raise JournalDamaged(
                Damage(
                    DamageKind.MISSING, None, files.active, None, "the active segment is missing"
                )
            )
        recovered = open_existing(files, keys, checkpoint)
        return keys, recovered.segment, recovered.point, recovered.unclean

    # No checkpoint: only a crash while the journal was being created leaves that.
    if files.sealed_segments() or (
        files.active.exists() and files.active.stat().st_size > SEGMENT_HEADER_SIZE
    ):
        raise JournalDamaged(
            Damage(DamageKind.MISSING, None, files.checkpoint, None, "the checkpoint is missing")
        )
    files.active.unlink(missing_ok=True)
    return keys, ActiveSegment.create_first(files, keys), empty, False
