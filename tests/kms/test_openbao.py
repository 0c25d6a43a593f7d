"""The ``openbao`` provider against a real OpenBao server, through the command line.

Every mount goes through ``python -m dermfs mount`` and is unmounted in teardown. Each
test uses a Transit key of its own, so that rotations and retirements do not leak into
other tests sharing the session's server.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dermfs import exitcodes, format
from dermfs.config import OpenbaoAuthConfig, OpenbaoKmsConfig
from dermfs.cryptocore import random_id, random_key
from dermfs.errors import KeyProviderError, WrongKeyError
from dermfs.keys import provider_from_config
from tests.kms.conftest import Bao, KmsVolume, free_port, write_secret

pytestmark = pytest.mark.kms


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """Return the one line a failed command printed on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dermfs: ")
    return lines[0]


def bao_kms(
    bao: Bao,
    key: str,
    auth: str,
    *,
    address: str | None = None,
    ca_file: Path | None = None,
    client_cert: bool = False,
    retry_seconds: float = 3,
) -> str:
    """Return the indented ``kms`` lines of an ``openbao`` configuration."""
    lines = [
        "  provider: openbao",
        f"  address: {address or bao.address}",
        f"  key: {key}",
        f"  ca_file: {ca_file or bao.pki.ca}",
        f"  retry_seconds: {retry_seconds}",
        f"  auth: {auth}",
    ]
    if client_cert:
        lines += [f"  client_cert: {bao.pki.client_cert}", f"  client_key: {bao.pki.client_key}"]
    return "\n".join(lines) + "\n"


def token_volume(kms_volume: KmsVolume, bao: Bao, key: str, **options: object) -> Path:
    """Configure *kms_volume* for token login with a token for *key*; return the token file."""
    token_file = write_secret(kms_volume.base / "bao.token", bao.make_token(key))
    kms_volume.configure(
        bao_kms(bao, key, f"{{method: token, token_file: {token_file}}}", **options)  # type: ignore[arg-type]
    )
    return token_file


def init_ok(kms_volume: KmsVolume) -> None:
    """Run ``dermfs init`` and insist that it worked."""
    result = kms_volume.init()
    assert result.returncode == 0, result.stderr


def mount_ok(kms_volume: KmsVolume) -> Path:
    """Mount the volume and return the mount point."""
    result = kms_volume.mount()
    assert result.returncode == 0, result.stderr
    return kms_volume.volume.mountpoint


def reconfigure(kms_volume: KmsVolume, old: str, new: str) -> None:
    """Replace *old* by *new* in the configuration file."""
    config = kms_volume.volume.config
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


def current_slot(kms_volume: KmsVolume) -> format.KeySlot:
    """Return the current key slot of the volume file."""
    data = (kms_volume.volume.store / format.VOLUME_FILE).read_bytes()
    return format.parse_volume_file(data).current_key


def mount_fails(kms_volume: KmsVolume) -> tuple[int, str]:
    """Mount, expecting a failure; return the exit status and the one error line."""
    result = kms_volume.mount()
    assert result.returncode != 0
    assert not kms_volume.volume.mountpoint.is_mount()
    assert list(kms_volume.volume.mountpoint.iterdir()) == []
    return result.returncode, one_line(result)


# ------------------------------------------------------------------------------ working


@pytest.mark.mount
def test_token_init_mount_write_read_remount(
    bao: Bao, kms_volume: KmsVolume, need_fuse: None
) -> None:
    key = bao.make_key("token-mount")
    token_file = token_volume(kms_volume, bao, key)
    init_ok(kms_volume)

    slot = current_slot(kms_volume)
    assert (slot.provider, slot.key_name, slot.key_version) == ("openbao", key, 1)
    assert slot.wrapped.startswith(b"vault:v1:")
    assert token_file.read_text() not in (kms_volume.volume.store / "dermfs.volume").read_text()

    mountpoint = mount_ok(kms_volume)
    (mountpoint / "patients").mkdir()
    (mountpoint / "patients" / "scan.dcm").write_bytes(b"lesion" * 10_000)
    kms_volume.umount()

    mountpoint = mount_ok(kms_volume)
    assert (mountpoint / "patients" / "scan.dcm").read_bytes() == b"lesion" * 10_000
    kms_volume.umount()


@pytest.mark.mount
def test_approle_login(bao: Bao, kms_volume: KmsVolume, need_fuse: None) -> None:
    key = bao.make_key("approle")
    role_id, secret_id = bao.make_approle(key)
    secret_file = write_secret(kms_volume.base / "secret-id", secret_id + "\n")
    auth = f"{{method: approle, role_id: {role_id}, secret_id_file: {secret_file}}}"
    kms_volume.configure(bao_kms(bao, key, auth))
    init_ok(kms_volume)

    mountpoint = mount_ok(kms_volume)
    (mountpoint / "note.txt").write_text("approle")
    kms_volume.umount()
    assert mount_ok(kms_volume).joinpath("note.txt").read_text() == "approle"


@pytest.mark.mount
def test_cert_login(bao: Bao, kms_volume: KmsVolume, need_fuse: None) -> None:
    key = bao.make_key("cert")
    bao.allow_cert(key)
    kms_volume.configure(bao_kms(bao, key, "{method: cert}", client_cert=True))
    init_ok(kms_volume)

    mountpoint = mount_ok(kms_volume)
    (mountpoint / "note.txt").write_text("cert")
    kms_volume.umount()
    assert mount_ok(kms_volume).joinpath("note.txt").read_text() == "cert"


def test_the_volume_id_is_bound(bao: Bao, tmp_path: Path) -> None:
    key = bao.make_key("binding")
    token_file = write_secret(tmp_path / "token", bao.make_token(key))
    config = OpenbaoKmsConfig(
        bao.address,
        key,
        OpenbaoAuthConfig("token", token_file=token_file),
        ca_file=bao.pki.ca,
        retry_seconds=1,
    )
    provider = provider_from_config(config)
    volume_key, volume_id = random_key(), random_id()

    wrapped = provider.wrap(volume_key, volume_id)

    assert wrapped.blob.startswith(b"vault:v1:")
    assert provider.unwrap(wrapped, volume_id) == volume_key
    with pytest.raises(WrongKeyError, match="does not unwrap this volume's key"):
        provider.unwrap(wrapped, random_id())


def test_only_the_configured_ca_is_trusted(bao: Bao, monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    from dermfs.keys import https

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bao.pki.other_ca))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    context = https.tls_context(bao.pki.ca, None, None)
    session = https.session(https.TlsAdapter(context))

    response = session.get(f"{bao.address}/v1/sys/health", verify=str(bao.pki.other_ca))

    assert response.status_code == 200
    assert len(context.get_ca_certs()) == 1
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    with pytest.raises(requests.exceptions.InvalidSchema):
        session.get(bao.address.replace("https:", "http:"))


# ------------------------------------------------------------------------------ refused


def test_a_tls12_only_server_is_refused(bao: Bao, kms_volume: KmsVolume) -> None:
    key = bao.make_key("tls12")
    token_volume(kms_volume, bao, key)
    init_ok(kms_volume)
    reconfigure(kms_volume, bao.address, bao.tls12_address)

    status, line = mount_fails(kms_volume)

    assert status == exitcodes.KEY_PROVIDER
    assert bao.tls12_address in line
    assert "TLS failure" in line and "TLS 1.3" in line


def test_a_wrong_ca_is_refused(bao: Bao, kms_volume: KmsVolume) -> None:
    key = bao.make_key("wrong-ca")
    token_volume(kms_volume, bao, key)
    init_ok(kms_volume)
    reconfigure(kms_volume, str(bao.pki.ca), str(bao.pki.other_ca))

    status, line = mount_fails(kms_volume)

    assert status == exitcodes.KEY_PROVIDER
    assert bao.address in line
    assert "TLS failure" in line and "does not verify" in line


def test_a_revoked_token_fails_clearly(bao: Bao, kms_volume: KmsVolume) -> None:
    key = bao.make_key("revoked")
    token_file = token_volume(kms_volume, bao, key)
    init_ok(kms_volume)
    token = token_file.read_text()
    bao.revoke(token)

    status, line = mount_fails(kms_volume)

    assert status == exitcodes.KEY_PROVIDER
    assert bao.address in line
    assert "token" in line and "not valid" in line and "revoked" in line
    assert token not in line


def test_bad_approle_credentials(bao: Bao, kms_volume: KmsVolume) -> None:
    key = bao.make_key("bad-approle")
    role_id, _secret_id = bao.make_approle(key)
    wrong_secret = "11111111-2222-3333-4444-555555555555"
    secret_file = write_secret(kms_volume.base / "secret-id", wrong_secret)
    auth = f"{{method: approle, role_id: {role_id}, secret_id_file: {secret_file}}}"
    kms_volume.configure(bao_kms(bao, key, auth))

    result = kms_volume.init()

    assert result.returncode == exitcodes.KEY_PROVIDER
    line = one_line(result)
    assert "bad credentials" in line and "approle" in line
    assert wrong_secret not in result.stderr + result.stdout
    assert not (kms_volume.volume.store / "dermfs.volume").exists()


def test_a_token_without_the_policy_is_denied(bao: Bao, kms_volume: KmsVolume) -> None:
    allowed = bao.make_key("policy-allowed")
    other = bao.make_key("policy-other")
    token_volume(kms_volume, bao, allowed)
    reconfigure(kms_volume, f"key: {allowed}", f"key: {other}")

    result = kms_volume.init()

    assert result.returncode == exitcodes.KEY_PROVIDER
    line = one_line(result)
    assert "permission denied" in line and f"transit/{other}" in line


def test_a_missing_key_is_named(bao: Bao, kms_volume: KmsVolume) -> None:
    key = bao.make_key("soon-gone")
    root_token = write_secret(kms_volume.base / "root.token", bao.root_token)
    kms_volume.configure(bao_kms(bao, key, f"{{method: token, token_file: {root_token}}}"))
    init_ok(kms_volume)
    bao.delete_key(key)

    status, line = mount_fails(kms_volume)

    assert status == exitcodes.KEY_PROVIDER
    assert f"Transit key transit/{key} does not exist" in line


def test_a_token_file_others_can_read_is_refused(bao: Bao, kms_volume: KmsVolume) -> None:
    key = bao.make_key("loose-token")
    token_file = token_volume(kms_volume, bao, key)
    token_file.chmod(0o644)

    result = kms_volume.init()

    assert result.returncode == exitcodes.INSECURE_FILE
    assert "chmod 600" in one_line(result)
    assert token_file.read_text() not in result.stderr


def test_the_server_down_fails_within_the_wait(bao: Bao, kms_volume: KmsVolume) -> None:
    key = bao.make_key("down")
    token_volume(kms_volume, bao, key)
    init_ok(kms_volume)
    dead = f"https://127.0.0.1:{free_port()}"
    reconfigure(kms_volume, bao.address, dead)

    started = time.monotonic()
    status, line = mount_fails(kms_volume)
    elapsed = time.monotonic() - started

    assert status == exitcodes.KEY_PROVIDER
    assert dead in line and "connection refused" in line and "gave up after" in line
    assert 3 <= elapsed < 10


def test_a_server_that_never_answers_fails_within_the_wait(bao: Bao, kms_volume: KmsVolume) -> None:
    key = bao.make_key("silent")
    token_volume(kms_volume, bao, key)
    init_ok(kms_volume)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts
        address = f"https://127.0.0.1:{silent.getsockname()[1]}"
        reconfigure(kms_volume, bao.address, address)

        started = time.monotonic()
        status, line = mount_fails(kms_volume)
        elapsed = time.monotonic() - started

    assert status == exitcodes.KEY_PROVIDER
    assert address in line and "no answer (timed out)" in line
    assert 3 <= elapsed < 10


# ------------------------------------------------------------------------------ rotation


@pytest.mark.mount
def test_rewrap_then_retire_the_old_version(
    bao: Bao, kms_volume: KmsVolume, need_fuse: None
) -> None:
    key = bao.make_key("rotate")
    token_volume(kms_volume, bao, key)
    init_ok(kms_volume)
    (mount_ok(kms_volume) / "before.txt").write_text("written under version 1")
    kms_volume.umount()

    bao.rotate(key)
    result = kms_volume.run("rewrap", kms_volume.volume.config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert f"Transit key transit/{key} version 2 (was {key} version 1)" in result.stdout
    slot = current_slot(kms_volume)
    assert slot.key_version == 2 and slot.wrapped.startswith(b"vault:v2:")

    bao.retire_below(key, 2)
    mountpoint = mount_ok(kms_volume)
    assert (mountpoint / "before.txt").read_text() == "written under version 1"
    kms_volume.umount()


def test_retiring_without_rewrap_fails_clearly(bao: Bao, kms_volume: KmsVolume) -> None:
    key = bao.make_key("retire")
    token_volume(kms_volume, bao, key)
    init_ok(kms_volume)
    bao.rotate(key)
    bao.retire_below(key, 2)

    status, line = mount_fails(kms_volume)

    assert status == exitcodes.KEY_PROVIDER
    assert f"version 1 of Transit key transit/{key}" in line and "retired" in line
    assert "dermfs rewrap" in line


@pytest.mark.mount
def test_rewrap_refuses_a_mounted_store(bao: Bao, kms_volume: KmsVolume, need_fuse: None) -> None:
    key = bao.make_key("rewrap-mounted")
    token_volume(kms_volume, bao, key)
    init_ok(kms_volume)
    mount_ok(kms_volume)
    before = (kms_volume.volume.store / "dermfs.volume").read_bytes()

    result = kms_volume.run("rewrap", kms_volume.volume.config)

    assert result.returncode == exitcodes.STORE
    assert "in use" in one_line(result)
    assert (kms_volume.volume.store / "dermfs.volume").read_bytes() == before
    kms_volume.umount()


# ------------------------------------------------------------------------------ package


def test_a_missing_hvac_gives_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hvac", None)
    monkeypatch.delitem(sys.modules, "dermfs.keys.openbao", raising=False)
    config = OpenbaoKmsConfig("https://bao:8200", "clinic", OpenbaoAuthConfig("cert"))

    with pytest.raises(KeyProviderError, match="needs the Python package hvac"):
        provider_from_config(config)
