"""``dermfs fsck``: check every header, chunk, name and id of a store.

:func:`check_volume` first repairs what a crash left, exactly as a mount does
(:meth:`Volume.start_writing`), then walks the whole store from the root and checks:

- every directory's ``dermfs.dirid`` (kind ``dirid``);
- every entry name against its parent's id (``name``), and for a long name its sidecar,
  which must exist and hash to the entry (``sidecar``);
- every regular file's header (``header``), every chunk with its index and final flag
  (``chunk N``), and the backing size (``size``);
- every symlink target (``symlink``);
- every ``user.*`` xattr's name and value, bound to the file or directory id (``xattr``);
- entries that are not dermfs's and not hidden (no leading dot), such as ``notes.txt``,
  which count as damage of kind ``name``.

A directory being created at a crash (``dermfs.tmp.*``) and a long-name sidecar without its
entry are reported as warnings, not damage; fsck leaves them in place. Entries whose name
starts with a dot belong to the backing filesystem (``.nfs*``, ``.snapshot``) and are
skipped, and so is ``lost+found`` in the store root.

:func:`run_fsck` is the command: it prints the report on standard output, one line per
damaged item, and returns :data:`dermfs.exitcodes.DAMAGE` when there is any damage.
Plaintext names appear only in that report, never in log records.

Caveats:

- The walk keeps one file descriptor open per directory level, so a tree deeper than the
  process's file limit (1024 levels by default) cannot be checked.
- fsck reports; apart from crash recovery it repairs nothing. A damaged chunk stays
  damaged, and a stray temporary directory stays until it is removed by hand.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Never

from tqdm import tqdm

from dermfs import content, exitcodes, format
from dermfs.cryptocore import digest
from dermfs.errors import IntegrityError
from dermfs.names import NameTransform
from dermfs.volume import RecoveryReport, Volume

if TYPE_CHECKING:
    from dermfs.config import Config

log = logging.getLogger(__name__)

KIND_NAME = "name"
KIND_HEADER = "header"
KIND_SIZE = "size"
KIND_DIRID = "dirid"
KIND_SYMLINK = "symlink"
KIND_XATTR = "xattr"
KIND_SIDECAR = "sidecar"
#: The backing filesystem refused to let us read the entry (EIO, EACCES).
KIND_UNREADABLE = "unreadable"

WARNING_TEMPORARY = "stray temporary entry"
WARNING_ORPHAN_SIDECAR = "orphan sidecar"
WARNING_DUPLICATE_DIRID = "directory id shared with another directory"

#: Chunk findings listed on one report line before the rest are only counted.
MAX_CHUNKS_PER_LINE = 10
#: What a backing path is prefixed with in the report; plaintext paths start with "/".
BACKING_MARK = "[store] "

#: Root entries that are dermfs's own files (``docs/format.md`` section 1).
_ROOT_FILES = frozenset({format.VOLUME_FILE, format.LOCK_FILE, format.INTENT_FILE})
_LOST_FOUND = "lost+found"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Sidecars hold one AES-SIV output of a name of at most 255 bytes.
_MAX_SIDECAR = 4096


def chunk_kind(chunk_index: int) -> str:
    """Return the kind of damage of a chunk that fails to authenticate."""
    return f"chunk {chunk_index}"


# ------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Location:
    """Where an item is in the store, and in the volume when every name above it decrypts.

    Attributes:
        backing: the path relative to the store, ``"."`` for the root.
        plaintext: the path inside the volume without a leading ``/`` (``b""`` for the
            root), or ``None`` when a name on the way does not decrypt.
    """

    backing: str
    plaintext: bytes | None

    @property
    def display(self) -> str:
        """The path as the report prints it: ``/plain/path`` or ``[store] backing/path``.

        Bytes that are not UTF-8 and control characters are escaped, so that a path always
        stays on one line.
        """
        if self.plaintext is None:
            return BACKING_MARK + _printable(self.backing)
        text = self.plaintext.decode("utf-8", "backslashreplace")
        return "/" + _printable(text)


@dataclass(frozen=True)
class Finding:
    """One problem fsck found.

    Attributes:
        location: the damaged item.
        kind: ``name``, ``header``, ``chunk N``, ``size``, ``dirid``, ``symlink``,
            ``xattr``, ``sidecar`` or ``unreadable`` for damage; a short description for
            a warning.
        warning: ``True`` for something to tidy that is not damage.
    """

    location: Location
    kind: str
    warning: bool = False


@dataclass
class FsckReport:
    """What :func:`check_volume` found.

    Attributes:
        files: non-directory entries checked (regular files, symlinks, others).
        directories: directories checked, the root included.
        findings: damage and warnings, in the order of the walk.
        recovery: what crash recovery did before the walk (empty when the volume was
            already open for writing, so recovery had run before).
        repaired: the files crash recovery repaired.
        unrepaired: the files crash recovery found damaged and left as they were; the
            walk reports their damage too.
    """

    files: int = 0
    directories: int = 0
    findings: list[Finding] = field(default_factory=list)
    recovery: RecoveryReport = field(default_factory=RecoveryReport)
    repaired: list[Location] = field(default_factory=list)
    unrepaired: list[Location] = field(default_factory=list)

    @property
    def damage(self) -> list[Finding]:
        """The findings that are damage."""
        return [finding for finding in self.findings if not finding.warning]

    @property
    def warnings(self) -> list[Finding]:
        """The findings that are only warnings."""
        return [finding for finding in self.findings if finding.warning]

    @property
    def clean(self) -> bool:
        """Whether no damage was found (warnings allowed)."""
        return not self.damage

    def damaged_items(self) -> dict[Location, list[str]]:
        """Return the kinds of damage of each damaged item, in the order of the walk."""
        items: dict[Location, list[str]] = {}
        for finding in self.damage:
            items.setdefault(finding.location, []).append(finding.kind)
        return items

    def lines(self) -> list[str]:
        """Return the report as :func:`run_fsck` prints it, the summary last."""
        lines = [f"fsck: crash recovery repaired {where.display}" for where in self.repaired]
        lines += [
            f"fsck: crash recovery could not repair {where.display}" for where in self.unrepaired
        ]
        if self.recovery.missing:
            lines.append(
                f"fsck: crash recovery: {self.recovery.missing} file(s) being written "
                "at the crash no longer exist"
            )

        items = self.damaged_items()
        lines += [f"{where.display}: {_describe_kinds(kinds)}" for where, kinds in items.items()]
        lines += [
            f"warning: {finding.location.display}: {finding.kind}" for finding in self.warnings
        ]

        summary = (
            f"fsck: {self.files} files, {self.directories} directories checked, "
            f"{len(items)} damaged"
        )
        if self.warnings:
            summary += f", {len(self.warnings)} warnings"
        lines.append(summary)
        return lines


def _describe_kinds(kinds: list[str]) -> str:
    chunks = [kind for kind in kinds if kind.startswith("chunk ")]
    others = [kind for kind in kinds if not kind.startswith("chunk ")]
    shown = chunks[:MAX_CHUNKS_PER_LINE]
    if len(chunks) > len(shown):
        shown.append(f"and {len(chunks) - len(shown)} more chunks")
    return ", ".join(shown + others)


def _printable(text: str) -> str:
    """Escape the control characters of *text* (``\\n`` becomes ``\\x0a``)."""
    if text.isprintable():
        return text
    return "".join(char if unicodedata.category(char)[0] != "C" else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# ------------------------------------------------------------------------------ checking


def check_volume(volume: Volume, on_progress: Callable[[int], None] | None = None) -> FsckReport:
    """Run crash recovery, then check every directory, name, file and xattr of *volume*.

    If the volume is not open for writing yet, this takes the store lock and runs crash
    recovery through :meth:`Volume.start_writing`; the caller closes the volume afterwards
    (:meth:`Volume.close`), which removes the intent log and releases the lock. Nothing
    else in the store is changed.

    Args:
        volume: the unlocked volume; nothing else may use it while it is checked.
        on_progress: called once with ``0`` when the walk starts (after recovery, with
            the lock held), then with ``1`` for each non-directory entry checked, the
            entries :func:`count_entries` counts.

    Returns:
        The report. Damage is reported, not raised.

    Raises:
        StoreError: another process has the store open.
        OSError: the store's root directory cannot be read.
    """
    report = FsckReport()
    if volume.intent is None:
        report.recovery = volume.start_writing()

    recovered = {*report.recovery.repaired, *report.recovery.damaged}
    checker = _Checker(volume, report, on_progress, recovered)
    if on_progress is not None:
        on_progress(0)
    checker.walk()

    report.repaired = [checker.located(path) for path in report.recovery.repaired]
    report.unrepaired = [checker.located(path) for path in report.recovery.damaged]
    log.info(
        "fsck checked %d files and %d directories: %d findings of damage, %d warnings",
        report.files,
        report.directories,
        len(report.damage),
        len(report.warnings),
    )
    return report


def count_entries(store: Path) -> int:
    """Count the non-directory entries :func:`check_volume` will check, for a progress bar.

    A quick walk of names and types only; nothing is opened or decrypted.
    """
    count = 0
    root = os.fspath(store)
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not NameTransform.is_listed(entry.name):
                        continue
                    if directory == root and entry.name == _LOST_FOUND:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    else:
                        count += 1
        except OSError:
            continue
    return count


@dataclass
class _Directory:
    """A backing directory being walked, with its subdirectories still to visit."""

    fd: int
    where: Location
    dir_id: bytes | None
    subdirectories: list[tuple[str, Location]] = field(default_factory=list)


class _Checker:
    """One walk of a store; fills in a :class:`FsckReport`."""

    def __init__(
        self,
        volume: Volume,
        report: FsckReport,
        on_progress: Callable[[int], None] | None,
        recovered: set[str],
    ) -> None:
        self._volume = volume
        self._report = report
        self._on_progress = on_progress
        self._recovered = recovered
        self._found: dict[str, Location] = {}
        self._dir_ids: dict[bytes, Location] = {}
        #: Damage of hard-linked files already checked, by (device, inode).
        self._linked: dict[tuple[int, int], list[str]] = {}

    def located(self, backing: str) -> Location:
        """Return the location of a backing path recovery named, as the walk found it."""
        return self._found.get(backing, Location(backing, None))

    # -------------------------------------------------------------------------- walking

    def walk(self) -> None:
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
                except OSError:
                    self._damage(where, KIND_UNREADABLE)
                    continue
                stack.append(self._enter(fd, where, is_root=False))
        finally:
            for directory in stack:
                os.close(directory.fd)

    def _enter(self, fd: int, where: Location, is_root: bool) -> _Directory:
        """Check one directory and its non-directory entries; return it for the walk."""
        self._report.directories += 1
        dir_id = self._read_dir_id(fd, where)
        self._check_xattrs(fd, dir_id, where)
        directory = _Directory(fd, where, dir_id)

        try:
            names = sorted(os.listdir(fd))
        except OSError:
            self._damage(where, KIND_UNREADABLE)
            return directory
        present = set(names)
        for entry in names:
            if self._is_skipped(fd, entry, is_root):
                continue
            if entry.startswith(format.TMP_PREFIX):
                self._warn(self._child(where, entry, None), WARNING_TEMPORARY)
            elif entry.endswith(format.SIDECAR_SUFFIX) and _is_sidecar(entry):
                long_entry = entry[: -len(format.SIDECAR_SUFFIX)] + format.LONG_SUFFIX
                if long_entry not in present:
                    self._warn(self._child(where, entry, None), WARNING_ORPHAN_SIDECAR)
            elif not NameTransform.is_listed(entry):
                self._damage(self._child(where, entry, None), KIND_NAME)
            else:
                self._check_entry(directory, entry, present)

        # Visited by popping from the end: reverse, so that the walk goes in name order.
        directory.subdirectories.reverse()
        return directory

    @staticmethod
    def _is_skipped(fd: int, entry: str, is_root: bool) -> bool:
        if entry == format.DIRID_FILE or entry.startswith("."):
            return True
        if not is_root:
            return False
        if entry in _ROOT_FILES:
            return True
        return entry == _LOST_FOUND and _is_directory_at(fd, entry)

    def _check_entry(self, directory: _Directory, entry: str, present: set[str]) -> None:
        """Check the name of one listed entry, then the entry itself."""
        name = self._decrypt_name(directory, entry, present)
        where = self._child(directory.where, entry, name)
        try:
            mode = os.stat(entry, dir_fd=directory.fd, follow_symlinks=False).st_mode
        except OSError:
            self._damage(where, KIND_UNREADABLE)
            self._progress()
            return

        if stat.S_ISDIR(mode):
            directory.subdirectories.append((entry, where))
            return
        self._report.files += 1
        try:
            if stat.S_ISREG(mode):
                self._check_file(directory.fd, entry, where)
            elif stat.S_ISLNK(mode):
                self._check_symlink(directory.fd, entry, where)
        except OSError:
            self._damage(where, KIND_UNREADABLE)
        self._progress()

    def _decrypt_name(self, directory: _Directory, entry: str, present: set[str]) -> bytes | None:
        """Return the plaintext name of *entry*, or ``None`` (reported) if it has none.

        With a damaged directory id no name can decrypt; that is reported once, as the
        directory's ``dirid``, not as every name in it.
        """
        where = self._child(directory.where, entry, None)
        if directory.dir_id is None:
            return None
        sidecar_name = NameTransform.sidecar_of(entry)
        try:
            if sidecar_name is None:
                return self._volume.names.decrypt(directory.dir_id, entry)
            sidecar = self._read_sidecar(directory.fd, sidecar_name, present)
            if sidecar is None or _long_entry_of(sidecar) != entry:
                self._damage(where, KIND_SIDECAR)
                return None
            return self._volume.names.decrypt_long(directory.dir_id, entry, sidecar)
        except IntegrityError:
            self._damage(where, KIND_NAME)
            return None

    @staticmethod
    def _read_sidecar(dir_fd: int, sidecar: str, present: set[str]) -> bytes | None:
        if sidecar not in present:
            return None
        try:
            fd = os.open(sidecar, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return os.read(fd, _MAX_SIDECAR + 1)
        except OSError:
            return None
        finally:
            os.close(fd)

    # -------------------------------------------------------------------------- objects

    def _read_dir_id(self, fd: int, where: Location) -> bytes | None:
        try:
            if not stat.S_ISREG(
                os.stat(format.DIRID_FILE, dir_fd=fd, follow_symlinks=False).st_mode
            ):
                raise IntegrityError("directory id is not a regular file")
            dir_id = self._volume.read_dir_id(fd)
        except (IntegrityError, OSError):
            self._damage(where, KIND_DIRID)
            return None

        other = self._dir_ids.setdefault(dir_id, where)
        if other is not where:
            self._warn(where, WARNING_DUPLICATE_DIRID)
        return dir_id

    def _check_file(self, dir_fd: int, entry: str, where: Location) -> None:
        fd = _open_file(dir_fd, entry)
        try:
            info = os.fstat(fd)
            if where.backing in self._recovered:
                self._found[where.backing] = where
            if not stat.S_ISREG(info.st_mode):
                raise OSError(errno.EINVAL, "no longer a regular file")

            inode = (info.st_dev, info.st_ino)
            kinds = self._linked.get(inode) if info.st_nlink > 1 else None
            if kinds is None:
                kinds = self._file_damage(fd)
                if info.st_nlink > 1:
                    self._linked[inode] = kinds
        finally:
            os.close(fd)
        for kind in kinds:
            self._damage(where, kind)

    def _file_damage(self, fd: int) -> list[str]:
        try:
            keys = self._volume.read_file_keys(fd)
        except IntegrityError:
            return [KIND_HEADER]

        kinds = []
        chunk_count = self._volume.geometry.chunk_count(
            self._volume.geometry.plaintext_size_lenient(os.fstat(fd).st_size)
        )
        for chunk_index, error in content.iter_chunks(fd, keys):
            if error is None:
                continue
            kinds.append(chunk_kind(chunk_index) if chunk_index < chunk_count else KIND_SIZE)
        kinds += self._xattr_damage(fd, keys.file_id)
        return kinds

    def _check_symlink(self, dir_fd: int, entry: str, where: Location) -> None:
        target = os.readlink(entry, dir_fd=dir_fd)
        try:
            self._volume.symlinks.decrypt(target)
        except IntegrityError:
            self._damage(where, KIND_SYMLINK)

    def _check_xattrs(self, fd: int, object_id: bytes | None, where: Location) -> None:
        try:
            kinds = self._xattr_damage(fd, object_id)
        except OSError:
            kinds = [KIND_UNREADABLE]
        for kind in kinds:
            self._damage(where, kind)

    def _xattr_damage(self, fd: int, object_id: bytes | None) -> list[str]:
        """Check the ``user.*`` xattrs of an open file or directory.

        Values are checked only when the object's id is known; a damaged header or
        directory id is reported on its own.
        """
        try:
            backing_names = os.listxattr(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return []
            raise
        for backing_name in backing_names:
            if not backing_name.startswith("user."):
                continue
            encoded = os.fsencode(backing_name)
            try:
                self._volume.xattrs.decrypt_name(encoded)
                if object_id is not None:
                    sealed = os.getxattr(fd, backing_name)
                    self._volume.xattrs.decrypt_value(object_id, encoded, sealed)
            except IntegrityError:
                return [KIND_XATTR]
        return []

    # -------------------------------------------------------------------------- recording

    @staticmethod
    def _child(parent: Location, entry: str, name: bytes | None) -> Location:
        backing = entry if parent.backing == "." else f"{parent.backing}/{entry}"
        if parent.plaintext is None or name is None:
            return Location(backing, None)
        plaintext = name if not parent.plaintext else parent.plaintext + b"/" + name
        return Location(backing, plaintext)

    def _damage(self, where: Location, kind: str) -> None:
        log.debug("fsck: %s is damaged: %s", where.backing, kind)
        self._report.findings.append(Finding(where, kind))

    def _warn(self, where: Location, what: str) -> None:
        log.debug("fsck: %s: %s", where.backing, what)
        self._report.findings.append(Finding(where, what, warning=True))

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress(1)


def _is_sidecar(entry: str) -> bool:
    return (
        not entry.startswith(format.TMP_PREFIX) and "." not in entry[: -len(format.SIDECAR_SUFFIX)]
    )


def _long_entry_of(sidecar: bytes) -> str:
    return format.b64u_encode(digest(sidecar)) + format.LONG_SUFFIX


def _is_directory_at(dir_fd: int, entry: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(entry, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_file(dir_fd: int, entry: str) -> int:
    """Open a backing file for reading without changing its access time where allowed.

    The backing file's atime is the plaintext file's atime, so fsck should not touch it;
    ``O_NOATIME`` needs the file's owner (or root), so without it we read normally.
    """
    try:
        return os.open(entry, _FILE_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(entry, _FILE_FLAGS, dir_fd=dir_fd)


# ------------------------------------------------------------------------------ command


def run_fsck(config: Config, *, progress: bool) -> int:
    """Run ``dermfs fsck CONFIG``: check the store and print the report on stdout.

    Args:
        config: the volume's configuration.
        progress: show a progress bar on stderr (only when stderr is a terminal).

    Returns:
        :data:`~dermfs.exitcodes.OK` when no damage was found (warnings allowed),
        :data:`~dermfs.exitcodes.DAMAGE` otherwise.

    Raises:
        StoreError: the store is missing, not a store, or in use by a mount.
        FormatError: the volume file is malformed or of an unknown version or feature.
        WrongKeyError: the key or passphrase is not the volume's.
        KeyProviderError: the key provider could not be used.
    """
    from dermfs.keys import provider_from_config

    provider = provider_from_config(config.kms, passphrase_stdin=sys.stdin)
    volume = Volume.open(config.store, provider, allow_rekey_in_progress=True)
    if len(volume.generations) > 1:
        print(
            "fsck: a rekey was interrupted; entries it has not re-encrypted yet are reported "
            "as damage until `dermfs rekey CONFIG` finishes it"
        )
    bar = _ProgressBar(config.store) if progress and sys.stderr.isatty() else None
    try:
        report = check_volume(volume, bar)
    finally:
        if bar is not None:
            bar.close()
        volume.close()

    # A name the terminal's encoding cannot show is escaped rather than fatal.
    encoding = sys.stdout.encoding or "utf-8"
    for line in report.lines():
        print(line.encode(encoding, "backslashreplace").decode(encoding))
    return exitcodes.OK if report.clean else exitcodes.DAMAGE


class _ProgressBar:
    """A tqdm bar on stderr, made when the walk starts (the first call, with 0)."""

    def __init__(self, store: Path) -> None:
        self._store = store
        self._bar: tqdm[Never] | None = None

    def __call__(self, count: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=count_entries(self._store),
                unit="file",
                desc="fsck",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )
        self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
