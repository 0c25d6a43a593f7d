"""The ``pkcs11`` provider against a SoftHSM2 token made in a temporary directory."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dermfs import exitcodes, format
from dermfs.config import Pkcs11KmsConfig
from dermfs.cryptocore import random_id, random_key
from dermfs.errors import KeyProviderError, WrongKeyError
from dermfs.keys import provider_from_config
from tests.kms.conftest import USER_PIN, KmsVolume, SoftHsm, write_secret

pytestmark = pytest.mark.kms


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """Return the one line a failed command printed on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dermfs: ")
    return lines[0]


def hsm_kms(softhsm: SoftHsm, *, key_label: str | None = None, pin_file: Path | None = None) -> str:
    """Return the indented ``kms`` lines of a ``pkcs11`` configuration."""
    return (
        "  provider: pkcs11\n"
        f"  module: {softhsm.module}\n"
        f"  token_label: {softhsm.token_label}\n"
        f"  key_label: {key_label or softhsm.key_label}\n"
        f"  pin_file: {pin_file or softhsm.pin_file}\n"
        "  retry_seconds: 1\n"
    )


def provider_config(softhsm: SoftHsm) -> Pkcs11KmsConfig:
    """Return the ``kms`` settings of the token, for in-process tests."""
    return Pkcs11KmsConfig(
        softhsm.module, softhsm.token_label, softhsm.key_label, softhsm.pin_file, retry_seconds=1
    )


def init_ok(kms_volume: KmsVolume) -> None:
    """Run ``dermfs init`` and insist that it worked."""
    result = kms_volume.init()
    assert result.returncode == 0, result.stderr


def mount_ok(kms_volume: KmsVolume) -> Path:
    """Mount the volume and return the mount point."""
    result = kms_volume.mount()
    assert result.returncode == 0, result.stderr
    return kms_volume.volume.mountpoint


def token_session(softhsm: SoftHsm) -> object:
    """Open a read-write session on the test token, logged in as the user."""
    import pkcs11

    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=softhsm.token_label)
    return token.open(user_pin=USER_PIN, rw=True)


@pytest.mark.mount
def test_init_mount_write_read(softhsm: SoftHsm, kms_volume: KmsVolume, need_fuse: None) -> None:
    kms_volume.configure(hsm_kms(softhsm))
    init_ok(kms_volume)
    slot = format.parse_volume_file(
        (kms_volume.volume.store / format.VOLUME_FILE).read_bytes()
    ).current_key
    assert (slot.provider, slot.key_name, slot.key_version) == ("pkcs11", "clinic-wrap", 1)
    assert len(slot.wrapped) == 56 and slot.params == {"mechanism": "CKM_AES_KEY_WRAP"}

    (mount_ok(kms_volume) / "scan.jpg").write_bytes(b"\xff\xd8" * 50_000)
    kms_volume.umount()
    assert (mount_ok(kms_volume) / "scan.jpg").read_bytes() == b"\xff\xd8" * 50_000
    kms_volume.umount()


def test_the_volume_id_is_bound(softhsm: SoftHsm) -> None:
    provider = provider_from_config(provider_config(softhsm))
    volume_key, volume_id = random_key(), random_id()

    wrapped = provider.wrap(volume_key, volume_id)

    assert provider.unwrap(wrapped, volume_id) == volume_key
    with pytest.raises(WrongKeyError, match="does not unwrap this volume's key"):
        provider.unwrap(wrapped, random_id())
    changed = dataclasses.replace(wrapped, blob=bytes([wrapped.blob[0] ^ 1]) + wrapped.blob[1:])
    with pytest.raises(WrongKeyError):
        provider.unwrap(changed, volume_id)


def test_a_wrong_pin(softhsm: SoftHsm, kms_volume: KmsVolume) -> None:
    kms_volume.configure(hsm_kms(softhsm))
    init_ok(kms_volume)
    wrong = write_secret(kms_volume.base / "wrong.pin", "0000\n")
    kms_volume.configure(hsm_kms(softhsm, pin_file=wrong))

    result = kms_volume.mount()

    assert result.returncode == exitcodes.WRONG_KEY
    line = one_line(result)
    assert "wrong PIN" in line and str(softhsm.module) in line
    assert "0000" not in line


def test_a_missing_key_label(softhsm: SoftHsm, kms_volume: KmsVolume) -> None:
    kms_volume.configure(hsm_kms(softhsm, key_label="no-such-key"))

    result = kms_volume.init()

    assert result.returncode == exitcodes.KEY_PROVIDER
    assert "no AES key labelled no-such-key" in one_line(result)
    assert not (kms_volume.volume.store / format.VOLUME_FILE).exists()


def test_a_pin_file_others_can_read_is_refused(softhsm: SoftHsm, kms_volume: KmsVolume) -> None:
    softhsm.pin_file.chmod(0o640)
    kms_volume.configure(hsm_kms(softhsm))

    result = kms_volume.init()

    assert result.returncode == exitcodes.INSECURE_FILE
    assert USER_PIN not in result.stderr


def test_the_wrapping_key_cannot_be_extracted(softhsm: SoftHsm) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    with token_session(softhsm) as session:  # type: ignore[attr-defined]
        key = session.get_key(
            object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=softhsm.key_label
        )
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]

        other = session.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            other.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP)


def test_an_extractable_key_is_refused_for_wrapping(softhsm: SoftHsm) -> None:
    from pkcs11 import Attribute, KeyType

    with token_session(softhsm) as session:  # type: ignore[attr-defined]
        session.generate_key(
            KeyType.AES,
            256,
            label="leaky",
            store=True,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
    provider = provider_from_config(
        dataclasses.replace(provider_config(softhsm), key_label="leaky")
    )

    with pytest.raises(KeyProviderError, match="can be extracted"):
        provider.wrap(random_key(), random_id())


@pytest.mark.mount
def test_rewrap_under_another_key_label(
    softhsm: SoftHsm, kms_volume: KmsVolume, need_fuse: None
) -> None:
    from pkcs11 import KeyType, ObjectClass

    from dermfs.keys.pkcs11 import create_wrapping_key

    kms_volume.configure(hsm_kms(softhsm))
    init_ok(kms_volume)
    (mount_ok(kms_volume) / "kept.txt").write_text("same volume key")
    kms_volume.umount()
    create_wrapping_key(softhsm.module, softhsm.token_label, USER_PIN, "clinic-wrap-2")

    result = kms_volume.run("rewrap", kms_volume.volume.config, "--key-label", "clinic-wrap-2")

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert "under HSM key clinic-wrap-2 (was clinic-wrap)" in result.stdout
    assert "set kms.key_label to clinic-wrap-2" in result.stdout
    with token_session(softhsm) as session:  # type: ignore[attr-defined]
        session.get_key(
            object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label="clinic-wrap"
        ).destroy()
    kms_volume.configure(hsm_kms(softhsm, key_label="clinic-wrap-2"))
    assert (mount_ok(kms_volume) / "kept.txt").read_text() == "same volume key"
    kms_volume.umount()


def test_a_missing_python_pkcs11_gives_a_clear_message(
    softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)
    monkeypatch.delitem(sys.modules, "dermfs.keys.pkcs11", raising=False)

    with pytest.raises(KeyProviderError, match="needs the Python package python-pkcs11"):
        provider_from_config(provider_config(softhsm))
