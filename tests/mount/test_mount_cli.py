"""``dermfs mount`` and ``umount``: errors, foreground mode, systemd readiness, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dermfs import exitcodes
from tests.mount.conftest import (
    DERMFS,
    REPO,
    Mount,
    Volume,
    is_mounted,
    process_running,
    run_dermfs,
)

pytestmark = pytest.mark.mount


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """Return the single line a failed command printed on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dermfs: ")
    return lines[0]


def test_mount_and_umount_from_the_command_line(volume: Volume) -> None:
    result = volume.mount()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert is_mounted(volume.mountpoint)
    (volume.mountpoint / "file").write_text("written before umount")
    pid = volume.daemon_pid()
    assert pid is not None and process_running(pid)
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core  # no core dumps of the daemon's memory

    result = volume.umount()
    assert result.returncode == 0, result.stderr
    assert not is_mounted(volume.mountpoint)
    assert not process_running(pid)
    assert not (volume.store / "dermfs.intent").exists()

    with open("/proc/self/mountinfo") as mounts:
        assert str(volume.mountpoint) not in mounts.read()
    line = one_line(volume.umount())
    assert "not mounted" in line


def test_mount_source_names_the_store(mounted: Mount) -> None:
    with open("/proc/self/mountinfo") as mounts:
        line = next(line for line in mounts if f" {mounted.path} " in line)
    fields = line.split()
    separator = fields.index("-")
    assert fields[separator + 1] == "fuse.dermfs"
    assert fields[separator + 2] == str(mounted.volume.store)
    assert "default_permissions" in line


def test_wrong_key(volume: Volume) -> None:
    volume.keyfile.chmod(0o600)
    volume.keyfile.write_bytes(os.urandom(32))
    result = volume.mount()
    assert result.returncode == exitcodes.WRONG_KEY
    one_line(result)
    assert not is_mounted(volume.mountpoint)


def test_missing_and_non_empty_mount_point(volume: Volume) -> None:
    result = run_dermfs("mount", volume.config, volume.base / "missing")
    assert result.returncode == exitcodes.MOUNT
    assert "does not exist" in one_line(result)

    (volume.mountpoint / "stray").write_text("x")
    result = volume.mount()
    assert result.returncode == exitcodes.MOUNT
    assert "not empty" in one_line(result)
    assert not is_mounted(volume.mountpoint)


def test_already_mounted_and_store_in_use(mounted: Mount) -> None:
    result = mounted.volume.mount()
    assert result.returncode == exitcodes.MOUNT
    assert "already mounted" in one_line(result)

    second = mounted.volume.base / "second"
    second.mkdir()
    result = run_dermfs("mount", mounted.volume.config, second)
    assert result.returncode == exitcodes.STORE
    assert "in use" in one_line(result)
    assert not is_mounted(second)


def test_fusermount_missing(volume: Volume) -> None:
    result = run_dermfs("mount", volume.config, volume.mountpoint, env={"PATH": "/nonexistent"})
    assert result.returncode == exitcodes.MOUNT
    assert "fusermount3 is missing" in one_line(result)
    assert not is_mounted(volume.mountpoint)


def test_unknown_option(volume: Volume) -> None:
    result = volume.mount("-o", "bogus_option")
    assert result.returncode == exitcodes.MOUNT
    assert "bogus_option" in one_line(result)


def test_store_of_another_format_version(volume: Volume) -> None:
    volume_file = volume.store / "dermfs.volume"
    volume_file.write_text(volume_file.read_text().replace('"dermfs": 1', '"dermfs": 2'))
    result = volume.mount()
    assert result.returncode == exitcodes.FORMAT
    assert "version" in one_line(result)


def test_foreground_notify_and_sigterm(volume: Volume, tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    daemon = subprocess.Popen(
        [*DERMFS, "mount", str(volume.config), str(volume.mountpoint), "-f"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message
        assert f"MAINPID={daemon.pid}" in message
        assert is_mounted(volume.mountpoint)
        (volume.mountpoint / "kept").write_text("flushed at SIGTERM")

        daemon.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert daemon.wait(timeout=30) == 0
        assert not is_mounted(volume.mountpoint)
        assert not (volume.store / "dermfs.intent").exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        listener.close()
        stderr = daemon.stderr.read() if daemon.stderr else ""
        if daemon.stderr:
            daemon.stderr.close()
    assert "WARNING" not in stderr and "ERROR" not in stderr, stderr

    result = volume.mount()
    assert result.returncode == 0, result.stderr
    assert (volume.mountpoint / "kept").read_text() == "flushed at SIGTERM"


@pytest.mark.expect_log
def test_sigterm_while_busy_detaches_and_finishes(volume: Volume) -> None:
    result = volume.mount()
    assert result.returncode == 0, result.stderr
    pid = volume.daemon_pid()
    assert pid is not None
    holder = open(volume.mountpoint / "held", "w")  # noqa: SIM115 - keeps the mount busy
    try:
        holder.write("still open at SIGTERM")
        holder.flush()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while is_mounted(volume.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(volume.mountpoint)
        assert process_running(pid)  # still serving the open file
        holder.write(" and more")
    finally:
        holder.close()
    deadline = time.monotonic() + 10
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_running(pid)
    assert "busy" in volume.log_text()

    result = volume.mount()
    assert result.returncode == 0, result.stderr
    assert (volume.mountpoint / "held").read_text() == "still open at SIGTERM and more"
