"""Tampering with a backing file: EIO through the mount, then ``dermfs fsck`` names the file.

``test_volume.py`` already shows EIO and the daemon's warning for a flipped byte in a
middle chunk; this adds the whole story for a middle and a final chunk: the damaged range
fails, every other range and file reads, and after unmount ``dermfs fsck`` exits 10
(damage) naming exactly that file and chunk, and nothing else.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dermfs import exitcodes, format
from tests.mount.conftest import Mount, run_dermfs, unmount

pytestmark = pytest.mark.mount

CHUNK = format.DEFAULT_CHUNK_SIZE
CHUNKS = 4
VICTIM = "patients/p1/fundus-photograph.raw"
BYSTANDERS = ("patients/p1/notes.txt", "patients/p2/other-photograph.raw", "top-level.bin")


def backing_file(store: Path, inode: int) -> Path:
    """Return the backing file with *inode* (FUSE inode numbers are backing ones)."""
    for directory, _dirs, files in os.walk(store):
        for name in files:
            path = Path(directory, name)
            if path.lstat().st_ino == inode:
                return path
    raise AssertionError(f"no backing file has inode {inode}")


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.expect_log
@pytest.mark.parametrize("damaged_chunk", [1, CHUNKS - 1], ids=["middle-chunk", "final-chunk"])
def test_flipped_byte_gives_eio_there_only_and_fsck_names_the_file(
    mounted: Mount, damaged_chunk: int
) -> None:
    root = mounted.path
    (root / "patients" / "p1").mkdir(parents=True)
    (root / "patients" / "p2").mkdir()
    data = os.urandom((CHUNKS - 1) * CHUNK + 1000)
    (root / VICTIM).write_bytes(data)
    others = {name: os.urandom(2 * CHUNK + 7) for name in BYSTANDERS}
    for name, content in others.items():
        (root / name).write_bytes(content)
    inode = os.stat(root / VICTIM).st_ino
    mounted.remount()  # nothing of the victim cached in the kernel or the daemon

    backing = backing_file(mounted.volume.store, inode)
    slot = CHUNK + format.CHUNK_OVERHEAD
    assert backing.stat().st_size == format.HEADER_SIZE + len(data) + CHUNKS * format.CHUNK_OVERHEAD
    flip_byte(backing, format.HEADER_SIZE + damaged_chunk * slot + format.NONCE_SIZE + 500)

    fd = os.open(root / VICTIM, os.O_RDONLY)
    try:
        for chunk_index in range(CHUNKS):
            start = chunk_index * CHUNK
            if chunk_index == damaged_chunk:
                with pytest.raises(OSError) as caught:
                    os.pread(fd, CHUNK, start)
                assert caught.value.errno == errno.EIO
            else:
                assert os.pread(fd, CHUNK, start) == data[start : start + CHUNK], chunk_index
    finally:
        os.close(fd)
    for name, content in others.items():
        assert (root / name).read_bytes() == content, name
    log = mounted.new_log()
    assert any(
        line.startswith("WARNING") and f"inode {inode}" in line and f"chunk {damaged_chunk}" in line
        for line in log.splitlines()
    ), log

    unmount(mounted.volume)
    fsck = run_dermfs("fsck", mounted.volume.config, "--no-progress")
    assert fsck.returncode == exitcodes.DAMAGE == 10, fsck.stdout + fsck.stderr
    lines = fsck.stdout.splitlines()
    assert f"/{VICTIM}: chunk {damaged_chunk}" in lines, fsck.stdout
    assert lines[-1].endswith(", 1 damaged"), fsck.stdout
    assert not any(name in fsck.stdout for name in BYSTANDERS), fsck.stdout
    assert fsck.stderr == ""

    result = mounted.volume.mount()  # the rest of the volume still works after fsck
    assert result.returncode == 0, result.stderr
    for name, content in others.items():
        assert (root / name).read_bytes() == content, name
