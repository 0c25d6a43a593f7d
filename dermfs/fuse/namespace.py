"""Handlers that change the namespace: create, mknod, mkdir, symlink, link, unlink,
rmdir and rename.

Each one runs inline, with no ``await`` between looking at the backing directory and
changing it and the inode table (invariant 2 of :mod:`dermfs.fuse.operations`). Long names
follow ``docs/format.md`` section 6.2: the sidecar is written before the entry is made
and removed after the entry is gone. A renamed entry gets its name encrypted under the
new parent's directory id; a renamed directory keeps its ``dermfs.dirid``, so nothing
below it changes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

import pyfuse3

from dermfs import format, tree
from dermfs.audit import Event
from dermfs.cryptocore import random_id
from dermfs.fuse import backing
from dermfs.fuse.boundary import boundary
from dermfs.fuse.state import VolumeState
from dermfs.names import BackingName

log = logging.getLogger(__name__)


class NamespaceHandlers(VolumeState):
    """The namespace-changing request handlers."""

    def _new_entry(self, dir_fd: int, dir_id: bytes, name: bytes) -> BackingName:
        """Return the backing name of a new entry, its sidecar written; EEXIST if taken."""
        backing_name = self._backing_name(dir_id, name)
        if backing.lstat_at(dir_fd, backing_name.entry) is not None:
            raise FileExistsError(errno.EEXIST, "entry exists")
        tree.write_sidecar(dir_fd, backing_name)
        return backing_name

    def _undo_entry(self, dir_fd: int, backing_name: BackingName) -> None:
        if backing.lstat_at(dir_fd, backing_name.entry) is None:
            tree.remove_sidecar(dir_fd, backing_name)

    @boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Create a regular file; special files are refused with EPERM."""
        log.debug("mknod(parent %d, mode %o)", parent_inode, mode)
        if not stat.S_ISREG(mode):
            raise PermissionError(errno.EPERM, "dermfs stores no special files")
        info, attrs = await self._create(parent_inode, name, mode, os.O_RDWR, ctx)
        self.handles.release_file(info.fh)
        return attrs

    @boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Create a regular file and open it."""
        log.debug("create(parent %d, mode %o, flags %#x)", parent_inode, mode, flags)
        return await self._create(parent_inode, name, mode, flags, ctx)

    async def _create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child_plaintext_path(parent_inode, name)
        self.audit.admit(Event.CREATE, ctx, path)
        try:
            return self._create_entry(parent_inode, name, mode, flags, ctx, path)
        except Exception as exc:
            self.audit.failed(Event.CREATE, ctx, path, exc)
            raise

    def _create_entry(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
        path: bytes | None,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        with self._directory(parent_inode) as (dir_fd, dir_id):
            backing_name = self._new_entry(dir_fd, dir_id, name)
            # The file is made whole (header and empty final chunk) under a temporary
            # name and only then renamed into place, so that a kill of the daemon never
            # leaves an entry without a header (format section 5 does the same for
            # directories).
            temporary = f"{format.TMP_PREFIX}{random_id().hex()}"
            try:
                fd = os.open(
                    temporary,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                    stat.S_IMODE(mode),
                    dir_fd=dir_fd,
                )
            except BaseException:
                self._undo_entry(dir_fd, backing_name)
                raise
            try:
                st = os.fstat(fd)
                hint = self.inodes.child_path(parent_inode, backing_name.entry)
                content = self.volume.create_file(fd, st.st_ino, path_hint=hint)
                self._chown_new(dir_fd, temporary, ctx)
                backing.rename(
                    dir_fd, temporary, dir_fd, backing_name.entry, backing.RENAME_NOREPLACE
                )
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary, dir_fd=dir_fd)
                self._undo_entry(dir_fd, backing_name)
                raise

        attrs = self._remember(parent_inode, name, backing_name.entry, st)
        open_file = self.handles.adopt(attrs.st_ino, fd, content)
        handle = self.handles.new_file_handle(open_file, flags)
        handle.audit = self.audit.open_handle(ctx, path, Event.CREATE)
        info = pyfuse3.FileInfo(fh=handle.fh, keep_cache=self.cache.keep_cache)
        return info, attrs

    @boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Create a directory with a fresh directory id."""
        log.debug("mkdir(parent %d, mode %o)", parent_inode, mode)
        with self.audit.outcome(Event.MKDIR, ctx, self._child_plaintext_path(parent_inode, name)):
            return self._mkdir(parent_inode, name, mode, ctx)

    def _mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with self._directory(parent_inode) as (dir_fd, dir_id):
            backing_name = self._new_entry(dir_fd, dir_id, name)
            permissions = stat.S_IMODE(mode)
            if os.fstat(dir_fd).st_mode & stat.S_ISGID:
                permissions |= stat.S_ISGID
            try:
                new_id = self.volume.make_directory(dir_fd, backing_name.entry, permissions)
            except BaseException:
                self._undo_entry(dir_fd, backing_name)
                raise
            self._chown_new(dir_fd, backing_name.entry, ctx)
            st = os.stat(backing_name.entry, dir_fd=dir_fd, follow_symlinks=False)

        attrs = self._remember(parent_inode, name, backing_name.entry, st)
        node = self.inodes.get(attrs.st_ino)
        node.dir_id = node.object_id = new_id
        return attrs

    @boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Create a symlink with an encrypted target."""
        log.debug("symlink(parent %d)", parent_inode)
        backing_target = self.volume.symlinks.encrypt(target)
        with self._directory(parent_inode) as (dir_fd, dir_id):
            backing_name = self._new_entry(dir_fd, dir_id, name)
            try:
                os.symlink(backing_target, backing_name.entry, dir_fd=dir_fd)
            except BaseException:
                self._undo_entry(dir_fd, backing_name)
                raise
            self._chown_new(dir_fd, backing_name.entry, ctx)
            st = os.stat(backing_name.entry, dir_fd=dir_fd, follow_symlinks=False)
        return self._remember(parent_inode, name, backing_name.entry, st)

    @boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Make a hard link to *inode*."""
        log.debug("link(%d, parent %d)", inode, new_parent_inode)
        source = self.inodes.backing_path(inode)
        with self._directory(new_parent_inode) as (dir_fd, dir_id):
            backing_name = self._new_entry(dir_fd, dir_id, new_name)
            try:
                os.link(
                    source,
                    backing_name.entry,
                    src_dir_fd=self._root_fd,
                    dst_dir_fd=dir_fd,
                    follow_symlinks=False,
                )
            except BaseException:
                self._undo_entry(dir_fd, backing_name)
                raise
            st = os.stat(backing_name.entry, dir_fd=dir_fd, follow_symlinks=False)
        return self._remember(new_parent_inode, new_name, backing_name.entry, st)

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Remove a file or symlink (and a long name's sidecar)."""
        log.debug("unlink(parent %d)", parent_inode)
        with self.audit.outcome(Event.UNLINK, ctx, self._child_plaintext_path(parent_inode, name)):
            self._unlink(parent_inode, name)

    def _unlink(self, parent_inode: int, name: bytes) -> None:
        with self._directory(parent_inode) as (dir_fd, dir_id):
            backing_name = self._backing_name(dir_id, name)
            st = backing.lstat_at(dir_fd, backing_name.entry)
            if st is None:
                raise FileNotFoundError(errno.ENOENT, "no such entry")
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            os.unlink(backing_name.entry, dir_fd=dir_fd)
            tree.remove_sidecar(dir_fd, backing_name)
        self.inodes.remove_link(parent_inode, name)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Remove an empty directory, its id file and any dermfs debris in it."""
        log.debug("rmdir(parent %d)", parent_inode)
        with self.audit.outcome(Event.RMDIR, ctx, self._child_plaintext_path(parent_inode, name)):
            self._rmdir(parent_inode, name)

    def _rmdir(self, parent_inode: int, name: bytes) -> None:
        with self._directory(parent_inode) as (dir_fd, dir_id):
            backing_name = self._backing_name(dir_id, name)
            if backing.lstat_at(dir_fd, backing_name.entry) is None:
                raise FileNotFoundError(errno.ENOENT, "no such entry")
            backing.remove_directory(dir_fd, backing_name.entry)
            tree.remove_sidecar(dir_fd, backing_name)
        self.inodes.remove_link(parent_inode, name)

    @boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        """Rename, also over an existing file or empty directory, with NOREPLACE or EXCHANGE."""
        log.debug("rename(parent %d -> %d, flags %#x)", parent_inode_old, parent_inode_new, flags)
        old_path = self._child_plaintext_path(parent_inode_old, name_old)
        new_path = self._child_plaintext_path(parent_inode_new, name_new)
        with self.audit.outcome(Event.RENAME, ctx, old_path, new_path):
            self._rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        self._moved_handles()

    def _rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
    ) -> None:
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unknown rename flags")
        with (
            self._directory(parent_inode_old) as (old_fd, old_id),
            self._directory(parent_inode_new) as (new_fd, new_id),
        ):
            old = self._backing_name(old_id, name_old)
            new = self._backing_name(new_id, name_new)
            old_st = backing.lstat_at(old_fd, old.entry)
            if old_st is None:
                raise FileNotFoundError(errno.ENOENT, "no such entry")
            new_st = backing.lstat_at(new_fd, new.entry)

            if flags & pyfuse3.RENAME_EXCHANGE:
                if new_st is None:
                    raise FileNotFoundError(errno.ENOENT, "no such entry")
                backing.rename(old_fd, old.entry, new_fd, new.entry, backing.RENAME_EXCHANGE)
                self.inodes.exchange_links(parent_inode_old, name_old, parent_inode_new, name_new)
                return
            if new_st is not None and flags & pyfuse3.RENAME_NOREPLACE:
                raise FileExistsError(errno.EEXIST, "target exists")
            if new_st is not None and (new_st.st_ino, new_st.st_dev) == (
                old_st.st_ino,
                old_st.st_dev,
            ):
                return  # two links to one file: POSIX says do nothing
            self._replace(old_fd, old, old_st, new_fd, new, new_st)
        self.inodes.move_link(parent_inode_old, name_old, parent_inode_new, name_new, new.entry)

    def _replace(
        self,
        old_fd: int,
        old: BackingName,
        old_st: os.stat_result,
        new_fd: int,
        new: BackingName,
        new_st: os.stat_result | None,
    ) -> None:
        """Move *old* to *new*, replacing a file or empty directory there."""
        aside = None
        if new_st is not None and stat.S_ISDIR(new_st.st_mode):
            if not stat.S_ISDIR(old_st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "target is a directory")
            backing.check_empty(new_fd, new.entry)
            aside = backing.move_aside(new_fd, new.entry)
        elif new_st is not None and stat.S_ISDIR(old_st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "target is not a directory")

        tree.write_sidecar(new_fd, new)
        try:
            backing.rename(old_fd, old.entry, new_fd, new.entry)
        except BaseException:
            if aside is not None:
                os.rename(aside, new.entry, src_dir_fd=new_fd, dst_dir_fd=new_fd)
            elif new_st is None:
                tree.remove_sidecar(new_fd, new)
            raise
        if aside is not None:
            backing.remove_debris(new_fd, aside)
        tree.remove_sidecar(old_fd, old)
