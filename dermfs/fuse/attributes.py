"""Plaintext attributes from backing ``stat`` results, and ``statfs`` from the store.

Sizes are the only attributes that differ from the backing object's: a regular file shows
its plaintext size (the open content's size when it is open, else the size computed from
the backing size), a symlink the length of its plaintext target. ``st_blocks`` is the
backing file's allocation scaled by plaintext over backing size, so that ``du`` shows about
what the plaintext takes and a dense file never looks sparse. ``st_blksize`` is the chunk
size, the unit the content layer reads and writes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import pyfuse3

from dermfs import format
from dermfs.cryptocore import SEAL_OVERHEAD
from dermfs.names import MAX_PLAINTEXT_NAME


@dataclass(frozen=True)
class CacheSettings:
    """What the kernel may cache; see ``docs/fuse.md`` for the measurements behind them.

    Attributes:
        attr_timeout: seconds the kernel keeps attributes.
        entry_timeout: seconds the kernel keeps names (and negative lookups).
        keep_cache: whether an open keeps the page cache of earlier opens.
        writeback_cache: whether the kernel may gather writes in its page cache.
        read_ahead_kb: the mount's read-ahead window, set after mounting (as root);
            0 leaves the kernel's default.
    """

    attr_timeout: float = 10.0
    entry_timeout: float = 10.0
    keep_cache: bool = False
    writeback_cache: bool = False
    read_ahead_kb: int = 1024


@dataclass(frozen=True)
class Timeouts:
    """How long the kernel may cache what a reply says, in seconds."""

    attr: float
    entry: float


def symlink_target_length(backing_length: int) -> int:
    """Return the plaintext length of a symlink target from its backing length."""
    sealed = backing_length * 3 // 4
    return max(0, sealed - SEAL_OVERHEAD)


def entry_attributes(
    inode: int,
    generation: int,
    st: os.stat_result,
    geometry: format.ChunkGeometry,
    timeouts: Timeouts,
    plaintext_size: int | None = None,
) -> pyfuse3.EntryAttributes:
    """Return the attributes the kernel sees for a backing object.

    Args:
        inode: the FUSE inode number.
        generation: the node's generation.
        st: the backing object's ``lstat`` or ``fstat``.
        geometry: the volume's chunk geometry.
        timeouts: attribute and entry cache timeouts.
        plaintext_size: the size of the open content, when the file is open.
    """
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = inode
    attrs.generation = generation
    attrs.entry_timeout = timeouts.entry
    attrs.attr_timeout = timeouts.attr
    attrs.st_mode = st.st_mode
    attrs.st_nlink = st.st_nlink
    attrs.st_uid = st.st_uid
    attrs.st_gid = st.st_gid
    attrs.st_rdev = 0
    attrs.st_atime_ns = st.st_atime_ns
    attrs.st_mtime_ns = st.st_mtime_ns
    attrs.st_ctime_ns = st.st_ctime_ns
    attrs.st_blksize = geometry.chunk_size

    if stat.S_ISREG(st.st_mode):
        size = (
            geometry.plaintext_size_lenient(st.st_size)
            if plaintext_size is None
            else plaintext_size
        )
        attrs.st_size = size
        attrs.st_blocks = _scaled_blocks(st.st_blocks, size, st.st_size)
    elif stat.S_ISLNK(st.st_mode):
        attrs.st_size = symlink_target_length(st.st_size)
        attrs.st_blocks = st.st_blocks
    else:
        attrs.st_size = st.st_size
        attrs.st_blocks = st.st_blocks
    return attrs


def _scaled_blocks(backing_blocks: int, size: int, backing_size: int) -> int:
    if size <= 0 or backing_size <= 0:
        return 0
    return -(-backing_blocks * size // backing_size)


def negative_entry(timeouts: Timeouts) -> pyfuse3.EntryAttributes:
    """Return a lookup reply that says *no such entry* and lets the kernel cache that."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = 0
    attrs.entry_timeout = timeouts.entry
    return attrs


def statfs_of(store_fd: int) -> pyfuse3.StatvfsData:
    """Return the backing filesystem's statistics, with the plaintext name limit."""
    backing = os.fstatvfs(store_fd)
    data = pyfuse3.StatvfsData()
    data.f_bsize = backing.f_bsize
    data.f_frsize = backing.f_frsize
    data.f_blocks = backing.f_blocks
    data.f_bfree = backing.f_bfree
    data.f_bavail = backing.f_bavail
    data.f_files = backing.f_files
    data.f_ffree = backing.f_ffree
    data.f_favail = backing.f_favail
    data.f_namemax = MAX_PLAINTEXT_NAME
    return data
