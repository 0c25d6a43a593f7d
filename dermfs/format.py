"""The on-disk layout of ``docs/format.md``, as pure functions: no I/O and no keys.

Everything here packs, parses or computes positions. Parsers raise
:class:`~dermfs.errors.FormatError` for bytes that cannot be what they claim to be; they
never decide whether data is authentic, which is the crypto core's job.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dermfs.errors import FormatError

FORMAT_VERSION = 1

#: Feature flags this version of dermfs understands (``docs/format.md`` section 2).
KNOWN_FEATURES = frozenset({"chunks-aes256gcm", "names-aes-siv", "long-names", "intent-log"})
#: Feature flags ``init`` writes.
DEFAULT_FEATURES = ("chunks-aes256gcm", "names-aes-siv", "long-names", "intent-log")

DEFAULT_CHUNK_SIZE = 65536
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 1 << 20

VOLUME_FILE = "dermfs.volume"
DIRID_FILE = "dermfs.dirid"
LOCK_FILE = "dermfs.lock"
INTENT_FILE = "dermfs.intent"
TMP_PREFIX = "dermfs.tmp."
LONG_SUFFIX = ".long"
SIDECAR_SUFFIX = ".name"
#: Longest backing name we create (NAME_MAX of the backing filesystem).
MAX_BACKING_NAME = 255

ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
#: Bytes each chunk adds on disk: nonce and tag.
CHUNK_OVERHEAD = NONCE_SIZE + TAG_SIZE

# ------------------------------------------------------------------------------ encoding


def b64u_encode(data: bytes) -> str:
    """Encode *data* as base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    """Decode base64url without padding.

    Raises:
        FormatError: *text* is not base64url.
    """
    if not text or "=" in text or any(c in text for c in "+/\n"):
        raise FormatError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise FormatError("not base64url") from None
    # The decoder ignores stray characters and unused low bits of the last character;
    # only the one encoding we write is accepted, so that a name has one backing name.
    if b64u_encode(data) != text:
        raise FormatError("not base64url")
    return data


def is_reserved_name(backing_name: str) -> bool:
    """Tell whether a backing name belongs to dermfs rather than to an encrypted entry."""
    return "." in backing_name


# ------------------------------------------------------------------------------ file header

_HEADER_FIXED = struct.Struct(">4sHHI16s")
HEADER_MAGIC = b"DRMF"
#: Header bytes that are associated data of the wrapped file key (magic .. file id).
HEADER_AAD_SIZE = _HEADER_FIXED.size
#: Wrapped file key: nonce, 32 encrypted key bytes, tag.
WRAPPED_FILE_KEY_SIZE = NONCE_SIZE + 32 + TAG_SIZE
HEADER_SIZE = HEADER_AAD_SIZE + WRAPPED_FILE_KEY_SIZE


@dataclass(frozen=True)
class FileHeader:
    """The fields of a file header (``docs/format.md`` section 4.1)."""

    generation: int
    file_id: bytes
    wrapped_key: bytes

    def aad_prefix(self) -> bytes:
        """Return header bytes 0..28, the start of the wrapped key's associated data."""
        return pack_header_prefix(self.generation, self.file_id)

    def pack(self) -> bytes:
        """Return the 88 header bytes."""
        return self.aad_prefix() + self.wrapped_key


def pack_header_prefix(generation: int, file_id: bytes) -> bytes:
    """Return the fixed part of a header, which is also its key-wrapping AAD prefix."""
    return _HEADER_FIXED.pack(HEADER_MAGIC, FORMAT_VERSION, 0, generation, file_id)


def parse_header(data: bytes) -> FileHeader:
    """Parse the first 88 bytes of a backing file.

    Raises:
        FormatError: too short, wrong magic, unknown version or flags.
    """
    if len(data) < HEADER_SIZE:
        raise FormatError("file header is truncated")
    magic, version, flags, generation, file_id = _HEADER_FIXED.unpack_from(data)
    if magic != HEADER_MAGIC:
        raise FormatError("not a dermfs file header")
    if version != FORMAT_VERSION:
        raise FormatError(f"file header has unknown format version {version}")
    if flags != 0:
        raise FormatError(f"file header has unknown flags {flags:#x}")
    return FileHeader(generation, file_id, bytes(data[HEADER_AAD_SIZE:HEADER_SIZE]))


# ------------------------------------------------------------------------------ chunks

_CHUNK_AAD_TAIL = struct.Struct(">QB")


def chunk_aad(volume_id: bytes, file_id: bytes, chunk_index: int, last: bool) -> bytes:
    """Return a chunk's associated data: volume id, file id, index, last-chunk flag."""
    return volume_id + file_id + _CHUNK_AAD_TAIL.pack(chunk_index, 1 if last else 0)


@dataclass(frozen=True)
class ChunkGeometry:
    """Offset arithmetic for one chunk size (``docs/format.md`` sections 4.2 and 4.3)."""

    chunk_size: int

    @property
    def slot_size(self) -> int:
        """Bytes a full chunk takes on disk."""
        return self.chunk_size + CHUNK_OVERHEAD

    def chunk_count(self, plaintext_size: int) -> int:
        """Number of chunks a file of *plaintext_size* bytes has (at least one)."""
        return max(1, -(-plaintext_size // self.chunk_size))

    def chunk_offset(self, chunk_index: int) -> int:
        """Byte offset of chunk *chunk_index* in the backing file."""
        return HEADER_SIZE + chunk_index * self.slot_size

    def chunk_length(self, plaintext_size: int, chunk_index: int) -> int:
        """Plaintext bytes in chunk *chunk_index* of a file of *plaintext_size* bytes."""
        start = chunk_index * self.chunk_size
        return max(0, min(self.chunk_size, plaintext_size - start))

    def backing_size(self, plaintext_size: int) -> int:
        """Size of the backing file for a plaintext of *plaintext_size* bytes."""
        return HEADER_SIZE + plaintext_size + CHUNK_OVERHEAD * self.chunk_count(plaintext_size)

    def plaintext_size(self, backing_size: int) -> int:
        """Plaintext size of a backing file of *backing_size* bytes.

        Raises:
            FormatError: no well-formed file has that size (it was cut inside a chunk).
        """
        body = backing_size - HEADER_SIZE
        if body < CHUNK_OVERHEAD:
            raise FormatError("file is shorter than a header and one chunk")
        count = -(-body // self.slot_size)
        rest = body - (count - 1) * self.slot_size
        if rest < CHUNK_OVERHEAD or (count > 1 and rest == CHUNK_OVERHEAD):
            raise FormatError("file size does not end on a chunk")
        return body - CHUNK_OVERHEAD * count

    def plaintext_size_lenient(self, backing_size: int) -> int:
        """Best guess at the plaintext size of a damaged file, for ``stat``; never raises."""
        try:
            return self.plaintext_size(backing_size)
        except FormatError:
            body = max(0, backing_size - HEADER_SIZE)
            full = body // self.slot_size
            rest = max(0, body - full * self.slot_size - CHUNK_OVERHEAD)
            return full * self.chunk_size + rest


def check_chunk_size(chunk_size: int) -> None:
    """Raise FormatError unless *chunk_size* is a power of two within the allowed range."""
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise FormatError(
            f"chunk size {chunk_size} is not a power of two from {MIN_CHUNK_SIZE} "
            f"to {MAX_CHUNK_SIZE}"
        )


# ------------------------------------------------------------------------------ directory id

_DIRID = struct.Struct(">4sHH16s")
DIRID_MAGIC = b"DRMD"
DIRID_SIZE = _DIRID.size


def pack_dirid(dir_id: bytes) -> bytes:
    """Return the contents of a ``dermfs.dirid`` file."""
    return _DIRID.pack(DIRID_MAGIC, FORMAT_VERSION, 0, dir_id)


def parse_dirid(data: bytes) -> bytes:
    """Return the directory id held in a ``dermfs.dirid`` file.

    Raises:
        FormatError: wrong size, magic or version.
    """
    if len(data) != DIRID_SIZE:
        raise FormatError("directory id file has the wrong size")
    magic, version, _reserved, dir_id = _DIRID.unpack(data)
    if magic != DIRID_MAGIC or version != FORMAT_VERSION:
        raise FormatError("not a dermfs directory id file")
    return bytes(dir_id)


# ------------------------------------------------------------------------------ volume file


@dataclass(frozen=True)
class KeySlot:
    """One wrapped volume key in the volume file."""

    generation: int
    provider: str
    key_name: str
    key_version: int
    wrapped: bytes
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this slot."""
        return {
            "generation": self.generation,
            "provider": self.provider,
            "key_name": self.key_name,
            "key_version": self.key_version,
            "wrapped": b64u_encode(self.wrapped),
            "params": dict(self.params),
        }


@dataclass(frozen=True)
class VolumeFile:
    """The contents of ``dermfs.volume`` (``docs/format.md`` section 2)."""

    volume_id: bytes
    chunk_size: int
    keys: tuple[KeySlot, ...]
    features: tuple[str, ...] = DEFAULT_FEATURES
    mac: bytes = b""

    @property
    def current_key(self) -> KeySlot:
        """The newest generation's key slot."""
        return max(self.keys, key=lambda slot: slot.generation)

    def canonical(self) -> bytes:
        """Return the bytes the volume file's MAC covers."""
        return _canonical_json(self._fields())

    def to_bytes(self) -> bytes:
        """Return the file contents, MAC included."""
        obj = self._fields()
        obj["mac"] = b64u_encode(self.mac)
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("ascii")

    def _fields(self) -> dict[str, Any]:
        return {
            "dermfs": FORMAT_VERSION,
            "features": list(self.features),
            "chunk_size": self.chunk_size,
            "volume_id": b64u_encode(self.volume_id),
            "keys": [slot.to_json() for slot in self.keys],
        }


def _canonical_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def parse_volume_file(data: bytes) -> VolumeFile:
    """Parse ``dermfs.volume`` strictly. The MAC is parsed, not checked.

    Raises:
        FormatError: not JSON, a field missing or of the wrong type, an unknown field, an
            unknown format version or feature flag.
    """
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError("volume file is damaged or truncated (not valid JSON)") from None
    if not isinstance(obj, dict):
        raise FormatError("volume file is not a JSON object")

    version = obj.get("dermfs")
    if version != FORMAT_VERSION:
        raise FormatError(f"store has format version {version!r}; this dermfs reads version 1")
    _expect_keys(obj, {"dermfs", "features", "chunk_size", "volume_id", "keys", "mac"}, "")

    features = _typed(obj, "features", list, "")
    unknown = [flag for flag in features if flag not in KNOWN_FEATURES]
    if unknown or not all(isinstance(flag, str) for flag in features):
        raise FormatError(f"volume uses unknown feature flag(s): {', '.join(map(str, unknown))}")
    chunk_size = _typed(obj, "chunk_size", int, "")
    check_chunk_size(chunk_size)
    volume_id = b64u_decode(_typed(obj, "volume_id", str, ""))
    if len(volume_id) != ID_SIZE:
        raise FormatError("volume id has the wrong length")
    slots = tuple(_parse_slot(item) for item in _typed(obj, "keys", list, ""))
    if not slots:
        raise FormatError("volume file holds no wrapped key")
    mac = b64u_decode(_typed(obj, "mac", str, ""))

    return VolumeFile(volume_id, chunk_size, slots, tuple(features), mac)


def _parse_slot(item: object) -> KeySlot:
    if not isinstance(item, dict):
        raise FormatError("volume file: a keys entry is not an object")
    where = "keys[]."
    _expect_keys(
        item, {"generation", "provider", "key_name", "key_version", "wrapped", "params"}, where
    )
    return KeySlot(
        generation=_typed(item, "generation", int, where),
        provider=_typed(item, "provider", str, where),
        key_name=_typed(item, "key_name", str, where),
        key_version=_typed(item, "key_version", int, where),
        wrapped=b64u_decode(_typed(item, "wrapped", str, where)),
        params=_typed(item, "params", dict, where),
    )


def _expect_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise FormatError(f"volume file: unknown field {where}{unknown[0]}")
    missing = sorted(allowed - set(obj))
    if missing:
        raise FormatError(f"volume file: missing field {where}{missing[0]}")


def _typed(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"volume file: field {where}{key} must be a {kind.__name__}")
    return value


# ------------------------------------------------------------------------------ intent log

INTENT_MAGIC = b"DRMI"
_INTENT_HEADER = struct.Struct(">4sHH16s")
INTENT_HEADER_SIZE = _INTENT_HEADER.size
INTENT_TAG_SIZE = 16
_RECORD_PREFIX = struct.Struct(">IB")
_U64 = struct.Struct(">Q")
_DIRTY = struct.Struct(">Q16sQ")
_SAVED = struct.Struct(">QQ")

RECORD_DIRTY = 1
RECORD_SAVED = 2
RECORD_CLEAN = 3


def pack_intent_header(session_id: bytes) -> bytes:
    """Return the intent log's file header."""
    return _INTENT_HEADER.pack(INTENT_MAGIC, FORMAT_VERSION, 0, session_id)


def parse_intent_header(data: bytes) -> bytes:
    """Return the session id of an intent log.

    Raises:
        FormatError: not an intent log of this version.
    """
    if len(data) < INTENT_HEADER_SIZE:
        raise FormatError("intent log is truncated")
    magic, version, _reserved, session_id = _INTENT_HEADER.unpack_from(data)
    if magic != INTENT_MAGIC or version != FORMAT_VERSION:
        raise FormatError("not a dermfs intent log")
    return bytes(session_id)


def intent_record_body(record_type: int, body: bytes) -> bytes:
    """Return ``length || type || body``, the part of a record its tag follows."""
    return _RECORD_PREFIX.pack(len(body) + 1, record_type) + body


def intent_tag_input(session_id: bytes, record_number: int, record: bytes) -> bytes:
    """Return the bytes an intent record's MAC covers."""
    return session_id + _U64.pack(record_number) + record


def split_intent_records(data: bytes) -> list[tuple[int, bytes, bytes, bytes]]:
    """Split an intent log body into ``(type, body, record_bytes, tag)`` tuples.

    Stops quietly at a record that is cut short, which is how a torn final record looks.
    """
    records = []
    offset = 0
    while offset + _RECORD_PREFIX.size <= len(data):
        length, record_type = _RECORD_PREFIX.unpack_from(data, offset)
        end = offset + _RECORD_PREFIX.size + length - 1
        if length < 1 or end + INTENT_TAG_SIZE > len(data):
            break
        record = data[offset:end]
        tag = data[end : end + INTENT_TAG_SIZE]
        records.append((record_type, record[_RECORD_PREFIX.size :], record, tag))
        offset = end + INTENT_TAG_SIZE
    return records


def dirty_body(inode: int, file_id: bytes, backing_size: int, path: str) -> bytes:
    """Return the body of a DIRTY record."""
    return _DIRTY.pack(inode, file_id, backing_size) + path.encode("utf-8", "surrogateescape")


def parse_dirty_body(body: bytes) -> tuple[int, bytes, int, str]:
    """Return ``(inode, file_id, backing_size, path)`` from a DIRTY record body."""
    if len(body) < _DIRTY.size:
        raise FormatError("intent record is truncated")
    inode, file_id, size = _DIRTY.unpack_from(body)
    return inode, bytes(file_id), size, body[_DIRTY.size :].decode("utf-8", "surrogateescape")


def saved_body(inode: int, chunk_index: int, sealed: bytes) -> bytes:
    """Return the body of a SAVED record."""
    return _SAVED.pack(inode, chunk_index) + sealed


def parse_saved_body(body: bytes) -> tuple[int, int, bytes]:
    """Return ``(inode, chunk_index, sealed)`` from a SAVED record body."""
    if len(body) < _SAVED.size:
        raise FormatError("intent record is truncated")
    inode, chunk_index = _SAVED.unpack_from(body)
    return inode, chunk_index, bytes(body[_SAVED.size :])


def clean_body(inode: int) -> bytes:
    """Return the body of a CLEAN record."""
    return _U64.pack(inode)


def parse_clean_body(body: bytes) -> int:
    """Return the inode of a CLEAN record body."""
    if len(body) != _U64.size:
        raise FormatError("intent record has the wrong size")
    return int(_U64.unpack(body)[0])
