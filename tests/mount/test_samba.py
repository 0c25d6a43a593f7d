"""The shipped Samba snippet, over real SMB, exporting a dermfs mount.

``smbd`` runs on loopback on a free port, with its own configuration and state in the
test's temporary directory; the configuration is ``samba/dermfs-share.conf`` with the
share's path and user changed. The share's user is ``nobody``, so the write reaches
dermfs from an smbd worker running as uid 65534.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mount.conftest import REPO, Mount, Volume, mount_volume, run_dermfs

pytestmark = [pytest.mark.mount, pytest.mark.samba]

SNIPPET = REPO / "samba" / "dermfs-share.conf"
USER = "nobody"
PASSWORD = "imaging-device-1"


@dataclass
class Samba:
    """A running smbd and how to reach it."""

    port: int
    conf: Path
    plain: Path
    process: subprocess.Popen[bytes]

    def client(
        self, share: str, *commands: str, encrypt: bool = True, cwd: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run smbclient against *share* with *commands*; encryption required or refused."""
        options = (
            ["--client-protection=encrypt"]
            if encrypt
            else ["--option=client smb encrypt=off", "--option=client max protocol=SMB2_10"]
        )
        return subprocess.run(
            [
                "smbclient",
                f"//127.0.0.1/{share}",
                "-p",
                str(self.port),
                "-U",
                f"{USER}%{PASSWORD}",
                "-s",
                str(self.conf.with_name("client.conf")),
                *options,
                "-c",
                "; ".join(commands),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=cwd,
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def share_conf(base: Path, port: int, share_path: Path, plain: Path) -> str:
    """Return an smb.conf: private globals, then the shipped snippet, then a plain share."""
    state = base / "samba"
    for name in ("private", "lock", "state", "cache", "pid", "ncalrpc", "log"):
        (state / name).mkdir(parents=True, exist_ok=True)
    snippet = SNIPPET.read_text()
    assert "path = /mnt/dermfs/clinic" in snippet and "valid users = @imaging" in snippet
    snippet = snippet.replace("path = /mnt/dermfs/clinic", f"path = {share_path}")
    snippet = snippet.replace("valid users = @imaging", f"valid users = {USER}")
    return (
        "[global]\n"
        f"\tsmb ports = {port}\n"
        "\tinterfaces = lo\n"
        "\tbind interfaces only = yes\n"
        "\tdisable netbios = yes\n"
        "\tserver role = standalone server\n"
        f"\tprivate dir = {state / 'private'}\n"
        f"\tlock directory = {state / 'lock'}\n"
        f"\tstate directory = {state / 'state'}\n"
        f"\tcache directory = {state / 'cache'}\n"
        f"\tpid directory = {state / 'pid'}\n"
        f"\tncalrpc dir = {state / 'ncalrpc'}\n"
        f"\tlog file = {state / 'log' / 'log.%m'}\n"
        "\tpassdb backend = tdbsam\n"
        "\tload printers = no\n"
        "\tprinting = bsd\n"
        "\tprintcap name = /dev/null\n"
        "\tdisable spoolss = yes\n"
        f"{snippet}\n"
        "[plain]\n"
        f"\tpath = {plain}\n"
        "\tread only = no\n"
        f"\tvalid users = {USER}\n"
    )


@contextlib.contextmanager
def running_smbd(base: Path, share_path: Path) -> Iterator[Samba]:
    """Start smbd for *share_path* (and a plain directory), stop it on leaving."""
    for tool in ("smbd", "smbclient", "pdbedit"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing")
    port = _free_port()
    plain = base / "plain"
    plain.mkdir()
    os.chown(plain, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
    conf = base / "smb.conf"
    conf.write_text(share_conf(base, port, share_path, plain))
    conf.with_name("client.conf").write_text("[global]\n")
    added = subprocess.run(
        ["pdbedit", "-s", str(conf), "-a", "-u", USER, "-t"],
        input=f"{PASSWORD}\n{PASSWORD}\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    process = subprocess.Popen(
        ["smbd", "--foreground", "--no-process-group", "-s", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "smbd exited at start"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "smbd did not listen within 30 s"
            time.sleep(0.1)
        yield Samba(port, conf, plain, process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A temporary directory smbd's workers (uid nobody) can pass through.

    pytest's own lies below /tmp/pytest-of-root, mode 0700, where they could not reach
    the mount point; this one replaces it for the volume fixture too.
    """
    base = Path(tempfile.mkdtemp(prefix="dermfs-samba-"))
    os.chmod(base, 0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def share(volume: Volume, request: pytest.FixtureRequest) -> Iterator[tuple[Mount, Samba]]:
    """The volume mounted with allow_other, and smbd exporting its images/ directory."""
    for mount in mount_volume(volume, request, "allow_other"):
        os.chmod(mount.path, 0o755)
        images = mount.path / "images"
        images.mkdir()
        os.chown(images, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
        with running_smbd(volume.base, images) as samba:
            yield mount, samba


def test_encrypted_put_get_and_store(share: tuple[Mount, Samba], tmp_path: Path) -> None:
    """A 5 MiB image goes in and back byte for byte; the store holds it encrypted."""
    mount, samba = share
    image = tmp_path / "IMG_20240501_0001.dng"
    data = os.urandom(5 * 1024 * 1024)
    image.write_bytes(data)
    back = tmp_path / "back.dng"

    result = samba.client(
        "imaging", f"put {image} {image.name}", f"get {image.name} {back}", cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert back.read_bytes() == data
    visible = mount.path / "images" / image.name
    assert visible.read_bytes() == data
    assert visible.stat().st_uid == pwd.getpwnam(USER).pw_uid

    store = mount.volume.store
    probe = data[1 << 20 : (1 << 20) + 64]
    for path in store.rglob("*"):
        assert image.name not in path.name and "IMG_2024" not in path.name
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            assert probe not in content and image.name.encode() not in content, path

    # smbd may still hold the file open; its merged write range reaches the journal at
    # the next flush, which comes at least once a second (docs/audit.md).
    deadline = time.monotonic() + 10
    while True:
        query = run_dermfs("audit", "query", mount.volume.config, "--json")
        assert query.returncode == 0, query.stderr
        records = [json.loads(line) for line in query.stdout.splitlines() if line.strip()]
        writes = [
            r
            for r in records
            if "write" in str(r.get("event")) and image.name in str(r.get("path"))
        ]
        if writes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert writes, query.stdout[-2000:]
    assert any(r.get("uid") == pwd.getpwnam(USER).pw_uid for r in writes), writes


def test_unencrypted_client_turned_away(share: tuple[Mount, Samba], tmp_path: Path) -> None:
    """A client that will not encrypt (or speaks only SMB2) gets no access."""
    _mount, samba = share
    result = samba.client("imaging", "ls", encrypt=False, cwd=str(tmp_path))
    assert result.returncode != 0, result.stdout
    assert not list((_mount.path / "images").iterdir())
