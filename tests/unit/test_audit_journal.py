"""Tests of the audit journal writer: round trip, merging, rotation, crash, keys, syslog."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from dermfs.audit import (
    FIELDS,
    AuditJournal,
    AuditUnavailable,
    Event,
    ProcessCaller,
    Record,
    VerifyResult,
    read_records,
    rewrap_journal_key,
    verify,
)
from dermfs.audit.layout import JournalFiles
from dermfs.audit.process import ProcessNames
from dermfs.cryptocore import SecretKey, random_id, random_key

PATIENT_ID = re.compile(r"^patients/(?P<patient>[^/]+)/")
ALICE = ProcessCaller(1001, 1001, 4242)
BOB = ProcessCaller(1002, 1002, 4343)
REPO = Path(__file__).resolve().parents[2]


class FixedNames(ProcessNames):
    """Process names without /proc."""

    def lookup(self, pid: int) -> tuple[str | None, str | None]:
        if pid == 0:
            return None, None
        return f"prog{pid}", f"/usr/bin/prog{pid}"


class Journal:
    """A journal path with its volume id and audit key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.volume_id = random_id()
        self.audit_key = random_key()

    def open(self, **kwargs: object) -> AuditJournal:
        options: dict[str, object] = {"patient_id": PATIENT_ID, "process_names": FixedNames()}
        options.update(kwargs)
        return AuditJournal.open(self.path, self.volume_id, self.audit_key, **options)  # type: ignore[arg-type]

    def records(self) -> list[Record]:
        records, result = read_records(self.path, self.volume_id, self.audit_key)
        assert result.damage is None, result.summary()
        return records

    def verify(self) -> VerifyResult:
        return verify(self.path, self.volume_id, self.audit_key)


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    directory = tmp_path / "log"
    directory.mkdir()
    return Journal(directory / "clinic.audit")


def assert_contiguous(records: Sequence[Record]) -> None:
    assert [record.seq for record in records] == list(range(1, len(records) + 1))


# ------------------------------------------------------------------------------ round trip


def test_round_trip_keeps_every_field(journal: Journal) -> None:
    writer = journal.open()
    writer.record(Event.MOUNT, ProcessCaller(0, 0, 1), None)
    writer.record(Event.OPEN, ALICE, b"/patients/123/face.jpg")
    writer.record(Event.OPEN, BOB, "/other/x.jpg", result=13)
    writer.record(Event.RENAME, ALICE, "/patients/1/a.jpg", new_path="/patients/2/a.jpg")
    writer.record(Event.MKDIR, ALICE, "/patients/456")
    writer.record(Event.UNMOUNT, ProcessCaller(0, 0, 0), None)
    writer.close()

    records = journal.records()
    assert_contiguous(records)
    mount, opened, denied, renamed, made, unmount = records
    assert (mount.event, mount.path, mount.patient, mount.process) == ("mount", None, None, "prog1")
    assert opened.as_dict() == {
        "time": opened.time,
        "seq": 2,
        "event": "open",
        "result": "ok",
        "uid": 1001,
        "gid": 1001,
        "pid": 4242,
        "process": "prog4242",
        "exe": "/usr/bin/prog4242",
        "path": "patients/123/face.jpg",
        "patient": "123",
        "offset": None,
        "length": None,
        "new_path": None,
        "new_patient": None,
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", opened.time)
    assert (denied.result, denied.patient, denied.uid) == ("EACCES", None, 1002)
    assert (renamed.patient, renamed.new_path, renamed.new_patient) == (
        "1",
        "patients/2/a.jpg",
        "2",
    )
    assert made.patient == "456"
    assert (unmount.process, unmount.exe) == (None, None)
    assert journal.verify().intact


def test_files_are_private_and_hold_no_plaintext(journal: Journal) -> None:
    writer = journal.open()
    writer.record(Event.OPEN, ALICE, "patients/SECRET-PATIENT-77/face.jpg")
    writer.close()

    files = sorted(journal.path.parent.iterdir())
    assert {file.name for file in files} == {
        "clinic.audit",
        "clinic.audit.checkpoint",
        "clinic.audit.state",
        "clinic.audit.lock",
    }
    for file in files:
        assert file.stat().st_mode & 0o777 == 0o600
        assert b"SECRET-PATIENT" not in file.read_bytes()
        assert b"face.jpg" not in file.read_bytes()


def test_reopen_continues_the_chain(journal: Journal) -> None:
    for round_number in range(3):
        writer = journal.open()
        writer.record(Event.MOUNT, ALICE, None)
        writer.record(Event.UNMOUNT, ALICE, f"round{round_number}")
        writer.close()

    records = journal.records()
    assert_contiguous(records)
    assert len(records) == 6
    assert Event.UNCLEAN_STOP.value not in {record.event for record in records}


def test_empty_journal_verifies(journal: Journal) -> None:
    journal.open().close()

    result = journal.verify()

    assert result.intact
    assert (result.records, result.clean) == (0, True)


def test_second_writer_is_refused(journal: Journal) -> None:
    writer = journal.open()
    try:
        with pytest.raises(AuditUnavailable, match="in use"):
            journal.open()
    finally:
        writer.close()


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AuditUnavailable, match="does not exist"):
        Journal(tmp_path / "nowhere" / "clinic.audit").open()


def test_record_after_close_is_refused(journal: Journal) -> None:
    writer = journal.open()
    writer.close()

    with pytest.raises(AuditUnavailable):
        writer.record(Event.OPEN, ALICE, "x")


def test_verify_while_writing(journal: Journal) -> None:
    writer = journal.open()
    writer.record(Event.OPEN, ALICE, "a")
    writer.flush()
    writer.record(Event.OPEN, ALICE, "b")  # buffered, not yet written

    result = journal.verify()
    writer.close()

    assert result.intact
    assert (result.records, result.clean) == (1, False)


def test_json_of_a_record_has_exactly_the_fields() -> None:
    record = Record(
        "2026-12-03T21:10:40.123456Z",
        1,
        "read",
        "ok",
        1,
        2,
        3,
        "cat",
        "/bin/cat",
        "p/1/x",
        "1",
        0,
        10,
    )

    assert list(json.loads(record.to_json())) == list(FIELDS)


# ------------------------------------------------------------------------------ merging


def test_contiguous_reads_merge_and_every_byte_is_recorded(journal: Journal) -> None:
    writer = journal.open()
    handle = writer.open_handle(ALICE, "/patients/9/scan.tif")
    ranges = [(0, 4096), (4096, 4096), (8192, 100), (0, 50), (50, 50), (20000, 7), (20007, 0)]
    for offset, length in ranges:
        handle.read(offset, length)
    handle.release()
    writer.close()

    records = journal.records()
    reads = [record for record in records if record.event == "read"]
    assert [(r.offset, r.length) for r in reads] == [(0, 8292), (0, 100), (20000, 7)]
    assert sum(r.length or 0 for r in reads) == sum(length for _offset, length in ranges)
    assert {(r.uid, r.pid, r.patient) for r in reads} == {(1001, 4242, "9")}
    assert records[0].event == "open"


def test_reads_and_writes_do_not_merge_with_each_other(journal: Journal) -> None:
    writer = journal.open()
    handle = writer.open_handle(ALICE, "f", event=Event.CREATE)
    handle.write(0, 10)
    handle.write(10, 10)
    handle.read(20, 5)
    handle.write(25, 5)
    handle.read(30, 5, result="EIO")
    handle.read(35, 5)
    handle.release()
    writer.close()

    got = [(r.event, r.offset, r.length, r.result) for r in journal.records()]
    assert got == [
        ("create", None, None, "ok"),
        ("write", 0, 20, "ok"),
        ("read", 20, 5, "ok"),
        ("write", 25, 5, "ok"),
        ("read", 30, 5, "EIO"),
        ("read", 35, 5, "ok"),
    ]


def test_open_ranges_are_written_at_every_flush(journal: Journal) -> None:
    writer = journal.open()
    handle = writer.open_handle(ALICE, "f")
    handle.read(0, 100)
    writer.flush()
    written = [(r.event, r.offset, r.length) for r in journal.records()]
    handle.read(100, 100)
    handle.moved("g")
    handle.read(200, 100)
    writer.close()  # closes the range of a handle never released

    assert written == [("open", None, None), ("read", 0, 100)]
    got = [(r.path, r.offset, r.length) for r in journal.records() if r.event == "read"]
    assert got == [("f", 0, 100), ("f", 100, 100), ("g", 200, 100)]


def test_many_threads_recording_keep_seq_contiguous(journal: Journal) -> None:
    writer = journal.open()
    flusher = writer.start_flusher(0.01)

    def work(number: int) -> None:
        handle = writer.open_handle(ProcessCaller(number, number, number + 1), f"p/{number}")
        for offset in range(0, 200_000, 1000):
            handle.read(offset, 1000)
        handle.release()

    threads = [threading.Thread(target=work, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    flusher.stop()

    records = journal.records()
    assert_contiguous(records)
    for number in range(4):
        mine = [r for r in records if r.uid == number and r.event == "read"]
        assert sum(r.length or 0 for r in mine) == 200_000


# ------------------------------------------------------------------------------ rotation


def test_rotation_keeps_the_chain_across_segments(journal: Journal) -> None:
    writer = journal.open(max_bytes=2000)
    for number in range(60):
        writer.record(Event.OPEN, ALICE, f"patients/{number}/x.jpg")
        if number % 5 == 4:
            writer.flush()
    writer.close()

    sealed = JournalFiles(journal.path).sealed_segments()
    result = journal.verify()
    assert len(sealed) >= 3
    assert result.intact, result.summary()
    assert (result.records, result.segments) == (60, len(sealed) + 1)
    assert_contiguous(journal.records())

    writer = journal.open(max_bytes=2000)
    writer.record(Event.MOUNT, ALICE, None)
    writer.close()
    assert journal.verify().intact


# ------------------------------------------------------------------------------ crash


WRITER_SCRIPT = textwrap.dedent(
    """
    import re, sys, time
    from pathlib import Path
    from dermfs.audit import AuditJournal, Event, ProcessCaller
    from dermfs.cryptocore import SecretKey

    path, volume_id, key = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), sys.argv[3]
    journal = AuditJournal.open(
        path, volume_id, SecretKey(bytes.fromhex(key)),
        patient_id=re.compile(r"^patients/(?P<patient>[^/]+)/"),
    )
    caller = ProcessCaller(1001, 1001, 4242)
    number = 0
    while True:
        journal.record(Event.OPEN, caller, f"patients/{number % 7}/x{number}.jpg")
        number += 1
        if number % 20 == 0:
            journal.flush()
        if number == 200:
            print("ready", flush=True)
    """
)


@pytest.mark.expect_log
def test_kill_9_then_reopen_records_the_unclean_stop(journal: Journal) -> None:
    writer = journal.open()
    writer.record(Event.MOUNT, ALICE, None)
    writer.close()

    arguments = [str(journal.path), journal.volume_id.hex(), journal.audit_key.reveal().hex()]
    with subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, *arguments],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()

    crashed = journal.verify()
    assert crashed.intact, crashed.summary()
    assert crashed.clean is False
    # A torn write left by the crash: half a frame after the last record.
    with open(journal.path, "ab") as file:
        file.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x99")

    writer = journal.open()
    writer.record(Event.UNMOUNT, ALICE, None)
    writer.close()

    records = journal.records()
    assert_contiguous(records)
    assert len(records) >= 1 + 200 + 2
    unclean = [r for r in records if r.event == "unclean-stop"]
    assert len(unclean) == 1
    assert records[-1].event == "unmount"
    assert records[-2] == unclean[0]
    assert journal.verify().intact


# ------------------------------------------------------------------------------ keys


def test_rewrap_after_a_volume_key_rotation(journal: Journal) -> None:
    writer = journal.open()
    writer.record(Event.OPEN, ALICE, "a")
    writer.close()
    new_key = random_key()

    rewrap_journal_key(journal.path, journal.volume_id, journal.audit_key, new_key)
    rewrap_journal_key(journal.path, journal.volume_id, journal.audit_key, new_key)  # again

    assert verify(journal.path, journal.volume_id, new_key).intact
    assert not verify(journal.path, journal.volume_id, journal.audit_key).intact
    journal.audit_key = new_key
    writer = journal.open()
    writer.record(Event.REKEY, ALICE, None)
    writer.close()
    assert [r.event for r in journal.records()] == ["open", "rekey"]


def test_wrong_audit_key_is_refused(journal: Journal) -> None:
    journal.open().close()
    journal.audit_key = SecretKey(bytes(32))

    with pytest.raises(Exception, match="does not unwrap"):
        journal.open()


# ------------------------------------------------------------------------------ syslog


class CollectingForwarder:
    def __init__(self) -> None:
        self.sent: list[tuple[list[str], str]] = []

    def send(self, records: Sequence[str], checkpoint: str) -> None:
        self.sent.append((list(records), checkpoint))


def test_syslog_forwarding_sends_durable_records_and_the_tail(journal: Journal) -> None:
    forwarder = CollectingForwarder()
    writer = journal.open(forwarder=forwarder)
    writer.record(Event.OPEN, ALICE, "patients/5/a.jpg")
    writer.record(Event.OPEN, BOB, "patients/6/b.jpg")
    writer.flush()
    writer.close()

    [(records, checkpoint)] = forwarder.sent
    assert [json.loads(text)["patient"] for text in records] == ["5", "6"]
    assert checkpoint.startswith(f"checkpoint journal={journal.volume_id.hex()} last_seq=2 ")


def test_syslog_forwarder_does_not_raise() -> None:
    from dermfs.audit import SyslogForwarder

    SyslogForwarder().send(['{"seq":1}'], "checkpoint journal=00 last_seq=1 last_tag=00")


# ------------------------------------------------------------------------------ process names


def test_process_names_of_this_process_and_of_none() -> None:
    names = ProcessNames()

    comm, exe = names.lookup(os.getpid())

    assert comm is not None and comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert exe == os.readlink(f"/proc/{os.getpid()}/exe")
    assert names.lookup(0) == (None, None)
    assert names.lookup(2**31 - 2) == (None, None)


def test_process_names_are_cached_briefly(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "comm").write_text("first\n")
    now = [100.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    names = ProcessNames(proc=proc, ttl=1.0, clock=clock)

    assert names.lookup(77) == ("first", None)
    (proc / "77" / "comm").write_text("second\n")
    assert names.lookup(77) == ("first", None)
    now[0] += 1.5
    assert names.lookup(77) == ("second", None)


@pytest.mark.expect_log
def test_crash_between_rotation_and_checkpoint(journal: Journal, tmp_path: Path) -> None:
    files = JournalFiles(journal.path)
    writer = journal.open(max_bytes=1000)
    writer.record(Event.OPEN, ALICE, "patients/1/a.jpg")
    writer.flush()
    stale = tmp_path / "stale.checkpoint"
    stale.write_bytes(files.checkpoint.read_bytes())
    for number in range(5):
        writer.record(Event.OPEN, ALICE, f"patients/1/{number}.jpg")
    writer.flush()  # rotates, then writes a new checkpoint
    assert files.sealed_segments()
    writer._committer.close()  # stands in for the crash: nothing more is written
    os.close(writer._lock_fd)  # type: ignore[arg-type]
    files.checkpoint.write_bytes(stale.read_bytes())  # as if that checkpoint never landed

    crashed = journal.verify()
    assert crashed.intact, crashed.summary()
    assert (crashed.records, crashed.after_checkpoint) == (6, 5)

    writer = journal.open(max_bytes=1000)
    writer.close()
    assert [r.event for r in journal.records()][-1] == "unclean-stop"
    assert journal.verify().intact
