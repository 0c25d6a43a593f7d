"""The name transform: plaintext file names to backing names and back.

Names are encrypted with AES-SIV under the ``NAMES`` subkey, with the parent directory's
id as associated data, and written as base64url (``docs/format.md`` section 6). A name
whose encoding is longer than the backing filesystem allows is stored under the hash of
its ciphertext, with the ciphertext in a sidecar file.
"""

from __future__ import annotations

from dataclasses import dataclass

from dermfs import format
from dermfs.cryptocore import Siv, digest
from dermfs.errors import FormatError, IntegrityError

#: Longest plaintext name the kernel passes us (NAME_MAX).
MAX_PLAINTEXT_NAME = 255


@dataclass(frozen=True)
class BackingName:
    """Where an entry lives in its backing directory.

    Attributes:
        entry: the backing name of the file, directory or symlink itself.
        sidecar: for a long name, the backing name of the file holding ``ciphertext``;
            ``None`` for a name that fits.
        ciphertext: the AES-SIV output, which a sidecar holds.
    """

    entry: str
    sidecar: str | None
    ciphertext: bytes

    @property
    def is_long(self) -> bool:
        """Whether this name needs a sidecar."""
        return self.sidecar is not None


class NameTransform:
    """Encrypts and decrypts the names of one volume."""

    def __init__(self, siv: Siv, max_backing_name: int = format.MAX_BACKING_NAME) -> None:
        self._siv = siv
        self._max_backing_name = max_backing_name

    def encrypt(self, dir_id: bytes, name: bytes) -> BackingName:
        """Return the backing name of *name* inside the directory *dir_id*.

        Args:
            dir_id: the parent directory's id.
            name: the plaintext name, as the kernel gave it (bytes, no ``/`` or NUL).

        Raises:
            ValueError: *name* is empty, ``.``, ``..``, or contains ``/`` or NUL.
        """
        if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
            raise ValueError("not a valid file name")

        ciphertext = self._siv.encrypt(name, [dir_id])
        encoded = format.b64u_encode(ciphertext)
        if len(encoded) <= self._max_backing_name:
            return BackingName(encoded, None, ciphertext)

        hashed = format.b64u_encode(digest(ciphertext))
        return BackingName(hashed + format.LONG_SUFFIX, hashed + format.SIDECAR_SUFFIX, ciphertext)

    def decrypt(self, dir_id: bytes, entry: str) -> bytes:
        """Return the plaintext of a short backing name.

        Raises:
            IntegrityError: *entry* is not a name encrypted for this directory.
        """
        try:
            ciphertext = format.b64u_decode(entry)
        except FormatError:
            raise IntegrityError("backing name is not an encrypted name") from None
        return self._siv.decrypt(ciphertext, [dir_id])

    def decrypt_long(self, dir_id: bytes, entry: str, sidecar: bytes) -> bytes:
        """Return the plaintext of a long name from its entry and its sidecar's contents.

        Raises:
            IntegrityError: the sidecar does not belong to *entry* or to this directory.
        """
        expected = format.b64u_encode(digest(sidecar)) + format.LONG_SUFFIX
        if entry != expected:
            raise IntegrityError("long-name sidecar does not match its entry")
        return self._siv.decrypt(sidecar, [dir_id])

    @staticmethod
    def sidecar_of(entry: str) -> str | None:
        """Return the sidecar name of a long-name entry, or ``None`` for other names."""
        if entry.endswith(format.LONG_SUFFIX) and not entry.startswith(format.TMP_PREFIX):
            return entry[: -len(format.LONG_SUFFIX)] + format.SIDECAR_SUFFIX
        return None

    @staticmethod
    def is_listed(entry: str) -> bool:
        """Tell whether a backing entry stands for a plaintext entry of its directory."""
        return not format.is_reserved_name(entry) or NameTransform.sidecar_of(entry) is not None
