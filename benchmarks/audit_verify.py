"""Time ``dermfs audit verify`` on a journal of a million records (docs/audit.md section 10).

Usage: python benchmarks/audit_verify.py [--records N] [--dir DIR] [--batch N]

Writes a journal through the real writer (group commits of --batch records, default
rotation at 64 MiB), then times :func:`dermfs.audit.verify` and, for comparison, the
full decode that ``query`` does. Prints one line per figure. The goal (issue 4) is a
verify of one million records within a minute.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from dermfs.audit import AuditJournal, Event, ProcessCaller, read_records, verify
from dermfs.audit.process import ProcessNames
from dermfs.cryptocore import random_id, random_key

PATIENT_ID = re.compile(r"^patients/(?P<patient>[^/]+)/")


class _FixedNames(ProcessNames):
    """Process names without /proc, so that the write phase measures the journal."""

    def lookup(self, pid: int) -> tuple[str | None, str | None]:
        return "eog", "/usr/bin/eog"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="dermfs-audit-bench-", dir=args.dir))
    try:
        path = directory / "bench.audit"
        journal_id = random_id()
        audit_key = random_key()
        journal = AuditJournal.open(
            path, journal_id, audit_key, patient_id=PATIENT_ID, process_names=_FixedNames()
        )
        caller = ProcessCaller(1000, 1000, 4242)
        started = time.perf_counter()
        for number in range(args.records):
            if number and number % args.batch == 0:
                journal.flush()
            journal.record(
                Event.READ,
                caller,
                f"patients/{number % 5000:06d}/image-{number}.jpg",
                offset=number * 65536,
                length=65536,
            )
        journal.close()
        written = time.perf_counter() - started
        size = sum(file.stat().st_size for file in directory.iterdir())
        print(f"write: {args.records} records in {written:.1f} s, {size / 1e6:.0f} MB on disk")

        started = time.perf_counter()
        result = verify(path, journal_id, audit_key)
        verified = time.perf_counter() - started
        print(f"verify: {result.records} records, {result.segments} segments in {verified:.1f} s")
        print(f"        {result.summary()}")

        started = time.perf_counter()
        read_records(path, journal_id, audit_key, lambda record: False)
        decoded = time.perf_counter() - started
        print(f"verify and decode (query): {decoded:.1f} s")
        if not result.intact or result.records != args.records:
            raise SystemExit("benchmark journal did not verify")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
