"""Exit codes of the ``dermfs`` command, one per kind of failure a user can cause.

These numbers are a stable contract (they are listed in the man page). A retired number
is never reused.
"""

from __future__ import annotations

from dermfs import errors

OK = 0
#: Anything not covered below; also an internal error.
GENERIC = 1
#: Bad command line.
USAGE = 2
#: The configuration file is missing, malformed, or has a bad or unknown key.
CONFIG = 3
#: The store directory is missing, not a dermfs store, or in use by another mount.
STORE = 4
#: The volume file is malformed, truncated, or of an unknown version or feature.
FORMAT = 5
#: The key or passphrase is not the volume's.
WRONG_KEY = 6
#: The key provider (KMS, HSM, key file) could not be used.
KEY_PROVIDER = 7
#: A secret file is readable by other users.
INSECURE_FILE = 8
#: The mount point is missing, not empty, or already mounted; FUSE is unavailable.
MOUNT = 9
#: fsck found damage, or audit verify found a broken journal.
DAMAGE = 10
#: Authenticated data failed to verify where the command needed it intact.
INTEGRITY = 11
#: The audit journal cannot be written, and the configuration says to fail closed.
AUDIT = 12
#: Interrupted by SIGINT (128 + 2, as shells report it).
INTERRUPTED = 130

_BY_EXCEPTION: tuple[tuple[type[errors.DermfsError], int], ...] = (
    (errors.ConfigError, CONFIG),
    (errors.StoreError, STORE),
    (errors.FormatError, FORMAT),
    (errors.WrongKeyError, WRONG_KEY),
    (errors.KeyProviderError, KEY_PROVIDER),
    (errors.InsecureFileError, INSECURE_FILE),
    (errors.IntegrityError, INTEGRITY),
    (errors.MountError, MOUNT),
    (errors.AuditUnavailable, AUDIT),
    (errors.AuditDamaged, DAMAGE),
)


def for_exception(exc: errors.DermfsError) -> int:
    """Return the exit code that stands for *exc*."""
    for exc_type, code in _BY_EXCEPTION:
        if isinstance(exc, exc_type):
            return code
    return GENERIC
