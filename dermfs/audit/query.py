"""Selecting records and printing them: ``dermfs audit query`` (docs/audit.md section 11).

Filters AND together. Times compare as strings, which works because every record time
has the same fixed-width UTC form.
"""

from __future__ import annotations

import datetime as dt
import pwd
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from dermfs.audit.record import EVENT_NAMES, Record


@dataclass(frozen=True)
class RecordFilter:
    """Which records ``query`` prints; ``None`` means any.

    Attributes:
        patient: ``patient`` or ``new_patient`` equals this.
        path: ``path`` or ``new_path`` is this path or lies under it.
        uid: the caller's uid.
        since: record time at or after this (record time form).
        until: record time before this (record time form).
        events: the record's event is one of these.
    """

    patient: str | None = None
    path: str | None = None
    uid: int | None = None
    since: str | None = None
    until: str | None = None
    events: frozenset[str] | None = None

    def matches(self, record: Record) -> bool:
        """Whether *record* passes every filter."""
        if self.patient is not None and self.patient not in (record.patient, record.new_patient):
            return False
        if self.uid is not None and record.uid != self.uid:
            return False
        if self.events is not None and record.event not in self.events:
            return False
        if self.since is not None and record.time < self.since:
            return False
        if self.until is not None and record.time >= self.until:
            return False
        if self.path is not None:
            return _under(record.path, self.path) or _under(record.new_path, self.path)
        return True


def _under(path: str | None, prefix: str) -> bool:
    if path is None:
        return False
    if prefix == ".":
        return True
    return path == prefix or path.startswith(prefix + "/")


def path_prefix(text: str) -> str:
    """Return a ``--path`` value in the journal's form: no leading or trailing ``/``."""
    return text.strip("/") or "."


def parse_when(text: str, *, end_of_day: bool = False) -> str:
    """Turn an ISO 8601 date or date and time into the record time form, in UTC.

    Args:
        text: ``2026-12-03``, ``2026-12-03T21:10``, ``2026-12-03 21:10:40+01:00`` ...; a
            time without an offset is UTC.
        end_of_day: for a bare date, return the start of the next day (for ``--until``).

    Raises:
        ValueError: *text* is not an ISO 8601 date or date and time.
    """
    text = text.strip()
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            if end_of_day:
                day += dt.timedelta(days=1)
            when = dt.datetime.combine(day, dt.time(), dt.UTC)
        else:
            when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or date and time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_events(values: Iterable[str]) -> frozenset[str]:
    """Turn ``--event`` values (each a name or a comma list) into a set of event names.

    Raises:
        ValueError: a name is not an event.
    """
    names = {name.strip() for value in values for name in value.split(",") if name.strip()}
    unknown = sorted(names - EVENT_NAMES)
    if unknown:
        known = ", ".join(sorted(EVENT_NAMES))
        raise ValueError(f"unknown event {', '.join(unknown)} (events: {known})")
    return frozenset(names)


def uid_of(user: str) -> int:
    """Return the uid of the user named *user*; a number with no such user is a uid.

    Raises:
        ValueError: there is no such user, and *user* is not a number.
    """
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        if user.isdigit():
            return int(user)
        raise ValueError(f"no user named {user!r}") from None


class UserNames:
    """User names by uid from the system's user database, cached."""

    def __init__(self) -> None:
        self._names: dict[int, str | None] = {}

    def name(self, uid: int) -> str | None:
        """Return the name of *uid*, or ``None`` if it has none."""
        if uid not in self._names:
            try:
                self._names[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._names[uid] = None
        return self._names[uid]

    def label(self, uid: int) -> str:
        """Return ``name (uid)``, or just the uid when it has no name."""
        name = self.name(uid)
        return str(uid) if name is None else f"{name} ({uid})"


def printable(text: str | None) -> str:
    """Return *text* safe for a terminal: control and undecodable characters escaped.

    A file name with a newline or an escape sequence must not be able to forge lines of
    a table an auditor reads.
    """
    if text is None:
        return "-"
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}")
    return "".join(out)


def describe_path(record: Record) -> str:
    """Return the record's path for a table; for a rename, ``old -> new``."""
    if record.new_path is not None:
        return f"{printable(record.path)} -> {printable(record.new_path)}"
    return printable(record.path)


def describe_patient(record: Record) -> str:
    """Return the record's patient for a table; for a move between patients, ``a -> b``."""
    if record.new_patient is not None and record.new_patient != record.patient:
        return f"{printable(record.patient)} -> {printable(record.new_patient)}"
    return printable(record.patient)


def aligned(header: Sequence[str], rows: Iterable[Sequence[str]]) -> Iterator[str]:
    """Yield *header* and *rows* as lines with aligned columns; the last is not padded."""
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        yield "  ".join([*cells, row[-1]]).rstrip()


_HEADER = (
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
)


def table_lines(records: Iterable[Record], users: UserNames | None = None) -> Iterator[str]:
    """Yield the records as an aligned table, with a header line."""
    users = users or UserNames()
    rows = (
        (
            record.time,
            str(record.seq),
            record.event,
            record.result,
            users.label(record.uid),
            str(record.pid),
            printable(record.process),
            describe_patient(record),
            "-" if record.offset is None else str(record.offset),
            "-" if record.length is None else str(record.length),
            describe_path(record),
        )
        for record in records
    )
    yield from aligned(_HEADER, rows)


def json_lines(records: Iterable[Record]) -> Iterator[str]:
    """Yield each record as one line of JSON with exactly the record field names."""
    for record in records:
        yield record.to_json()
