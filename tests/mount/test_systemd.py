"""The systemd units and the fstab path, against a real mount.

The readiness test plays systemd's part for ``systemd/dermfs@.service``: it takes the
unit's ``ExecStart`` line, substitutes ``%i`` and ``${DERMFS_MOUNTPOINT}`` and maps
``/usr/bin/dermfs`` and ``/etc/dermfs`` to the test's, listens on a ``NOTIFY_SOCKET``,
and checks ``READY=1`` (only once the mount answers), SIGTERM, ``STOPPING=1``, a clean
exit and that the data survives a remount.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mount.conftest import REPO, Volume, is_mounted, process_running, run_dermfs, unmount

pytestmark = pytest.mark.mount

UNITS = REPO / "systemd"
SERVICE = UNITS / "dermfs@.service"
VENV_DERMFS = Path(sys.executable).with_name("dermfs")
#: The PATH a helper of mount(8) sees: mount(8) drops PATH, and /bin/sh falls back to this.
HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unit_directive(text: str, key: str) -> list[str]:
    """Return every value of *key* in a unit file's text."""
    return [
        line.partition("=")[2].strip()
        for line in text.splitlines()
        if line.strip().startswith(f"{key}=")
    ]


def exec_start(volume: Volume, instance: str = "test") -> list[str]:
    """Return the service's ExecStart line for *volume*, as systemd would run it."""
    text = SERVICE.read_text()
    (line,) = unit_directive(text, "ExecStart")
    (environment,) = unit_directive(text, "Environment")
    assert environment.startswith("DERMFS_MOUNTPOINT=")
    argv = shlex.split(line.replace("%i", instance))
    assert argv[0] == "/usr/bin/dermfs"
    config = f"/etc/dermfs/{instance}.yaml"
    assert config in argv and "${DERMFS_MOUNTPOINT}" in argv
    mapping = {config: str(volume.config), "${DERMFS_MOUNTPOINT}": str(volume.mountpoint)}
    return [str(VENV_DERMFS), *(mapping.get(arg, arg) for arg in argv[1:])]


def receive(sock: socket.socket, timeout: float) -> str:
    """Return the next notification datagram, or fail after *timeout* seconds."""
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def test_readiness_stop_and_remount(volume: Volume, tmp_path: Path) -> None:
    """READY=1 comes once the mount answers, SIGTERM unmounts cleanly, data survives."""
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify), INVOCATION_ID="0" * 32)
    process = subprocess.Popen(
        exec_start(volume), env=env, stderr=subprocess.PIPE, text=True, cwd="/"
    )
    try:
        # Not mounted before READY=1 arrives... (the datagram is queued, not lost)
        ready: list[str] = []
        deadline = time.monotonic() + 60
        while not ready and time.monotonic() < deadline:
            try:
                message = receive(sock, 0.02)
            except TimeoutError:
                assert process.poll() is None, process.stderr and process.stderr.read()
                continue
            mounted_at_ready = is_mounted(volume.mountpoint) and os.path.ismount(volume.mountpoint)
            ready.append(message)
        assert ready, "no notification within 60 s"
        fields = dict(line.partition("=")[::2] for line in ready[0].splitlines())
        assert fields.get("READY") == "1", ready
        assert fields.get("MAINPID") == str(process.pid)
        assert mounted_at_ready
        (volume.mountpoint / "patients").mkdir()
        data = os.urandom(300_000)
        (volume.mountpoint / "patients" / "scan.dcm").write_bytes(data)

        process.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in receive(sock, 30).splitlines()
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert not is_mounted(volume.mountpoint)
        # Under systemd (INVOCATION_ID set) log lines carry journald priorities, no time.
        for line in stderr.splitlines():
            assert line[:1] == "<" and line[2:3] == ">", line
        pid = volume.daemon_pid()
        assert pid is None or not process_running(pid)
    finally:
        sock.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        unmount(volume)

    result = volume.mount()
    assert result.returncode == 0, result.stderr
    try:
        assert (volume.mountpoint / "patients" / "scan.dcm").read_bytes() == data
    finally:
        unmount(volume)
    checked = run_dermfs("fsck", volume.config, "--no-progress")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing")
    return found


def _installed_copy(unit: Path, directory: Path, name: str) -> Path:
    """Copy *unit* as *name*, with /usr/bin/dermfs pointing at this tree's program.

    ``systemd-analyze verify`` checks that every command exists; the source tree's unit
    names the packaged /usr/bin/dermfs, which need not be installed here.
    """
    copy = directory / name
    copy.write_text(unit.read_text().replace("/usr/bin/dermfs", str(VENV_DERMFS)))
    return copy


@pytest.mark.parametrize(
    "unit,name",
    [("dermfs@.service", "dermfs@clinic.service"), ("mnt-dermfs-clinic.mount", None)],
)
def test_units_verify(unit: str, name: str | None, tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing wrong with any unit file."""
    analyze = _analyze()
    copy = _installed_copy(UNITS / unit, tmp_path, name or unit)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_every_unit_is_verified() -> None:
    """No unit file in systemd/ escapes test_units_verify."""
    assert sorted(p.name for p in UNITS.iterdir()) == [
        "dermfs@.service",
        "mnt-dermfs-clinic.mount",
    ]


def test_service_hides_no_mount(tmp_path: Path) -> None:
    """No directive that gives the service a mount namespace; exposure is recorded."""
    text = SERVICE.read_text()
    keys = {line.partition("=")[0].strip() for line in text.splitlines() if "=" in line}
    keys = {key for key in keys if not key.startswith("#")}
    forbidden = {
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateMounts",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProcSubset",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "ReadWritePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "BindReadOnlyPaths",
        "RootDirectory",
        "MountAPIVFS",
    }
    assert not keys & forbidden
    analyze = _analyze()
    copy = _installed_copy(SERVICE, tmp_path, "dermfs@clinic.service")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Overall exposure level" in result.stdout, result.stderr
    score = result.stdout.rpartition("Overall exposure level")[2].split(":")[1].split()[0]
    assert float(score) <= 5.0, result.stdout


# ------------------------------------------------------------------------------ fstab


@pytest.fixture
def dermfs_on_helper_path() -> Iterator[None]:
    """Put this tree's dermfs where mount(8) looks, for the test only, if nothing is there.

    mount(8) runs mount.fuse3 without PATH, and mount.fuse3 runs ``dermfs`` from the
    standard directories. As root on a machine without an installed dermfs (CI), a
    symlink in /usr/local/bin stands in for the package's /usr/bin/dermfs; it is removed
    again in teardown, also when the test fails.
    """
    link = Path("/usr/local/bin/dermfs")
    made = False
    if (
        shutil.which("dermfs", path=HELPER_PATH) is None
        and os.geteuid() == 0
        and link.parent.is_dir()
        and not link.is_symlink()
    ):
        link.symlink_to(VENV_DERMFS)
        made = True
    try:
        yield
    finally:
        if made:
            link.unlink()


def test_mount_fuse3_fstab_form(volume: Volume, dermfs_on_helper_path: None) -> None:
    """``mount -t fuse.dermfs CONFIG MNT`` mounts; ``umount MNT`` loses nothing."""
    for tool in ("mount", "umount", "mount.fuse3"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing")
    found = shutil.which("dermfs", path=HELPER_PATH)
    if found is None or Path(found).resolve() != VENV_DERMFS.resolve():
        pytest.skip(
            "mount(8) runs its helpers without PATH: needs this tree's dermfs as "
            f"dermfs in {HELPER_PATH} (found {found})"
        )
    result = subprocess.run(
        [
            "mount",
            "-t",
            "fuse.dermfs",
            "-o",
            "nosuid,nodev",
            str(volume.config),
            str(volume.mountpoint),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert is_mounted(volume.mountpoint)
    pid = volume.daemon_pid()
    assert pid is not None
    data = os.urandom(200_000)
    (volume.mountpoint / "image.jpg").write_bytes(data)

    result = subprocess.run(
        ["umount", str(volume.mountpoint)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    # umount(8) does not wait for the daemon; it finishes writing back, then exits.
    deadline = time.monotonic() + 60
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_running(pid)

    result = volume.mount()
    assert result.returncode == 0, result.stderr
    try:
        assert (volume.mountpoint / "image.jpg").read_bytes() == data
    finally:
        unmount(volume)


def test_fstab_form_leaves_commands_alone(tmp_path: Path) -> None:
    """The CONFIG MOUNTPOINT form is taken only for a file and a directory."""
    from dermfs.cli import fstab_form

    config = tmp_path / "v.yaml"
    config.write_text("")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert fstab_form([str(config), str(mnt), "-o", "rw"]) == [
        "mount",
        str(config),
        str(mnt),
        "-o",
        "rw",
    ]
    assert fstab_form(["fsck", str(config)]) == ["fsck", str(config)]
    assert fstab_form([str(mnt), str(mnt)]) == [str(mnt), str(mnt)]
    assert fstab_form([str(config), str(config)]) == [str(config), str(config)]
    assert fstab_form(["-v", str(config), str(mnt)]) == ["-v", str(config), str(mnt)]
