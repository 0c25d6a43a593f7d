"""The state every request handler shares, and the helpers built on it.

:class:`VolumeState` holds the volume, a descriptor of the store's root directory (every
backing path is relative to it), the inode and handle tables, and the limiter of the
worker threads. The handlers themselves are in :mod:`dermfs.fuse.namespace` and
:mod:`dermfs.fuse.operations`; the concurrency rules they follow are written down in the
latter's docstring.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pyfuse3
import trio

from dermfs import format
from dermfs.audit.record import mount_path
from dermfs.content import ContentFile
from dermfs.errors import FormatError, IntegrityError
from dermfs.fuse import attributes, backing
from dermfs.fuse.attributes import CacheSettings, Timeouts
from dermfs.fuse.audit import Auditor
from dermfs.fuse.handles import HandleTable, OpenFile, open_backing, with_inode
from dermfs.fuse.inodes import InodeTable, Node
from dermfs.names import MAX_PLAINTEXT_NAME, BackingName
from dermfs.volume import Volume

log = logging.getLogger(__name__)

_R = TypeVar("_R")


class VolumeState(pyfuse3.Operations):
    """What the handlers of one mounted volume share; see the module docstring."""

    supports_dot_lookup = True

    def __init__(
        self,
        volume: Volume,
        cache: CacheSettings,
        threads: int = 0,
        audit: Auditor | None = None,
    ) -> None:
        """Serve *volume*, which must have been started for writing.

        Args:
            volume: the open volume, after :meth:`Volume.start_writing`.
            cache: kernel cache settings.
            threads: worker threads for content I/O; 0 picks from the CPU count.
            audit: the audit journal; none means nothing is recorded.
        """
        super().__init__()
        self.volume = volume
        self.audit = audit or Auditor(None)
        self.cache = cache
        self.enable_writeback_cache = cache.writeback_cache
        self._geometry = volume.geometry
        self._timeouts = Timeouts(cache.attr_timeout, cache.entry_timeout)
        self._store = os.path.abspath(volume.store)
        self._root_fd = os.open(self._store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.inodes = InodeTable(os.fstat(self._root_fd).st_ino)
        self.handles = HandleTable(self.inodes)
        self._limiter = trio.CapacityLimiter(threads or max(2, os.cpu_count() or 2))
        self._as_root = os.geteuid() == 0

    def close(self) -> int:
        """Release what is left open after the main loop ended; return the files left open."""
        left = self.handles.close_all()
        os.close(self._root_fd)
        return left

    def plaintext_path(self, inode: int) -> bytes | None:
        """Return the plaintext path of *inode* inside the mount (for the audit layer)."""
        return self.inodes.plaintext_path(inode)

    def _child_plaintext_path(self, parent: int, name: bytes) -> bytes | None:
        """Return the plaintext path of *name* in *parent* (for the audit layer)."""
        base = self.inodes.plaintext_path(parent)
        if base is None:
            return None
        return base.rstrip(b"/") + b"/" + name

    def _moved_handles(self) -> None:
        """After a rename, give each open handle's audit log its file's current path."""
        for handle in self.handles.audited_handles():
            handle_log = handle.audit
            path = self.inodes.plaintext_path(handle.open_file.inode)
            if handle_log is None or path is None:
                continue  # unlinked (replaced by the rename): keeps its last path
            if mount_path(path) != handle_log.path:
                handle_log.moved(mount_path(path))

    # -------------------------------------------------------------------------- helpers

    def _dir_id(self, node: Node) -> bytes:
        if node.dir_id is None:
            if not node.is_dir:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
            fd = backing.open_directory(self._root_fd, self.inodes.backing_path(node.inode))
            try:
                node.dir_id = self.volume.read_dir_id(fd)
            except IntegrityError as exc:
                raise with_inode(node.inode, exc) from None
            finally:
                os.close(fd)
            node.object_id = node.dir_id
        return node.dir_id

    def _backing_name(self, dir_id: bytes, name: bytes) -> BackingName:
        """Encrypt *name* for the directory *dir_id*; ENAMETOOLONG past NAME_MAX.

        FUSE passes names of up to 1024 bytes; dermfs keeps to the POSIX 255 that statfs
        reports, so that every name can be copied to an ordinary filesystem.
        """
        if len(name) > MAX_PLAINTEXT_NAME:
            raise OSError(errno.ENAMETOOLONG, "file name too long")
        return self.volume.names.encrypt(dir_id, name)

    @contextmanager
    def _directory(self, inode: int) -> Iterator[tuple[int, bytes]]:
        """Open the backing directory of *inode*; yield its descriptor and directory id."""
        node = self.inodes.get(inode)
        dir_id = self._dir_id(node)
        fd = backing.open_directory(self._root_fd, self.inodes.backing_path(inode))
        try:
            yield fd, dir_id
        finally:
            os.close(fd)

    def _attributes(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        open_file = self.handles.open_file_of(node.inode)
        size = open_file.content.size if open_file is not None else None
        return attributes.entry_attributes(
            node.inode, node.generation, st, self._geometry, self._timeouts, size
        )

    def _stat(self, node: Node) -> os.stat_result:
        open_file = self.handles.open_file_of(node.inode)
        if open_file is not None:
            return os.fstat(open_file.fd)
        path = self.inodes.backing_path(node.inode)
        return os.stat(path, dir_fd=self._root_fd, follow_symlinks=False)

    def _remember(
        self, parent: int, name: bytes, entry: str, st: os.stat_result
    ) -> pyfuse3.EntryAttributes:
        inode = self.inodes.fuse_inode(st.st_ino)
        node = self.inodes.remember(parent, name, entry, inode, stat.S_IFMT(st.st_mode))
        return self._attributes(node, st)

    def _chown_new(self, dir_fd: int, entry: str, ctx: pyfuse3.RequestContext) -> None:
        """Give a new entry the caller's owner, and group unless the parent is setgid."""
        if not self._as_root:
            return
        gid = -1 if os.fstat(dir_fd).st_mode & stat.S_ISGID else ctx.gid
        os.chown(entry, ctx.uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def _open_content(self, inode: int) -> OpenFile:
        """Return the inode's open file with one more reference, opening it if needed."""

        def opener() -> tuple[int, ContentFile, bool]:
            path = self.inodes.backing_path(inode)
            fd, writable = open_backing(self._root_fd, path)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, "not a regular file")
                content = self.volume.open_file(fd, st.st_ino, path_hint=path)
            except IntegrityError as exc:
                os.close(fd)
                raise with_inode(inode, exc) from None
            except BaseException:
                os.close(fd)
                raise
            return fd, content, writable

        return self.handles.acquire(inode, opener)

    async def _in_thread(self, function: Callable[..., _R], *args: Any) -> _R:
        return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)

    def _xattr_target(self, node: Node) -> tuple[str | int, bytes | None]:
        """Return where the inode's xattrs live and the id their values are bound to."""
        open_file = self.handles.open_file_of(node.inode)
        if open_file is not None:
            node.object_id = open_file.content.file_id
            return open_file.fd, node.object_id
        path = self.inodes.backing_path(node.inode)
        target = self._store if path == "." else f"{self._store}/{path}"
        if node.object_id is None:
            if node.is_dir:
                self._dir_id(node)
            elif node.kind == stat.S_IFREG:
                node.object_id = self._file_id(node.inode, path)
        return target, node.object_id

    def _file_id(self, inode: int, path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self._root_fd)
        try:
            data = os.pread(fd, format.HEADER_SIZE, 0)
        finally:
            os.close(fd)
        try:
            return format.parse_header(data).file_id
        except FormatError as exc:
            raise IntegrityError(f"inode {inode}: {exc}") from None
