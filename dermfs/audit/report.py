"""A privacy officer's access history of one patient: ``dermfs audit report``.

For each access: who (user name and uid, process and pid), when, what (event, result,
path) and how much (bytes read or written); then a summary per user. Plain text, built
on the same verified records as ``query``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from dermfs.audit.query import UserNames, aligned, describe_path, printable
from dermfs.audit.record import OK, Event, Record
from dermfs.audit.verify import VerifyResult

_BYTE_EVENTS = (Event.READ.value, Event.WRITE.value)


@dataclass
class UserSummary:
    """What one user did with the patient's records."""

    uid: int
    accesses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    paths: set[str] = field(default_factory=set)
    processes: set[str] = field(default_factory=set)
    first: str = ""
    last: str = ""

    def add(self, record: Record) -> None:
        """Count *record*."""
        self.accesses += 1
        if record.path is not None:
            self.paths.add(record.path)
        if record.process is not None:
            self.processes.add(record.process)
        if record.result == OK and record.length is not None:
            if record.event == Event.READ.value:
                self.bytes_read += record.length
            elif record.event == Event.WRITE.value:
                self.bytes_written += record.length
        self.first = min(self.first, record.time) if self.first else record.time
        self.last = max(self.last, record.time)


def summarise(records: Sequence[Record]) -> dict[int, UserSummary]:
    """Return the per-user summary of *records*, by uid."""
    users: dict[int, UserSummary] = {}
    for record in records:
        users.setdefault(record.uid, UserSummary(record.uid)).add(record)
    return users


def _how_much(record: Record) -> str:
    if record.event in _BYTE_EVENTS and record.length is not None:
        return f"{record.length} bytes at {record.offset}"
    return ""


def report_lines(
    patient: str,
    records: Sequence[Record],
    result: VerifyResult,
    users: UserNames | None = None,
) -> Iterator[str]:
    """Yield the report on *patient* from *records* (that patient's, in journal order).

    Args:
        patient: the patient id.
        records: the records whose ``patient`` or ``new_patient`` is *patient*.
        result: what verifying the journal found, for the report's heading.
        users: user-name look-up (tests pass their own).
    """
    users = users or UserNames()
    yield f"Access history of patient {printable(patient)}"
    yield f"Journal: {result.journal}"
    if result.damage is None:
        yield f"Verified: intact, {result.records} records up to record {result.last_seq}"
    else:
        yield (
            f"Verified: DAMAGED, this report covers only the records before the damage: "
            f"{result.damage.describe()}"
        )
    if not records:
        yield ""
        yield "No access to this patient's records is in the journal."
        return
    yield f"Accesses: {len(records)}, from {records[0].time} to {records[-1].time}"
    yield ""

    access_header = ("WHEN", "USER", "PROCESS", "EVENT", "RESULT", "HOW MUCH", "PATH")
    rows = (
        (
            record.time,
            users.label(record.uid),
            f"{printable(record.process)} ({record.pid})",
            record.event,
            record.result,
            _how_much(record),
            describe_path(record),
        )
        for record in records
    )
    yield from aligned(access_header, rows)

    yield ""
    yield "Summary by user"
    summary_header = (
        "USER",
        "ACCESSES",
        "FILES",
        "BYTES READ",
        "BYTES WRITTEN",
        "FIRST",
        "LAST",
        "PROCESSES",
    )
    summary_rows = (
        (
            users.label(summary.uid),
            str(summary.accesses),
            str(len(summary.paths)),
            str(summary.bytes_read),
            str(summary.bytes_written),
            summary.first,
            summary.last,
            ", ".join(printable(name) for name in sorted(summary.processes)),
        )
        for summary in sorted(summarise(records).values(), key=lambda s: s.uid)
    )
    yield from aligned(summary_header, summary_rows)
