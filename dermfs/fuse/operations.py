"""The request handlers: :class:`DermfsOperations`, a :class:`pyfuse3.Operations`.

Error boundary
    Every handler runs inside :func:`_boundary`, the one place in dermfs that turns
    exceptions into :class:`pyfuse3.FUSEError`: an ``OSError`` keeps its errno, an
    :class:`~dermfs.errors.IntegrityError` becomes EIO with a WARNING naming the inode
    and chunk, a name or target too long once encrypted ENAMETOOLONG, anything else EIO
    with an ERROR. Lower layers and the helpers in this package raise ``OSError`` or dermfs
    exceptions, never ``FUSEError``. Logs carry inode and handle numbers, never plaintext
    names.

Threads
    Reads, writes, truncates, fsync and directory listings run in worker threads
    (:func:`trio.to_thread.run_sync` behind one :class:`trio.CapacityLimiter`); everything
    else (lookups, attributes, namespace changes, xattrs, opening a file, which reads and
    unwraps an 88-byte header) runs inline in the trio thread.

Concurrency invariants
    Under trio, another request can run only at an ``await``. So:

    1. The inode table and the handle table are read and changed only in the trio thread.
    2. A namespace change (create, mkdir, symlink, link, unlink, rmdir, rename) has no
       ``await`` between checking the backing directory and changing it and the inode
       table: to every other request it is atomic. The daemon holds the store lock, so
       no other process changes the store either.
    3. A handler that awaits a worker thread holds a reference on the
       :class:`~dermfs.fuse.handles.OpenFile` it uses, taken before the ``await`` and
       dropped after, so the descriptor stays open; the content object serialises the
       threads itself. After the ``await``, attributes are taken from the descriptor,
       not from a path found before it.
    4. A directory listing is a snapshot taken at ``readdir`` offset 0 (in a worker
       thread, so no table state is used across that ``await`` but the handle's own).
       Entries removed since are skipped when their ``lstat`` fails; entries added are
       not shown until the next rewind. Offsets index the snapshot, so a resumed
       ``readdir`` never skips or repeats an entry.

Caveats
    - When the only link of an inode we know is unlinked while hard links we were never
      asked about remain, the inode has no path: a ``getattr`` on it fails with ENOENT
      (nothing in the kernel can still name it, so this is seen only through an inode
      number the kernel kept), and the next lookup of another link starts the node
      afresh with a new generation.
    - RENAME_EXCHANGE needs ``renameat2`` support in the backing filesystem (ext4, xfs,
      btrfs, tmpfs); elsewhere it fails with EINVAL.
    - Special files (devices, FIFOs, sockets) are refused with EPERM: the format stores
      only files, directories and symlinks.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from typing import cast

import pyfuse3

from dermfs import tree
from dermfs.audit import Event
from dermfs.errors import IntegrityError
from dermfs.fuse import attributes, backing, xattrs
from dermfs.fuse.audit import errno_of
from dermfs.fuse.boundary import boundary
from dermfs.fuse.handles import with_inode
from dermfs.fuse.inodes import Node
from dermfs.fuse.namespace import NamespaceHandlers

log = logging.getLogger(__name__)

#: Next-id values of ``.`` and ``..`` in a listing; real entries follow.
_FIRST_ENTRY_ID = 3


class DermfsOperations(NamespaceHandlers):
    """The FUSE request handlers of one mounted volume; see the module docstring."""

    def init(self) -> None:
        """Called by pyfuse3 before the first request; nothing to do."""
        log.debug("init")

    @boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Look up *name* in *parent_inode*."""
        log.debug("lookup(parent %d)", parent_inode)
        if name in (b".", b".."):
            inode = parent_inode if name == b"." else self.inodes.parent_of(parent_inode)
            node = self.inodes.get(inode)
            attrs = self._attributes(node, self._stat(node))
            node.lookups += 1
            return attrs

        node = self.inodes.get(parent_inode)
        entry = self._backing_name(self._dir_id(node), name).entry
        path = self.inodes.child_path(parent_inode, entry)
        st = backing.lstat_at(self._root_fd, path)
        if st is None:
            return attributes.negative_entry(self._timeouts)
        return self._remember(parent_inode, name, entry, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Drop kernel lookups; never raises."""
        try:
            for inode, count in inode_list:
                self.inodes.forget(inode, count)
        except Exception:
            log.exception("forget: internal error")

    @boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Return the attributes of *inode*."""
        log.debug("getattr(%d)", inode)
        node = self.inodes.get(inode)
        return self._attributes(node, self._stat(node))

    @boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Change mode, owner, size or times of *inode*."""
        log.debug(
            "setattr(%d, fh %s, mode %s, owner %s, size %s, times %s)",
            inode,
            fh,
            fields.update_mode,
            fields.update_uid or fields.update_gid,
            fields.update_size,
            fields.update_atime or fields.update_mtime,
        )
        node = self.inodes.pin(inode)
        path = self.plaintext_path(inode)
        try:
            with self.audit.outcome(Event.SETATTR, ctx, path):
                return await self._setattr(node, attr, fields)
        finally:
            self.inodes.unpin(inode)

    async def _setattr(
        self, node: Node, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> pyfuse3.EntryAttributes:
        inode = node.inode
        if fields.update_size:
            resized = self._open_content(inode)
            try:
                await self._in_thread(resized.content.truncate, attr.st_size)
            finally:
                self.handles.drop(resized)

        open_file = self.handles.open_file_of(inode)
        if open_file is not None:
            self._apply_attributes(node, open_file.fd, attr, fields)
        else:
            self._apply_attributes(node, self.inodes.backing_path(inode), attr, fields)
        return self._attributes(node, self._stat(node))

    def _apply_attributes(
        self,
        node: Node,
        target: str | int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
    ) -> None:
        by_path = isinstance(target, str)
        dir_fd = self._root_fd if by_path else None
        if fields.update_mode and node.kind != stat.S_IFLNK:
            os.chmod(target, stat.S_IMODE(attr.st_mode), dir_fd=dir_fd)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid, dir_fd=dir_fd, follow_symlinks=not by_path)
        if fields.update_atime or fields.update_mtime:
            current = os.stat(target, dir_fd=dir_fd, follow_symlinks=not by_path)
            atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
            os.utime(target, ns=(atime, mtime), dir_fd=dir_fd, follow_symlinks=not by_path)

    @boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        """Return the plaintext target of the symlink *inode*."""
        log.debug("readlink(%d)", inode)
        path = self.inodes.backing_path(inode)
        try:
            return self.volume.symlinks.decrypt(os.readlink(path, dir_fd=self._root_fd))
        except IntegrityError as exc:
            raise with_inode(inode, exc) from None

    @boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Return the backing filesystem's statistics."""
        log.debug("statfs")
        return attributes.statfs_of(self._root_fd)

    # -------------------------------------------------------------------------- files

    @boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open a file; every handle of an inode shares its content."""
        log.debug("open(%d, flags %#x)", inode, flags)
        path = self.plaintext_path(inode)
        self.audit.admit(Event.OPEN, ctx, path)
        try:
            open_file = self._open_content(inode)
        except Exception as exc:
            self._open_failed(ctx, path, exc)
            raise
        try:
            if flags & os.O_TRUNC:
                # libfuse asks for atomic O_TRUNC: the kernel sends no setattr for it.
                await self._in_thread(open_file.content.truncate, 0)
        except BaseException as exc:
            self.handles.drop(open_file)
            if isinstance(exc, Exception):
                self._open_failed(ctx, path, exc)
            raise
        handle = self.handles.new_file_handle(open_file, flags)
        handle.audit = self.audit.open_handle(ctx, path, Event.OPEN)
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=self.cache.keep_cache)

    def _open_failed(self, ctx: pyfuse3.RequestContext, path: bytes | None, exc: Exception) -> None:
        self.audit.failed(Event.OPEN, ctx, path, exc)
        if isinstance(exc, IntegrityError):
            self.audit.integrity(ctx, path)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Read plaintext from an open file."""
        log.debug("read(fh %d, %d bytes at %d)", fh, size, off)
        handle = self.handles.file(fh)
        handle_log = handle.audit
        open_file = handle.open_file
        if handle_log is not None:
            self.audit.admit(Event.READ, handle_log.who, handle_log.path, handle_log, off, size)
        open_file.refs += 1
        try:
            # pyfuse3 replies from any contiguous buffer; its stub says bytes.
            data = cast(bytes, await self._in_thread(open_file.content.read, off, size))
        except Exception as exc:
            if handle_log is not None:
                handle_log.read(off, size, result=errno_of(exc))
                if isinstance(exc, IntegrityError):
                    self.audit.integrity(handle_log.who, handle_log.path)
            raise
        finally:
            self.handles.drop(open_file)
        if handle_log is not None:
            handle_log.read(off, len(data))
        return data

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Write plaintext to an open file."""
        log.debug("write(fh %d, %d bytes at %d)", fh, len(buf), off)
        open_file = self.handles.file(fh).open_file
        if not open_file.writable:
            raise PermissionError(errno.EACCES, "the backing file is read-only")
        handle_log = self.handles.file(fh).audit
        open_file.refs += 1
        try:
            written = await self._in_thread(open_file.content.write, off, buf)
        except Exception as exc:
            if handle_log is not None:
                handle_log.write(off, len(buf), result=errno_of(exc))
            raise
        finally:
            self.handles.drop(open_file)
        if handle_log is not None:
            handle_log.write(off, written)
        return written

    @boundary
    async def flush(self, fh: int) -> None:
        """Handle a close(2) of a descriptor; data is written already."""
        log.debug("flush(fh %d)", fh)
        self.handles.file(fh)

    @boundary
    async def release(self, fh: int) -> None:
        """Close a handle; the last one of an inode marks the file clean."""
        log.debug("release(fh %d)", fh)
        self.handles.release_file(fh)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Make an open file durable."""
        log.debug("fsync(fh %d, datasync %s)", fh, datasync)
        open_file = self.handles.file(fh).open_file
        open_file.refs += 1
        try:
            await self._in_thread(open_file.content.sync, datasync)
        finally:
            self.handles.drop(open_file)

    # -------------------------------------------------------------------------- directories

    @boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Open a directory for listing."""
        log.debug("opendir(%d)", inode)
        node = self.inodes.get(inode)
        if not node.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        return self.handles.new_dir_handle(inode).fh

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List a directory from *start_id*, a value this method gave as a next id."""
        log.debug("readdir(fh %d, from %d)", fh, start_id)
        handle = self.handles.directory(fh)
        if start_id == 0 or handle.entries is None:
            handle.entries = await self._list(handle.inode)

        inode = handle.inode
        if start_id < 2:
            for next_id, dot in ((1, b"."), (2, b"..")):
                if start_id >= next_id:
                    continue
                target = self.inodes.get(inode if dot == b"." else self.inodes.parent_of(inode))
                attrs = self._attributes(target, self._stat(target))
                if not pyfuse3.readdir_reply(token, dot, attrs, next_id):
                    return

        base = self.inodes.backing_path(inode)
        for index in range(max(0, start_id - _FIRST_ENTRY_ID + 1), len(handle.entries)):
            name, entry = handle.entries[index]
            path = entry if base == "." else f"{base}/{entry}"
            st = backing.lstat_at(self._root_fd, path)
            if st is None:
                continue
            attrs = self._remember(inode, name, entry, st)
            if not pyfuse3.readdir_reply(token, name, attrs, index + _FIRST_ENTRY_ID):
                self.inodes.forget(attrs.st_ino, 1)
                return

    async def _list(self, inode: int) -> list[tuple[bytes, str]]:
        node = self.inodes.get(inode)
        dir_id = self._dir_id(node)
        fd = backing.open_directory(self._root_fd, self.inodes.backing_path(inode))
        try:
            listed = await self._in_thread(
                lambda: list(tree.list_directory(self.volume, fd, dir_id))
            )
        finally:
            os.close(fd)
        entries = []
        for item in listed:
            if item.name is None:
                log.warning(
                    "directory inode %d: skipping backing entry %s: %s",
                    inode,
                    item.entry,
                    item.error,
                )
                continue
            entries.append((item.name, item.entry))
        return entries

    @boundary
    async def releasedir(self, fh: int) -> None:
        """Close a directory handle."""
        log.debug("releasedir(fh %d)", fh)
        self.handles.release_dir(fh)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Make a directory's entries durable."""
        log.debug("fsyncdir(fh %d)", fh)
        path = self.inodes.backing_path(self.handles.directory(fh).inode)
        fd = backing.open_directory(self._root_fd, path)
        try:
            await self._in_thread(os.fsync, fd)
        finally:
            os.close(fd)

    # -------------------------------------------------------------------------- xattrs

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """Return a ``user.`` xattr's plaintext value."""
        log.debug("getxattr(%d)", inode)
        if not self.volume.xattrs.is_stored(name):
            raise OSError(errno.ENODATA, "no such attribute")
        target, object_id = self._xattr_target(self.inodes.get(inode))
        try:
            return xattrs.get(self.volume.xattrs, target, object_id, name)
        except IntegrityError as exc:
            raise IntegrityError(f"inode {inode}: xattr value fails to verify: {exc}") from None

    @boundary
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        """Set a ``user.`` xattr; other namespaces answer ENOTSUP."""
        log.debug("setxattr(%d, %d bytes)", inode, len(value))
        if not self.volume.xattrs.is_stored(name):
            raise OSError(errno.ENOTSUP, "only user. attributes are stored")
        target, object_id = self._xattr_target(self.inodes.get(inode))
        xattrs.put(self.volume.xattrs, target, object_id, name, value)

    @boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        """List the ``user.`` xattrs."""
        log.debug("listxattr(%d)", inode)
        target, _object_id = self._xattr_target(self.inodes.get(inode))
        return xattrs.names(self.volume.xattrs, target, inode)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Remove a ``user.`` xattr."""
        log.debug("removexattr(%d)", inode)
        target, _object_id = self._xattr_target(self.inodes.get(inode))
        xattrs.remove(self.volume.xattrs, target, name)
