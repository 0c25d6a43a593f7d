"""The crypto core: the only module of dermfs that touches ``cryptography.hazmat``.

Everything the rest of the package needs is here, behind small objects that make misuse
hard:

- nonces are made inside this module, from the operating system's random source; only
  the private ``_seal_with_nonce`` helpers, which the known-answer tests use, accept one;
- verification raises :class:`~dermfs.errors.IntegrityError` and never returns a flag,
  and every failure raises that same exception;
- each purpose gets its own subkey, derived from the volume key with HKDF-SHA256 and a
  label of its own (:class:`Purpose`).

Caveats:

- Python cannot reliably wipe memory. Keys are kept in ``bytearray`` objects where we own
  them and zeroed on :meth:`SecretKey.wipe`, but the ``cryptography`` objects built from
  them keep copies we cannot reach. Wiping is therefore best effort.
"""

from __future__ import annotations

import enum
import hmac
import os
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from dermfs.errors import IntegrityError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
#: Bytes an AES-GCM seal adds to its plaintext: the nonce in front, the tag behind.
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE
ID_SIZE = 16
MAC_SIZE = 32


class Purpose(enum.Enum):
    """HKDF labels, one per use of the volume key. Never reuse or rename a label."""

    HEADER = b"dermfs v1 file header wrapping"
    NAMES = b"dermfs v1 file names"
    SYMLINKS = b"dermfs v1 symlink targets"
    XATTR_NAMES = b"dermfs v1 xattr names"
    XATTR_VALUES = b"dermfs v1 xattr values"
    VOLUME_FILE = b"dermfs v1 volume file mac"
    INTENT_LOG = b"dermfs v1 intent log mac"
    AUDIT = b"dermfs v1 audit journal"


#: Subkey lengths. AES-SIV-256 takes a 512-bit key (two AES-256 keys).
_SUBKEY_LENGTH = {
    Purpose.NAMES: 64,
    Purpose.XATTR_NAMES: 64,
}


class SecretKey:
    """Raw key bytes that stay out of ``repr``, logs and exception messages."""

    __slots__ = ("_material",)

    def __init__(self, material: bytes | bytearray) -> None:
        self._material = bytearray(material)

    def __repr__(self) -> str:
        return f"<SecretKey {len(self._material) * 8} bits>"

    def __len__(self) -> int:
        return len(self._material)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretKey):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material)

    __hash__ = None  # type: ignore[assignment]

    def reveal(self) -> bytes:
        """Return the key bytes, for handing to a cipher or a key provider."""
        return bytes(self._material)

    def wipe(self) -> None:
        """Overwrite the key bytes with zeros (best effort, see the module caveats)."""
        for index in range(len(self._material)):
            self._material[index] = 0


def random_key() -> SecretKey:
    """Return a fresh random 256-bit key."""
    return SecretKey(os.urandom(KEY_SIZE))


def random_id() -> bytes:
    """Return a fresh random 128-bit identifier (volume, file or directory id)."""
    return os.urandom(ID_SIZE)


def random_bytes(count: int) -> bytes:
    """Return *count* bytes from the operating system's random source (salts)."""
    return os.urandom(count)


def derive_subkey(volume_key: SecretKey, purpose: Purpose, volume_id: bytes) -> SecretKey:
    """Derive the subkey for *purpose* from the volume key.

    Args:
        volume_key: the volume key.
        purpose: which use the subkey is for; each has its own HKDF label.
        volume_id: the volume's id, used as the HKDF salt.

    Returns:
        A 256-bit subkey, or 512 bits for the AES-SIV purposes.
    """
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=_SUBKEY_LENGTH.get(purpose, KEY_SIZE),
        salt=volume_id,
        info=purpose.value,
    )
    return SecretKey(hkdf.derive(volume_key.reveal()))


def expand_subkey(key: SecretKey, label: bytes, length: int = KEY_SIZE) -> SecretKey:
    """Derive a key for one narrower use from a subkey (HKDF-SHA256, no salt).

    Args:
        key: a subkey from :func:`derive_subkey`, or a random key.
        label: what the derived key is for; never reuse a label for another use.
        length: bytes of key to derive.
    """
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label)
    return SecretKey(hkdf.derive(key.reveal()))


class Aead:
    """AES-256-GCM under one key, with a fresh random nonce for every seal.

    A sealed blob is ``nonce (12) || ciphertext || tag (16)``.
    """

    __slots__ = ("_cipher",)

    def __init__(self, key: SecretKey) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 256-bit key")
        self._cipher = AESGCM(key.reveal())

    def __repr__(self) -> str:
        return "<Aead AES-256-GCM>"

    def seal(self, plaintext: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        """Encrypt and authenticate *plaintext*, binding *aad*.

        Args:
            plaintext: the bytes to protect.
            aad: associated data that must be given again to :meth:`open`.

        Returns:
            ``nonce || ciphertext || tag``.
        """
        return self._seal_with_nonce(os.urandom(NONCE_SIZE), plaintext, aad)

    def _seal_with_nonce(
        self, nonce: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes
    ) -> bytes:
        """Seal with a caller's nonce. Only the known-answer tests may call this."""
        return nonce + self._cipher.encrypt(nonce, plaintext, aad)

    def seal_into(
        self, plaintext: bytes | bytearray | memoryview, aad: bytes, out: memoryview
    ) -> None:
        """Seal like :meth:`seal`, writing ``nonce || ciphertext || tag`` into *out*.

        *out* must be exactly ``len(plaintext) + SEAL_OVERHEAD`` bytes long. This saves the
        copies of :meth:`seal` on the content layer's hot path.
        """
        nonce = os.urandom(NONCE_SIZE)
        out[:NONCE_SIZE] = nonce
        self._cipher.encrypt_into(nonce, plaintext, aad, out[NONCE_SIZE:])

    def open_into(
        self, sealed: bytes | bytearray | memoryview, aad: bytes, out: memoryview
    ) -> None:
        """Open like :meth:`open`, writing the plaintext into *out*.

        *out* must be exactly ``len(sealed) - SEAL_OVERHEAD`` bytes long. On failure its
        contents are unspecified and must not be used.

        Raises:
            IntegrityError: the blob is too short, was changed, or *aad* differs.
        """
        if len(sealed) < SEAL_OVERHEAD:
            raise IntegrityError("sealed data is too short")
        view = memoryview(sealed)
        try:
            self._cipher.decrypt_into(view[:NONCE_SIZE], view[NONCE_SIZE:], aad, out)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None

    def open(self, sealed: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        """Verify and decrypt a blob made by :meth:`seal`.

        Raises:
            IntegrityError: the blob is too short, was changed, or *aad* differs.
        """
        if len(sealed) < SEAL_OVERHEAD:
            raise IntegrityError("sealed data is too short")
        view = memoryview(sealed)
        try:
            return self._cipher.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None


class Siv:
    """Deterministic authenticated encryption with AES-SIV (RFC 5297), for names.

    The same plaintext and associated data always give the same ciphertext, which is
    what lets a name be looked up without listing its directory. The output is
    ``tag (16) || ciphertext``.
    """

    __slots__ = ("_cipher",)

    def __init__(self, key: SecretKey) -> None:
        if len(key) != 2 * KEY_SIZE:
            raise ValueError("AES-SIV-256 needs a 512-bit key")
        self._cipher = AESSIV(key.reveal())

    def __repr__(self) -> str:
        return "<Siv AES-SIV-256>"

    def encrypt(self, plaintext: bytes, associated: list[bytes]) -> bytes:
        """Encrypt *plaintext*, binding each item of *associated*."""
        return self._cipher.encrypt(plaintext, associated)

    def decrypt(self, ciphertext: bytes, associated: list[bytes]) -> bytes:
        """Verify and decrypt what :meth:`encrypt` made.

        Raises:
            IntegrityError: the ciphertext was changed or *associated* differs.
        """
        if len(ciphertext) < TAG_SIZE:
            raise IntegrityError("sealed data is too short")
        try:
            return self._cipher.decrypt(ciphertext, associated)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None


class Mac:
    """HMAC-SHA256 under one key."""

    __slots__ = ("_key",)

    def __init__(self, key: SecretKey) -> None:
        self._key = key.reveal()

    def __repr__(self) -> str:
        return "<Mac HMAC-SHA256>"

    def tag(self, data: bytes) -> bytes:
        """Return the 32-byte tag of *data*."""
        return hmac.new(self._key, data, sha256).digest()

    def verify(self, data: bytes, tag: bytes) -> None:
        """Check *tag* against *data* in constant time.

        Raises:
            IntegrityError: the tag does not match.
        """
        if not hmac.compare_digest(self.tag(data), tag):
            raise IntegrityError("authentication failed")


def digest(data: bytes) -> bytes:
    """Return the SHA-256 digest of *data* (not keyed; for names of long-name files)."""
    return sha256(data).digest()


def kek_from_scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> SecretKey:
    """Derive a 256-bit key-encryption key from a passphrase with scrypt.

    Args:
        passphrase: the passphrase bytes.
        salt: a random salt, stored beside the wrapped key.
        n: CPU and memory cost, a power of two.
        r: block size.
        p: parallelism.
    """
    kdf = Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p)
    return SecretKey(kdf.derive(passphrase))


def kek_from_argon2id(
    passphrase: bytes, salt: bytes, iterations: int, memory_kib: int, lanes: int
) -> SecretKey:
    """Derive a 256-bit key-encryption key from a passphrase with Argon2id.

    Args:
        passphrase: the passphrase bytes.
        salt: a random salt of at least 8 bytes, stored beside the wrapped key.
        iterations: time cost.
        memory_kib: memory cost in KiB.
        lanes: parallelism.
    """
    kdf = Argon2id(
        salt=salt, length=KEY_SIZE, iterations=iterations, lanes=lanes, memory_cost=memory_kib
    )
    return SecretKey(kdf.derive(passphrase))


def wrap_key(kek: SecretKey, key: SecretKey, aad: bytes) -> bytes:
    """Wrap *key* under *kek* with AES-256-GCM, binding *aad*.

    Returns:
        ``nonce || wrapped key || tag`` (60 bytes for a 256-bit key).
    """
    return Aead(kek).seal(key.reveal(), aad)


def unwrap_key(kek: SecretKey, wrapped: bytes, aad: bytes) -> SecretKey:
    """Undo :func:`wrap_key`.

    Raises:
        IntegrityError: wrong *kek*, changed blob, or different *aad*.
    """
    return SecretKey(Aead(kek).open(wrapped, aad))
