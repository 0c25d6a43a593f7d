"""The name transform, symlink targets and xattrs (``docs/format.md`` sections 6 and 7)."""

from __future__ import annotations

import math
import os
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dermfs import format
from dermfs.cryptocore import Aead, SecretKey, Siv, random_id
from dermfs.errors import IntegrityError
from dermfs.metadata import SymlinkTransform, TooLongError, XattrTransform
from dermfs.names import NameTransform
from dermfs.tree import list_directory, write_sidecar
from dermfs.volume import Volume

NAMES_KEY = SecretKey(os.urandom(64))
NAMES = NameTransform(Siv(NAMES_KEY))
DIR_ID = random_id()
OTHER_DIR_ID = random_id()
B64U = frozenset(string.ascii_letters + string.digits + "-_")

plaintext_names = st.binary(min_size=1, max_size=255).filter(
    lambda name: b"/" not in name and b"\0" not in name and name not in (b".", b"..")
)


def decrypt(transform: NameTransform, dir_id: bytes, name: bytes) -> bytes:
    """Encrypt *name* with NAMES in the directory DIR_ID, then decrypt it in *dir_id*."""
    backing = NAMES.encrypt(DIR_ID, name)
    if backing.sidecar is None:
        return transform.decrypt(dir_id, backing.entry)
    return transform.decrypt_long(dir_id, backing.entry, backing.ciphertext)


# ------------------------------------------------------------------------------ names


@given(plaintext_names)
def test_names_round_trip(name: bytes) -> None:
    assert decrypt(NAMES, DIR_ID, name) == name


@given(plaintext_names)
def test_backing_names_fit_and_use_only_base64url(name: bytes) -> None:
    backing = NAMES.encrypt(DIR_ID, name)

    assert len(backing.entry) <= format.MAX_BACKING_NAME
    if backing.sidecar is None:
        assert set(backing.entry) <= B64U
        assert len(backing.entry) == math.ceil((len(name) + 16) * 4 / 3)
    else:
        stem = backing.entry.removesuffix(".long")
        assert len(stem) == 43 and set(stem) <= B64U
        assert backing.sidecar == stem + ".name"


@given(plaintext_names)
def test_names_are_deterministic(name: bytes) -> None:
    again = NameTransform(Siv(SecretKey(NAMES_KEY.reveal())))

    assert NAMES.encrypt(DIR_ID, name) == NAMES.encrypt(DIR_ID, name)
    assert again.encrypt(DIR_ID, name) == NAMES.encrypt(DIR_ID, name)


@given(plaintext_names)
def test_the_same_name_differs_between_directories(name: bytes) -> None:
    here = NAMES.encrypt(DIR_ID, name)
    there = NAMES.encrypt(OTHER_DIR_ID, name)

    assert here.entry != there.entry
    assert here.ciphertext != there.ciphertext


@given(plaintext_names)
def test_a_name_does_not_decrypt_in_another_directory(name: bytes) -> None:
    with pytest.raises(IntegrityError):
        decrypt(NAMES, OTHER_DIR_ID, name)


def test_a_name_does_not_decrypt_under_another_key() -> None:
    other = NameTransform(Siv(SecretKey(os.urandom(64))))

    with pytest.raises(IntegrityError):
        decrypt(other, DIR_ID, b"lesion-0001.jpg")


@pytest.mark.parametrize(
    ("length", "is_long"), [(1, False), (174, False), (175, False), (176, True), (255, True)]
)
def test_long_name_threshold(length: int, is_long: bool) -> None:
    name = b"n" * length

    backing = NAMES.encrypt(DIR_ID, name)

    assert backing.is_long is is_long
    if length == 175:
        assert len(backing.entry) == 255
    if is_long:
        assert backing.entry.endswith(".long")
        assert len(format.b64u_encode(backing.ciphertext)) > 255
    assert decrypt(NAMES, DIR_ID, name) == name


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b", b"/"])
def test_names_that_are_not_file_names_are_refused(name: bytes) -> None:
    with pytest.raises(ValueError):
        NAMES.encrypt(DIR_ID, name)


@pytest.mark.parametrize("entry", ["", "not+base64", "abc=", "has space", "a" * 5, "AAAA\n"])
def test_backing_names_that_are_not_encrypted_names_fail(entry: str) -> None:
    with pytest.raises(IntegrityError):
        NAMES.decrypt(DIR_ID, entry)


def test_a_changed_short_name_fails() -> None:
    entry = NAMES.encrypt(DIR_ID, b"lesion-0001.jpg").entry
    changed = ("B" if entry[0] == "A" else "A") + entry[1:]

    with pytest.raises(IntegrityError):
        NAMES.decrypt(DIR_ID, changed)


def test_a_sidecar_of_another_name_is_refused() -> None:
    one = NAMES.encrypt(DIR_ID, b"a" * 200)
    other = NAMES.encrypt(DIR_ID, b"b" * 200)

    with pytest.raises(IntegrityError):
        NAMES.decrypt_long(DIR_ID, one.entry, other.ciphertext)


def test_a_changed_sidecar_is_refused() -> None:
    backing = NAMES.encrypt(DIR_ID, b"a" * 200)
    changed = bytearray(backing.ciphertext)
    changed[-1] ^= 0x01

    with pytest.raises(IntegrityError):
        NAMES.decrypt_long(DIR_ID, backing.entry, bytes(changed))


def test_a_long_entry_and_sidecar_moved_to_another_directory_fail() -> None:
    backing = NAMES.encrypt(DIR_ID, b"a" * 200)

    with pytest.raises(IntegrityError):
        NAMES.decrypt_long(OTHER_DIR_ID, backing.entry, backing.ciphertext)


def test_sidecar_names() -> None:
    assert NameTransform.sidecar_of("x" * 43 + ".long") == "x" * 43 + ".name"
    assert NameTransform.sidecar_of("x" * 43 + ".name") is None
    assert NameTransform.sidecar_of("x" * 43) is None
    assert NameTransform.sidecar_of(format.TMP_PREFIX + "ab.long") is None


RESERVED = [
    format.VOLUME_FILE,
    format.DIRID_FILE,
    format.LOCK_FILE,
    format.INTENT_FILE,
    format.TMP_PREFIX + "0123456789abcdef0123456789abcdef",
    format.TMP_PREFIX + "0123456789abcdef0123456789abcdef.long",
    "x" * 43 + ".name",
    "anything.else",
    ".hidden",
]


@pytest.mark.parametrize("entry", RESERVED)
def test_reserved_backing_names_are_not_listed(entry: str) -> None:
    assert not NameTransform.is_listed(entry)


def test_encrypted_names_are_listed() -> None:
    assert NameTransform.is_listed(NAMES.encrypt(DIR_ID, b"x").entry)
    assert NameTransform.is_listed(NAMES.encrypt(DIR_ID, b"x" * 200).entry)


def test_a_directory_lists_only_its_entries(volume: Volume, tmp_path: Path) -> None:
    directory = tmp_path / "backing"
    directory.mkdir()
    dir_id = random_id()
    (directory / format.DIRID_FILE).write_bytes(format.pack_dirid(dir_id))
    for entry in RESERVED:
        (directory / entry).write_bytes(b"")
    short = volume.names.encrypt(dir_id, b"short.jpg")
    long = volume.names.encrypt(dir_id, b"l" * 240)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_sidecar(fd, long)
        (directory / short.entry).write_bytes(b"")
        (directory / long.entry).write_bytes(b"")

        listed = list(list_directory(volume, fd, dir_id))
    finally:
        os.close(fd)

    assert sorted(entry.name for entry in listed if entry.name) == [b"l" * 240, b"short.jpg"]
    assert all(entry.error is None for entry in listed)
    assert {entry.entry for entry in listed} == {short.entry, long.entry}


# ------------------------------------------------------------------------------ symlinks


def symlinks(volume_id: bytes) -> SymlinkTransform:
    return SymlinkTransform(Aead(SecretKey(b"s" * 32)), volume_id)


@pytest.mark.parametrize("length", [0, 1, 3042, 3043])
def test_symlink_targets_up_to_3043_bytes_fit(length: int) -> None:
    transform = symlinks(random_id())
    target = os.urandom(length)

    backing = transform.encrypt(target)

    assert len(backing) <= 4095
    assert set(backing) <= B64U
    assert transform.decrypt(backing) == target


@pytest.mark.parametrize("length", [3044, 4096])
def test_longer_symlink_targets_are_refused(length: int) -> None:
    with pytest.raises(TooLongError):
        symlinks(random_id()).encrypt(b"t" * length)


def test_symlink_targets_are_sealed_freshly() -> None:
    transform = symlinks(random_id())

    assert transform.encrypt(b"target") != transform.encrypt(b"target")


def test_a_changed_symlink_target_fails() -> None:
    transform = symlinks(random_id())
    backing = transform.encrypt(b"../lesion.jpg")
    changed = ("B" if backing[20] == "A" else "A").join([backing[:20], backing[21:]])

    with pytest.raises(IntegrityError):
        transform.decrypt(changed)
    with pytest.raises(IntegrityError):
        transform.decrypt("not base64!")


def test_a_symlink_target_from_another_volume_fails() -> None:
    backing = symlinks(random_id()).encrypt(b"../lesion.jpg")

    with pytest.raises(IntegrityError):
        symlinks(random_id()).decrypt(backing)


# ------------------------------------------------------------------------------ xattrs

VOLUME_ID = random_id()
XATTRS = XattrTransform(Siv(SecretKey(os.urandom(64))), Aead(SecretKey(os.urandom(32))), VOLUME_ID)


@pytest.mark.parametrize(
    "name",
    [
        b"security.selinux",
        b"trusted.overlay.opaque",
        b"system.posix_acl_access",
        b"user.",
        b"user",
        b"USER.upper",
        b"",
    ],
)
def test_xattrs_outside_the_user_namespace_are_refused(name: bytes) -> None:
    assert not XattrTransform.is_stored(name)
    with pytest.raises(ValueError):
        XATTRS.encrypt_name(name)


@given(st.binary(min_size=1, max_size=171))
def test_xattr_names_round_trip_deterministically(suffix: bytes) -> None:
    name = b"user." + suffix

    backing = XATTRS.encrypt_name(name)

    assert backing == XATTRS.encrypt_name(name)
    assert backing.startswith(b"user.") and len(backing) <= 255
    assert XATTRS.decrypt_name(backing) == name


def test_xattr_names_longer_than_fit_are_refused() -> None:
    assert len(XATTRS.encrypt_name(b"user." + b"x" * 171)) == 255
    with pytest.raises(TooLongError):
        XATTRS.encrypt_name(b"user." + b"x" * 172)


@pytest.mark.parametrize("backing", [b"security.abc", b"user.not base64", b"user.\xff\xfe"])
def test_backing_xattr_names_that_were_not_encrypted_fail(backing: bytes) -> None:
    with pytest.raises(IntegrityError):
        XATTRS.decrypt_name(backing)


def test_xattr_values_round_trip_and_are_bound_to_object_and_name() -> None:
    object_id, other_id = random_id(), random_id()
    name = XATTRS.encrypt_name(b"user.comment")
    other_name = XATTRS.encrypt_name(b"user.other")
    value = b"benign naevus"

    sealed = XATTRS.encrypt_value(object_id, name, value)

    assert XATTRS.decrypt_value(object_id, name, sealed) == value
    assert value not in sealed
    with pytest.raises(IntegrityError):
        XATTRS.decrypt_value(other_id, name, sealed)
    with pytest.raises(IntegrityError):
        XATTRS.decrypt_value(object_id, other_name, sealed)
    changed = bytearray(sealed)
    changed[-1] ^= 0x01
    with pytest.raises(IntegrityError):
        XATTRS.decrypt_value(object_id, name, bytes(changed))
