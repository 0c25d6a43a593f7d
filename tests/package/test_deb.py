"""The Debian package: build it, lint it, install it, and use the installed command.

The .deb is built from a copy of the tree (``packaging/build-deb.sh``), checked with
lintian (no errors), installed with ``apt-get install ./dermfs_*.deb``, and then
``/usr/bin/dermfs`` (never the source tree or the test's virtualenv) initialises, mounts,
writes, unmounts and checks a volume. Teardown unmounts and, unless dermfs was already
installed before the test, purges the package again.

Needs root (apt-get, mount) and a network path to PyPI for the build's bundled
libraries; takes a few minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.package, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DERMFS = "/usr/bin/dermfs"
# Only the system's directories: nothing of the test's virtualenv or pyenv.
CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


def _run(
    args: list[str], *, timeout: float = 120, check: bool = True, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args,
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        **kwargs,  # type: ignore[arg-type]
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def _installed() -> bool:
    result = _run(["dpkg-query", "-W", "-f=${db:Status-Status}", "dermfs"], check=False)
    return result.returncode == 0 and result.stdout == "installed"


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("dpkg-buildpackage") is None:
        pytest.skip("dpkg-buildpackage is missing (install dpkg-dev and debhelper)")
    out = tmp_path_factory.mktemp("deb")
    _run(["bash", str(REPO / "packaging" / "build-deb.sh"), str(out)], timeout=900)
    debs = sorted(out.glob("dermfs_*.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("installing the package needs root")
    was_installed = _installed()
    _run(
        ["apt-get", "install", "-y", "-q", "--allow-downgrades", f"./{deb.name}"],
        cwd=deb.parent,
        timeout=600,
    )
    try:
        yield deb
    finally:
        if not was_installed:
            _run(["apt-get", "purge", "-y", "-q", "dermfs"], timeout=300, check=False)


def test_lintian_reports_no_errors(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.fail("lintian is missing: scripts/setup.sh installs it")
    result = _run(["lintian", "--fail-on", "error", str(deb)], timeout=300, check=False)
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_contents(installed: Path) -> None:
    files = set(_run(["dpkg-query", "-L", "dermfs"]).stdout.split())
    for path in (
        "/usr/bin/dermfs",
        "/etc/dermfs/example.yaml",
        "/usr/share/man/man8/dermfs.8.gz",
        "/usr/lib/dermfs/dermfs/cli.py",
        "/var/log/dermfs",
    ):
        assert path in files, path
    conffiles = Path("/var/lib/dpkg/info/dermfs.conffiles").read_text()
    assert "/etc/dermfs/example.yaml" in conffiles
    # Whatever systemd/ and samba/ hold is installed.
    for unit in sorted((REPO / "systemd").glob("*.service")):
        assert f"/lib/systemd/system/{unit.name}" in files, unit.name
    for snippet in sorted((REPO / "samba").glob("*")):
        assert f"/usr/share/doc/dermfs/examples/samba/{snippet.name}" in files, snippet.name
    # The example configuration is one that dermfs accepts.
    assert "store:" in Path("/etc/dermfs/example.yaml").read_text()
    man = _run(["man", "-l", "/usr/share/man/man8/dermfs.8.gz"]).stdout
    assert "EXIT STATUS" in man


def test_installed_command_runs_a_volume(installed: Path, tmp_path: Path) -> None:
    if not Path("/dev/fuse").exists():
        pytest.fail("/dev/fuse is missing")
    version = _run([DERMFS, "--version"], cwd="/").stdout
    assert version.strip() == "dermfs 0.1.0"
    # The command runs dermfs from the package's private directory, not this tree.
    launcher = Path(DERMFS).read_text()
    assert launcher.startswith("#!/usr/bin/python3 -I\n")
    assert 'sys.path.insert(0, "/usr/lib/dermfs")' in launcher
    where = _run(
        [
            "/usr/bin/python3",
            "-I",
            "-c",
            "import sys; sys.path.insert(0, '/usr/lib/dermfs'); "
            "import dermfs, cryptography, pyfuse3, trio; "
            "print(dermfs.__file__, cryptography.__file__, pyfuse3.__file__, trio.__file__)",
        ],
        cwd="/",
    ).stdout.split()
    assert len(where) == 4 and all(p.startswith("/usr/lib/dermfs/") for p in where), where

    tmp_path.chmod(0o700)
    store, mnt, logs = tmp_path / "store", tmp_path / "mnt", tmp_path / "log"
    mnt.mkdir()
    logs.mkdir(mode=0o700)
    config = tmp_path / "volume.yaml"
    config.write_text(
        f"store: {store}\n"
        "kms:\n"
        "  provider: local\n"
        f"  keyfile: {tmp_path / 'volume.key'}\n"
        "audit:\n"
        f"  journal: {logs / 'volume.audit'}\n"
        "  patient_id: '^patients/(?P<patient>[^/]+)/'\n"
    )
    config.chmod(0o600)

    _run([DERMFS, "init", str(config)], cwd="/")
    payload = os.urandom(3 * 65536 + 123)
    mounted = False
    try:
        _run([DERMFS, "mount", str(config), str(mnt)], cwd="/")
        mounted = True
        assert _run(["findmnt", "-n", "-o", "FSTYPE", str(mnt)]).stdout.strip() == ("fuse.dermfs")
        (mnt / "patients" / "P-1234").mkdir(parents=True)
        (mnt / "patients" / "P-1234" / "lesion-left-arm.jpg").write_bytes(payload)
        assert (mnt / "patients" / "P-1234" / "lesion-left-arm.jpg").read_bytes() == payload
        _run([DERMFS, "umount", str(mnt)], cwd="/")
        mounted = False
    finally:
        if mounted:
            _run([DERMFS, "umount", str(mnt)], cwd="/", check=False)
            if _run(["mountpoint", "-q", str(mnt)], check=False).returncode == 0:
                _run(["fusermount3", "-u", "-z", str(mnt)], check=False)
                time.sleep(1)

    # Encrypted at rest: neither the name nor the content is in the store in the clear.
    for path in store.rglob("*"):
        assert "lesion" not in path.name and "P-1234" not in path.name
        if path.is_file():
            assert payload[:64] not in path.read_bytes()

    fsck = _run([DERMFS, "fsck", str(config), "--no-progress"], cwd="/", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    verify = _run([DERMFS, "audit", "verify", str(config)], cwd="/", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
