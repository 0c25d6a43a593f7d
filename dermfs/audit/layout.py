"""The journal's bytes: file names, segment headers, record frames and the checkpoint.

Pure layout (docs/audit.md sections 1, 4 and 5): packing and parsing, no I/O. MACs are
computed with a :class:`~dermfs.cryptocore.Mac` the caller passes in.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermfs.cryptocore import MAC_SIZE, TAG_SIZE, Mac
from dermfs.errors import FormatError, IntegrityError

SEGMENT_MAGIC = b"DFSAUDIT"
VERSION = 1
ZERO_TAG = bytes(TAG_SIZE)

_SEGMENT_FIELDS = struct.Struct(">8sBIQ16s16s")
SEGMENT_HEADER_SIZE = _SEGMENT_FIELDS.size + MAC_SIZE

FRAME_HEADER = struct.Struct(">IBQ16s")
FRAME_HEADER_SIZE = FRAME_HEADER.size
FLAG_COMMIT = 0x01
KNOWN_FLAGS = FLAG_COMMIT
#: Longest sealed record accepted; a real record is a few hundred bytes.
MAX_SEALED = 65536

CHECKPOINT_FORMAT = "dermfs-audit-checkpoint"
STATE_FORMAT = "dermfs-audit-state"

_SEALED_NAME = re.compile(r"\.(\d{6,})")


# ------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class JournalFiles:
    """The names of a journal's files, all derived from the configured path."""

    path: Path

    @property
    def active(self) -> Path:
        return self.path

    @property
    def checkpoint(self) -> Path:
        return self.path.with_name(self.path.name + ".checkpoint")

    @property
    def checkpoint_tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".checkpoint.tmp")

    @property
    def state(self) -> Path:
        return self.path.with_name(self.path.name + ".state")

    @property
    def state_tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".state.tmp")

    @property
    def lock(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def next(self) -> Path:
        return self.path.with_name(self.path.name + ".next")

    def sealed(self, index: int) -> Path:
        """Return the name of the sealed segment *index*."""
        return self.path.with_name(f"{self.path.name}.{index:06d}")

    def sealed_segments(self) -> dict[int, Path]:
        """Return the sealed segment files present, by the index in their name."""
        found: dict[int, Path] = {}
        prefix = self.path.name
        for entry in self.path.parent.iterdir():
            name = entry.name
            if not name.startswith(prefix):
                continue
            match = _SEALED_NAME.fullmatch(name, len(prefix))
            if match is not None:
                found[int(match.group(1))] = entry
        return dict(sorted(found.items()))

    def any_exist(self) -> bool:
        """Whether any file of the journal (other than the lock) exists."""
        return (
            self.active.exists()
            or self.checkpoint.exists()
            or self.state.exists()
            or bool(self.sealed_segments())
        )


# ------------------------------------------------------------------------------ segments


@dataclass(frozen=True)
class SegmentHeader:
    """The 85-byte header at the start of every segment."""

    index: int
    first_seq: int
    journal_id: bytes
    prev_tag: bytes

    def pack(self, mac: Mac) -> bytes:
        """Return the header's bytes, MAC included."""
        fields = _SEGMENT_FIELDS.pack(
            SEGMENT_MAGIC, VERSION, self.index, self.first_seq, self.journal_id, self.prev_tag
        )
        return fields + mac.tag(fields)


def parse_segment_header(data: bytes) -> SegmentHeader:
    """Parse a segment header without checking its MAC.

    Raises:
        FormatError: *data* is too short, or not a version-1 segment header.
    """
    if len(data) < SEGMENT_HEADER_SIZE:
        raise FormatError("segment header is cut short")
    magic, version, index, first_seq, journal_id, prev_tag = _SEGMENT_FIELDS.unpack_from(data)
    if magic != SEGMENT_MAGIC or version != VERSION:
        raise FormatError("not a dermfs audit segment of version 1")
    return SegmentHeader(index, first_seq, journal_id, prev_tag)


def verify_segment_header(data: bytes, mac: Mac) -> None:
    """Check the MAC of the segment header at the start of *data*.

    Raises:
        IntegrityError: the MAC does not verify.
    """
    mac.verify(data[: _SEGMENT_FIELDS.size], data[_SEGMENT_FIELDS.size : SEGMENT_HEADER_SIZE])


# ------------------------------------------------------------------------------ frames


def frame_header(length: int, flags: int, seq: int, journal_id: bytes) -> bytes:
    """Return the 29 clear bytes in front of a sealed record."""
    return FRAME_HEADER.pack(length, flags, seq, journal_id)


def frame_aad(header: bytes | memoryview, prev_tag: bytes) -> bytes:
    """Return the AAD of a record: its frame header, then the previous record's tag."""
    return bytes(header) + prev_tag


# ------------------------------------------------------------------------------ checkpoint


@dataclass(frozen=True)
class SegmentEntry:
    """One segment as a checkpoint lists it."""

    index: int
    first_seq: int
    size: int


@dataclass(frozen=True)
class Checkpoint:
    """What the checkpoint file says about the journal's tail (docs/audit.md section 4)."""

    journal_id: bytes
    last_seq: int
    last_tag: bytes
    clean: bool
    time: str
    segments: tuple[SegmentEntry, ...] = field(default_factory=tuple)

    def _body(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": VERSION,
            "journal_id": self.journal_id.hex(),
            "last_seq": self.last_seq,
            "last_tag": self.last_tag.hex(),
            "clean": self.clean,
            "time": self.time,
            "segments": [
                {"index": s.index, "first_seq": s.first_seq, "size": s.size} for s in self.segments
            ],
        }

    def to_bytes(self, mac: Mac) -> bytes:
        """Return the checkpoint file's contents, MAC included."""
        body = self._body()
        body["mac"] = mac.tag(canonical(body)).hex()
        return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"

    @property
    def active(self) -> SegmentEntry:
        """The newest segment the checkpoint lists."""
        return self.segments[-1]


def canonical(obj: dict[str, Any]) -> bytes:
    """Serialise *obj* the way MACs are computed: sorted keys, compact, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def parse_checkpoint(data: bytes, mac: Mac) -> Checkpoint:
    """Parse and authenticate a checkpoint file.

    Raises:
        IntegrityError: the checkpoint is malformed or its MAC does not verify.
    """
    try:
        obj = json.loads(data)
        tag = bytes.fromhex(obj.pop("mac"))
    except (ValueError, KeyError, AttributeError, TypeError):
        raise IntegrityError("checkpoint is malformed") from None
    mac.verify(canonical(obj), tag)

    try:
        if obj["format"] != CHECKPOINT_FORMAT or obj["version"] != VERSION:
            raise IntegrityError("checkpoint is of an unknown format")
        segments = tuple(
            SegmentEntry(int(s["index"]), int(s["first_seq"]), int(s["size"]))
            for s in obj["segments"]
        )
        checkpoint = Checkpoint(
            journal_id=bytes.fromhex(obj["journal_id"]),
            last_seq=int(obj["last_seq"]),
            last_tag=bytes.fromhex(obj["last_tag"]),
            clean=bool(obj["clean"]),
            time=str(obj["time"]),
            segments=segments,
        )
    except (ValueError, KeyError, TypeError):
        raise IntegrityError("checkpoint is malformed") from None
    if not segments:
        raise IntegrityError("checkpoint lists no segment")
    return checkpoint
