"""Known-answer tests: the library reproduces the committed format-1 vectors byte for byte.

The vectors in ``tests/vectors`` were made once by ``tests/vectors/make_vectors.py``, which
follows ``docs/format.md`` without using the library's layout code. Each test here
recomputes a vector through the library's own code path (with nonces fixed by replacing
``Aead.seal`` with a call to ``Aead._seal_with_nonce``), compares the bytes, and opens the
vector's ciphertext to get the plaintext back. A change to any layout, label, associated
data or encoding of format 1 fails here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from dermfs import content, format, intent, volume
from dermfs.content import FileKeys
from dermfs.cryptocore import Aead, Mac, Purpose, SecretKey, derive_subkey, wrap_key
from dermfs.errors import IntegrityError
from dermfs.keys.base import WrappedKey
from dermfs.volume import Volume

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
VECTOR_NAMES = (
    "subkeys",
    "file_header",
    "chunks",
    "names",
    "symlink",
    "xattr",
    "volume_file",
    "intent_log",
)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))
    return data


def unhex(text: str) -> bytes:
    return bytes.fromhex(text)


@pytest.fixture
def fixed_nonces(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Make every ``Aead.seal`` take its nonce from the returned list, in order."""
    nonces: list[bytes] = []

    def seal(self: Aead, plaintext: bytes, aad: bytes) -> bytes:
        assert nonces, "more seals than the vector has nonces"
        return self._seal_with_nonce(nonces.pop(0), plaintext, aad)

    monkeypatch.setattr(Aead, "seal", seal)
    return nonces


@pytest.fixture
def kat_volume(tmp_path: Path) -> Volume:
    """The vectors' volume, built from its volume file and the fixed volume key."""
    volume_file = format.parse_volume_file(load("volume_file")["file"].encode("ascii"))
    volume_key = SecretKey(unhex(load("subkeys")["volume_key"]))
    return Volume(tmp_path, volume_file, {1: volume_key})


def file_keys() -> FileKeys:
    vector = load("chunks")
    return FileKeys(
        unhex(vector["volume_id"]),
        unhex(vector["file_id"]),
        Aead(SecretKey(unhex(vector["file_key"]))),
        format.ChunkGeometry(vector["chunk_size"]),
    )


# ------------------------------------------------------------------------------ the files


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_vectors_are_of_the_current_format_version(name: str) -> None:
    assert load(name)["format_version"] == format.FORMAT_VERSION


def test_generator_reproduces_the_committed_vectors() -> None:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)

    assert set(generator.VECTORS) == set(VECTOR_NAMES)
    for name in VECTOR_NAMES:
        assert generator.build(name) == load(name), name


# ------------------------------------------------------------------------------ keys


def test_subkeys_of_every_purpose() -> None:
    vector = load("subkeys")
    volume_key = SecretKey(unhex(vector["volume_key"]))
    volume_id = unhex(vector["volume_id"])

    assert set(vector["subkeys"]) == {purpose.name for purpose in Purpose}
    for purpose in Purpose:
        expected = vector["subkeys"][purpose.name]
        assert purpose.value == expected["label"].encode("ascii")
        subkey = derive_subkey(volume_key, purpose, volume_id)
        assert subkey.reveal().hex() == expected["key"], purpose.name


# ------------------------------------------------------------------------------ files


def test_file_header_is_recomputed(
    kat_volume: Volume, fixed_nonces: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    vector = load("file_header")
    monkeypatch.setattr(volume, "random_id", lambda: unhex(vector["file_id"]))
    monkeypatch.setattr(volume, "random_key", lambda: SecretKey(unhex(vector["file_key"])))
    fixed_nonces.append(unhex(vector["nonce"]))

    header, keys = kat_volume.new_file_header()

    assert header.hex() == vector["header"]
    assert keys.file_id.hex() == vector["file_id"]
    assert not fixed_nonces


def test_file_header_opens_to_the_file_key(kat_volume: Volume) -> None:
    vector = load("file_header")
    chunk = load("chunks")["chunks"][0]

    keys = kat_volume.open_file_header(unhex(vector["header"]))

    assert keys.file_id.hex() == vector["file_id"]
    opened = keys.open(chunk["chunk_index"], unhex(chunk["sealed"]), chunk["last"])
    assert opened.hex() == chunk["plaintext"]


def test_every_header_byte_is_authenticated(kat_volume: Volume) -> None:
    header = unhex(load("file_header")["header"])

    for position in range(len(header)):
        changed = bytearray(header)
        changed[position] ^= 0x01
        with pytest.raises(IntegrityError):
            kat_volume.open_file_header(bytes(changed))


@pytest.mark.parametrize("case", range(3))
def test_chunk_seal_is_recomputed(case: int, fixed_nonces: list[bytes]) -> None:
    chunk = load("chunks")["chunks"][case]
    keys = file_keys()
    fixed_nonces.append(unhex(chunk["nonce"]))

    aad = keys.aad(chunk["chunk_index"], chunk["last"])
    sealed = keys.seal(chunk["chunk_index"], unhex(chunk["plaintext"]), chunk["last"])

    assert aad.hex() == chunk["aad"]
    assert sealed.hex() == chunk["sealed"]


@pytest.mark.parametrize("case", range(3))
def test_chunk_opens_only_at_its_index_and_flag(case: int) -> None:
    chunk = load("chunks")["chunks"][case]
    keys = file_keys()
    sealed = unhex(chunk["sealed"])
    index, last = chunk["chunk_index"], chunk["last"]

    assert keys.open(index, sealed, last).hex() == chunk["plaintext"]
    assert keys.open_either(index, sealed) == (unhex(chunk["plaintext"]), last)
    with pytest.raises(IntegrityError):
        keys.open(index, sealed, not last)
    with pytest.raises(IntegrityError):
        keys.open(index + 1, sealed, last)


def test_new_empty_file_is_header_and_empty_final_chunk(
    tmp_path: Path, fixed_nonces: list[bytes]
) -> None:
    header = unhex(load("file_header")["header"])
    empty = load("chunks")["chunks"][2]
    fixed_nonces.append(unhex(empty["nonce"]))
    path = tmp_path / "backing"

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        content.write_new_file(fd, header, file_keys())
    finally:
        os.close(fd)

    assert path.read_bytes() == header + unhex(empty["sealed"])
    assert len(path.read_bytes()) == 116


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize("case", range(2))
def test_name_is_recomputed_and_decrypts(kat_volume: Volume, case: int) -> None:
    vector = load("names")
    entry = vector["names"][case]
    dir_id = unhex(vector["dir_id"])

    backing = kat_volume.names.encrypt(dir_id, unhex(entry["name"]))

    assert backing.ciphertext.hex() == entry["encrypted"]
    assert backing.entry == entry["entry"]
    assert backing.sidecar == entry["sidecar"]
    if entry["sidecar"] is None:
        decrypted = kat_volume.names.decrypt(dir_id, entry["entry"])
    else:
        decrypted = kat_volume.names.decrypt_long(dir_id, entry["entry"], unhex(entry["encrypted"]))
    assert decrypted.hex() == entry["name"]


def test_long_name_vector_is_long_and_short_one_is_not() -> None:
    short, long = load("names")["names"]

    assert len(unhex(long["name"])) == 200
    assert long["entry"].endswith(".long") and long["sidecar"].endswith(".name")
    assert short["sidecar"] is None and "." not in short["entry"]


def test_symlink_target_is_recomputed_and_decrypts(
    kat_volume: Volume, fixed_nonces: list[bytes]
) -> None:
    vector = load("symlink")
    fixed_nonces.append(unhex(vector["nonce"]))

    assert kat_volume.symlinks.encrypt(unhex(vector["target"])) == vector["backing_target"]
    assert kat_volume.symlinks.decrypt(vector["backing_target"]).hex() == vector["target"]


def test_xattr_is_recomputed_and_decrypts(kat_volume: Volume, fixed_nonces: list[bytes]) -> None:
    vector = load("xattr")
    object_id = unhex(vector["object_id"])
    backing_name = unhex(vector["backing_name"])
    fixed_nonces.append(unhex(vector["nonce"]))

    assert kat_volume.xattrs.encrypt_name(unhex(vector["name"])) == backing_name
    sealed = kat_volume.xattrs.encrypt_value(object_id, backing_name, unhex(vector["value"]))
    assert sealed.hex() == vector["backing_value"]

    assert kat_volume.xattrs.decrypt_name(backing_name).hex() == vector["name"]
    opened = kat_volume.xattrs.decrypt_value(object_id, backing_name, sealed)
    assert opened.hex() == vector["value"]


# ------------------------------------------------------------------------------ volume file


class _FixedKekProvider:
    """The ``local`` key-file wrap of format section 2.1, with the vector's KEK."""

    name = "local"

    def __init__(self, kek: bytes) -> None:
        self._kek = SecretKey(kek)

    def describe(self) -> str:
        return "the known-answer KEK"

    def wrap(self, volume_key: SecretKey, volume_id: bytes) -> WrappedKey:
        blob = wrap_key(self._kek, volume_key, b"dermfs v1 local wrap" + volume_id)
        return WrappedKey(self.name, "keyfile", 1, blob)

    def unwrap(self, wrapped: WrappedKey, volume_id: bytes) -> SecretKey:
        return volume.unwrap_key_with(
            Aead(self._kek), wrapped.blob, b"dermfs v1 local wrap" + volume_id
        )


def test_volume_file_canonical_bytes_and_mac(fixed_nonces: list[bytes]) -> None:
    vector = load("volume_file")
    volume_key = SecretKey(unhex(vector["volume_key"]))
    volume_id = unhex(load("subkeys")["volume_id"])
    fixed_nonces.append(unhex(vector["wrap_nonce"]))

    wrapped = _FixedKekProvider(unhex(vector["kek"])).wrap(volume_key, volume_id)
    slot = format.KeySlot(1, wrapped.provider, wrapped.key_name, wrapped.key_version, wrapped.blob)
    unsigned = format.VolumeFile(volume_id, 4096, (slot,))
    mac = Mac(derive_subkey(volume_key, Purpose.VOLUME_FILE, volume_id)).tag(unsigned.canonical())

    assert unsigned.canonical() == vector["canonical"].encode("ascii")
    assert format.b64u_encode(mac) == vector["mac"]
    parsed = format.parse_volume_file(vector["file"].encode("ascii"))
    assert parsed.canonical() == vector["canonical"].encode("ascii")
    assert format.b64u_encode(parsed.mac) == vector["mac"]


def test_volume_file_vector_opens(tmp_path: Path) -> None:
    vector = load("volume_file")
    (tmp_path / format.VOLUME_FILE).write_text(vector["file"], encoding="ascii")
    (tmp_path / format.DIRID_FILE).write_bytes(format.pack_dirid(bytes(16)))

    opened = Volume.open(tmp_path, _FixedKekProvider(unhex(vector["kek"])))

    assert opened.volume_id.hex() == load("subkeys")["volume_id"]
    assert opened.geometry.chunk_size == 4096
    opened.close()


# ------------------------------------------------------------------------------ intent log


def intent_mac() -> Mac:
    vector = load("subkeys")
    volume_key = SecretKey(unhex(vector["volume_key"]))
    return Mac(derive_subkey(volume_key, Purpose.INTENT_LOG, unhex(vector["volume_id"])))


def test_intent_log_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vector = load("intent_log")
    monkeypatch.setattr(intent, "random_id", lambda: unhex(vector["session_id"]))
    path = tmp_path / format.INTENT_FILE

    log = intent.IntentLog(path, intent_mac())
    for record in vector["records"]:
        body = unhex(record["body"])
        if record["type"] == format.RECORD_DIRTY:
            log.dirty(*format.parse_dirty_body(body))
        elif record["type"] == format.RECORD_SAVED:
            log.saved(*format.parse_saved_body(body))
        else:
            log.clean(format.parse_clean_body(body))

    assert path.read_bytes().hex() == vector["log"]
    for dirty_inode in log.dirty_inodes:
        log.clean(dirty_inode)
    log.close()


def test_intent_log_record_tags(tmp_path: Path) -> None:
    vector = load("intent_log")
    session_id = unhex(vector["session_id"])

    for record_number, record in enumerate(vector["records"]):
        framed = format.intent_record_body(record["type"], unhex(record["body"]))
        tag = intent_mac().tag(format.intent_tag_input(session_id, record_number, framed))
        assert (framed + tag[: format.INTENT_TAG_SIZE]).hex() == record["bytes"]
        assert tag[: format.INTENT_TAG_SIZE].hex() == record["tag"]


def test_intent_log_vector_reads_back(tmp_path: Path) -> None:
    vector = load("intent_log")
    path = tmp_path / format.INTENT_FILE
    path.write_bytes(unhex(vector["log"]))

    pending = intent.read_pending(path, intent_mac())

    assert [
        {
            "inode": entry.inode,
            "file_id": entry.file_id.hex(),
            "path": entry.path,
            "durable_backing_size": entry.durable_backing_size,
            "saved": {str(index): sealed.hex() for index, sealed in entry.saved.items()},
        }
        for entry in pending
    ] == vector["pending"]
