"""Audit records: their fields, events, times, patients, and their JSON form.

A record is what ``docs/audit.md`` section 3 describes: who did what to which path and
patient, when, with which result. This module is pure: no I/O and no keys.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

#: The record fields, in the order they are serialised (docs/audit.md section 3.1).
FIELDS = (
    "time",
    "seq",
    "event",
    "result",
    "uid",
    "gid",
    "pid",
    "process",
    "exe",
    "path",
    "patient",
    "offset",
    "length",
    "new_path",
    "new_patient",
)

OK = "ok"


class Event(enum.StrEnum):
    """The kinds of record; the values are what the journal stores."""

    OPEN = "open"
    CREATE = "create"
    READ = "read"
    WRITE = "write"
    UNLINK = "unlink"
    RENAME = "rename"
    SETATTR = "setattr"
    MKDIR = "mkdir"
    RMDIR = "rmdir"
    MOUNT = "mount"
    UNMOUNT = "unmount"
    KEY_FETCH = "key-fetch"
    INTEGRITY = "integrity"
    DENIED = "denied"
    UNCLEAN_STOP = "unclean-stop"
    AUDIT_RESUMED = "audit-resumed"
    REKEY = "rekey"
    REWRAP = "rewrap"


EVENT_NAMES = frozenset(event.value for event in Event)


class Caller(Protocol):
    """Who made a request: pyfuse3's ``RequestContext`` has these attributes."""

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...

    @property
    def pid(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ProcessCaller:
    """A caller given by its ids, for the daemon's own events and for tools."""

    uid: int
    gid: int
    pid: int


def daemon_caller() -> ProcessCaller:
    """Return this process as a caller (mount, unmount, key fetch, unclean stop)."""
    return ProcessCaller(os.getuid(), os.getgid(), os.getpid())


@dataclass(frozen=True, slots=True)
class Record:
    """One audit record; the attributes are the fields of docs/audit.md section 3.1."""

    time: str
    seq: int
    event: str
    result: str
    uid: int
    gid: int
    pid: int
    process: str | None
    exe: str | None
    path: str | None
    patient: str | None
    offset: int | None = None
    length: int | None = None
    new_path: str | None = None
    new_patient: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the record as a mapping with exactly the field names, in order."""
        return {
            "time": self.time,
            "seq": self.seq,
            "event": self.event,
            "result": self.result,
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
            "process": self.process,
            "exe": self.exe,
            "path": self.path,
            "patient": self.patient,
            "offset": self.offset,
            "length": self.length,
            "new_path": self.new_path,
            "new_patient": self.new_patient,
        }

    def to_json(self) -> str:
        """Return the compact JSON form the journal stores and ``query --json`` prints."""
        return _ENCODER.encode(self.as_dict())


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()
_FIELD_SET = frozenset(FIELDS)


def record_from_json(data: bytes | str) -> Record:
    """Parse a record made by :meth:`Record.to_json`.

    Raises:
        ValueError: *data* is not a JSON object with exactly the record fields.
    """
    text = data.decode("ascii") if isinstance(data, bytes) else data
    obj = _DECODER.decode(text)
    if not isinstance(obj, dict) or obj.keys() != _FIELD_SET:
        raise ValueError("not an audit record")
    return record_from_mapping(obj)


def record_from_mapping(obj: Mapping[str, Any]) -> Record:
    """Build a record from a mapping with the record fields."""
    return Record(*[obj[name] for name in FIELDS])


def result_name(result: str | int) -> str:
    """Return ``ok`` for 0 or ``"ok"``, else the errno name (``EACCES``) of *result*.

    Args:
        result: an errno number, 0, or a name that is returned unchanged.
    """
    if isinstance(result, str):
        return result
    if result == 0:
        return OK
    return errno.errorcode.get(result, f"E{result}")


class RecordClock:
    """Formats the current UTC time as record times, caching the per-second part.

    Safe to share between threads: the cache is one tuple, replaced whole.
    """

    __slots__ = ("_cached",)

    def __init__(self) -> None:
        self._cached = (-1, "")

    def now(self) -> str:
        """Return the current time, for example ``2026-12-03T21:10:40.123456Z``."""
        return self.format_ns(time.time_ns())

    def format_ns(self, ns: int) -> str:
        """Return the record time of *ns* nanoseconds since the epoch."""
        second, rest = divmod(ns, 1_000_000_000)
        cached = self._cached
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._cached = cached
        return f"{cached[1]}.{rest // 1000:06d}Z"


class PatientMatcher:
    """Finds the patient id of a path with the configured ``audit.patient_id`` pattern.

    The pattern is applied with ``re.search``; when it does not match, it is tried once
    more on the path with a trailing ``/``, so that a patient's own folder is theirs.
    """

    __slots__ = ("_pattern",)

    def __init__(self, pattern: re.Pattern[str]) -> None:
        if "patient" not in pattern.groupindex:
            raise ValueError("the patient pattern needs a group named patient")
        self._pattern = pattern

    def patient_of(self, path: str | None) -> str | None:
        """Return the patient id in *path*, or ``None`` when there is none."""
        if path is None:
            return None
        match = self._pattern.search(path) or self._pattern.search(path + "/")
        if match is None:
            return None
        return match.group("patient")


def mount_path(path: str | bytes | None) -> str | None:
    """Return *path* as the journal stores it: relative, no leading ``/``, root ``.``.

    Bytes are decoded as UTF-8 with ``surrogateescape``, so any name is kept.
    """
    if path is None:
        return None
    if isinstance(path, bytes):
        path = path.decode("utf-8", "surrogateescape")
    path = path.lstrip("/")
    return path or "."
