"""``dermfs rekey``: a new volume key, every header rewrapped, no content chunk touched.

The contract is ``docs/rotation.md`` section 1. In short, with the store lock held and
crash recovery done:

1. a new volume key is made, wrapped by the same provider, and the volume file is written
   with two key slots (the old generation and the new one);
2. the tree is walked depth first: headers are rewrapped in place (88 bytes at offset 0),
   names, long-name sidecars, symlink targets and ``user.*`` xattrs are re-encrypted;
3. the audit journal's key is rewrapped and a ``rekey`` record appended;
4. the volume file is written with the new slot only;

and a final walk opens every header and decrypts every name, target and xattr under the
new key alone. Each item tells by itself whether it is done, so running the command again
finishes an interrupted rekey.

:func:`rekey_volume` does the work on an open :class:`~dermfs.volume.Volume`;
:func:`run_rekey` is the command. Plaintext names appear only in the printed report,
never in log records.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Never

from tqdm import tqdm

from dermfs import exitcodes, format, tree
from dermfs.audit import AuditJournal, Event, daemon_caller, rewrap_journal_key
from dermfs.audit.forward import SyslogForwarder
from dermfs.audit.keys import load_journal_key
from dermfs.audit.layout import JournalFiles
from dermfs.cryptocore import SecretKey, digest, random_id, random_key
from dermfs.errors import AuditUnavailable, FormatError, IntegrityError, StoreError
from dermfs.fsck import Location, count_entries
from dermfs.keys.base import KeyProvider
from dermfs.names import NameTransform
from dermfs.volume import RecoveryReport, Transforms, Volume

if TYPE_CHECKING:
    import argparse

    from dermfs.config import AuditConfig, Config

log = logging.getLogger(__name__)

#: Called with a count of entries done; ``0`` once when a walk starts.
Progress = Callable[[int], None]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LOST_FOUND = "lost+found"
_MAX_SIDECAR = 4096

JOURNAL_NONE = "no audit journal"
JOURNAL_REWRAPPED = "audit journal key rewrapped; rekey recorded"
JOURNAL_ALREADY = "audit journal key already under the new key; rekey recorded"
JOURNAL_CREATED = "audit journal started with the rekey record"
JOURNAL_UNWRITTEN = "audit journal cannot be written; rekey not recorded"


# ------------------------------------------------------------------------------ reports


@dataclass(frozen=True)
class Problem:
    """An item a walk could not handle.

    Attributes:
        location: where it is.
        what: ``name``, ``sidecar``, ``header``, ``symlink``, ``xattr``, ``dirid``, or for
            an item that could not be written, the system's reason.
    """

    location: Location
    what: str


@dataclass
class WalkReport:
    """What one walk of the store did or found.

    Attributes:
        files: non-directory entries visited.
        directories: directories visited, the root included.
        names: names re-encrypted (renamed).
        headers: file headers rewrapped.
        symlinks: symlink targets re-encrypted.
        xattrs: xattrs re-encrypted.
        removed: leftover temporary entries and stale sidecars removed.
        damaged: items that decrypt under no key the walk has; nothing was lost by them.
        failed: items that could not be read or written; they may still need the old key.
    """

    files: int = 0
    directories: int = 0
    names: int = 0
    headers: int = 0
    symlinks: int = 0
    xattrs: int = 0
    removed: int = 0
    damaged: list[Problem] = field(default_factory=list)
    failed: list[Problem] = field(default_factory=list)


@dataclass
class RekeyReport:
    """What :func:`rekey_volume` did.

    Attributes:
        old_generation: the generation the volume had before.
        new_generation: the generation it has now (or will have, if not finished).
        resumed: whether an interrupted rekey was found and finished.
        recovery: what crash recovery did first.
        walk: the re-encrypting walk.
        journal: what happened to the audit journal's key.
        check: the final check; ``None`` when the rekey could not be finished.
    """

    old_generation: int
    new_generation: int
    resumed: bool
    recovery: RecoveryReport
    walk: WalkReport = field(default_factory=WalkReport)
    journal: str = JOURNAL_NONE
    check: WalkReport | None = None

    @property
    def finished(self) -> bool:
        """Whether the volume file holds only the new key."""
        return self.check is not None

    def lines(self) -> list[str]:
        """Return the report as :func:`run_rekey` prints it."""
        lines = [
            f"rekey: volume key generation {self.old_generation} -> {self.new_generation}"
            + (" (resuming an interrupted rekey)" if self.resumed else "")
        ]
        if self.recovery.repaired or self.recovery.damaged:
            lines.append(
                f"rekey: crash recovery repaired {len(self.recovery.repaired)} file(s), "
                f"found {len(self.recovery.damaged)} damaged"
            )
        walk = self.walk
        lines.append(
            f"rekey: re-encrypted {walk.names} names, {walk.headers} headers, "
            f"{walk.symlinks} symlinks, {walk.xattrs} xattrs"
            + (f"; removed {walk.removed} leftover entries" if walk.removed else "")
        )
        lines += [f"{p.location.display}: could not re-encrypt: {p.what}" for p in walk.failed]
        if not self.finished:
            return lines
        lines.append(f"rekey: {self.journal}")
        check = self.check
        assert check is not None
        lines += [f"{p.location.display}: {p.what}" for p in check.damaged + check.failed]
        problems = len(check.damaged) + len(check.failed)
        summary = (
            f"rekey: check: {check.files} files, {check.directories} directories "
            f"open under generation {self.new_generation}"
        )
        lines.append(summary if not problems else f"{summary} except {problems} damaged")
        return lines


# ------------------------------------------------------------------------------ rekeying


def rekey_volume(
    volume: Volume,
    provider: KeyProvider,
    audit: AuditConfig | None,
    progress: Callable[[str], Progress | None] | None = None,
) -> RekeyReport:
    """Give *volume* a new volume key, or finish the rekey an interrupted run began.

    Args:
        volume: opened with ``allow_rekey_in_progress=True``; nothing else may use it.
            If it is not open for writing yet, this takes the store lock and runs crash
            recovery (:meth:`Volume.start_writing`). The caller closes it.
        provider: the provider that opened it; it wraps the new key.
        audit: the configuration's ``audit`` section, or ``None`` for no journal.
        progress: makes a progress callback for a walk (called with ``"rekey"`` and
            ``"check"``), or returns ``None`` for none.

    Returns:
        The report. When items could not be written it is not finished (see
        :attr:`RekeyReport.finished`): the old key is kept and a rerun retries them.

    Raises:
        StoreError: another process has the store open.
        FormatError: the volume file's key slots are malformed.
        KeyProviderError: the provider could not wrap the new key.
        WrongKeyError: the audit journal's key unwraps under neither key.
        AuditUnavailable: the journal cannot be written and ``on_failure`` is ``deny``.
        OSError: the store's root or volume file could not be read or written.
    """
    recovery = RecoveryReport()
    if volume.intent is None:
        recovery = volume.start_writing()

    resumed = len(volume.generations) == 2
    if resumed:
        old_generation, new_generation = volume.generations
        log.info("resuming the rekey to generation %d", new_generation)
    else:
        old_generation = volume.generation
        new_generation = old_generation + 1
        _add_new_key(volume, provider, new_generation)
    report = RekeyReport(old_generation, new_generation, resumed, recovery)

    walker = _Walker(volume, new_generation, volume.transforms(old_generation), report.walk)
    walker.walk(_make_progress(progress, "rekey"))
    # The walk writes without fsync; one flush of the whole filesystem makes every header,
    # rename and xattr durable before the journal and the volume file drop the old key.
    sync_filesystem(volume.store)
    if report.walk.failed:
        log.warning(
            "rekey: %d item(s) could not be re-encrypted; the old key is kept",
            len(report.walk.failed),
        )
        return report

    if audit is not None:
        report.journal = _rekey_journal(volume, audit, old_generation, new_generation)

    slot = next(s for s in volume.volume_file.keys if s.generation == new_generation)
    volume.write_volume_file([slot])
    log.info("rekey: the volume key is now generation %d; the old key is gone", new_generation)

    report.check = WalkReport()
    _Walker(volume, new_generation, None, report.check).walk(_make_progress(progress, "check"))
    return report


def _add_new_key(volume: Volume, provider: KeyProvider, generation: int) -> None:
    """Step 1: make and wrap a new volume key, and write the volume file with two slots."""
    new_key = random_key()
    try:
        wrapped = provider.wrap(new_key, volume.volume_id)
        slot = format.KeySlot(
            generation=generation,
            provider=wrapped.provider,
            key_name=wrapped.key_name,
            key_version=wrapped.key_version,
            wrapped=wrapped.blob,
            params=dict(wrapped.params),
        )
        volume.write_volume_file([*volume.volume_file.keys, slot], {generation: new_key})
    except BaseException:
        new_key.wipe()
        raise
    log.info("rekey: made volume key generation %d", generation)


def _rekey_journal(volume: Volume, audit: AuditConfig, old: int, new: int) -> str:
    """Step 3: rewrap the journal key, then record the rekey under the new key."""
    outcome = JOURNAL_CREATED
    if JournalFiles(audit.journal).state.exists():
        old_key, new_key = volume.audit_key(old), volume.audit_key(new)
        try:
            already = _journal_under(audit.journal, volume.volume_id, new_key)
            rewrap_journal_key(audit.journal, volume.volume_id, old_key, new_key)
        finally:
            old_key.wipe()
            new_key.wipe()
        outcome = JOURNAL_ALREADY if already else JOURNAL_REWRAPPED

    audit_key = volume.audit_key(new)
    try:
        journal = AuditJournal.open(
            audit.journal,
            volume.volume_id,
            audit_key,
            patient_id=audit.patient_id,
            on_failure=audit.on_failure,
            max_bytes=audit.max_bytes,
            forwarder=SyslogForwarder() if audit.syslog else None,
        )
        try:
            journal.record(Event.REKEY, daemon_caller(), None)
        finally:
            journal.close()
    except AuditUnavailable as exc:
        if audit.on_failure == "deny":
            raise
        log.warning("rekey: not recorded in the audit journal: %s", exc)
        outcome = JOURNAL_UNWRITTEN
    finally:
        audit_key.wipe()
    return outcome


def _journal_under(journal: Path, volume_id: bytes, audit_key: SecretKey) -> bool:
    """Tell whether the journal key already unwraps under *audit_key*."""
    try:
        load_journal_key(JournalFiles(journal), volume_id, audit_key)
    except (IntegrityError, OSError):
        return False
    return True


def sync_filesystem(path: Path) -> None:
    """Flush the filesystem that holds *path* to stable storage: ``syncfs(2)``.

    Falls back to ``sync(2)``, which flushes every filesystem, where the C library has no
    ``syncfs``.

    Raises:
        OSError: the filesystem reported a write error.
    """
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _make_progress(factory: Callable[[str], Progress | None] | None, what: str) -> Progress | None:
    return None if factory is None else factory(what)


# ------------------------------------------------------------------------------ the walk


@dataclass
class _Directory:
    """A backing directory being walked, with its subdirectories still to visit."""

    fd: int
    where: Location
    dir_id: bytes | None
    #: Its access and modification times before the walk changed anything in it.
    times: tuple[int, int]
    subdirectories: list[tuple[str, Location]] = field(default_factory=list)

    def touched(self) -> None:
        """Put the times back at once after an entry was renamed or removed."""
        os.utime(self.fd, ns=self.times)


class _Walker:
    """One walk of the store: re-encrypting from *old* to generation *generation*, or,
    with *old* ``None``, only checking that everything opens under *generation*."""

    def __init__(
        self, volume: Volume, generation: int, old: Transforms | None, report: WalkReport
    ) -> None:
        self._volume = volume
        self._generation = generation
        self._new = volume.transforms(generation)
        self._old = old
        self._report = report
        self._progress: Progress | None = None
        #: Hard-linked inodes already done, by (device, inode).
        self._inodes: set[tuple[int, int]] = set()

    @property
    def _rekeying(self) -> bool:
        return self._old is not None

    def walk(self, progress: Progress | None) -> None:
        self._progress = progress
        if progress is not None:
            progress(0)
        root_fd = os.open(self._volume.store, _DIR_FLAGS)
        try:
            stack = [self._enter(root_fd, Location(".", b""), is_root=True)]
        except BaseException:
            os.close(root_fd)
            raise
        try:
            while stack:
                directory = stack[-1]
                if not directory.subdirectories:
                    os.close(directory.fd)
                    stack.pop()
                    continue
                entry, where = directory.subdirectories.pop()
                try:
                    fd = os.open(entry, _DIR_FLAGS, dir_fd=directory.fd)
                except OSError as exc:
                    self._failed(where, exc)
                    continue
                stack.append(self._enter(fd, where, is_root=False))
        finally:
            for directory in stack:
                os.close(directory.fd)

    # -------------------------------------------------------------------------- directories

    def _enter(self, fd: int, where: Location, is_root: bool) -> _Directory:
        """Handle one directory and its non-directory entries; return it for the walk."""
        self._report.directories += 1
        info = os.fstat(fd)
        times = (info.st_atime_ns, info.st_mtime_ns)
        try:
            dir_id: bytes | None = self._volume.read_dir_id(fd)
        except IntegrityError:
            self._damaged(where, "dirid")
            dir_id = None
        except OSError as exc:
            self._failed(where, exc)
            dir_id = None
        directory = _Directory(fd, where, dir_id, times)
        if dir_id is not None:
            self._guarded(where, lambda: self._xattrs(fd, dir_id, where))

        try:
            names = sorted(os.listdir(fd))
        except OSError as exc:
            self._failed(where, exc)
            return directory
        if self._rekeying:
            names = self._remove_leftovers(directory, names)
        present = set(names)
        for entry in names:
            if entry.startswith(".") or not NameTransform.is_listed(entry):
                continue
            if is_root and entry == _LOST_FOUND:
                continue
            self._entry(directory, entry, present)
        if self._rekeying and dir_id is not None:
            self._remove_stale_sidecars(directory, names)

        # Visited by popping from the end: reverse, so that the walk goes in name order.
        directory.subdirectories.reverse()
        return directory

    def _remove_leftovers(self, directory: _Directory, names: list[str]) -> list[str]:
        """Remove temporary files and symlinks a killed writer left; return what is left.

        The store lock shows that no writer is running, so none of them is in use.
        Temporary directories (a killed ``mkdir``) are left for fsck to report.
        """
        kept = []
        for entry in names:
            if entry.startswith(format.TMP_PREFIX):
                try:
                    mode = os.stat(entry, dir_fd=directory.fd, follow_symlinks=False).st_mode
                    if not stat.S_ISDIR(mode):
                        os.unlink(entry, dir_fd=directory.fd)
                        self._report.removed += 1
                        directory.touched()
                        continue
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("rekey: could not remove a temporary entry: %s", exc.strerror)
            kept.append(entry)
        return kept

    def _remove_stale_sidecars(self, directory: _Directory, names: list[str]) -> None:
        """Remove old-key sidecars whose entry was renamed by a run killed just after."""
        assert self._old is not None and directory.dir_id is not None
        for entry in names:
            if not entry.endswith(format.SIDECAR_SUFFIX) or entry.startswith(format.TMP_PREFIX):
                continue
            stem = entry[: -len(format.SIDECAR_SUFFIX)]
            if "." in stem or _exists_at(directory.fd, stem + format.LONG_SUFFIX):
                continue
            sidecar = _read_sidecar(directory.fd, entry)
            if sidecar is None or format.b64u_encode(digest(sidecar)) != stem:
                continue
            try:
                self._old.names.decrypt_long(directory.dir_id, stem + format.LONG_SUFFIX, sidecar)
            except IntegrityError:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry, dir_fd=directory.fd)
            self._report.removed += 1
            directory.touched()

    # -------------------------------------------------------------------------- entries

    def _entry(self, directory: _Directory, entry: str, present: set[str]) -> None:
        """Handle one listed entry: its content first, then its name."""
        name, done = self._decrypt_name(directory, entry, present)
        where = _child(directory.where, entry, name)
        try:
            info = os.stat(entry, dir_fd=directory.fd, follow_symlinks=False)
        except OSError as exc:
            self._failed(where, exc)
            self._step()
            return

        is_dir = stat.S_ISDIR(info.st_mode)
        if not is_dir:
            self._report.files += 1
            if stat.S_ISREG(info.st_mode):
                self._guarded(where, lambda: self._file(directory.fd, entry, info, where))
            elif stat.S_ISLNK(info.st_mode):
                self._guarded(where, lambda: self._symlink(directory, entry, info, where))

        if name is not None and not done:
            try:
                entry = self._rename(directory, entry, name)
                where = _child(directory.where, entry, name)
            except OSError as exc:
                self._failed(where, exc)
        if is_dir:  # its contents are done when the walk gets there
            directory.subdirectories.append((entry, where))
        else:
            self._step()

    def _decrypt_name(
        self, directory: _Directory, entry: str, present: set[str]
    ) -> tuple[bytes | None, bool]:
        """Return the plaintext name of *entry* and whether it is under the new key already.

        ``(None, False)`` (reported as damage) when it decrypts under neither key or its
        directory id is damaged (reported once, as the directory's).
        """
        if directory.dir_id is None:
            return None, False
        where = _child(directory.where, entry, None)
        sidecar_name = NameTransform.sidecar_of(entry)
        sidecar = None
        if sidecar_name is not None:
            sidecar = _read_sidecar(directory.fd, sidecar_name) if sidecar_name in present else None
            if sidecar is None:
                self._damaged(where, "sidecar")
                return None, False
        for transforms, done in ((self._new, True), (self._old, False)):
            if transforms is None:
                continue
            try:
                if sidecar is None:
                    return transforms.names.decrypt(directory.dir_id, entry), done
                return transforms.names.decrypt_long(directory.dir_id, entry, sidecar), done
            except IntegrityError:
                continue
        self._damaged(where, "name")
        return None, False

    def _rename(self, directory: _Directory, entry: str, name: bytes) -> str:
        """Move *entry* to its name under the new key; return the new backing name.

        A long name writes its new sidecar first and removes the old one last.

        Raises:
            FileExistsError: the new name is taken (nothing is overwritten).
            OSError: the backing filesystem refused.
        """
        assert directory.dir_id is not None
        backing = self._new.names.encrypt(directory.dir_id, name)
        if _exists_at(directory.fd, backing.entry):
            raise FileExistsError(errno.EEXIST, "the new name exists already")
        tree.write_sidecar(directory.fd, backing, durable=True)
        os.rename(entry, backing.entry, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        directory.touched()
        old_sidecar = NameTransform.sidecar_of(entry)
        if old_sidecar is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old_sidecar, dir_fd=directory.fd)
            directory.touched()
        self._report.names += 1
        return backing.entry

    # -------------------------------------------------------------------------- objects

    def _file(self, dir_fd: int, entry: str, info: os.stat_result, where: Location) -> None:
        """Rewrap a regular file's header and re-encrypt its xattrs (once per inode)."""
        inode = (info.st_dev, info.st_ino)
        if inode in self._inodes:
            return
        fd = self._open_file(dir_fd, entry, info)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "no longer a regular file")
            data = os.pread(fd, format.HEADER_SIZE, 0)
            try:
                header = format.parse_header(data)
            except FormatError:
                self._damaged(where, "header")
                return
            if header.generation == self._generation:
                try:
                    self._volume.open_file_header(data)
                except IntegrityError:
                    self._damaged(where, "header")
            elif not self._rekeying:
                self._damaged(where, "header")
            else:
                try:
                    rewrapped = self._volume.rewrap_file_header(data, self._generation)
                except IntegrityError:
                    self._damaged(where, "header")
                else:
                    os.pwrite(fd, rewrapped, 0)
                    os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
                    self._report.headers += 1
            self._xattrs(fd, header.file_id, where)
        finally:
            os.close(fd)
        if info.st_nlink > 1:
            self._inodes.add(inode)

    def _open_file(self, dir_fd: int, entry: str, info: os.stat_result) -> int:
        """Open a backing file: for writing when rekeying, even one without write permission."""
        if not self._rekeying:
            return os.open(entry, os.O_RDONLY | _FILE_FLAGS, dir_fd=dir_fd)
        try:
            return os.open(entry, os.O_RDWR | _FILE_FLAGS, dir_fd=dir_fd)
        except PermissionError:
            if info.st_uid != os.geteuid():
                raise
        # Our own read-only file: allow writing for the one header write, then put the
        # mode back.
        mode = stat.S_IMODE(info.st_mode)
        os.chmod(entry, mode | stat.S_IWUSR, dir_fd=dir_fd)
        try:
            return os.open(entry, os.O_RDWR | _FILE_FLAGS, dir_fd=dir_fd)
        finally:
            os.chmod(entry, mode, dir_fd=dir_fd)

    def _symlink(
        self, directory: _Directory, entry: str, info: os.stat_result, where: Location
    ) -> None:
        """Re-encrypt a symlink's target: a new symlink renamed over the old one."""
        dir_fd = directory.fd
        target = os.readlink(entry, dir_fd=dir_fd)
        try:
            self._new.symlinks.decrypt(target)
            return
        except IntegrityError:
            pass
        if self._old is None:
            self._damaged(where, "symlink")
            return
        try:
            plaintext = self._old.symlinks.decrypt(target)
        except IntegrityError:
            self._damaged(where, "symlink")
            return

        temporary = f"{format.TMP_PREFIX}{random_id().hex()}"
        os.symlink(self._new.symlinks.encrypt(plaintext), temporary, dir_fd=dir_fd)
        try:
            if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
                with contextlib.suppress(PermissionError):
                    os.chown(
                        temporary, info.st_uid, info.st_gid, dir_fd=dir_fd, follow_symlinks=False
                    )
            os.utime(
                temporary,
                ns=(info.st_atime_ns, info.st_mtime_ns),
                dir_fd=dir_fd,
                follow_symlinks=False,
            )
            os.rename(temporary, entry, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
            raise
        directory.touched()
        self._report.symlinks += 1

    def _xattrs(self, fd: int, object_id: bytes, where: Location) -> bool:
        """Re-encrypt (or check) the ``user.*`` xattrs of an open file or directory.

        Returns:
            Whether any was rewritten.
        """
        try:
            backing_names = os.listxattr(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return False
            raise
        changed = False
        for backing_name in backing_names:
            if not backing_name.startswith("user."):
                continue
            encoded = os.fsencode(backing_name)
            try:
                self._new.xattrs.decrypt_name(encoded)
                if self._old is None:
                    sealed = os.getxattr(fd, backing_name)
                    self._new.xattrs.decrypt_value(object_id, encoded, sealed)
                continue
            except IntegrityError:
                if self._old is None:
                    self._damaged(where, "xattr")
                    continue
            try:
                name = self._old.xattrs.decrypt_name(encoded)
                sealed = os.getxattr(fd, backing_name)
                value = self._old.xattrs.decrypt_value(object_id, encoded, sealed)
            except IntegrityError:
                self._damaged(where, "xattr")
                continue
            new_name = self._new.xattrs.encrypt_name(name)
            os.setxattr(fd, new_name, self._new.xattrs.encrypt_value(object_id, new_name, value))
            os.removexattr(fd, backing_name)
            self._report.xattrs += 1
            changed = True
        return changed

    # -------------------------------------------------------------------------- recording

    def _guarded(self, where: Location, action: Callable[[], object]) -> None:
        """Run *action*; an OSError marks the item as failed instead of stopping the walk."""
        try:
            action()
        except OSError as exc:
            self._failed(where, exc)

    def _damaged(self, where: Location, what: str) -> None:
        log.debug("rekey: %s decrypts under no key: %s", where.backing, what)
        self._report.damaged.append(Problem(where, what))

    def _failed(self, where: Location, exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        log.debug("rekey: %s could not be handled: %s", where.backing, reason)
        self._report.failed.append(Problem(where, reason))

    def _step(self) -> None:
        if self._progress is not None:
            self._progress(1)


def _child(parent: Location, entry: str, name: bytes | None) -> Location:
    backing = entry if parent.backing == "." else f"{parent.backing}/{entry}"
    if parent.plaintext is None or name is None:
        return Location(backing, None)
    plaintext = name if not parent.plaintext else parent.plaintext + b"/" + name
    return Location(backing, plaintext)


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _read_sidecar(dir_fd: int, sidecar: str) -> bytes | None:
    try:
        fd = os.open(sidecar, os.O_RDONLY | _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, _MAX_SIDECAR + 1)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ command


def run_rekey(config: Config, args: argparse.Namespace) -> int:
    """Run ``dermfs rekey CONFIG``: rekey the unmounted volume and print the report.

    Returns:
        :data:`~dermfs.exitcodes.OK` when every item opens under the new key,
        :data:`~dermfs.exitcodes.DAMAGE` when the final check found items that were
        already damaged.

    Raises:
        StoreError: the store is missing, not a store, or in use by a mount; or items
            could not be re-encrypted, so the old key was kept.
        FormatError, WrongKeyError, KeyProviderError: from opening the store.
        AuditUnavailable: the audit journal cannot be written (``on_failure: deny``).
    """
    del args  # the command has no options
    from dermfs.keys import provider_from_config

    provider = provider_from_config(config.kms, passphrase_stdin=sys.stdin)
    try:
        volume = Volume.open(config.store, provider, allow_rekey_in_progress=True)
        try:
            bars = _ProgressBars(config.store) if sys.stderr.isatty() else None
            try:
                report = rekey_volume(volume, provider, config.audit, bars)
            finally:
                if bars is not None:
                    bars.close()
        finally:
            volume.close()
    finally:
        wipe = getattr(provider, "wipe", None)
        if callable(wipe):
            wipe()

    encoding = sys.stdout.encoding or "utf-8"
    for line in report.lines():
        print(line.encode(encoding, "backslashreplace").decode(encoding))
    sys.stdout.flush()
    if not report.finished:
        raise StoreError(
            f"{len(report.walk.failed)} item(s) could not be re-encrypted (listed above); "
            "the old key is kept; run `dermfs rekey` again once they can be written"
        )
    assert report.check is not None
    damaged = report.check.damaged or report.check.failed
    return exitcodes.DAMAGE if damaged else exitcodes.OK


class _ProgressBars:
    """tqdm bars on stderr, one per walk, counting the entries :func:`count_entries` counts."""

    def __init__(self, store: Path) -> None:
        self._store = store
        self._bar: tqdm[Never] | None = None

    def __call__(self, what: str) -> Progress:
        self.close()
        bar = tqdm(
            total=count_entries(self._store),
            unit="entry",
            desc=what,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )
        self._bar = bar

        def update(count: int) -> None:
            bar.update(count)

        return update

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
