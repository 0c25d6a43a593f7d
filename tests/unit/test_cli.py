"""Tests of the dermfs command line: the error boundary, init, dispatch, and logging."""

from __future__ import annotations

import importlib
import io
import logging
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import dermfs
from dermfs import cli, exitcodes
from dermfs.errors import MountError
from dermfs.keys.local import KeyFileProvider, PassphraseProvider, PassphraseStream
from dermfs.volume import Volume

REPO = Path(cli.__file__).resolve().parents[1]
PATIENT_ID = "'^patients/(?P<patient>[^/]+)/'"


def write_config(tmp_path: Path, kms: str = "keyfile: volume.key", extra: str = "") -> Path:
    path = tmp_path / "clinic.yaml"
    path.write_text(
        f"store: store\nkms:\n  provider: local\n  {kms}\n"
        f"audit:\n  journal: clinic.audit\n  patient_id: {PATIENT_ID}\n{extra}"
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error_line(err: str) -> str:
    assert err.startswith("dermfs: ")
    assert err.endswith("\n")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    return err


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[tuple[Any, ...]]]:
    """Install a stand-in for a command module; return the list of calls it receives."""

    def install(name: str, function: str, result: object = 0) -> list[tuple[Any, ...]]:
        calls: list[tuple[Any, ...]] = []

        def command(*args: Any, **kwargs: Any) -> object:
            calls.append((*args, kwargs))
            if isinstance(result, BaseException):
                raise result
            return result

        module = types.ModuleType(name)
        setattr(module, function, command)
        monkeypatch.setitem(sys.modules, name, module)
        return calls

    return install


# ------------------------------------------------------------------------------ boundary


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _err = run(capsys, "--version")

    assert status == exitcodes.OK
    assert out == f"dermfs {dermfs.__version__}\n"
    assert out == "dermfs 0.1.0\n"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _err = run(capsys, "--help")

    assert status == exitcodes.OK
    for command in ("init", "fsck", "mount", "umount", "audit", "rewrap", "rekey"):
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["init"],
        ["mount", "clinic.yaml"],
        ["audit", "clinic.yaml"],
        ["--bogus", "init", "c.yaml"],
    ],
)
def test_bad_command_line_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, _out, err = run(capsys, *argv)

    assert status == exitcodes.USAGE == 2
    assert "Traceback" not in err
    assert "dermfs" in err


def test_bad_config_is_one_line_and_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "keyfle: volume.key")

    status, out, err = run(capsys, "init", str(config))

    assert status == exitcodes.CONFIG == 3
    assert out == ""
    assert "unknown key kms.keyfle" in assert_one_error_line(err)


def test_missing_config_is_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _out, err = run(capsys, "fsck", str(tmp_path / "absent.yaml"))

    assert status == exitcodes.CONFIG
    assert "absent.yaml does not exist" in assert_one_error_line(err)


def test_dermfs_error_maps_to_its_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_module: Callable[..., Any]
) -> None:
    fake_module("dermfs.fuse.mount", "run_mount", MountError("mount point /mnt is not empty"))

    status, _out, err = run(capsys, "mount", str(write_config(tmp_path)), "/mnt")

    assert status == exitcodes.MOUNT
    assert err == "dermfs: mount point /mnt is not empty\n"


def test_multi_line_message_is_printed_on_one_line(
    capsys: pytest.CaptureFixture[str], fake_module: Callable[..., Any]
) -> None:
    fake_module("dermfs.fuse.mount", "run_umount", MountError("first\nsecond"))

    status, _out, err = run(capsys, "umount", "/mnt")

    assert status == exitcodes.MOUNT
    assert err == "dermfs: first second\n"


def test_unexpected_exception_is_an_internal_error(
    capsys: pytest.CaptureFixture[str],
    fake_module: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DERMFS_DEBUG", raising=False)
    fake_module("dermfs.fuse.mount", "run_umount", RuntimeError("boom"))

    status, _out, err = run(capsys, "umount", "/mnt")

    assert status == exitcodes.GENERIC
    assert err == "dermfs: internal error: RuntimeError: boom\n"


def test_debug_shows_the_traceback(
    capsys: pytest.CaptureFixture[str],
    fake_module: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DERMFS_DEBUG", "1")
    fake_module("dermfs.fuse.mount", "run_umount", RuntimeError("boom"))

    status, _out, err = run(capsys, "umount", "/mnt")

    assert status == exitcodes.GENERIC
    assert "Traceback" in err
    assert err.endswith("dermfs: internal error: RuntimeError: boom\n")


def test_ctrl_c_exits_130(
    capsys: pytest.CaptureFixture[str], fake_module: Callable[..., Any]
) -> None:
    fake_module("dermfs.fuse.mount", "run_umount", KeyboardInterrupt())

    status, _out, err = run(capsys, "umount", "/mnt")

    assert status == 130
    assert_one_error_line(err)


# ------------------------------------------------------------------------------ dispatch


@pytest.mark.parametrize(
    ("argv", "module", "command"),
    [
        (["fsck", "CONFIG"], "dermfs.fsck", "fsck"),
        (["mount", "CONFIG", "/mnt"], "dermfs.fuse.mount", "mount"),
        (["mount", "CONFIG", "/mnt"], "dermfs.fuse", "mount"),
        (["umount", "/mnt"], "dermfs.fuse.mount", "umount"),
        (["audit", "verify", "CONFIG"], "dermfs.audit.cli", "audit verify"),
        (["audit", "query", "CONFIG", "--json"], "dermfs.audit", "audit query"),
        (["rewrap", "CONFIG"], "dermfs.rotation", "rewrap"),
        (["rekey", "CONFIG"], "dermfs.rotation", "rekey"),
        (["init", "CONFIG"], "dermfs.volume", "init"),
    ],
)
def test_missing_command_module_is_not_available(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    module: str,
    command: str,
) -> None:
    config = write_config(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # makes importing it fail as if absent
    for name in [name for name in sys.modules if name.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)

    status, _out, err = run(capsys, *[str(config) if arg == "CONFIG" else arg for arg in argv])

    assert status == exitcodes.GENERIC
    assert err == f"dermfs: command {command} is not available in this version\n"
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "volume.key").exists()


def test_missing_third_party_module_is_not_hidden(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def import_module(name: str) -> object:
        raise ModuleNotFoundError("No module named 'pyfuse3'", name="pyfuse3")

    monkeypatch.setattr(importlib, "import_module", import_module)

    status, _out, err = run(capsys, "umount", "/mnt")

    assert status == exitcodes.GENERIC
    assert err == "dermfs: internal error: ModuleNotFoundError: No module named 'pyfuse3'\n"


def test_fsck_dispatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_module: Callable[..., Any]
) -> None:
    calls = fake_module("dermfs.fsck", "run_fsck", exitcodes.DAMAGE)
    config = write_config(tmp_path)

    status, _out, _err = run(capsys, "fsck", str(config), "--no-progress")

    assert status == exitcodes.DAMAGE
    [(loaded, kwargs)] = calls
    assert loaded.store == tmp_path / "store"
    assert kwargs == {"progress": False}


def test_mount_dispatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_module: Callable[..., Any]
) -> None:
    calls = fake_module("dermfs.fuse.mount", "run_mount")
    config = write_config(tmp_path)

    status, _out, _err = run(
        capsys, "mount", str(config), "/mnt/clinic", "-f", "-o", "ro,noatime", "-o", "allow_other"
    )

    assert status == exitcodes.OK
    [(loaded, mountpoint, foreground, options, kwargs)] = calls
    assert loaded.path == config
    assert (mountpoint, foreground, options, kwargs) == (
        Path("/mnt/clinic"),
        True,
        ["ro", "noatime", "allow_other"],
        {},
    )


def test_mount_dispatch_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_module: Callable[..., Any]
) -> None:
    calls = fake_module("dermfs.fuse.mount", "run_mount")

    run(capsys, "mount", str(write_config(tmp_path)), "/mnt/clinic")

    [(_config, _mountpoint, foreground, options, _kwargs)] = calls
    assert (foreground, options) == (False, [])


def test_audit_query_dispatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_module: Callable[..., Any]
) -> None:
    calls = fake_module("dermfs.audit.cli", "run", 0)
    config = write_config(tmp_path)

    run(capsys, "audit", "query", str(config), "--patient", "P1", "--since", "2024-01-01", "--json")

    [(_loaded, args, _kwargs)] = calls
    assert args.audit_command == "query"
    assert (args.patient, args.path, args.user) == ("P1", None, None)
    assert (args.since, args.until, args.json) == ("2024-01-01", None, True)


@pytest.mark.parametrize(
    ("command", "function"), [("rewrap", "run_rewrap"), ("rekey", "run_rekey")]
)
def test_rotation_dispatch(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fake_module: Callable[..., Any],
    command: str,
    function: str,
) -> None:
    calls = fake_module("dermfs.rotation", function, 0)

    status, _out, _err = run(capsys, command, str(write_config(tmp_path)))

    assert status == exitcodes.OK
    [(_loaded, args, _kwargs)] = calls
    assert args.command == command


# ------------------------------------------------------------------------------ init


def test_init_creates_the_store_and_the_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "init", str(write_config(tmp_path)))

    store, keyfile = tmp_path / "store", tmp_path / "volume.key"
    assert (status, err) == (exitcodes.OK, "")
    assert out == (
        f"created key file {keyfile}; keep a copy in a safe place, "
        "because without it the volume cannot be opened\n"
    )
    assert store.stat().st_mode & 0o777 == 0o700
    assert keyfile.stat().st_mode & 0o777 == 0o600
    assert (store / "dermfs.volume").is_file()
    Volume.open(store, KeyFileProvider(keyfile)).close()


def test_init_keeps_an_existing_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keyfile = tmp_path / "volume.key"
    keyfile.write_bytes(b"k" * 32)
    keyfile.chmod(0o400)
    (tmp_path / "store").mkdir()

    status, out, _err = run(capsys, "init", str(write_config(tmp_path)))

    assert (status, out) == (exitcodes.OK, "")
    assert keyfile.read_bytes() == b"k" * 32
    Volume.open(tmp_path / "store", KeyFileProvider(keyfile)).close()


def test_init_refuses_an_insecure_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keyfile = tmp_path / "volume.key"
    keyfile.write_bytes(b"k" * 32)
    keyfile.chmod(0o644)

    status, _out, err = run(capsys, "init", str(write_config(tmp_path)))

    assert status == exitcodes.INSECURE_FILE
    assert "0644" in assert_one_error_line(err)


def test_init_twice_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert run(capsys, "init", str(config))[0] == exitcodes.OK

    status, _out, err = run(capsys, "init", str(config))

    assert status == exitcodes.STORE
    assert "already initialised" in assert_one_error_line(err)


def test_init_refuses_a_directory_that_is_not_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "photo.jpg").write_bytes(b"x")

    status, _out, err = run(capsys, "init", str(write_config(tmp_path)))

    assert status == exitcodes.STORE
    assert "not empty and is not a dermfs store" in assert_one_error_line(err)
    assert not (tmp_path / "volume.key").exists()


def test_init_refuses_a_store_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "store").write_bytes(b"")

    status, _out, err = run(capsys, "init", str(write_config(tmp_path)))

    assert status == exitcodes.STORE
    assert "not a directory" in assert_one_error_line(err)


def test_init_needs_the_parent_of_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("store: store", "store: absent/store"))

    status, _out, err = run(capsys, "init", str(config))

    assert status == exitcodes.STORE
    assert "parent directory" in assert_one_error_line(err)
    assert not (tmp_path / "volume.key").exists()


def test_init_with_a_passphrase_from_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kms = "passphrase_file: '-'\n  kdf: scrypt\n  kdf_params: {n: 1024, r: 8, p: 1}"
    monkeypatch.setattr(sys, "stdin", io.StringIO("a passphrase\n"))

    status, _out, err = run(capsys, "init", str(write_config(tmp_path, kms)))

    assert (status, err) == (exitcodes.OK, "")
    provider = PassphraseProvider(PassphraseStream(io.StringIO("a passphrase\n")))
    Volume.open(tmp_path / "store", provider).close()


def test_init_with_an_empty_stdin_passphrase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))

    status, _out, err = run(capsys, "init", str(write_config(tmp_path, "passphrase_file: '-'")))

    assert status == exitcodes.KEY_PROVIDER
    assert "no passphrase" in assert_one_error_line(err)


def test_init_with_an_unavailable_provider(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)  # python-pkcs11 not installed
    monkeypatch.delitem(sys.modules, "dermfs.keys.pkcs11", raising=False)
    config = tmp_path / "clinic.yaml"
    config.write_text(
        "store: store\nkms:\n  provider: pkcs11\n  module: /m.so\n  token_label: t\n"
        f"  key_label: k\n  pin_file: pin\naudit:\n  journal: j\n  patient_id: {PATIENT_ID}\n"
    )

    status, _out, err = run(capsys, "init", str(config))

    assert status == exitcodes.KEY_PROVIDER
    assert "needs the Python package python-pkcs11" in assert_one_error_line(err)


# ------------------------------------------------------------------------------ logging


def test_verbose_logs_to_stderr_with_level_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("JOURNAL_STREAM", "INVOCATION_ID"):
        monkeypatch.delenv(name, raising=False)

    status, _out, err = run(capsys, "-v", "init", str(write_config(tmp_path)))

    assert status == exitcodes.OK
    assert "INFO: dermfs.cli: initialised store " in err
    assert all(line.startswith("INFO: dermfs.") for line in err.splitlines())


def test_verbose_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _out, err = run(capsys, "init", "-vv", str(write_config(tmp_path)))

    assert status == exitcodes.OK
    assert "DEBUG: dermfs.keys.secretfile: read key file " in err


@pytest.mark.parametrize("variable", ["JOURNAL_STREAM", "INVOCATION_ID"])
def test_under_systemd_logs_use_priorities(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, "8:1234")

    status, _out, err = run(capsys, "-v", "init", str(write_config(tmp_path)))

    assert status == exitcodes.OK
    assert "<6>dermfs.cli: initialised store " in err
    assert "INFO" not in err


def test_logging_is_restored_after_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root_handlers = list(logging.getLogger().handlers)
    level = logging.getLogger("dermfs").level

    run(capsys, "-vv", "init", str(write_config(tmp_path)))

    assert logging.getLogger().handlers == root_handlers
    assert logging.getLogger("dermfs").level == level


# ------------------------------------------------------------------------------ process


def run_process(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name != "DERMFS_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "dermfs", *argv],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def test_process_version() -> None:
    result = run_process("--version")

    assert (result.returncode, result.stdout, result.stderr) == (0, "dermfs 0.1.0\n", "")


def test_process_bad_config(tmp_path: Path) -> None:
    result = run_process("init", str(write_config(tmp_path, "keyfile: [volume.key]")))

    assert result.returncode == exitcodes.CONFIG
    assert result.stdout == ""
    assert "kms.keyfile: must be a string" in assert_one_error_line(result.stderr)


def test_process_unknown_command() -> None:
    result = run_process("frobnicate")

    assert result.returncode == exitcodes.USAGE
    assert "Traceback" not in result.stderr
