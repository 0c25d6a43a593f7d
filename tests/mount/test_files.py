"""File contents through a real mount: offsets, truncation, appends, sparse files, fsync."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mount.conftest import Mount, Volume, mount_volume

pytestmark = pytest.mark.mount

CHUNK = 65536


@pytest.fixture(params=["writeback_cache", "nowriteback_cache"])
def mounted(volume: Volume, request: pytest.FixtureRequest) -> Iterator[Mount]:
    """The volume mounted with and without the kernel's writeback cache."""
    yield from mount_volume(volume, request, request.param)


def test_create_read_write_at_offsets(mounted: Mount) -> None:
    path = mounted.path / "offsets.bin"
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for offset, length in [(0, 10), (5, 3), (CHUNK - 2, 5), (3 * CHUNK + 7, 100), (1, 1)]:
            data = os.urandom(length)
            os.pwrite(fd, data, offset)
            if len(model) < offset + length:
                model.extend(b"\0" * (offset + length - len(model)))
            model[offset : offset + length] = data
        assert os.fstat(fd).st_size == len(model)
        assert os.pread(fd, len(model) + 10, 0) == model
        assert os.pread(fd, 7, CHUNK - 3) == model[CHUNK - 3 : CHUNK + 4]
    finally:
        os.close(fd)
    assert path.read_bytes() == model
    assert path.stat().st_size == len(model)


def test_o_trunc_rewrite(mounted: Mount) -> None:
    path = mounted.path / "rewrite.txt"
    path.write_bytes(b"a" * 200_000)
    with open(path, "wb") as stream:
        stream.write(b"short")
    assert path.read_bytes() == b"short"
    assert path.stat().st_size == 5


def test_append(mounted: Mount) -> None:
    path = mounted.path / "log.txt"
    expected = b""
    for number in range(50):
        line = f"line {number}\n".encode() * (number + 1)
        with open(path, "ab") as stream:
            stream.write(line)
        expected += line
    assert path.read_bytes() == expected

    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"tail")
    finally:
        os.close(fd)
    assert path.read_bytes() == expected + b"tail"


def test_sparse_write_far_past_end(mounted: Mount) -> None:
    path = mounted.path / "sparse.bin"
    path.write_bytes(b"head")
    offset = 5 * CHUNK + 123
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(b"tail")
    data = path.read_bytes()
    assert len(data) == offset + 4
    assert data[:4] == b"head"
    assert data[4:offset] == bytes(offset - 4)
    assert data[offset:] == b"tail"


@pytest.mark.parametrize("through_handle", [False, True])
def test_truncate_up_and_down(mounted: Mount, through_handle: bool) -> None:
    path = mounted.path / "truncate.bin"
    original = os.urandom(3 * CHUNK + 500)
    path.write_bytes(original)

    def truncate(size: int) -> None:
        if through_handle:
            with open(path, "r+b") as stream:
                stream.truncate(size)
        else:
            os.truncate(path, size)

    truncate(CHUNK + 10)
    assert path.read_bytes() == original[: CHUNK + 10]
    truncate(4 * CHUNK)
    assert path.read_bytes() == original[: CHUNK + 10] + bytes(4 * CHUNK - CHUNK - 10)
    truncate(0)
    assert path.read_bytes() == b""
    assert path.stat().st_size == 0


def test_truncate_while_open_elsewhere(mounted: Mount) -> None:
    path = mounted.path / "shared.bin"
    path.write_bytes(b"x" * 1000)
    with open(path, "r+b") as stream:
        os.truncate(path, 10)
        stream.seek(0)
        assert stream.read() == b"x" * 10
        stream.write(b"yz")
    assert path.read_bytes() == b"x" * 10 + b"yz"


def test_unlink_while_open(mounted: Mount) -> None:
    path = mounted.path / "doomed.bin"
    data = os.urandom(2 * CHUNK)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        path.unlink()
        assert not path.exists()
        assert os.listdir(mounted.path) == []
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"more", len(data))
        assert os.fstat(fd).st_size == len(data) + 4
        assert os.pread(fd, 10, len(data) - 6) == data[-6:] + b"more"
        os.ftruncate(fd, 3)
        assert os.pread(fd, 10, 0) == data[:3]
    finally:
        os.close(fd)
    assert os.listdir(mounted.path) == []


def test_temp_file_fsync_rename_over_existing(mounted: Mount) -> None:
    target = mounted.path / "document.txt"
    target.write_text("old version")
    reader = open(target, "rb")  # noqa: SIM115 - held across the rename on purpose
    try:
        temporary = mounted.path / ".document.txt.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"new version")
        os.fsync(fd)
        os.close(fd)
        os.rename(temporary, target)
        dir_fd = os.open(mounted.path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dir_fd)
        os.close(dir_fd)

        assert target.read_text() == "new version"
        assert sorted(os.listdir(mounted.path)) == ["document.txt"]
        assert reader.read() == b"old version"
    finally:
        reader.close()
    mounted.remount()
    assert target.read_text() == "new version"


def test_read_only_open_cannot_write(mounted: Mount) -> None:
    path = mounted.path / "ro.txt"
    path.write_text("content")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            os.write(fd, b"x")
        assert caught.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_large_file_round_trip(mounted: Mount, tmp_path: Path) -> None:
    data = os.urandom(8 * 1024 * 1024 + 12345)
    path = mounted.path / "large.bin"
    with open(path, "wb") as stream:
        for offset in range(0, len(data), 1 << 20):
            stream.write(data[offset : offset + (1 << 20)])
    assert path.stat().st_size == len(data)
    assert path.read_bytes() == data
