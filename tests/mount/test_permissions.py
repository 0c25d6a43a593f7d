"""``allow_other`` with ``default_permissions``: other users get ordinary POSIX checks."""

from __future__ import annotations

import dataclasses
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mount.conftest import Volume, is_mounted, unmount

pytestmark = pytest.mark.mount


@pytest.fixture
def shared_mount(volume: Volume) -> Iterator[Path]:
    """The volume mounted with allow_other on a mount point every user can reach."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    reachable = Path(tempfile.mkdtemp(prefix="dermfs-shared-"))
    reachable.chmod(0o755)
    shared = dataclasses.replace(volume, mountpoint=reachable / "mnt")
    shared.mountpoint.mkdir()
    result = shared.mount("-o", "allow_other")
    assert result.returncode == 0, result.stderr
    try:
        shared.mountpoint.chmod(0o755)
        yield shared.mountpoint
    finally:
        unmount(shared)
        assert not is_mounted(shared.mountpoint)
        shared.mountpoint.rmdir()
        reachable.rmdir()


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    """Run *command* as the user nobody."""
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    return subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=drop,
        check=False,
        cwd="/",
    )


def test_other_users_get_posix_checks(shared_mount: Path) -> None:
    (shared_mount / "public.txt").write_text("for everyone")
    (shared_mount / "public.txt").chmod(0o644)
    (shared_mount / "private.txt").write_text("root only")
    (shared_mount / "private.txt").chmod(0o600)

    assert as_nobody("cat", str(shared_mount / "public.txt")).stdout == "for everyone"
    refused = as_nobody("cat", str(shared_mount / "private.txt"))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr

    drop_box = shared_mount / "drop-box"
    drop_box.mkdir()
    drop_box.chmod(0o777)
    result = as_nobody("sh", "-c", 'printf hello > "$1"', "sh", str(drop_box / "made-by-nobody"))
    assert result.returncode == 0, result.stderr
    made = drop_box / "made-by-nobody"
    assert made.read_text() == "hello"
    assert made.stat().st_uid == pwd.getpwnam("nobody").pw_uid
