"""Open files and directories.

There is at most one :class:`~dermfs.content.ContentFile` per backing inode (the content
layer caches the size and the final chunk), shared by every handle open on that inode and
by internal users such as a path-based truncate. Each user holds a reference on the
:class:`OpenFile`; the last reference dropped marks the file clean in the intent log
(:meth:`~dermfs.content.ContentFile.checkpoint`) and closes the backing file descriptor.

The backing descriptor is opened read-write whenever the backing filesystem lets us (the
kernel's writeback cache may read through a handle opened write-only, and a later handle
may write), else read-only; permission checks are the kernel's (``default_permissions``).
An unlinked file stays readable and writable through its descriptor until the last
reference is gone.

Concurrency: the tables are changed only in the trio thread. A reference is taken before
any ``await`` that uses the content and dropped after it, so a worker thread never sees a
closed descriptor.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from dermfs.audit import HandleLog
from dermfs.content import ContentFile
from dermfs.errors import IntegrityError
from dermfs.fuse.inodes import InodeTable

log = logging.getLogger(__name__)


@dataclass
class OpenFile:
    """The shared content of one open inode.

    Attributes:
        inode: the FUSE inode.
        fd: the backing file descriptor.
        content: the plaintext view of the backing file.
        writable: whether *fd* was opened for writing.
        refs: handles and internal users holding the file open.
    """

    inode: int
    fd: int
    content: ContentFile
    writable: bool
    refs: int = 0


@dataclass
class FileHandle:
    """One ``open``/``create`` of a file, as the kernel sees it.

    Attributes:
        audit: the handle's audit log (its reads and writes), if the mount is audited.
    """

    fh: int
    open_file: OpenFile
    flags: int
    audit: HandleLog | None = None


@dataclass
class DirHandle:
    """One ``opendir``: the listing taken at the first ``readdir`` from offset 0.

    Attributes:
        fh: the handle number.
        inode: the directory's inode.
        entries: ``(plaintext name, backing entry)`` in listing order, or ``None`` before
            the first ``readdir``.
    """

    fh: int
    inode: int
    entries: list[tuple[bytes, str]] | None = None


@dataclass
class HandleTable:
    """File and directory handles, and the open files they share."""

    inodes: InodeTable
    _open: dict[int, OpenFile] = field(default_factory=dict)
    _files: dict[int, FileHandle] = field(default_factory=dict)
    _dirs: dict[int, DirHandle] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # -------------------------------------------------------------------------- open files

    def open_file_of(self, inode: int) -> OpenFile | None:
        """Return the open file of *inode*, if it is open."""
        return self._open.get(inode)

    def acquire(self, inode: int, opener: Callable[[], tuple[int, ContentFile, bool]]) -> OpenFile:
        """Return the open file of *inode* with one more reference, opening it if needed.

        Args:
            inode: the FUSE inode.
            opener: called when the inode is not open yet; returns the backing descriptor,
                its content and whether it is writable. It may raise.
        """
        open_file = self._open.get(inode)
        if open_file is None:
            fd, content, writable = opener()
            open_file = OpenFile(inode, fd, content, writable)
            self._open[inode] = open_file
            self.inodes.pin(inode)
        open_file.refs += 1
        return open_file

    def adopt(self, inode: int, fd: int, content: ContentFile) -> OpenFile:
        """Register a file just created (and so open read-write) with one reference."""
        return self.acquire(inode, lambda: (fd, content, True))

    def drop(self, open_file: OpenFile) -> None:
        """Drop one reference; the last one marks the file clean and closes it."""
        open_file.refs -= 1
        if open_file.refs > 0:
            return
        if self._open.get(open_file.inode) is open_file:
            del self._open[open_file.inode]
        try:
            open_file.content.checkpoint()
        except OSError as exc:
            log.error("inode %d: could not mark the file clean: %s", open_file.inode, exc)
        finally:
            os.close(open_file.fd)
            self.inodes.unpin(open_file.inode)

    # -------------------------------------------------------------------------- handles

    def new_file_handle(self, open_file: OpenFile, flags: int) -> FileHandle:
        """Give an open file (whose reference the caller passes on) a handle number."""
        handle = FileHandle(next(self._numbers), open_file, flags)
        self._files[handle.fh] = handle
        return handle

    def file(self, fh: int) -> FileHandle:
        """Return the file handle *fh*.

        Raises:
            OSError: EBADF, no such handle.
        """
        handle = self._files.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, f"no file handle {fh}")
        return handle

    def release_file(self, fh: int) -> None:
        """Forget the handle *fh*, record its audit log's last range, drop its reference."""
        handle = self._files.pop(fh, None)
        if handle is not None:
            if handle.audit is not None:
                handle.audit.release()
            self.drop(handle.open_file)

    def audited_handles(self) -> list[FileHandle]:
        """Return the file handles that have an audit log."""
        return [handle for handle in self._files.values() if handle.audit is not None]

    def new_dir_handle(self, inode: int) -> DirHandle:
        """Open a directory handle on *inode*."""
        self.inodes.pin(inode)
        handle = DirHandle(next(self._numbers), inode)
        self._dirs[handle.fh] = handle
        return handle

    def directory(self, fh: int) -> DirHandle:
        """Return the directory handle *fh*.

        Raises:
            OSError: EBADF, no such handle.
        """
        handle = self._dirs.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, f"no directory handle {fh}")
        return handle

    def release_dir(self, fh: int) -> None:
        """Forget the directory handle *fh*."""
        handle = self._dirs.pop(fh, None)
        if handle is not None:
            self.inodes.unpin(handle.inode)

    def close_all(self) -> int:
        """Release every handle left at unmount; return how many files were still open."""
        left = len(self._files)
        for fh in list(self._files):
            self.release_file(fh)
        for fh in list(self._dirs):
            self.release_dir(fh)
        for open_file in list(self._open.values()):
            open_file.refs = 1
            self.drop(open_file)
        return left


def open_backing(root_fd: int, path: str) -> tuple[int, bool]:
    """Open a backing file read-write if allowed, else read-only; return fd and writability."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, os.O_RDWR | flags, dir_fd=root_fd), True
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return os.open(path, os.O_RDONLY | flags, dir_fd=root_fd), False


def with_inode(inode: int, exc: IntegrityError) -> IntegrityError:
    """Return *exc* with the inode named in front, unless the message names it already."""
    message = str(exc)
    if message.startswith("inode "):
        return exc
    return IntegrityError(f"inode {inode}: {message}")
