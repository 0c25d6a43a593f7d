"""``dermfs rewrap`` with the ``local`` provider: a new key file or passphrase, atomically.

The ``openbao`` and ``pkcs11`` rewraps run against real servers in ``tests/kms``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dermfs import cli, exitcodes, format
from dermfs.audit import read_records
from dermfs.errors import WrongKeyError
from dermfs.keys.local import KeyFileProvider, PassphraseFile, PassphraseProvider
from dermfs.volume import Volume

PATIENT_ID = "'^patients/(?P<patient>[^/]+)/'"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """An initialised store with a local key file."""
    path = tmp_path / "clinic.yaml"
    path.write_text(
        "store: store\nkms:\n  provider: local\n  keyfile: old.key\n"
        f"audit:\n  journal: clinic.audit\n  patient_id: {PATIENT_ID}\n"
    )
    assert cli.main(["init", str(path)]) == exitcodes.OK
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run the command line in this process; return status, stdout and stderr."""
    status = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def audit_key_of(store: Path, keyfile: Path) -> bytes:
    """Open the store with *keyfile* and return a subkey, which shows the volume key."""
    volume = Volume.open(store, KeyFileProvider(keyfile))
    try:
        return volume.audit_key().reveal()
    finally:
        volume.close()


def test_rewrap_under_a_new_key_file(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = config.parent
    capsys.readouterr()
    before = audit_key_of(base / "store", base / "old.key")

    status, out, err = run(capsys, "rewrap", config, "--new-keyfile", base / "new.key")

    assert (status, err) == (exitcodes.OK, "")
    assert out.count("\n") == 1
    assert f"under key file {base / 'new.key'}; point kms.keyfile at it" in out
    assert (base / "new.key").stat().st_mode & 0o777 == 0o600
    assert audit_key_of(base / "store", base / "new.key") == before
    with pytest.raises(WrongKeyError):
        Volume.open(base / "store", KeyFileProvider(base / "old.key"))
    assert not [name for name in (base / "store").iterdir() if "tmp" in name.name]


def test_rewrap_under_a_passphrase(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = config.parent
    passphrase = base / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    capsys.readouterr()
    before = audit_key_of(base / "store", base / "old.key")

    status, out, _err = run(capsys, "rewrap", config, "--new-passphrase-file", passphrase)

    assert status == exitcodes.OK
    assert "point kms.passphrase_file at it" in out
    slot = format.parse_volume_file((base / "store" / format.VOLUME_FILE).read_bytes()).keys[0]
    assert slot.key_name == "passphrase" and slot.params["kdf"] == "argon2id"
    volume = Volume.open(base / "store", PassphraseProvider(PassphraseFile(passphrase)))
    try:
        assert volume.audit_key().reveal() == before
    finally:
        volume.close()


def test_rewrap_is_recorded_in_the_audit_journal(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = config.parent
    run(capsys, "rewrap", config, "--new-keyfile", base / "new.key")

    volume = Volume.open(base / "store", KeyFileProvider(base / "new.key"))
    try:
        records, result = read_records(base / "clinic.audit", volume.volume_id, volume.audit_key())
    finally:
        volume.close()
    assert result.damage is None
    assert [record.event for record in records][-1] == "rewrap"


def test_rewrap_local_needs_a_new_key(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    before = (config.parent / "store" / format.VOLUME_FILE).read_bytes()

    status, _out, err = run(capsys, "rewrap", config)

    assert status == exitcodes.USAGE
    assert err.count("\n") == 1 and "--new-keyfile PATH or --new-passphrase-file PATH" in err
    assert (config.parent / "store" / format.VOLUME_FILE).read_bytes() == before


def test_rewrap_local_refuses_a_key_label(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _out, err = run(capsys, "rewrap", config, "--key-label", "x")

    assert status == exitcodes.USAGE
    assert "--key-label is for key provider pkcs11, not local" in err


def test_rewrap_refuses_a_store_in_use(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = config.parent
    holder = Volume.open(base / "store", KeyFileProvider(base / "old.key"))
    holder.lock()
    before = (base / "store" / format.VOLUME_FILE).read_bytes()
    try:
        status, _out, err = run(capsys, "rewrap", config, "--new-keyfile", base / "new.key")
    finally:
        holder.close()

    assert status == exitcodes.STORE
    assert "in use by another dermfs process" in err
    assert (base / "store" / format.VOLUME_FILE).read_bytes() == before
    assert not (base / "new.key").exists()


def test_a_failed_new_wrap_leaves_the_volume_file(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = config.parent
    loose = base / "loose.key"
    loose.write_bytes(b"k" * 32)
    loose.chmod(0o644)
    before = (base / "store" / format.VOLUME_FILE).read_bytes()

    status, _out, err = run(capsys, "rewrap", config, "--new-keyfile", loose)

    assert status == exitcodes.INSECURE_FILE
    assert "chmod 600" in err
    assert (base / "store" / format.VOLUME_FILE).read_bytes() == before


def test_rewrap_options_are_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _err = run(capsys, "rewrap", "--help")

    assert status == exitcodes.OK
    for option in ("--key-label", "--new-keyfile", "--new-passphrase-file"):
        assert option in out
