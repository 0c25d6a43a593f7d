"""Failing closed: when the journal cannot be written, opens and reads are refused.

The disk-full case uses a real 1 MiB tmpfs (it needs root; the test is skipped
otherwise). The other cases remove the journal file from under the writer.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dermfs.audit import AuditJournal, AuditUnavailable, Event, ProcessCaller, read_records, verify
from dermfs.cryptocore import random_id, random_key

PATIENT_ID = re.compile(r"^patients/(?P<patient>[^/]+)/")
CALLER = ProcessCaller(1001, 1001, 4242)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted at teardown whatever happens."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of *directory* until it is out of space; return the filler."""
    filler = directory / "filler"
    block = b"\xa5" * 4096
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # Also use up the last partial page.
    with open(filler, "ab", buffering=0) as file:
        try:
            while True:
                file.write(b"\xa5")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def open_journal(path: Path, volume_id: bytes, key: object, on_failure: str) -> AuditJournal:
    return AuditJournal.open(path, volume_id, key, patient_id=PATIENT_ID, on_failure=on_failure)  # type: ignore[arg-type]


@pytest.mark.expect_log
def test_disk_full_refuses_then_resumes_with_every_record(small_tmpfs: Path) -> None:
    path = small_tmpfs / "clinic.audit"
    volume_id, audit_key = random_id(), random_key()
    journal = open_journal(path, volume_id, audit_key, "deny")
    journal.record(Event.MOUNT, CALLER, None)
    assert journal.flush()
    journal.ensure_writable()

    filler = fill(small_tmpfs)
    for number in range(100):
        journal.record(Event.OPEN, CALLER, f"patients/{number}/x.jpg")
        journal.flush()
    assert journal.failure == "ENOSPC"
    with pytest.raises(AuditUnavailable, match="ENOSPC"):
        journal.ensure_writable()
    # A refused open is recorded too, and kept.
    journal.record(Event.OPEN, CALLER, "patients/7/x.jpg", result="EACCES")
    assert not journal.flush()
    during = verify(path, volume_id, audit_key)
    assert during.intact, during.summary()

    filler.unlink()
    assert journal.flush()
    journal.ensure_writable()
    journal.record(Event.UNMOUNT, CALLER, None)
    journal.close()

    records, result = read_records(path, volume_id, audit_key)
    assert result.intact, result.summary()
    assert [record.seq for record in records] == list(range(1, len(records) + 1))
    events = [record.event for record in records]
    assert events.count("open") == 101
    assert events[-2:] == ["audit-resumed", "unmount"]
    assert records[-2].result == "ENOSPC"
    assert result.clean is True


@pytest.mark.expect_log
def test_disk_full_with_on_failure_allow_does_not_refuse(small_tmpfs: Path) -> None:
    path = small_tmpfs / "clinic.audit"
    volume_id, audit_key = random_id(), random_key()
    journal = open_journal(path, volume_id, audit_key, "allow")

    filler = fill(small_tmpfs)
    for number in range(100):
        journal.record(Event.OPEN, CALLER, f"patients/{number}/x.jpg")
        journal.flush()
    assert journal.failure == "ENOSPC"
    journal.ensure_writable()

    filler.unlink()
    journal.close()
    assert verify(path, volume_id, audit_key).intact


@pytest.mark.expect_log
@pytest.mark.parametrize("on_failure", ["deny", "allow"])
def test_journal_moved_away_fails_until_it_is_back(tmp_path: Path, on_failure: str) -> None:
    path = tmp_path / "clinic.audit"
    volume_id, audit_key = random_id(), random_key()
    journal = open_journal(path, volume_id, audit_key, on_failure)
    journal.record(Event.MOUNT, CALLER, None)
    journal.flush()
    aside = tmp_path / "aside"
    os.rename(path, aside)

    journal.record(Event.OPEN, CALLER, "patients/1/a.jpg")
    assert not journal.flush()
    assert journal.failure == "ENOENT"
    if on_failure == "deny":
        with pytest.raises(AuditUnavailable):
            journal.ensure_writable()
    else:
        journal.ensure_writable()

    os.rename(aside, path)
    assert journal.flush()
    journal.ensure_writable()
    journal.close()
    records, result = read_records(path, volume_id, audit_key)
    assert result.intact
    assert [record.event for record in records] == ["mount", "open", "audit-resumed"]


@pytest.mark.expect_log
def test_close_that_cannot_write_says_records_are_lost(tmp_path: Path) -> None:
    path = tmp_path / "clinic.audit"
    journal = open_journal(path, random_id(), random_key(), "deny")
    path.unlink()
    journal.record(Event.OPEN, CALLER, "x")

    with pytest.raises(AuditUnavailable, match="lost"):
        journal.close()


def test_unknown_on_failure_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        open_journal(tmp_path / "clinic.audit", random_id(), random_key(), "maybe")
