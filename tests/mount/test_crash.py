"""Crash safety: ``kill -9`` of the daemon in the middle of a writing workload, 20 times.

Four volumes (two with the default mount options, two with ``-o writeback_cache``) each go
through five rounds. A round mounts the volume, starts the workload
(:data:`WORKLOAD`, a separate Python process writing in the round's own directory of the
mount; in every other round only small files, one after another, as ``cp`` and ``tar`` make
them), SIGKILLs the daemon at a random moment, kills the workload, removes the dead mount
(``fusermount3 -uz``), and mounts again through the CLI, which runs crash recovery. Then it
checks the round's files against the journal the workload kept (:func:`check_volume`) and
the earlier rounds' files against what they held after their own round (unchanged),
unmounts, and runs ``dermfs fsck``, which must exit 0. After the last round the audit
journal, which every crash cut short, must still verify (``dermfs audit verify``).

The semantics the workload keeps, and the check holds it to:

- It never reuses a name and never reopens a file once it is durable; it only makes new
  files, renames a new durable file over a durable one, and unlinks durable files.
- A file is durable once ``fsync`` returned after its last write (``how: fsync``), or once
  ``close`` returned (``how: close``); its sha256 is then in the journal. It must read back
  with exactly that sha256.
- A "log" file is appended to and fsynced over and over while it stays open. After each
  fsync the journal has its length and the sha256 of that prefix; after a crash the file
  must be at least that long and start with that prefix (at most its unsynced tail is
  lost).
- A file whose writing had started (``start``) but that was not durable yet may be missing
  or hold anything, but must be readable from end to end.
- A rename that started but did not finish leaves either both names as they were, or the
  source gone and the target holding the source's content; an unlink that did not finish
  leaves the file either as it was or gone.
- No other file appears, and every file reads from end to end without an error.

The journal lives outside the mount and is fsynced after each entry, which is written after
the step it records has returned (``start`` and the ``*-start`` entries before it began).

The daemon's log may hold the WARNINGs that recovery gives after a crash (an unclean store,
a torn final record of the intent log, an audit journal not closed cleanly or with a torn
tail); any other WARNING fails the round.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.mount.conftest import Volume, is_mounted, process_running, run_dermfs

pytestmark = [pytest.mark.mount, pytest.mark.expect_log]

ROUNDS = 5
#: The daemon is killed this long (seconds, uniformly) after the workload started writing.
KILL_AFTER = (0.05, 1.5)

#: Recovery's WARNINGs that a crash explains; any other daemon WARNING fails the round.
EXPECTED_WARNINGS = (
    "the store was not unmounted cleanly; repairing",
    "intent log ends at a bad record",
    "was not closed cleanly",  # the audit journal
    "of torn tail after record",  # the audit journal
)

WORKLOAD = textwrap.dedent(
    """
    import hashlib, json, os, random, sys

    root, journal_path, seed, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    rng = random.Random(seed)
    journal = open(journal_path, "a")
    CHUNK = 65536
    durable = []
    counter = 0

    def note(**entry):
        journal.write(json.dumps(entry) + "\\n")
        journal.flush()
        os.fsync(journal.fileno())

    def new_name(prefix):
        global counter
        counter += 1
        directory = rng.choice(["", "", "sub-a/", "sub-b/deeper/"])
        return f"{directory}{prefix}-{counter:04d}"

    def sha(data):
        return hashlib.sha256(data).hexdigest()

    def write_file(name, sync):
        # Create *name* with a random mix of writes; it is durable when this returns.
        note(op="start", name=name)
        model = bytearray()
        fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        for _ in range(rng.randint(1, 6)):
            kind = rng.choice(["pwrite", "append", "append", "truncate"])
            if kind == "truncate":
                size = rng.randint(0, len(model) + CHUNK)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(max(0, size - len(model))))
                continue
            data = rng.randbytes(rng.randint(1, 2 * CHUNK))
            offset = len(model) if kind == "append" else rng.randint(0, len(model) + CHUNK)
            os.pwrite(fd, data, offset)
            model.extend(bytes(max(0, offset + len(data) - len(model))))
            model[offset : offset + len(data)] = data
        if sync:
            os.fsync(fd)
            note(op="durable", name=name, sha=sha(model), how="fsync")
        os.close(fd)
        if not sync:
            note(op="durable", name=name, sha=sha(model), how="close")
        durable.append(name)

    def write_small(name):
        # Create, write a few bytes or none, close: the pattern of cp and tar.
        note(op="start", name=name)
        data = rng.randbytes(rng.choice([0, 1, rng.randint(2, 300)]))
        with open(os.path.join(root, name), "xb") as stream:
            stream.write(data)
        note(op="durable", name=name, sha=sha(data), how="close")
        durable.append(name)

    def grow_log(name):
        # Append and fsync over and over; each fsynced prefix is durable.
        note(op="start", name=name)
        model = bytearray()
        fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        for _ in range(rng.randint(2, 8)):
            data = rng.randbytes(rng.randint(1, CHUNK + 100))
            os.pwrite(fd, data, len(model))
            model.extend(data)
            if rng.random() < 0.6:
                os.fsync(fd)
                note(op="prefix", name=name, length=len(model), sha=sha(model))
        os.close(fd)
        note(op="durable", name=name, sha=sha(model), how="close")
        durable.append(name)

    for directory in ("sub-a", "sub-b", "sub-b/deeper"):
        os.mkdir(os.path.join(root, directory))
    note(op="ready")
    while mode == "small-files":
        write_small(new_name("small"))
    while True:
        action = rng.choice(["create", "create", "replace", "replace", "log", "unlink", "burst"])
        if action == "create" or not durable:
            write_file(new_name("file"), sync=rng.random() < 0.5)
        elif action == "burst":
            for _ in range(rng.randint(5, 20)):
                write_small(new_name("small"))
        elif action == "replace":
            target = rng.choice(durable)
            temporary = new_name("tmp")
            write_file(temporary, sync=rng.random() < 0.7)
            note(op="rename-start", src=temporary, dst=target)
            os.rename(os.path.join(root, temporary), os.path.join(root, target))
            note(op="rename-done", src=temporary, dst=target)
            durable.remove(temporary)
        elif action == "log":
            grow_log(new_name("log"))
        else:
            victim = rng.choice(durable)
            note(op="unlink-start", name=victim)
            os.unlink(os.path.join(root, victim))
            note(op="unlink-done", name=victim)
            durable.remove(victim)
    """
)


# --------------------------------------------------------------------------- the model

#: Outcomes a path may have: missing; any readable content; one sha256; a durable prefix.
ABSENT = ("absent",)
ANYTHING = ("anything",)


def exact(sha: str) -> tuple[str, ...]:
    return ("sha", sha)


def prefix(length: int, sha: str) -> tuple[str | int, ...]:
    return ("prefix", length, sha)


Outcome = tuple[str | int, ...]


@dataclass
class Expected:
    """What the journal allows the volume to hold after the crash.

    Attributes:
        paths: every path the workloads named, with the outcomes allowed for it.
        pending_rename: a rename that started and did not finish: source, target, and the
            outcomes each had before it.
    """

    paths: dict[str, list[Outcome]] = field(default_factory=dict)
    pending_rename: tuple[str, str, list[Outcome], list[Outcome]] | None = None


def replay(entries: list[dict[str, object]]) -> Expected:
    """Turn the journal into the outcomes it allows."""
    expected = Expected()
    paths = expected.paths
    for entry in entries:
        op, name = entry["op"], f"{entry['round']}/{entry.get('name', '')}"
        if op == "start":
            paths[name] = [ABSENT, ANYTHING]
        elif op == "durable":
            paths[name] = [exact(str(entry["sha"]))]
        elif op == "prefix":
            paths[name] = [prefix(int(str(entry["length"])), str(entry["sha"]))]
        elif op in ("rename-start", "rename-done"):
            source, target = (f"{entry['round']}/{entry[key]}" for key in ("src", "dst"))
            if op == "rename-start":
                expected.pending_rename = (source, target, paths[source], paths[target])
            else:
                paths[target], paths[source] = paths[source], [ABSENT]
                expected.pending_rename = None
        elif op == "unlink-start":
            paths[name] = [*paths[name], ABSENT]
        elif op == "unlink-done":
            paths[name] = [ABSENT]
    return expected


def satisfies(data: bytes | None, allowed: list[Outcome]) -> bool:
    """Tell whether a file's content (``None``: missing) is one of the *allowed* outcomes."""
    for outcome in allowed:
        kind = outcome[0]
        if kind == "absent" and data is None:
            return True
        if data is None:
            continue
        if kind == "anything":
            return True
        if kind == "sha" and hashlib.sha256(data).hexdigest() == outcome[1]:
            return True
        if kind == "prefix":
            length = int(outcome[1])
            if len(data) >= length and hashlib.sha256(data[:length]).hexdigest() == outcome[2]:
                return True
    return False


def read_everything(root: Path) -> tuple[dict[str, bytes], list[str]]:
    """Read every file below *root* from end to end; return the contents and the failures."""
    contents: dict[str, bytes] = {}
    failures: list[str] = []
    for directory, _dirs, files in os.walk(root, onerror=lambda exc: failures.append(str(exc))):
        for name in files:
            path = Path(directory, name)
            relative = str(path.relative_to(root))
            try:
                contents[relative] = path.read_bytes()
                size = os.stat(path).st_size
            except OSError as exc:
                failures.append(f"{relative}: {errno.errorcode.get(exc.errno or 0)} {exc}")
                continue
            if size != len(contents[relative]):
                failures.append(
                    f"{relative}: stat says {size} bytes, read gave {len(contents[relative])}"
                )
    return contents, failures


def check_volume(
    root: Path, entries: list[dict[str, object]], before: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """Compare the mounted volume with what the round's journal allows.

    Args:
        root: the mount point.
        entries: the journal of the round that crashed.
        before: the sha256 of every file as the previous round left it (its crash
            resolved: a file being written then now holds what recovery kept); the round
            did not touch those files, so they must not have changed.

    Returns:
        The differences, and the sha256 of every file now, for the next round.
    """
    expected = replay(entries)
    expected.paths.update({relative: [exact(sha)] for relative, sha in before.items()})
    contents, problems = read_everything(root)
    for relative in sorted(set(contents) - set(expected.paths)):
        problems.append(f"{relative}: on the mount, but the workload never wrote it")

    coupled = set()
    if expected.pending_rename is not None:
        source, target, source_before, target_before = expected.pending_rename
        coupled = {source, target}
        source_data, target_data = contents.get(source), contents.get(target)
        not_done = satisfies(source_data, source_before) and satisfies(target_data, target_before)
        done = source_data is None and satisfies(target_data, source_before)
        if not (not_done or done):
            problems.append(f"rename {source} -> {target} is neither done nor undone")

    for relative, allowed in sorted(expected.paths.items()):
        if relative not in coupled and not satisfies(contents.get(relative), allowed):
            got = contents.get(relative)
            shown = "missing" if got is None else f"{len(got)} bytes, sha256 {_sha(got)}"
            problems.append(f"{relative}: {shown}; the journal allows {allowed}")
    return problems, {relative: _sha(data) for relative, data in contents.items()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ a round


def read_journal(path: Path) -> list[dict[str, object]]:
    """Return the journal's entries (a torn last line, from the killed workload, is dropped)."""
    entries = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
    return entries


def daemon_of(volume: Volume) -> int:
    """Return the pid of the daemon serving *volume*, checked against its command line."""
    pid = volume.daemon_pid()
    assert pid is not None and process_running(pid), "no daemon pid in the store's lock file"
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert os.fsencode(volume.mountpoint) in command, command
    return pid


def kill_daemon(volume: Volume) -> None:
    """SIGKILL the daemon and wait until it is gone."""
    pid = daemon_of(volume)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_running(pid):
        assert time.monotonic() < deadline, f"daemon {pid} survived SIGKILL"
        time.sleep(0.01)


def drop_dead_mount(volume: Volume) -> None:
    """Remove the mount of a killed daemon, as an administrator would."""
    subprocess.run(["fusermount3", "-uz", str(volume.mountpoint)], capture_output=True, check=False)
    assert not is_mounted(volume.mountpoint)


def unexpected_warnings(log: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if line.startswith(("WARNING", "ERROR", "CRITICAL"))
        and not any(expected in line for expected in EXPECTED_WARNINGS)
    ]


@contextlib.contextmanager
def running(command: list[str], output: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run *command* with stderr to *output*; SIGKILL and reap it when done."""
    with open(output, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=30)


def wait_for_entry(journal: Path, writer: subprocess.Popen[bytes], op: str) -> None:
    """Wait until the workload's journal has an entry *op*."""
    deadline = time.monotonic() + 30
    while not any(entry["op"] == op for entry in read_journal(journal)):
        assert writer.poll() is None, "the workload stopped before the kill"
        assert time.monotonic() < deadline, f"the workload wrote no {op!r} entry"
        time.sleep(0.005)


def crash_round(
    volume: Volume,
    options: tuple[str, ...],
    journals: Path,
    round_number: int,
    seed: int,
    before: dict[str, str],
) -> tuple[list[str], dict[str, str]]:
    """Run one round (see the module docstring); return what went wrong, and every sha256."""
    rng = random.Random(seed)
    result = volume.mount(*options)
    assert result.returncode == 0, result.stderr
    log_start = len(volume.log_text())

    round_dir = volume.mountpoint / f"round-{round_number}"
    round_dir.mkdir()
    round_journal = journals / f"round-{round_number}.jsonl"
    mode = "small-files" if round_number % 2 else "mixed"
    command = [sys.executable, "-c", WORKLOAD, str(round_dir), str(round_journal), str(seed), mode]
    with running(command, journals / f"round-{round_number}.stderr") as writer:
        wait_for_entry(round_journal, writer, "ready")
        time.sleep(rng.uniform(*KILL_AFTER))
        assert writer.poll() is None, "the workload stopped before the kill"
        kill_daemon(volume)
    drop_dead_mount(volume)

    entries = [dict(entry, round=f"round-{round_number}") for entry in read_journal(round_journal)]

    result = volume.mount(*options)
    assert result.returncode == 0, f"remount after the crash: {result.stderr}"
    problems, now = check_volume(volume.mountpoint, entries, before)
    result = volume.umount()
    assert result.returncode == 0, result.stderr

    fsck = run_dermfs("fsck", volume.config, "--no-progress")
    if fsck.returncode != 0:
        problems.append(f"dermfs fsck exit {fsck.returncode}: {fsck.stdout}{fsck.stderr}")
    problems += unexpected_warnings(volume.log_text()[log_start:])
    return problems, now


@pytest.mark.parametrize(
    ("options", "volume_number"),
    [((), 0), ((), 1), (("-o", "writeback_cache"), 2), (("-o", "writeback_cache"), 3)],
    ids=["default-0", "default-1", "writeback_cache-2", "writeback_cache-3"],
)
def test_kill_9_in_the_middle_of_writing(
    volume: Volume, options: tuple[str, ...], volume_number: int
) -> None:
    journals = volume.base / "journals"
    journals.mkdir()
    files: dict[str, str] = {}
    for round_number in range(ROUNDS):
        seed = volume_number * 1000 + round_number
        problems, files = crash_round(volume, options, journals, round_number, seed, files)
        assert not problems, f"round {round_number} (seed {seed}):\n" + "\n".join(problems)

    audit = run_dermfs("audit", "verify", volume.config)
    assert audit.returncode == 0, audit.stdout + audit.stderr
