"""Forwarding records to syslog (``audit.syslog: true``, docs/audit.md section 12).

Records carry no file content, but they do carry paths and patient ids, so they go to
facility ``authpriv``, which Debian's rsyslog writes only to root-readable files.
"""

from __future__ import annotations

import logging
import syslog
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)

IDENT = "dermfs-audit"


class Forwarder(Protocol):
    """Where durable records are copied at each flush."""

    def send(self, records: Sequence[str], checkpoint: str) -> None:
        """Send the JSON of each record, then one checkpoint line. Must not raise."""
        ...


class SyslogForwarder:
    """Sends records to the local syslog with :func:`syslog.syslog` (journald gets them)."""

    def __init__(self, facility: int = syslog.LOG_AUTHPRIV) -> None:
        syslog.openlog(IDENT, syslog.LOG_PID, facility)

    def __repr__(self) -> str:
        return "<SyslogForwarder>"

    def send(self, records: Sequence[str], checkpoint: str) -> None:
        """Send each record and the checkpoint line at priority ``info``."""
        try:
            for record in records:
                syslog.syslog(syslog.LOG_INFO, record)
            syslog.syslog(syslog.LOG_INFO, checkpoint)
        except (OSError, ValueError) as exc:
            log.debug("audit journal: syslog forwarding failed: %s", exc)


def checkpoint_line(journal_id: bytes, last_seq: int, last_tag: bytes) -> str:
    """Return the line that anchors the journal's tail off the host."""
    return f"checkpoint journal={journal_id.hex()} last_seq={last_seq} last_tag={last_tag.hex()}"
