"""HTTPS for the network key providers: TLS 1.3 only, one trusted CA file, a deadline.

:func:`session` returns a :class:`requests.Session` whose ``https://`` requests go
through a :class:`TlsAdapter`: one :class:`ssl.SSLContext` made by :func:`tls_context`,
which speaks TLS 1.3 only, verifies the server's certificate against the configured CA
file (the system's CAs when none is given) and its host name or IP address, and may
present a client certificate. The adapter ignores the ``verify`` and ``cert`` arguments
that requests and its callers pass down, and the session ignores the environment
(``HTTPS_PROXY``, ``REQUESTS_CA_BUNDLE``, ``.netrc``), so that nothing outside the
configuration can widen what is trusted. Every request's timeout is cut to what is left
of the adapter's :attr:`TlsAdapter.deadline`.

:func:`connection_cause` and :func:`tls_cause` turn the exceptions requests raises into the
few words of a one-line error message.
"""

from __future__ import annotations

import errno
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import requests
import requests.adapters

from dermfs.errors import KeyProviderError
from dermfs.keys.secretfile import read_secret_file

#: Longest wait for one request, whatever is left before the deadline.
REQUEST_TIMEOUT = 10.0


def session(adapter: TlsAdapter) -> requests.Session:
    """Return a session that sends ``https://`` requests through *adapter* only.

    Plain ``http://`` is not mounted at all, so a configuration cannot fall back to it.
    """
    made = requests.Session()
    made.trust_env = False
    made.adapters.clear()
    made.mount("https://", adapter)
    return made


def tls_context(
    ca_file: Path | None, client_cert: Path | None, client_key: Path | None
) -> ssl.SSLContext:
    """Return a client context that speaks TLS 1.3 only and verifies the server.

    Args:
        ca_file: the CA certificates to trust; the system's when ``None``.
        client_cert: a client certificate to present, or ``None``.
        client_key: the key of *client_cert*.

    Raises:
        InsecureFileError: *client_key* is readable by others.
        KeyProviderError: a file is missing or is not a certificate or key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED

    try:
        if ca_file is None:
            context.load_default_certs()
        else:
            context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise KeyProviderError(f"cannot load CA file {ca_file}: {ssl_reason(exc)}") from None

    if client_cert is not None and client_key is not None:
        read_secret_file(client_key, "TLS client key")
        try:
            context.load_cert_chain(str(client_cert), str(client_key))
        except (OSError, ssl.SSLError) as exc:
            raise KeyProviderError(
                f"cannot load TLS client certificate {client_cert} with key {client_key}: "
                f"{ssl_reason(exc)}"
            ) from None
    return context


class TlsAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter that connects with one SSL context and a deadline.

    It ignores the ``verify`` and ``cert`` arguments requests passes down, so that
    neither a default CA bundle nor an environment variable can widen what is trusted.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self.deadline: float | None = None
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, _ignored = super().build_connection_pool_key_attributes(request, True, None)
        return host_params, {"ssl_context": self._context, "cert_reqs": "CERT_REQUIRED"}

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None
        conn.cert_file = None
        conn.key_file = None

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        timeout = REQUEST_TIMEOUT
        if self.deadline is not None:
            timeout = max(0.1, min(timeout, self.deadline - time.monotonic()))
        kwargs["timeout"] = timeout
        return super().send(request, *args, **kwargs)


def _causes(exc: BaseException) -> list[BaseException]:
    """Return *exc* and what it wraps: ``__cause__``, ``__context__`` and urllib3's ``reason``."""
    found: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if current in found:
            continue
        found.append(current)
        for inner in (current.__cause__, current.__context__, getattr(current, "reason", None)):
            if isinstance(inner, BaseException):
                pending.append(inner)
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
    return found


def connection_cause(exc: BaseException) -> str:
    causes = _causes(exc)
    if any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return "connection refused"
    if any(isinstance(cause, socket.gaierror) for cause in causes):
        return "cannot resolve the host name"
    if isinstance(exc, requests.exceptions.Timeout) or any(
        isinstance(cause, TimeoutError | socket.timeout) for cause in causes
    ):
        return "no answer (timed out)"
    if any(isinstance(cause, ConnectionResetError) for cause in causes):
        return "connection reset"
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "host unreachable"
    return "cannot connect"


def tls_cause(exc: BaseException, ca_file: Path | None) -> str:
    causes = _causes(exc)
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            trusted = f"ca_file {ca_file}" if ca_file else "the system's CAs"
            detail = cause.verify_message or ssl_reason(cause)
            return (
                f"TLS failure: the server's certificate does not verify against {trusted} "
                f"({detail})"
            )
    for cause in causes:
        if isinstance(cause, ssl.SSLError):
            reason = (cause.reason or "").upper()
            if "VERSION" in reason or "PROTOCOL" in reason:
                return f"TLS failure: the server does not offer TLS 1.3 ({ssl_reason(cause)})"
            if "CERTIFICATE" in reason or "ALERT" in reason:
                return f"TLS failure: the handshake was refused ({ssl_reason(cause)})"
            return f"TLS failure: {ssl_reason(cause)}"
    return "TLS failure"


def ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
