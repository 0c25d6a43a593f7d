"""The audit journal on a real mount: who did what, every event, fail closed, crashes."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mount.conftest import (
    Mount,
    Volume,
    is_mounted,
    process_running,
    run_dermfs,
    unmount,
)

pytestmark = pytest.mark.mount

Record = dict[str, Any]

#: Uids and gids that name no user: setpriv needs no passwd entry.
READERS = ((61001, 61001), (61002, 61002))


def query(volume: Volume, *filters: str) -> list[Record]:
    """Return the records ``dermfs audit query --json`` prints for *filters*."""
    result = run_dermfs("audit", "query", volume.config, "--json", *filters)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def wait_for(
    volume: Volume, found: Callable[[list[Record]], bool], *filters: str, seconds: float = 10
) -> list[Record]:
    """Query until *found* accepts the records (the flusher writes once a second)."""
    deadline = time.monotonic() + seconds
    while True:
        records = query(volume, *filters)
        if found(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.3)


def verify(volume: Volume) -> subprocess.CompletedProcess[str]:
    """Run ``dermfs audit verify``."""
    return run_dermfs("audit", "verify", volume.config)


def fsck(volume: Volume) -> None:
    """Check the store with ``dermfs fsck``: it must be intact."""
    checked = run_dermfs("fsck", volume.config, "--no-progress")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def events(records: list[Record]) -> list[str]:
    """Return the event of each record."""
    return [record["event"] for record in records]


# ------------------------------------------------------------------------------ who


@pytest.fixture
def shared(volume: Volume) -> Iterator[Volume]:
    """The volume mounted with allow_other on a mount point every user can reach."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as other users")
    reachable = Path(tempfile.mkdtemp(prefix="dermfs-audit-"))
    reachable.chmod(0o755)
    moved = dataclasses.replace(volume, mountpoint=reachable / "mnt")
    moved.mountpoint.mkdir()
    result = moved.mount("-o", "allow_other")
    assert result.returncode == 0, result.stderr
    try:
        moved.mountpoint.chmod(0o755)
        yield moved
    finally:
        unmount(moved)
        assert not is_mounted(moved.mountpoint)
        moved.mountpoint.rmdir()
        reachable.rmdir()
    fsck(volume)


def read_as(uid: int, gid: int, path: Path) -> tuple[int, bytes]:
    """Read *path* with ``cat`` as *uid*; return cat's pid and what it read."""
    process = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "cat", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return process.pid, out


def test_records_say_who_read_which_patient(shared: Volume) -> None:
    root = shared.mountpoint
    sizes = {"123/scan.dcm": 1_300_000, "456/photo.jpg": 70_001}
    for name, size in sizes.items():
        path = root / "patients" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        (root / "patients").chmod(0o755)
        path.write_bytes(os.urandom(size))
        path.chmod(0o644)

    reads = []
    for uid, gid in READERS:
        for name, size in sizes.items():
            pid, data = read_as(uid, gid, root / "patients" / name)
            assert len(data) == size
            reads.append((uid, gid, pid, name, size))

    def complete(records: list[Record]) -> bool:
        return all(
            sum(r["length"] for r in records if r["pid"] == pid) == size
            for _uid, _gid, pid, _name, size in reads
        )

    records = wait_for(shared, complete, "--event", "read")
    assert complete(records)
    opens = query(shared, "--event", "open")
    for uid, gid, pid, name, size in reads:
        mine = [r for r in records if r["pid"] == pid]
        assert mine, f"no read records of pid {pid}"
        for record in mine:
            assert (record["uid"], record["gid"]) == (uid, gid)
            assert record["process"] == "cat"
            assert record["exe"] is not None and record["exe"].endswith("cat")
            assert record["path"] == f"patients/{name}"
            assert record["patient"] == name.split("/")[0]
            assert record["result"] == "ok"
        ranges = sorted((r["offset"], r["offset"] + r["length"]) for r in mine)
        assert ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        (opened,) = [r for r in opens if r["pid"] == pid]
        assert (opened["uid"], opened["path"], opened["result"]) == (uid, f"patients/{name}", "ok")

    by_patient = query(shared, "--patient", "456", "--uid", str(READERS[1][0]))
    assert by_patient and {r["patient"] for r in by_patient} == {"456"}
    assert {r["uid"] for r in by_patient} == {READERS[1][0]}


# ------------------------------------------------------------------------------ events


def test_every_kind_of_event_is_recorded(mounted: Mount) -> None:
    root = mounted.path
    (root / "patients" / "7").mkdir(parents=True)
    image = root / "patients" / "7" / "a.png"
    image.write_bytes(b"x" * 5000)
    assert image.read_bytes() == b"x" * 5000
    image.chmod(0o600)
    os.truncate(image, 100)
    os.utime(image, (1_000_000, 1_000_000))
    moved = root / "patients" / "7" / "b.png"
    image.rename(moved)
    moved.unlink()
    (root / "patients" / "8").mkdir()
    (root / "patients" / "8" / "f").write_bytes(b"")
    with pytest.raises(OSError) as not_empty:
        (root / "patients" / "8").rmdir()
    assert not_empty.value.errno == errno.ENOTEMPTY
    (root / "patients" / "8" / "f").unlink()
    (root / "patients" / "8").rmdir()
    mounted.remount()

    records = wait_for(mounted.volume, lambda found: events(found).count("mount") == 2)
    kinds = events(records)
    for kind in (
        "key-fetch",
        "mount",
        "mkdir",
        "create",
        "write",
        "open",
        "read",
        "setattr",
        "rename",
        "unlink",
        "rmdir",
        "unmount",
    ):
        assert kind in kinds, f"no {kind} record in {kinds}"
    assert kinds[:2] == ["key-fetch", "mount"]
    assert kinds.count("mount") == 2 and kinds.count("unmount") == 1

    def only(event: str, **fields: Any) -> list[Record]:
        return [
            r for r in records if r["event"] == event and all(r[k] == v for k, v in fields.items())
        ]

    assert only("create", path="patients/7/a.png", patient="7", result="ok")
    assert sum(r["length"] for r in only("write", path="patients/7/a.png")) == 5000
    assert sum(r["length"] for r in only("read", path="patients/7/a.png")) == 5000
    assert len(only("setattr", path="patients/7/a.png", result="ok")) >= 3  # chmod, size, times
    (rename,) = only("rename")
    assert (rename["path"], rename["new_path"], rename["new_patient"]) == (
        "patients/7/a.png",
        "patients/7/b.png",
        "7",
    )
    assert only("unlink", path="patients/7/b.png", result="ok")
    assert only("rmdir", path="patients/8", result="ENOTEMPTY")
    assert only("mkdir", path="patients/7", patient="7", result="ok")
    assert only("rmdir", path="patients/8", patient="8", result="ok")
    for record in only("mkdir"):
        assert record["uid"] == os.getuid() and record["pid"] > 0
    for record in only("mount") + only("unmount") + only("key-fetch"):
        assert record["path"] is None and record["result"] == "ok"

    result = verify(mounted.volume)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rename_of_an_open_file_moves_its_reads(mounted: Mount) -> None:
    source = mounted.path / "patients" / "1" / "x.bin"
    source.parent.mkdir(parents=True)
    (mounted.path / "patients" / "2").mkdir()
    size = 8 << 20  # more than the kernel reads ahead after the first 4 KiB
    source.write_bytes(b"y" * size)
    with open(source, "rb", buffering=0) as reading:
        assert len(reading.read(4096)) == 4096
        time.sleep(1.5)  # the first range is flushed under the old path
        source.rename(mounted.path / "patients" / "2" / "x.bin")
        assert len(reading.read()) == size - 4096
    mounted.remount()
    reads = query(mounted.volume, "--event", "read")
    assert {r["path"] for r in reads} == {"patients/1/x.bin", "patients/2/x.bin"}
    assert sum(r["length"] for r in reads) == size
    assert {r["patient"] for r in reads} == {"1", "2"}


def backing_file_of_size(store: Path, at_least: int) -> Path:
    """Return the one backing file in *store* at least *at_least* bytes long."""
    found = [
        Path(d, name)
        for d, _dirs, names in os.walk(store)
        for name in names
        if os.lstat(Path(d, name)).st_size >= at_least
    ]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.expect_log
def test_integrity_failure_is_recorded(mounted: Mount) -> None:
    image = mounted.path / "patients" / "9" / "damaged.dcm"
    image.parent.mkdir(parents=True)
    image.write_bytes(os.urandom(300_000))
    unmount(mounted.volume)
    target = backing_file_of_size(mounted.volume.store, 300_000)
    with open(target, "r+b") as backing:
        backing.seek(150_000)
        byte = backing.read(1)
        backing.seek(150_000)
        backing.write(bytes([byte[0] ^ 0x01]))
    result = mounted.volume.mount(*mounted.options)
    assert result.returncode == 0, result.stderr

    with pytest.raises(OSError) as raised, open(image, "rb") as reading:
        reading.read()
    assert raised.value.errno == errno.EIO
    found = wait_for(mounted.volume, bool, "--event", "integrity")
    assert found, "no integrity record"
    assert found[0]["path"] == "patients/9/damaged.dcm"
    assert (found[0]["result"], found[0]["patient"]) == ("EIO", "9")
    failed_reads = [r for r in query(mounted.volume, "--event", "read") if r["result"] == "EIO"]
    assert failed_reads and failed_reads[0]["path"] == "patients/9/damaged.dcm"


# ------------------------------------------------------------------------------ fail closed


@pytest.fixture
def small_journal(volume: Volume) -> Iterator[tuple[Volume, Path]]:
    """The volume with its journal on a 1 MiB tmpfs; the tmpfs is unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    where = volume.base / "journal-fs"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        text = volume.config.read_text()
        volume.config.write_text(text.replace("journal: volume.audit", "journal: journal-fs/j"))
        yield volume, where
    finally:
        try:
            unmount(volume)
        finally:
            subprocess.run(["umount", str(where)], capture_output=True, check=False)
            if is_mounted(where):
                subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
    assert not is_mounted(where)


def fill(directory: Path) -> Path:
    """Fill the filesystem of *directory* with one junk file; return it."""
    junk = directory / "junk"
    fd = os.open(junk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return junk


@pytest.mark.expect_log
def test_a_full_journal_refuses_opens_and_reads_then_resumes(
    small_journal: tuple[Volume, Path],
) -> None:
    volume, journal_fs = small_journal
    result = volume.mount()
    assert result.returncode == 0, result.stderr
    root = volume.mountpoint
    image = root / "patients" / "5" / "scan.dcm"
    image.parent.mkdir(parents=True)
    content = os.urandom(200_000)
    image.write_bytes(content)
    other = image.with_name("other.dcm")
    other.write_bytes(content)
    time.sleep(1.5)

    # Opened while the journal can be written (which drops its cached pages), never read
    # until the journal is full, so that its reads reach the daemon.
    held = os.open(other, os.O_RDONLY)
    try:
        junk = fill(journal_fs)
        deadline = time.monotonic() + 10
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                image.read_bytes()  # makes records; the next flush fails
            except PermissionError:
                refused = True
            time.sleep(0.2)
        assert refused, "opens were not refused with the journal full"
        with pytest.raises(PermissionError):
            open(image, "rb").close()
        with pytest.raises(PermissionError):
            os.pread(held, 4096, 0)

        junk.unlink()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert image.read_bytes() == content
                break
            except PermissionError:
                assert time.monotonic() < deadline, "auditing did not resume"
                time.sleep(0.2)
        assert os.pread(held, 4096, 0) == content[:4096]
    finally:
        os.close(held)
    (root / "patients" / "5" / "after.txt").write_text("written after the journal resumed")

    unmount(volume)
    fsck(volume)
    checked = verify(volume)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    records = query(volume)
    kinds = events(records)
    assert "audit-resumed" in kinds
    denied = [r for r in records if r["event"] == "denied"]
    assert denied and all(r["result"] == "EACCES" for r in denied)
    assert {"open", "read"} <= {
        r["event"] for r in records if r["result"] == "EACCES" and r["event"] != "denied"
    }
    assert records[-1]["event"] == "unmount"
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert "refusing" in volume.log_text()


# ------------------------------------------------------------------------------ crash


LOAD = """
import os, sys
root = sys.argv[1]
os.makedirs(os.path.join(root, "patients", "3"), exist_ok=True)
n = 0
while True:
    path = os.path.join(root, "patients", "3", f"f{n % 50}")
    try:
        with open(path, "wb") as out:
            out.write(os.urandom(20000))
        with open(path, "rb") as back:
            back.read()
    except OSError:
        sys.exit(0)
    n += 1
"""


@pytest.mark.expect_log
def test_kill_9_under_load_leaves_a_journal_that_verifies(mounted: Mount) -> None:
    volume = mounted.volume
    load = subprocess.Popen([sys.executable, "-c", LOAD, str(mounted.path)])
    try:
        time.sleep(3)
        pid = volume.daemon_pid()
        assert pid is not None and process_running(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_running(pid)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            load.wait(timeout=10)
        if load.poll() is None:
            load.kill()
            load.wait()
    subprocess.run(["fusermount3", "-uz", str(mounted.path)], capture_output=True, check=False)
    assert not is_mounted(mounted.path)

    before = verify(volume)
    assert before.returncode == 0, before.stdout + before.stderr
    result = volume.mount(*mounted.options)
    assert result.returncode == 0, result.stderr
    assert (mounted.path / "patients" / "3").is_dir()
    unmount(volume)
    fsck(volume)

    checked = verify(volume)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    records = query(volume)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    kinds = events(records)
    assert kinds.count("unclean-stop") == 1
    stop = kinds.index("unclean-stop")
    assert stop > kinds.index("write") and kinds[stop + 1 : stop + 3] == ["key-fetch", "mount"]
    assert kinds[-1] == "unmount" and kinds.count("unmount") == 1
    assert "was not closed cleanly" in volume.log_text()


# ------------------------------------------------------------------------------ queries


def test_verify_and_queries_after_a_mount_session(mounted: Mount) -> None:
    root = mounted.path
    for patient in ("100", "200"):
        folder = root / "patients" / patient
        folder.mkdir(parents=True)
        (folder / "img").write_bytes(patient.encode() * 1000)
        assert (folder / "img").read_bytes() == patient.encode() * 1000
    (root / "notes.txt").write_text("no patient")
    mounted.remount()
    unmount(mounted.volume)

    checked = verify(mounted.volume)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    hundred = query(mounted.volume, "--patient", "100")
    assert hundred and {r["patient"] for r in hundred} == {"100"}
    assert {"mkdir", "create", "write", "open", "read"} <= set(events(hundred))
    reads = query(mounted.volume, "--event", "read")
    assert {r["path"] for r in reads} == {"patients/100/img", "patients/200/img"}
    assert all(r["offset"] is not None and r["length"] > 0 for r in reads)
    under = query(mounted.volume, "--path", "patients/200", "--event", "read,write")
    assert {(r["event"], r["path"]) for r in under} == {
        ("read", "patients/200/img"),
        ("write", "patients/200/img"),
    }
    table = run_dermfs("audit", "query", mounted.volume.config, "--patient", "200")
    assert table.returncode == 0 and "patients/200/img" in table.stdout
