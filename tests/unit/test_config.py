"""Tests of dermfs.config: strict loading, defaults, and one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from dermfs import format
from dermfs.config import (
    Config,
    LocalKmsConfig,
    OpenbaoKmsConfig,
    Pkcs11KmsConfig,
    load_config,
)
from dermfs.errors import ConfigError

AUDIT = """\
audit:
  journal: /var/log/dermfs/clinic.audit
  patient_id: '^patients/(?P<patient>[^/]+)/'
"""

MINIMAL = (
    """\
store: /srv/dermfs/clinic
kms:
  provider: local
  keyfile: /etc/dermfs/clinic.key
"""
    + AUDIT
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clinic.yaml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def config_error(tmp_path: Path, text: str) -> str:
    """Load *text*, expect a ConfigError, and return its message after checking its form."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# ------------------------------------------------------------------------------ good files


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)

    assert config.store == Path("/srv/dermfs/clinic")
    assert config.chunk_size == format.DEFAULT_CHUNK_SIZE
    assert config.kms == LocalKmsConfig(keyfile=Path("/etc/dermfs/clinic.key"))
    assert config.audit.journal == Path("/var/log/dermfs/clinic.audit")
    assert config.audit.patient_id.match("patients/P123/img.jpg")["patient"] == "P123"  # type: ignore[index]
    assert config.audit.on_failure == "deny"
    assert config.audit.syslog is False
    assert config.audit.max_bytes == 64 * 1024 * 1024
    assert config.mount.allow_other is False
    assert config.mount.options == ()


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    assert isinstance(config.kms, LocalKmsConfig)

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.store = Path("/elsewhere")  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.kms.kdf_params["n"] = 2  # type: ignore[index]


def test_every_optional_key(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        textwrap.dedent(
            """\
        store: /srv/store
        chunk_size: 4096
        kms:
          provider: local
          passphrase_file: /etc/dermfs/pass
          kdf: scrypt
          kdf_params: {n: 1024}
        audit:
          journal: /var/log/j
          patient_id: '(?P<patient>P[0-9]+)'
          on_failure: allow
          syslog: true
          max_bytes: 1048576
        mount:
          allow_other: true
          options: [noatime, nodev]
        """
        ),
    )

    assert config.chunk_size == 4096
    assert isinstance(config.kms, LocalKmsConfig)
    assert config.kms.passphrase_file == Path("/etc/dermfs/pass")
    assert config.kms.passphrase_stdin is False
    assert config.kms.kdf == "scrypt"
    assert dict(config.kms.kdf_params) == {"n": 1024, "r": 8, "p": 1}
    assert config.audit.on_failure == "allow"
    assert config.audit.syslog is True
    assert config.audit.max_bytes == 1048576
    assert config.mount.allow_other is True
    assert config.mount.options == ("noatime", "nodev")


def test_passphrase_from_stdin(tmp_path: Path) -> None:
    kms = load(
        tmp_path, MINIMAL.replace("keyfile: /etc/dermfs/clinic.key", "passphrase_file: '-'")
    ).kms

    assert kms == LocalKmsConfig(passphrase_stdin=True)
    assert kms.kdf == "argon2id"
    assert dict(kms.kdf_params) == {"iterations": 3, "memory_kib": 65536, "lanes": 4}


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "clinic.yaml"
    path.write_text(MINIMAL.replace("/srv/dermfs/clinic", "store").replace("/etc/dermfs/", ""))
    monkeypatch.chdir(tmp_path)

    config = load_config(Path("etc/clinic.yaml"))

    assert config.store == tmp_path / "etc" / "store"
    assert config.kms == LocalKmsConfig(keyfile=tmp_path / "etc" / "clinic.key")


def test_openbao_token(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        textwrap.dedent(
            """\
        store: /srv/store
        kms:
          provider: openbao
          address: https://bao.clinic.example:8200
          key: clinic
          ca_file: /etc/dermfs/ca.pem
          auth: {method: token, token_file: /etc/dermfs/token}
        """
        )
        + AUDIT,
    )

    kms = config.kms
    assert isinstance(kms, OpenbaoKmsConfig)
    assert kms.address == "https://bao.clinic.example:8200"
    assert kms.transit_mount == "transit"
    assert kms.ca_file == Path("/etc/dermfs/ca.pem")
    assert kms.retry_seconds == 30.0
    assert kms.auth.method == "token"
    assert kms.auth.token_file == Path("/etc/dermfs/token")


def test_openbao_approle_and_cert(tmp_path: Path) -> None:
    approle = load(
        tmp_path,
        textwrap.dedent(
            """\
        store: /srv/store
        kms:
          provider: openbao
          address: https://bao:8200
          key: clinic
          transit_mount: kms
          retry_seconds: 5
          auth: {method: approle, role_id: r-1, secret_id_file: /etc/dermfs/secret-id}
        """
        )
        + AUDIT,
    ).kms
    cert = load(
        tmp_path,
        textwrap.dedent(
            """\
        store: /srv/store
        kms:
          provider: openbao
          address: https://bao:8200
          key: clinic
          client_cert: /etc/dermfs/client.pem
          client_key: /etc/dermfs/client.key
          auth: {method: cert, mount: clinic-cert}
        """
        )
        + AUDIT,
    ).kms

    assert isinstance(approle, OpenbaoKmsConfig)
    assert approle.transit_mount == "kms"
    assert approle.retry_seconds == 5.0
    assert approle.auth.role_id == "r-1"
    assert approle.auth.secret_id_file == Path("/etc/dermfs/secret-id")
    assert approle.auth.mount is None
    assert isinstance(cert, OpenbaoKmsConfig)
    assert cert.client_cert == Path("/etc/dermfs/client.pem")
    assert cert.auth.method == "cert"
    assert cert.auth.mount == "clinic-cert"


def test_openbao_token_login_has_no_mount(tmp_path: Path) -> None:
    text = (
        "store: /s\nkms:\n  provider: openbao\n  address: https://bao\n  key: k\n"
        "  auth: {method: token, token_file: /t, mount: other}\n" + AUDIT
    )

    message = config_error(tmp_path, text)

    assert "unknown key kms.auth.mount (a key of auth method approle and cert" in message


def test_pkcs11(tmp_path: Path) -> None:
    kms = load(
        tmp_path,
        textwrap.dedent(
            """\
        store: /srv/store
        kms:
          provider: pkcs11
          module: /usr/lib/softhsm/libsofthsm2.so
          token_label: dermfs
          key_label: clinic
          pin_file: /etc/dermfs/pin
        """
        )
        + AUDIT,
    ).kms

    assert kms == Pkcs11KmsConfig(
        module=Path("/usr/lib/softhsm/libsofthsm2.so"),
        token_label="dermfs",
        key_label="clinic",
        pin_file=Path("/etc/dermfs/pin"),
    )


# ------------------------------------------------------------------------------ bad files


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError, match=r"absent\.yaml does not exist"):
        load_config(path)


def test_malformed_yaml_gives_the_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, "store: /srv/store\nkms:\n  provider: local\n bad: [\n")

    assert "line 4" in message
    assert "not valid YAML" in message


def test_tab_indentation_gives_the_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, "store: /srv/store\nkms:\n\tprovider: local\n")

    assert "line 3" in message


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, MINIMAL + "store: /srv/other\n")

    assert "duplicate key store" in message
    assert "line 8" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the configuration is empty"),
        ("- store\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
    ],
)
def test_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in config_error(tmp_path, text)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("store: /srv/dermfs/clinic", "store: /srv/dermfs/clinic\nstroe: x", "unknown key stroe"),
        ("keyfile:", "keyfle:", "unknown key kms.keyfle"),
        ("journal:", "jornal:", "unknown key audit.jornal"),
        ("provider: local", "provder: local", "unknown key kms.provder"),
        ("audit:", "mount: {allow_others: true}\naudit:", "unknown key mount.allow_others"),
        (
            "keyfile: /etc/dermfs/clinic.key",
            "passphrase_file: /p\n  kdf_params: {m: 1}",
            "unknown key kms.kdf_params.m",
        ),
        (
            "keyfile: /etc/dermfs/clinic.key",
            "passphrase_file: /p\n  kdf: scrypt\n  kdf_params: {lanes: 1}",
            "unknown key kms.kdf_params.lanes",
        ),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert expected in config_error(tmp_path, MINIMAL.replace(old, new))


def test_openbao_key_under_local_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace("keyfile:", "address: https://bao:8200\n  keyfile:")

    message = config_error(tmp_path, text)

    assert "unknown key kms.address" in message
    assert "openbao" in message
    assert "local" in message


def test_local_key_under_pkcs11_is_named(tmp_path: Path) -> None:
    text = """\
        store: /srv/store
        kms:
          provider: pkcs11
          module: /usr/lib/softhsm/libsofthsm2.so
          token_label: dermfs
          key_label: clinic
          pin_file: /etc/dermfs/pin
          keyfile: /etc/dermfs/clinic.key
        """

    message = config_error(tmp_path, textwrap.dedent(text) + AUDIT)

    assert "unknown key kms.keyfile (a key of provider local, not of provider pkcs11)" in message


def test_key_of_another_auth_method_is_named(tmp_path: Path) -> None:
    text = """\
        store: /srv/store
        kms:
          provider: openbao
          address: https://bao:8200
          key: clinic
          auth: {method: token, token_file: /t, role_id: r}
        """

    message = config_error(tmp_path, textwrap.dedent(text) + AUDIT)

    assert "unknown key kms.auth.role_id (a key of auth method approle" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("store: /srv/dermfs/clinic", "store: 5", "store: must be a string, not an integer"),
        ("store: /srv/dermfs/clinic", "store:", "store: must be a string, not empty"),
        ("store: /srv/dermfs/clinic", "store: ''", "store: must not be empty"),
        ("store: /srv/dermfs/clinic", "store: [a]", "store: must be a string, not a list"),
        ("audit:", "chunk_size: big\naudit:", "chunk_size: must be an integer, not a string"),
        ("audit:", "chunk_size: true\naudit:", "chunk_size: must be an integer"),
        ("audit:", "chunk_size: 1000\naudit:", "chunk_size: chunk size 1000 is not a power"),
        ("provider: local", "provider: vault", "kms.provider: must be one of local, openbao"),
        ("provider: local", "provider: 3", "kms.provider: must be a string"),
        ("keyfile: /etc/dermfs/clinic.key", "keyfile: 7", "kms.keyfile: must be a string"),
        (
            "keyfile: /etc/dermfs/clinic.key",
            "passphrase_file: /p\n  kdf: bcrypt",
            "kms.kdf: must be one of argon2id, scrypt",
        ),
        (
            "keyfile: /etc/dermfs/clinic.key",
            "passphrase_file: /p\n  kdf_params: [1]",
            "kms.kdf_params: must be a mapping",
        ),
        (
            "keyfile: /etc/dermfs/clinic.key",
            "passphrase_file: /p\n  kdf_params: {lanes: two}",
            "kms.kdf_params.lanes: must be a positive integer",
        ),
        (
            "keyfile: /etc/dermfs/clinic.key",
            "passphrase_file: /p\n  kdf_params: {memory_kib: 16, lanes: 4}",
            "kms.kdf_params.memory_kib: must be at least 8 times lanes",
        ),
        (
            "keyfile: /etc/dermfs/clinic.key",
            "passphrase_file: /p\n  kdf: scrypt\n  kdf_params: {n: 1000}",
            "kms.kdf_params.n: must be a power of two",
        ),
        (
            "keyfile: /etc/dermfs/clinic.key",
            "keyfile: /k\n  passphrase_file: /p",
            "kms.passphrase_file: cannot be used together with kms.keyfile",
        ),
        (
            "keyfile: /etc/dermfs/clinic.key",
            "keyfile: /k\n  kdf: scrypt",
            "kms.kdf: only used with kms.passphrase_file",
        ),
        (
            "journal: /var/log/dermfs/clinic.audit",
            "journal: {a: 1}",
            "audit.journal: must be a string, not a mapping",
        ),
        ("audit:", "audit:\n  syslog: 'yes'", "audit.syslog: must be true or false, not a str"),
        ("audit:", "audit:\n  on_failure: ignore", "audit.on_failure: must be one of deny, allow"),
        ("audit:", "audit:\n  max_bytes: 0", "audit.max_bytes: must be a positive integer"),
        ("audit:", "mount: {options: noatime}\naudit:", "mount.options: must be a list"),
        ("audit:", "mount: {options: [ro, 1]}\naudit:", "mount.options[1]: must be a non-empty"),
        ("audit:", "mount: {allow_other: 1}\naudit:", "mount.allow_other: must be true or false"),
        ("audit:", "mount: []\naudit:", "mount: must be a mapping, not a list"),
    ],
)
def test_wrong_value_names_the_dotted_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in MINIMAL

    message = config_error(tmp_path, MINIMAL.replace(old, new, 1))

    assert expected in message


def test_bad_regex_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("'^patients/(?P<patient>[^/]+)/'", "'^patients/(?P<patient>[^/]+/'")

    message = config_error(tmp_path, text)

    assert "audit.patient_id: not a valid regular expression: " in message


def test_regex_without_patient_group_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("(?P<patient>[^/]+)", "(?P<person>[^/]+)")

    message = config_error(tmp_path, text)

    assert "audit.patient_id: needs a group named patient" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("store: /srv/dermfs/clinic\n", "", "missing required key store"),
        ("  provider: local\n", "", "missing required key kms.provider"),
        ("  journal: /var/log/dermfs/clinic.audit\n", "", "missing required key audit.journal"),
        ("  patient_id: '^patients/(?P<patient>[^/]+)/'\n", "", "missing required key audit.pat"),
        (AUDIT, "", "missing required key audit"),
        (
            "  keyfile: /etc/dermfs/clinic.key\n",
            "",
            "missing required key kms.keyfile or kms.passphrase_file",
        ),
    ],
)
def test_missing_required_key_is_named(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in MINIMAL

    assert expected in config_error(tmp_path, MINIMAL.replace(old, new))


def test_missing_kms_is_named(tmp_path: Path) -> None:
    assert "missing required key kms" in config_error(tmp_path, "store: /s\n" + AUDIT)


def test_kms_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, "store: /s\nkms: local\n" + AUDIT)

    assert "kms: must be a mapping, not a string" in message


@pytest.mark.parametrize(
    ("kms", "expected"),
    [
        (
            "address: http://bao:8200\n  key: k\n  auth: {method: token, token_file: /t}",
            "kms.address: must be an https:// URL",
        ),
        ("key: k\n  auth: {method: token, token_file: /t}", "missing required key kms.address"),
        ("address: https://bao\n  auth: {method: token, token_file: /t}", "required key kms.key"),
        ("address: https://bao\n  key: k", "missing required key kms.auth"),
        ("address: https://bao\n  key: k\n  auth: {method: token}", "key kms.auth.token_file"),
        ("address: https://bao\n  key: k\n  auth: {method: kerberos}", "kms.auth.method: must"),
        (
            "address: https://bao\n  key: k\n  auth: {method: approle, role_id: r}",
            "missing required key kms.auth.secret_id_file",
        ),
        (
            "address: https://bao\n  key: k\n  auth: {method: cert}",
            "kms.auth.method: cert needs kms.client_cert and kms.client_key",
        ),
        (
            "address: https://bao\n  key: k\n  client_cert: /c\n  auth: {method: cert}",
            "kms.client_key: kms.client_cert and kms.client_key go together",
        ),
        (
            "address: https://bao\n  key: k\n  retry_seconds: -1\n"
            "  auth: {method: token, token_file: /t}",
            "kms.retry_seconds: must be a number of seconds, 0 or more",
        ),
    ],
)
def test_bad_openbao_settings(tmp_path: Path, kms: str, expected: str) -> None:
    text = f"store: /s\nkms:\n  provider: openbao\n  {kms}\n" + AUDIT

    assert expected in config_error(tmp_path, text)


def test_bad_pkcs11_settings(tmp_path: Path) -> None:
    text = "store: /s\nkms:\n  provider: pkcs11\n  module: /m\n  key_label: k\n  pin_file: /p\n"

    assert "missing required key kms.token_label" in config_error(tmp_path, text + AUDIT)
