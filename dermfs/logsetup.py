"""Logging for the ``dermfs`` command: one line per record on standard error.

On a terminal or in a file a record reads ``WARNING: dermfs.content: message``. Under
systemd (``JOURNAL_STREAM`` or ``INVOCATION_ID`` set) it reads
``<4>dermfs.content: message``: the ``<N>`` prefix is the syslog priority, which journald
turns into the record's priority. Neither form has a timestamp; journald adds its own.

Tracebacks attached to records are left out unless ``DERMFS_DEBUG=1``, so that a log
line never turns into a traceback on a user's screen.

The audit journal is a separate channel (:mod:`dermfs.audit`), not this one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType

#: syslog priorities (RFC 5424) of the logging levels.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
    (logging.DEBUG, 7),
)
_PACKAGE_LOGGER = "dermfs"

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """Tell whether this process runs as a systemd service, with stderr going to journald."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


def debug_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Tell whether ``DERMFS_DEBUG=1`` asks for tracebacks."""
    environ = os.environ if environ is None else environ
    return environ.get("DERMFS_DEBUG") == "1"


def level_for(verbosity: int) -> int:
    """Return the level of the ``dermfs`` loggers for ``-v`` given *verbosity* times."""
    if verbosity >= 2:
        return logging.DEBUG
    if verbosity == 1:
        return logging.INFO
    return logging.WARNING


class StderrFormatter(logging.Formatter):
    """Formats a record as one line, with a level name or a syslog priority in front."""

    def __init__(self, *, syslog_prefix: bool, tracebacks: bool) -> None:
        super().__init__("%(name)s: %(message)s")
        self._syslog_prefix = syslog_prefix
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as ``LEVEL: name: message`` or ``<N>name: message``."""
        text = super().format(record)
        if self._syslog_prefix:
            return f"<{_priority(record.levelno)}>{text}"
        return f"{record.levelname}: {text}"

    def formatException(self, ei: _ExcInfo) -> str:
        """Return the traceback only when tracebacks were asked for."""
        return super().formatException(ei) if self._tracebacks else ""

    def formatStack(self, stack_info: str) -> str:
        """Return the stack only when tracebacks were asked for."""
        return stack_info if self._tracebacks else ""


def _priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


@contextmanager
def logging_to_stderr(
    verbosity: int = 0, environ: Mapping[str, str] | None = None
) -> Iterator[logging.Handler]:
    """Send log records to standard error while the ``with`` block runs.

    On leaving, the handler is removed and the ``dermfs`` logger's level restored, so
    that the command can also be run in-process (in tests) without leaving state behind.

    Args:
        verbosity: how many times ``-v`` was given: 0 shows warnings and errors, 1 adds
            information, 2 adds debugging detail.
        environ: the environment to read (``os.environ`` if ``None``).

    Yields:
        The handler installed on the root logger.
    """
    level = level_for(verbosity)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(
        StderrFormatter(syslog_prefix=under_systemd(environ), tracebacks=debug_enabled(environ))
    )
    root = logging.getLogger()
    package = logging.getLogger(_PACKAGE_LOGGER)
    saved_level = package.level

    root.addHandler(handler)
    if level < package.getEffectiveLevel():
        package.setLevel(level)
    try:
        yield handler
    finally:
        package.setLevel(saved_level)
        root.removeHandler(handler)
        handler.close()
