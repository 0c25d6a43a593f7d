"""Names through a real mount: directories, renames, links, long names, listings."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

import pytest

from tests.mount.conftest import Mount

pytestmark = pytest.mark.mount

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    """Call renameat2(2), which Python's os module does not offer."""
    at_fdcwd = -100
    result = _libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def backing_entries(mount: Mount) -> set[str]:
    """Return every backing name below the store, relative to it."""
    found = set()
    for directory, dirs, files in os.walk(mount.volume.store):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(directory, name), mount.volume.store))
    return found


def test_mkdir_rmdir(mounted: Mount) -> None:
    directory = mounted.path / "a" / "b" / "c"
    directory.mkdir(parents=True)
    assert directory.is_dir()
    (directory / "file").write_text("x")
    with pytest.raises(OSError) as caught:
        directory.rmdir()
    assert caught.value.errno == errno.ENOTEMPTY
    (directory / "file").unlink()
    directory.rmdir()
    (mounted.path / "a" / "b").rmdir()
    (mounted.path / "a").rmdir()
    assert os.listdir(mounted.path) == []
    leftovers = backing_entries(mounted) - {"dermfs.dirid", "dermfs.volume"}
    assert all(entry.startswith("dermfs.") for entry in leftovers), leftovers


def test_rename_directory_holding_files(mounted: Mount) -> None:
    source = mounted.path / "patients" / "p001"
    source.mkdir(parents=True)
    (source / "img1.jpg").write_bytes(b"one")
    (source / "sub").mkdir()
    (source / "sub" / "img2.jpg").write_bytes(b"two")
    (mounted.path / "archive").mkdir()

    target = mounted.path / "archive" / "p001-renamed"
    source.rename(target)
    assert not source.exists()
    assert (target / "img1.jpg").read_bytes() == b"one"
    assert (target / "sub" / "img2.jpg").read_bytes() == b"two"
    mounted.remount()
    assert (target / "sub" / "img2.jpg").read_bytes() == b"two"
    assert sorted(os.listdir(target)) == ["img1.jpg", "sub"]


def test_rename_over_existing_file_and_empty_dir(mounted: Mount) -> None:
    first, second = mounted.path / "first", mounted.path / "second"
    first.write_text("1")
    second.write_text("2")
    first.rename(second)
    assert second.read_text() == "1"
    assert os.listdir(mounted.path) == ["second"]

    full, empty = mounted.path / "full", mounted.path / "empty"
    full.mkdir()
    (full / "inside").write_text("in")
    empty.mkdir()
    full.rename(empty)
    assert (empty / "inside").read_text() == "in"
    assert sorted(os.listdir(mounted.path)) == ["empty", "second"]

    other = mounted.path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(OSError) as caught:
        empty.rename(other)
    assert caught.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(IsADirectoryError):
        second.rename(other)
    with pytest.raises(NotADirectoryError):
        other.rename(second)


def test_rename_noreplace_and_exchange(mounted: Mount) -> None:
    a, b = mounted.path / "a", mounted.path / "b"
    a.write_text("A")
    b.mkdir()
    (b / "child").write_text("C")

    with pytest.raises(OSError) as caught:
        renameat2(a, b, _RENAME_NOREPLACE)
    assert caught.value.errno == errno.EEXIST
    renameat2(a, mounted.path / "c", _RENAME_NOREPLACE)
    assert (mounted.path / "c").read_text() == "A"

    c = mounted.path / "c"
    renameat2(c, b, _RENAME_EXCHANGE)
    assert (mounted.path / "b").read_text() == "A"
    assert (mounted.path / "c" / "child").read_text() == "C"
    mounted.remount()
    assert (mounted.path / "b").read_text() == "A"
    assert (mounted.path / "c" / "child").read_text() == "C"


def test_rename_hard_links_to_one_file_is_a_no_op(mounted: Mount) -> None:
    one, two = mounted.path / "one", mounted.path / "two"
    one.write_text("same")
    os.link(one, two)
    os.rename(one, two)
    assert sorted(os.listdir(mounted.path)) == ["one", "two"]
    assert one.read_text() == two.read_text() == "same"


def test_symlinks(mounted: Mount) -> None:
    (mounted.path / "dir").mkdir()
    (mounted.path / "dir" / "target.txt").write_text("pointed at")
    link = mounted.path / "link"
    link.symlink_to("dir/target.txt")
    assert os.readlink(link) == "dir/target.txt"
    assert link.is_symlink()
    assert link.read_text() == "pointed at"
    assert os.lstat(link).st_size == len("dir/target.txt")

    dangling = mounted.path / "dangling"
    dangling.symlink_to("/nowhere/" + "x" * 1000)
    assert os.readlink(dangling) == "/nowhere/" + "x" * 1000
    assert not dangling.exists()
    with pytest.raises(OSError) as caught:
        (mounted.path / "too-long").symlink_to("y" * 4000)
    assert caught.value.errno == errno.ENAMETOOLONG
    link.unlink()
    assert not link.is_symlink()


def test_hard_links(mounted: Mount) -> None:
    original = mounted.path / "original"
    original.write_bytes(b"shared content")
    (mounted.path / "sub").mkdir()
    link = mounted.path / "sub" / "link"
    os.link(original, link)
    assert original.stat().st_ino == link.stat().st_ino
    assert original.stat().st_nlink == 2

    with open(link, "ab") as stream:
        stream.write(b" grows")
    assert original.read_bytes() == b"shared content grows"
    original.unlink()
    assert link.read_bytes() == b"shared content grows"
    assert link.stat().st_nlink == 1


def test_long_names(mounted: Mount) -> None:
    longest = "n" * 255
    multibyte = "é" * 127  # 254 bytes of UTF-8
    for name in (longest, multibyte):
        path = mounted.path / name
        path.write_text(name)
        assert path.read_text() == name
    (mounted.path / ("d" * 250)).mkdir()
    (mounted.path / ("d" * 250) / ("f" * 255)).write_text("deep")
    assert sorted(os.listdir(mounted.path)) == sorted([longest, multibyte, "d" * 250])

    os.rename(mounted.path / longest, mounted.path / "short")
    os.rename(mounted.path / "short", mounted.path / ("m" * 200))
    assert (mounted.path / ("m" * 200)).read_text() == longest
    with pytest.raises(OSError) as caught:
        (mounted.path / ("x" * 256)).write_text("too long")
    assert caught.value.errno == errno.ENAMETOOLONG

    mounted.remount()
    assert (mounted.path / ("d" * 250) / ("f" * 255)).read_text() == "deep"
    sidecars = [entry for entry in backing_entries(mounted) if entry.endswith(".name")]
    assert len(sidecars) == 4  # multibyte, d*250, f*255 and m*200; the renamed ones are gone


def test_large_directory_listing(mounted: Mount) -> None:
    names = {f"entry-{number:05d}-{'p' * (number % 40)}" for number in range(1500)}
    for name in names:
        (mounted.path / name).touch()
    listed = os.listdir(mounted.path)
    assert len(listed) == len(names)
    assert set(listed) == names
    with os.scandir(mounted.path) as entries:
        assert {entry.name for entry in entries if entry.is_file()} == names


def test_listing_while_removing(mounted: Mount) -> None:
    for number in range(300):
        (mounted.path / f"f{number}").touch()
    seen = []
    with os.scandir(mounted.path) as entries:
        for index, entry in enumerate(entries):
            seen.append(entry.name)
            if index == 10:
                for number in range(150, 300):
                    (mounted.path / f"f{number}").unlink()
    assert len(seen) == len(set(seen))
    assert {f"f{number}" for number in range(150)} <= set(seen)


def test_special_files_are_refused(mounted: Mount) -> None:
    with pytest.raises(OSError) as caught:
        os.mkfifo(mounted.path / "fifo")
    assert caught.value.errno == errno.EPERM
    with pytest.raises(OSError):
        os.mknod(mounted.path / "dev", 0o600 | 0o020000, os.makedev(1, 3))
    os.mknod(mounted.path / "regular", 0o600 | 0o100000)
    assert (mounted.path / "regular").read_bytes() == b""
