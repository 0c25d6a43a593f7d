"""``dermfs mount`` and ``dermfs umount``.

:func:`run_mount` checks FUSE and the mount point, unlocks the volume (a wrong key fails
here, before anything is touched), then, in the foreground or in a forked daemon
(:mod:`dermfs.fuse.daemon`), starts writing (the store lock, crash recovery, a fresh
intent log), mounts, and serves until unmounted. It reports readiness once the mount
answers: to the waiting parent, and to systemd (``READY=1``) when ``$NOTIFY_SOCKET`` is
set.

SIGTERM or SIGINT unmounts: a normal unmount first, while requests are still served, so
that the kernel writes back what it holds; if the mount is busy, a lazy one, and the
daemon serves the remaining users until they are done. A second signal stops serving
at once. Either way, open files are closed (marked clean), the intent log is removed and
the store lock released before the process exits.

:func:`run_umount` runs ``fusermount3 -u`` and waits until the daemon has exited. It
finds the daemon through the mount's source, which names the store (``fsname``), and the
process id the daemon writes into the store's lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from dermfs import exitcodes, format
from dermfs.audit import (
    AuditJournal,
    AuditUnavailable,
    Event,
    JournalDamaged,
    SyslogForwarder,
    daemon_caller,
    flush_periodically,
)
from dermfs.config import AuditConfig, Config
from dermfs.errors import AuditDamaged, DermfsError, MountError
from dermfs.fuse import daemon
from dermfs.fuse.audit import Auditor
from dermfs.fuse.daemon import Readiness
from dermfs.fuse.operations import DermfsOperations
from dermfs.fuse.options import MountOptions, parse_options, store_of_fsname
from dermfs.keys import provider_from_config
from dermfs.volume import RecoveryReport, Volume

log = logging.getLogger(__name__)

FSTYPE = "fuse.dermfs"
FUSERMOUNT = "fusermount3"
#: How long ``umount`` waits for the daemon to finish writing and exit.
UMOUNT_WAIT_SECONDS = 300.0
#: How long a process may outlive the store lock it is said to hold before we stop waiting.
STALE_PID_SECONDS = 5.0
#: How long the daemon waits for its own mount to answer.
READY_WAIT_SECONDS = 30.0


# ------------------------------------------------------------------------------ mount


def run_mount(config: Config, mountpoint: Path, foreground: bool, options: list[str]) -> int:
    """Mount the volume *config* describes on *mountpoint*; see the module docstring.

    Returns:
        The exit status: 0 once mounted (or, with *foreground*, once unmounted again).

    Raises:
        MountError: FUSE is unavailable, the mount point is missing, not empty or
            already mounted, or an option is unknown.
        StoreError, FormatError, WrongKeyError, KeyProviderError: from opening the store.
    """
    store = Path(os.path.abspath(config.store))
    mountpoint = Path(os.path.abspath(mountpoint))
    parsed = parse_options(
        store, [*config.mount.options, *options], allow_other=config.mount.allow_other
    )
    check_fuse_available()
    check_mountpoint(mountpoint)

    provider = provider_from_config(config.kms, passphrase_stdin=sys.stdin)
    try:
        volume = Volume.open(store, provider)
    finally:
        wipe = getattr(provider, "wipe", None)
        if callable(wipe):
            wipe()

    if foreground:
        return serve(volume, mountpoint, parsed, Readiness(), config.audit)

    try:
        readiness = daemon.fork_daemon()
    except BaseException:
        volume.close()
        raise
    if readiness is None:
        volume.close()  # only wipes this process's copy of the keys
        return exitcodes.OK

    status = _daemon_main(volume, mountpoint, parsed, readiness, config.audit)
    logging.shutdown()
    os._exit(status)


def _daemon_main(
    volume: Volume,
    mountpoint: Path,
    parsed: MountOptions,
    readiness: Readiness,
    audit: AuditConfig | None,
) -> int:
    try:
        daemon.detach(parsed.log)
        return serve(volume, mountpoint, parsed, readiness, audit)
    except DermfsError as exc:
        log.error("%s", exc)
        readiness.failed(exc)
        return exitcodes.for_exception(exc)
    except BaseException as exc:
        log.exception("internal error")
        readiness.failed(MountError(f"internal error: {type(exc).__name__}: {exc}"))
        return exitcodes.GENERIC


def serve(
    volume: Volume,
    mountpoint: Path,
    parsed: MountOptions,
    readiness: Readiness,
    audit: AuditConfig | None = None,
) -> int:
    """Start writing, open the audit journal, mount, and serve requests until unmounted.

    Always closes *volume* (and the journal, after the last handle is released).
    Without *audit*, nothing is recorded.

    Raises:
        AuditUnavailable, AuditDamaged: the journal cannot be opened, or is damaged,
            and ``audit.on_failure`` is ``deny``.
    """
    daemon.disable_core_dumps()
    journal = None
    try:
        _log_recovery(volume.start_writing())
        _record_pid(volume.store)
        journal = open_journal(audit, volume) if audit is not None else None
        operations = DermfsOperations(volume, parsed.cache, audit=Auditor(journal))
    except BaseException:
        if journal is not None:
            _close_journal(journal)
        volume.close()
        raise

    old_umask = os.umask(0)
    try:
        try:
            pyfuse3.init(operations, str(mountpoint), set(parsed.fuse))
        except RuntimeError:
            raise MountError(f"cannot mount on {mountpoint}: FUSE refused the mount") from None
        if journal is not None:
            journal.record(Event.MOUNT, daemon_caller(), None)
        try:
            trio.run(_main, operations, mountpoint, readiness, journal)
        finally:
            pyfuse3.close(unmount=True)
            if journal is not None:
                journal.record(Event.UNMOUNT, daemon_caller(), None)
    finally:
        os.umask(old_umask)
        left = operations.close()
        if journal is not None:
            _close_journal(journal)
        volume.close()
        daemon.notify_systemd("STOPPING=1")
    if left:
        log.info("closed %d file(s) still open at unmount", left)
    log.info("unmounted %s", mountpoint)
    return exitcodes.OK


def open_journal(settings: AuditConfig, volume: Volume) -> AuditJournal | None:
    """Open the volume's audit journal and record the key fetch.

    Returns ``None`` (and logs an ERROR) when it cannot be opened and
    ``audit.on_failure`` is ``allow``: the mount then records nothing.

    Raises:
        AuditUnavailable: the journal cannot be opened (``on_failure: deny``).
        AuditDamaged: the journal does not match its checkpoint (``on_failure: deny``).
    """
    forwarder = SyslogForwarder() if settings.syslog else None
    try:
        journal = AuditJournal.open_for_volume(settings, volume, forwarder=forwarder)
    except (AuditUnavailable, JournalDamaged) as exc:
        if settings.on_failure != "allow":
            if isinstance(exc, JournalDamaged):
                raise AuditDamaged(str(exc)) from None
            raise
        log.error("%s; mounting without auditing (audit.on_failure is allow)", exc)
        return None
    journal.record(Event.KEY_FETCH, daemon_caller(), None)
    return journal


def _close_journal(journal: AuditJournal) -> None:
    try:
        journal.close()
    except AuditUnavailable as exc:
        log.error("%s", exc)


def _log_recovery(report: RecoveryReport) -> None:
    for path in report.repaired:
        log.info("crash recovery repaired backing file %s", path)
    for path in report.damaged:
        log.warning("crash recovery found damage it cannot repair in backing file %s", path)
    if report.missing:
        log.warning(
            "crash recovery could not find %d file(s) named in the intent log", report.missing
        )


def _record_pid(store: Path) -> None:
    """Write our process id into the store's lock file, for ``dermfs umount``."""
    fd = os.open(store / format.LOCK_FILE, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


async def _main(
    operations: DermfsOperations,
    mountpoint: Path,
    readiness: Readiness,
    journal: AuditJournal | None,
) -> None:
    async with trio.open_nursery() as nursery:
        if journal is not None:
            nursery.start_soon(flush_periodically, journal, 1.0)
        nursery.start_soon(_watch_signals, mountpoint)
        nursery.start_soon(_announce, mountpoint, readiness, operations.cache.read_ahead_kb)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _announce(mountpoint: Path, readiness: Readiness, read_ahead_kb: int) -> None:
    await trio.to_thread.run_sync(_wait_answering, mountpoint)
    if read_ahead_kb:
        await trio.to_thread.run_sync(_set_read_ahead, mountpoint, read_ahead_kb)
    log.info("mounted on %s", mountpoint)
    readiness.ready()
    daemon.notify_systemd(f"READY=1\nMAINPID={os.getpid()}")


def _wait_answering(mountpoint: Path) -> None:
    deadline = time.monotonic() + READY_WAIT_SECONDS
    while True:
        entry = find_mount(mountpoint)
        if entry is not None and entry.fstype == FSTYPE:
            os.stat(mountpoint)  # answered by our own getattr
            return
        if time.monotonic() > deadline:
            raise MountError(f"the mount on {mountpoint} did not appear")
        time.sleep(0.01)


def _set_read_ahead(mountpoint: Path, read_ahead_kb: int) -> None:
    """Widen the mount's read-ahead, so that sequential reads come in large requests."""
    device = os.stat(mountpoint).st_dev
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w", encoding="ascii") as setting:
            setting.write(str(read_ahead_kb))
    except OSError as exc:
        log.debug("could not set %s: %s", path, exc.strerror)


async def _watch_signals(mountpoint: Path) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        received = 0
        async for signum in signals:
            received += 1
            daemon.notify_systemd("STOPPING=1")
            if received > 1:
                log.warning("signal %d again: stopping without waiting for users", signum)
                pyfuse3.terminate()
                return
            log.info("signal %d: unmounting %s", signum, mountpoint)
            if not await trio.to_thread.run_sync(_fusermount, mountpoint, False):
                log.warning("mount is busy; detaching it, serving its users until they are done")
                await trio.to_thread.run_sync(_fusermount, mountpoint, True)


def _fusermount(mountpoint: Path, lazy: bool) -> bool:
    command = [FUSERMOUNT, "-u", *(["-z"] if lazy else []), str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.debug("%s failed: %s", " ".join(command), result.stderr.strip())
    return result.returncode == 0


# ------------------------------------------------------------------------------ checks


def check_fuse_available() -> None:
    """Raise MountError unless ``/dev/fuse`` and ``fusermount3`` are there."""
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "/dev/fuse is missing: load the fuse kernel module, or give the container the device"
        )
    if shutil.which(FUSERMOUNT) is None:
        raise MountError(f"{FUSERMOUNT} is missing: install the fuse3 package")


def check_mountpoint(mountpoint: Path) -> None:
    """Raise MountError unless *mountpoint* is an empty directory with nothing mounted."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mount point {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"mount point {mountpoint} is a FUSE mount whose daemon is gone; "
                f"run {FUSERMOUNT} -u {mountpoint}"
            ) from None
        raise MountError(f"mount point {mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {mountpoint} is not a directory")
    if find_mount(mountpoint) is not None:
        raise MountError(f"mount point {mountpoint} is already mounted")
    try:
        entries = os.listdir(mountpoint)
    except OSError as exc:
        raise MountError(f"mount point {mountpoint}: {exc.strerror}") from None
    if entries:
        raise MountError(f"mount point {mountpoint} is not empty")


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mountpoint: Path
    fstype: str
    source: str


def find_mount(mountpoint: Path) -> MountEntry | None:
    """Return the topmost mount on *mountpoint*, or ``None``."""
    wanted = os.path.abspath(mountpoint)
    found = None
    for entry in read_mounts():
        if str(entry.mountpoint) == wanted:
            found = entry
    return found


def read_mounts() -> list[MountEntry]:
    """Return the mounts of this process's mount namespace."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as lines:
        for line in lines:
            fields = line.split()
            if "-" not in fields[6:]:
                continue
            separator = fields.index("-", 6)
            entries.append(
                MountEntry(
                    Path(_unescape(fields[4])),
                    _unescape(fields[separator + 1]),
                    _unescape(fields[separator + 2]),
                )
            )
    return entries


def _unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of ``/proc/self/mountinfo``."""
    if "\\" not in field:
        return field
    raw = field.encode("utf-8", "surrogateescape")
    out = bytearray()
    index = 0
    while index < len(raw):
        if raw[index : index + 1] == b"\\" and raw[index + 1 : index + 4].isdigit():
            out.append(int(raw[index + 1 : index + 4], 8))
            index += 4
        else:
            out.append(raw[index])
            index += 1
    return out.decode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------------ umount


def run_umount(mountpoint: Path) -> int:
    """Unmount a dermfs mount and wait until its daemon has exited.

    Raises:
        MountError: *mountpoint* is not a dermfs mount, is busy, or the daemon did not
            exit in time.
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    entry = find_mount(mountpoint)
    if entry is None:
        raise MountError(f"{mountpoint} is not mounted")
    if entry.fstype != FSTYPE:
        raise MountError(f"{mountpoint} is not a dermfs mount (it is {entry.fstype})")
    if shutil.which(FUSERMOUNT) is None:
        raise MountError(f"{FUSERMOUNT} is missing: install the fuse3 package")

    store = store_of_fsname(entry.source)
    pid = _daemon_pid(store)
    result = subprocess.run(
        [FUSERMOUNT, "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        reason = lines[-1].rpartition(": ")[2] if lines else f"exit status {result.returncode}"
        raise MountError(f"cannot unmount {mountpoint}: {reason.lower()}")

    _wait_for_daemon(store, pid)
    return exitcodes.OK


def _daemon_pid(store: Path) -> int | None:
    try:
        text = (store / format.LOCK_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _wait_for_daemon(store: Path, pid: int | None) -> None:
    """Wait until the daemon has exited; without its pid, until the store lock is free.

    A pid whose process keeps running long after the lock was released is not the
    daemon's (the lock file held a stale pid), and is not waited for.
    """
    deadline = time.monotonic() + UMOUNT_WAIT_SECONDS
    lock_free_since: float | None = None
    while True:
        now = time.monotonic()
        if pid is not None and not _process_alive(pid):
            return
        if _lock_free(store):
            if pid is None:
                return
            lock_free_since = lock_free_since or now
            if now - lock_free_since > STALE_PID_SECONDS:
                return
        else:
            lock_free_since = None
        if now > deadline:
            raise MountError(
                f"unmounted, but the dermfs daemon is still busy after {UMOUNT_WAIT_SECONDS:.0f} s"
            )
        time.sleep(0.02)


def _process_alive(pid: int) -> bool:
    """Tell whether *pid* runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
            fields = stat_file.read().rpartition(")")[2].split()
    except OSError:
        return False
    return bool(fields) and fields[0] not in ("Z", "X")


def _lock_free(store: Path) -> bool:
    """Tell whether no process holds the store lock (so its volume is closed)."""
    try:
        fd = os.open(store / format.LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
