"""Attributes through a real mount: modes, owners, times, xattrs, statfs, inode numbers."""

from __future__ import annotations

import errno
import os

import pytest

from tests.mount.conftest import Mount

pytestmark = pytest.mark.mount


def test_chmod_chown_utimens(mounted: Mount) -> None:
    path = mounted.path / "file"
    path.write_text("x")
    os.chmod(path, 0o640)
    assert path.stat().st_mode & 0o7777 == 0o640
    os.chown(path, 1234, 5678)
    assert (path.stat().st_uid, path.stat().st_gid) == (1234, 5678)
    os.utime(path, ns=(1_000_000_000_123, 2_000_000_000_456))
    st = path.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_123, 2_000_000_000_456)

    directory = mounted.path / "dir"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o700)
    assert directory.stat().st_mode & 0o7777 == 0o700
    link = mounted.path / "link"
    link.symlink_to("file")
    os.chown(link, 42, 43, follow_symlinks=False)
    assert (os.lstat(link).st_uid, os.lstat(link).st_gid) == (42, 43)
    assert path.stat().st_uid == 1234

    with open(path, "r+b") as stream:
        os.fchmod(stream.fileno(), 0o600)
        os.utime(stream.fileno(), ns=(5, 6))
    assert path.stat().st_mode & 0o7777 == 0o600
    assert path.stat().st_mtime_ns == 6


def test_new_files_get_the_callers_mode(mounted: Mount) -> None:
    old = os.umask(0o027)
    try:
        (mounted.path / "made").write_text("x")
        (mounted.path / "dir").mkdir()
    finally:
        os.umask(old)
    assert (mounted.path / "made").stat().st_mode & 0o777 == 0o640
    assert (mounted.path / "dir").stat().st_mode & 0o777 == 0o750


def test_xattrs(mounted: Mount) -> None:
    path = mounted.path / "file"
    path.write_text("x")
    directory = mounted.path / "dir"
    directory.mkdir()
    for target in (path, directory):
        os.setxattr(target, "user.patient", b"P-001")
        os.setxattr(target, "user.empty", b"")
        os.setxattr(target, "user.big", b"v" * 2000)
        assert os.getxattr(target, "user.patient") == b"P-001"
        assert os.getxattr(target, "user.empty") == b""
        assert sorted(os.listxattr(target)) == ["user.big", "user.empty", "user.patient"]
        os.setxattr(target, "user.patient", b"P-002")
        assert os.getxattr(target, "user.patient") == b"P-002"
        os.removexattr(target, "user.patient")
        with pytest.raises(OSError) as caught:
            os.getxattr(target, "user.patient")
        assert caught.value.errno == errno.ENODATA
        with pytest.raises(OSError) as caught:
            os.removexattr(target, "user.patient")
        assert caught.value.errno == errno.ENODATA

    with pytest.raises(OSError) as caught:
        os.getxattr(path, "trusted.thing")
    assert caught.value.errno == errno.ENODATA
    with pytest.raises(OSError) as caught:
        os.setxattr(path, "trusted.thing", b"x")
    assert caught.value.errno == errno.ENOTSUP

    backing_names = []
    for entry in os.listdir(mounted.volume.store):
        if not entry.startswith("dermfs."):
            backing_names += os.listxattr(mounted.volume.store / entry, follow_symlinks=False)
    assert backing_names and not any("big" in name for name in backing_names)

    with open(path, "rb") as stream:
        assert os.getxattr(stream.fileno(), "user.big") == b"v" * 2000
    mounted.remount()
    assert os.getxattr(path, "user.big") == b"v" * 2000
    assert os.getxattr(directory, "user.empty") == b""


def test_statfs(mounted: Mount) -> None:
    mounted_stats = os.statvfs(mounted.path)
    backing = os.statvfs(mounted.volume.store)
    assert mounted_stats.f_bsize == backing.f_bsize
    assert mounted_stats.f_blocks == backing.f_blocks
    assert mounted_stats.f_namemax == 255
    assert abs(mounted_stats.f_bavail - backing.f_bavail) < backing.f_blocks // 100 + 1000


def test_inode_numbers_are_stable(mounted: Mount) -> None:
    (mounted.path / "dir").mkdir()
    (mounted.path / "dir" / "file").write_text("x")
    before = {name: os.lstat(mounted.path / name).st_ino for name in ("dir", "dir/file", ".")}
    assert before["."] == 1
    mounted.remount()
    after = {name: os.lstat(mounted.path / name).st_ino for name in before}
    assert after == before


def test_sizes_and_blocks(mounted: Mount) -> None:
    empty = mounted.path / "empty"
    empty.touch()
    assert empty.stat().st_size == 0
    assert empty.stat().st_blocks == 0
    data = mounted.path / "data"
    data.write_bytes(os.urandom(300_000))
    st = data.stat()
    assert st.st_size == 300_000
    assert st.st_blocks * 512 >= 300_000
    assert st.st_blocks * 512 < 300_000 + 64 * 1024
