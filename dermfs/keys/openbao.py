"""The ``openbao`` key provider: OpenBao (or HashiCorp Vault) Transit.

Wrap
    Transit ``encrypt`` of the base64 volume key under the configured Transit key, with
    ``associated_data`` = base64(volume id). The blob stored in the volume file is the
    ciphertext string (``vault:vN:...``), the key name is the Transit key's, and the key
    version is the ``N`` of that string. Before a new wrap is handed back it is checked:
    decrypting it must give the volume key back, and decrypting it with another volume
    id must be refused. A Transit key that ignores associated data (a key type that is
    not AEAD) is therefore refused at ``init`` rather than trusted.

Unwrap
    Transit ``decrypt`` with the same associated data. A ciphertext of another volume,
    or one that was changed, fails to authenticate: :class:`~dermfs.errors.WrongKeyError`.

Rewrap
    Transit's ``rewrap`` endpoint takes no associated data (OpenBao 2.x decrypts and
    re-encrypts with none), so it cannot rewrap a ciphertext bound to a volume id: it
    answers "cipher: message authentication failed". ``dermfs rewrap`` therefore makes a
    fresh wrap with ``encrypt``, which uses the newest key version. It holds the volume
    key in any case, because the volume file's MAC has to be computed again.

Login
    ``token`` (a token file), ``approle`` (``role_id`` and a ``secret_id`` file) or
    ``cert`` (the TLS client certificate ``kms.client_cert``/``kms.client_key``). Each
    provider logs in once, at its first request, and keeps the token in memory until
    :meth:`OpenbaoProvider.wipe`. Credential files are read with
    :func:`~dermfs.keys.secretfile.read_secret_file`, so files that others can read are
    refused. Tokens, secret ids and key bytes never appear in messages or logs.

TLS
    TLS 1.3 only, the server certificate verified against ``ca_file`` (the system's
    trusted CAs when it is not given) and its host name or IP address; optionally a
    client certificate (:mod:`dermfs.keys.https`). Proxy settings, CA bundles and tokens
    from the environment (``HTTPS_PROXY``, ``VAULT_CACERT``, ``REQUESTS_CA_BUNDLE``,
    ``VAULT_TOKEN``, ``~/.vault-token``) are ignored.

Retries
    Failures to reach the server (connection refused or reset, a timeout, a sealed or
    unavailable server: HTTP 502, 503, 504, 429) are retried with exponential backoff
    (0.25 s, doubling, at most 5 s between attempts) until ``retry_seconds`` (default
    30) have passed since the operation began; each request's own timeout is cut to what
    is left. Nothing else is retried: a TLS failure, bad credentials, a missing key or a
    retired key version fails at once. The error is one line naming the address and the
    cause; the retries themselves are logged at info level (``dermfs -v``).

Caveats:

- The Transit key must not be ``derived`` (every request would need a ``context``) and
  must be of an AEAD type (``aes256-gcm96``, the default, ``chacha20-poly1305`` or
  ``xchacha20-poly1305``).
- A token obtained by AppRole or certificate login is not revoked after use; give the
  role a short ``token_ttl``.
- The key file of a client certificate is checked for its mode, then loaded by the ``ssl``
  module from its path, which cannot take it from memory.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TextIO, TypeVar

import hvac
import hvac.exceptions
import requests.exceptions

from dermfs.config import OpenbaoKmsConfig
from dermfs.cryptocore import KEY_SIZE, SecretKey
from dermfs.errors import FormatError, KeyProviderError, WrongKeyError
from dermfs.keys import https
from dermfs.keys.base import KeyProvider, WrappedKey
from dermfs.keys.secretfile import read_secret_file

log = logging.getLogger(__name__)

PROVIDER = "openbao"
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 5.0
#: HTTP statuses that mean "not now" rather than "no".
_TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
_CIPHERTEXT = re.compile(r"vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/]+={0,2}")
_RETIRED = "disallowed by policy (too old)"
_KEY_NOT_FOUND = "encryption key not found"
_AUTH_FAILED = "message authentication failed"

_T = TypeVar("_T")


def from_config(kms: OpenbaoKmsConfig, *, passphrase_stdin: TextIO | None = None) -> KeyProvider:
    """Make the provider a ``kms`` section of provider ``openbao`` describes.

    Nothing is read or contacted until the first wrap or unwrap.

    Args:
        kms: the checked configuration.
        passphrase_stdin: not used by this provider.

    Returns:
        An :class:`OpenbaoProvider`.
    """
    return OpenbaoProvider(kms)


# ------------------------------------------------------------------------------ provider


class _Transient(Exception):
    """A failure worth another attempt; carries the cause for the final message."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class OpenbaoProvider:
    """The ``openbao`` provider; see the module docstring."""

    name = PROVIDER

    def __init__(self, config: OpenbaoKmsConfig, *, sleep: Callable[[float], None] = time.sleep):
        """Make a provider for *config*; nothing is contacted yet.

        Args:
            config: the ``kms`` section.
            sleep: how to wait between attempts.
        """
        self._config = config
        self._sleep = sleep
        self._client: hvac.Client | None = None
        self._adapter: https.TlsAdapter | None = None
        self._logged_in = False
        self._secrets: list[str] = []

    def __repr__(self) -> str:
        return f"<OpenbaoProvider {self._config.address} {self._key_path()}>"

    def describe(self) -> str:
        """Say which server this is, for messages."""
        return f"OpenBao at {self._config.address}"

    # -------------------------------------------------------------------------- wrap

    def wrap(self, volume_key: SecretKey, volume_id: bytes) -> WrappedKey:
        """Encrypt *volume_key* under the newest version of the configured Transit key.

        Raises:
            InsecureFileError: a credential file is readable by others.
            KeyProviderError: the server could not be reached, refused, or does not bind
                the volume id to the ciphertext.
        """
        key = self._config.key
        ciphertext = self._with_retries(
            _Operation("encrypt", key), lambda: self._encrypt(key, volume_key, volume_id)
        )
        version = parse_ciphertext(ciphertext)
        wrapped = WrappedKey(PROVIDER, key, version, ciphertext.encode("ascii"), {})

        self._check_binding(wrapped, volume_key, volume_id)
        log.debug("wrapped the volume key under Transit key %s version %d", key, version)
        return wrapped

    def _encrypt(self, key: str, volume_key: SecretKey, volume_id: bytes) -> str:
        response = self._transit().encrypt_data(
            name=key,
            plaintext=_b64(volume_key.reveal()),
            associated_data=_b64(volume_id),
            mount_point=self._config.transit_mount,
        )
        return _field(response, "ciphertext")

    def _check_binding(self, wrapped: WrappedKey, volume_key: SecretKey, volume_id: bytes) -> None:
        unwrapped = self.unwrap(wrapped, volume_id)
        try:
            if unwrapped != volume_key:
                raise KeyProviderError(
                    f"{self.describe()}: Transit key {wrapped.key_name} did not give the "
                    "volume key back"
                )
        finally:
            unwrapped.wipe()

        other_id = bytes(byte ^ 0xFF for byte in volume_id)
        try:
            stray = self.unwrap(wrapped, other_id)
        except WrongKeyError:
            return
        stray.wipe()
        raise KeyProviderError(
            f"{self.describe()}: Transit key {wrapped.key_name} ignores associated data, so "
            "it cannot bind the volume id; use a key of type aes256-gcm96"
        )

    # -------------------------------------------------------------------------- unwrap

    def unwrap(self, wrapped: WrappedKey, volume_id: bytes) -> SecretKey:
        """Decrypt a volume key that :meth:`wrap` made for the volume *volume_id*.

        Raises:
            WrongKeyError: the ciphertext does not authenticate with this volume id (it
                belongs to another volume or another key of that name, or was changed).
            FormatError: *wrapped* is malformed.
            InsecureFileError: a credential file is readable by others.
            KeyProviderError: the server could not be reached or refused: bad
                credentials, a missing key, or a retired key version.
        """
        if wrapped.provider != PROVIDER:
            raise KeyProviderError(
                f"the volume key is wrapped by key provider {wrapped.provider}, not {PROVIDER}"
            )
        try:
            ciphertext = wrapped.blob.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError("volume file: the wrapped key is not a Transit ciphertext") from None
        if parse_ciphertext(ciphertext) != wrapped.key_version:
            raise FormatError("volume file: the key version does not match the ciphertext")

        plaintext = self._with_retries(
            _Operation("decrypt", wrapped.key_name, wrapped.key_version),
            lambda: self._decrypt(wrapped, ciphertext, volume_id),
        )
        try:
            material = base64.b64decode(plaintext, validate=True)
        except (binascii.Error, ValueError):
            raise KeyProviderError(f"{self.describe()}: decrypt gave no base64 data") from None
        if len(material) != KEY_SIZE:
            raise WrongKeyError(
                f"{self.describe()}: Transit key {wrapped.key_name} decrypted something that "
                "is not a volume key"
            )
        log.debug("unwrapped the volume key with Transit key %s", wrapped.key_name)
        return SecretKey(material)

    def _decrypt(self, wrapped: WrappedKey, ciphertext: str, volume_id: bytes) -> str:
        response = self._transit().decrypt_data(
            name=wrapped.key_name,
            ciphertext=ciphertext,
            associated_data=_b64(volume_id),
            mount_point=self._config.transit_mount,
        )
        return _field(response, "plaintext")

    def wipe(self) -> None:
        """Forget the token and close the connection; a later use logs in again."""
        if self._client is not None:
            self._client.adapter.token = None
            self._client.adapter.close()
        self._client = None
        self._adapter = None
        self._logged_in = False
        self._secrets.clear()

    # -------------------------------------------------------------------------- requests

    def _with_retries(self, operation: _Operation, request: Callable[[], _T]) -> _T:
        """Log in if needed and run *request*, retrying transient failures until the deadline."""
        started = time.monotonic()
        deadline = started + self._config.retry_seconds
        attempts = 0
        backoff = FIRST_BACKOFF
        while True:
            attempts += 1
            try:
                return self._attempt(operation, request, deadline)
            except _Transient as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    elapsed = time.monotonic() - started
                    raise KeyProviderError(
                        f"{self.describe()}: {exc.cause} (gave up after {attempts} "
                        f"attempt{'s' if attempts > 1 else ''} in {elapsed:.0f} s)"
                    ) from None
                if attempts == 1:
                    log.info(
                        "%s: %s; retrying for up to %.0f s",
                        self.describe(),
                        exc.cause,
                        self._config.retry_seconds,
                    )
                else:
                    log.debug("%s: %s; attempt %d", self.describe(), exc.cause, attempts)
                self._sleep(min(backoff, remaining))
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _attempt(self, operation: _Operation, request: Callable[[], _T], deadline: float) -> _T:
        client = self._connect()
        assert self._adapter is not None
        self._adapter.deadline = deadline
        try:
            if not self._logged_in:
                self._login(client)
                self._logged_in = True
            return request()
        except requests.exceptions.SSLError as exc:
            raise KeyProviderError(
                f"{self.describe()}: {https.tls_cause(exc, self._config.ca_file)}"
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise _Transient(https.connection_cause(exc)) from None
        except hvac.exceptions.VaultError as exc:
            if _status(exc) in _TRANSIENT_STATUSES:
                raise _Transient(self._server_cause(exc)) from None
            raise self._refusal(operation, exc) from None
        finally:
            self._adapter.deadline = None

    def _connect(self) -> hvac.Client:
        if self._client is not None:
            return self._client
        config = self._config
        context = https.tls_context(config.ca_file, config.client_cert, config.client_key)
        self._adapter = https.TlsAdapter(context)
        # token="" keeps hvac from reading VAULT_TOKEN or ~/.vault-token.
        self._client = hvac.Client(
            url=config.address,
            token="",
            verify=True,
            session=https.session(self._adapter),
            timeout=int(https.REQUEST_TIMEOUT),
        )
        return self._client

    def _login(self, client: hvac.Client) -> None:
        auth = self._config.auth
        if auth.method == "token":
            assert auth.token_file is not None
            token = _read_credential(auth.token_file, "token file")
            self._secrets.append(token)
            client.token = token
            return

        mount = auth.mount or auth.method
        if auth.method == "approle":
            assert auth.secret_id_file is not None and auth.role_id is not None
            secret_id = _read_credential(auth.secret_id_file, "secret id file")
            self._secrets.append(secret_id)
            client.auth.approle.login(role_id=auth.role_id, secret_id=secret_id, mount_point=mount)
        else:
            client.adapter.login(f"/v1/auth/{mount}/login", json={})
        self._secrets.append(client.token)
        log.debug("logged in to %s with %s", self.describe(), auth.method)

    def _transit(self) -> Any:
        assert self._client is not None
        return self._client.secrets.transit

    # -------------------------------------------------------------------------- errors

    def _refusal(self, operation: _Operation, exc: hvac.exceptions.VaultError) -> Exception:
        """Turn a refusal into the one-line error a user can act on."""
        status = _status(exc)
        text = self._server_cause(exc)
        where = self.describe()
        key = f"{self._config.transit_mount}/{operation.key_name}"

        if not self._logged_in:
            return KeyProviderError(
                f"{where}: bad credentials: the {self._config.auth.method} login was refused "
                f"({text})"
            )
        if status == 403:
            if self._config.auth.method == "token" and not self._token_valid():
                return KeyProviderError(
                    f"{where}: the token in {self._config.auth.token_file} is not valid "
                    "(revoked, expired or mistyped)"
                )
            return KeyProviderError(
                f"{where}: permission denied: the token's policies do not allow "
                f"{operation.verb} with {key}"
            )
        if _KEY_NOT_FOUND in text:
            return KeyProviderError(f"{where}: Transit key {key} does not exist")
        if _RETIRED in text:
            return KeyProviderError(
                f"{where}: version {operation.key_version} of Transit key {key}, which wrapped "
                "the volume key, is retired (min_decryption_version is above it); set "
                f"min_decryption_version to {operation.key_version} and run dermfs rewrap"
            )
        if _AUTH_FAILED in text:
            return WrongKeyError(
                f"{where}: Transit key {key} does not unwrap this volume's key (another "
                "volume's key, or the volume file was changed)"
            )
        if status == 404:
            return KeyProviderError(
                f"{where}: no Transit engine is mounted at {self._config.transit_mount}/"
            )
        return KeyProviderError(f"{where}: {operation.verb} with {key} was refused ({text})")

    def _token_valid(self) -> bool:
        assert self._client is not None
        try:
            self._client.auth.token.lookup_self()
        except hvac.exceptions.Forbidden:
            return False
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException):
            return True
        return True

    def _server_cause(self, exc: hvac.exceptions.VaultError) -> str:
        errors = getattr(exc, "errors", None)
        if isinstance(errors, list) and errors:
            text = "; ".join(str(error) for error in errors)
        else:
            text = str(exc).partition(", on ")[0]
        text = " ".join(text.replace("1 error occurred:", "").split()).strip("* ")
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        status = _status(exc)
        return f"HTTP {status}: {text}" if status is not None else text

    def _key_path(self) -> str:
        return f"{self._config.transit_mount}/{self._config.key}"


class _Operation(NamedTuple):
    """What a request does, for messages: ``encrypt`` or ``decrypt``, and with which key."""

    verb: str
    key_name: str
    key_version: int | None = None


# ------------------------------------------------------------------------------ helpers


def parse_ciphertext(ciphertext: str) -> int:
    """Return the key version of a Transit ciphertext ``vault:vN:...``.

    Raises:
        FormatError: *ciphertext* is not a Transit ciphertext.
    """
    match = _CIPHERTEXT.fullmatch(ciphertext)
    if match is None:
        raise FormatError("volume file: the wrapped key is not a Transit ciphertext")
    return int(match.group(1))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _field(response: object, name: str) -> str:
    data = response.get("data") if isinstance(response, Mapping) else None
    value = data.get(name) if isinstance(data, Mapping) else None
    if not isinstance(value, str) or not value:
        raise KeyProviderError(f"the server's answer has no {name}")
    return value


def _read_credential(path: Path, what: str) -> str:
    data = read_secret_file(path, what)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyProviderError(f"{what} {path} is not ASCII text") from None
    if not text or any(char.isspace() for char in text):
        raise KeyProviderError(f"{what} {path} must hold one token and nothing else")
    return text


def _status(exc: hvac.exceptions.VaultError) -> int | None:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    for exc_type, code in _STATUS_BY_TYPE:
        if isinstance(exc, exc_type):
            return code
    return None


_STATUS_BY_TYPE: tuple[tuple[type[hvac.exceptions.VaultError], int], ...] = (
    (hvac.exceptions.InvalidRequest, 400),
    (hvac.exceptions.Unauthorized, 401),
    (hvac.exceptions.Forbidden, 403),
    (hvac.exceptions.InvalidPath, 404),
    (hvac.exceptions.RateLimitExceeded, 429),
    (hvac.exceptions.InternalServerError, 500),
    (hvac.exceptions.BadGateway, 502),
    (hvac.exceptions.VaultDown, 503),
)
