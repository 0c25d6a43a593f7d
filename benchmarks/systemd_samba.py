"""Measure the unit path's mount time and a photo batch through the Samba share.

    .venv/bin/python benchmarks/systemd_samba.py

Mount time: the ExecStart line of systemd/dermfs@.service with NOTIFY_SOCKET, from
start until READY=1, median of 5. Photo batch: 20 x 4 MiB put by smbclient (encryption
required) into the dermfs share and into a plain directory share of the same smbd.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.mount.conftest import DERMFS, Volume, unmount
from tests.mount.test_samba import USER, running_smbd
from tests.mount.test_systemd import exec_start


def make_volume(base: Path) -> Volume:
    config = base / "v.yaml"
    config.write_text(
        "store: store\nkms:\n  provider: local\n  keyfile: v.key\n"
        "audit:\n  journal: v.audit\n  patient_id: '^patients/(?P<patient>[^/]+)/'\n"
    )
    (base / "mnt").mkdir()
    subprocess.run([*DERMFS, "init", str(config)], check=True, capture_output=True)
    return Volume(base, config, base / "store", base / "v.key", base / "mnt", base / "d.log")


def mount_time(volume: Volume) -> float:
    notify = volume.base / "notify.sock"
    notify.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        env = dict(os.environ, NOTIFY_SOCKET=str(notify), INVOCATION_ID="0" * 32)
        start = time.perf_counter()
        process = subprocess.Popen(exec_start(volume), env=env, stderr=subprocess.DEVNULL)
        sock.settimeout(60)
        while b"READY=1" not in sock.recv(4096):
            pass
        elapsed = time.perf_counter() - start
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    return elapsed


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="dermfs-bench-"))
    os.chmod(base, 0o711)
    volume = make_volume(base)
    times = [mount_time(volume) for _ in range(5)]
    print(
        f"unit path mount to READY=1: median {statistics.median(times):.3f} s "
        f"(runs {', '.join(f'{t:.3f}' for t in times)})"
    )

    batch = base / "batch"
    batch.mkdir()
    for index in range(20):
        (batch / f"IMG_{index:04d}.jpg").write_bytes(os.urandom(4 << 20))
    result = subprocess.run(
        [*DERMFS, "mount", str(volume.config), str(volume.mountpoint), "-o", "allow_other"],
        check=True,
        capture_output=True,
    )
    assert result.returncode == 0
    try:
        os.chmod(volume.mountpoint, 0o755)
        images = volume.mountpoint / "images"
        images.mkdir()
        nobody = pwd.getpwnam(USER)
        os.chown(images, nobody.pw_uid, nobody.pw_gid)
        with running_smbd(base, images) as samba:
            for share in ("imaging", "plain", "imaging", "plain"):
                start = time.perf_counter()
                done = samba.client(share, f"lcd {batch}", "prompt off", "mput *", cwd=str(base))
                elapsed = time.perf_counter() - start
                assert done.returncode == 0, done.stdout
                print(f"{share}: 20 x 4 MiB in {elapsed:.2f} s, {80 / elapsed:.1f} MiB/s")
                target = images if share == "imaging" else samba.plain
                for path in target.iterdir():
                    path.unlink()
    finally:
        unmount(volume)


if __name__ == "__main__":
    main()
