#!/usr/bin/env python3
"""Measure a dermfs mount under a few kernel-cache settings (the figures in docs/fuse.md).

    .venv/bin/python scripts/bench_fuse.py [--size-mib 256] [--files 2000] [--repeat N]
                                           [-o OPTS]...

Each ``-o`` names one configuration (comma-separated mount options, ``default`` for
none); every configuration gets a fresh store and mount under a temporary directory. The
workloads: ``dd`` write of SIZE MiB with ``bs=1M`` and ``conv=fsync``; the same with
``bs=4k``; ``dd`` read after a remount (nothing in the mount's page cache); a second read
in a new open without a remount (what ``keep_cache`` changes); creating FILES files of
4 KiB; ``ls -lR`` of them after a remount; and ``stat`` of the files over and over for
3 s. Run as root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DERMFS = [sys.executable, "-m", "dermfs"]


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed: {result.stderr.strip()}")
    return result


def timed(*command: str | Path) -> float:
    start = time.perf_counter()
    run(*command)
    return time.perf_counter() - start


def measure(base: Path, options: str, size_mib: int, files: int) -> dict[str, float]:
    config = base / "bench.yaml"
    config.write_text(
        "store: store\nkms:\n  provider: local\n  keyfile: bench.key\n"
        "audit:\n  journal: bench.audit\n  patient_id: '^(?P<patient>[^/]+)/'\n"
    )
    mnt = base / "mnt"
    mnt.mkdir()
    run(*DERMFS, "init", config)
    extra = [] if options == "default" else ["-o", options]

    def mount() -> None:
        run(*DERMFS, "mount", config, mnt, "-o", f"log={base / 'log'}", *extra)

    def umount() -> None:
        run(*DERMFS, "umount", mnt)

    figures: dict[str, float] = {}
    mount()
    try:
        big = mnt / "big"
        seconds = timed(
            "dd",
            "if=/dev/zero",
            f"of={big}",
            "bs=1M",
            f"count={size_mib}",
            "conv=fsync",
            "status=none",
        )
        figures["write 1M MB/s"] = size_mib * 1.048576 / seconds
        small_count = max(1, size_mib // 4) * 256
        seconds = timed(
            "dd",
            "if=/dev/zero",
            f"of={mnt / 'small-blocks'}",
            "bs=4k",
            f"count={small_count}",
            "conv=fsync",
            "status=none",
        )
        figures["write 4k MB/s"] = small_count * 4096 / 1e6 / seconds
        umount()
        mount()
        seconds = timed("dd", f"if={big}", "of=/dev/null", "bs=1M", "status=none")
        figures["read cold MB/s"] = size_mib * 1.048576 / seconds
        seconds = timed("dd", f"if={big}", "of=/dev/null", "bs=1M", "status=none")
        figures["read again MB/s"] = size_mib * 1.048576 / seconds
        big.unlink()
        (mnt / "small-blocks").unlink()

        tree = mnt / "tree"
        tree.mkdir()
        payload = b"x" * 4096
        start = time.perf_counter()
        for number in range(files):
            directory = tree / f"d{number // 100}"
            if number % 100 == 0:
                directory.mkdir()
            with open(directory / f"f{number}", "wb") as stream:
                stream.write(payload)
        figures["create files/s"] = files / (time.perf_counter() - start)
        umount()
        mount()
        figures["ls -lR s"] = timed("ls", "-lR", tree)
        paths = [tree / f"d{number // 100}" / f"f{number}" for number in range(files)]
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < 3:
            for path in paths:
                os.stat(path)
            count += len(paths)
        figures["stat 3 s /s"] = count / (time.perf_counter() - start)
    finally:
        umount()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    parser.add_argument("--keep", action="store_true", help="keep each volume and its log")
    parser.add_argument("-o", dest="configurations", action="append", default=[])
    args = parser.parse_args()
    configurations = args.configurations or ["default"]

    results = {}
    for options in configurations:
        runs = []
        for _run in range(args.repeat):
            base = Path(tempfile.mkdtemp(prefix="dermfs-bench-"))
            try:
                runs.append(measure(base, options, args.size_mib, args.files))
            finally:
                if args.keep:
                    print(f"kept {base}", flush=True)
                else:
                    shutil.rmtree(base, ignore_errors=True)
        results[options] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(
            options, {key: round(value, 2) for key, value in results[options].items()}, flush=True
        )

    keys = list(next(iter(results.values())))
    width = max(len(options) for options in results)
    print("| options".ljust(width + 2) + " | " + " | ".join(keys) + " |")
    print("|" + "-" * (width + 2) + "|" + "|".join("-" * (len(key) + 2) for key in keys) + "|")
    for options, figures in results.items():
        cells = [
            f"{figures[key]:.0f}" if figures[key] >= 10 else f"{figures[key]:.2f}" for key in keys
        ]
        print(
            f"| {options.ljust(width)} | "
            + " | ".join(cell.rjust(len(key)) for cell, key in zip(cells, keys, strict=True))
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
