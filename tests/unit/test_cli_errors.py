"""Bad input to ``dermfs init`` and ``dermfs fsck``: one line on stderr, no traceback.

Each case runs ``python -m dermfs`` in a subprocess, as an administrator would, and checks
the exit code (:mod:`dermfs.exitcodes`), that stderr is exactly one line naming the
problem, and that no traceback is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dermfs import exitcodes, format
from dermfs.config import load_config
from dermfs.keys import provider_from_config
from dermfs.tree import PlainTree
from dermfs.volume import Volume

REPO = Path(__file__).resolve().parents[2]

#: Cheap passphrase KDF parameters, given explicitly as a configuration would.
CHEAP_SCRYPT = "  kdf: scrypt\n  kdf_params: {n: 16, r: 1, p: 1}\n"


def dermfs(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dermfs ARGS`` and return what it printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DERMFS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "dermfs", *map(str, args)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """Check the exit code and that stderr is one line naming the problem."""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dermfs: ")
    for word in words:
        assert word in lines[0]
    assert result.returncode == code, result.stderr


def write_config(directory: Path, kms: str | None = None, extra: str = "") -> Path:
    kms = kms if kms is not None else "  provider: local\n  keyfile: ./volume.key\n"
    config = directory / "volume.yaml"
    config.write_text(
        "store: ./store\n"
        "chunk_size: 4096\n"
        f"kms:\n{kms}"
        "audit:\n"
        "  journal: ./volume.audit\n"
        "  patient_id: '^patients/(?P<patient>[^/]+)/'\n" + extra
    )
    return config


@pytest.fixture
def initialised(tmp_path: Path) -> Path:
    """A configuration whose store was made by ``dermfs init``, with a key file."""
    config = write_config(tmp_path)
    result = dermfs("init", config, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return config


# ------------------------------------------------------------------------------ configuration


def _malformed_yaml(directory: Path) -> Path:
    config = directory / "volume.yaml"
    config.write_text("store: ./store\nkms: [provider: local\n")
    return config


def _unknown_key(directory: Path) -> Path:
    return write_config(directory, extra="colour: blue\n")


def _unknown_nested_key(directory: Path) -> Path:
    return write_config(directory, kms="  provider: local\n  keyfile: ./k\n  keyfiel: ./k\n")


def _wrong_type(directory: Path) -> Path:
    config = write_config(directory)
    config.write_text(config.read_text().replace("chunk_size: 4096", "chunk_size: big"))
    return config


def _wrong_nested_type(directory: Path) -> Path:
    return write_config(directory, extra="mount:\n  allow_other: maybe\n")


#: Each bad configuration, and words its one-line error must contain.
BAD_CONFIGS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "malformed YAML": (_malformed_yaml, ("not valid YAML",)),
    "unknown key": (_unknown_key, ("colour",)),
    "unknown nested key": (_unknown_nested_key, ("kms.keyfiel",)),
    "wrong type": (_wrong_type, ("chunk_size",)),
    "wrong nested type": (_wrong_nested_type, ("mount.allow_other",)),
}


@pytest.mark.parametrize("command", ["init", "fsck"])
@pytest.mark.parametrize("case", BAD_CONFIGS.keys())
def test_bad_configuration(tmp_path: Path, command: str, case: str) -> None:
    make, words = BAD_CONFIGS[case]
    config = make(tmp_path)

    result = dermfs(command, config, cwd=tmp_path)

    assert_one_line_error(result, exitcodes.CONFIG, "volume.yaml", *words)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("command", ["init", "fsck"])
def test_missing_configuration_file(tmp_path: Path, command: str) -> None:
    result = dermfs(command, tmp_path / "absent.yaml", cwd=tmp_path)

    assert_one_line_error(result, exitcodes.CONFIG, "absent.yaml")


# ------------------------------------------------------------------------------ store


def test_fsck_of_a_missing_store_directory(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = dermfs("fsck", config, cwd=tmp_path)

    assert_one_line_error(result, exitcodes.STORE, "store", "does not exist")


def test_init_with_a_missing_parent_directory(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("store: ./store", "store: ./absent/store"))

    result = dermfs("init", config, cwd=tmp_path)

    assert_one_line_error(result, exitcodes.STORE, "absent", "does not exist")
    assert not (tmp_path / "absent").exists()


def test_fsck_of_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "store").mkdir()

    result = dermfs("fsck", config, cwd=tmp_path)

    assert_one_line_error(result, exitcodes.STORE, "not a dermfs store")


def test_fsck_of_a_store_in_use(initialised: Path) -> None:
    volume = _open_volume(initialised)
    volume.start_writing()
    try:
        result = dermfs("fsck", initialised, cwd=initialised.parent)
    finally:
        volume.close()

    assert_one_line_error(result, exitcodes.STORE, "in use")


# ------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("command", ["init", "fsck"])
def test_key_file_that_others_can_read(tmp_path: Path, command: str) -> None:
    config = write_config(tmp_path)
    if command == "fsck":
        assert dermfs("init", config, cwd=tmp_path).returncode == 0
    else:
        (tmp_path / "volume.key").write_bytes(os.urandom(32))
    (tmp_path / "volume.key").chmod(0o644)

    result = dermfs(command, config, cwd=tmp_path)

    assert_one_line_error(result, exitcodes.INSECURE_FILE, "volume.key", "0644")


def test_wrong_passphrase(tmp_path: Path) -> None:
    kms = f"  provider: local\n  passphrase_file: ./passphrase\n{CHEAP_SCRYPT}"
    config = write_config(tmp_path, kms=kms)
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    assert dermfs("init", config, cwd=tmp_path).returncode == 0
    assert dermfs("fsck", config, cwd=tmp_path).returncode == 0

    passphrase.write_text("incorrect horse\n")
    result = dermfs("fsck", config, cwd=tmp_path)

    assert_one_line_error(result, exitcodes.WRONG_KEY, "passphrase")
    assert "horse" not in result.stderr + result.stdout


def test_key_file_of_another_volume(initialised: Path) -> None:
    key = initialised.parent / "volume.key"
    key.chmod(0o600)
    key.write_bytes(os.urandom(32))

    result = dermfs("fsck", initialised, cwd=initialised.parent)

    assert_one_line_error(result, exitcodes.WRONG_KEY, "wrong key")


# ------------------------------------------------------------------------------ volume file


def test_truncated_volume_file(initialised: Path) -> None:
    volume_file = initialised.parent / "store" / format.VOLUME_FILE
    data = volume_file.read_bytes()
    volume_file.write_bytes(data[: len(data) // 2])

    result = dermfs("fsck", initialised, cwd=initialised.parent)

    assert_one_line_error(result, exitcodes.FORMAT, "truncated")


def test_unknown_feature_flag(initialised: Path) -> None:
    volume_file = initialised.parent / "store" / format.VOLUME_FILE
    obj = json.loads(volume_file.read_text())
    obj["features"].append("compression-zstd")
    volume_file.write_text(json.dumps(obj))

    result = dermfs("fsck", initialised, cwd=initialised.parent)

    assert_one_line_error(result, exitcodes.FORMAT, "compression-zstd")


def test_init_of_an_initialised_store(initialised: Path) -> None:
    result = dermfs("init", initialised, cwd=initialised.parent)

    assert_one_line_error(result, exitcodes.STORE, "already")


# ------------------------------------------------------------------------------ fsck results


def _open_volume(config_path: Path) -> Volume:
    config = load_config(config_path)
    return Volume.open(config.store, provider_from_config(config.kms))


def test_fsck_of_a_clean_store(initialised: Path) -> None:
    volume = _open_volume(initialised)
    volume.start_writing()
    try:
        tree = PlainTree(volume)
        tree.mkdir("patients")
        tree.write_file("patients/a.jpg", os.urandom(10_000))
    finally:
        volume.close()

    result = dermfs("fsck", initialised, cwd=initialised.parent)

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "fsck: 1 files, 2 directories checked, 0 damaged\n"


def test_fsck_of_a_damaged_store_lists_the_file(initialised: Path) -> None:
    volume = _open_volume(initialised)
    volume.start_writing()
    try:
        tree = PlainTree(volume)
        tree.mkdir("patients")
        tree.write_file("patients/a.jpg", os.urandom(10_000))
        tree.write_file("patients/b.jpg", os.urandom(10_000))
        backing = volume.store / tree.backing_path("patients/b.jpg")
    finally:
        volume.close()
    with open(backing, "r+b") as file:
        file.seek(format.HEADER_SIZE + 4096 + format.CHUNK_OVERHEAD + 100)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0x80]))

    result = dermfs("fsck", initialised, cwd=initialised.parent)

    assert result.returncode == exitcodes.DAMAGE
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines() == [
        "/patients/b.jpg: chunk 1",
        "fsck: 2 files, 2 directories checked, 1 damaged",
    ]
