"""Attacks by someone who can write the store, each detected on read and by fsck.

Every test builds a small volume through the library, changes the store's bytes the way an
attacker with write access could (DESIGN section 1), and checks two things: reading the
damaged data through the library raises IntegrityError instead of returning anything, and
:func:`dermfs.fsck.check_volume` reports exactly the damaged item with the right kind.
Attacks on the volume file must stop :meth:`Volume.open` itself.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dermfs import format
from dermfs.cryptocore import SecretKey, digest, random_key, unwrap_key, wrap_key
from dermfs.errors import FormatError, IntegrityError, StoreError, WrongKeyError
from dermfs.fsck import FsckReport, check_volume, count_entries
from dermfs.keys.base import WrappedKey
from dermfs.tree import PlainTree
from dermfs.volume import Volume, create_store

CHUNK_SIZE = 4096
SLOT = CHUNK_SIZE + format.CHUNK_OVERHEAD
LONG_NAME = "L" * 200

#: Plaintext files of the test volume; sizes chosen for a short final chunk (a.bin), only
#: full chunks (b.bin), several chunks (c.bin), a long name and an empty file.
FILE_SIZES = {
    "a.bin": 3 * CHUNK_SIZE + CHUNK_SIZE // 2,
    "docs/b.bin": 3 * CHUNK_SIZE,
    "docs/c.bin": 4 * CHUNK_SIZE + 1000,
    f"docs/{LONG_NAME}": CHUNK_SIZE + 1904,
    "empty": 0,
}
SYMLINK = "docs/link"
SYMLINK_TARGET = b"../a.bin"
DIRECTORIES = ("docs", "docs/sub")
XATTR_NAME = b"user.comment"
XATTR_VALUE = b"seen by dermatology"


class MemoryProvider:
    """A ``local``-named key provider whose key-encryption key lives only in memory."""

    name = "local"

    def __init__(self) -> None:
        self._kek = random_key()

    def describe(self) -> str:
        return "an in-memory key"

    def wrap(self, volume_key: SecretKey, volume_id: bytes) -> WrappedKey:
        return WrappedKey(self.name, "memory", 1, wrap_key(self._kek, volume_key, volume_id))

    def unwrap(self, wrapped: WrappedKey, volume_id: bytes) -> SecretKey:
        try:
            return unwrap_key(self._kek, wrapped.blob, volume_id)
        except IntegrityError:
            raise WrongKeyError("the wrapped key is not this provider's") from None


@dataclass
class Built:
    """A test volume: its store, its provider, the plaintext data and backing paths."""

    store: Path
    provider: MemoryProvider
    data: dict[str, bytes]
    backing: dict[str, Path]

    def volume_file(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.store / format.VOLUME_FILE).read_text())
        return loaded

    def write_volume_file(self, obj: dict[str, object]) -> None:
        (self.store / format.VOLUME_FILE).write_text(json.dumps(obj))


def build_volume(store: Path, provider: MemoryProvider) -> Built:
    """Make a store holding FILE_SIZES, DIRECTORIES, a symlink and two xattrs."""
    store.mkdir()
    create_store(store, provider, CHUNK_SIZE)
    volume = Volume.open(store, provider)
    volume.start_writing()
    try:
        tree = PlainTree(volume)
        for directory in DIRECTORIES:
            tree.mkdir(directory)
        data = {path: os.urandom(size) for path, size in FILE_SIZES.items()}
        for path, plaintext in data.items():
            tree.write_file(path, plaintext)
        tree.symlink(SYMLINK, SYMLINK_TARGET)
        backing = {path: store / tree.backing_path(path) for path in [*DIRECTORIES, *data, SYMLINK]}

        with open(backing["a.bin"], "rb") as file:
            file_id = volume.read_file_keys(file.fileno()).file_id
        _set_xattr(volume, backing["a.bin"], file_id, XATTR_NAME, XATTR_VALUE)
        docs_fd = os.open(backing["docs"], os.O_RDONLY | os.O_DIRECTORY)
        try:
            dir_id = volume.read_dir_id(docs_fd)
        finally:
            os.close(docs_fd)
        _set_xattr(volume, backing["docs"], dir_id, b"user.tag", b"2024")
    finally:
        volume.close()
    return Built(store, provider, data, backing)


def _set_xattr(volume: Volume, path: Path, object_id: bytes, name: bytes, value: bytes) -> None:
    backing_name = volume.xattrs.encrypt_name(name)
    os.setxattr(path, backing_name, volume.xattrs.encrypt_value(object_id, backing_name, value))


@pytest.fixture
def provider() -> MemoryProvider:
    return MemoryProvider()


@pytest.fixture
def built(tmp_path: Path, provider: MemoryProvider) -> Built:
    return build_volume(tmp_path / "store", provider)


@pytest.fixture
def reader(built: Built) -> Iterator[PlainTree]:
    """A read-only view of the built volume, as a reader after the attack sees it."""
    volume = Volume.open(built.store, built.provider)
    yield PlainTree(volume)
    volume.close()


def fsck(built: Built, on_progress: Callable[[int], None] | None = None) -> FsckReport:
    volume = Volume.open(built.store, built.provider)
    try:
        return check_volume(volume, on_progress)
    finally:
        volume.close()


def damage_of(report: FsckReport) -> dict[str, list[str]]:
    return {where.display: kinds for where, kinds in report.damaged_items().items()}


def backing_display(built: Built, path: Path) -> str:
    return "[store] " + str(path.relative_to(built.store))


# ------------------------------------------------------------------------------ byte tools


def flip_bit(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ mask]))


def read_chunk(path: Path, chunk_index: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(format.HEADER_SIZE + chunk_index * SLOT)
        return file.read(SLOT)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def chunk_offset(chunk_index: int) -> int:
    return format.HEADER_SIZE + chunk_index * SLOT


def read_range(reader: PlainTree, built: Built, path: str, offset: int, length: int) -> bytes:
    """Read part of a file through ContentFile, as the FUSE frontend does."""
    fd = os.open(built.backing[path], os.O_RDONLY)
    try:
        content = reader.volume.open_file(fd, os.fstat(fd).st_ino)
        return content.read(offset, length)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ clean volume


def test_clean_volume_reports_no_damage(built: Built, reader: PlainTree) -> None:
    progress: list[int] = []

    report = fsck(built, progress.append)

    assert report.findings == []
    assert report.clean
    assert (report.files, report.directories) == (len(FILE_SIZES) + 1, len(DIRECTORIES) + 1)
    assert report.lines() == ["fsck: 6 files, 3 directories checked, 0 damaged"]
    assert progress[0] == 0
    assert sum(progress) == report.files == count_entries(built.store)
    for path, plaintext in built.data.items():
        assert reader.read_file(path) == plaintext
    assert not (built.store / format.INTENT_FILE).exists()


def test_fsck_refuses_a_store_in_use(built: Built) -> None:
    mounted = Volume.open(built.store, built.provider)
    mounted.start_writing()
    try:
        with pytest.raises(StoreError, match="in use"):
            fsck(built)
    finally:
        mounted.close()


def test_fsck_with_the_wrong_key_fails_before_touching_anything(built: Built) -> None:
    with pytest.raises(WrongKeyError):
        Volume.open(built.store, MemoryProvider())


# ------------------------------------------------------------------------------ headers

HEADER_OFFSETS = {
    "magic": 0,
    "version": 5,
    "flags": 7,
    "generation": 11,
    "file id first": 12,
    "file id last": 27,
    "nonce": 28,
    "nonce last": 39,
    "wrapped key": 40,
    "wrapped key last": 71,
    "tag": 72,
    "tag last": 87,
}


@pytest.mark.parametrize("offset", HEADER_OFFSETS.values(), ids=HEADER_OFFSETS.keys())
def test_header_bit_flip(built: Built, reader: PlainTree, offset: int) -> None:
    flip_bit(built.backing["a.bin"], offset)

    with pytest.raises(IntegrityError):
        reader.read_file("a.bin")
    assert damage_of(fsck(built)) == {"/a.bin": ["header"]}


# ------------------------------------------------------------------------------ chunks

CHUNK_PARTS = {
    "nonce": 0,
    "nonce last": 11,
    "ciphertext": 12,
    "ciphertext middle": 12 + 2000,
    "tag": 12 + CHUNK_SIZE,
    "tag last": SLOT - 1,
}


@pytest.mark.parametrize("offset", CHUNK_PARTS.values(), ids=CHUNK_PARTS.keys())
def test_chunk_bit_flip(built: Built, reader: PlainTree, offset: int) -> None:
    flip_bit(built.backing["a.bin"], chunk_offset(1) + offset)

    with pytest.raises(IntegrityError):
        read_range(reader, built, "a.bin", CHUNK_SIZE + 100, 10)
    with pytest.raises(IntegrityError):
        reader.read_file("a.bin")
    # The damage stays local: the chunks around it still read.
    assert read_range(reader, built, "a.bin", 0, CHUNK_SIZE) == built.data["a.bin"][:CHUNK_SIZE]
    assert damage_of(fsck(built)) == {"/a.bin": ["chunk 1"]}


def test_bit_flip_in_a_short_final_chunk(built: Built, reader: PlainTree) -> None:
    backing = built.backing["a.bin"]
    flip_bit(backing, backing.stat().st_size - 1)

    with pytest.raises(IntegrityError):
        read_range(reader, built, "a.bin", 3 * CHUNK_SIZE, 1)
    assert damage_of(fsck(built)) == {"/a.bin": ["chunk 3"]}


def test_swapped_chunks(built: Built, reader: PlainTree) -> None:
    backing = built.backing["docs/c.bin"]
    first, second = read_chunk(backing, 0), read_chunk(backing, 1)
    write_at(backing, chunk_offset(0), second)
    write_at(backing, chunk_offset(1), first)

    with pytest.raises(IntegrityError):
        read_range(reader, built, "docs/c.bin", 0, 1)
    with pytest.raises(IntegrityError):
        read_range(reader, built, "docs/c.bin", CHUNK_SIZE, 1)
    assert damage_of(fsck(built)) == {"/docs/c.bin": ["chunk 0", "chunk 1"]}


def test_chunk_copied_from_another_file_at_the_same_index(built: Built, reader: PlainTree) -> None:
    write_at(built.backing["a.bin"], chunk_offset(1), read_chunk(built.backing["docs/b.bin"], 1))

    with pytest.raises(IntegrityError):
        read_range(reader, built, "a.bin", CHUNK_SIZE, CHUNK_SIZE)
    assert damage_of(fsck(built)) == {"/a.bin": ["chunk 1"]}


@pytest.mark.parametrize(
    ("path", "chunks_kept", "kinds"),
    [
        ("a.bin", 3, ["chunk 2"]),
        ("a.bin", 1, ["chunk 0"]),
        ("docs/b.bin", 2, ["chunk 1"]),
    ],
)
def test_truncation_at_a_chunk_boundary(
    built: Built, reader: PlainTree, path: str, chunks_kept: int, kinds: list[str]
) -> None:
    os.truncate(built.backing[path], chunk_offset(chunks_kept))

    with pytest.raises(IntegrityError):
        reader.read_file(path)
    with pytest.raises(IntegrityError):
        read_range(reader, built, path, (chunks_kept - 1) * CHUNK_SIZE, 1)
    assert damage_of(fsck(built)) == {f"/{path}": kinds}


@pytest.mark.parametrize(
    ("cut", "kinds"),
    [
        # The rest is long enough to pass for a short final chunk; its tag fails.
        (100, ["chunk 2"]),
        # Too short for a chunk: the size is malformed, and chunk 1 is not final.
        (10, ["chunk 1", "size"]),
        # Cut inside the tag of chunk 2, a full chunk.
        (SLOT - 3, ["chunk 2"]),
    ],
)
def test_truncation_inside_a_chunk(
    built: Built, reader: PlainTree, cut: int, kinds: list[str]
) -> None:
    os.truncate(built.backing["docs/c.bin"], chunk_offset(2) + cut)

    with pytest.raises(IntegrityError):
        reader.read_file("docs/c.bin")
    assert damage_of(fsck(built)) == {"/docs/c.bin": kinds}


@pytest.mark.parametrize(
    ("path", "source", "kinds"),
    [
        # A valid chunk of the same file: the old final chunk is no longer final, and the
        # copy authenticates only at its own index.
        ("docs/b.bin", 0, ["chunk 2", "chunk 3"]),
        ("docs/b.bin", 2, ["chunk 2", "chunk 3"]),
        ("a.bin", 1, ["chunk 3", "chunk 4"]),
        # Random bytes.
        ("docs/b.bin", None, ["chunk 2", "chunk 3"]),
        ("a.bin", None, ["chunk 3"]),
    ],
)
def test_appended_stray_chunk(
    built: Built, reader: PlainTree, path: str, source: int | None, kinds: list[str]
) -> None:
    backing = built.backing[path]
    stray = os.urandom(500) if source is None else read_chunk(backing, source)
    with open(backing, "ab") as file:
        file.write(stray)

    with pytest.raises(IntegrityError):
        reader.read_file(path)
    assert damage_of(fsck(built)) == {f"/{path}": kinds}


# ------------------------------------------------------------------------------ names


def _rename_with_flipped_ciphertext(entry: Path) -> Path:
    ciphertext = bytearray(format.b64u_decode(entry.name))
    ciphertext[len(ciphertext) // 2] ^= 0x01
    target = entry.with_name(format.b64u_encode(bytes(ciphertext)))
    entry.rename(target)
    return target


@pytest.mark.parametrize("path", ["a.bin", "docs/b.bin", "docs/sub", "docs/link"])
def test_short_name_bit_flip(built: Built, reader: PlainTree, path: str) -> None:
    changed = _rename_with_flipped_ciphertext(built.backing[path])
    parent = path.rpartition("/")[0]

    with pytest.raises(IntegrityError):
        reader.listdir(parent)
    assert damage_of(fsck(built)) == {backing_display(built, changed): ["name"]}


def test_long_name_sidecar_bit_flip(built: Built, reader: PlainTree) -> None:
    entry = built.backing[f"docs/{LONG_NAME}"]
    assert entry.name.endswith(".long")
    sidecar = entry.with_suffix(".name")
    sidecar.chmod(0o600)
    flip_bit(sidecar, 20)

    with pytest.raises(IntegrityError):
        reader.listdir("docs")
    assert damage_of(fsck(built)) == {backing_display(built, entry): ["sidecar"]}


def test_long_name_ciphertext_bit_flip_with_matching_hash(built: Built, reader: PlainTree) -> None:
    # The attacker keeps entry and sidecar consistent; AES-SIV still refuses the name.
    entry = built.backing[f"docs/{LONG_NAME}"]
    sidecar = entry.with_suffix(".name")
    ciphertext = bytearray(sidecar.read_bytes())
    ciphertext[100] ^= 0x01
    hashed = format.b64u_encode(digest(bytes(ciphertext)))
    new_entry = entry.with_name(hashed + ".long")
    new_entry.parent.joinpath(hashed + ".name").write_bytes(bytes(ciphertext))
    sidecar.unlink()
    entry.rename(new_entry)

    with pytest.raises(IntegrityError):
        reader.listdir("docs")
    assert damage_of(fsck(built)) == {backing_display(built, new_entry): ["name"]}


def test_long_name_entry_bit_flip(built: Built, reader: PlainTree) -> None:
    entry = built.backing[f"docs/{LONG_NAME}"]
    flipped = "A" if entry.name[0] != "A" else "B"
    changed = entry.with_name(flipped + entry.name[1:])
    entry.rename(changed)

    with pytest.raises(IntegrityError):
        reader.listdir("docs")
    report = fsck(built)
    assert damage_of(report) == {backing_display(built, changed): ["sidecar"]}
    orphan = backing_display(built, entry.with_suffix(".name"))
    assert [(w.location.display, w.kind) for w in report.warnings] == [(orphan, "orphan sidecar")]


@pytest.mark.parametrize("path", ["docs/b.bin", "docs/sub", f"docs/{LONG_NAME}"])
def test_name_moved_to_another_directory(built: Built, reader: PlainTree, path: str) -> None:
    entry = built.backing[path]
    moved = built.store / entry.name
    entry.rename(moved)
    if entry.name.endswith(".long"):
        entry.with_suffix(".name").rename(moved.with_suffix(".name"))

    with pytest.raises(IntegrityError):
        reader.listdir("")
    assert damage_of(fsck(built)) == {backing_display(built, moved): ["name"]}


def test_missing_directory_id(built: Built, reader: PlainTree) -> None:
    (built.backing["docs"] / format.DIRID_FILE).unlink()

    with pytest.raises(IntegrityError):
        reader.listdir("docs")
    # The names inside cannot be checked, but the files' contents still are.
    report = fsck(built)
    assert damage_of(report) == {"/docs": ["dirid"]}
    assert report.files == len(FILE_SIZES) + 1


def test_malformed_directory_id(built: Built, reader: PlainTree) -> None:
    dirid = built.backing["docs"] / format.DIRID_FILE
    dirid.chmod(0o600)
    flip_bit(dirid, 0)

    with pytest.raises(IntegrityError):
        reader.listdir("docs")
    assert damage_of(fsck(built)) == {"/docs": ["dirid"]}


def test_replaced_directory_id(built: Built, reader: PlainTree) -> None:
    # A well-formed id of another directory: every name inside stops decrypting.
    dirid = built.backing["docs"] / format.DIRID_FILE
    dirid.chmod(0o600)
    dirid.write_bytes(format.pack_dirid(os.urandom(16)))

    with pytest.raises(IntegrityError):
        reader.listdir("docs")
    inside = [path for path in built.backing if path.startswith("docs/") and path.count("/") == 1]
    expected = {backing_display(built, built.backing[path]): ["name"] for path in inside}
    # The directory's own xattr value is bound to its id too.
    expected["/docs"] = ["xattr"]
    assert damage_of(fsck(built)) == expected


# ------------------------------------------------------------------------------ symlinks, xattrs


def test_symlink_target_bit_flip(built: Built, reader: PlainTree) -> None:
    link = built.backing[SYMLINK]
    sealed = bytearray(format.b64u_decode(os.readlink(link)))
    sealed[-1] ^= 0x01
    link.unlink()
    os.symlink(format.b64u_encode(bytes(sealed)), link)

    with pytest.raises(IntegrityError):
        reader.readlink(SYMLINK)
    assert damage_of(fsck(built)) == {f"/{SYMLINK}": ["symlink"]}


def test_xattr_value_bit_flip(built: Built, reader: PlainTree) -> None:
    path = built.backing["a.bin"]
    (backing_name,) = [name for name in os.listxattr(path) if name.startswith("user.")]
    sealed = bytearray(os.getxattr(path, backing_name))
    sealed[15] ^= 0x01
    os.setxattr(path, backing_name, bytes(sealed))

    with open(path, "rb") as file:
        file_id = reader.volume.read_file_keys(file.fileno()).file_id
    with pytest.raises(IntegrityError):
        reader.volume.xattrs.decrypt_value(file_id, os.fsencode(backing_name), bytes(sealed))
    assert damage_of(fsck(built)) == {"/a.bin": ["xattr"]}


def test_xattr_copied_to_another_file(built: Built, reader: PlainTree) -> None:
    source, target = built.backing["a.bin"], built.backing["docs/b.bin"]
    for name in os.listxattr(source):
        if name.startswith("user."):
            os.setxattr(target, name, os.getxattr(source, name))

    assert damage_of(fsck(built)) == {"/docs/b.bin": ["xattr"]}


def test_unencrypted_xattr_name(built: Built) -> None:
    os.setxattr(built.backing["docs/c.bin"], "user.plain", b"value")

    assert damage_of(fsck(built)) == {"/docs/c.bin": ["xattr"]}


# ------------------------------------------------------------------------------ store root


def test_unknown_files_in_the_store_root_are_damage(built: Built) -> None:
    (built.store / "notes.txt").write_text("not dermfs's")
    (built.store / "garbage").write_bytes(b"x" * 200)
    (built.store / ".nfs0000123").write_bytes(b"the backing filesystem's own")
    (built.store / "lost+found").mkdir()

    report = fsck(built)
    assert damage_of(report) == {
        "[store] garbage": ["name", "header"],
        "[store] notes.txt": ["name"],
    }
    assert report.warnings == []


def test_stray_temporary_entries_and_orphan_sidecars_are_warnings(built: Built) -> None:
    (built.store / f"{format.TMP_PREFIX}{'0' * 32}").mkdir()
    (built.backing["docs"] / f"{'A' * 43}.name").write_bytes(os.urandom(300))

    report = fsck(built)
    assert report.clean
    assert [(w.location.display, w.kind) for w in report.warnings] == [
        (f"[store] {format.TMP_PREFIX}{'0' * 32}", "stray temporary entry"),
        (backing_display(built, built.backing["docs"] / f"{'A' * 43}.name"), "orphan sidecar"),
    ]
    assert report.lines()[-1] == "fsck: 6 files, 3 directories checked, 0 damaged, 2 warnings"


def test_report_lines_name_each_damaged_file_once(built: Built) -> None:
    flip_bit(built.backing["a.bin"], chunk_offset(0) + 50)
    flip_bit(built.backing["a.bin"], chunk_offset(2) + 50)
    flip_bit(built.backing["docs/b.bin"], 30)

    assert fsck(built).lines() == [
        "/a.bin: chunk 0, chunk 2",
        "/docs/b.bin: header",
        "fsck: 6 files, 3 directories checked, 2 damaged",
    ]


# ------------------------------------------------------------------------------ volume file


def test_wrapped_key_from_another_volume(built: Built, tmp_path: Path) -> None:
    other = build_volume(tmp_path / "other", built.provider)
    obj = built.volume_file()
    obj["keys"] = other.volume_file()["keys"]
    built.write_volume_file(obj)

    with pytest.raises(WrongKeyError):
        Volume.open(built.store, built.provider)


def test_random_wrapped_key(built: Built) -> None:
    obj = built.volume_file()
    keys = obj["keys"]
    assert isinstance(keys, list)
    keys[0]["wrapped"] = format.b64u_encode(os.urandom(60))
    built.write_volume_file(obj)

    with pytest.raises(WrongKeyError):
        Volume.open(built.store, built.provider)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chunk_size", 8192),
        ("features", ["chunks-aes256gcm", "names-aes-siv", "intent-log"]),
        ("volume_id", format.b64u_encode(os.urandom(16))),
    ],
)
def test_changed_known_field_of_the_volume_file(built: Built, field: str, value: object) -> None:
    obj = built.volume_file()
    obj[field] = value
    built.write_volume_file(obj)

    with pytest.raises(WrongKeyError):
        Volume.open(built.store, built.provider)


def test_unknown_feature_flag_is_refused(built: Built) -> None:
    obj = built.volume_file()
    features = obj["features"]
    assert isinstance(features, list)
    obj["features"] = [*features, "compression-zstd"]
    built.write_volume_file(obj)

    with pytest.raises(FormatError, match="compression-zstd"):
        Volume.open(built.store, built.provider)


# ------------------------------------------------------------------------------ crash


@pytest.mark.expect_log
def test_crash_dirty_volume_is_repaired_by_fsck(built: Built) -> None:
    path = "docs/c.bin"
    backing = built.backing[path]
    volume = Volume.open(built.store, built.provider)
    volume.start_writing()
    fd = os.open(backing, os.O_RDWR)
    try:
        content = volume.open_file(fd, os.fstat(fd).st_ino, str(backing.relative_to(built.store)))
        content.write(CHUNK_SIZE + 10, b"never synced")
        # A torn write: the rewritten chunk is half garbage when the daemon dies.
        os.pwrite(fd, os.urandom(200), chunk_offset(1) + 1000)
    finally:
        os.close(fd)
    volume.close()  # the file is still dirty, so the intent log stays, as after a kill
    assert (built.store / format.INTENT_FILE).exists()

    report = fsck(built)
    assert [where.display for where in report.repaired] == [f"/{path}"]
    assert report.findings == []
    assert report.lines()[0] == f"fsck: crash recovery repaired /{path}"
    assert not (built.store / format.INTENT_FILE).exists()

    again = fsck(built)
    assert (again.repaired, again.findings) == ([], [])
    check = Volume.open(built.store, built.provider)
    try:
        assert PlainTree(check).read_file(path) == built.data[path]
    finally:
        check.close()


_B64U_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.mark.parametrize("path", ["docs", "docs/link", "docs/sub"])
def test_name_renamed_to_a_non_canonical_alias(built: Built, reader: PlainTree, path: str) -> None:
    # The last base64url character of these names carries unused low bits; setting one
    # gives another backing name for the same ciphertext, which dermfs never writes.
    entry = built.backing[path]
    assert len(format.b64u_decode(entry.name)) % 3 != 0
    last = _B64U_ALPHABET[_B64U_ALPHABET.index(entry.name[-1]) ^ 0x01]
    alias = entry.with_name(entry.name[:-1] + last)
    entry.rename(alias)

    with pytest.raises(IntegrityError):
        reader.listdir(path.rpartition("/")[0])
    assert damage_of(fsck(built)) == {backing_display(built, alias): ["name"]}


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail a test that blocks for more than a few seconds instead of hanging the run."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("blocked reading the store")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.usefixtures("no_hang")
def test_fifo_in_place_of_a_directory_id(built: Built, reader: PlainTree) -> None:
    dirid = built.backing["docs"] / format.DIRID_FILE
    dirid.unlink()
    os.mkfifo(dirid)

    with pytest.raises(IntegrityError):
        reader.listdir("docs")
    assert damage_of(fsck(built)) == {"/docs": ["dirid"]}


@pytest.mark.usefixtures("no_hang")
def test_fifo_in_place_of_a_sidecar(built: Built, reader: PlainTree) -> None:
    entry = built.backing[f"docs/{LONG_NAME}"]
    sidecar = entry.with_suffix(".name")
    sidecar.unlink()
    os.mkfifo(sidecar)

    with pytest.raises(IntegrityError):
        reader.listdir("docs")
    assert damage_of(fsck(built)) == {backing_display(built, entry): ["sidecar"]}
