#!/usr/bin/env python3
"""Auditing on and off on a real mount (the figures in docs/performance.md).

    .venv/bin/python benchmarks/audit_mount.py --off-tree DIR [--size-mib 256]
                                               [--files 2000] [--repeat 3]

dermfs has no switch that turns auditing off, and gets none for a benchmark. So "off" is
another copy of the source tree, given with ``--off-tree``, in which the frontend's audit
hooks are taken out (for example an export of this commit with the commit that wired the
journal into ``dermfs/fuse`` reverted); "on" is this tree. Each repetition runs both, one
after the other, each on a fresh store and mount under a temporary directory:

- ``dd`` write of SIZE MiB (``bs=1M conv=fsync``, not reported), a remount, then the
  timed ``dd`` read of it (``bs=1M``), nothing in the mount's page cache;
- creating FILES files of 4 KiB (create, write, close) in one process, timed; a
  remount; reading them all back (open, read, close), timed.

Prints the median of each figure and every run. Run as root.
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

HERE = Path(__file__).resolve().parents[1]

CREATE = """
import os, sys
root, count = sys.argv[1], int(sys.argv[2])
block = os.urandom(4096)
for d in range(20):
    os.mkdir(os.path.join(root, f"d{d}"))
for n in range(count):
    with open(os.path.join(root, f"d{n % 20}", f"f{n}"), "wb") as out:
        out.write(block)
"""

READ = """
import os, sys
root, count = sys.argv[1], int(sys.argv[2])
total = 0
for n in range(count):
    with open(os.path.join(root, f"d{n % 20}", f"f{n}"), "rb") as back:
        total += len(back.read())
assert total == 4096 * count, total
"""


def run(command: list[str | Path], tree: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("NOTIFY_SOCKET", None)
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, cwd=tree, env=env
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed: {result.stderr.strip()}")
    return result


def timed(command: list[str | Path], tree: Path) -> float:
    start = time.perf_counter()
    run(command, tree)
    return time.perf_counter() - start


def measure(tree: Path, base: Path, size_mib: int, files: int) -> dict[str, float]:
    dermfs: list[str | Path] = [sys.executable, "-m", "dermfs"]
    config = base / "bench.yaml"
    config.write_text(
        "store: store\nkms:\n  provider: local\n  keyfile: bench.key\n"
        "audit:\n  journal: bench.audit\n  patient_id: '^(?P<patient>[^/]+)/'\n"
    )
    mnt = base / "mnt"
    mnt.mkdir()
    run([*dermfs, "init", config], tree)
    where = run([sys.executable, "-c", "import dermfs; print(dermfs.__file__)"], tree)
    assert where.stdout.startswith(str(tree)), where.stdout

    def mount() -> None:
        run([*dermfs, "mount", config, mnt, "-o", f"log={base / 'log'}"], tree)

    def umount() -> None:
        run([*dermfs, "umount", mnt], tree)

    mount()
    try:
        big = mnt / "big"
        run(
            ["dd", "if=/dev/urandom", f"of={big}", "bs=1M", f"count={size_mib}", "conv=fsync"], tree
        )
        umount()
        mount()
        seconds = timed(["dd", f"if={big}", "of=/dev/null", "bs=1M"], tree)
        read_mbs = size_mib * (1 << 20) / seconds / 1e6
        big.unlink()

        small = mnt / "small"
        small.mkdir()
        create_s = timed([sys.executable, "-c", CREATE, small, str(files)], tree)
        umount()
        mount()
        read_s = timed([sys.executable, "-c", READ, small, str(files)], tree)
    finally:
        umount()
    journal = sum(path.stat().st_size for path in base.glob("bench.audit*"))
    return {
        "read MB/s": read_mbs,
        "create files/s": files / create_s,
        "read back files/s": files / read_s,
        "journal KiB": journal / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--off-tree", type=Path, required=True)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (read-ahead is set through /sys)")

    trees = {"on": HERE, "off": args.off_tree.resolve()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for repetition in range(args.repeat):
        for name, tree in trees.items():
            base = Path(tempfile.mkdtemp(prefix=f"dermfs-audit-bench-{name}-"))
            try:
                figures = measure(tree, base, args.size_mib, args.files)
            finally:
                shutil.rmtree(base, ignore_errors=True)
            runs[name].append(figures)
            shown = ", ".join(f"{key} {value:,.1f}" for key, value in figures.items())
            print(f"run {repetition + 1} {name}: {shown}", flush=True)

    for name, figures in runs.items():
        medians = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
        shown = ", ".join(f"{key} {value:,.1f}" for key, value in medians.items())
        print(f"median {name}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
