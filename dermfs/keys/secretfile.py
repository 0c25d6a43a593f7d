"""Reading and creating the small files that hold secrets: key files, passphrases, tokens, PINs.

Every provider reads its credential files here, so that all of them get the same rule: a
secret file must be a regular file that grants nothing to group or others (mode 0600 or
0400), or it is refused before a byte of it is read. Messages name the file and its mode,
never its contents.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from dermfs.errors import InsecureFileError, KeyProviderError

log = logging.getLogger(__name__)

#: Largest secret file we read; anything bigger is not a key, passphrase, token or PIN.
MAX_SECRET_FILE_SIZE = 64 * 1024
#: Mode bits a secret file must not have.
_GROUP_OTHER_BITS = stat.S_IRWXG | stat.S_IRWXO


def read_secret_file(path: Path, what: str) -> bytes:
    """Return the contents of the secret file at *path*, after checking its mode.

    The mode is checked on the open file, so the file cannot be swapped between the check
    and the read. The file is opened without blocking, so a FIFO put in its place is
    refused rather than waited on.

    Args:
        path: the file.
        what: what the file holds, for messages (``key file``, ``passphrase file``).

    Returns:
        The file's bytes, unchanged.

    Raises:
        InsecureFileError: the file's mode grants group or others any access.
        KeyProviderError: the file is missing, unreadable, not a regular file, or too big.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise _open_error(path, what, exc) from None

    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyProviderError(f"{what} {path} is not a regular file")
        if info.st_mode & _GROUP_OTHER_BITS:
            raise InsecureFileError(
                f"{what} {path} has mode {stat.S_IMODE(info.st_mode):04o}, which gives other "
                f"users access to it; allow only its owner (chmod 600 {path})"
            )
        with open(fd, "rb", closefd=False) as file:
            data = file.read(MAX_SECRET_FILE_SIZE + 1)
    except OSError as exc:
        raise KeyProviderError(f"cannot read {what} {path}: {_reason(exc)}") from None
    finally:
        os.close(fd)

    if len(data) > MAX_SECRET_FILE_SIZE:
        raise KeyProviderError(f"{what} {path} is too big to be a {what}")
    log.debug("read %s %s", what, path)
    return data


def create_secret_file(path: Path, data: bytes, what: str) -> None:
    """Create *path* with mode 0600 holding *data*, durably; never replace a file.

    The mode is set explicitly after creation, so the umask cannot loosen or tighten it.

    Args:
        path: the file to create; its directory must exist.
        data: the secret bytes.
        what: what the file holds, for messages.

    Raises:
        KeyProviderError: the file exists already, or cannot be created or written.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyProviderError(f"{what} {path} exists already; not replacing it") from None
    except OSError as exc:
        raise KeyProviderError(f"cannot create {what} {path}: {_reason(exc)}") from None

    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise KeyProviderError(f"cannot write {what} {path}: {_reason(exc)}") from None
    os.close(fd)

    _fsync_directory(path.parent)
    log.info("created %s %s", what, path)


def _open_error(path: Path, what: str, exc: OSError) -> KeyProviderError:
    if exc.errno == errno.ENOENT:
        return KeyProviderError(f"{what} {path} does not exist")
    return KeyProviderError(f"cannot open {what} {path}: {_reason(exc)}")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyProviderError(f"cannot open directory {directory}: {_reason(exc)}") from None
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
