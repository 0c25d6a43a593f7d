"""The ``local`` key provider: a key-encryption key from a key file or from a passphrase.

Key file
    Exactly 32 raw bytes, the key-encryption key (KEK) itself (``docs/format.md`` section
    2.1): no hex, no base64, no trailing newline. :func:`create_keyfile` makes one with
    mode 0600. A key file whose mode grants anything to group or others is refused, and
    so is one of any other length.

Passphrase
    Read from a passphrase file (the same mode rule; one trailing newline is dropped, the
    bytes are used as they are) or from a stream, normally standard input: one line,
    encoded as UTF-8; when the stream is a terminal, a prompt without echo instead, asked
    twice when a new wrap is made. The KEK is derived with Argon2id (default) or scrypt
    and a fresh 16-byte salt for each wrap; the KDF's name, parameters and salt are kept
    in the wrapped key's ``params``, so unwrapping never depends on the configuration's
    KDF settings.

Both wrap the volume key with AES-256-GCM under the KEK, with
``AAD = b"dermfs v1 local wrap" || volume_id``, so a wrapped key copied from another
volume does not unwrap.

Caveats:

- A passphrase provider keeps the passphrase in memory from its first use until
  :meth:`PassphraseProvider.wipe`, because standard input can be read only once. Wiping
  is best effort (see :mod:`dermfs.cryptocore`).
"""

from __future__ import annotations

import getpass
import hmac
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

from dermfs import format
from dermfs.config import LocalKmsConfig
from dermfs.cryptocore import (
    KEY_SIZE,
    SEAL_OVERHEAD,
    SecretKey,
    random_bytes,
    random_key,
    unwrap_key,
    wrap_key,
)
from dermfs.errors import FormatError, IntegrityError, KeyProviderError, WrongKeyError
from dermfs.keys.base import KeyProvider, WrappedKey
from dermfs.keys.kdf import DEFAULT_KDF, DEFAULT_PARAMS, KDFS, SALT_SIZE, check_params, derive
from dermfs.keys.secretfile import create_secret_file, read_secret_file

log = logging.getLogger(__name__)

PROVIDER = "local"
KEYFILE_SIZE = KEY_SIZE
WRAP_AAD_LABEL = b"dermfs v1 local wrap"
KEY_NAME_KEYFILE = "keyfile"
KEY_NAME_PASSPHRASE = "passphrase"
_KEY_VERSION = 1
_WRAPPED_SIZE = KEY_SIZE + SEAL_OVERHEAD


def from_config(kms: LocalKmsConfig, *, passphrase_stdin: TextIO | None = None) -> KeyProvider:
    """Make the provider a ``kms`` section of provider ``local`` describes.

    Args:
        kms: the checked configuration.
        passphrase_stdin: the stream to read the passphrase from when the configuration
            says ``passphrase_file: '-'``; normally ``sys.stdin``.

    Returns:
        A :class:`KeyFileProvider` or a :class:`PassphraseProvider`. Nothing is read yet.

    Raises:
        KeyProviderError: the passphrase comes from standard input but there is none.
    """
    if kms.keyfile is not None:
        return KeyFileProvider(kms.keyfile)

    source: PassphraseSource
    if kms.passphrase_file is not None:
        source = PassphraseFile(kms.passphrase_file)
    elif passphrase_stdin is not None:
        source = PassphraseStream(passphrase_stdin)
    else:
        raise KeyProviderError(
            "the configuration reads the passphrase from standard input, but there is none"
        )
    return PassphraseProvider(source, kms.kdf, kms.kdf_params)


# ------------------------------------------------------------------------------ key file


def create_keyfile(path: Path) -> None:
    """Create a key file of 32 random bytes at *path*, mode 0600, whatever the umask.

    Args:
        path: where to create it; the directory must exist and the file must not.

    Raises:
        KeyProviderError: the file exists already, or cannot be created or written.
    """
    key = random_key()
    try:
        create_secret_file(path, key.reveal(), "key file")
    finally:
        key.wipe()


def read_keyfile(path: Path) -> SecretKey:
    """Return the key-encryption key held in the key file at *path*.

    Raises:
        InsecureFileError: the file's mode grants group or others any access.
        KeyProviderError: the file is missing, unreadable, or not exactly 32 bytes.
    """
    data = read_secret_file(path, "key file")
    if len(data) != KEYFILE_SIZE:
        raise KeyProviderError(
            f"key file {path} is {len(data)} bytes long; a dermfs key file is "
            f"{KEYFILE_SIZE} raw bytes"
        )
    return SecretKey(data)


class KeyFileProvider:
    """The ``local`` provider with a key file: the file's 32 bytes are the KEK."""

    name = PROVIDER

    def __init__(self, path: Path) -> None:
        self._path = path

    def __repr__(self) -> str:
        return f"<KeyFileProvider {self._path}>"

    def describe(self) -> str:
        """Say which key file this is."""
        return f"key file {self._path}"

    def wrap(self, volume_key: SecretKey, volume_id: bytes) -> WrappedKey:
        """Wrap *volume_key* under the key file's key, binding *volume_id*.

        Raises:
            InsecureFileError: the key file is readable by others.
            KeyProviderError: the key file is missing, unreadable, or the wrong length.
        """
        kek = read_keyfile(self._path)
        try:
            blob = wrap_key(kek, volume_key, _wrap_aad(volume_id))
        finally:
            kek.wipe()

        return WrappedKey(PROVIDER, KEY_NAME_KEYFILE, _KEY_VERSION, blob, {})

    def unwrap(self, wrapped: WrappedKey, volume_id: bytes) -> SecretKey:
        """Unwrap a volume key that :meth:`wrap` made for the volume *volume_id*.

        Raises:
            WrongKeyError: the key file is not this volume's, or the volume uses a
                passphrase.
            FormatError: *wrapped* is malformed.
            InsecureFileError: the key file is readable by others.
            KeyProviderError: the key file is missing, unreadable, or the wrong length.
        """
        _check_wrapped(wrapped, KEY_NAME_KEYFILE)
        if wrapped.params:
            raise FormatError("volume file: a key file's wrapped key has KDF parameters")

        kek = read_keyfile(self._path)
        return _unwrap(kek, wrapped, volume_id, "wrong key file for this volume")


# ------------------------------------------------------------------------------ passphrase


class PassphraseSource(Protocol):
    """Where a passphrase comes from."""

    def describe(self) -> str:
        """Say where the passphrase comes from, for messages."""
        ...

    def read(self, confirm: bool) -> SecretKey:
        """Return the passphrase; ask twice if *confirm* and a person is typing it.

        Raises:
            InsecureFileError: a passphrase file is readable by others.
            KeyProviderError: no passphrase could be read, or it is empty.
        """
        ...


class PassphraseFile:
    """A passphrase kept in a file; one trailing newline is not part of it."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def describe(self) -> str:
        """Say which file holds the passphrase."""
        return f"passphrase file {self._path}"

    def read(self, confirm: bool) -> SecretKey:
        """Return the passphrase in the file (*confirm* does not apply to a file).

        Raises:
            InsecureFileError: the file is readable by others.
            KeyProviderError: the file is missing, unreadable, or holds no passphrase.
        """
        passphrase = _strip_newline(read_secret_file(self._path, "passphrase file"))
        if not passphrase:
            raise KeyProviderError(f"passphrase file {self._path} is empty")
        return SecretKey(passphrase)


class PassphraseStream:
    """A passphrase read as one line from a stream, or typed at a prompt on a terminal."""

    def __init__(self, stream: TextIO, prompt: Callable[[str], str] = getpass.getpass) -> None:
        self._stream = stream
        self._prompt = prompt

    def describe(self) -> str:
        """Say that the passphrase comes from standard input."""
        return "passphrase from standard input"

    def read(self, confirm: bool) -> SecretKey:
        """Return the passphrase: prompt on a terminal, else read one line.

        Args:
            confirm: on a terminal, ask a second time and require the same answer.

        Raises:
            KeyProviderError: end of input, a read error, an empty passphrase, or two
                different answers.
        """
        try:
            text = self._ask(confirm) if self._stream.isatty() else self._read_line()
        except (EOFError, OSError, ValueError):
            raise KeyProviderError("could not read the passphrase from standard input") from None

        passphrase = _strip_newline(_encode(text))
        if not passphrase:
            raise KeyProviderError("the passphrase is empty")
        return SecretKey(passphrase)

    def _ask(self, confirm: bool) -> str:
        text = self._prompt("New passphrase: " if confirm else "Passphrase: ")
        if confirm:
            again = self._prompt("Repeat the passphrase: ")
            if not hmac.compare_digest(_encode(text), _encode(again)):
                raise KeyProviderError("the two passphrases differ")
        return text

    def _read_line(self) -> str:
        line = self._stream.readline()
        if not line:
            raise KeyProviderError("no passphrase on standard input")
        return line


class PassphraseProvider:
    """The ``local`` provider with a passphrase: the KEK is derived with scrypt or Argon2id."""

    name = PROVIDER

    def __init__(
        self,
        source: PassphraseSource,
        kdf: str = DEFAULT_KDF,
        kdf_params: Mapping[str, int] | None = None,
    ) -> None:
        """Make a provider that reads the passphrase from *source* when first needed.

        Args:
            source: where the passphrase comes from.
            kdf: the KDF for new wraps, ``argon2id`` or ``scrypt``.
            kdf_params: all of that KDF's parameters; its defaults when ``None``.

        Raises:
            FormatError: *kdf* is unknown or *kdf_params* are not valid for it.
        """
        self._source = source
        self._kdf = kdf
        self._kdf_params = check_params(
            kdf, DEFAULT_PARAMS.get(kdf, {}) if kdf_params is None else kdf_params
        )
        self._passphrase: SecretKey | None = None

    def __repr__(self) -> str:
        return f"<PassphraseProvider {self._kdf}, {self._source.describe()}>"

    def describe(self) -> str:
        """Say where the passphrase comes from."""
        return self._source.describe()

    def wrap(self, volume_key: SecretKey, volume_id: bytes) -> WrappedKey:
        """Wrap *volume_key* under a KEK derived from the passphrase with a new salt.

        Raises:
            InsecureFileError: the passphrase file is readable by others.
            KeyProviderError: no passphrase could be read.
        """
        passphrase = self._get_passphrase(confirm=True)
        salt = random_bytes(SALT_SIZE)

        kek = derive(self._kdf, passphrase, salt, self._kdf_params)
        try:
            blob = wrap_key(kek, volume_key, _wrap_aad(volume_id))
        finally:
            kek.wipe()

        params: dict[str, Any] = {"kdf": self._kdf, "salt": format.b64u_encode(salt)}
        params.update(self._kdf_params)
        return WrappedKey(PROVIDER, KEY_NAME_PASSPHRASE, _KEY_VERSION, blob, params)

    def unwrap(self, wrapped: WrappedKey, volume_id: bytes) -> SecretKey:
        """Unwrap a volume key that :meth:`wrap` made for the volume *volume_id*.

        The KDF and its parameters come from *wrapped*, not from the configuration.

        Raises:
            WrongKeyError: the passphrase is not this volume's, or the volume uses a key
                file.
            FormatError: *wrapped* is malformed or names an unknown KDF.
            InsecureFileError: the passphrase file is readable by others.
            KeyProviderError: no passphrase could be read.
        """
        _check_wrapped(wrapped, KEY_NAME_PASSPHRASE)
        kdf, salt, kdf_params = _parse_params(wrapped.params)
        passphrase = self._get_passphrase(confirm=False)

        kek = derive(kdf, passphrase, salt, kdf_params)
        return _unwrap(kek, wrapped, volume_id, "wrong passphrase")

    def wipe(self) -> None:
        """Forget the passphrase (best effort); a later use reads it again."""
        if self._passphrase is not None:
            self._passphrase.wipe()
            self._passphrase = None

    def _get_passphrase(self, confirm: bool) -> SecretKey:
        if self._passphrase is None:
            self._passphrase = self._source.read(confirm)
            log.debug("read the %s", self._source.describe())
        return self._passphrase


# ------------------------------------------------------------------------------ helpers


def _wrap_aad(volume_id: bytes) -> bytes:
    return WRAP_AAD_LABEL + volume_id


def _unwrap(kek: SecretKey, wrapped: WrappedKey, volume_id: bytes, message: str) -> SecretKey:
    try:
        return unwrap_key(kek, wrapped.blob, _wrap_aad(volume_id))
    except IntegrityError:
        raise WrongKeyError(message) from None
    finally:
        kek.wipe()


_KEY_KINDS = {KEY_NAME_KEYFILE: "a key file", KEY_NAME_PASSPHRASE: "a passphrase"}


def _check_wrapped(wrapped: WrappedKey, key_name: str) -> None:
    if wrapped.provider != PROVIDER:
        raise KeyProviderError(
            f"the volume key is wrapped by key provider {wrapped.provider}, not {PROVIDER}"
        )
    if wrapped.key_name not in _KEY_KINDS:
        raise FormatError("volume file: unknown key name for key provider local")
    if wrapped.key_name != key_name:
        raise WrongKeyError(
            f"the volume key is wrapped with {_KEY_KINDS[wrapped.key_name]}, but the "
            f"configuration gives {_KEY_KINDS[key_name]}"
        )
    if wrapped.key_version != _KEY_VERSION:
        raise FormatError("volume file: key provider local has only key version 1")
    if len(wrapped.blob) != _WRAPPED_SIZE:
        raise FormatError("volume file: the wrapped volume key has the wrong length")


def _parse_params(params: Mapping[str, Any]) -> tuple[str, bytes, dict[str, int]]:
    kdf = params.get("kdf")
    if not isinstance(kdf, str) or kdf not in KDFS:
        raise FormatError("volume file: the wrapped key names an unknown passphrase KDF")
    salt_text = params.get("salt")
    if not isinstance(salt_text, str):
        raise FormatError("volume file: the wrapped key has no salt")
    salt = format.b64u_decode(salt_text)
    if len(salt) != SALT_SIZE:
        raise FormatError("volume file: the wrapped key's salt has the wrong length")

    rest = {name: value for name, value in params.items() if name not in ("kdf", "salt")}
    try:
        kdf_params = check_params(kdf, rest, where="keys[].params.")
    except FormatError as exc:
        raise FormatError(f"volume file: {exc}") from None
    return kdf, salt, kdf_params


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _strip_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data
