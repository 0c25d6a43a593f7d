"""Verifying a whole journal, and reading its records (docs/audit.md section 10).

:func:`verify` walks every segment and checks framing, decryption, seq continuity, the
chain, the checkpoint's MAC, and that the journal reaches the checkpoint. It stops at the
first bad record and names it. The walk never takes the writer's lock, so it can run
while the volume is mounted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dermfs.audit.errors import Damage, DamageKind
from dermfs.audit.keys import JournalKeys, load_journal_key
from dermfs.audit.layout import (
    SEGMENT_HEADER_SIZE,
    ZERO_TAG,
    Checkpoint,
    JournalFiles,
    SegmentEntry,
    parse_checkpoint,
)
from dermfs.audit.record import Record, record_from_json
from dermfs.audit.walk import (
    ChainPoint,
    RecordSink,
    SegmentFile,
    check_segment_header,
    read_segments,
    walk_frames,
)
from dermfs.cryptocore import SecretKey
from dermfs.errors import IntegrityError


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found.

    Attributes:
        journal: the journal's configured path.
        records: how many records verified.
        last_seq: the seq of the last record that verified.
        segments: how many segment files were read.
        clean: whether the checkpoint says the last writer closed the journal; ``None``
            when there is no readable checkpoint.
        after_checkpoint: records that verified after the checkpoint's position.
        unconfirmed_tail: bytes after the last record that form no valid record, in a
            journal not closed cleanly (an append in progress, or a crash's torn tail).
        damage: the first damage found, or ``None`` when the journal is intact.
    """

    journal: Path
    records: int
    last_seq: int
    segments: int
    clean: bool | None
    after_checkpoint: int
    unconfirmed_tail: int
    damage: Damage | None

    @property
    def intact(self) -> bool:
        """Whether no damage was found."""
        return self.damage is None

    def summary(self) -> str:
        """Return one line saying what was found."""
        if self.damage is not None:
            return f"audit journal damaged: {self.damage.describe()}"
        state = "closed cleanly" if self.clean else "open or not closed cleanly"
        line = (
            f"audit journal intact: {self.records} records (last seq {self.last_seq}) "
            f"in {self.segments} segment(s), {state}"
        )
        if self.after_checkpoint:
            line += f"; {self.after_checkpoint} record(s) after the checkpoint"
        if self.unconfirmed_tail:
            line += f"; {self.unconfirmed_tail} byte(s) of unconfirmed tail"
        return line


def verify(
    journal: Path, journal_id: bytes, audit_key: SecretKey, sink: RecordSink | None = None
) -> VerifyResult:
    """Verify the journal at *journal* with the volume's audit subkey.

    Args:
        journal: the configured journal path (``audit.journal``).
        journal_id: the volume id.
        audit_key: ``Volume.audit_key()``.
        sink: given the seq and plaintext of each record that verifies, in order.

    Raises:
        OSError: a journal file exists but cannot be read.
    """
    files = JournalFiles(journal)
    if not files.any_exist():
        return _broken(journal, DamageKind.MISSING, journal, "there is no journal")
    try:
        keys = load_journal_key(files, journal_id, audit_key)
    except FileNotFoundError:
        return _broken(
            journal, DamageKind.MISSING, files.state, "the journal's key file is missing"
        )
    except IntegrityError as exc:
        kind = DamageKind.FOREIGN if "another volume" in str(exc) else DamageKind.TAMPERED
        return _broken(journal, kind, files.state, "the journal's key file does not authenticate")
    return _Verifier(files, keys, sink).run()


def _broken(journal: Path, kind: DamageKind, file: Path, what: str) -> VerifyResult:
    return VerifyResult(journal, 0, 0, 0, None, 0, 0, Damage(kind, None, file, None, what))


class _Verifier:
    """One verification run; see :func:`verify`."""

    def __init__(self, files: JournalFiles, keys: JournalKeys, sink: RecordSink | None) -> None:
        self.files = files
        self.keys = keys
        self.sink = sink
        self.records = 0
        self.after_checkpoint = 0
        self.unconfirmed = 0
        self.segments_read = 0
        self.point = ChainPoint(0, ZERO_TAG)
        self.checkpoint: Checkpoint | None = None
        self.checkpoint_damage: Damage | None = None
        self.checkpoint_tag: bytes | None = None
        self.listed: dict[int, SegmentEntry] = {}
        self.seen: set[int] = set()

    def run(self) -> VerifyResult:
        self._read_checkpoint()
        segments = read_segments(self.files)
        damage = self._walk(segments) or self.checkpoint_damage or self._compare(segments)
        checkpoint = self.checkpoint
        return VerifyResult(
            journal=self.files.path,
            records=self.records,
            last_seq=self.point.seq,
            segments=self.segments_read,
            clean=None if checkpoint is None else checkpoint.clean,
            after_checkpoint=self.after_checkpoint,
            unconfirmed_tail=self.unconfirmed,
            damage=damage,
        )

    def _read_checkpoint(self) -> None:
        path = self.files.checkpoint
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.checkpoint_damage = Damage(
                DamageKind.MISSING, None, path, None, "the checkpoint is missing"
            )
            return
        try:
            checkpoint = parse_checkpoint(data, self.keys.checkpoint_mac)
        except IntegrityError:
            self.checkpoint_damage = Damage(
                DamageKind.TAMPERED, None, path, None, "the checkpoint does not authenticate"
            )
            return
        if checkpoint.journal_id != self.keys.journal_id:
            self.checkpoint_damage = Damage(
                DamageKind.FOREIGN, None, path, None, "the checkpoint is another journal's"
            )
            return
        self.checkpoint = checkpoint
        self.listed = {entry.index: entry for entry in checkpoint.segments}

    def _tolerated_from(self, index: int) -> int | None:
        """Offset from which a torn tail is tolerated in segment *index*, if anywhere."""
        checkpoint = self.checkpoint
        if checkpoint is None or checkpoint.clean:
            return None
        active = checkpoint.active
        if index > active.index:
            return SEGMENT_HEADER_SIZE
        if index == active.index:
            return active.size
        return None

    def _walk(self, segments: list[SegmentFile]) -> Damage | None:
        listed = self.listed
        seen = self.seen
        for number, segment in enumerate(segments):
            last = number == len(segments) - 1
            header, kind, what = check_segment_header(segment, self.keys)
            if kind is not None or header is None:
                seq = None if header is None else header.first_seq
                return Damage(kind or DamageKind.TAMPERED, seq, segment.path, 0, what)
            self.segments_read += 1

            expected = self.point.seq + 1
            for index, entry in listed.items():
                if index < header.index and index not in seen:
                    return Damage(
                        DamageKind.MISSING,
                        entry.first_seq,
                        self.files.sealed(index),
                        None,
                        f"segment {index} (from record {entry.first_seq}) is missing",
                    )
            if header.index in seen or header.first_seq < expected:
                return Damage(
                    DamageKind.REORDERED,
                    header.first_seq,
                    segment.path,
                    0,
                    f"segment {header.index} is out of order",
                )
            if header.first_seq > expected:
                return Damage(
                    DamageKind.MISSING, expected, segment.path, 0, f"record {expected} is missing"
                )
            if header.prev_tag != self.point.tag:
                return Damage(
                    DamageKind.TAMPERED,
                    expected,
                    segment.path,
                    0,
                    f"segment {header.index} does not follow the one before",
                )
            seen.add(header.index)
            checkpoint = self.checkpoint
            at_start = checkpoint is not None and checkpoint.active.size == SEGMENT_HEADER_SIZE
            if at_start and checkpoint is not None and checkpoint.active.index == header.index:
                # The checkpoint was written just after a rotation: its position is this
                # header, which names the last record by its tag.
                self.checkpoint_tag = header.prev_tag

            damage = self._walk_segment(segment, header.index, last)
            if damage is not None:
                return damage
        return None

    def _walk_segment(self, segment: SegmentFile, index: int, last: bool) -> Damage | None:
        checkpoint = self.checkpoint
        mark = -1
        if checkpoint is not None and checkpoint.active.index == index:
            mark = checkpoint.active.size
        walk = walk_frames(
            segment.data, SEGMENT_HEADER_SIZE, self.point, self.keys, self.sink, mark
        )
        self.records += walk.records
        self.point = walk.point
        if walk.mark is not None:
            self.checkpoint_tag = walk.mark[1]
        if checkpoint is not None:
            self.after_checkpoint = max(0, self.point.seq - checkpoint.last_seq)

        stop = walk.stop
        if stop is None:
            return self._check_size(segment, index)
        tolerated = self._tolerated_from(index)
        torn = stop.kind is None or stop.kind is DamageKind.TAMPERED
        if last and torn and tolerated is not None and stop.offset >= tolerated:
            self.unconfirmed = len(segment.data) - stop.offset
            return None
        kind = stop.kind or DamageKind.TRUNCATED
        return Damage(kind, stop.seq, segment.path, stop.offset, stop.what)

    def _check_size(self, segment: SegmentFile, index: int) -> Damage | None:
        """A segment that verified but is shorter than the checkpoint says lost its end."""
        entry = self.listed.get(index)
        if entry is None or len(segment.data) >= entry.size:
            return None
        return self._shortened(segment.path, len(segment.data))

    def _shortened(self, path: Path, offset: int | None) -> Damage:
        """Damage for a journal that ends early, cut short or rolled back."""
        expected = self.point.seq + 1
        if self.point.committed and self.unconfirmed == 0:
            kind, what = DamageKind.ROLLED_BACK, "the journal is an older copy of itself"
        else:
            kind, what = DamageKind.TRUNCATED, "the journal was cut short"
        last_seq = 0 if self.checkpoint is None else self.checkpoint.last_seq
        return Damage(
            kind,
            expected,
            path,
            offset,
            f"{what}: it ends before record {expected}, the checkpoint names record {last_seq}",
        )

    def _compare(self, segments: list[SegmentFile]) -> Damage | None:
        """Check that the journal reaches the checkpoint with the checkpoint's tag."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            return None
        for index, entry in self.listed.items():
            if index not in self.seen:
                path = self.files.sealed(index) if index < checkpoint.active.index else None
                return Damage(
                    DamageKind.MISSING,
                    entry.first_seq,
                    path or self.files.active,
                    None,
                    f"segment {index} (from record {entry.first_seq}) is missing",
                )
        if self.point.seq < checkpoint.last_seq:
            return self._shortened(segments[-1].path, None)
        if checkpoint.last_seq == 0:
            return None
        if self.checkpoint_tag != checkpoint.last_tag:
            return Damage(
                DamageKind.TAMPERED,
                checkpoint.last_seq,
                self.files.checkpoint,
                None,
                f"record {checkpoint.last_seq} is not the one the checkpoint names",
            )
        return None


def read_records(
    journal: Path,
    journal_id: bytes,
    audit_key: SecretKey,
    keep: Callable[[Record], bool] | None = None,
) -> tuple[list[Record], VerifyResult]:
    """Verify the journal and return its records (those *keep* accepts) up to any damage.

    Raises:
        OSError: a journal file exists but cannot be read.
        ValueError: a record authenticates but is not a record (a bug, not damage).
    """
    records: list[Record] = []

    def sink(_seq: int, plaintext: bytes) -> None:
        record = record_from_json(plaintext)
        if keep is None or keep(record):
            records.append(record)

    result = verify(journal, journal_id, audit_key, sink)
    return records, result
