"""Whole-volume behaviour through a real mount: persistence, concurrency, tampering."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.mount.conftest import Mount, tree_digest

pytestmark = pytest.mark.mount

CHUNK = 65536


def test_persistence_across_remount(mounted: Mount) -> None:
    root = mounted.path
    (root / "patients" / "p1").mkdir(parents=True)
    (root / "patients" / "p2" / "visit").mkdir(parents=True)
    (root / "empty.txt").touch()
    (root / "one-byte").write_bytes(b"1")
    (root / "patients" / "p1" / "image.raw").write_bytes(os.urandom(3 * CHUNK + 17))
    (root / "patients" / "p2" / "visit" / "chunk-sized").write_bytes(os.urandom(CHUNK))
    (root / ("long-" + "n" * 240)).write_bytes(os.urandom(1000))
    (root / "patients" / "link").symlink_to("p1/image.raw")
    before = tree_digest(root)
    assert len(before) == 5

    mounted.remount()
    assert tree_digest(root) == before
    assert os.readlink(root / "patients" / "link") == "p1/image.raw"
    mounted.remount()
    assert tree_digest(root) == before


_WORKER = textwrap.dedent(
    """
    import hashlib, os, sys
    root, worker = sys.argv[1], int(sys.argv[2])
    shared = os.path.join(root, "shared.bin")
    own = os.path.join(root, f"own-{worker}.bin")
    block = hashlib.sha256(str(worker).encode()).digest() * 2048   # 64 KiB, one per worker
    with open(own, "wb") as stream:
        for _ in range(40):
            stream.write(block)
    fd = os.open(shared, os.O_RDWR)
    for round_number in range(20):
        os.pwrite(fd, block, worker * len(block))
        got = os.pread(fd, len(block), worker * len(block))
        assert got == block, "shared region changed under us"
    os.close(fd)
    with open(own, "rb") as stream:
        assert stream.read() == block * 40
    """
)


def test_processes_reading_and_writing_at_once(mounted: Mount) -> None:
    workers = 6
    (mounted.path / "shared.bin").write_bytes(bytes(workers * CHUNK))
    processes = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(mounted.path), str(worker)])
        for worker in range(workers)
    ]
    codes = [process.wait(timeout=120) for process in processes]
    assert codes == [0] * workers

    shared = (mounted.path / "shared.bin").read_bytes()
    for worker in range(workers):
        block = hashlib.sha256(str(worker).encode()).digest() * 2048
        assert shared[worker * CHUNK : (worker + 1) * CHUNK] == block
        assert (mounted.path / f"own-{worker}.bin").read_bytes() == block * 40
    mounted.remount()
    assert (mounted.path / "shared.bin").read_bytes() == shared


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.expect_log
def test_tampered_chunk_gives_eio_and_a_warning(mounted: Mount) -> None:
    victim = mounted.path / "victim.bin"
    bystander = mounted.path / "bystander.bin"
    data = os.urandom(3 * CHUNK)
    victim.write_bytes(data)
    bystander.write_bytes(b"untouched")
    backing_inode = os.stat(victim).st_ino
    mounted.remount()  # nothing cached in the kernel or the daemon

    with os.scandir(mounted.volume.store) as entries:
        backing = next(entry.path for entry in entries if entry.inode() == backing_inode)
    header, slot = 88, CHUNK + 28
    _flip_byte(Path(backing), header + slot + 100)  # inside chunk 1

    with open(victim, "rb") as stream:
        assert stream.read(CHUNK) == data[:CHUNK]
        with pytest.raises(OSError) as caught:
            stream.read(CHUNK)
        assert caught.value.errno == errno.EIO
        stream.seek(2 * CHUNK)
        assert stream.read() == data[2 * CHUNK :]
    assert bystander.read_bytes() == b"untouched"

    log = mounted.new_log()
    warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
    assert any(f"inode {backing_inode}" in line and "chunk 1" in line for line in warnings), log
    assert "victim" not in log


@pytest.mark.expect_log
def test_tampered_names_are_skipped(mounted: Mount) -> None:
    (mounted.path / "good").write_text("g")
    (mounted.path / "bad").write_text("b")
    bad_inode = os.stat(mounted.path / "bad").st_ino
    mounted.remount()
    with os.scandir(mounted.volume.store) as entries:
        bad = next(entry for entry in entries if entry.inode() == bad_inode)
    os.rename(bad.path, os.path.join(mounted.volume.store, "A" + bad.name[1:]))
    assert os.listdir(mounted.path) == ["good"]
    assert "skipping" in mounted.new_log()
