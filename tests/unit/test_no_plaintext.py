"""Nothing in the clear: no plaintext name, content, target or xattr reaches the store.

A volume is filled through :class:`~dermfs.tree.PlainTree` (and xattrs through
``volume.xattrs`` and ``os.setxattr``, as the frontend sets them), then every byte the
store holds is scanned: the name of every entry, the contents of every file (the volume
file, directory ids, sidecars and the intent log included), every symlink target, and the
name and value of every xattr.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dermfs.tree import PlainTree
from dermfs.volume import Volume

WINDOW = 16

LONG_NAME = ("dermatology-long-name-" * 12)[:251] + ".jpg"
DIRECTORIES = ["patients", "patients/Müller-Hans-1961", "patients/" + "long-directory-" * 12]
FILES = {
    "empty-report.txt": 0,
    "one-byte-note.txt": 1,
    "patients/Müller-Hans-1961/läsion-rücken.jpg": 17,
    "patients/Müller-Hans-1961/" + LONG_NAME: 4096,
    "皮膚科-写真-記録.jpg": 4097,
    "patients/dermoscopy-series-A.dcm": 70_000,
    "patients/" + "long-directory-" * 12 + "/overview-scan.tiff": 200_000,
}
SYMLINKS = {
    "latest-lesion-image": b"patients/M\xc3\xbcller-Hans-1961/l\xc3\xa4sion-r\xc3\xbccken.jpg",
    "patients/archive-pointer-link": b"/srv/clinic/archive/" + b"deep-archive-path-" * 150,
}
XATTRS = {
    "patients/dermoscopy-series-A.dcm": (b"user.dermfs.diagnosis", b"suspected melanoma, refer"),
    "patients/Müller-Hans-1961": (b"user.clinician-comment", os.urandom(300)),
}


@dataclass
class Plaintext:
    """Everything secret that was put into the volume."""

    strings: set[bytes] = field(default_factory=set)
    contents: list[bytes] = field(default_factory=list)


def fill(volume: Volume) -> Plaintext:
    """Write the directories, files, symlinks and xattrs above; return their plaintext."""
    tree = PlainTree(volume)
    secret = Plaintext()
    for path in DIRECTORIES:
        tree.mkdir(path)
    for path, size in FILES.items():
        data = os.urandom(size)
        tree.write_file(path, data)
        secret.contents.append(data)
    zeros = bytes(3 * volume.geometry.chunk_size + 5)
    tree.write_file("zero-filled-image.raw", zeros)
    secret.contents.append(zeros)
    for path, target in SYMLINKS.items():
        tree.symlink(path, target)
        secret.strings.add(target)
        secret.contents.append(target)

    for path, (name, value) in XATTRS.items():
        backing = volume.store / tree.backing_path(path)
        backing_name = volume.xattrs.encrypt_name(name)
        if tree.is_dir(path):
            fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY)
            object_id = volume.read_dir_id(fd)
        else:
            fd = os.open(backing, os.O_RDONLY)
            object_id = volume.read_file_keys(fd).file_id
        os.close(fd)
        os.setxattr(
            backing, backing_name, volume.xattrs.encrypt_value(object_id, backing_name, value)
        )
        secret.strings |= {name, name.removeprefix(b"user."), value}
        secret.contents.append(value)

    for path in [*DIRECTORIES, *FILES, *SYMLINKS, "zero-filled-image.raw"]:
        for part in path.split("/"):
            secret.strings.add(part.encode())
    return secret


def store_bytes(store: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (where, bytes) for every name, file, symlink target and xattr in *store*."""
    for directory, dirs, files in os.walk(store):
        here = Path(directory)
        yield from xattrs_of(here)
        for name in (*dirs, *files):
            path = here / name
            yield f"name of {path}", os.fsencode(name)
            if path.is_symlink():
                yield f"target of {path}", os.fsencode(os.readlink(path))
            elif path.is_file():
                yield f"contents of {path}", path.read_bytes()
                yield from xattrs_of(path)


def xattrs_of(path: Path) -> Iterator[tuple[str, bytes]]:
    for xattr in os.listxattr(path, follow_symlinks=False):
        yield f"xattr name on {path}", os.fsencode(xattr)
        yield f"xattr value on {path}", os.getxattr(path, xattr, follow_symlinks=False)


def leaks(store: Path, secret: Plaintext) -> list[str]:
    """Return where any secret string, or any 16-byte window of any content, shows."""
    windows = {
        content[start : start + WINDOW]
        for content in secret.contents
        for start in range(len(content) - WINDOW + 1)
    }
    found = []
    for where, data in store_bytes(store):
        found += [f"{where}: holds a plaintext string" for text in secret.strings if text in data]
        for start in range(len(data) - WINDOW + 1):
            if data[start : start + WINDOW] in windows:
                found.append(f"{where}: holds plaintext content at byte {start}")
                break
    return found


@pytest.mark.parametrize("chunk_size", [4096, 65536])
def test_nothing_in_the_store_is_plaintext(
    chunk_size: int,
    make_store: Callable[[int], Path],
    open_volume: Callable[[Path], Volume],
) -> None:
    volume = open_volume(make_store(chunk_size))
    secret = fill(volume)
    tree = PlainTree(volume)

    # Everything went in and reads back, so the scan below looks at real ciphertext.
    assert tree.readlink("latest-lesion-image") == SYMLINKS["latest-lesion-image"]
    assert LONG_NAME.encode() in tree.listdir("patients/Müller-Hans-1961")
    assert len(tree.read_file("patients/dermoscopy-series-A.dcm")) == 70_000
    backing_dir = volume.store / tree.backing_path("patients/Müller-Hans-1961")
    assert any(name.endswith(".long") for name in os.listdir(backing_dir))
    assert os.listxattr(backing_dir)
    assert (volume.store / "dermfs.intent").exists()

    assert leaks(volume.store, secret) == []


def test_the_scan_finds_plaintext_where_it_is(tmp_path: Path) -> None:
    secret = Plaintext({b"secret-name", b"secret-value"}, [os.urandom(100)])
    store = tmp_path / "leaky"
    store.mkdir()
    (store / "dir").mkdir()
    (store / "dir" / "secret-name").mkdir()
    (store / "dir" / "file").write_bytes(b"header" + secret.contents[0][40:56] + b"trailer")
    (store / "link").symlink_to("to-secret-name")
    (store / "clean").write_bytes(b"nothing here")
    os.setxattr(store / "clean", b"user.x", b"the secret-value")
    os.setxattr(store / "dir", b"user.secret-name", b"v")

    found = leaks(store, secret)

    assert sorted(where.replace(str(store), "") for where in found) == [
        "contents of /dir/file: holds plaintext content at byte 6",
        "name of /dir/secret-name: holds a plaintext string",
        "target of /link: holds a plaintext string",
        "xattr name on /dir: holds a plaintext string",
        "xattr value on /clean: holds a plaintext string",
    ]
