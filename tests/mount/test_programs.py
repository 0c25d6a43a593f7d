"""Real programs on a real mount: cp, diff, rsync, tar, git and sqlite3.

All tests of this module share one volume, mounted once with the default options, so that
the later tests see what the earlier ones left: the workloads (``cp -a``, ``rsync -a``,
``tar``, ``git``, ``sqlite3``) run first, each in its own directory of the mount; then
:func:`test_nothing_in_the_clear` scans the store and :func:`test_every_file_survives_remount`
remounts and hashes every file. Run alone, those two first run the workloads they find
missing (:func:`workloads`), so that they always check something.

The tree the copies start from (:func:`source_tree`) is up to 3,000 files of at most
64 KiB from the Python standard library, plus generated files: multi-chunk random and
text files, a sparse file, an empty file and directory, symlinks (relative, to a
directory, dangling, absolute), a hard link across directories, user xattrs, a non-ASCII
name and a long one.

Every program runs with ``LC_ALL=C``, git and sqlite3 with a private ``HOME`` too. The
mount is torn down at the end of the module even when a test fails, and a WARNING in the
daemon's log fails the last test (``mount_volume``).
"""

from __future__ import annotations

import array
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mount.conftest import (
    Mount,
    fuse_unavailable,
    make_volume,
    mount_volume,
    mounts_under,
    unmount,
)

pytestmark = pytest.mark.mount

CHUNK = 65536
#: How many standard-library files the source tree takes (fewer if the library is smaller).
STDLIB_FILES = 3000
#: Fewer than this many found means the interpreter's library is not what we expect.
STDLIB_FILES_AT_LEAST = 2000
PROGRAM_TIMEOUT = 300

#: The top-level directories of the mount that each workload writes.
CP_COPY, RSYNC_COPY, UNTAR_DIR, ARCHIVE = "cp-copy", "rsync-copy", "untarred", "archive.tar"
GIT_DIR, SQLITE_DIR = "git-work", "sqlite-work"
#: Inside UNTAR_DIR the archive, made of CP_COPY, unpacks to this.
UNTAR_COPY = f"{UNTAR_DIR}/{CP_COPY}"

XATTR_NAME = "user.dermfs-test.comment"


# ------------------------------------------------------------------------------ helpers


def run(
    *args: str | Path, cwd: Path | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a program with a C locale and return what it did."""
    env = dict(os.environ, LC_ALL="C", TZ="UTC")
    env.update(kwargs.pop("env", None) or {})  # type: ignore[arg-type]
    return subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=kwargs.pop("timeout", PROGRAM_TIMEOUT),  # type: ignore[arg-type]
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def ok(*args: str | Path, **kwargs: object) -> str:
    """Run a program, insist that it exits 0, and return its standard output."""
    result = run(*args, **kwargs)  # type: ignore[arg-type]
    shown = " ".join(map(str, args))
    assert result.returncode == 0, f"{shown}: exit {result.returncode}\n{result.stderr}"
    return result.stdout


def sha256_of(path: Path) -> str:
    """Return the sha256 of the file at *path*."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def entries_below(root: Path) -> dict[str, os.stat_result]:
    """Return the lstat of every entry below *root*, by path relative to it."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = os.lstat(path)
    return found


def file_digests(root: Path) -> dict[str, str]:
    """Return the sha256 of every regular file below *root* (symlinks not followed)."""
    return {
        relative: sha256_of(root / relative)
        for relative, status in entries_below(root).items()
        if stat.S_ISREG(status.st_mode)
    }


def symlink_targets(root: Path) -> dict[str, str]:
    """Return the target of every symlink below *root*."""
    return {
        relative: os.readlink(root / relative)
        for relative, status in entries_below(root).items()
        if stat.S_ISLNK(status.st_mode)
    }


# ------------------------------------------------------------------------ the source tree


@dataclass(frozen=True)
class Tree:
    """The tree the copying programs start from.

    Attributes:
        root: its directory (outside the mount).
        stdlib_files: how many files it took from the standard library.
        hard_links: two paths of one file.
        xattr_files: files that carry :data:`XATTR_NAME`, with its value.
        dense_files: files whose every 16-byte window the clear-text scan looks for.
    """

    root: Path
    stdlib_files: int
    hard_links: tuple[str, str]
    xattr_files: dict[str, bytes]
    dense_files: tuple[str, ...]


def _copy_stdlib(target: Path) -> list[str]:
    """Copy up to STDLIB_FILES regular files of at most one chunk from the stdlib."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    copied: list[str] = []
    for directory, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(name for name in dirs if name != "__pycache__")
        for name in sorted(files):
            source = Path(directory, name)
            status = source.lstat()
            if not stat.S_ISREG(status.st_mode) or status.st_size > CHUNK:
                continue
            relative = source.relative_to(stdlib)
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)
            copied.append(str(relative))
            if len(copied) == STDLIB_FILES:
                return copied
    return copied


def _generated_text(rng: random.Random, size: int) -> bytes:
    words = ["retina", "macula", "fundus", "lesion", "dermoscopy", "follow-up", "left", "right"]
    lines = []
    length = 0
    while length < size:
        line = f"{len(lines):07d} " + " ".join(rng.choice(words) for _ in range(8)) + "\n"
        lines.append(line)
        length += len(line)
    return "".join(lines).encode()[:size]


def build_tree(root: Path) -> Tree:
    """Make the source tree below *root* (see the module docstring)."""
    rng = random.Random(20240611)
    lib = root / "lib"
    copied = _copy_stdlib(lib)
    assert len(copied) >= STDLIB_FILES_AT_LEAST, f"only {len(copied)} stdlib files"

    extra = root / "extra"
    (extra / "nested" / "deeper").mkdir(parents=True)
    (extra / "empty-directory").mkdir()
    (extra / "empty-file.txt").touch()
    (extra / "random-multi-chunk.bin").write_bytes(rng.randbytes(16 * CHUNK + 123))
    (extra / "random-three-chunks.bin").write_bytes(rng.randbytes(3 * CHUNK - 1))
    (extra / "generated-text.txt").write_bytes(_generated_text(rng, 4 * CHUNK + 77))
    (extra / "naïve-résumé-ünïcode.txt").write_text("ünïcode content, and some more of it\n")
    (extra / ("long-name-" * 20 + "end.txt")).write_bytes(rng.randbytes(999))
    with open(extra / "sparse-file.bin", "wb") as stream:
        stream.write(rng.randbytes(1000))
        stream.seek(40 * CHUNK)
        stream.write(rng.randbytes(5000))

    original = "extra/hardlinked-original.dat"
    second = "extra/nested/deeper/hardlinked-second.dat"
    (root / original).write_bytes(rng.randbytes(2 * CHUNK + 5))
    os.link(root / original, root / second)

    first_dir = sorted(path for path in lib.iterdir() if path.is_dir())[0]
    (extra / "link-to-directory").symlink_to(os.path.relpath(first_dir, extra))
    (extra / "nested" / "link-to-file").symlink_to("../generated-text.txt")
    (extra / "dangling-link").symlink_to("missing-target-of-dangling-link")
    (extra / "absolute-link").symlink_to("/nonexistent/absolute-target/elsewhere")

    xattr_files = {}
    labelled = ("lib/" + copied[0], "lib/" + copied[len(copied) // 2], original)
    for number, relative in enumerate(labelled):
        value = f"xattr value {number}: patient PAT-{number:06d}, photograph of the lesion"
        os.setxattr(root / relative, XATTR_NAME, value.encode())
        xattr_files[relative] = value.encode()

    by_size = sorted(copied, key=lambda relative: (lib / relative).stat().st_size)
    dense = (*("lib/" + relative for relative in by_size[-3:]), "extra/generated-text.txt")
    return Tree(root, len(copied), (original, second), xattr_files, dense)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """The source tree, made once for the module."""
    return build_tree(tmp_path_factory.mktemp("source") / "tree")


# ------------------------------------------------------------------------------- the mount


@pytest.fixture(scope="module")
def mount(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Mount]:
    """One volume for the whole module, mounted with the default options."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("programs")
    volume = make_volume(base)
    try:
        yield from mount_volume(volume, request)
    finally:
        try:
            unmount(volume)
        finally:
            left = mounts_under(base)
            for point in reversed(left):
                subprocess.run(["fusermount3", "-uz", point], capture_output=True, check=False)
            assert not left, f"mounts left behind: {left}"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private HOME for git and sqlite3, so the user's configuration stays out."""
    return tmp_path_factory.mktemp("home")


# ------------------------------------------------------------------------------ workloads


def compare_trees(expected: Path, copy: Path) -> None:
    """``diff -r`` finds no difference, and every entry has the same type, mode and size."""
    result = run("diff", "-r", "--no-dereference", expected, copy)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")

    want, got = entries_below(expected), entries_below(copy)
    assert sorted(got) == sorted(want)
    for relative, status in want.items():
        copied = got[relative]
        assert stat.S_IMODE(copied.st_mode) == stat.S_IMODE(status.st_mode), relative
        assert stat.S_IFMT(copied.st_mode) == stat.S_IFMT(status.st_mode), relative
        if not stat.S_ISDIR(status.st_mode):
            assert copied.st_size == status.st_size, relative


def check_links_and_xattrs(tree: Tree, copy: Path) -> None:
    """The hard link is one inode with two links, and the xattrs came along."""
    first, second = (os.lstat(copy / relative) for relative in tree.hard_links)
    assert first.st_ino == second.st_ino
    assert first.st_nlink == second.st_nlink == 2
    for relative, value in tree.xattr_files.items():
        assert os.getxattr(copy / relative, XATTR_NAME) == value, relative


#: Which workloads have run on the module's mount, by name.
_done: set[str] = set()


def _once(name: str, action: Callable[[], None]) -> None:
    if name not in _done:
        action()
        _done.add(name)


def do_cp(mount: Mount, tree: Tree) -> None:
    ok("cp", "-a", tree.root, mount.path / CP_COPY)


def do_rsync(mount: Mount, tree: Tree) -> None:
    ok("rsync", "-aHX", f"{tree.root}/", f"{mount.path / RSYNC_COPY}/")


def do_tar(mount: Mount, tree: Tree) -> None:
    _once("cp", lambda: do_cp(mount, tree))
    flags = ["--xattrs", "--xattrs-include=user.*"]
    ok("tar", *flags, "-C", mount.path, "-cf", mount.path / ARCHIVE, CP_COPY)
    (mount.path / UNTAR_DIR).mkdir()
    ok("tar", *flags, "-C", mount.path / UNTAR_DIR, "-xf", mount.path / ARCHIVE)


def git(home: Path, *args: str | Path, cwd: Path) -> str:
    """Run git with a private HOME and fixed identity; return its standard output."""
    env = {
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Test Author",
        "GIT_AUTHOR_EMAIL": "author@example.org",
        "GIT_COMMITTER_NAME": "Test Committer",
        "GIT_COMMITTER_EMAIL": "committer@example.org",
    }
    return ok("git", *args, cwd=cwd, env=env)


GIT_MESSAGES = [
    "add the notes and a binary image",
    "modify five notes",
    "rename notes and a directory",
    "delete two notes",
    "rewrite the image and add more notes",
]


def do_git(mount: Mount, home: Path) -> None:
    rng = random.Random(7)
    work = mount.path / GIT_DIR
    work.mkdir()
    repo = work / "repository"
    git(home, "-c", "init.defaultBranch=main", "init", "-q", repo, cwd=work)

    notes = repo / "clinical-notes"
    notes.mkdir()
    for number in range(30):
        (notes / f"note-{number:03d}.txt").write_bytes(_generated_text(rng, 2000 + number * 300))
    (repo / "images").mkdir()
    (repo / "images" / "photograph.raw").write_bytes(rng.randbytes(5 * CHUNK + 3))
    git(home, "add", "-A", cwd=repo)
    git(home, "commit", "-q", "-m", GIT_MESSAGES[0], cwd=repo)

    for number in range(0, 25, 5):
        with open(notes / f"note-{number:03d}.txt", "ab") as stream:
            stream.write(b"an appended line of a modified note\n")
    git(home, "commit", "-q", "-a", "-m", GIT_MESSAGES[1], cwd=repo)

    for number in range(1, 4):
        git(home, "mv", f"clinical-notes/note-{number:03d}.txt", f"renamed-{number}.txt", cwd=repo)
    git(home, "mv", "images", "photographs", cwd=repo)
    git(home, "commit", "-q", "-m", GIT_MESSAGES[2], cwd=repo)

    git(home, "rm", "-q", "clinical-notes/note-010.txt", "clinical-notes/note-011.txt", cwd=repo)
    git(home, "commit", "-q", "-m", GIT_MESSAGES[3], cwd=repo)

    (repo / "photographs" / "photograph.raw").write_bytes(rng.randbytes(4 * CHUNK + 9))
    for number in range(30, 40):
        (notes / f"note-{number:03d}.txt").write_bytes(_generated_text(rng, 3000))
    git(home, "add", "-A", cwd=repo)
    git(home, "commit", "-q", "-m", GIT_MESSAGES[4], cwd=repo)

    git(home, "gc", "-q", "--prune=now", cwd=repo)
    git(home, "clone", "-q", repo, work / "clone", cwd=work)


SQL_BATCHES, SQL_ROWS = 100, 100


def payload(database: str, row_id: int) -> str:
    """The payload column of row *row_id* of *database*: 64 hex digits."""
    return hashlib.sha256(f"{database}/{row_id}".encode()).hexdigest()


def insert_script(database: str, pragmas: str) -> str:
    """SQL that makes table ``t`` and fills it in SQL_BATCHES transactions of SQL_ROWS rows."""
    lines = [pragmas, "CREATE TABLE t (id INTEGER PRIMARY KEY, batch INTEGER, payload TEXT);"]
    for batch in range(SQL_BATCHES):
        lines.append("BEGIN;")
        for row in range(SQL_ROWS):
            row_id = batch * SQL_ROWS + row + 1
            lines.append(
                f"INSERT INTO t VALUES ({row_id}, {batch}, '{payload(database, row_id)}');"
            )
        lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


#: A writer that commits every row in WAL mode, never checkpoints, and is then killed.
_KILLED_WAL_WRITER = textwrap.dedent(
    """
    import hashlib, sqlite3, sys, time
    path, name, batches, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    db = sqlite3.connect(path, isolation_level=None)
    assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, batch INTEGER, payload TEXT)")
    for batch in range(batches):
        db.execute("BEGIN")
        for row in range(rows):
            row_id = batch * rows + row + 1
            text = hashlib.sha256(f"{name}/{row_id}".encode()).hexdigest()
            db.execute("INSERT INTO t VALUES (?, ?, ?)", (row_id, batch, text))
        db.execute("COMMIT")
    print("committed", flush=True)
    time.sleep(600)
    """
)

SQLITE_DATABASES = ("rollback-journal.db", "write-ahead-log.db", "killed-writer.db")


def do_sqlite(mount: Mount, home: Path) -> None:
    work = mount.path / SQLITE_DIR
    work.mkdir()
    rollback, wal, killed = SQLITE_DATABASES
    ok(
        "sqlite3",
        "-bail",
        work / rollback,
        input=insert_script(rollback, "PRAGMA journal_mode=DELETE;"),
        env={"HOME": str(home)},
    )
    ok(
        "sqlite3",
        "-bail",
        work / wal,
        input=insert_script(wal, "PRAGMA journal_mode=WAL;"),
        env={"HOME": str(home)},
    )

    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLED_WAL_WRITER,
            work / killed,
            killed,
            str(SQL_BATCHES),
            str(SQL_ROWS),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "committed\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        if writer.stdout is not None:
            writer.stdout.close()
    assert (work / f"{killed}-wal").stat().st_size > 0


def check_databases(work: Path, home: Path, databases: tuple[str, ...]) -> None:
    """Each database passes integrity_check and holds exactly the rows inserted."""
    expected_rows = SQL_BATCHES * SQL_ROWS
    for database in databases:
        query = (
            "PRAGMA integrity_check; SELECT count(*) FROM t; SELECT id, payload FROM t ORDER BY id;"
        )
        lines = ok("sqlite3", work / database, query, env={"HOME": str(home)}).splitlines()
        assert lines[:2] == ["ok", str(expected_rows)], (database, lines[:2])
        assert lines[2:] == [
            f"{row_id}|{payload(database, row_id)}" for row_id in range(1, expected_rows + 1)
        ], database


@pytest.fixture
def workloads(mount: Mount, source_tree: Tree, home: Path) -> Mount:
    """The module's mount after every workload ran (running the ones that did not)."""
    _once("cp", lambda: do_cp(mount, source_tree))
    _once("rsync", lambda: do_rsync(mount, source_tree))
    _once("tar", lambda: do_tar(mount, source_tree))
    _once("git", lambda: do_git(mount, home))
    _once("sqlite", lambda: do_sqlite(mount, home))
    return mount


# -------------------------------------------------------------------------- the workloads


def test_cp_a_then_diff_finds_no_difference(mount: Mount, source_tree: Tree) -> None:
    do_cp(mount, source_tree)
    _done.add("cp")

    copy = mount.path / CP_COPY
    compare_trees(source_tree.root, copy)
    check_links_and_xattrs(source_tree, copy)
    want, got = entries_below(source_tree.root), entries_below(copy)
    for relative, status in want.items():
        assert got[relative].st_mtime_ns == status.st_mtime_ns, relative
    assert symlink_targets(copy) == symlink_targets(source_tree.root)


def test_rsync_in_then_checksum_dry_run_finds_no_difference(
    mount: Mount, source_tree: Tree
) -> None:
    do_rsync(mount, source_tree)
    _done.add("rsync")

    copy = mount.path / RSYNC_COPY
    itemized = ok(
        "rsync", "-aHX", "-c", "--dry-run", "--itemize-changes", f"{source_tree.root}/", f"{copy}/"
    )
    assert itemized == ""
    compare_trees(source_tree.root, copy)
    check_links_and_xattrs(source_tree, copy)


def test_tar_create_on_and_extract_into_the_mount(mount: Mount, source_tree: Tree) -> None:
    do_tar(mount, source_tree)
    _done.add("tar")

    listing = ok("tar", "-tf", mount.path / ARCHIVE).splitlines()
    assert len(listing) == len(entries_below(source_tree.root)) + 1  # and CP_COPY itself
    compare_trees(source_tree.root, mount.path / UNTAR_COPY)
    check_links_and_xattrs(source_tree, mount.path / UNTAR_COPY)
    ok("tar", "--compare", "-f", mount.path / ARCHIVE, "-C", mount.path / UNTAR_DIR)


def test_git_commits_gc_and_fsck(mount: Mount, home: Path) -> None:
    do_git(mount, home)
    _done.add("git")

    for repo in (mount.path / GIT_DIR / "repository", mount.path / GIT_DIR / "clone"):
        result = run("git", "fsck", "--full", "--strict", cwd=repo, env={"HOME": str(home)})
        assert result.returncode == 0, result.stderr
        assert "error" not in result.stderr and "missing" not in result.stderr, result.stderr
        log = git(home, "log", "--format=%s", cwd=repo).splitlines()
        assert log == GIT_MESSAGES[::-1]
        assert git(home, "status", "--porcelain", cwd=repo) == ""
        assert git(home, "count-objects", "-v", cwd=repo).startswith("count: 0\n")

    repo = mount.path / GIT_DIR / "repository"
    names = git(home, "ls-files", cwd=repo).splitlines()
    assert "renamed-2.txt" in names and "photographs/photograph.raw" in names
    assert "clinical-notes/note-010.txt" not in names and "clinical-notes/note-002.txt" not in names
    assert len(names) == 30 - 2 + 10 + 1
    git(home, "checkout", "-q", "HEAD~4", cwd=repo)
    assert (repo / "images" / "photograph.raw").stat().st_size == 5 * CHUNK + 3
    git(home, "checkout", "-q", "main", cwd=repo)
    assert git(home, "status", "--porcelain", cwd=repo) == ""


def test_sqlite_inserts_in_transactions_survive_remount(mount: Mount, home: Path) -> None:
    do_sqlite(mount, home)
    _done.add("sqlite")

    work = mount.path / SQLITE_DIR
    rollback, wal, killed = SQLITE_DATABASES
    check_databases(work, home, (rollback, wal))
    mount.remount()
    assert (work / f"{killed}-wal").stat().st_size > 0  # read first after the remount
    check_databases(work, home, SQLITE_DATABASES)
    modes = [ok("sqlite3", work / name, "PRAGMA journal_mode;").strip() for name in (rollback, wal)]
    assert modes == ["delete", "wal"]


# ----------------------------------------------------------------------- nothing in clear

#: Content windows of binary data start at these bytes; see anchored_windows.
BINARY_ANCHORS = b"\x00\x01\x02\x7f\x80\x81\xfe\xff"
WINDOW = 16
#: Windows with fewer distinct bytes (runs of zeros, padding, indentation) are not looked for.
MIN_DISTINCT = 8
#: Shorter names are not looked for.
MIN_NAME = 6
#: Shorter names are looked for as whole backing names, not inside them (see the test).
SUBSTRING_NAME = 8
#: The store's one plaintext file: JSON whose layout is fixed by the format, so a JSON file
#: in the tree can share a 16-byte run with it (``\n      "provider``); names are looked for
#: in it all the same.
VOLUME_FILE = "dermfs.volume"


def anchored_windows(data: bytes) -> list[bytes]:
    """The 16-byte windows of *data* that start at an anchor (see below).

    The anchors are chosen by content, so that a run of plaintext yields the same windows
    wherever it lies: (a) the first byte after a newline and the spaces and tabs that follow
    it, which gives a window per line of text; (b) a byte of BINARY_ANCHORS that is not
    followed by the same byte, which gives a window every 32 bytes of random-looking data
    on average, but not one per byte of a run of zeros.
    """
    windows: list[bytes] = []
    lines = data.split(b"\n")
    for at, line in enumerate(lines):
        if at and line:
            text = line.lstrip(b" \t")
            if len(text) < WINDOW:
                text = b"\n".join(lines[at : at + WINDOW]).lstrip(b" \t")
            windows.append(text[:WINDOW])
    tail = WINDOW - 1
    for anchor in (BINARY_ANCHORS[index : index + 1] for index in range(len(BINARY_ANCHORS))):
        pieces = data.split(anchor)
        windows += [
            anchor
            + (piece[:tail] if len(piece) >= tail else anchor.join(pieces[at : at + WINDOW])[:tail])
            for at, piece in enumerate(pieces)
            if at and piece
        ]
    return [window for window in windows if len(window) == WINDOW]


def names_in(names: set[bytes], data: bytes) -> set[bytes]:
    """Return the *names* (each at least 4 bytes long) that occur in *data*.

    A name is looked for only where its first four bytes occur at some offset of *data*,
    which a pass over *data* as 32-bit words, at each of the four alignments, tells.
    """
    by_prefix: dict[int, list[bytes]] = {}
    for name in names:
        by_prefix.setdefault(int.from_bytes(name[:4], "little"), []).append(name)
    prefixes = set(by_prefix)
    candidates: set[int] = set()
    for alignment in range(4):
        usable = (len(data) - alignment) // 4 * 4
        candidates |= prefixes.intersection(array.array("I", data[alignment : alignment + usable]))
    return {name for prefix in candidates for name in by_prefix[prefix] if name in data}


def every_window(data: bytes) -> list[bytes]:
    """Every 16-byte window of *data*."""
    return [data[offset : offset + WINDOW] for offset in range(len(data) - WINDOW + 1)]


def distinct_enough(windows: set[bytes]) -> set[bytes]:
    """The windows of at least MIN_DISTINCT distinct byte values."""
    return {window for window in windows if len(set(window)) >= MIN_DISTINCT}


def anchored_leaks(needles: set[bytes], data: bytes) -> set[bytes]:
    """The windows of *needles* found at the anchors of *data* (distinct enough to count)."""
    return distinct_enough(needles.intersection(anchored_windows(data)))


def dense_leaks(needles: set[bytes], prefixes: set[int], data: bytes) -> set[bytes]:
    """The windows of *needles* found at any offset of *data*.

    *prefixes* holds the first 8 bytes of each needle as an integer; compared with *data*
    read as 64-bit words at each of the 8 alignments, they tell whether there is anything
    to look at closely.
    """
    for alignment in range(8):
        usable = (len(data) - alignment) // 8 * 8
        if not prefixes.isdisjoint(array.array("Q", data[alignment : alignment + usable])):
            return needles.intersection(every_window(data))
    return set()


def splice(data: bytes, inserted: bytes) -> bytes:
    """*data* with *inserted* put in its middle (to show that a check finds a leak)."""
    middle = len(data) // 2 + 3
    return data[:middle] + inserted + data[middle:]


@dataclass
class Store:
    """What a thief of the store can read, gathered by one walk."""

    root: Path
    names: list[str]
    symlink_targets: dict[str, bytes]
    xattrs: dict[str, list[tuple[str, bytes]]]
    files: dict[str, int]  # relative path: backing inode

    def metadata(self) -> list[bytes]:
        """Every backing name, symlink target and xattr name and value."""
        parts = [os.fsencode(name) for name in self.names]
        parts += self.symlink_targets.values()
        for pairs in self.xattrs.values():
            for name, value in pairs:
                parts += [name.encode(), value]
        return parts

    def metadata_text(self) -> bytes:
        """:meth:`metadata`, one per line."""
        return b"\n".join(self.metadata())

    def metadata_words(self) -> set[bytes]:
        """:meth:`metadata`, and each ``/``-separated part of it."""
        parts = self.metadata()
        return {*parts, *(word for part in parts for word in part.split(b"/"))}


def walk_store(store: Path) -> Store:
    found = Store(store, [], {}, {}, {})
    for directory, dirs, files in os.walk(store):
        for name in [".", *dirs, *files]:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, store)
            status = os.lstat(path)
            if name != ".":
                found.names.append(name)
            if stat.S_ISLNK(status.st_mode):
                found.symlink_targets[relative] = os.fsencode(os.readlink(path))
                continue
            found.xattrs[relative] = [
                (attribute, os.getxattr(path, attribute, follow_symlinks=False))
                for attribute in os.listxattr(path, follow_symlinks=False)
            ]
            if stat.S_ISREG(status.st_mode):
                found.files[relative] = status.st_ino
    return found


def plaintext_names(mount: Mount, tree: Tree) -> set[bytes]:
    """Every name of at least MIN_NAME bytes the workloads used, and the symlink targets."""
    names: set[bytes] = set()
    for directory, dirs, files in os.walk(mount.path):
        for name in dirs + files:
            names.add(os.fsencode(name))
            path = os.path.join(directory, name)
            if os.path.islink(path):
                names.add(os.fsencode(os.readlink(path)))
    names.add(XATTR_NAME.encode())
    names.add(XATTR_NAME.removeprefix("user.").encode())
    names.update(
        f"{database}-{suffix}".encode()
        for database in SQLITE_DATABASES
        for suffix in ("journal", "wal", "shm")
    )
    names.update({b"index.lock", b"packed-refs", b"COMMIT_EDITMSG"})
    return {name for name in names if len(name) >= MIN_NAME}


def plaintext_files(mount: Mount, tree: Tree) -> list[Path]:
    """The plaintext of everything the workloads wrote, as files to read.

    The three copies of the tree hold the tree's bytes (the workload tests compare them), so
    the tree is read outside the mount; the rest is read through it.
    """
    paths = [tree.root / relative for relative in file_digests(tree.root)]
    for top in (ARCHIVE, GIT_DIR, SQLITE_DIR):
        path = mount.path / top
        paths += [path] if path.is_file() else [path / relative for relative in file_digests(path)]
    return paths


def find_in_store(store: Path, found: Store, needle: bytes) -> list[str]:
    """Say where in the store *needle* appears (the slow way; only for the failure message)."""
    places = []
    for relative in found.files:
        if needle in (store / relative).read_bytes():
            places.append(relative)
    if needle in found.metadata_text():
        places.append("(a name, symlink target or xattr)")
    return places


def test_nothing_in_the_clear(workloads: Mount, source_tree: Tree) -> None:
    """No plaintext name and no run of plaintext content is readable in the store.

    The store is scanned while mounted, so the intent log is part of it: every backing
    name, every symlink target, every xattr name and value of every backing entry, and the
    bytes of every backing file.

    Names: every name on the mount of at least 6 bytes (UTF-8), every symlink target, the
    xattr name, and the names sqlite and git make and remove again (``*-journal``,
    ``*-wal``, ``*-shm``, ``index.lock``, ...) are looked for

    (a) in all backing names, symlink targets and xattr names and values: as substrings if
        they are 8 bytes or longer; if shorter, as a whole name, target, value, or
        ``/``-separated part of one (inside the random base64 of some 10,000 backing
        names, one of a few dozen 6-byte names would turn up by chance about once in
        10,000 runs);
    (b) as substrings of the whole bytes of every file dermfs keeps beside the content (a
        backing file whose name has a dot: ``dermfs.volume``, ``dermfs.dirid``,
        ``dermfs.intent``, ``dermfs.lock``, the ``*.name`` sidecars; not the ``*.long``
        content files), and of the audit journal's files, which lie outside the store
        but on the same disk.

    Names are not looked for in the content files' ciphertext, where a 6-byte one would
    turn up by chance every few thousand runs; plaintext there is what the content check
    looks for.

    Content: the plaintext is every file the workloads wrote: the tree (for its three
    copies, which the workload tests show are equal to it) and, read through the mount, the
    tar archive, the git work trees and repositories and the sqlite databases.

    - Anchored windows: the 16-byte windows of that plaintext that begin at a content-chosen
      anchor (:func:`anchored_windows`: the first byte of each line after its indentation,
      and bytes of :data:`BINARY_ANCHORS` not followed by the same byte), about one window
      per line of text and one per 32 bytes of binary data, are looked for at every anchor
      of every backing file (except ``dermfs.volume``, see :data:`VOLUME_FILE`) and of the
      text in (a). A run of plaintext of 200 bytes that turned up anywhere in a backing
      file would be found almost surely; one of 80 bytes, about 9 times in 10.
    - Dense windows: every 16-byte window of four files (the three largest standard-library
      files and the 4-chunk generated text), looked for at every offset of the backing
      files of their three copies and of every file of (b).

    Windows with fewer than 8 distinct byte values (runs of zeros, padding, indentation)
    do not count, since the store's own structures hold such runs. Before the scan, each
    check is shown to find what it looks for in plaintext (a check that finds nothing
    anywhere proves nothing).
    """
    store = workloads.volume.store
    found = walk_store(store)
    assert len(found.files) > 3 * source_tree.stdlib_files
    dermfs_files = [
        relative
        for relative in found.files
        if "." in os.path.basename(relative) and not relative.endswith(".long")
    ]
    metadata = found.metadata_text()
    own_bytes = b"\n".join((store / relative).read_bytes() for relative in dermfs_files)

    by_inode = {inode: relative for relative, inode in found.files.items()}
    some_file = workloads.path / CP_COPY / "extra" / "random-three-chunks.bin"
    some_ciphertext = (store / by_inode[os.lstat(some_file).st_ino]).read_bytes()

    names = plaintext_names(workloads, source_tree)
    assert names_in(names, b"\n".join(sorted(names))) == names
    short = {name for name in names if len(name) < SUBSTRING_NAME}
    leaked_names = sorted(
        names_in(names - short, metadata)
        | (short & found.metadata_words())
        | names_in(names, own_bytes)
    )
    assert not leaked_names, "plaintext names in the store: " + ", ".join(
        f"{name!r} in {find_in_store(store, found, name)}" for name in leaked_names[:10]
    )
    journal_files = sorted(workloads.volume.base.glob("volume.audit*"))
    assert journal_files
    for path in journal_files:
        leaked_names = sorted(names_in(names, path.read_bytes()))
        assert not leaked_names, f"plaintext names in the audit journal {path}: {leaked_names[:10]}"

    anchored: set[bytes] = set()
    for path in plaintext_files(workloads, source_tree):
        anchored.update(anchored_windows(path.read_bytes()))
    for sample in (*source_tree.dense_files, "extra/random-multi-chunk.bin"):
        planted = splice(some_ciphertext, (source_tree.root / sample).read_bytes()[5000:5300])
        assert anchored_leaks(anchored, planted), f"the anchored check misses {sample}"
    for relative in found.files:
        if relative != VOLUME_FILE:
            leaks = anchored_leaks(anchored, (store / relative).read_bytes())
            assert not leaks, f"plaintext {sorted(leaks)[:3]} in backing file {relative}"
    assert not anchored_leaks(anchored, metadata)

    dense: set[bytes] = set()
    for relative in source_tree.dense_files:
        dense.update(every_window((source_tree.root / relative).read_bytes()))
    dense = distinct_enough(dense)
    prefixes = {int.from_bytes(window[:8], "little") for window in dense}
    for relative in source_tree.dense_files:
        planted = splice(some_ciphertext, (source_tree.root / relative).read_bytes()[777:793])
        assert dense_leaks(dense, prefixes, planted), f"the dense check misses {relative}"
    copies = [
        by_inode[os.lstat(workloads.path / top / relative).st_ino]
        for top in (CP_COPY, RSYNC_COPY, UNTAR_COPY)
        for relative in source_tree.dense_files
    ]
    for relative in dermfs_files + copies:
        leaks = dense_leaks(dense, prefixes, (store / relative).read_bytes())
        assert not leaks, f"plaintext {sorted(leaks)[:3]} in backing file {relative}"


# ------------------------------------------------------------------------------ persistence


def test_every_file_survives_remount(workloads: Mount, source_tree: Tree) -> None:
    """After unmount and mount, every file has the sha256 it was written with.

    For the three copies of the tree that is the tree's own sha256; for the rest (archive,
    git, sqlite) it is what the mount returned before the remount. Symlink targets, the set
    of entries and the hard links are checked too.
    """
    root = workloads.path
    tree_files = file_digests(source_tree.root)
    expected = {
        f"{top}/{relative}": digest
        for top in (CP_COPY, RSYNC_COPY, UNTAR_COPY)
        for relative, digest in tree_files.items()
    }
    expected[ARCHIVE] = sha256_of(root / ARCHIVE)
    for top in (GIT_DIR, SQLITE_DIR):
        expected.update(
            {f"{top}/{relative}": digest for relative, digest in file_digests(root / top).items()}
        )
    links = symlink_targets(root)
    entries = sorted(entries_below(root))

    workloads.remount()

    assert sorted(entries_below(root)) == entries
    assert file_digests(root) == expected
    assert symlink_targets(root) == links
    for top in (CP_COPY, RSYNC_COPY, UNTAR_COPY):
        check_links_and_xattrs(source_tree, root / top)
