"""Directory entries: plaintext names over backing directories.

Two levels live here:

- functions over an open backing directory (a file descriptor and its directory id), which
  the FUSE frontend calls: find the backing name of an entry, write or remove the sidecar
  of a long name, list a directory;
- :class:`PlainTree`, a small path-level view of a whole volume (make directories, write
  and read files, list), which ``fsck``, the tests and tools use without a mount.

Nothing here raises for a bad entry while listing: a name that fails to decrypt is yielded
with its error so that the caller decides whether to skip it, log it or report it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from dermfs import format
from dermfs.cryptocore import random_id
from dermfs.errors import IntegrityError
from dermfs.names import BackingName
from dermfs.volume import Volume

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class ListedEntry:
    """One entry of a backing directory, decrypted or not.

    Attributes:
        entry: the backing name.
        name: the plaintext name, or ``None`` when it failed to decrypt.
        error: why it failed, or ``None``.
    """

    entry: str
    name: bytes | None
    error: IntegrityError | None


def write_sidecar(parent_fd: int, backing: BackingName, *, durable: bool = False) -> None:
    """Write the sidecar of a long name (atomically); nothing for a name that fits.

    With *durable*, the sidecar is fsynced before it is renamed into place.
    """
    if backing.sidecar is None:
        return
    temporary = f"{format.TMP_PREFIX}{random_id().hex()}"
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400, dir_fd=parent_fd
    )
    try:
        os.write(fd, backing.ciphertext)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, backing.sidecar, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)


def remove_sidecar(parent_fd: int, backing: BackingName) -> None:
    """Remove the sidecar of a long name whose entry is gone; nothing for a short name."""
    if backing.sidecar is None:
        return
    with suppress(FileNotFoundError):
        os.unlink(backing.sidecar, dir_fd=parent_fd)


def list_directory(volume: Volume, dir_fd: int, dir_id: bytes) -> Iterator[ListedEntry]:
    """Yield every entry of the backing directory *dir_fd* that stands for a plaintext one."""
    for entry in sorted(os.listdir(dir_fd)):
        if not volume.names.is_listed(entry):
            continue
        try:
            sidecar = volume.names.sidecar_of(entry)
            if sidecar is None:
                name = volume.names.decrypt(dir_id, entry)
            else:
                name = volume.names.decrypt_long(dir_id, entry, _read_sidecar(dir_fd, sidecar))
        except IntegrityError as exc:
            yield ListedEntry(entry, None, exc)
            continue
        yield ListedEntry(entry, name, None)


def _read_sidecar(dir_fd: int, sidecar: str) -> bytes:
    try:
        fd = os.open(sidecar, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise IntegrityError("long name has no sidecar") from None
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


class PlainTree:
    """A path-level view of a volume without a mount (for fsck, tools and tests).

    Paths are plaintext, relative to the volume's root, with ``/`` separators.
    Content writes need a volume whose intent log is started (:meth:`Volume.start_writing`).
    """

    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    @contextmanager
    def _directory(self, path: str) -> Iterator[tuple[int, bytes]]:
        """Open the backing directory of plaintext directory *path*; yield (fd, dir id)."""
        fd = os.open(self.volume.store, _DIR_FLAGS)
        try:
            for part in _parts(path):
                dir_id = self.volume.read_dir_id(fd)
                entry = self.volume.names.encrypt(dir_id, part).entry
                child = os.open(entry, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
            yield fd, self.volume.read_dir_id(fd)
        finally:
            os.close(fd)

    def backing_path(self, path: str) -> str:
        """Return the backing path of plaintext *path*, relative to the store."""
        parent, name = _split(path)
        with self._directory(parent) as (_fd, dir_id):
            entry = self.volume.names.encrypt(dir_id, name).entry
        if not parent:
            return entry
        return f"{self.backing_path(parent)}/{entry}"

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """Make the directory *path*."""
        parent, name = _split(path)
        with self._directory(parent) as (fd, dir_id):
            backing = self.volume.names.encrypt(dir_id, name)
            write_sidecar(fd, backing)
            self.volume.make_directory(fd, backing.entry, mode)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or replace the file *path* with *data*."""
        parent, name = _split(path)
        with self._directory(parent) as (dir_fd, dir_id):
            backing = self.volume.names.encrypt(dir_id, name)
            write_sidecar(dir_fd, backing)
            fd = os.open(
                backing.entry,
                os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                mode,
                dir_fd=dir_fd,
            )
            try:
                content = self.volume.create_file(fd, os.fstat(fd).st_ino)
                content.write(0, data)
                content.sync()
            finally:
                os.close(fd)

    def read_file(self, path: str) -> bytes:
        """Return the contents of the file *path*.

        Raises:
            IntegrityError: its name, header or a chunk does not authenticate.
        """
        parent, name = _split(path)
        with self._directory(parent) as (dir_fd, dir_id):
            entry = self.volume.names.encrypt(dir_id, name).entry
            fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                content = self.volume.open_file(fd, os.fstat(fd).st_ino)
                return bytes(content.read(0, content.size))
            finally:
                os.close(fd)

    def symlink(self, path: str, target: bytes) -> None:
        """Make *path* a symlink to *target*."""
        parent, name = _split(path)
        with self._directory(parent) as (fd, dir_id):
            backing = self.volume.names.encrypt(dir_id, name)
            write_sidecar(fd, backing)
            os.symlink(self.volume.symlinks.encrypt(target), backing.entry, dir_fd=fd)

    def readlink(self, path: str) -> bytes:
        """Return the target of the symlink *path*."""
        parent, name = _split(path)
        with self._directory(parent) as (fd, dir_id):
            entry = self.volume.names.encrypt(dir_id, name).entry
            return self.volume.symlinks.decrypt(os.readlink(entry, dir_fd=fd))

    def listdir(self, path: str = "") -> list[bytes]:
        """Return the plaintext names in directory *path*.

        Raises:
            IntegrityError: a name does not decrypt.
        """
        with self._directory(path) as (fd, dir_id):
            names = []
            for listed in list_directory(self.volume, fd, dir_id):
                if listed.error is not None:
                    raise listed.error
                assert listed.name is not None
                names.append(listed.name)
            return names

    def is_dir(self, path: str) -> bool:
        """Tell whether *path* is a directory."""
        parent, name = _split(path)
        with self._directory(parent) as (fd, dir_id):
            entry = self.volume.names.encrypt(dir_id, name).entry
            return stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode)


def _parts(path: str) -> list[bytes]:
    return [os.fsencode(part) for part in path.split("/") if part]


def _split(path: str) -> tuple[str, bytes]:
    parts = [part for part in path.split("/") if part]
    if not parts:
        raise ValueError("the root has no parent")
    return "/".join(parts[:-1]), os.fsencode(parts[-1])
