"""Operations on the backing store that take more than one system call.

Removing a directory (its ``dermfs.dirid`` and any dermfs debris must go first, but only
when it holds no real entry), renaming with ``renameat2`` flags, and moving an empty
directory out of the way of a rename. Everything here works on directory descriptors and
backing entry names; nothing knows a plaintext name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat

from dermfs import format
from dermfs.cryptocore import random_id
from dermfs.names import NameTransform

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    _renameat2.restype = ctypes.c_int


def open_directory(root_fd: int, path: str) -> int:
    """Open the backing directory at *path* (relative to the store) for ``*at`` calls."""
    return os.open(path, _DIR_FLAGS, dir_fd=root_fd)


def lstat_at(dir_fd: int, entry: str) -> os.stat_result | None:
    """Return the ``lstat`` of *entry*, or ``None`` if it does not exist."""
    try:
        return os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def rename(old_dir_fd: int, old: str, new_dir_fd: int, new: str, flags: int = 0) -> None:
    """Rename with ``renameat2`` *flags*.

    RENAME_NOREPLACE falls back to a check and a plain rename where the backing filesystem
    lacks the flag: the daemon is the store's only writer, and nothing else runs between
    the two steps. RENAME_EXCHANGE has no safe fallback and fails with EINVAL there.

    Raises:
        OSError: the rename failed (EEXIST for an existing target with NOREPLACE).
    """
    if flags == 0:
        os.rename(old, new, src_dir_fd=old_dir_fd, dst_dir_fd=new_dir_fd)
        return
    if _renameat2 is not None:
        result = _renameat2(old_dir_fd, os.fsencode(old), new_dir_fd, os.fsencode(new), flags)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code))
    if flags & RENAME_EXCHANGE:
        raise OSError(errno.EINVAL, "the backing filesystem cannot exchange entries")
    if lstat_at(new_dir_fd, new) is not None:
        raise FileExistsError(errno.EEXIST, "target exists")
    os.rename(old, new, src_dir_fd=old_dir_fd, dst_dir_fd=new_dir_fd)


def holds_entries(dir_fd: int) -> bool:
    """Tell whether a backing directory holds an entry that stands for a plaintext one."""
    return any(NameTransform.is_listed(entry) for entry in os.listdir(dir_fd))


def check_empty(parent_fd: int, entry: str) -> None:
    """Raise ENOTEMPTY unless the backing directory *entry* is empty in plaintext terms."""
    fd = os.open(entry, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        if holds_entries(fd):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
    finally:
        os.close(fd)


def move_aside(parent_fd: int, entry: str) -> str:
    """Rename *entry* to a fresh temporary name in the same directory; return that name.

    A crash leaves a ``dermfs.tmp.*`` entry that ``fsck`` removes; only empty directories
    are ever moved aside.
    """
    temporary = f"{format.TMP_PREFIX}{random_id().hex()}"
    os.rename(entry, temporary, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    return temporary


def remove_directory(parent_fd: int, entry: str) -> None:
    """Remove the backing directory *entry*, which must be empty in plaintext terms.

    The directory is first renamed to a temporary name, so that it leaves its parent in
    one step; then its id file and any dermfs debris (temporary files, stray sidecars, a
    temporary directory left by a crashed mkdir) are removed, and the directory itself.

    Raises:
        OSError: ENOTEMPTY when it holds a real entry; ENOTDIR; or the backing error.
    """
    st = os.stat(entry, dir_fd=parent_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory")
    check_empty(parent_fd, entry)
    temporary = move_aside(parent_fd, entry)
    remove_debris(parent_fd, temporary)


def remove_debris(parent_fd: int, entry: str) -> None:
    """Remove a directory holding only dermfs files (and such directories) beneath it."""
    fd = os.open(entry, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        for child in os.listdir(fd):
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and child.startswith(format.TMP_PREFIX):
                remove_debris(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(entry, dir_fd=parent_fd)
