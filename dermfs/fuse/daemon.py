"""Becoming a daemon: fork, readiness pipe, systemd notification, logs, core dumps.

Without ``-f``, ``dermfs mount`` unlocks the volume in the foreground (so that a
passphrase prompt and a wrong key are seen there), then forks. The child detaches from
the terminal and mounts; the parent waits on a pipe for one line from it:

- ``READY`` once the mount answers a ``stat``: the parent exits 0;
- ``ERROR <exception class> <message>``: the parent raises that
  :class:`~dermfs.errors.DermfsError` subclass, which the command line prints as one line
  with its exit code;
- nothing (the pipe closes): the child died; the parent reports its exit status.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import logging.handlers
import os
import resource
import socket
import sys
from dataclasses import dataclass

from dermfs import errors
from dermfs.errors import DermfsError, MountError

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_READY = "READY"
_ERROR = "ERROR"


def disable_core_dumps() -> None:
    """Make sure the daemon's memory (and the keys in it) never lands in a core file."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_DUMPABLE) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):
        log.debug("prctl is not available")


def notify_systemd(state: str) -> None:
    """Send *state* (such as ``READY=1``) to ``$NOTIFY_SOCKET`` if systemd set one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc.strerror)


@dataclass
class Readiness:
    """The child's end of the readiness pipe (``None`` in the foreground)."""

    fd: int | None = None

    def ready(self) -> None:
        """Tell the waiting parent that the mount answers."""
        self._send(_READY)

    def failed(self, exc: DermfsError) -> None:
        """Tell the waiting parent why mounting failed."""
        message = " ".join(str(exc).split()) or type(exc).__name__
        self._send(f"{_ERROR} {type(exc).__name__} {message}")

    def _send(self, line: str) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, (line + "\n").encode("utf-8", "replace"))
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


def fork_daemon() -> Readiness | None:
    """Fork; return the child's :class:`Readiness` in the child, ``None`` in the parent.

    In the parent this returns only after the child has reported: on ``READY`` it returns
    ``None``; on an error it raises it.

    Raises:
        DermfsError: the child failed to mount (the class the child reported).
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        return Readiness(write_fd)

    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline().decode("utf-8", "replace").rstrip("\n")
    if line == _READY:
        return None
    if line.startswith(_ERROR + " "):
        os.waitpid(pid, 0)
        _kind, _, rest = line.partition(" ")
        class_name, _, message = rest.partition(" ")
        raise _error_class(class_name)(message)

    _pid, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise MountError(f"the dermfs daemon was killed by signal {os.WTERMSIG(status)}")
    raise MountError(f"the dermfs daemon exited with status {os.waitstatus_to_exitcode(status)}")


def _error_class(name: str) -> type[DermfsError]:
    candidate = getattr(errors, name, None)
    if isinstance(candidate, type) and issubclass(candidate, DermfsError):
        return candidate
    return MountError


def detach(log_target: str) -> None:
    """Leave the terminal: standard streams to ``/dev/null``, logs to syslog or a file.

    Args:
        log_target: ``syslog``, or a file that standard error is appended to.
    """
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if log_target == "syslog":
        os.dup2(null, 2)
        _log_to_syslog()
    else:
        fd = os.open(log_target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    os.close(null)


def _log_to_syslog() -> None:
    if not os.path.exists("/dev/log"):
        return
    try:
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
    except OSError:
        return
    handler.setFormatter(logging.Formatter(f"dermfs[{os.getpid()}]: %(name)s: %(message)s"))
    handler.setLevel(logging.getLogger("dermfs").getEffectiveLevel())
    logging.getLogger().addHandler(handler)
