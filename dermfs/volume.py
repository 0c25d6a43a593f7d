"""An unlocked volume: the store directory, its keys, and the transforms built on them.

:func:`create_store` makes a new store (``dermfs init``). :meth:`Volume.open` reads the
volume file, has the key provider unwrap the volume key, checks it against the volume
file's MAC, and derives the subkeys. Everything that turns plaintext into store bytes and
back is then reached through the :class:`Volume`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from dermfs import content, format
from dermfs.content import ContentFile, FileKeys
from dermfs.cryptocore import (
    Aead,
    Mac,
    Purpose,
    SecretKey,
    Siv,
    derive_subkey,
    random_id,
    random_key,
)
from dermfs.errors import FormatError, IntegrityError, StoreError, WrongKeyError
from dermfs.intent import IntentLog, PendingFile, read_pending
from dermfs.keys.base import KeyProvider, WrappedKey
from dermfs.metadata import SymlinkTransform, XattrTransform
from dermfs.names import NameTransform

log = logging.getLogger(__name__)


def create_store(store: Path, provider: KeyProvider, chunk_size: int) -> None:
    """Make a new, empty store in the existing empty directory *store*.

    Args:
        store: the store directory; it must exist and be empty.
        provider: the key provider that wraps the new volume key.
        chunk_size: plaintext bytes per chunk.

    Raises:
        StoreError: *store* is missing, not a directory, or not empty.
        FormatError: *chunk_size* is not allowed.
        KeyProviderError: the provider could not wrap the key.
    """
    format.check_chunk_size(chunk_size)
    if not store.is_dir():
        raise StoreError(f"store directory {store} does not exist")
    if any(store.iterdir()):
        raise StoreError(f"store directory {store} is not empty")

    volume_id = random_id()
    volume_key = random_key()
    try:
        wrapped = provider.wrap(volume_key, volume_id)
        slot = _slot_from_wrapped(1, wrapped)
        unsigned = format.VolumeFile(volume_id, chunk_size, (slot,))
        mac = Mac(derive_subkey(volume_key, Purpose.VOLUME_FILE, volume_id))
        signed = format.VolumeFile(
            volume_id, chunk_size, (slot,), mac=mac.tag(unsigned.canonical())
        )
    finally:
        volume_key.wipe()

    _write_file_atomically(store, format.DIRID_FILE, format.pack_dirid(random_id()))
    _write_file_atomically(store, format.VOLUME_FILE, signed.to_bytes())
    log.info("created store %s", store)


#: Why a volume with two key slots is refused (``docs/format.md`` section 2.2).
REKEY_IN_PROGRESS = "a rekey was interrupted; run `dermfs rekey CONFIG` to finish it"


def _check_slots(volume_file: format.VolumeFile) -> None:
    """Refuse key slots other than one, or two of consecutive generations (a rekey)."""
    generations = sorted(slot.generation for slot in volume_file.keys)
    if len(generations) > 2 or (len(generations) == 2 and generations[1] != generations[0] + 1):
        raise FormatError("volume file: keys must hold one slot, or two of consecutive generations")


def _slot_from_wrapped(generation: int, wrapped: WrappedKey) -> format.KeySlot:
    return format.KeySlot(
        generation=generation,
        provider=wrapped.provider,
        key_name=wrapped.key_name,
        key_version=wrapped.key_version,
        wrapped=wrapped.blob,
        params=dict(wrapped.params),
    )


def _wrapped_from_slot(slot: format.KeySlot) -> WrappedKey:
    return WrappedKey(slot.provider, slot.key_name, slot.key_version, slot.wrapped, slot.params)


def _write_file_atomically(directory: Path, name: str, data: bytes) -> None:
    temporary = directory / f"{format.TMP_PREFIX}{random_id().hex()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, directory / name)
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_volume_file(store: Path) -> format.VolumeFile:
    """Read and parse a store's volume file; the MAC is not checked here.

    Raises:
        StoreError: *store* is missing or has no volume file.
        FormatError: the volume file is malformed or of an unknown version or feature.
    """
    if not store.is_dir():
        raise StoreError(f"store directory {store} does not exist")
    try:
        data = (store / format.VOLUME_FILE).read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{store} is not a dermfs store (no {format.VOLUME_FILE})") from None
    return format.parse_volume_file(data)


class Transforms(NamedTuple):
    """The transforms of one key generation (see :meth:`Volume.transforms`)."""

    names: NameTransform
    symlinks: SymlinkTransform
    xattrs: XattrTransform


@dataclass
class RecoveryReport:
    """What crash recovery did at open."""

    repaired: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    missing: int = 0


class Volume:
    """An open store with its keys; see the module docstring."""

    def __init__(self, store: Path, volume_file: format.VolumeFile, keys: dict[int, SecretKey]):
        """Use :meth:`open` instead; this takes already unwrapped and checked keys."""
        self.store = store
        self.volume_id = volume_file.volume_id
        self.geometry = format.ChunkGeometry(volume_file.chunk_size)
        self.intent: IntentLog | None = None
        self._lock_fd: int | None = None
        self._use_keys(volume_file, keys)

    def _use_keys(self, volume_file: format.VolumeFile, keys: dict[int, SecretKey]) -> None:
        """Make *keys* (one per slot of *volume_file*) the keys this volume works with."""
        self.volume_file = volume_file
        self.generation = volume_file.current_key.generation
        self._keys = keys
        current = keys[self.generation]
        self._header_ciphers = {
            generation: Aead(derive_subkey(key, Purpose.HEADER, self.volume_id))
            for generation, key in keys.items()
        }
        self.names, self.symlinks, self.xattrs = self.transforms(self.generation)
        self._intent_mac = Mac(derive_subkey(current, Purpose.INTENT_LOG, self.volume_id))

    def __repr__(self) -> str:
        return f"<Volume {self.store}>"

    # -------------------------------------------------------------------------- opening

    @classmethod
    def open(
        cls, store: Path, provider: KeyProvider, *, allow_rekey_in_progress: bool = False
    ) -> Volume:
        """Unlock the store at *store* with *provider*.

        Args:
            store: the store directory.
            provider: the key provider that unwraps the volume key.
            allow_rekey_in_progress: open a volume file with two key slots, which an
                interrupted ``dermfs rekey`` leaves (``docs/format.md`` section 2.2).
                Only ``rekey`` and ``fsck`` do; everything else refuses such a volume.

        Raises:
            StoreError: *store* is not a store, or a rekey was interrupted and
                *allow_rekey_in_progress* is false.
            FormatError: the volume file is malformed or of an unknown version or feature.
            WrongKeyError: the key does not unwrap, or does not match the volume file.
            KeyProviderError: the provider could not be used.
        """
        volume_file = read_volume_file(store)
        _check_slots(volume_file)
        if len(volume_file.keys) > 1 and not allow_rekey_in_progress:
            raise StoreError(REKEY_IN_PROGRESS)
        keys: dict[int, SecretKey] = {}
        for slot in volume_file.keys:
            if slot.provider != provider.name:
                raise StoreError(
                    f"store was made with key provider {slot.provider}, "
                    f"configuration names {provider.name}"
                )
            keys[slot.generation] = provider.unwrap(_wrapped_from_slot(slot), volume_file.volume_id)

        current = keys[volume_file.current_key.generation]
        mac = Mac(derive_subkey(current, Purpose.VOLUME_FILE, volume_file.volume_id))
        try:
            mac.verify(volume_file.canonical(), volume_file.mac)
        except IntegrityError:
            raise WrongKeyError(
                "the volume file does not authenticate under the unwrapped key: "
                "wrong key, or the volume file was changed"
            ) from None
        return cls(store, volume_file, keys)

    @property
    def generations(self) -> tuple[int, ...]:
        """The key generations this volume holds, oldest first (two during a rekey)."""
        return tuple(sorted(self._keys))

    def audit_key(self, generation: int | None = None) -> SecretKey:
        """Return the audit journal's subkey, of the current generation by default."""
        key = self._keys[self.generation if generation is None else generation]
        return derive_subkey(key, Purpose.AUDIT, self.volume_id)

    def transforms(self, generation: int) -> Transforms:
        """Return the name, symlink and xattr transforms of one key generation.

        :attr:`names`, :attr:`symlinks` and :attr:`xattrs` are those of the current
        generation; ``rekey`` also needs the previous one's.

        Raises:
            KeyError: the volume holds no key of *generation*.
        """
        key = self._keys[generation]
        return Transforms(
            NameTransform(Siv(derive_subkey(key, Purpose.NAMES, self.volume_id))),
            SymlinkTransform(
                Aead(derive_subkey(key, Purpose.SYMLINKS, self.volume_id)), self.volume_id
            ),
            XattrTransform(
                Siv(derive_subkey(key, Purpose.XATTR_NAMES, self.volume_id)),
                Aead(derive_subkey(key, Purpose.XATTR_VALUES, self.volume_id)),
                self.volume_id,
            ),
        )

    def write_volume_file(
        self,
        slots: Sequence[format.KeySlot],
        new_keys: Mapping[int, SecretKey] | None = None,
    ) -> None:
        """Replace the volume file by one holding *slots*, and work with their keys from now on.

        The new file is signed under the newest slot's key and written atomically. The key
        of every slot must be known: one this volume holds, or one in *new_keys* (a key
        ``rekey`` has just made). Keys of generations no slot names any more are wiped.
        If the current generation changes while the intent log is open, the log is
        started again under the new generation's MAC key.

        Args:
            slots: the key slots, one or two (``docs/format.md`` sections 2 and 2.2).
            new_keys: unwrapped keys of generations this volume does not hold yet, by
                generation; the volume takes them over.

        Raises:
            FormatError: the slots are not one, or two of consecutive generations.
            KeyError: a slot's key is not known.
            StoreError: the current generation would change while a file is dirty.
            OSError: the volume file could not be written.
        """
        keys = {**self._keys, **(new_keys or {})}
        chosen = {slot.generation: keys[slot.generation] for slot in slots}
        unsigned = format.VolumeFile(
            self.volume_id, self.volume_file.chunk_size, tuple(slots), self.volume_file.features
        )
        _check_slots(unsigned)
        newest = chosen[unsigned.current_key.generation]
        changes_generation = unsigned.current_key.generation != self.generation
        if changes_generation and self.intent is not None and self.intent.dirty_inodes:
            raise StoreError("cannot change the volume key while files are being written")

        mac = Mac(derive_subkey(newest, Purpose.VOLUME_FILE, self.volume_id))
        signed = format.VolumeFile(
            self.volume_id,
            unsigned.chunk_size,
            unsigned.keys,
            unsigned.features,
            mac=mac.tag(unsigned.canonical()),
        )
        _write_file_atomically(self.store, format.VOLUME_FILE, signed.to_bytes())
        log.info("wrote the volume file with key generation(s) %s", sorted(chosen))

        for generation, key in keys.items():
            if generation not in chosen:
                key.wipe()
        self._use_keys(signed, chosen)
        if changes_generation and self.intent is not None:
            intent, self.intent = self.intent, None
            intent.close()
            self.intent = IntentLog(self.store / format.INTENT_FILE, self._intent_mac)

    def wrap_keys(self, provider: KeyProvider) -> tuple[format.KeySlot, ...]:
        """Wrap each of this volume's keys anew with *provider*, for ``dermfs rewrap``.

        Each new wrap is unwrapped again and compared with the key before it is returned,
        so that a wrap the provider cannot undo never reaches the volume file. The volume
        file is not changed here; pass the slots to :meth:`write_volume_file`.

        Returns:
            One slot per slot of the volume file, of the same generation, in its order.

        Raises:
            KeyProviderError: the provider could not wrap or unwrap.
            WrongKeyError: the new wrap does not unwrap to the same key.
        """
        slots = []
        for slot in self.volume_file.keys:
            key = self._keys[slot.generation]
            wrapped = provider.wrap(key, self.volume_id)
            unwrapped = provider.unwrap(wrapped, self.volume_id)
            try:
                if unwrapped != key:
                    raise WrongKeyError(
                        f"{provider.describe()}: the new wrap does not unwrap to the volume key"
                    )
            finally:
                unwrapped.wipe()
            slots.append(_slot_from_wrapped(slot.generation, wrapped))
        return tuple(slots)

    def rewrap_file_header(self, data: bytes, generation: int) -> bytes:
        """Return the header *data* with its file key rewrapped under *generation*.

        The file id and the file key stay the same, so the file's chunks stay valid.

        Raises:
            IntegrityError: the header is malformed, of an unknown key generation, or
                does not authenticate.
            KeyError: the volume holds no key of *generation*.
        """
        cipher = self._header_ciphers[generation]
        try:
            header = format.parse_header(data)
        except FormatError as exc:
            raise IntegrityError(str(exc)) from None
        old_cipher = self._header_ciphers.get(header.generation)
        if old_cipher is None:
            raise IntegrityError("file header names an unknown key generation")
        file_key = unwrap_key_with(
            old_cipher, header.wrapped_key, header.aad_prefix() + self.volume_id
        )
        try:
            prefix = format.pack_header_prefix(generation, header.file_id)
            return prefix + wrap_key_with(cipher, file_key, prefix + self.volume_id)
        finally:
            file_key.wipe()

    def lock(self) -> None:
        """Take the store's lock, so that no second process writes it at the same time.

        Raises:
            StoreError: another process holds the lock.
        """
        fd = os.open(self.store / format.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreError(
                    f"store {self.store} is in use by another dermfs process"
                ) from None
            raise
        self._lock_fd = fd

    def start_writing(self) -> RecoveryReport:
        """Take the lock, repair what a crash left, and start a fresh intent log."""
        self.lock()
        report = self.recover()
        self.intent = IntentLog(self.store / format.INTENT_FILE, self._intent_mac)
        return report

    def close(self) -> None:
        """Close the intent log, release the lock, and wipe the keys (best effort)."""
        if self.intent is not None:
            self.intent.close()
            self.intent = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        for key in self._keys.values():
            key.wipe()

    # -------------------------------------------------------------------------- files

    def new_file_header(self) -> tuple[bytes, FileKeys]:
        """Make a header with a fresh file id and file key."""
        file_id = random_id()
        file_key = random_key()
        prefix = format.pack_header_prefix(self.generation, file_id)
        wrapped = wrap_key_with(
            self._header_ciphers[self.generation], file_key, prefix + self.volume_id
        )
        header = prefix + wrapped
        keys = FileKeys(self.volume_id, file_id, Aead(file_key), self.geometry)
        file_key.wipe()
        return header, keys

    def open_file_header(self, data: bytes) -> FileKeys:
        """Unwrap the file key of a header.

        Raises:
            IntegrityError: the header is malformed, of an unknown key generation, or does
                not authenticate.
        """
        try:
            header = format.parse_header(data)
        except FormatError as exc:
            raise IntegrityError(str(exc)) from None
        cipher = self._header_ciphers.get(header.generation)
        if cipher is None:
            raise IntegrityError("file header names an unknown key generation")
        file_key = unwrap_key_with(cipher, header.wrapped_key, header.aad_prefix() + self.volume_id)
        keys = FileKeys(self.volume_id, header.file_id, Aead(file_key), self.geometry)
        file_key.wipe()
        return keys

    def read_file_keys(self, fd: int) -> FileKeys:
        """Read and unwrap the header of an open backing file.

        Raises:
            IntegrityError: the header is missing, cut short or does not authenticate.
        """
        return self.open_file_header(os.pread(fd, format.HEADER_SIZE, 0))

    def create_file(self, fd: int, inode: int, path_hint: str = "") -> ContentFile:
        """Write a new empty file's header and first chunk into *fd*; return its content."""
        header, keys = self.new_file_header()
        content.write_new_file(fd, header, keys)
        return ContentFile(fd, inode, keys, self.intent, path_hint)

    def open_file(self, fd: int, inode: int, path_hint: str = "") -> ContentFile:
        """Return the content of an existing backing file open as *fd*.

        Raises:
            IntegrityError: its header does not authenticate.
        """
        return ContentFile(fd, inode, self.read_file_keys(fd), self.intent, path_hint)

    # -------------------------------------------------------------------------- directories

    def read_dir_id(self, dir_fd: int) -> bytes:
        """Return the id of the backing directory open as *dir_fd*.

        Raises:
            IntegrityError: the directory has no id file, or a malformed one.
        """
        try:
            # Non-blocking, so that a FIFO put in its place cannot hang the reader.
            fd = os.open(
                format.DIRID_FILE, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except FileNotFoundError:
            raise IntegrityError("directory has no id file") from None
        try:
            data = os.read(fd, format.DIRID_SIZE + 1)
        finally:
            os.close(fd)
        try:
            return format.parse_dirid(data)
        except FormatError as exc:
            raise IntegrityError(str(exc)) from None

    def make_directory(self, parent_fd: int, entry: str, mode: int) -> bytes:
        """Create the backing directory *entry* in *parent_fd*, id file first; return its id.

        Raises:
            FileExistsError: *entry* exists.
            OSError: the backing filesystem refused.
        """
        dir_id = random_id()
        temporary = f"{format.TMP_PREFIX}{random_id().hex()}"
        os.mkdir(temporary, mode | 0o700, dir_fd=parent_fd)
        try:
            fd = os.open(
                f"{temporary}/{format.DIRID_FILE}",
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o400,
                dir_fd=parent_fd,
            )
            try:
                os.write(fd, format.pack_dirid(dir_id))
                os.fsync(fd)
            finally:
                os.close(fd)
            if _exists_at(parent_fd, entry):
                raise FileExistsError(errno.EEXIST, "entry exists")
            os.rename(temporary, entry, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            _remove_tree_at(parent_fd, temporary)
            raise
        os.chmod(entry, mode, dir_fd=parent_fd)
        return dir_id

    # -------------------------------------------------------------------------- recovery

    def recover(self) -> RecoveryReport:
        """Repair every file the intent log left dirty; the log itself is left in place."""
        report = RecoveryReport()
        pending = read_pending(self.store / format.INTENT_FILE, self._intent_mac)
        if not pending:
            return report

        log.warning("the store was not unmounted cleanly; repairing %d file(s)", len(pending))
        by_inode = {entry.inode: entry for entry in pending}
        for path, entry in self._locate(by_inode):
            if self._repair_one(path, entry):
                report.repaired.append(str(path.relative_to(self.store)))
            else:
                report.damaged.append(str(path.relative_to(self.store)))
            del by_inode[entry.inode]
        report.missing = len(by_inode)
        return report

    def _locate(self, by_inode: dict[int, PendingFile]) -> Iterator[tuple[Path, PendingFile]]:
        """Find the backing files of pending inodes: recorded paths first, then a walk."""
        remaining = dict(by_inode)
        for entry in list(remaining.values()):
            path = self.store / entry.path
            if entry.path and _inode_of(path) == entry.inode:
                del remaining[entry.inode]
                yield path, entry
        if not remaining:
            return
        for directory, _dirs, files in os.walk(self.store):
            for name in files:
                path = Path(directory, name)
                inode = _inode_of(path)
                if inode in remaining:
                    yield path, remaining.pop(inode)
            if not remaining:
                return

    def _repair_one(self, path: Path, entry: PendingFile) -> bool:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            keys = self.read_file_keys(fd)
            if keys.file_id != entry.file_id:
                return True
            return content.repair(fd, keys, entry)
        except IntegrityError:
            log.warning("inode %d: header is damaged; not repairing", entry.inode)
            return False
        finally:
            os.close(fd)


def wrap_key_with(cipher: Aead, key: SecretKey, aad: bytes) -> bytes:
    """Wrap *key* with an existing header cipher."""
    return cipher.seal(key.reveal(), aad)


def unwrap_key_with(cipher: Aead, wrapped: bytes, aad: bytes) -> SecretKey:
    """Unwrap a key wrapped by :func:`wrap_key_with`.

    Raises:
        IntegrityError: the wrapped key does not authenticate.
    """
    return SecretKey(cipher.open(wrapped, aad))


def _inode_of(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _remove_tree_at(parent_fd: int, name: str) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            for child in os.listdir(fd):
                os.unlink(child, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)
    except OSError:
        log.warning("could not remove a temporary directory after a failed mkdir")
