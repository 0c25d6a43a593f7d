"""``dermfs rekey``: a new volume key, every header rewrapped, no chunk moved (docs/rotation.md).

Each test builds a volume through the library, rekeys it, and checks the same list
(:func:`check_rekeyed`): every file, symlink target and xattr reads back as it was, fsck
finds nothing, the volume file holds one slot of the expected generation, every chunk's
bytes are unchanged, every backing name changed, and the old volume key opens nothing.

Interruptions are simulated two ways: in-process, by making the N-th write-like system
call raise an exception no handler catches, for many N spread over a whole run; and for
real, by SIGKILL of a ``python -m dermfs rekey`` process after a random delay. Each time
the rekey is run again to completion and everything is checked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dermfs import cli, exitcodes, format
from dermfs.audit import AuditJournal, Event, daemon_caller, read_records, verify
from dermfs.config import AuditConfig, load_config
from dermfs.cryptocore import SecretKey
from dermfs.errors import FormatError, IntegrityError, StoreError
from dermfs.fsck import check_volume, count_entries
from dermfs.keys import provider_from_config
from dermfs.keys.base import KeyProvider, WrappedKey
from dermfs.rotation.rekey import RekeyReport, rekey_volume
from dermfs.tree import PlainTree, write_sidecar
from dermfs.volume import REKEY_IN_PROGRESS, Volume, create_store

CHUNK_SIZE = 4096
REPO = Path(cli.__file__).resolve().parents[1]
PATIENT_ID = re.compile(r"^patients/(?P<patient>[^/]+)/")
LONG_FILE = "F" * 200
LONG_DIR = "D" * 190
LONG_LINK = "S" * 180
LONG_HARD = "H" * 200
OLD_TIME_NS = 1_000_000_000 * 10**9 + 123


# ------------------------------------------------------------------------------ the tree


@dataclass
class Snapshot:
    """What a volume holds, in plaintext, and what its store holds, in backing bytes."""

    #: plaintext path -> ("dir", xattrs) | ("file", data, xattrs) | ("link", target)
    items: dict[str, tuple[Any, ...]]
    #: file id -> every byte of the backing file after the header
    chunks: dict[bytes, bytes]
    #: backing names of every entry and sidecar
    backing_names: set[str]
    #: plaintext path -> (mode, mtime_ns) of its backing object, root excluded
    metadata: dict[str, tuple[int, int]]
    #: plaintext paths that are hard links of one another
    links: list[tuple[str, ...]] = field(default_factory=list)


def set_xattr(volume: Volume, path: Path, object_id: bytes, name: bytes, value: bytes) -> None:
    backing_name = volume.xattrs.encrypt_name(name)
    os.setxattr(path, backing_name, volume.xattrs.encrypt_value(object_id, backing_name, value))


def object_id_of(volume: Volume, path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            return volume.read_dir_id(fd)
        return volume.read_file_keys(fd).file_id
    finally:
        os.close(fd)


def hard_link(volume: Volume, tree: PlainTree, source: str, parent: str, name: str) -> None:
    """Give the file *source* a second name *parent*/*name*, in the backing store too."""
    fd = os.open(volume.store / tree.backing_path(parent) if parent else volume.store, os.O_RDONLY)
    try:
        backing = volume.names.encrypt(volume.read_dir_id(fd), os.fsencode(name))
        write_sidecar(fd, backing)
        os.link(volume.store / tree.backing_path(source), backing.entry, dst_dir_fd=fd)
    finally:
        os.close(fd)


def build_tree(volume: Volume, many: int = 30) -> list[tuple[str, ...]]:
    """Fill a volume: nested and long-named directories, multi-chunk and empty files, long
    names, symlinks, xattrs on files and directories, hard links, a read-only file, and
    times in the past. Returns the groups of hard-linked paths."""
    tree = PlainTree(volume)
    for directory in ("a", "a/b", "a/b/c", LONG_DIR, "many", "empty-dir"):
        tree.mkdir(directory)
    sizes = {
        "top.bin": 3 * CHUNK_SIZE + 100,
        "a/empty": 0,
        "a/one": 1,
        "a/full": CHUNK_SIZE,
        "a/b/multi": 5 * CHUNK_SIZE + 7,
        "a/b/c/deep": 9000,
        f"a/{LONG_FILE}": 6000,
        f"{LONG_DIR}/inner": 10,
        f"{LONG_DIR}/{LONG_FILE}": 2 * CHUNK_SIZE,
        "readonly": 5000,
    }
    sizes.update({f"many/f{index:03d}": index * 137 for index in range(many)})
    for path, size in sizes.items():
        tree.write_file(path, os.urandom(size))
    tree.symlink("a/link", b"../top.bin")
    tree.symlink(f"a/b/{LONG_LINK}", b"c/deep")
    tree.symlink("abs", b"/etc/hostname")

    store = volume.store
    for path, name, value in [
        ("top.bin", b"user.comment", b"seen by dermatology"),
        (f"a/{LONG_FILE}", b"user.one", b"1"),
        (f"a/{LONG_FILE}", b"user." + b"x" * 100, os.urandom(300)),
        ("a", b"user.tag", b"2024"),
        (LONG_DIR, b"user.dir", b"long"),
        ("a/b/c/deep", b"user.linked", b"shared by both names"),
    ]:
        backing = store / tree.backing_path(path)
        set_xattr(volume, backing, object_id_of(volume, backing), name, value)

    hard_link(volume, tree, "a/b/c/deep", "", "hard1")
    hard_link(volume, tree, "a/b/c/deep", "a/b", LONG_HARD)

    os.chmod(store / tree.backing_path("readonly"), 0o444)
    for path in ("a/one", "a/b", LONG_DIR, f"{LONG_DIR}/{LONG_FILE}"):
        os.utime(store / tree.backing_path(path), ns=(OLD_TIME_NS, OLD_TIME_NS))
    return [("a/b/c/deep", "hard1", f"a/b/{LONG_HARD}")]


def snapshot(volume: Volume, links: list[tuple[str, ...]]) -> Snapshot:
    """Read everything back through *volume* (every name must decrypt)."""
    tree = PlainTree(volume)
    items: dict[str, tuple[Any, ...]] = {}
    metadata: dict[str, tuple[int, int]] = {}

    def xattrs(backing: Path) -> dict[bytes, bytes]:
        object_id = object_id_of(volume, backing)
        found = {}
        for backing_name in os.listxattr(backing):
            encoded = os.fsencode(backing_name)
            sealed = os.getxattr(backing, backing_name)
            found[volume.xattrs.decrypt_name(encoded)] = volume.xattrs.decrypt_value(
                object_id, encoded, sealed
            )
        return found

    def visit(directory: str) -> None:
        for name in tree.listdir(directory):
            path = f"{directory}/{os.fsdecode(name)}" if directory else os.fsdecode(name)
            backing = volume.store / tree.backing_path(path)
            info = os.lstat(backing)
            metadata[path] = (info.st_mode, info.st_mtime_ns)
            if stat.S_ISDIR(info.st_mode):
                items[path] = ("dir", xattrs(backing))
                visit(path)
            elif stat.S_ISLNK(info.st_mode):
                items[path] = ("link", tree.readlink(path))
            else:
                items[path] = ("file", tree.read_file(path), xattrs(backing))

    visit("")
    chunks: dict[bytes, bytes] = {}
    backing_names: set[str] = set()
    for directory, dirs, files in os.walk(volume.store):
        for name in [*dirs, *files]:
            if not name.startswith("dermfs."):
                backing_names.add(name)
        for name in files:
            path = Path(directory, name)
            if name.startswith("dermfs.") or name.endswith(format.SIDECAR_SUFFIX):
                continue
            if path.is_symlink():
                continue
            data = path.read_bytes()
            chunks[data[12:28]] = data[format.HEADER_SIZE :]
    return Snapshot(items, chunks, backing_names, metadata, links)


def slot_generations(store: Path) -> list[int]:
    volume_file = format.parse_volume_file((store / format.VOLUME_FILE).read_bytes())
    return [slot.generation for slot in volume_file.keys]


def volume_keys(store: Path, provider: KeyProvider) -> list[SecretKey]:
    """Unwrap every volume key the volume file holds, as an attacker with a copy could."""
    volume_file = format.parse_volume_file((store / format.VOLUME_FILE).read_bytes())
    return [
        provider.unwrap(
            WrappedKey(slot.provider, slot.key_name, slot.key_version, slot.wrapped, slot.params),
            volume_file.volume_id,
        )
        for slot in volume_file.keys
    ]


def check_rekeyed(
    store: Path,
    provider: KeyProvider,
    before: Snapshot,
    generation: int,
    old_keys: list[SecretKey],
    kills: int = 0,
) -> Snapshot:
    """Check a finished rekey against the snapshot taken before it; return the new one.

    Modes never change, and neither do times, except that each kill may have come between
    a change and the call that puts the times back: up to *kills* items may differ.
    """
    assert slot_generations(store) == [generation]
    volume = Volume.open(store, provider)
    try:
        report = check_volume(volume)
        assert report.findings == []
        assert report.recovery.repaired == [] and report.recovery.damaged == []

        after = snapshot(volume, before.links)
        assert after.items == before.items
        assert after.chunks == before.chunks
        assert after.backing_names.isdisjoint(before.backing_names)
        assert {path: mode for path, (mode, _) in after.metadata.items()} == {
            path: mode for path, (mode, _) in before.metadata.items()
        }
        same_inode = {path: group[0] for group in before.links for path in group}
        changed = {
            same_inode.get(path, path)
            for path in before.metadata
            if before.metadata[path] != after.metadata[path]
        }
        assert len(changed) <= kills, changed
        tree = PlainTree(volume)
        for group in before.links:
            inodes = {os.lstat(store / tree.backing_path(path)).st_ino for path in group}
            assert len(inodes) == 1
        assert_old_keys_open_nothing(volume, old_keys)
    finally:
        volume.close()
    return after


def assert_old_keys_open_nothing(volume: Volume, old_keys: list[SecretKey]) -> None:
    """Every header, name, target and xattr fails under each old key."""
    for old_key in old_keys:
        old = Volume(volume.store, volume.volume_file, {volume.generation: old_key})
        headers = names = 0
        for directory, dirs, files in os.walk(volume.store):
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                dir_id = volume.read_dir_id(dir_fd)
                for name in [*dirs, *files]:
                    if not volume.names.is_listed(name):
                        continue
                    names += 1
                    with pytest.raises(IntegrityError):
                        sidecar_name = volume.names.sidecar_of(name)
                        if sidecar_name is None:
                            old.names.decrypt(dir_id, name)
                        else:
                            sidecar = Path(directory, sidecar_name).read_bytes()
                            old.names.decrypt_long(dir_id, name, sidecar)
                    path = Path(directory, name)
                    if path.is_symlink():
                        with pytest.raises(IntegrityError):
                            old.symlinks.decrypt(os.readlink(path))
                    elif path.is_file():
                        headers += 1
                        with pytest.raises(IntegrityError):
                            old.open_file_header(path.read_bytes()[: format.HEADER_SIZE])
                    for backing_name in os.listxattr(path, follow_symlinks=False):
                        with pytest.raises(IntegrityError):
                            old.xattrs.decrypt_name(os.fsencode(backing_name))
            finally:
                os.close(dir_fd)
        assert headers > 0 and names > 0


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Built:
    store: Path
    provider: KeyProvider
    audit: AuditConfig
    before: Snapshot
    old_keys: list[SecretKey]


@pytest.fixture
def build(tmp_path: Path, key_provider: KeyProvider) -> Callable[..., Built]:
    """Return a function that makes a filled volume with an audit journal of 3 records."""
    counter = iter(range(1_000_000))

    def make(many: int = 30) -> Built:
        number = next(counter)
        store = tmp_path / f"store{number}"
        store.mkdir()
        create_store(store, key_provider, CHUNK_SIZE)
        audit = AuditConfig(journal=tmp_path / f"journal{number}.audit", patient_id=PATIENT_ID)
        volume = Volume.open(store, key_provider)
        volume.start_writing()
        try:
            links = build_tree(volume, many)
            journal = AuditJournal.open_for_volume(audit, volume)
            journal.record(Event.MOUNT, daemon_caller(), None)
            journal.record(Event.CREATE, daemon_caller(), "patients/p1/a.jpg")
            journal.record(Event.UNMOUNT, daemon_caller(), None)
            journal.close()
            before = snapshot(volume, links)
        finally:
            volume.close()
        return Built(store, key_provider, audit, before, volume_keys(store, key_provider))

    return make


def rekey(built: Built, **kwargs: Any) -> RekeyReport:
    volume = Volume.open(built.store, built.provider, allow_rekey_in_progress=True)
    try:
        return rekey_volume(volume, built.provider, built.audit, **kwargs)
    finally:
        volume.close()


def journal_events(built: Built) -> list[str]:
    volume = Volume.open(built.store, built.provider)
    try:
        audit_key = volume.audit_key()
        assert verify(built.audit.journal, volume.volume_id, audit_key).intact
        records, result = read_records(built.audit.journal, volume.volume_id, audit_key)
        assert result.intact
        return [str(record.event) for record in records]
    finally:
        volume.close()


# ------------------------------------------------------------------------------ rekey


def test_rekey_keeps_every_byte_and_changes_every_name(build: Callable[..., Built]) -> None:
    built = build()

    report = rekey(built)

    assert report.finished and not report.resumed
    assert (report.old_generation, report.new_generation) == (1, 2)
    walk = report.walk
    regular = sum(1 for item in built.before.items.values() if item[0] == "file") - 2
    assert walk.headers == regular  # three names, one inode
    assert walk.symlinks == 3 and walk.xattrs == 6
    assert walk.names == len(built.before.items)
    assert walk.damaged == [] and walk.failed == []
    assert report.check is not None and report.check.damaged == report.check.failed == []
    check_rekeyed(built.store, built.provider, built.before, 2, built.old_keys)
    assert journal_events(built) == ["mount", "create", "unmount", "rekey"]


def test_rekey_twice_goes_to_generation_three(build: Callable[..., Built]) -> None:
    built = build()
    rekey(built)
    second = volume_keys(built.store, built.provider)

    report = rekey(built)

    assert (report.old_generation, report.new_generation) == (2, 3)
    check_rekeyed(built.store, built.provider, built.before, 3, [*built.old_keys, *second])
    assert journal_events(built) == ["mount", "create", "unmount", "rekey", "rekey"]


def test_rekey_without_a_journal_starts_one(build: Callable[..., Built]) -> None:
    built = build()
    for path in built.audit.journal.parent.glob(built.audit.journal.name + "*"):
        path.unlink()

    rekey(built)

    assert journal_events(built) == ["rekey"]


def test_progress_counts_every_entry(build: Callable[..., Built]) -> None:
    built = build()
    counted: dict[str, list[int]] = {}

    def progress(what: str) -> Callable[[int], None]:
        return counted.setdefault(what, []).append

    rekey(built, progress=progress)

    entries = count_entries(built.store)
    assert counted["rekey"][0] == 0 and counted["check"][0] == 0
    assert sum(counted["rekey"]) == sum(counted["check"]) == entries


def test_a_mounted_store_is_refused(build: Callable[..., Built]) -> None:
    built = build()
    mounted = Volume.open(built.store, built.provider)
    mounted.start_writing()
    volume_file = (built.store / format.VOLUME_FILE).read_bytes()
    try:
        with pytest.raises(StoreError, match="in use"):
            rekey(built)
    finally:
        mounted.close()
    assert (built.store / format.VOLUME_FILE).read_bytes() == volume_file


@pytest.mark.parametrize("generations", [[1, 3], [1, 2, 3], [2, 2]])
def test_other_key_slots_than_one_or_two_in_a_row_are_refused(
    build: Callable[..., Built], generations: list[int]
) -> None:
    built = build()
    path = built.store / format.VOLUME_FILE
    obj = json.loads(path.read_text())
    slot = obj["keys"][0]
    obj["keys"] = [{**slot, "generation": generation} for generation in generations]
    path.write_text(json.dumps(obj))

    with pytest.raises(FormatError, match="consecutive generations"):
        Volume.open(built.store, built.provider, allow_rekey_in_progress=True)


# ------------------------------------------------------------------------------ interrupted


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, so nothing after it runs."""


#: The calls by which rekey changes the store (and the audit journal).
CHANGING_CALLS = (
    "write",
    "pwrite",
    "fsync",
    "rename",
    "replace",
    "unlink",
    "symlink",
    "setxattr",
    "removexattr",
    "utime",
    "chmod",
)


@contextlib.contextmanager
def killed_after(calls: int) -> Iterator[list[int]]:
    """Make the call after the first *calls* changing calls raise :class:`Killed`."""
    count = [0]
    originals = {name: getattr(os, name) for name in CHANGING_CALLS}

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if count[0] >= calls:
                raise Killed
            count[0] += 1
            return function(*args, **kwargs)

        return wrapper

    for name, function in originals.items():
        setattr(os, name, wrap(function))
    try:
        yield count
    finally:
        for name, function in originals.items():
            setattr(os, name, function)


def open_descriptors() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def rekey_killed_after(built: Built, calls: int) -> bool:
    """Run a rekey that is killed after *calls* changing calls; tell whether it was.

    As at a process's death, every descriptor it left open is closed, which releases the
    locks it held (the store's, the audit journal's).
    """
    before = open_descriptors()
    volume = Volume.open(built.store, built.provider, allow_rekey_in_progress=True)
    killed = False
    try:
        with killed_after(calls):
            rekey_volume(volume, built.provider, built.audit)
    except Killed:
        killed = True
    finally:
        volume.close()
    for fd in open_descriptors() - before:
        os.close(fd)
    return killed


_calls_of_a_rekey: list[int] = []


@pytest.fixture
def changing_calls_of_a_rekey(build: Callable[..., Built]) -> int:
    """How many changing calls a whole rekey of the test tree makes (counted once)."""
    if not _calls_of_a_rekey:
        built = build()
        volume = Volume.open(built.store, built.provider)
        try:
            with killed_after(10**9) as count:
                rekey_volume(volume, built.provider, built.audit)
        finally:
            volume.close()
        _calls_of_a_rekey.append(count[0])
    return _calls_of_a_rekey[0]


def kill_points(total: int) -> list[int]:
    return sorted({0, 1, 2, 3, 5, 8, 13, *(total * step // 16 for step in range(1, 16)), total - 1})


@pytest.mark.parametrize("step", range(23))
def test_killed_rekey_resumes(
    build: Callable[..., Built], changing_calls_of_a_rekey: int, step: int
) -> None:
    points = kill_points(changing_calls_of_a_rekey)
    if step >= len(points):
        pytest.skip("fewer kill points")
    built = build()

    assert rekey_killed_after(built, points[step])
    generations = slot_generations(built.store)
    if generations == [1, 2]:
        with pytest.raises(StoreError, match=re.escape(REKEY_IN_PROGRESS)):
            Volume.open(built.store, built.provider)
    if generations != [2]:
        report = rekey(built)
        assert report.resumed == (generations == [1, 2])
    check_rekeyed(built.store, built.provider, built.before, 2, built.old_keys, kills=1)
    assert journal_events(built)[:3] == ["mount", "create", "unmount"]
    assert set(journal_events(built)[3:]) == {"rekey"}


@pytest.mark.expect_log  # the journal warns that it was not closed cleanly
def test_killed_at_each_of_the_last_calls_resumes(
    build: Callable[..., Built], changing_calls_of_a_rekey: int
) -> None:
    """The journal key rewrap, the rekey record, the one-slot volume file, the check."""
    total = changing_calls_of_a_rekey
    for calls in range(total - 24, total):
        built = build()

        assert rekey_killed_after(built, calls)
        if slot_generations(built.store) != [2]:
            rekey(built)

        check_rekeyed(built.store, built.provider, built.before, 2, built.old_keys, kills=1)
        events = journal_events(built)
        assert events[:3] == ["mount", "create", "unmount"]
        # A kill while the journal was open shows as an unclean stop at the next open.
        assert "rekey" in events[3:] and set(events[3:]) <= {"rekey", "unclean-stop"}


@pytest.mark.parametrize("fractions", [(0.3, 0.1), (0.5, 0.5), (0.8, 0.05), (0.2, 0.9)])
def test_a_rekey_killed_twice_resumes(
    build: Callable[..., Built], changing_calls_of_a_rekey: int, fractions: tuple[float, float]
) -> None:
    built = build()
    total = changing_calls_of_a_rekey

    assert rekey_killed_after(built, int(total * fractions[0]))
    rekey_killed_after(built, int(total * fractions[1]))
    if slot_generations(built.store) != [2]:
        rekey(built)

    check_rekeyed(built.store, built.provider, built.before, 2, built.old_keys, kills=2)


@pytest.mark.expect_log
def test_items_that_cannot_be_written_keep_the_old_key(
    build: Callable[..., Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build()

    def no_space(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(os, "setxattr", no_space)
        report = rekey(built)

    assert not report.finished
    # Every object with xattrs; each name of the hard-linked file tries again.
    failed = {(p.location.plaintext, p.what) for p in report.walk.failed}
    paths = ["top.bin", f"a/{LONG_FILE}", "a", LONG_DIR, "a/b/c/deep", "hard1", f"a/b/{LONG_HARD}"]
    assert failed == {(path.encode(), os.strerror(errno.ENOSPC)) for path in paths}
    assert slot_generations(built.store) == [1, 2]
    with pytest.raises(StoreError, match=re.escape(REKEY_IN_PROGRESS)):
        Volume.open(built.store, built.provider)

    again = rekey(built)

    assert again.finished and again.resumed
    check_rekeyed(built.store, built.provider, built.before, 2, built.old_keys)


def test_damage_is_reported_and_does_not_stop_the_rekey(build: Callable[..., Built]) -> None:
    built = build()
    volume = Volume.open(built.store, built.provider)
    tree = PlainTree(volume)
    damaged = built.store / tree.backing_path("a/one")
    volume.close()
    with open(damaged, "r+b") as file:
        file.seek(80)
        byte = file.read(1)
        file.seek(80)
        file.write(bytes([byte[0] ^ 1]))

    report = rekey(built)

    assert report.finished
    assert [(p.location.plaintext, p.what) for p in report.walk.damaged] == [(b"a/one", "header")]
    assert report.check is not None
    assert [(p.location.plaintext, p.what) for p in report.check.damaged] == [(b"a/one", "header")]
    assert slot_generations(built.store) == [2]


# ------------------------------------------------------------------------------ command


def write_config(directory: Path) -> Path:
    config = directory / "clinic.yaml"
    config.write_text(
        "store: store\nchunk_size: 4096\nkms:\n  provider: local\n  keyfile: volume.key\n"
        f"audit:\n  journal: clinic.audit\n  patient_id: '{PATIENT_ID.pattern}'\n"
    )
    return config


def run_process(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dermfs", *argv],
        capture_output=True,
        text=True,
        env=process_env(),
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


def process_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "DERMFS_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@dataclass
class CliVolume:
    config: Path
    store: Path
    provider: KeyProvider
    before: Snapshot
    old_keys: list[SecretKey]


def make_cli_volume(directory: Path, bulk: int = 0) -> CliVolume:
    """A volume made by ``dermfs init`` with the local key-file provider: the test tree,
    and *bulk* more small files, 100 to a directory."""
    directory.mkdir(exist_ok=True)
    config_path = write_config(directory)
    assert cli.main(["init", str(config_path)]) == exitcodes.OK
    config = load_config(config_path)
    provider = provider_from_config(config.kms)
    volume = Volume.open(config.store, provider)
    volume.start_writing()
    try:
        links = build_tree(volume)
        plain = PlainTree(volume)
        for number in range(bulk):
            folder = f"bulk/{number // 100:03d}"
            if number == 0:
                plain.mkdir("bulk")
            if number % 100 == 0:
                plain.mkdir(folder)
            plain.write_file(f"{folder}/f{number:04d}", os.urandom(number % 300))
        before = snapshot(volume, links)
    finally:
        volume.close()
    return CliVolume(
        config_path, config.store, provider, before, volume_keys(config.store, provider)
    )


def test_the_command_prints_the_report_and_no_progress_off_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = make_cli_volume(tmp_path)
    capsys.readouterr()

    status = cli.main(["rekey", str(made.config)])

    out, err = capsys.readouterr()
    assert status == exitcodes.OK
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "rekey: volume key generation 1 -> 2"
    assert lines[-1].startswith("rekey: check: ")
    assert lines[-1].endswith("open under generation 2")
    check_rekeyed(made.store, made.provider, made.before, 2, made.old_keys)


def test_a_terminal_gets_a_progress_bar_for_the_walk_and_the_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = make_cli_volume(tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)

    status = cli.main(["rekey", str(made.config)])

    _out, err = capsys.readouterr()
    assert status == exitcodes.OK
    entries = count_entries(made.store)
    assert f"\rrekey:   0%|          | 0/{entries} " in err
    assert f"\rcheck:   0%|          | 0/{entries} " in err


def test_the_command_exits_10_on_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    made = make_cli_volume(tmp_path)
    volume = Volume.open(made.store, made.provider)
    damaged = made.store / PlainTree(volume).backing_path("top.bin")
    volume.close()
    data = bytearray(damaged.read_bytes())
    data[40] ^= 0x80
    damaged.write_bytes(bytes(data))
    capsys.readouterr()

    status = cli.main(["rekey", str(made.config)])

    out, _err = capsys.readouterr()
    assert status == exitcodes.DAMAGE
    assert "/top.bin: header" in out.splitlines()
    assert slot_generations(made.store) == [2]


def interrupt_in_progress(made: CliVolume, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave the volume as a rekey killed at its first rename leaves it."""

    def kill(*_args: Any, **_kwargs: Any) -> None:
        raise Killed

    volume = Volume.open(made.store, made.provider)
    try:
        with monkeypatch.context() as patched, contextlib.suppress(Killed):
            patched.setattr(os, "rename", kill)
            rekey_volume(volume, made.provider, None)
    finally:
        volume.close()
    assert slot_generations(made.store) == [1, 2]


def test_an_interrupted_rekey_refuses_mount_and_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: mount stops before opening the store")
    made = make_cli_volume(tmp_path)
    interrupt_in_progress(made, monkeypatch)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    expected = f"dermfs: {REKEY_IN_PROGRESS}\n"

    mounted = run_process("mount", str(made.config), str(mountpoint), timeout=60)
    audited = run_process("audit", "verify", str(made.config), timeout=60)

    assert (mounted.returncode, mounted.stderr) == (exitcodes.STORE, expected)
    assert (audited.returncode, audited.stderr) == (exitcodes.STORE, expected)
    assert not os.path.ismount(mountpoint)
    finished = run_process("rekey", str(made.config))
    assert finished.returncode == exitcodes.OK, finished.stderr
    assert "(resuming an interrupted rekey)" in finished.stdout
    check_rekeyed(made.store, made.provider, made.before, 2, made.old_keys)


def test_fsck_of_an_interrupted_rekey_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = make_cli_volume(tmp_path)
    interrupt_in_progress(made, monkeypatch)
    capsys.readouterr()

    status = cli.main(["fsck", str(made.config)])

    out, _err = capsys.readouterr()
    assert status == exitcodes.DAMAGE
    assert out.startswith("fsck: a rekey was interrupted; ")


@pytest.mark.slow
def start_rekey(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dermfs", "rekey", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=process_env(),
    )


def time_the_walk(config: Path, store: Path) -> tuple[float, float, float]:
    """Run one rekey, watching its volume file; return when the walk began and ended
    (two slots, then one again) and when the process ended, in seconds from its start."""
    started = time.monotonic()
    process = start_rekey(config)
    walk_start = walk_end = None
    while process.poll() is None:
        generations = slot_generations(store)
        now = time.monotonic() - started
        if walk_start is None and len(generations) == 2:
            walk_start = now
        if walk_start is not None and walk_end is None and generations == [2]:
            walk_end = now
        time.sleep(0.002)
    ended = time.monotonic() - started
    assert process.returncode == exitcodes.OK
    assert walk_start is not None
    return walk_start, walk_end or ended, ended


IN_WALK = "killed during the walk"


@pytest.mark.slow
def test_sigkill_at_random_times_then_resume(tmp_path: Path) -> None:
    """Kill ``python -m dermfs rekey`` of 2,000 files with SIGKILL at random moments.

    A first rekey of another volume of the same shape times the walk, so that most kills
    land in it; every third lands anywhere in the run.
    """
    calibration = make_cli_volume(tmp_path / "calibration", bulk=2000)
    walk_start, walk_end, duration = time_the_walk(calibration.config, calibration.store)

    made = make_cli_volume(tmp_path / "killed", bulk=2000)
    first_key = made.old_keys
    rng = random.Random(5)
    generation = 1
    states: list[str] = []
    # The machine's speed varies: a window that the run finished before (or had not
    # reached) moves earlier (or later) for the next attempts.
    while len(states) < 20 and (len(states) < 6 or states.count(IN_WALK) < 3):
        if len(states) % 3 == 2:
            delay = rng.uniform(0.0, duration)
        else:
            delay = rng.uniform(walk_start, walk_end)
        process = start_rekey(made.config)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()

        generations = slot_generations(made.store)
        if generations == [generation + 1] and process.returncode == 0:
            states.append("finished before the kill")
            walk_start, walk_end, duration = (t * 0.7 for t in (walk_start, walk_end, duration))
        elif generations == [generation + 1]:
            states.append("killed in the final check")
        elif generations == [generation]:
            states.append("killed before the new key")
            walk_start, walk_end = (t * 1.2 for t in (walk_start, walk_end))
        else:
            assert generations == [generation, generation + 1]
            states.append(IN_WALK)
        if generations != [generation + 1]:
            resumed = run_process("rekey", str(made.config))
            assert resumed.returncode == exitcodes.OK, resumed.stderr
        generation += 1
        check_rekeyed(
            made.store, made.provider, made.before, generation, made.old_keys, kills=len(states)
        )
        made.old_keys = first_key + volume_keys(made.store, made.provider)
    assert states.count(IN_WALK) >= 3, states
