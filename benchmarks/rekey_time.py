"""Time ``dermfs rekey`` of a volume of 10,000 files (docs/rotation.md, issue 5).

Usage: python benchmarks/rekey_time.py [--files N] [--per-dir N] [--size BYTES]
                                       [--runs N] [--dir DIR]

Makes a store with the ``local`` key-file provider and the default chunk size, writes
--files files of --size random bytes through the library (--per-dir to a directory),
then runs the real command, ``python -m dermfs rekey CONFIG``, --runs times (each run
makes the next generation) and prints the wall time of each and their median, process
start included. A last run in-process splits the time into the re-encrypting walk and
the final check. Content is never read by rekey, so --size changes nothing but the time
it takes to build the store.
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

from dermfs import cli
from dermfs.config import load_config
from dermfs.keys import provider_from_config
from dermfs.rotation.rekey import rekey_volume
from dermfs.tree import PlainTree
from dermfs.volume import Volume

REPO = Path(cli.__file__).resolve().parents[1]


def build(directory: Path, files: int, per_dir: int, size: int) -> Path:
    config = directory / "bench.yaml"
    config.write_text(
        "store: store\nkms:\n  provider: local\n  keyfile: volume.key\n"
        "audit:\n  journal: bench.audit\n  patient_id: '^patients/(?P<patient>[^/]+)/'\n"
    )
    if cli.main(["init", str(config)]) != 0:
        raise SystemExit("init failed")
    loaded = load_config(config)
    volume = Volume.open(loaded.store, provider_from_config(loaded.kms))
    volume.start_writing()
    try:
        tree = PlainTree(volume)
        for number in range(files):
            folder = f"patients/{number // per_dir:05d}"
            if number % per_dir == 0:
                if number == 0:
                    tree.mkdir("patients")
                tree.mkdir(folder)
            tree.write_file(f"{folder}/image-{number:06d}.jpg", os.urandom(size))
    finally:
        volume.close()
    return config


def run_command(config: Path) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dermfs", "rekey", str(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"rekey failed: {result.stderr.strip()}")
    return elapsed


def run_in_process(config: Path) -> dict[str, float]:
    loaded = load_config(config)
    provider = provider_from_config(loaded.kms)
    marks: dict[str, float] = {}

    def progress(what: str) -> None:
        marks[what] = time.perf_counter()

    started = time.perf_counter()
    volume = Volume.open(loaded.store, provider, allow_rekey_in_progress=True)
    try:
        rekey_volume(volume, provider, loaded.audit, progress)
    finally:
        volume.close()
    ended = time.perf_counter()
    return {
        "new key and recovery": marks["rekey"] - started,
        "walk, journal and volume file": marks["check"] - marks["rekey"],
        "final check": ended - marks["check"],
        "total": ended - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--per-dir", type=int, default=100)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="dermfs-rekey-bench-", dir=args.dir))
    try:
        started = time.perf_counter()
        config = build(directory, args.files, args.per_dir, args.size)
        built = time.perf_counter() - started
        print(f"built {args.files} files of {args.size} bytes in {built:.1f} s")
        times = [run_command(config) for _ in range(args.runs)]
        for number, elapsed in enumerate(times, 1):
            print(f"dermfs rekey, run {number}: {elapsed:.2f} s")
        print(f"dermfs rekey of {args.files} files: median {statistics.median(times):.2f} s")
        for what, elapsed in run_in_process(config).items():
            print(f"in-process {what}: {elapsed:.2f} s")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
