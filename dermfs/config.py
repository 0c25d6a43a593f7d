"""The per-volume configuration file, loaded strictly into frozen dataclasses.

One YAML file describes one volume (DESIGN section 7)::

    store: /srv/dermfs/clinic            # required
    chunk_size: 65536                    # optional; only init uses it
    kms:
      provider: local                    # local | openbao | pkcs11
      keyfile: /etc/dermfs/clinic.key    # local: keyfile, or passphrase_file ('-' = stdin)
    audit:
      journal: /var/log/dermfs/clinic.audit
      patient_id: '^patients/(?P<patient>[^/]+)/'
      on_failure: deny                   # deny (default) | allow
      syslog: false
      max_bytes: 67108864
    mount:
      allow_other: false
      options: [noatime]

The ``local`` provider takes exactly one of ``keyfile`` and ``passphrase_file``;
``passphrase_file: '-'`` reads the passphrase from standard input (a prompt on a
terminal). With a passphrase, ``kdf`` (``argon2id`` by default, or ``scrypt``) and
``kdf_params`` (argon2id: ``iterations``, ``memory_kib``, ``lanes``; scrypt: ``n``, ``r``,
``p``) may be given; parameters not given keep their defaults.

``openbao`` takes ``address`` (an ``https://`` URL), ``key``, ``auth`` and optionally
``transit_mount`` (default ``transit``), ``ca_file`` (default: the system's trusted CAs),
``client_cert`` with ``client_key``, and ``retry_seconds`` (default 30). ``auth.method`` is
``token`` (with ``token_file``), ``approle`` (with ``role_id`` and ``secret_id_file``) or
``cert`` (with ``kms.client_cert`` and ``kms.client_key``); ``approle`` and ``cert`` take
an optional ``mount``, the auth method's path when it is not its own name. ``pkcs11``
takes ``module``, ``token_label``, ``key_label``, ``pin_file`` and optionally
``retry_seconds``.

Rules: an unknown key is refused by its dotted name, and so is a key of another provider
or auth method; a value of the wrong type or out of range gets a one-line error naming its
dotted key; a key that appears twice in one mapping is refused. Relative paths are taken
relative to the directory of the configuration file, never to the working directory.
Messages name keys and never repeat a string value from the file.

The file is parsed with :class:`yaml.SafeLoader` (what :func:`yaml.safe_load` uses),
subclassed only to refuse duplicate keys, where ``safe_load`` silently keeps the last.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import yaml

from dermfs import format
from dermfs.errors import ConfigError, FormatError
from dermfs.keys.kdf import DEFAULT_KDF, DEFAULT_PARAMS, KDFS, check_params

#: ``passphrase_file`` value that means standard input.
STDIN = "-"
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_RETRY_SECONDS = 30.0
PROVIDERS = ("local", "openbao", "pkcs11")
AUTH_METHODS = ("token", "approle", "cert")
ON_FAILURE = ("deny", "allow")

_T = TypeVar("_T")


# ------------------------------------------------------------------------------ dataclasses


@dataclass(frozen=True)
class LocalKmsConfig:
    """``kms`` for the ``local`` provider.

    Attributes:
        keyfile: the key file, or ``None`` when a passphrase is used.
        passphrase_file: the file holding the passphrase, or ``None`` (key file or stdin).
        passphrase_stdin: whether the passphrase is read from standard input.
        kdf: the passphrase KDF for new wraps, ``argon2id`` or ``scrypt``.
        kdf_params: all of that KDF's parameters, defaults filled in.
    """

    provider: ClassVar[str] = "local"

    keyfile: Path | None = None
    passphrase_file: Path | None = None
    passphrase_stdin: bool = False
    kdf: str = DEFAULT_KDF
    kdf_params: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType(dict(DEFAULT_PARAMS[DEFAULT_KDF]))
    )


@dataclass(frozen=True)
class OpenbaoAuthConfig:
    """``kms.auth`` for the ``openbao`` provider.

    Attributes:
        method: ``token``, ``approle`` or ``cert``.
        token_file: for ``token``, the file holding the token.
        role_id: for ``approle``, the role id.
        secret_id_file: for ``approle``, the file holding the secret id.
        mount: for ``approle`` and ``cert``, where the auth method is mounted, if not at
            its own name (``auth/approle``, ``auth/cert``).
    """

    method: str
    token_file: Path | None = None
    role_id: str | None = None
    secret_id_file: Path | None = None
    mount: str | None = None


@dataclass(frozen=True)
class OpenbaoKmsConfig:
    """``kms`` for the ``openbao`` provider (OpenBao or Vault Transit)."""

    provider: ClassVar[str] = "openbao"

    address: str
    key: str
    auth: OpenbaoAuthConfig
    transit_mount: str = "transit"
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    retry_seconds: float = DEFAULT_RETRY_SECONDS


@dataclass(frozen=True)
class Pkcs11KmsConfig:
    """``kms`` for the ``pkcs11`` provider (an HSM)."""

    provider: ClassVar[str] = "pkcs11"

    module: Path
    token_label: str
    key_label: str
    pin_file: Path
    retry_seconds: float = DEFAULT_RETRY_SECONDS


KmsConfig = LocalKmsConfig | OpenbaoKmsConfig | Pkcs11KmsConfig


@dataclass(frozen=True)
class AuditConfig:
    """``audit``: where the journal goes and how patient ids are found.

    Attributes:
        journal: the journal file, outside the store.
        patient_id: matched against paths inside the mount; its group ``patient`` is the id.
        on_failure: ``deny`` refuses opens and reads when the journal cannot be written;
            ``allow`` lets them through.
        syslog: whether records are also sent to syslog.
        max_bytes: journal size at which it is rotated.
    """

    journal: Path
    patient_id: re.Pattern[str]
    on_failure: str = "deny"
    syslog: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class MountConfig:
    """``mount``: options for every mount of the volume."""

    allow_other: bool = False
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """One volume's configuration.

    Attributes:
        path: the configuration file it was loaded from.
        store: the store directory.
        kms: the key provider's settings.
        audit: the audit journal's settings.
        chunk_size: chunk size for ``init``; a store keeps its own afterwards.
        mount: mount options.
    """

    path: Path
    store: Path
    kms: KmsConfig
    audit: AuditConfig
    chunk_size: int = format.DEFAULT_CHUNK_SIZE
    mount: MountConfig = MountConfig()


# ------------------------------------------------------------------------------ loading


def load_config(path: Path) -> Config:
    """Load and check the configuration file at *path*.

    Args:
        path: the YAML file.

    Returns:
        The configuration, with defaults filled in and relative paths made absolute.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid YAML, or has an
            unknown key, a missing key, or a bad value. The message is one line and names
            the file and the dotted key.
    """
    data = _parse_yaml(path, _read_text(path))
    if data is None:
        raise ConfigError(f"{path}: the configuration is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys to values")

    top = _Table(path, "", data)
    top.refuse_unknown({"store", "chunk_size", "kms", "audit", "mount"})
    chunk_size = top.optional("chunk_size", int)
    if chunk_size is not None:
        try:
            format.check_chunk_size(chunk_size)
        except FormatError as exc:
            raise top.error("chunk_size", str(exc)) from None

    return Config(
        path=path,
        store=top.path("store"),
        kms=_load_kms(top.table("kms")),
        audit=_load_audit(top.table("audit")),
        chunk_size=format.DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
        mount=_load_mount(top.optional_table("mount")),
    )


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None

    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the configuration is not UTF-8 text") from None


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing a key that appears twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Hashable] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(path: Path, text: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = " ".join((exc.problem or exc.context or "syntax error").split())
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None


def _load_kms(table: _Table) -> KmsConfig:
    table.refuse_unknown(frozenset().union(*_KEYS_BY_PROVIDER.values()))
    provider = table.choice("provider", PROVIDERS)
    table.refuse_unknown(_KEYS_BY_PROVIDER[provider], "provider", provider, _KEYS_BY_PROVIDER)

    if provider == "local":
        return _load_local(table)
    if provider == "openbao":
        return _load_openbao(table)
    return _load_pkcs11(table)


_LOCAL_KEYS = frozenset({"provider", "keyfile", "passphrase_file", "kdf", "kdf_params"})
_OPENBAO_KEYS = frozenset(
    {
        "provider",
        "address",
        "transit_mount",
        "key",
        "ca_file",
        "client_cert",
        "client_key",
        "retry_seconds",
        "auth",
    }
)
_PKCS11_KEYS = frozenset(
    {"provider", "module", "token_label", "key_label", "pin_file", "retry_seconds"}
)
_KEYS_BY_PROVIDER = {"local": _LOCAL_KEYS, "openbao": _OPENBAO_KEYS, "pkcs11": _PKCS11_KEYS}
_AUTH_KEYS_BY_METHOD = {
    "token": frozenset({"method", "token_file"}),
    "approle": frozenset({"method", "role_id", "secret_id_file", "mount"}),
    "cert": frozenset({"method", "mount"}),
}


def _load_local(table: _Table) -> LocalKmsConfig:
    has_keyfile = "keyfile" in table
    has_passphrase = "passphrase_file" in table
    if has_keyfile and has_passphrase:
        raise table.error("passphrase_file", "cannot be used together with kms.keyfile")
    if not (has_keyfile or has_passphrase):
        raise ConfigError(
            f"{table.source}: missing required key kms.keyfile or kms.passphrase_file "
            f"('{STDIN}' reads the passphrase from standard input)"
        )

    if has_keyfile:
        for key in ("kdf", "kdf_params"):
            if key in table:
                raise table.error(key, "only used with kms.passphrase_file")
        return LocalKmsConfig(keyfile=table.path("keyfile"))

    passphrase_stdin = table.optional("passphrase_file", str) == STDIN
    kdf = table.optional_choice("kdf", sorted(KDFS)) or DEFAULT_KDF
    given = table.optional("kdf_params", dict) or {}
    try:
        params = check_params(
            kdf, {**DEFAULT_PARAMS[kdf], **given}, where=f"{table.where}kdf_params."
        )
    except FormatError as exc:
        raise ConfigError(f"{table.source}: {exc}") from None

    return LocalKmsConfig(
        passphrase_file=None if passphrase_stdin else table.path("passphrase_file"),
        passphrase_stdin=passphrase_stdin,
        kdf=kdf,
        kdf_params=MappingProxyType(params),
    )


def _load_openbao(table: _Table) -> OpenbaoKmsConfig:
    address = table.required("address", str)
    url = urllib.parse.urlsplit(address)
    if url.scheme != "https" or not url.hostname:
        raise table.error("address", "must be an https:// URL (dermfs uses TLS only)")
    client_cert = table.optional_path("client_cert")
    client_key = table.optional_path("client_key")
    if (client_cert is None) != (client_key is None):
        raise table.error("client_key", "kms.client_cert and kms.client_key go together")

    auth = _load_auth(table.table("auth"))
    if auth.method == "cert" and client_cert is None:
        raise table.error("auth.method", "cert needs kms.client_cert and kms.client_key")

    return OpenbaoKmsConfig(
        address=address,
        key=table.required("key", str),
        auth=auth,
        transit_mount=table.optional("transit_mount", str) or "transit",
        ca_file=table.optional_path("ca_file"),
        client_cert=client_cert,
        client_key=client_key,
        retry_seconds=table.retry_seconds(),
    )


def _load_auth(table: _Table) -> OpenbaoAuthConfig:
    table.refuse_unknown(frozenset().union(*_AUTH_KEYS_BY_METHOD.values()))
    method = table.choice("method", AUTH_METHODS)
    table.refuse_unknown(_AUTH_KEYS_BY_METHOD[method], "auth method", method, _AUTH_KEYS_BY_METHOD)

    if method == "token":
        return OpenbaoAuthConfig(method, token_file=table.path("token_file"))
    if method == "approle":
        return OpenbaoAuthConfig(
            method,
            role_id=table.required("role_id", str),
            secret_id_file=table.path("secret_id_file"),
            mount=table.optional("mount", str),
        )
    return OpenbaoAuthConfig(method, mount=table.optional("mount", str))


def _load_pkcs11(table: _Table) -> Pkcs11KmsConfig:
    return Pkcs11KmsConfig(
        module=table.path("module"),
        token_label=table.required("token_label", str),
        key_label=table.required("key_label", str),
        pin_file=table.path("pin_file"),
        retry_seconds=table.retry_seconds(),
    )


def _load_audit(table: _Table) -> AuditConfig:
    table.refuse_unknown({"journal", "patient_id", "on_failure", "syslog", "max_bytes"})
    source = table.required("patient_id", str)
    try:
        patient_id = re.compile(source)
    except re.error as exc:
        raise table.error("patient_id", f"not a valid regular expression: {exc}") from None
    if "patient" not in patient_id.groupindex:
        raise table.error("patient_id", "needs a group named patient: (?P<patient>...)")
    max_bytes = table.optional("max_bytes", int)
    if max_bytes is not None and max_bytes < 1:
        raise table.error("max_bytes", "must be a positive integer")

    return AuditConfig(
        journal=table.path("journal"),
        patient_id=patient_id,
        on_failure=table.optional_choice("on_failure", ON_FAILURE) or "deny",
        syslog=bool(table.optional("syslog", bool)),
        max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes,
    )


def _load_mount(table: _Table | None) -> MountConfig:
    if table is None:
        return MountConfig()
    table.refuse_unknown({"allow_other", "options"})

    options = table.optional("options", list) or []
    for index, option in enumerate(options):
        if not isinstance(option, str) or not option:
            raise table.error(f"options[{index}]", "must be a non-empty string")

    return MountConfig(
        allow_other=bool(table.optional("allow_other", bool)), options=tuple(options)
    )


# ------------------------------------------------------------------------------ checking

_KIND_NAMES: Mapping[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "a mapping",
    list: "a list",
}


def _describe(value: object) -> str:
    if value is None:
        return "empty"
    for kind in (bool, int, float, str, dict, list):
        if isinstance(value, kind):
            return _KIND_NAMES[kind]
    return "a " + type(value).__name__


class _Table:
    """One mapping of the YAML file, with its dotted place, read key by key."""

    def __init__(self, source: Path, where: str, data: Mapping[Any, Any]) -> None:
        self.source = source
        self.where = where
        self.data = data

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def refuse_unknown(
        self,
        allowed: Collection[str],
        kind: str = "",
        current: str = "",
        family: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        """Refuse the first key not in *allowed*, by its dotted name.

        A key that *family* gives to another member (another provider, another auth
        method: the *kind*) is named together with the member that takes it.
        """
        for key in self.data:
            if key in allowed:
                continue
            dotted = f"{self.where}{key}"
            owners = [name for name, keys in (family or {}).items() if key in keys]
            if owners:
                raise ConfigError(
                    f"{self.source}: unknown key {dotted} (a key of {kind} "
                    f"{' and '.join(owners)}, not of {kind} {current})"
                )
            raise ConfigError(f"{self.source}: unknown key {dotted}")

    def error(self, key: str, problem: str) -> ConfigError:
        """Return the error for a bad value at *key*."""
        return ConfigError(f"{self.source}: {self.where}{key}: {problem}")

    def optional(self, key: str, kind: type[_T]) -> _T | None:
        """Return the value at *key*, which must be of *kind*; ``None`` if absent."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.error(key, f"must be {_KIND_NAMES[kind]}, not {_describe(value)}")
        if value == "":
            raise self.error(key, "must not be empty")
        return value

    def required(self, key: str, kind: type[_T]) -> _T:
        """Return the value at *key*, which must be there and be of *kind*."""
        value = self.optional(key, kind)
        if value is None:
            raise ConfigError(f"{self.source}: missing required key {self.where}{key}")
        return value

    def path(self, key: str) -> Path:
        """Return the required path at *key*, relative to the configuration file's folder."""
        text = self.required(key, str)
        if "\0" in text:
            raise self.error(key, "must not contain a NUL character")
        return self.source.parent.absolute() / text

    def optional_path(self, key: str) -> Path | None:
        """Return the path at *key*, or ``None`` if absent."""
        return self.path(key) if key in self.data else None

    def choice(self, key: str, choices: Collection[str]) -> str:
        """Return the required value at *key*, which must be one of *choices*."""
        value = self.required(key, str)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}")
        return value

    def optional_choice(self, key: str, choices: Collection[str]) -> str | None:
        """Return the value at *key*, one of *choices*, or ``None`` if absent."""
        return self.choice(key, choices) if key in self.data else None

    def retry_seconds(self) -> float:
        """Return ``retry_seconds``, a number of seconds, 0 or more, defaulting to 30."""
        if "retry_seconds" not in self.data:
            return DEFAULT_RETRY_SECONDS
        value = self.data["retry_seconds"]
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise self.error("retry_seconds", "must be a number of seconds, 0 or more")
        return float(value)

    def table(self, key: str) -> _Table:
        """Return the required mapping at *key*; the caller checks its keys."""
        return _Table(self.source, f"{self.where}{key}.", self.required(key, dict))

    def optional_table(self, key: str) -> _Table | None:
        """Return the mapping at *key*, or ``None`` if absent."""
        return self.table(key) if key in self.data else None
