"""ContentFile when the backing filesystem runs out of space.

``ContentFile.write`` promises that a write or truncate that fails with an ``OSError`` leaves
the file as it was. The disk is simulated by a ``pwrite`` that, like the kernel, writes as
much as fits in the blocks it may still allocate, returns a short count, and raises ENOSPC
on the next call. Every amount of free space from none to enough is tried.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dermfs import content, format
from dermfs.content import ContentFile
from dermfs.intent import read_pending
from dermfs.volume import Volume

BLOCK = 4096
C = format.MIN_CHUNK_SIZE


@contextmanager
def disk_with_free_blocks(
    monkeypatch: pytest.MonkeyPatch, fd: int, free_blocks: int
) -> Iterator[None]:
    """Let writes to *fd* allocate at most *free_blocks* new blocks past its current end."""
    real_pwrite = os.pwrite
    allocated = set(range(-(-os.fstat(fd).st_size // BLOCK)))
    budget = [free_blocks]

    def pwrite(target: int, buffer: Any, offset: int) -> int:
        if target != fd:
            return real_pwrite(target, buffer, offset)
        view = memoryview(buffer)
        written = 0
        while written < len(view):
            block = (offset + written) // BLOCK
            if block not in allocated:
                if not budget[0]:
                    if written:
                        return written
                    raise OSError(errno.ENOSPC, "No space left on device")
                budget[0] -= 1
                allocated.add(block)
            piece = min(len(view) - written, (block + 1) * BLOCK - offset - written)
            real_pwrite(fd, view[written : written + piece], offset + written)
            written += piece
        return written

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", pwrite)
        yield


def data(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def operations(chunk: int) -> dict[str, tuple[bytes, Callable[[ContentFile], None]]]:
    """Operations that need new space, on a file with *chunk*-byte chunks."""
    return {
        "append to a partial last chunk": (
            data(chunk + 100, 1),
            lambda file: file.write(chunk + 100, data(2 * chunk, 2)),
        ),
        "grow the last chunk across a block": (
            data(chunk + 100, 3),
            lambda file: file.write(chunk + 100, data(chunk - 200, 4)),
        ),
        "append to a full last chunk": (
            data(2 * chunk, 5),
            lambda file: file.write(2 * chunk, data(chunk, 6)),
        ),
        "write far past the end": (
            data(500, 7),
            lambda file: file.write(5 * chunk, data(10, 8)),
        ),
        "truncate up": (data(chunk + 9, 9), lambda file: file.truncate(4 * chunk)),
    }


@pytest.mark.parametrize("chunk_size", [4096, 65536])
@pytest.mark.parametrize("name", operations(C))
def test_running_out_of_space_leaves_the_file_as_it_was(
    name: str,
    chunk_size: int,
    make_store: Callable[[int], Path],
    open_volume: Callable[[Path], Volume],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    volume = open_volume(make_store(chunk_size))
    initial, operation = operations(chunk_size)[name]
    outcomes = set()
    for free_blocks in range(6 * chunk_size // BLOCK):
        path = volume.store / f"file{free_blocks}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            file = volume.create_file(fd, os.fstat(fd).st_ino, path.name)
            file.write(0, initial)
            file.checkpoint()

            with disk_with_free_blocks(monkeypatch, fd, free_blocks):
                try:
                    operation(file)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    outcomes.add("failed")
                    expected = initial
                else:
                    outcomes.add("done")
                    expected = file.read(0, file.size)
            file.checkpoint()

            # What the frontend would see after the error, and after reopening the file.
            assert file.read(0, file.size + 1) == expected, free_blocks
            reopened = volume.open_file(fd, file.inode, path.name)
            assert reopened.size == len(expected), free_blocks
            assert reopened.read(0, reopened.size) == expected, free_blocks
            keys = volume.read_file_keys(fd)
            assert all(error is None for _index, error in content.iter_chunks(fd, keys))
        finally:
            os.close(fd)
            path.unlink()

    assert outcomes == {"failed", "done"}


@contextmanager
def failing_write(monkeypatch: pytest.MonkeyPatch, fd: int, number: int) -> Iterator[None]:
    """Make write number *number* (from 0) to *fd* fail with ENOSPC, writing nothing."""
    real_pwrite = os.pwrite
    calls = [0]

    def pwrite(target: int, buffer: Any, offset: int) -> int:
        if target == fd:
            calls[0] += 1
            if calls[0] - 1 == number:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(target, buffer, offset)

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", pwrite)
        yield


def out_of_space_cases() -> Iterator[tuple[str, int]]:
    for free_blocks in range(6):
        yield "free blocks", free_blocks
    for number in range(4):
        yield "failing append", number


def test_an_intent_log_out_of_space_still_covers_every_overwrite(
    volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert volume.intent is not None
    geometry = volume.geometry
    outcomes = set()
    for kind, amount in out_of_space_cases():
        path = volume.store / f"file-{amount}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            file = volume.create_file(fd, os.fstat(fd).st_ino, path.name)
            file.write(0, data(4 * C + 10, 10))
            file.checkpoint()
            before = path.read_bytes()

            failed = False
            log_fd = volume.intent._fd
            if kind == "free blocks":
                disk = disk_with_free_blocks(monkeypatch, log_fd, amount)
            else:
                disk = failing_write(monkeypatch, log_fd, amount)
            with disk:
                try:
                    file.write(C + 1, data(2 * C, 11))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    failed = True
            outcomes.add("failed" if failed else "done")
            if failed:
                # The file is untouched, and once there is space again the write works.
                assert path.read_bytes() == before
                file.write(C + 1, data(2 * C, 11))

            # The log now lets a recovery put back each chunk the write overwrote.
            log_path = volume.store / format.INTENT_FILE
            pending = {entry.inode: entry for entry in read_pending(log_path, volume._intent_mac)}
            assert file.inode in pending, (kind, amount)
            saved = pending[file.inode].saved
            for chunk_index in range(1, 4):
                start = geometry.chunk_offset(chunk_index)
                expected = before[start : start + geometry.slot_size]
                assert saved.get(chunk_index) == expected, (kind, amount, chunk_index)
            file.checkpoint()
        finally:
            os.close(fd)
            path.unlink()

    assert outcomes == {"failed", "done"}


def test_a_truncate_that_fails_to_log_keeps_later_overwrites_covered(
    volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert volume.intent is not None
    geometry = volume.geometry
    failures = 0
    for number in range(4):
        path = volume.store / f"file-{number}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            file = volume.create_file(fd, os.fstat(fd).st_ino, path.name)
            file.write(0, data(4 * C + 10, 12))
            file.checkpoint()
            before = path.read_bytes()

            with failing_write(monkeypatch, volume.intent._fd, number):
                try:
                    file.truncate(C + C // 2)
                except OSError:
                    failures += 1
                    assert path.read_bytes() == before
                    # Chunk 2 is still there, and still durable: overwriting it in place
                    # must save its old bytes first.
                    file.write(2 * C + 5, data(100, 13))
                    log_path = volume.store / format.INTENT_FILE
                    pending = read_pending(log_path, volume._intent_mac)
                    saved = {index for entry in pending for index in entry.saved}
                    assert 2 in saved, number
                    start = geometry.chunk_offset(2)
                    assert [entry.saved.get(2) for entry in pending] == [
                        before[start : start + geometry.slot_size]
                    ]
            file.checkpoint()
        finally:
            os.close(fd)
            path.unlink()

    assert failures
