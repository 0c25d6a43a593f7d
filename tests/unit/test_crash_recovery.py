"""Crash recovery: a write or truncate killed at any point is repaired without losing data.

A kill is simulated by replacing ``os.pwrite`` and ``os.ftruncate`` (which the content
layer and the intent log use for every change) so that the N-th call does only part of
its work and then raises :class:`Killed`: a pwrite writes a page-aligned prefix of its
bytes (none, each page boundary, or all of them), a truncate happens or does not. The
volume's descriptors are then closed without another byte written, as a killed daemon
leaves them, and a fresh :meth:`Volume.start_writing` runs recovery.

For every N the recovered file must authenticate completely, keep every byte that was
durable (checkpointed) before the interrupted operation and that no operation since
touched, be no longer than any state the file passed through, and consist of chunks each
of which some state of the file held at that place (format section 8).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dermfs import content, format
from dermfs.content import ContentFile
from dermfs.errors import FormatError
from dermfs.intent import read_pending
from dermfs.volume import RecoveryReport, Volume

PAGE = 4096
C = format.MIN_CHUNK_SIZE

#: The one warning recovery gives for an ordinary crash.
UNCLEAN = "the store was not unmounted cleanly; repairing %d file(s)"


class Killed(BaseException):
    """The simulated kill. Not an OSError: a killed process runs no error handler."""


# ------------------------------------------------------------------------------ operations


def data(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes

    def apply(self, file: ContentFile) -> None:
        file.write(self.offset, self.data)

    def touched(self, size: int) -> tuple[int, int]:
        """The plaintext range this write changes (zeros between the old end and it too)."""
        return min(self.offset, size), max(size, self.offset + len(self.data))

    def model(self, state: bytes) -> bytes:
        grown = bytearray(state) + bytes(max(0, self.offset - len(state)))
        grown[self.offset : self.offset + len(self.data)] = self.data
        return bytes(grown)


@dataclass(frozen=True)
class Truncate:
    size: int

    def apply(self, file: ContentFile) -> None:
        file.truncate(self.size)

    def touched(self, size: int) -> tuple[int, int]:
        return min(size, self.size), max(size, self.size)

    def model(self, state: bytes) -> bytes:
        return state[: self.size] + bytes(max(0, self.size - len(state)))


Op = Write | Truncate


@dataclass(frozen=True)
class Scenario:
    """A file with durable content, some finished unsynced operations, then a killed one.

    Attributes:
        initial: the content written and made durable before anything is killed.
        before: operations that complete after that, with no checkpoint.
        op: the operation that is killed.
        durable_by: ``checkpoint`` or ``sync``, how *initial* was made durable.
        chunk_size: the volume's chunk size.
    """

    initial: bytes
    op: Op
    before: tuple[Op, ...] = ()
    durable_by: str = "checkpoint"
    chunk_size: int = C

    def states(self) -> list[bytes]:
        """The file's content after each step: durable, after each op, after the killed one."""
        states = [self.initial]
        for op in (*self.before, self.op):
            states.append(op.model(states[-1]))
        return states

    def touched(self) -> list[tuple[int, int]]:
        ops = (*self.before, self.op)
        return [op.touched(len(state)) for op, state in zip(ops, self.states()[:-1], strict=True)]


SCENARIOS = {
    "append to a partial last chunk": Scenario(
        data(C + C // 2, 1), Write(C + C // 2, data(C + 900, 2))
    ),
    "append to a full last chunk": Scenario(data(2 * C, 3), Write(2 * C, data(3000, 4))),
    "overwrite in the middle": Scenario(data(3 * C + 700, 5), Write(C + 100, data(2 * C, 6))),
    "truncate down inside a chunk": Scenario(data(3 * C + 700, 7), Truncate(C + 1234)),
    "truncate down to a chunk boundary": Scenario(data(3 * C + 700, 8), Truncate(2 * C)),
    "truncate to 0": Scenario(data(2 * C + 500, 9), Truncate(0)),
    "truncate up": Scenario(data(C + 600, 10), Truncate(4 * C + 300)),
    "write far past the end": Scenario(data(C // 2, 11), Write(6 * C + 10, data(100, 12))),
    "a new file being written": Scenario(b"", Write(0, data(2 * C + 321, 13))),
    "durable by sync, overwrite across the end": Scenario(
        data(C + 50, 14), Write(C - 20, data(C, 15)), durable_by="sync"
    ),
    "write after an unsynced truncate": Scenario(
        data(3 * C, 16), Write(C, data(2 * C + C // 2, 17)), before=(Truncate(C + C // 2),)
    ),
    "truncate after an unsynced write": Scenario(
        data(2 * C + 10, 18), Truncate(C // 3), before=(Write(100, data(C, 19)),)
    ),
    "append with 64 KiB chunks": Scenario(
        data(70000, 20), Write(70000, data(80000, 21)), chunk_size=65536
    ),
}


# ------------------------------------------------------------------------------ killing


@dataclass(frozen=True)
class Call:
    """One backing-store change the operation made."""

    kind: str
    fd: int
    offset: int
    length: int = 0


@dataclass(frozen=True)
class KillPoint:
    """Kill during call number *call* (from 0), after *done* bytes of it (or truncate done)."""

    call: int
    done: int

    def __str__(self) -> str:
        return f"call {self.call}, {self.done} bytes done"


def kill_points(calls: list[Call]) -> list[KillPoint]:
    """Every place a kill can stop the recorded calls: each page boundary of each call."""
    points = []
    for number, call in enumerate(calls):
        if call.kind == "ftruncate":
            points += [KillPoint(number, 0), KillPoint(number, 1)]
            continue
        first_boundary = (call.offset // PAGE + 1) * PAGE
        boundaries = range(first_boundary, call.offset + call.length, PAGE)
        cuts = [0, *(boundary - call.offset for boundary in boundaries), call.length]
        points += [KillPoint(number, done) for done in cuts]
    return points


@contextmanager
def backing_writes(
    monkeypatch: pytest.MonkeyPatch, kill: KillPoint | None = None
) -> Iterator[list[Call]]:
    """Record every pwrite and ftruncate; with *kill*, stop part-way through one of them."""
    calls: list[Call] = []
    real_pwrite, real_ftruncate = os.pwrite, os.ftruncate

    def pwrite(fd: int, buffer: Any, offset: int) -> int:
        view = memoryview(buffer)
        calls.append(Call("pwrite", fd, offset, len(view)))
        if kill is not None and kill.call == len(calls) - 1:
            if kill.done:
                real_pwrite(fd, view[: kill.done], offset)
            raise Killed
        return real_pwrite(fd, view, offset)

    def ftruncate(fd: int, length: int) -> None:
        calls.append(Call("ftruncate", fd, length))
        if kill is not None and kill.call == len(calls) - 1:
            if kill.done:
                real_ftruncate(fd, length)
            raise Killed
        real_ftruncate(fd, length)

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", pwrite)
        patch.setattr(os, "ftruncate", ftruncate)
        yield calls


def kill(volume: Volume) -> None:
    """Drop *volume* as a killed daemon would: close its descriptors, write nothing more.

    This reaches into the volume's private descriptors on purpose: :meth:`Volume.close`
    would run the intent log's clean-close logic, which a kill never runs.
    """
    assert volume._lock_fd is not None
    if volume.intent is not None:
        os.close(volume.intent._fd)
        volume.intent = None
    os.close(volume._lock_fd)
    volume._lock_fd = None


def unexpected_warnings(caplog: pytest.LogCaptureFixture, *allowed: str) -> list[str]:
    """Return the dermfs warnings other than the *allowed* message formats."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("dermfs")
        and record.levelno >= logging.WARNING
        and record.msg not in allowed
    ]


# ------------------------------------------------------------------------------ one case


@dataclass
class Crash:
    """A store left by a kill, and what the killed file looked like."""

    store: Path
    path: Path
    inode: int
    calls: list[Call]
    torn: bool = False
    report: RecoveryReport = field(default_factory=RecoveryReport)
    recovery_calls: list[Call] = field(default_factory=list)


def crash(
    scenario: Scenario,
    make_store: Callable[..., Path],
    provider: Any,
    monkeypatch: pytest.MonkeyPatch,
    point: KillPoint | None,
    recovery_point: KillPoint | None = None,
) -> Crash:
    """Run *scenario* in a new store, kill it at *point* (or just after the op), recover.

    With *recovery_point*, the first recovery is killed there too, and a second one runs.
    """
    store = make_store(scenario.chunk_size)
    volume = Volume.open(store, provider)
    volume.start_writing()
    path = store / "file"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    inode = os.fstat(fd).st_ino
    try:
        file = volume.create_file(fd, inode, "file")
        if scenario.initial:
            file.write(0, scenario.initial)
            if scenario.durable_by == "sync":
                file.sync()
            else:
                file.checkpoint()
        for op in scenario.before:
            op.apply(file)

        with backing_writes(monkeypatch, point) as calls:
            try:
                scenario.op.apply(file)
            except Killed:
                pass
            else:
                assert point is None or point.call >= len(calls), f"no kill at {point}"

        keys = volume.read_file_keys(fd)
        torn = any(error is not None for _index, error in content.iter_chunks(fd, keys))
    finally:
        os.close(fd)
        kill(volume)

    if recovery_point is not None:
        recovering = Volume.open(store, provider)
        with backing_writes(monkeypatch, recovery_point), pytest.raises(Killed):
            recovering.start_writing()
        kill(recovering)

    recovered = Volume.open(store, provider)
    with backing_writes(monkeypatch) as recovery_calls:
        report = recovered.start_writing()
    recovered.close()
    assert not (store / format.INTENT_FILE).exists()
    return Crash(store, path, inode, calls, torn, report, recovery_calls)


def problems(scenario: Scenario, crashed: Crash, provider: Any) -> list[str]:
    """Check the recovered file against the scenario; return what is wrong."""
    found = []
    if crashed.report.damaged or crashed.report.missing:
        found.append(
            f"recovery: damaged {crashed.report.damaged}, missing {crashed.report.missing}"
        )

    volume = Volume.open(crashed.store, provider)
    fd = os.open(crashed.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        keys = volume.read_file_keys(fd)
        bad = [index for index, error in content.iter_chunks(fd, keys) if error is not None]
        if bad:
            return [*found, f"chunks {bad} do not authenticate"]
        file = volume.open_file(fd, crashed.inode)
        recovered = file.read(0, file.size)
    finally:
        os.close(fd)
        volume.close()

    states = scenario.states()
    durable = states[0]
    untouched = untouched_ranges(len(durable), scenario.touched())
    for start, end in untouched:
        if len(recovered) < end or recovered[start:end] != durable[start:end]:
            found.append(f"durable bytes {start}..{end} lost or changed")
    longest = max(len(state) for state in states)
    if len(recovered) > longest:
        found.append(f"size {len(recovered)} is larger than any state ({longest})")

    chunk_size = scenario.chunk_size
    for start in range(0, len(recovered), chunk_size):
        chunk = recovered[start : start + chunk_size]
        if not any(state[start : start + len(chunk)] == chunk for state in states):
            found.append(f"chunk at {start} matches no state of the file")
    return found


def untouched_ranges(size: int, touched: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the parts of ``0..size`` that no range of *touched* covers."""
    ranges = []
    position = 0
    for start, end in sorted(touched):
        if start > position:
            ranges.append((position, min(start, size)))
        position = max(position, end)
    if position < size:
        ranges.append((position, size))
    return [(start, end) for start, end in ranges if start < end]


# ------------------------------------------------------------------------------ the tests


@pytest.mark.expect_log
@pytest.mark.parametrize("name", SCENARIOS)
def test_kill_at_every_point_is_recovered(
    name: str,
    make_store: Callable[..., Path],
    key_provider: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario = SCENARIOS[name]
    dry_run = crash(scenario, make_store, key_provider, monkeypatch, None)
    points: list[KillPoint | None] = [*kill_points(dry_run.calls), None]

    failures = []
    torn = 0
    for point in points:
        crashed = crash(scenario, make_store, key_provider, monkeypatch, point)
        torn += crashed.torn
        failures += [f"{point}: {problem}" for problem in problems(scenario, crashed, key_provider)]

    assert not failures, "\n".join(failures)
    assert not unexpected_warnings(caplog, UNCLEAN)
    # The kill points must reach states that need repair, or nothing was tested.
    assert len(points) >= 4
    assert torn, "no kill point left a torn file"


@pytest.mark.expect_log
@pytest.mark.parametrize("name", SCENARIOS)
def test_a_killed_recovery_is_recovered(
    name: str,
    make_store: Callable[..., Path],
    key_provider: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario = SCENARIOS[name]
    dry_run = crash(scenario, make_store, key_provider, monkeypatch, None)

    failures = []
    recovery_points = 0
    for point in kill_points(dry_run.calls):
        first = crash(scenario, make_store, key_provider, monkeypatch, point)
        if not first.torn:
            continue
        for recovery_point in kill_points(first.recovery_calls):
            crashed = crash(scenario, make_store, key_provider, monkeypatch, point, recovery_point)
            recovery_points += 1
            failures += [
                f"{point}, recovery killed at {recovery_point}: {problem}"
                for problem in problems(scenario, crashed, key_provider)
            ]

    assert not failures, "\n".join(failures)
    assert not unexpected_warnings(caplog, UNCLEAN)
    assert recovery_points, "recovery never wrote anything"


def test_untouched_ranges() -> None:
    assert untouched_ranges(10, [(2, 4), (3, 6)]) == [(0, 2), (6, 10)]
    assert untouched_ranges(10, [(0, 10)]) == []
    assert untouched_ranges(10, [(12, 20)]) == [(0, 10)]
    assert untouched_ranges(0, [(0, 5)]) == []


# ------------------------------------------------------------------------------ the log itself


@dataclass
class Fixture:
    """Two files with durable content, both changed after their checkpoint, then killed."""

    store: Path
    paths: dict[str, Path]
    inodes: dict[str, int]
    expected: dict[str, bytes]


def two_dirty_files(
    make_store: Callable[..., Path], provider: Any, *, clean_b: bool = False
) -> Fixture:
    """Make files ``a`` and ``b`` in one session; in the next, change both in place, kill.

    The second session's intent log then holds: 0 DIRTY a, 1 SAVED a, 2 DIRTY b,
    3 SAVED b, and with *clean_b* also 4 CLEAN b.
    """
    store = make_store()
    fixture = Fixture(store, {}, {}, {})
    volume = Volume.open(store, provider)
    volume.start_writing()
    for name in ("a", "b"):
        path = store / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        file = volume.create_file(fd, os.fstat(fd).st_ino, name)
        file.write(0, data(2 * C + 100, ord(name)))
        file.checkpoint()
        os.close(fd)
        fixture.paths[name], fixture.inodes[name] = path, file.inode
    volume.close()

    volume = Volume.open(store, provider)
    volume.start_writing()
    files = {}
    for name, path in fixture.paths.items():
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        file = volume.open_file(fd, fixture.inodes[name], name)
        file.write(C + 7, data(50, ord(name) + 1))
        fixture.expected[name] = file.read(0, file.size)
        files[name] = (fd, file)
    if clean_b:
        files["b"][1].checkpoint()
    for fd, _file in files.values():
        os.close(fd)
    kill(volume)

    types = [record_type for _offset, _length, record_type in intent_records(store)]
    assert types == [1, 2, 1, 2] + ([3] if clean_b else [])
    return fixture


def intent_records(store: Path) -> list[tuple[int, int, int]]:
    """Return (offset, length, type) of each record of the store's intent log."""
    log = (store / format.INTENT_FILE).read_bytes()
    offset = format.INTENT_HEADER_SIZE
    records = []
    while offset < len(log):
        length = int.from_bytes(log[offset : offset + 4], "big")
        total = 4 + length + format.INTENT_TAG_SIZE
        records.append((offset, total, log[offset + 4]))
        offset += total
    return records


def read_back(store: Path, provider: Any, fixture: Fixture) -> dict[str, bytes]:
    volume = Volume.open(store, provider)
    contents = {}
    for name, path in fixture.paths.items():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            keys = volume.read_file_keys(fd)
            assert all(error is None for _index, error in content.iter_chunks(fd, keys))
            file = volume.open_file(fd, fixture.inodes[name])
            contents[name] = file.read(0, file.size)
        finally:
            os.close(fd)
    volume.close()
    return contents


@pytest.mark.expect_log
def test_a_torn_last_record_is_ignored_quietly(
    make_store: Callable[..., Path], key_provider: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fixture = two_dirty_files(make_store, key_provider, clean_b=True)
    log_path = fixture.store / format.INTENT_FILE
    whole = log_path.read_bytes()
    clean_offset, clean_length, _type = intent_records(fixture.store)[-1]
    assert clean_offset + clean_length == len(whole)
    volume = Volume.open(fixture.store, key_provider)

    complete = {entry.inode for entry in read_pending(log_path, volume._intent_mac)}
    assert complete == {fixture.inodes["a"]}
    for kept in range(clean_length):
        log_path.write_bytes(whole[: clean_offset + kept])
        pending = {entry.inode for entry in read_pending(log_path, volume._intent_mac)}
        assert pending == {fixture.inodes["a"], fixture.inodes["b"]}, kept
    volume.close()

    report = Volume.open(fixture.store, key_provider).start_writing()
    assert sorted(report.repaired) == ["a", "b"]
    assert read_back(fixture.store, key_provider, fixture) == fixture.expected
    assert not unexpected_warnings(caplog, UNCLEAN)


Records = list[tuple[int, int, int]]


def _flip_saved_a(log: bytearray, records: Records) -> int:
    offset, length, _type = records[1]
    log[offset + length - format.INTENT_TAG_SIZE - 1] ^= 0x01
    return 1


def _forge_tag_of_dirty_b(log: bytearray, records: Records) -> int:
    offset, length, _type = records[2]
    log[offset + length - format.INTENT_TAG_SIZE : offset + length] = bytes(16)
    return 2


def _append_forged_clean_a(log: bytearray, records: Records) -> int:
    log += format.intent_record_body(format.RECORD_CLEAN, b"\0" * 8) + bytes(16)
    return len(records)


def _swap_records_1_and_2(log: bytearray, records: Records) -> int:
    (first, first_length, _), (second, second_length, _) = records[1], records[2]
    one = bytes(log[first : first + first_length])
    two = bytes(log[second : second + second_length])
    log[first : second + second_length] = two + one
    return 1


def _replace_session_id(log: bytearray, records: Records) -> int:
    log[8:24] = bytes(16)
    return 0


FORGERIES = {
    "edited SAVED body": (_flip_saved_a, {"a"}),
    "forged tag on DIRTY": (_forge_tag_of_dirty_b, {"a"}),
    "appended CLEAN without a valid tag": (_append_forged_clean_a, {"a", "b"}),
    "records reordered": (_swap_records_1_and_2, {"a"}),
    "another session's header": (_replace_session_id, set()),
}


@pytest.mark.expect_log
@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_record_stops_recovery_there(
    forgery: str,
    make_store: Callable[..., Path],
    key_provider: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    edit, pending_names = FORGERIES[forgery]
    fixture = two_dirty_files(make_store, key_provider)
    log_path = fixture.store / format.INTENT_FILE
    log = bytearray(log_path.read_bytes())
    bad_record = edit(log, intent_records(fixture.store))
    if forgery == "appended CLEAN without a valid tag":
        inode = fixture.inodes["a"].to_bytes(8, "big")
        log[-24:-16] = inode
    log_path.write_bytes(bytes(log))

    volume = Volume.open(fixture.store, key_provider)
    caplog.clear()
    pending = read_pending(log_path, volume._intent_mac)
    volume.close()

    assert {entry.inode for entry in pending} == {fixture.inodes[name] for name in pending_names}
    if forgery == "edited SAVED body":
        assert all(not entry.saved for entry in pending)
    messages = [(record.msg, record.args) for record in caplog.records]
    assert messages == [("intent log ends at a bad record (number %d)", (bad_record,))]

    report = Volume.open(fixture.store, key_provider).start_writing()
    assert not report.damaged
    assert read_back(fixture.store, key_provider, fixture) == fixture.expected


@pytest.mark.expect_log
def test_a_forged_saved_copy_is_never_written_back(
    make_store: Callable[..., Path],
    key_provider: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario = SCENARIOS["overwrite in the middle"]
    point = torn_overwrite_point(scenario, make_store, key_provider, monkeypatch)
    store = make_store()
    path = store / "file"
    volume = Volume.open(store, key_provider)
    volume.start_writing()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    inode = os.fstat(fd).st_ino
    first = volume.create_file(fd, inode, "file")
    first.write(0, scenario.initial)
    first.checkpoint()
    os.close(fd)
    volume.close()

    volume = Volume.open(store, key_provider)
    volume.start_writing()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    file = volume.open_file(fd, inode, "file")
    with backing_writes(monkeypatch, point), pytest.raises(Killed):
        scenario.op.apply(file)
    os.close(fd)
    kill(volume)

    log_path = store / format.INTENT_FILE
    log = bytearray(log_path.read_bytes())
    saved_offset, _length, saved_type = intent_records(store)[1]
    assert saved_type == format.RECORD_SAVED
    forged_at = saved_offset + 4 + 1 + 16 + 12
    log[forged_at : forged_at + 8] = b"FORGED!!"
    log_path.write_bytes(bytes(log))
    before = path.read_bytes()

    Volume.open(store, key_provider).start_writing()

    # Without a trusted copy the torn chunk cannot be put back; it is left for fsck to
    # report, and nothing else in the file is changed.
    assert path.read_bytes() == before
    assert b"FORGED!!" not in path.read_bytes()
    assert not unexpected_warnings(caplog, UNCLEAN, "intent log ends at a bad record (number %d)")


@pytest.mark.expect_log
def test_damage_to_a_durable_chunk_is_reported_not_truncated(
    make_store: Callable[..., Path], key_provider: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fixture = two_dirty_files(make_store, key_provider)
    damaged = bytearray(fixture.paths["a"].read_bytes())
    damaged[format.HEADER_SIZE + 2 * (C + format.CHUNK_OVERHEAD) + 20] ^= 0x01
    fixture.paths["a"].write_bytes(bytes(damaged))

    report = Volume.open(fixture.store, key_provider).start_writing()

    assert report.damaged == ["a"] and report.repaired == ["b"]
    assert fixture.paths["a"].read_bytes() == damaged
    assert not unexpected_warnings(
        caplog,
        UNCLEAN,
        "inode %d: chunk %d was durable before the crash and is damaged; not repairing",
    )
    assert any(record.args == (fixture.inodes["a"], 2) for record in caplog.records)


def torn_overwrite_point(
    scenario: Scenario,
    make_store: Callable[..., Path],
    provider: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> KillPoint:
    """Return a kill point that leaves an in-place chunk rewrite of *scenario* half done."""
    dry_run = crash(scenario, make_store, provider, monkeypatch, None)
    writes = [
        number
        for number, call in enumerate(dry_run.calls)
        if call.kind == "pwrite" and call.offset >= format.HEADER_SIZE and call.length > PAGE
    ]
    number = writes[-1]
    call = dry_run.calls[number]
    return KillPoint(number, (call.offset // PAGE + 1) * PAGE - call.offset)


@pytest.mark.parametrize("kept", [0, 3, format.INTENT_HEADER_SIZE - 1])
def test_an_intent_log_cut_inside_its_header_holds_nothing(
    kept: int, make_store: Callable[..., Path], key_provider: Any
) -> None:
    # A kill between creating the log (O_TRUNC) and writing its header leaves it short.
    store = make_store()
    volume = Volume.open(store, key_provider)
    volume.start_writing()
    log_path = store / format.INTENT_FILE
    header = log_path.read_bytes()
    kill(volume)
    log_path.write_bytes(header[:kept])

    again = Volume.open(store, key_provider)
    assert again.start_writing() == RecoveryReport()
    again.close()
    assert not log_path.exists()


def test_a_short_file_that_is_not_an_intent_log_is_refused(
    make_store: Callable[..., Path], key_provider: Any
) -> None:
    store = make_store()
    (store / format.INTENT_FILE).write_bytes(b"not a log")
    volume = Volume.open(store, key_provider)

    with pytest.raises(FormatError):
        volume.start_writing()
    volume.close()


def test_a_clean_close_removes_the_intent_log(
    make_store: Callable[..., Path], key_provider: Any
) -> None:
    store = make_store()
    log_path = store / format.INTENT_FILE
    volume = Volume.open(store, key_provider)
    volume.start_writing()
    assert log_path.exists()
    fd = os.open(store / "file", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    file = volume.create_file(fd, os.fstat(fd).st_ino, "file")
    file.write(0, data(3 * C, 30))
    file.truncate(C)
    file.checkpoint()
    os.close(fd)

    volume.close()

    assert not log_path.exists()
    again = Volume.open(store, key_provider)
    assert again.start_writing() == RecoveryReport()
    again.close()
    assert not log_path.exists()


@pytest.mark.expect_log
def test_closing_with_a_dirty_file_keeps_the_log(
    make_store: Callable[..., Path], key_provider: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    volume = Volume.open(store, key_provider)
    volume.start_writing()
    fd = os.open(store / "file", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    volume.create_file(fd, os.fstat(fd).st_ino, "file").write(0, b"not checkpointed")
    os.close(fd)

    volume.close()

    assert (store / format.INTENT_FILE).exists()
    assert [record.msg for record in caplog.records] == ["intent log closed with %d dirty file(s)"]


@pytest.mark.expect_log
def test_recovery_finds_a_file_renamed_after_it_became_dirty(
    make_store: Callable[..., Path],
    key_provider: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario = SCENARIOS["overwrite in the middle"]
    point = torn_overwrite_point(scenario, make_store, key_provider, monkeypatch)
    store = make_store()
    volume = Volume.open(store, key_provider)
    volume.start_writing()
    path = store / "file"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    inode = os.fstat(fd).st_ino
    file = volume.create_file(fd, inode, "file")
    file.write(0, scenario.initial)
    file.checkpoint()
    with backing_writes(monkeypatch, point), pytest.raises(Killed):
        scenario.op.apply(file)
    keys = volume.read_file_keys(fd)
    assert any(error is not None for _index, error in content.iter_chunks(fd, keys))
    os.close(fd)

    # The file moves after its DIRTY record; another file takes its old name.
    (store / "sub").mkdir()
    renamed = store / "sub" / "renamed"
    path.rename(renamed)
    decoy_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    decoy = volume.create_file(decoy_fd, os.fstat(decoy_fd).st_ino, "file")
    decoy.write(0, data(C + 5, 31))
    decoy.checkpoint()
    os.close(decoy_fd)
    decoy_bytes = path.read_bytes()
    kill(volume)

    report = Volume.open(store, key_provider).start_writing()

    assert report.repaired == ["sub/renamed"]
    assert not report.damaged and not report.missing
    assert path.read_bytes() == decoy_bytes
    crashed = Crash(store, renamed, inode, [])
    assert problems(scenario, crashed, key_provider) == []
    assert not unexpected_warnings(caplog, UNCLEAN)
