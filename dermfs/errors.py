"""Exceptions raised by the dermfs library.

Lower layers raise these; the FUSE frontend turns them into errnos in one place and the
command line turns them into exit codes (see :mod:`dermfs.exitcodes`). Messages never
contain key material, passphrases or plaintext file names.
"""

from __future__ import annotations


class DermfsError(Exception):
    """Base class of every error dermfs raises on purpose."""


class IntegrityError(DermfsError):
    """Authenticated data failed to verify.

    Every decryption or MAC failure raises this one exception, with no detail about
    which check failed, so that callers cannot build an oracle from the difference.
    """


class FormatError(DermfsError):
    """Stored data is malformed, truncated, or of a version or feature we do not know."""


class WrongKeyError(DermfsError):
    """The key provider returned a key (or was given a passphrase) that is not the volume's."""


class ConfigError(DermfsError):
    """The configuration file is missing, malformed, or has a bad or unknown key."""


class KeyProviderError(DermfsError):
    """The key provider could not be reached or refused to wrap or unwrap."""


class InsecureFileError(DermfsError):
    """A secret file (key file, passphrase, token, PIN) is readable by other users."""


class StoreError(DermfsError):
    """The store directory is missing, not a store, or already in use."""


class MountError(DermfsError):
    """The mount point is unusable or FUSE is unavailable."""


class AuditUnavailable(DermfsError):
    """The audit journal cannot be written (disk full, I/O error, missing, in use).

    Raised by the journal when ``on_failure`` is ``deny``, so that the frontend refuses the
    open or read with ``EACCES``; when the journal cannot be opened at all; and at close
    when its last flush failed.
    """


class AuditDamaged(DermfsError):
    """The audit journal was found damaged (see :class:`dermfs.audit.JournalDamaged`)."""
