"""Encryption of symlink targets and extended attributes (``docs/format.md`` section 7)."""

from __future__ import annotations

from dermfs import format
from dermfs.cryptocore import Aead, Siv
from dermfs.errors import FormatError, IntegrityError

#: The backing filesystem's limit on a symlink target (PATH_MAX - 1).
MAX_BACKING_TARGET = 4095
#: The only xattr namespace dermfs stores.
USER_PREFIX = b"user."

_SYMLINK_AAD = b"dermfs v1 symlink"
_XATTR_AAD = b"dermfs v1 xattr"


class TooLongError(ValueError):
    """A symlink target or xattr name is too long to store once encrypted."""


class SymlinkTransform:
    """Encrypts and decrypts symlink targets."""

    def __init__(self, aead: Aead, volume_id: bytes) -> None:
        self._aead = aead
        self._aad = _SYMLINK_AAD + volume_id

    def encrypt(self, target: bytes) -> str:
        """Return the backing target for *target*.

        Raises:
            TooLongError: the encrypted target would not fit the backing filesystem.
        """
        encoded = format.b64u_encode(self._aead.seal(target, self._aad))
        if len(encoded) > MAX_BACKING_TARGET:
            raise TooLongError("symlink target is too long")
        return encoded

    def decrypt(self, backing_target: str) -> bytes:
        """Return the plaintext target of a backing symlink.

        Raises:
            IntegrityError: the backing target was not made by :meth:`encrypt`.
        """
        try:
            sealed = format.b64u_decode(backing_target)
        except FormatError:
            raise IntegrityError("symlink target is not encrypted") from None
        return self._aead.open(sealed, self._aad)


class XattrTransform:
    """Encrypts and decrypts xattr names and values of the ``user.`` namespace."""

    def __init__(self, names: Siv, values: Aead, volume_id: bytes) -> None:
        self._names = names
        self._values = values
        self._volume_id = volume_id

    @staticmethod
    def is_stored(name: bytes) -> bool:
        """Tell whether an xattr name belongs to the one namespace dermfs stores."""
        return name.startswith(USER_PREFIX) and len(name) > len(USER_PREFIX)

    def encrypt_name(self, name: bytes) -> bytes:
        """Return the backing xattr name of a ``user.`` xattr name.

        Raises:
            ValueError: *name* is not in the ``user.`` namespace.
            TooLongError: the encrypted name is longer than the kernel's 255 bytes.
        """
        if not self.is_stored(name):
            raise ValueError("only user. xattrs are stored")
        suffix = self._names.encrypt(name[len(USER_PREFIX) :], [b"xattr"])
        backing = USER_PREFIX + format.b64u_encode(suffix).encode("ascii")
        if len(backing) > 255:
            raise TooLongError("xattr name is too long")
        return backing

    def decrypt_name(self, backing_name: bytes) -> bytes:
        """Return the plaintext name of a backing xattr name.

        Raises:
            IntegrityError: *backing_name* was not made by :meth:`encrypt_name`.
        """
        if not backing_name.startswith(USER_PREFIX):
            raise IntegrityError("xattr name is not encrypted")
        try:
            sealed = format.b64u_decode(backing_name[len(USER_PREFIX) :].decode("ascii"))
        except (FormatError, UnicodeDecodeError):
            raise IntegrityError("xattr name is not encrypted") from None
        return USER_PREFIX + self._names.decrypt(sealed, [b"xattr"])

    def encrypt_value(self, object_id: bytes, backing_name: bytes, value: bytes) -> bytes:
        """Seal an xattr value, bound to its object (file or directory id) and name."""
        return self._values.seal(value, self._aad(object_id, backing_name))

    def decrypt_value(self, object_id: bytes, backing_name: bytes, sealed: bytes) -> bytes:
        """Open an xattr value sealed by :meth:`encrypt_value`.

        Raises:
            IntegrityError: the value was changed, or belongs to another object or name.
        """
        return self._values.open(sealed, self._aad(object_id, backing_name))

    def _aad(self, object_id: bytes, backing_name: bytes) -> bytes:
        return _XATTR_AAD + self._volume_id + object_id + backing_name
