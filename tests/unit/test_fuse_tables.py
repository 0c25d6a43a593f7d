"""The FUSE frontend's pure parts: the inode table and mount options (no kernel needed)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dermfs.errors import MountError
from dermfs.fuse.inodes import ROOT_INODE, InodeTable
from dermfs.fuse.options import fsname_of, parse_options, store_of_fsname

FILE, DIR = stat.S_IFREG, stat.S_IFDIR
ROOT_BACKING = 5000


@pytest.fixture
def table() -> InodeTable:
    return InodeTable(ROOT_BACKING)


def test_inode_numbers_swap_root(table: InodeTable) -> None:
    assert table.fuse_inode(ROOT_BACKING) == ROOT_INODE
    assert table.fuse_inode(ROOT_INODE) == ROOT_BACKING
    assert table.fuse_inode(77) == 77


def test_paths_follow_renames_of_directories(table: InodeTable) -> None:
    table.remember(ROOT_INODE, b"dir", "EDIR", 10, DIR)
    table.remember(10, b"file", "EFILE", 11, FILE)
    assert table.backing_path(11) == "EDIR/EFILE"
    assert table.plaintext_path(11) == b"/dir/file"

    table.remember(ROOT_INODE, b"other", "EOTHER", 12, DIR)
    table.move_link(ROOT_INODE, b"dir", 12, b"moved", "EMOVED")
    assert table.backing_path(11) == "EOTHER/EMOVED/EFILE"
    assert table.plaintext_path(11) == b"/other/moved/file"
    assert table.plaintext_path(ROOT_INODE) == b"/"
    assert table.parent_of(10) == 12


def test_hard_links_and_unlink(table: InodeTable) -> None:
    table.remember(ROOT_INODE, b"a", "EA", 20, FILE)
    table.remember(ROOT_INODE, b"b", "EB", 20, FILE)
    node = table.get(20)
    assert len(node.links) == 2 and node.lookups == 2
    table.remove_link(ROOT_INODE, b"a")
    assert table.backing_path(20) == "EB"
    table.remove_link(ROOT_INODE, b"b")
    with pytest.raises(FileNotFoundError):
        table.backing_path(20)
    assert table.plaintext_path(20) is None
    table.forget(20, 2)
    assert table.find(20) is None


def test_open_files_outlive_forget(table: InodeTable) -> None:
    table.remember(ROOT_INODE, b"a", "EA", 30, FILE)
    table.pin(30)
    table.forget(30, 1)
    assert table.find(30) is not None
    table.unpin(30)
    assert table.find(30) is None


def test_directories_stay_while_children_are_known(table: InodeTable) -> None:
    table.remember(ROOT_INODE, b"d", "ED", 40, DIR)
    table.remember(40, b"f", "EF", 41, FILE)
    table.forget(40, 1)
    assert table.find(40) is not None
    table.forget(41, 1)
    assert table.find(40) is None and table.find(41) is None
    assert len(table) == 1


def test_reused_backing_inode_gets_a_new_generation(table: InodeTable) -> None:
    table.remember(ROOT_INODE, b"old", "EOLD", 50, FILE)
    table.remove_link(ROOT_INODE, b"old")
    node = table.remember(ROOT_INODE, b"new", "ENEW", 50, DIR)
    assert node.generation == 1 and node.kind == DIR
    assert node.lookups == 2  # the kernel's old lookups still balance its later forgets


def test_exchange(table: InodeTable) -> None:
    table.remember(ROOT_INODE, b"x", "EX", 60, FILE)
    table.remember(ROOT_INODE, b"y", "EY", 61, DIR)
    table.exchange_links(ROOT_INODE, b"x", ROOT_INODE, b"y")
    assert table.plaintext_path(60) == b"/y"
    assert table.plaintext_path(61) == b"/x"
    assert table.backing_path(60) == "EY"


def test_names_never_appear_in_repr(table: InodeTable) -> None:
    node = table.remember(ROOT_INODE, b"patient-secret", "E", 70, FILE)
    assert "secret" not in repr(node)


def test_options_always_set_and_passed_through() -> None:
    parsed = parse_options(Path("/srv/a,b é"), ["allow_other", "noatime", "x-systemd.after=y"])
    assert "default_permissions" in parsed.fuse
    assert "subtype=dermfs" in parsed.fuse
    assert "allow_other" in parsed.fuse and "noatime" in parsed.fuse
    fsname = next(option for option in parsed.fuse if option.startswith("fsname="))
    assert "," not in fsname and fsname.isascii()
    assert store_of_fsname(fsname_of(Path("/srv/a,b é"))) == Path("/srv/a,b é")
    assert fsname_of(Path("/srv/dermfs/clinic")) == "/srv/dermfs/clinic"


def test_options_of_our_own() -> None:
    parsed = parse_options(
        Path("/s"), ["attr_timeout=5", "writeback_cache", "nokeep_cache", "log=/tmp/x"]
    )
    assert parsed.cache.attr_timeout == 5
    assert parsed.cache.writeback_cache
    assert not parsed.cache.keep_cache
    assert parsed.log == "/tmp/x"
    assert "allow_other" in parse_options(Path("/s"), [], allow_other=True).fuse


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("bogus", "unknown mount option bogus"),
        ("fsname=x", "always set"),
        ("attr_timeout=soon", "attr_timeout"),
        ("max_read=-1", "max_read"),
        ("noatime=1", "noatime"),
    ],
)
def test_bad_options(option: str, message: str) -> None:
    with pytest.raises(MountError, match=message):
        parse_options(Path("/s"), [option])
