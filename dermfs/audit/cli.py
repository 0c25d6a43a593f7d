"""``dermfs audit verify | query | report``: the auditor's commands.

``dermfs.cli`` parses the command line, loads the configuration and calls :func:`run`
with the parsed arguments: ``audit_command`` (``verify``, ``query`` or ``report``) and,
for ``query``, ``patient``, ``path``, ``uid``, ``user``, ``since``, ``until``,
``event`` (a list) and ``json``; for ``report``, ``patient``. The volume is unlocked
only to derive the audit subkey; the store's lock is not taken, so these commands work
while the volume is mounted.

Exit status: 0 when the journal is intact; :data:`dermfs.exitcodes.DAMAGE` when it is
damaged (with one line naming the first bad record and the kind); ``USAGE`` for a bad
filter. Errors of the configuration, store or key provider propagate as
:class:`~dermfs.errors.DermfsError` for ``dermfs.cli`` to report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TextIO

from dermfs import exitcodes
from dermfs.audit.query import (
    RecordFilter,
    json_lines,
    parse_events,
    parse_when,
    path_prefix,
    table_lines,
    uid_of,
)
from dermfs.audit.record import Record
from dermfs.audit.report import report_lines
from dermfs.audit.verify import VerifyResult, read_records, verify
from dermfs.config import Config
from dermfs.cryptocore import SecretKey
from dermfs.keys import KeyProvider, provider_from_config
from dermfs.volume import Volume


def record_filter(args: argparse.Namespace) -> RecordFilter:
    """Build the filter of ``query`` from its arguments.

    Raises:
        ValueError: a filter's value is bad (one line, naming the option).
    """
    option = "--user"
    try:
        uid = args.uid
        if args.user is not None:
            user_uid = uid_of(args.user)
            if uid is not None and uid != user_uid:
                raise ValueError("names another user than --uid")
            uid = user_uid
        option = "--since"
        since = None if args.since is None else parse_when(args.since)
        option = "--until"
        until = None if args.until is None else parse_when(args.until, end_of_day=True)
        option = "--event"
        events = parse_events(args.event) if args.event else None
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None

    return RecordFilter(
        patient=args.patient,
        path=None if args.path is None else path_prefix(args.path),
        uid=uid,
        since=since,
        until=until,
        events=events,
    )


def run(
    config: Config,
    args: argparse.Namespace,
    *,
    provider: KeyProvider | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run ``dermfs audit verify``, ``query`` or ``report``; return the exit status.

    Args:
        config: the loaded configuration.
        args: the parsed arguments (see the module docstring).
        provider: the key provider; by default the configuration's.
        out: where results go (standard output by default).
        err: where the damage line and usage errors go (standard error by default).

    Raises:
        DermfsError: the store cannot be opened or the key cannot be unwrapped.
        OSError: a journal file exists but cannot be read.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    command = args.audit_command
    prefix = f"dermfs audit {command}"

    selection = None
    if command == "query":
        try:
            selection = record_filter(args)
        except ValueError as exc:
            print(f"{prefix}: {exc}", file=err)
            return exitcodes.USAGE

    volume_id, audit_key = _audit_key(config, provider)
    journal = config.audit.journal
    try:
        if command == "verify":
            result = verify(journal, volume_id, audit_key)
            if result.intact:
                print(result.summary(), file=out)
        elif selection is not None:
            records, result = read_records(journal, volume_id, audit_key, selection.matches)
            lines = json_lines(records) if args.json else table_lines(records)
            _write_lines(out, lines)
        elif command == "report":
            patient = args.patient

            def about(record: Record) -> bool:
                return patient in (record.patient, record.new_patient)

            records, result = read_records(journal, volume_id, audit_key, about)
            _write_lines(out, report_lines(patient, records, result))
        else:
            raise ValueError(f"unknown audit command {command!r}")
    finally:
        audit_key.wipe()
    return _damage_status(prefix, result, err)


def _damage_status(prefix: str, result: VerifyResult, err: TextIO) -> int:
    if result.damage is None:
        return exitcodes.OK
    print(f"{prefix}: {result.summary()}", file=err)
    return exitcodes.DAMAGE


def _write_lines(out: TextIO, lines: Iterable[str]) -> None:
    for line in lines:
        out.write(line.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")


def _audit_key(config: Config, provider: KeyProvider | None) -> tuple[bytes, SecretKey]:
    """Unlock the volume just long enough to derive the audit subkey (no store lock)."""
    if provider is None:
        provider = provider_from_config(config.kms, passphrase_stdin=sys.stdin)
    volume = Volume.open(config.store, provider)
    try:
        return volume.volume_id, volume.audit_key()
    finally:
        volume.close()
