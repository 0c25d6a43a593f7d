"""Walking a journal's segments and frames, and naming what is wrong where they break.

Both the verifier and the writer (at open, to find a torn tail) walk frames with
:func:`walk_frames`. It checks each frame's framing, journal id, seq and GCM tag against
the chain (docs/audit.md section 5.2) and stops at the first that fails, saying why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dermfs.audit.errors import DamageKind
from dermfs.audit.keys import JournalKeys
from dermfs.audit.layout import (
    FLAG_COMMIT,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_SEALED,
    SEGMENT_HEADER_SIZE,
    JournalFiles,
    SegmentHeader,
    frame_header,
    parse_segment_header,
    verify_segment_header,
)
from dermfs.cryptocore import SEAL_OVERHEAD, TAG_SIZE
from dermfs.errors import FormatError, IntegrityError

#: Called with the seq and plaintext of each record that verifies.
RecordSink = Callable[[int, bytes], None]


@dataclass(frozen=True)
class ChainPoint:
    """Where the chain stands: the last good record's seq and tag.

    Attributes:
        seq: the last record's seq, 0 before the first.
        tag: its GCM tag, zeros before the first.
        committed: whether that record closed a group commit (true before the first).
    """

    seq: int
    tag: bytes
    committed: bool = True


@dataclass(frozen=True)
class FrameStop:
    """Why a walk stopped before the end of its data.

    Attributes:
        kind: the damage, or ``None`` for a frame cut short or zero-filled (a torn write
            or an append in progress; whether that is damage is the caller's to decide).
        seq: the seq of the record at fault, or the expected seq when it is missing.
        offset: where the bad frame starts.
        what: a short description.
    """

    kind: DamageKind | None
    seq: int
    offset: int
    what: str


@dataclass(frozen=True)
class Walk:
    """The result of :func:`walk_frames`.

    Attributes:
        point: the chain after the last good frame.
        end: the offset just after the last good frame.
        records: how many frames verified.
        mark: ``(seq, tag)`` of the frame that ended exactly at the requested mark, if any.
        stop: why the walk stopped early, or ``None`` if it reached the end of the data.
    """

    point: ChainPoint
    end: int
    records: int
    mark: tuple[int, bytes] | None
    stop: FrameStop | None


def walk_frames(
    data: bytes,
    start: int,
    point: ChainPoint,
    keys: JournalKeys,
    sink: RecordSink | None = None,
    mark: int = -1,
) -> Walk:
    """Verify the frames of one segment's *data* from *start* on, chained from *point*.

    Args:
        data: the whole segment file.
        start: the offset of the first frame to check.
        point: the chain before that frame.
        keys: the journal's keys.
        sink: given the seq and plaintext of every record that verifies.
        mark: an offset at which a frame should end; the walk reports its seq and tag.
    """
    view = memoryview(data)
    size = len(data)
    journal_id = keys.journal_id
    open_record = keys.record_aead.open
    unpack = FRAME_HEADER.unpack_from
    seq, tag, committed = point.seq, point.tag, point.committed
    position = start
    count = 0
    marked: tuple[int, bytes] | None = None

    while position < size:
        expected = seq + 1
        if size - position < FRAME_HEADER_SIZE:
            return _stopped(seq, tag, committed, position, count, marked, None, "cut short")
        length, flags, frame_seq, frame_id = unpack(view, position)
        body = position + FRAME_HEADER_SIZE
        end = body + length
        if length < SEAL_OVERHEAD or length > MAX_SEALED or flags & ~KNOWN_FLAGS:
            kind = None if not any(view[position:]) else DamageKind.TAMPERED
            stop = FrameStop(kind, expected, position, f"record {expected} has a bad frame")
            return Walk(ChainPoint(seq, tag, committed), position, count, marked, stop)
        if end > size:
            return _stopped(seq, tag, committed, position, count, marked, None, "cut short")

        sealed = view[body:end]
        try:
            if frame_seq != expected or frame_id != journal_id:
                raise IntegrityError("out of place")
            plaintext = open_record(sealed, bytes(view[position:body]) + tag)
        except IntegrityError:
            stop = _classify(
                view, position, length, flags, frame_seq, frame_id, expected, tag, keys
            )
            return Walk(ChainPoint(seq, tag, committed), position, count, marked, stop)

        if sink is not None:
            sink(frame_seq, plaintext)
        seq = frame_seq
        tag = bytes(view[end - TAG_SIZE : end])
        committed = bool(flags & FLAG_COMMIT)
        count += 1
        if end == mark:
            marked = (seq, tag)
        position = end

    return Walk(ChainPoint(seq, tag, committed), position, count, marked, None)


def _stopped(
    seq: int,
    tag: bytes,
    committed: bool,
    position: int,
    count: int,
    marked: tuple[int, bytes] | None,
    kind: DamageKind | None,
    what: str,
) -> Walk:
    stop = FrameStop(kind, seq + 1, position, f"record {seq + 1} is {what}")
    return Walk(ChainPoint(seq, tag, committed), position, count, marked, stop)


def _classify(
    view: memoryview,
    position: int,
    length: int,
    flags: int,
    frame_seq: int,
    frame_id: bytes,
    expected: int,
    prev_tag: bytes,
    keys: JournalKeys,
) -> FrameStop:
    """Say why the frame at *position* failed: changed, foreign, missing or moved."""
    body = position + FRAME_HEADER_SIZE
    sealed = view[body : body + length]
    in_place = frame_header(length, flags, expected, keys.journal_id)
    try:
        keys.record_aead.open(sealed, in_place + prev_tag)
    except IntegrityError:
        pass
    else:
        return FrameStop(DamageKind.TAMPERED, expected, position, f"record {expected} was changed")

    if frame_seq == expected and frame_id == keys.journal_id:
        if not any(view[position:]):
            return FrameStop(None, expected, position, f"record {expected} is zero-filled")
        return FrameStop(DamageKind.TAMPERED, expected, position, f"record {expected} was changed")
    if frame_id != keys.journal_id:
        return FrameStop(
            DamageKind.FOREIGN,
            expected,
            position,
            f"record {expected} comes from another journal",
        )
    if frame_seq > expected and not _seq_later(view, body + length, expected):
        return FrameStop(DamageKind.MISSING, expected, position, f"record {expected} is missing")
    return FrameStop(
        DamageKind.REORDERED,
        frame_seq,
        position,
        f"record {frame_seq} is out of order (expected {expected})",
    )


def _seq_later(view: memoryview, position: int, wanted: int) -> bool:
    """Whether a frame with seq *wanted* follows *position* (headers only, best effort)."""
    size = len(view)
    while size - position >= FRAME_HEADER_SIZE:
        length, _flags, frame_seq, _frame_id = FRAME_HEADER.unpack_from(view, position)
        if frame_seq == wanted:
            return True
        if length < SEAL_OVERHEAD or length > MAX_SEALED:
            return False
        position += FRAME_HEADER_SIZE + length
    return False


# ------------------------------------------------------------------------------ segments


@dataclass(frozen=True)
class SegmentFile:
    """One segment file read whole.

    Attributes:
        path: the file.
        name_index: the index in its name, or ``None`` for the active segment ``P``.
        data: its bytes.
    """

    path: Path
    name_index: int | None
    data: bytes


def read_segments(files: JournalFiles) -> list[SegmentFile]:
    """Read every segment of the journal, sealed ones by index, then the active one.

    The active segment is opened first, so that a rotation that happens meanwhile shows
    up as a sealed file that is the same file (skipped), never as a gap.

    Raises:
        OSError: a segment could not be read.
    """
    try:
        active_fd: int | None = os.open(files.active, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        active_fd = None
    try:
        sealed = files.sealed_segments()
        active_inode = None if active_fd is None else os.fstat(active_fd).st_ino
        segments = []
        for index, path in sealed.items():
            with open(path, "rb") as file:
                if os.fstat(file.fileno()).st_ino == active_inode:
                    continue
                segments.append(SegmentFile(path, index, file.read()))
        if active_fd is not None:
            with os.fdopen(active_fd, "rb") as file:
                active_fd = None
                segments.append(SegmentFile(files.active, None, file.read()))
        return segments
    finally:
        if active_fd is not None:
            os.close(active_fd)


def check_segment_header(
    segment: SegmentFile, keys: JournalKeys
) -> tuple[SegmentHeader | None, DamageKind | None, str]:
    """Parse and authenticate a segment's header.

    Returns:
        ``(header, None, "")`` when it is good, else ``(header or None, kind, what)``.
    """
    try:
        header = parse_segment_header(segment.data)
    except FormatError:
        if len(segment.data) < SEGMENT_HEADER_SIZE:
            return None, DamageKind.TRUNCATED, "segment header is cut short"
        return None, DamageKind.TAMPERED, "segment header was changed"
    try:
        verify_segment_header(segment.data, keys.segment_mac)
    except IntegrityError:
        if header.journal_id != keys.journal_id:
            return header, DamageKind.FOREIGN, "segment comes from another journal"
        return header, DamageKind.TAMPERED, "segment header was changed"
    if segment.name_index is not None and segment.name_index != header.index:
        return header, DamageKind.REORDERED, f"segment {header.index} is named {segment.path.name}"
    return header, None, ""
