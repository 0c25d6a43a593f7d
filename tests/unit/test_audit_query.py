"""Tests of ``dermfs audit query``, ``report`` and ``verify``: filters, output, exit codes."""

from __future__ import annotations

import argparse
import io
import json
import os
import pwd
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from dermfs import cli, exitcodes
from dermfs.audit import FIELDS, AuditJournal, Event, ProcessCaller, Record
from dermfs.audit import cli as audit_cli
from dermfs.audit.query import RecordFilter, parse_events, parse_when, path_prefix, printable
from dermfs.config import AuditConfig, Config, LocalKmsConfig, load_config
from dermfs.keys import provider_from_config
from dermfs.keys.base import KeyProvider
from dermfs.volume import Volume

PATIENT_ID = re.compile(r"^patients/(?P<patient>[^/]+)/")
ROOT = pwd.getpwuid(0).pw_name
ALICE = ProcessCaller(0, 0, 4242)  # uid 0 has a name on every system
BOB = ProcessCaller(54321, 54321, 4343)


def record(time: str = "2026-12-03T10:00:00.000000Z", **fields: object) -> Record:
    values: dict[str, object] = dict.fromkeys(FIELDS)
    values.update(time=time, seq=1, event="open", result="ok", uid=1, gid=1, pid=1)
    values.update(fields)
    return Record(**values)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ filters


def test_each_filter_alone_and_combined() -> None:
    a = record(uid=1, path="patients/12/a.jpg", patient="12", event="read")
    b = record(uid=2, path="patients/123/b.jpg", patient="123", time="2026-12-04T08:00:00.000000Z")
    c = record(
        uid=1,
        path="other/c.jpg",
        new_path="patients/12/c.jpg",
        new_patient="12",
        event="rename",
        time="2026-12-05T00:00:00.000000Z",
    )
    records = [a, b, c]

    def select(**filters: object) -> list[Record]:
        return [r for r in records if RecordFilter(**filters).matches(r)]  # type: ignore[arg-type]

    assert select() == records
    assert select(patient="12") == [a, c]
    assert select(path=path_prefix("/patients/12/")) == [a, c]
    assert select(path="patients") == [a, b, c]
    assert select(path=".") == records
    assert select(uid=2) == [b]
    assert select(since=parse_when("2026-12-04")) == [b, c]
    assert select(until=parse_when("2026-12-04", end_of_day=True)) == [a, b]
    assert select(until=parse_when("2026-12-04T08:00")) == [a]
    assert select(since=parse_when("2026-12-04 09:00:00+01:00")) == [b, c]
    assert select(events=parse_events(["read,rename"])) == [a, c]
    assert select(patient="12", uid=1, events=frozenset({"rename"})) == [c]
    assert select(patient="12", since=parse_when("2026-12-06")) == []


def test_bad_filter_values_are_refused() -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_when("yesterday")
    with pytest.raises(ValueError, match="unknown event"):
        parse_events(["open", "peek"])


def test_table_cells_cannot_forge_lines() -> None:
    assert printable("a\nb\x1b[31m") == "a\\x0ab\\x1b[31m"
    assert printable(None) == "-"


# ------------------------------------------------------------------------------ the commands


@pytest.fixture
def clinic(
    tmp_path: Path, make_store: Callable[..., Path], key_provider: KeyProvider
) -> tuple[Config, KeyProvider]:
    """A store and a journal with records of two users about three patients."""
    store = make_store()
    config = Config(
        path=tmp_path / "clinic.yaml",
        store=store,
        kms=LocalKmsConfig(keyfile=tmp_path / "unused.key"),
        audit=AuditConfig(journal=tmp_path / "clinic.audit", patient_id=PATIENT_ID),
    )
    volume = Volume.open(store, key_provider)
    try:
        journal = AuditJournal.open_for_volume(config.audit, volume)
    finally:
        volume.close()
    journal.record(Event.MOUNT, ALICE, None)
    handle = journal.open_handle(ALICE, "/patients/12/face.jpg")
    handle.read(0, 65536)
    handle.read(65536, 1000)
    handle.release()
    journal.record(Event.OPEN, BOB, "/patients/12/face.jpg", result="EACCES")
    handle = journal.open_handle(BOB, "/patients/123/back.jpg", event=Event.CREATE)
    handle.write(0, 5000)
    handle.release()
    journal.record(Event.RENAME, ALICE, "/inbox/new.jpg", new_path="/patients/7/new.jpg")
    journal.record(Event.UNMOUNT, ALICE, None)
    journal.close()
    return config, key_provider


def run(
    clinic: tuple[Config, KeyProvider], command: str, **options: object
) -> tuple[int, str, str]:
    config, provider = clinic
    values: dict[str, object] = {
        "patient": None,
        "path": None,
        "uid": None,
        "user": None,
        "since": None,
        "until": None,
        "event": [],
        "json": False,
    }
    values.update(options)
    args = argparse.Namespace(audit_command=command, config=config.path, **values)
    out, err = io.StringIO(), io.StringIO()
    status = audit_cli.run(config, args, provider=provider, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def json_records(out: str) -> list[dict[str, object]]:
    records = [json.loads(line) for line in out.splitlines()]
    for item in records:
        assert list(item) == list(FIELDS)
    return records


def test_verify_intact(clinic: tuple[Config, KeyProvider]) -> None:
    status, out, err = run(clinic, "verify")

    assert (status, err) == (exitcodes.OK, "")
    assert out.startswith("audit journal intact: 8 records")


def test_verify_damaged_names_the_record(clinic: tuple[Config, KeyProvider]) -> None:
    journal = clinic[0].audit.journal
    journal.write_bytes(journal.read_bytes()[:-5])

    status, out, err = run(clinic, "verify")

    assert (status, out) == (exitcodes.DAMAGE, "")
    assert err.count("\n") == 1
    assert err.startswith("dermfs audit verify: audit journal damaged: record 8 ")
    assert err.endswith("(truncated)\n")


def test_query_json_by_patient(clinic: tuple[Config, KeyProvider]) -> None:
    status, out, _err = run(clinic, "query", patient="12", json=True)

    assert status == exitcodes.OK
    got = [(r["event"], r["uid"], r["result"], r["length"]) for r in json_records(out)]
    assert got == [
        ("open", 0, "ok", None),
        ("read", 0, "ok", 66536),
        ("open", 54321, "EACCES", None),
    ]


def test_query_filters(clinic: tuple[Config, KeyProvider]) -> None:
    def seqs(**options: object) -> list[object]:
        status, out, err = run(clinic, "query", json=True, **options)
        assert (status, err) == (exitcodes.OK, "")
        return [r["seq"] for r in json_records(out)]

    assert seqs() == list(range(1, 9))
    assert seqs(patient="7") == [7]
    assert seqs(path="/patients/123") == [5, 6]
    assert seqs(uid=54321) == [4, 5, 6]
    assert seqs(user=ROOT) == [1, 2, 3, 7, 8]
    assert seqs(user="54321") == [4, 5, 6]
    assert seqs(event=["mount", "unmount"]) == [1, 8]
    assert seqs(event=["read,write"]) == [3, 6]
    assert seqs(since="2000-01-01", until="2999-01-01") == list(range(1, 9))
    assert seqs(since="2999-01-01") == []
    assert seqs(until="2000-01-01") == []
    assert seqs(patient="12", user=ROOT, event=["read"]) == [3]


def test_query_bad_filter_is_a_usage_error(clinic: tuple[Config, KeyProvider]) -> None:
    status, out, err = run(clinic, "query", since="last week")

    assert (status, out) == (exitcodes.USAGE, "")
    assert err.startswith("dermfs audit query: --since: not an ISO 8601")
    status, _out, err = run(clinic, "query", user="no-such-user-here")
    assert status == exitcodes.USAGE
    assert "--user" in err


def test_query_table(clinic: tuple[Config, KeyProvider]) -> None:
    status, out, _err = run(clinic, "query", patient="12")

    lines = out.splitlines()
    assert status == exitcodes.OK
    assert lines[0].split() == [
        "TIME",
        "SEQ",
        "EVENT",
        "RESULT",
        "USER",
        "PID",
        "PROCESS",
        "PATIENT",
        "OFFSET",
        "LENGTH",
        "PATH",
    ]
    assert len(lines) == 4
    assert lines[2].index("read") == lines[0].index("EVENT")
    assert f"{ROOT} (0)" in lines[1]
    assert lines[2].rstrip().endswith("patients/12/face.jpg")


def test_query_of_a_damaged_journal_prints_what_precedes(
    clinic: tuple[Config, KeyProvider],
) -> None:
    journal = clinic[0].audit.journal
    data = bytearray(journal.read_bytes())
    data[-40] ^= 1
    journal.write_bytes(data)

    status, out, err = run(clinic, "query", json=True)

    assert status == exitcodes.DAMAGE
    assert [r["seq"] for r in json_records(out)] == list(range(1, 8))
    assert "record 8 was changed" in err


def test_report_on_a_patient(clinic: tuple[Config, KeyProvider]) -> None:
    status, out, err = run(clinic, "report", patient="12")

    assert (status, err) == (exitcodes.OK, "")
    assert out.startswith("Access history of patient 12\n")
    assert "Verified: intact, 8 records" in out
    assert "66536 bytes at 0" in out
    summary = out[out.index("Summary by user") :].splitlines()
    assert summary[1].split()[:2] == ["USER", "ACCESSES"]
    root_line = next(line for line in summary if line.startswith(f"{ROOT} (0)"))
    assert root_line.split()[2:5] == ["2", "1", "66536"]
    assert any(line.startswith("54321 ") for line in summary)


def test_report_on_an_unknown_patient(clinic: tuple[Config, KeyProvider]) -> None:
    status, out, _err = run(clinic, "report", patient="999")

    assert status == exitcodes.OK
    assert "No access to this patient's records" in out


# ------------------------------------------------------------------------------ dermfs audit


def test_dermfs_audit_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = tmp_path / "clinic.yaml"
    config_path.write_text(
        "store: store\nkms:\n  provider: local\n  keyfile: volume.key\n"
        "audit:\n  journal: clinic.audit\n  patient_id: '^patients/(?P<patient>[^/]+)/'\n"
    )
    assert cli.main(["init", str(config_path)]) == exitcodes.OK
    config = load_config(config_path)
    volume = Volume.open(config.store, provider_from_config(config.kms))
    try:
        journal = AuditJournal.open_for_volume(config.audit, volume)
    finally:
        volume.close()
    journal.record(Event.OPEN, ProcessCaller(0, 0, os.getpid()), "/patients/42/x.jpg")
    journal.close()
    capsys.readouterr()

    assert cli.main(["audit", "verify", str(config_path)]) == exitcodes.OK
    assert capsys.readouterr().out.startswith("audit journal intact: 1 records")
    assert cli.main(["audit", "query", str(config_path), "--event", "open", "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["patient"] == "42"
    assert cli.main(["audit", "query", str(config_path), "--uid", "1", "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["audit", "report", str(config_path), "--patient", "42"]) == 0
    assert "Access history of patient 42" in capsys.readouterr().out

    config.audit.journal.write_bytes(config.audit.journal.read_bytes()[:-1])
    assert cli.main(["audit", "verify", str(config_path)]) == exitcodes.DAMAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "record 1" in err and "(truncated)" in err
