"""Fixtures for real-mount tests: a store with a cheap key file, mounted by the real CLI.

``volume`` makes a configuration and a store (``dermfs init``, local key file, so no KDF
cost). ``mounted`` mounts it with ``python -m dermfs mount`` in a subprocess (the daemon
forks and detaches, logging to a file) and yields a :class:`Mount`.

Teardown always unmounts, even when the test failed: ``dermfs umount``, then
``fusermount3 -u``, then ``fusermount3 -uz`` and SIGKILL of the daemon as a last resort;
then it asserts that no mount is left under the test's directory. It also fails a test
whose daemon logged a WARNING or worse, unless the test is marked ``expect_log`` (the
daemon runs in another process, out of reach of the suite's log guard), and, for those
same tests, runs ``dermfs fsck`` on the store, which must find it intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DERMFS = [sys.executable, "-m", "dermfs"]
TIMEOUT = 60


def fuse_unavailable() -> str | None:
    """Say why real mounts cannot run here, or ``None`` if they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing"
    return None


def run_dermfs(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run the dermfs CLI in a subprocess and return what it did."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.update(kwargs.pop("env", None) or {})  # type: ignore[arg-type]
    return subprocess.run(
        [*DERMFS, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=kwargs.pop("timeout", TIMEOUT),  # type: ignore[arg-type]
        cwd=REPO,
        env=env,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def mounts_under(directory: Path) -> list[str]:
    """Return the mount points at or below *directory*."""
    prefix = str(directory)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as lines:
        for line in lines:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def is_mounted(mountpoint: Path) -> bool:
    """Tell whether something is mounted exactly on *mountpoint*."""
    return str(mountpoint) in mounts_under(mountpoint)


def process_running(pid: int) -> bool:
    """Tell whether *pid* runs; a zombie (exited, not reaped) does not count."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            state = stat_file.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def tree_digest(root: Path) -> dict[str, str]:
    """Return the sha256 of every regular file below *root*, by relative path."""
    digests = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            if path.is_symlink():
                continue
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@dataclass
class Volume:
    """A configured, initialised store and the directories around it."""

    base: Path
    config: Path
    store: Path
    keyfile: Path
    mountpoint: Path
    log: Path

    def mount(self, *options: str) -> subprocess.CompletedProcess[str]:
        """Run ``dermfs mount`` (daemon mode, logging to :attr:`log`)."""
        return run_dermfs("mount", self.config, self.mountpoint, "-o", f"log={self.log}", *options)

    def umount(self) -> subprocess.CompletedProcess[str]:
        """Run ``dermfs umount``."""
        return run_dermfs("umount", self.mountpoint)

    def daemon_pid(self) -> int | None:
        """Return the pid the daemon wrote into the store's lock file, if any."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.store / "dermfs.lock").read_text().strip())
        return None

    def log_text(self) -> str:
        """Return what the daemons of this volume logged so far."""
        with contextlib.suppress(FileNotFoundError):
            return self.log.read_text(errors="replace")
        return ""


@dataclass
class Mount:
    """A mounted volume."""

    volume: Volume
    path: Path
    options: list[str] = field(default_factory=list)
    log_offset: int = 0
    remounts: int = 0

    def remount(self) -> None:
        """Unmount cleanly and mount again with the same options (checking both steps)."""
        unmount(self.volume)
        result = self.volume.mount(*self.options)
        assert result.returncode == 0, result.stderr
        self.remounts += 1

    def new_log(self) -> str:
        """Return the daemon log written since the last call."""
        text = self.volume.log_text()
        new, self.log_offset = text[self.log_offset :], len(text)
        return new


def unmount(volume: Volume) -> None:
    """Unmount *volume* by every means needed; never leaves a mount behind."""
    if not is_mounted(volume.mountpoint):
        return
    result = volume.umount()
    if result.returncode == 0 and not is_mounted(volume.mountpoint):
        return
    subprocess.run(["fusermount3", "-u", str(volume.mountpoint)], capture_output=True, check=False)
    if is_mounted(volume.mountpoint):
        subprocess.run(
            ["fusermount3", "-uz", str(volume.mountpoint)], capture_output=True, check=False
        )
    pid = volume.daemon_pid()
    if pid is not None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_running(pid):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"dermfs umount failed: {result.stderr.strip()}")


def make_volume(base: Path) -> Volume:
    """Configure and ``dermfs init`` a volume below *base*, with a local key file."""
    config = base / "volume.yaml"
    config.write_text(
        "store: store\n"
        "kms:\n"
        "  provider: local\n"
        "  keyfile: volume.key\n"
        "audit:\n"
        "  journal: volume.audit\n"
        "  patient_id: '^patients/(?P<patient>[^/]+)/'\n"
    )
    made = Volume(
        base, config, base / "store", base / "volume.key", base / "mnt", base / "daemon.log"
    )
    made.mountpoint.mkdir()
    result = run_dermfs("init", config)
    assert result.returncode == 0, result.stderr
    return made


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    """A new store with a local key file, and an empty mount point; never left mounted."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path
    made = make_volume(base)
    try:
        yield made
    finally:
        try:
            unmount(made)
        finally:
            left = mounts_under(base)
            for point in reversed(left):
                subprocess.run(["fusermount3", "-uz", point], capture_output=True, check=False)
            assert not left, f"mounts left behind: {left}"


def mount_volume(volume: Volume, request: pytest.FixtureRequest, *options: str) -> Iterator[Mount]:
    """Mount *volume* with *options*, yield it, and unmount it again (for fixtures)."""
    extra = ["-o", ",".join(options)] if options else []
    result = volume.mount(*extra)
    assert result.returncode == 0, result.stderr
    assert is_mounted(volume.mountpoint)
    mount = Mount(volume, volume.mountpoint, options=extra)
    yield mount
    unmount(volume)
    if request.node.get_closest_marker("expect_log") is None:
        checked = run_dermfs("fsck", volume.config, "--no-progress")
        assert checked.returncode == 0, f"fsck after the test: {checked.stdout}{checked.stderr}"
        bad = [
            line
            for line in volume.log_text().splitlines()
            if line.startswith(("WARNING", "ERROR", "CRITICAL"))
        ]
        assert not bad, "the daemon logged:\n" + "\n".join(bad)


@pytest.fixture
def mounted(volume: Volume, request: pytest.FixtureRequest) -> Iterator[Mount]:
    """The volume, mounted by ``dermfs mount`` with default options; unmounted after."""
    yield from mount_volume(volume, request)
