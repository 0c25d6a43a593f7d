"""The ``pkcs11`` key provider: an AES wrapping key that never leaves an HSM.

The configuration names the PKCS#11 module, the token (by label), the wrapping key (by
label) and a PIN file. Each wrap or unwrap loads the module, finds the token, opens a
session, logs in with the PIN, does its work and logs out again.

Wrap
    ``C_WrapKey`` with ``CKM_AES_KEY_WRAP`` (RFC 3394, mechanism 0x2109) under the wrapping
    key. The wrapped key is a temporary session object (``CKO_SECRET_KEY``,
    ``CKK_GENERIC_SECRET``, destroyed right after) whose value is 48 bytes::

        volume_key (32) || SHA-256(b"dermfs v1 pkcs11 wrap" || volume_id)[:16]

    RFC 3394 wraps multiples of 8 bytes without padding, so the padded variant, whose
    mechanism number differs between SoftHSM2 (0x210A) and PKCS#11 3.1 (0x210B), is not
    needed. RFC 3394 has no associated data; the 16-byte suffix binds the volume id
    instead. Inside the wrap it is covered by RFC 3394's integrity check, so it cannot be
    changed without the wrapping key, and :meth:`Pkcs11Provider.unwrap` refuses a value
    whose suffix is not this volume's. The result is 56 bytes.

    ``C_Encrypt`` with ``CKM_AES_KEY_WRAP`` would avoid the session object, but SoftHSM2
    does not offer that mechanism for encryption, and ``C_WrapKey`` is what HSMs support
    for it.

Unwrap
    ``C_UnwrapKey`` into a session object that is neither sensitive nor a token object,
    whose ``CKA_VALUE`` is read into the daemon's memory and which is then destroyed.

Before a wrap the wrapping key is checked: it must be sensitive and not extractable.

Caveats:

- HSMs in a strict FIPS mode may refuse to create a non-sensitive secret object, or to
  read its value; such HSMs cannot give a key to a host process at all, and this
  provider cannot use them.
- The PIN is read from its file at every wrap or unwrap and kept only for that call. A
  wrong PIN is never retried, because tokens lock after a few wrong attempts.
- The module is finalised by :meth:`Pkcs11Provider.wipe`, so that the mount daemon holds
  no HSM session after the volume key was fetched.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from dermfs.config import Pkcs11KmsConfig
from dermfs.cryptocore import KEY_SIZE, SecretKey, digest
from dermfs.errors import FormatError, KeyProviderError, WrongKeyError
from dermfs.keys.base import KeyProvider, WrappedKey
from dermfs.keys.secretfile import read_secret_file

log = logging.getLogger(__name__)

PROVIDER = "pkcs11"
MECHANISM_NAME = "CKM_AES_KEY_WRAP"
BINDING_LABEL = b"dermfs v1 pkcs11 wrap"
BINDING_SIZE = 16
#: Bytes of a wrapped volume key: the 48-byte value plus RFC 3394's 8-byte check.
WRAPPED_SIZE = KEY_SIZE + BINDING_SIZE + 8
_KEY_VERSION = 1
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 5.0
#: Errors that may pass: a token not plugged in yet, a network HSM not answering.
_TRANSIENT = (
    p11.NoSuchToken,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.DeviceError,
    p11.DeviceRemoved,
    p11.SessionCount,
)
#: What tokens answer when RFC 3394's integrity check fails; SoftHSM2 says GeneralError.
_UNWRAP_REFUSED = (
    p11.WrappedKeyInvalid,
    p11.WrappedKeyLenRange,
    p11.EncryptedDataInvalid,
    p11.DataInvalid,
    p11.GeneralError,
)
#: Attributes of the temporary object that carries the volume key through the HSM.
_CARRIER_TEMPLATE = {
    Attribute.TOKEN: False,
    Attribute.SENSITIVE: False,
    Attribute.EXTRACTABLE: True,
}

_T = TypeVar("_T")


def from_config(kms: Pkcs11KmsConfig, *, passphrase_stdin: TextIO | None = None) -> KeyProvider:
    """Make the provider a ``kms`` section of provider ``pkcs11`` describes.

    Nothing is loaded or read until the first wrap or unwrap.

    Args:
        kms: the checked configuration.
        passphrase_stdin: not used by this provider.

    Returns:
        A :class:`Pkcs11Provider`.
    """
    return Pkcs11Provider(kms)


def binding(volume_id: bytes) -> bytes:
    """Return the 16 bytes that tie a wrapped volume key to the volume *volume_id*."""
    return digest(BINDING_LABEL + volume_id)[:BINDING_SIZE]


class Pkcs11Provider:
    """The ``pkcs11`` provider; see the module docstring."""

    name = PROVIDER

    def __init__(self, config: Pkcs11KmsConfig, *, sleep: Callable[[float], None] = time.sleep):
        """Make a provider for *config*; nothing is loaded yet.

        Args:
            config: the ``kms`` section.
            sleep: how to wait between attempts.
        """
        self._config = config
        self._sleep = sleep
        self._lib: Any = None

    def __repr__(self) -> str:
        return f"<Pkcs11Provider {self.describe()}>"

    def describe(self) -> str:
        """Say which module and token this is."""
        return f"PKCS#11 module {self._config.module}, token {self._config.token_label}"

    def wrap(self, volume_key: SecretKey, volume_id: bytes) -> WrappedKey:
        """Wrap *volume_key* under the configured key, binding *volume_id*.

        Raises:
            InsecureFileError: the PIN file is readable by others.
            WrongKeyError: the PIN is wrong.
            KeyProviderError: the module, token or key is missing or unusable, or the key
                can be extracted from the token.
        """
        label = self._config.key_label
        value = volume_key.reveal() + binding(volume_id)

        def wrap_in(session: Any) -> bytes:
            key = self._find_key(session, label)
            if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
                raise KeyProviderError(
                    f"{self.describe()}: key {label} can be extracted from the token; dermfs "
                    "needs a key with CKA_EXTRACTABLE false and CKA_SENSITIVE true"
                )
            carrier = session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                    Attribute.VALUE: value,
                    **_CARRIER_TEMPLATE,
                }
            )
            try:
                wrapped: bytes = key.wrap_key(carrier, mechanism=Mechanism.AES_KEY_WRAP)
            finally:
                carrier.destroy()
            return wrapped

        blob = self._with_session(f"wrap with key {label}", wrap_in)
        log.debug("wrapped the volume key under HSM key %s", label)
        return WrappedKey(PROVIDER, label, _KEY_VERSION, blob, {"mechanism": MECHANISM_NAME})

    def unwrap(self, wrapped: WrappedKey, volume_id: bytes) -> SecretKey:
        """Unwrap a volume key that :meth:`wrap` made for the volume *volume_id*.

        Raises:
            WrongKeyError: the PIN is wrong, or the key does not unwrap this volume's key.
            FormatError: *wrapped* is malformed.
            InsecureFileError: the PIN file is readable by others.
            KeyProviderError: the module, token or key is missing or unusable.
        """
        _check_wrapped(wrapped)
        label = wrapped.key_name

        def unwrap_in(session: Any) -> bytes:
            key = self._find_key(session, label)
            try:
                carrier = key.unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.GENERIC_SECRET,
                    wrapped.blob,
                    mechanism=Mechanism.AES_KEY_WRAP,
                    store=False,
                    template=_CARRIER_TEMPLATE,
                )
            except _UNWRAP_REFUSED:
                raise self._not_this_volume(label) from None
            try:
                value: bytes = carrier[Attribute.VALUE]
            finally:
                carrier.destroy()
            return value

        value = self._with_session(f"unwrap with key {label}", unwrap_in)
        material, suffix = value[:KEY_SIZE], value[KEY_SIZE:]
        if len(value) != KEY_SIZE + BINDING_SIZE or not hmac.compare_digest(
            suffix, binding(volume_id)
        ):
            raise self._not_this_volume(label)
        log.debug("unwrapped the volume key with HSM key %s", label)
        return SecretKey(material)

    def wipe(self) -> None:
        """Finalise the module, so that this process keeps no session with the token."""
        if self._lib is not None:
            try:
                self._lib.finalize()
            except p11.PKCS11Error as exc:
                log.debug("finalising %s failed: %s", self._config.module, type(exc).__name__)
            self._lib = None

    # -------------------------------------------------------------------------- sessions

    def _with_session(self, operation: str, work: Callable[[Any], _T]) -> _T:
        """Log in to the token and run *work* in a session, retrying a missing token."""
        started = time.monotonic()
        deadline = started + self._config.retry_seconds
        backoff = FIRST_BACKOFF
        attempts = 0
        while True:
            attempts += 1
            try:
                with self._session() as session:
                    return work(session)
            except _TRANSIENT as exc:
                cause = _transient_cause(exc, self._config.token_label)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KeyProviderError(
                        f"{self.describe()}: {cause} (gave up after {attempts} "
                        f"attempt{'s' if attempts > 1 else ''} in "
                        f"{time.monotonic() - started:.0f} s)"
                    ) from None
                if attempts == 1:
                    log.info(
                        "%s: %s; retrying for up to %.0f s",
                        self.describe(),
                        cause,
                        self._config.retry_seconds,
                    )
                self._sleep(min(backoff, remaining))
                backoff = min(backoff * 2, MAX_BACKOFF)
            except p11.PinIncorrect:
                raise WrongKeyError(
                    f"{self.describe()}: wrong PIN (from {self._config.pin_file})"
                ) from None
            except (p11.PinLocked, p11.PinExpired):
                raise KeyProviderError(
                    f"{self.describe()}: the user PIN is locked or expired; the token's "
                    "security officer must reset it"
                ) from None
            except p11.MechanismInvalid:
                raise KeyProviderError(
                    f"{self.describe()}: the token does not offer {MECHANISM_NAME} "
                    "(RFC 3394 key wrap)"
                ) from None
            except p11.PKCS11Error as exc:
                raise KeyProviderError(
                    f"{self.describe()}: {operation} failed ({_error_name(exc)})"
                ) from None

    @contextmanager
    def _session(self) -> Iterator[Any]:
        pin = self._read_pin()
        token = self._load().get_token(token_label=self._config.token_label)
        with token.open(user_pin=pin) as session:
            yield session

    def _load(self) -> Any:
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(str(self._config.module))
            except p11.PKCS11Error as exc:
                detail = str(exc).rpartition(": ")[2] or _error_name(exc)
                raise KeyProviderError(
                    f"cannot load PKCS#11 module {self._config.module}: {detail}"
                ) from None
        return self._lib

    def _read_pin(self) -> str:
        data = read_secret_file(self._config.pin_file, "PIN file")
        if data.endswith(b"\n"):
            data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
        if not data:
            raise KeyProviderError(f"PIN file {self._config.pin_file} is empty")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyProviderError(f"PIN file {self._config.pin_file} is not UTF-8") from None

    def _find_key(self, session: Any, label: str) -> Any:
        try:
            return session.get_key(
                object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=label
            )
        except p11.NoSuchKey:
            raise KeyProviderError(
                f"{self.describe()}: no AES key labelled {label} on the token"
            ) from None
        except p11.MultipleObjectsReturned:
            raise KeyProviderError(
                f"{self.describe()}: several AES keys are labelled {label}; labels must be unique"
            ) from None

    def _not_this_volume(self, label: str) -> WrongKeyError:
        return WrongKeyError(
            f"{self.describe()}: key {label} does not unwrap this volume's key (another "
            "key of that label, another volume's wrapped key, or the volume file was changed)"
        )


# ------------------------------------------------------------------------------ admin


def create_wrapping_key(module: Path, token_label: str, pin: str, key_label: str) -> None:
    """Generate an AES-256 wrapping key on a token, for administrators and tests.

    The key is a token object, private, sensitive and not extractable, and may wrap,
    unwrap, encrypt and decrypt. An HSM's own tools, or OpenSC's ``pkcs11-tool
    --keygen --key-type AES:32``, can make such a key too (docs/kms.md section 4);
    :meth:`Pkcs11Provider.wrap` refuses one that is extractable or not sensitive.

    Args:
        module: the PKCS#11 module.
        token_label: the token's label.
        pin: the user PIN.
        key_label: the new key's label; no secret key on the token may have it already.

    Raises:
        KeyProviderError: the module or token is missing, the PIN is wrong, the label is
            taken, or the token refused.
    """
    try:
        token = pkcs11.lib(str(module)).get_token(token_label=token_label)
        with token.open(user_pin=pin, rw=True) as session:
            taken = list(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_label}
                )
            )
            if taken:
                raise KeyProviderError(
                    f"token {token_label} already has a key labelled {key_label}"
                )
            session.generate_key(
                KeyType.AES,
                256,
                label=key_label,
                store=True,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.WRAP: True,
                    Attribute.UNWRAP: True,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                },
            )
    except p11.PKCS11Error as exc:
        raise KeyProviderError(
            f"cannot create key {key_label} on token {token_label} of {module}: {_error_name(exc)}"
        ) from None
    log.info("created wrapping key %s on token %s", key_label, token_label)


# ------------------------------------------------------------------------------ helpers


def _check_wrapped(wrapped: WrappedKey) -> None:
    if wrapped.provider != PROVIDER:
        raise KeyProviderError(
            f"the volume key is wrapped by key provider {wrapped.provider}, not {PROVIDER}"
        )
    if dict(wrapped.params) != {"mechanism": MECHANISM_NAME}:
        raise FormatError("volume file: unknown wrapping mechanism for key provider pkcs11")
    if wrapped.key_version != _KEY_VERSION:
        raise FormatError("volume file: key provider pkcs11 has only key version 1")
    if len(wrapped.blob) != WRAPPED_SIZE:
        raise FormatError("volume file: the wrapped volume key has the wrong length")


def _transient_cause(exc: p11.PKCS11Error, token_label: str) -> str:
    if isinstance(exc, p11.NoSuchToken):
        return f"no token labelled {token_label}"
    if isinstance(exc, p11.TokenNotPresent | p11.DeviceRemoved):
        return "the token is not present"
    return f"the device failed ({_error_name(exc)})"


def _error_name(exc: BaseException) -> str:
    """Name a PKCS#11 error by its class, which python-pkcs11 names after the CKR_ code."""
    return type(exc).__name__
