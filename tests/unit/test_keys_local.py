"""Tests of the local key provider: key files, passphrases, KDF parameters, and the factory."""

from __future__ import annotations

import importlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dermfs import format
from dermfs.config import LocalKmsConfig, OpenbaoAuthConfig, OpenbaoKmsConfig
from dermfs.cryptocore import SecretKey, random_id, random_key
from dermfs.errors import FormatError, InsecureFileError, KeyProviderError, WrongKeyError
from dermfs.keys import WrappedKey, provider_from_config
from dermfs.keys.local import (
    KeyFileProvider,
    PassphraseFile,
    PassphraseProvider,
    PassphraseStream,
    create_keyfile,
    read_keyfile,
)

#: Cheap KDF parameters, given explicitly as the product allows; never the defaults.
CHEAP_SCRYPT = {"n": 1024, "r": 8, "p": 1}
CHEAP_ARGON2ID = {"iterations": 1, "memory_kib": 64, "lanes": 1}
CHEAP = {"scrypt": CHEAP_SCRYPT, "argon2id": CHEAP_ARGON2ID}

PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "volume.key"
    create_keyfile(path)
    return path


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test changes it."""
    saved = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(saved)


def secret_file(tmp_path: Path, name: str, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(mode)
    return path


def stream_provider(kdf: str = "argon2id", text: str = PASSPHRASE + "\n") -> PassphraseProvider:
    return PassphraseProvider(PassphraseStream(io.StringIO(text)), kdf, CHEAP[kdf])


class FakeTerminal(io.StringIO):
    """A stream that claims to be a terminal, so the provider prompts instead of reading."""

    def isatty(self) -> bool:
        return True


class Prompt:
    """Stands in for getpass: answers prompts from a list and records them."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)


# ------------------------------------------------------------------------------ key file


@pytest.mark.parametrize("mask", [0o000, 0o077, 0o277])
@pytest.mark.usefixtures("umask")
def test_create_keyfile_is_0600_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    path = tmp_path / "volume.key"
    os.umask(mask)

    create_keyfile(path)

    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) == 32


def test_create_keyfile_makes_a_new_key_each_time(tmp_path: Path) -> None:
    create_keyfile(tmp_path / "a.key")
    create_keyfile(tmp_path / "b.key")

    assert (tmp_path / "a.key").read_bytes() != (tmp_path / "b.key").read_bytes()


def test_create_keyfile_never_replaces_a_file(keyfile: Path) -> None:
    before = keyfile.read_bytes()

    with pytest.raises(KeyProviderError, match="exists already"):
        create_keyfile(keyfile)

    assert keyfile.read_bytes() == before


def test_create_keyfile_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyProviderError, match="cannot create key file"):
        create_keyfile(tmp_path / "absent" / "volume.key")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_keyfile_owner_only_modes_are_accepted(keyfile: Path, mode: int) -> None:
    keyfile.chmod(mode)

    assert read_keyfile(keyfile) == SecretKey(keyfile.read_bytes())


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610])
def test_keyfile_open_to_others_is_refused(keyfile: Path, mode: int) -> None:
    keyfile.chmod(mode)

    with pytest.raises(InsecureFileError) as excinfo:
        read_keyfile(keyfile)

    assert str(keyfile) in str(excinfo.value)
    assert f"{mode:04o}" in str(excinfo.value)


def test_insecure_keyfile_is_refused_before_wrapping(keyfile: Path) -> None:
    keyfile.chmod(0o644)

    with pytest.raises(InsecureFileError, match="0644"):
        KeyFileProvider(keyfile).wrap(random_key(), random_id())


@pytest.mark.parametrize(
    "content", [b"", b"\x01" * 31, b"\x01" * 33, b"ab" * 32 + b"\n"], ids=["0", "31", "33", "hex"]
)
def test_keyfile_of_wrong_length_is_refused(tmp_path: Path, content: bytes) -> None:
    path = secret_file(tmp_path, "volume.key", content)

    with pytest.raises(KeyProviderError, match=f"is {len(content)} bytes long"):
        read_keyfile(path)


def test_missing_keyfile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyProviderError, match="does not exist"):
        read_keyfile(tmp_path / "absent.key")


def test_keyfile_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "volume.key"
    directory.mkdir(mode=0o700)

    with pytest.raises(KeyProviderError, match="not a regular file"):
        read_keyfile(directory)


def test_keyfile_wrap_and_unwrap(keyfile: Path) -> None:
    provider = KeyFileProvider(keyfile)
    volume_key, volume_id = random_key(), random_id()

    wrapped = provider.wrap(volume_key, volume_id)

    assert (wrapped.provider, wrapped.key_name, wrapped.key_version) == ("local", "keyfile", 1)
    assert len(wrapped.blob) == 60
    assert dict(wrapped.params) == {}
    assert provider.unwrap(wrapped, volume_id) == volume_key


def test_wrong_keyfile_is_a_wrong_key(tmp_path: Path, keyfile: Path) -> None:
    other = tmp_path / "other.key"
    create_keyfile(other)
    volume_id = random_id()
    wrapped = KeyFileProvider(keyfile).wrap(random_key(), volume_id)

    with pytest.raises(WrongKeyError, match="wrong key file for this volume"):
        KeyFileProvider(other).unwrap(wrapped, volume_id)


def test_keyfile_wrap_is_bound_to_the_volume_id(keyfile: Path) -> None:
    provider = KeyFileProvider(keyfile)
    wrapped = provider.wrap(random_key(), random_id())

    with pytest.raises(WrongKeyError):
        provider.unwrap(wrapped, random_id())


def test_changed_blob_is_a_wrong_key(keyfile: Path) -> None:
    provider = KeyFileProvider(keyfile)
    volume_id = random_id()
    wrapped = provider.wrap(random_key(), volume_id)
    blob = bytearray(wrapped.blob)
    blob[20] ^= 1

    with pytest.raises(WrongKeyError):
        provider.unwrap(WrappedKey("local", "keyfile", 1, bytes(blob)), volume_id)


def test_keyfile_provider_refuses_a_passphrase_wrap(keyfile: Path) -> None:
    volume_id = random_id()
    wrapped = stream_provider().wrap(random_key(), volume_id)

    with pytest.raises(WrongKeyError, match="wrapped with a passphrase"):
        KeyFileProvider(keyfile).unwrap(wrapped, volume_id)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"provider": "openbao"}, KeyProviderError),
        ({"key_name": "hsm"}, FormatError),
        ({"key_version": 2}, FormatError),
        ({"blob": b"\x00" * 59}, FormatError),
        ({"params": {"kdf": "scrypt"}}, FormatError),
    ],
)
def test_malformed_keyfile_wrap_is_refused(
    keyfile: Path, change: dict[str, object], error: type[Exception]
) -> None:
    provider = KeyFileProvider(keyfile)
    volume_id = random_id()
    wrapped = provider.wrap(random_key(), volume_id)
    fields = {
        "provider": wrapped.provider,
        "key_name": wrapped.key_name,
        "key_version": wrapped.key_version,
        "blob": wrapped.blob,
        "params": wrapped.params,
    }
    fields.update(change)

    with pytest.raises(error):
        provider.unwrap(WrappedKey(**fields), volume_id)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ passphrase


@pytest.mark.parametrize("kdf", ["scrypt", "argon2id"])
def test_passphrase_wrap_and_unwrap(kdf: str) -> None:
    provider = PassphraseProvider(PassphraseStream(io.StringIO(PASSPHRASE + "\n")), kdf, CHEAP[kdf])
    volume_key, volume_id = random_key(), random_id()

    wrapped = provider.wrap(volume_key, volume_id)

    assert (wrapped.provider, wrapped.key_name, wrapped.key_version) == ("local", "passphrase", 1)
    assert len(wrapped.blob) == 60
    assert provider.unwrap(wrapped, volume_id) == volume_key


@pytest.mark.parametrize("kdf", ["scrypt", "argon2id"])
def test_stored_params_are_those_of_the_format(kdf: str) -> None:
    wrapped = stream_provider(kdf).wrap(random_key(), random_id())

    params = dict(wrapped.params)
    salt = format.b64u_decode(params.pop("salt"))

    assert list(wrapped.params) == ["kdf", "salt", *CHEAP[kdf]]
    assert params == {"kdf": kdf, **CHEAP[kdf]}
    assert len(salt) == 16


def test_each_wrap_has_a_new_salt() -> None:
    provider = stream_provider()

    first = provider.wrap(random_key(), random_id())
    second = provider.wrap(random_key(), random_id())

    assert first.params["salt"] != second.params["salt"]


@pytest.mark.parametrize(
    ("kdf", "defaults"),
    [
        ("argon2id", {"iterations": 3, "memory_kib": 65536, "lanes": 4}),
        ("scrypt", {"n": 32768, "r": 8, "p": 1}),
    ],
)
def test_default_params_are_those_of_the_format(kdf: str, defaults: dict[str, int]) -> None:
    provider = PassphraseProvider(PassphraseStream(io.StringIO(PASSPHRASE)), kdf)

    wrapped = provider.wrap(random_key(), random_id())

    assert {name: wrapped.params[name] for name in defaults} == defaults


@pytest.mark.parametrize("kdf", ["scrypt", "argon2id"])
def test_stored_params_round_trip_through_the_volume_file(kdf: str) -> None:
    volume_key, volume_id = random_key(), random_id()
    wrapped = stream_provider(kdf).wrap(volume_key, volume_id)
    slot = format.KeySlot(
        1, wrapped.provider, wrapped.key_name, wrapped.key_version, wrapped.blob, wrapped.params
    )

    volume_file = format.VolumeFile(volume_id, format.DEFAULT_CHUNK_SIZE, (slot,), mac=b"m" * 32)
    data = volume_file.to_bytes()
    parsed = format.parse_volume_file(data).current_key
    again = WrappedKey(
        parsed.provider, parsed.key_name, parsed.key_version, parsed.wrapped, parsed.params
    )

    assert parsed.params == wrapped.params
    other_kdf = "argon2id" if kdf == "scrypt" else "scrypt"
    assert stream_provider(other_kdf).unwrap(again, volume_id) == volume_key


def test_wrong_passphrase_is_a_wrong_key() -> None:
    volume_id = random_id()
    wrapped = stream_provider().wrap(random_key(), volume_id)

    with pytest.raises(WrongKeyError, match="wrong passphrase") as excinfo:
        stream_provider(text="Correct horse battery staple\n").unwrap(wrapped, volume_id)

    assert "horse" not in str(excinfo.value)


def test_passphrase_wrap_is_bound_to_the_volume_id() -> None:
    provider = stream_provider()
    wrapped = provider.wrap(random_key(), random_id())

    with pytest.raises(WrongKeyError):
        provider.unwrap(wrapped, random_id())


def test_passphrase_provider_refuses_a_keyfile_wrap(keyfile: Path) -> None:
    volume_id = random_id()
    wrapped = KeyFileProvider(keyfile).wrap(random_key(), volume_id)

    with pytest.raises(WrongKeyError, match="wrapped with a key file"):
        stream_provider().unwrap(wrapped, volume_id)


def test_passphrase_file_and_stream_agree(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "passphrase", PASSPHRASE.encode() + b"\n")
    from_file = PassphraseProvider(PassphraseFile(path), "scrypt", CHEAP_SCRYPT)
    volume_key, volume_id = random_key(), random_id()

    wrapped = from_file.wrap(volume_key, volume_id)

    assert stream_provider("scrypt", PASSPHRASE).unwrap(wrapped, volume_id) == volume_key
    assert from_file.unwrap(wrapped, volume_id) == volume_key


@pytest.mark.parametrize(
    ("content", "passphrase"),
    [
        (b"secret\n", b"secret"),
        (b"secret\r\n", b"secret"),
        (b"secret", b"secret"),
        (b"secret\n\n", b"secret\n"),
        (b" secret \n", b" secret "),
    ],
)
def test_passphrase_file_loses_one_trailing_newline(
    tmp_path: Path, content: bytes, passphrase: bytes
) -> None:
    path = secret_file(tmp_path, "passphrase", content)

    assert PassphraseFile(path).read(confirm=False) == SecretKey(passphrase)


@pytest.mark.parametrize("mode", [0o644, 0o660])
def test_passphrase_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret_file(tmp_path, "passphrase", b"secret\n", mode)

    with pytest.raises(InsecureFileError, match=f"passphrase file {path} has mode {mode:04o}"):
        PassphraseFile(path).read(confirm=False)


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_empty_passphrase_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = secret_file(tmp_path, "passphrase", content)
    provider = PassphraseProvider(PassphraseFile(path), "scrypt", CHEAP_SCRYPT)

    with pytest.raises(KeyProviderError, match="is empty"):
        provider.wrap(random_key(), random_id())


def test_missing_passphrase_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyProviderError, match="does not exist"):
        PassphraseFile(tmp_path / "absent").read(confirm=False)


@pytest.mark.parametrize(
    ("text", "message"), [("", "no passphrase on standard input"), ("\n", "is empty")]
)
def test_empty_passphrase_from_stdin_is_refused(text: str, message: str) -> None:
    with pytest.raises(KeyProviderError, match=message):
        PassphraseStream(io.StringIO(text)).read(confirm=False)


def test_stdin_passphrase_is_one_line() -> None:
    stream = io.StringIO("first line\nsecond line\n")

    assert PassphraseStream(stream).read(confirm=False) == SecretKey(b"first line")
    assert stream.read() == "second line\n"


def test_stdin_passphrase_is_read_once_per_provider() -> None:
    provider = stream_provider()
    volume_key, volume_id = random_key(), random_id()

    wrapped = provider.wrap(volume_key, volume_id)

    assert provider.unwrap(wrapped, volume_id) == volume_key


def test_wipe_forgets_the_passphrase() -> None:
    provider = stream_provider(text=PASSPHRASE + "\n")
    wrapped = provider.wrap(random_key(), random_id())

    provider.wipe()

    with pytest.raises(KeyProviderError, match="no passphrase on standard input"):
        provider.unwrap(wrapped, random_id())


def test_terminal_prompts_twice_for_a_new_passphrase() -> None:
    prompt = Prompt(PASSPHRASE, PASSPHRASE)
    provider = PassphraseProvider(PassphraseStream(FakeTerminal(), prompt), "scrypt", CHEAP_SCRYPT)
    volume_key, volume_id = random_key(), random_id()

    wrapped = provider.wrap(volume_key, volume_id)

    assert prompt.prompts == ["New passphrase: ", "Repeat the passphrase: "]
    assert stream_provider("scrypt", PASSPHRASE).unwrap(wrapped, volume_id) == volume_key


def test_terminal_prompts_once_to_unwrap() -> None:
    volume_key, volume_id = random_key(), random_id()
    wrapped = stream_provider("scrypt").wrap(volume_key, volume_id)
    prompt = Prompt(PASSPHRASE)
    provider = PassphraseProvider(PassphraseStream(FakeTerminal(), prompt), "scrypt", CHEAP_SCRYPT)

    assert provider.unwrap(wrapped, volume_id) == volume_key
    assert prompt.prompts == ["Passphrase: "]


def test_terminal_passphrases_that_differ_are_refused() -> None:
    prompt = Prompt(PASSPHRASE, PASSPHRASE + "!")
    provider = PassphraseProvider(PassphraseStream(FakeTerminal(), prompt), "scrypt", CHEAP_SCRYPT)

    with pytest.raises(KeyProviderError, match="differ"):
        provider.wrap(random_key(), random_id())


def test_end_of_input_at_the_prompt_is_refused() -> None:
    def prompt(_text: str) -> str:
        raise EOFError

    with pytest.raises(KeyProviderError, match="could not read the passphrase"):
        PassphraseStream(FakeTerminal(), prompt).read(confirm=False)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"kdf": "bcrypt"}, "unknown passphrase KDF"),
        ({"kdf": None}, "unknown passphrase KDF"),
        ({"salt": None}, "no salt"),
        ({"salt": "a"}, "not base64url"),
        ({"salt": format.b64u_encode(b"x" * 8)}, "salt has the wrong length"),
        ({"n": 1024}, r"unknown key keys\[\]\.params\.n"),
        ({"memory_kib": 1 << 40}, "memory_kib: must be at most"),
        ({"lanes": 0}, "lanes: must be a positive integer"),
        ({"iterations": "1"}, "iterations: must be a positive integer"),
    ],
)
def test_bad_stored_params_are_refused_before_deriving(
    params: dict[str, object], match: str
) -> None:
    provider = stream_provider()
    volume_id = random_id()
    wrapped = provider.wrap(random_key(), volume_id)
    changed = {**wrapped.params, **params}

    with pytest.raises(FormatError, match=match):
        provider.unwrap(
            WrappedKey(wrapped.provider, wrapped.key_name, 1, wrapped.blob, changed), volume_id
        )


def test_missing_stored_param_is_refused() -> None:
    provider = stream_provider()
    volume_id = random_id()
    wrapped = provider.wrap(random_key(), volume_id)
    params = {name: value for name, value in wrapped.params.items() if name != "lanes"}

    with pytest.raises(FormatError, match=r"missing key keys\[\]\.params\.lanes"):
        provider.unwrap(WrappedKey("local", "passphrase", 1, wrapped.blob, params), volume_id)


def test_unknown_configured_kdf_is_refused() -> None:
    with pytest.raises(FormatError, match="unknown passphrase KDF"):
        PassphraseProvider(PassphraseStream(io.StringIO()), "bcrypt")


def test_empty_passphrase_at_the_prompt_is_refused() -> None:
    stream = PassphraseStream(FakeTerminal(), Prompt(""))

    with pytest.raises(KeyProviderError, match="the passphrase is empty"):
        stream.read(confirm=False)


def test_bad_configured_params_are_refused() -> None:
    with pytest.raises(FormatError, match="memory_kib: must be at least 8 times lanes"):
        PassphraseProvider(
            PassphraseStream(io.StringIO()), "argon2id", {**CHEAP_ARGON2ID, "lanes": 16}
        )


def test_nothing_secret_in_repr(keyfile: Path) -> None:
    provider = stream_provider()
    wrapped = provider.wrap(random_key(), random_id())

    assert PASSPHRASE not in repr(provider)
    assert wrapped.blob.hex() not in repr(wrapped)
    assert "volume.key" in repr(KeyFileProvider(keyfile))


# ------------------------------------------------------------------------------ factory


def test_factory_makes_a_keyfile_provider(keyfile: Path) -> None:
    provider = provider_from_config(LocalKmsConfig(keyfile=keyfile))

    assert isinstance(provider, KeyFileProvider)
    assert provider.name == "local"
    assert provider.describe() == f"key file {keyfile}"


def test_factory_makes_a_stdin_passphrase_provider() -> None:
    kms = LocalKmsConfig(passphrase_stdin=True, kdf="scrypt", kdf_params=CHEAP_SCRYPT)
    provider = provider_from_config(kms, passphrase_stdin=io.StringIO(PASSPHRASE))
    volume_key, volume_id = random_key(), random_id()

    wrapped = provider.wrap(volume_key, volume_id)

    assert wrapped.params["kdf"] == "scrypt"
    assert stream_provider("scrypt", PASSPHRASE).unwrap(wrapped, volume_id) == volume_key


def test_factory_makes_a_passphrase_file_provider(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "passphrase", b"secret\n")
    kms = LocalKmsConfig(passphrase_file=path, kdf="argon2id", kdf_params=CHEAP_ARGON2ID)

    provider = provider_from_config(kms)

    assert isinstance(provider, PassphraseProvider)
    assert provider.describe() == f"passphrase file {path}"


def test_factory_without_stdin_refuses_a_stdin_passphrase() -> None:
    with pytest.raises(KeyProviderError, match="standard input"):
        provider_from_config(LocalKmsConfig(passphrase_stdin=True))


def test_factory_makes_an_openbao_provider_without_contacting_it() -> None:
    kms = OpenbaoKmsConfig("https://bao:8200", "clinic", OpenbaoAuthConfig("cert"))

    provider = provider_from_config(kms)

    assert provider.name == "openbao"
    assert provider.describe() == "OpenBao at https://bao:8200"


def test_factory_names_a_missing_optional_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def import_module(name: str) -> object:
        raise ModuleNotFoundError("No module named 'pkcs11'", name="pkcs11")

    monkeypatch.setattr(importlib, "import_module", import_module)
    kms = OpenbaoKmsConfig("https://bao:8200", "clinic", OpenbaoAuthConfig("cert"))

    with pytest.raises(KeyProviderError, match="needs the Python package python-pkcs11"):
        provider_from_config(kms)


def test_factory_lets_a_dermfs_bug_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def import_module(name: str) -> object:
        raise ModuleNotFoundError("No module named 'dermfs.nothing'", name="dermfs.nothing")

    monkeypatch.setattr(importlib, "import_module", import_module)

    with pytest.raises(ModuleNotFoundError):
        provider_from_config(LocalKmsConfig(keyfile=Path("/k")))
