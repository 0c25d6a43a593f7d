"""Sequential throughput of ContentFile against a bare AES-256-GCM loop over the same bytes.

Writes and then reads a file of ``--size`` MiB (64 by default) in 1 MiB calls through
:class:`dermfs.content.ContentFile` on a new store with 64 KiB chunks, and compares with
two baselines over the same plaintext, in 64 KiB chunks, each with a fresh
``os.urandom`` nonce:

- ``bare crypto``: only ``AESGCM.encrypt`` / ``decrypt``, no I/O;
- ``bare crypto + I/O``: the same, plus one ``pwritev`` / ``pread`` per 1 MiB to a file on
  the same disk, so that the comparison is fair to the content layer, which does I/O.

The baselines are kept lean (the crypto-only write discards its output, the I/O write
gathers nonces and ciphertexts with ``pwritev`` instead of joining them), so that they
measure the cipher and the system calls, not avoidable copies.

Every variant runs ``--repeat`` times, interleaved; the medians are printed with the
content layer's share of each baseline (the target is at least 70 %), and the median
number of minor page faults each variant caused (fresh memory from the allocator costs a
fault per page, which can cost more than the cipher). ``--profile`` runs the content write
and read once more under cProfile and prints where the time goes.

Usage::

    .venv/bin/python benchmarks/content_throughput.py [--size 64] [--repeat 7] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dermfs import format
from dermfs.cryptocore import SecretKey, random_key, unwrap_key, wrap_key
from dermfs.keys.base import WrappedKey
from dermfs.volume import Volume, create_store

MIB = 1 << 20
IO_SIZE = MIB
CHUNK_SIZE = 65536
AAD = bytes(format.ID_SIZE * 2 + 9)


class MemoryKeyProvider:
    """A key provider that keeps its key-encryption key in memory (benchmark only)."""

    name = "local"

    def __init__(self) -> None:
        self._kek = random_key()

    def describe(self) -> str:
        return "an in-memory benchmark key"

    def wrap(self, volume_key: SecretKey, volume_id: bytes) -> WrappedKey:
        return WrappedKey(self.name, "keyfile", 1, wrap_key(self._kek, volume_key, volume_id))

    def unwrap(self, wrapped: WrappedKey, volume_id: bytes) -> SecretKey:
        return unwrap_key(self._kek, wrapped.blob, volume_id)


class Bench:
    """One store and one plaintext, and the six timed variants over them."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        self.plaintext = memoryview(os.urandom(size))
        store = directory / "store"
        store.mkdir()
        provider = MemoryKeyProvider()
        create_store(store, provider, CHUNK_SIZE)
        self.volume = Volume.open(store, provider)
        self.volume.start_writing()
        self.content_path = store / "content"
        self.bare_path = directory / "bare"
        self.aes = AESGCM(AESGCM.generate_key(bit_length=256))
        self.sealed = [self.seal(offset) for offset in range(0, size, CHUNK_SIZE)]

    def seal(self, offset: int) -> tuple[bytes, bytes]:
        """Seal the plaintext chunk at *offset*; return its nonce and ciphertext."""
        nonce = os.urandom(12)
        return nonce, self.aes.encrypt(nonce, self.plaintext[offset : offset + CHUNK_SIZE], AAD)

    def close(self) -> None:
        self.volume.close()

    # -------------------------------------------------------------------------- content

    def content_write(self) -> None:
        self.content_path.unlink(missing_ok=True)
        fd = os.open(self.content_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            file = self.volume.create_file(fd, os.fstat(fd).st_ino, "content")
            for offset in range(0, self.size, IO_SIZE):
                file.write(offset, self.plaintext[offset : offset + IO_SIZE])
            file.checkpoint()
        finally:
            os.close(fd)

    def content_read(self) -> None:
        fd = os.open(self.content_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            file = self.volume.open_file(fd, os.fstat(fd).st_ino)
            for offset in range(0, self.size, IO_SIZE):
                if len(file.read(offset, IO_SIZE)) != min(IO_SIZE, self.size - offset):
                    raise AssertionError("short read")
        finally:
            os.close(fd)

    # -------------------------------------------------------------------------- bare loop

    def bare_write(self) -> None:
        for offset in range(0, self.size, CHUNK_SIZE):
            self.seal(offset)

    def bare_read(self) -> None:
        for nonce, ciphertext in self.sealed:
            self.aes.decrypt(nonce, ciphertext, AAD)

    def bare_io_write(self) -> None:
        self.bare_path.unlink(missing_ok=True)
        fd = os.open(self.bare_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        slot = CHUNK_SIZE + 28
        try:
            for offset in range(0, self.size, IO_SIZE):
                parts: list[bytes] = []
                for start in range(offset, min(self.size, offset + IO_SIZE), CHUNK_SIZE):
                    parts += self.seal(start)
                os.pwritev(fd, parts, offset // CHUNK_SIZE * slot)
        finally:
            os.close(fd)

    def bare_io_read(self) -> None:
        fd = os.open(self.bare_path, os.O_RDONLY | os.O_CLOEXEC)
        slot = CHUNK_SIZE + 28
        try:
            for offset in range(0, self.size, IO_SIZE):
                count = -(-min(IO_SIZE, self.size - offset) // CHUNK_SIZE)
                blob = memoryview(os.pread(fd, count * slot, offset // CHUNK_SIZE * slot))
                for index in range(count):
                    sealed = blob[index * slot : (index + 1) * slot]
                    self.aes.decrypt(sealed[:12], sealed[12:], AAD)
        finally:
            os.close(fd)


VARIANTS = [
    ("content write", "content_write"),
    ("content read", "content_read"),
    ("bare crypto write", "bare_write"),
    ("bare crypto read", "bare_read"),
    ("bare crypto + I/O write", "bare_io_write"),
    ("bare crypto + I/O read", "bare_io_read"),
]


def timed(function: Callable[[], None]) -> tuple[float, int]:
    """Run *function*; return its wall-clock seconds and the minor page faults it caused."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    function()
    elapsed = time.perf_counter() - start
    return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def profile(bench: Bench) -> None:
    for label, method in (
        ("content write", bench.content_write),
        ("content read", bench.content_read),
    ):
        profiler = cProfile.Profile()
        profiler.runcall(method)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
        print(f"\n---- cProfile, {label} (sorted by own time) ----")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:4000])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="file size in MiB (default 64)")
    parser.add_argument("--repeat", type=int, default=7, help="repetitions (default 7)")
    parser.add_argument("--dir", default="/var/tmp", help="where the temporary store goes")
    parser.add_argument("--profile", action="store_true", help="profile the content layer")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="dermfs-bench-", dir=args.dir))
    bench = Bench(directory, args.size * MIB)
    seconds: dict[str, list[float]] = {label: [] for label, _method in VARIANTS}
    faults: dict[str, list[int]] = {label: [] for label, _method in VARIANTS}
    try:
        for _round in range(args.repeat):
            for label, method in VARIANTS:
                elapsed, faulted = timed(getattr(bench, method))
                seconds[label].append(elapsed)
                faults[label].append(faulted)
        if args.profile:
            profile(bench)
    finally:
        bench.close()
        shutil.rmtree(directory)

    rate = {label: args.size / statistics.median(times) for label, times in seconds.items()}
    print(
        f"\n{args.size} MiB in {IO_SIZE // MIB} MiB calls, {CHUNK_SIZE // 1024} KiB chunks, "
        f"median of {args.repeat} runs, in {args.dir}"
    )
    for label, _method in VARIANTS:
        runs = ", ".join(f"{args.size / value:.0f}" for value in seconds[label])
        faulted = statistics.median(faults[label])
        print(f"  {label:<24} {rate[label]:8.1f} MiB/s  {faulted:7.0f} page faults  (runs: {runs})")

    # The content layer's share of each baseline: the ratio of the medians, and the median
    # of the ratios within each round (steadier on a busy machine).
    print(f"\n  {'content layer / baseline':<48} {'medians':>8} {'per round':>10}")
    for kind in ("write", "read"):
        for baseline in ("bare crypto", "bare crypto + I/O"):
            ours, theirs = seconds[f"content {kind}"], seconds[f"{baseline} {kind}"]
            share = rate[f"content {kind}"] / rate[f"{baseline} {kind}"]
            paired = statistics.median(b / a for a, b in zip(ours, theirs, strict=True))
            verdict = "meets" if min(share, paired) >= 0.70 else "below"
            label = f"content {kind} / {baseline} {kind}"
            print(f"  {label:<48} {share:8.1%} {paired:10.1%}   {verdict} the 70 % target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
