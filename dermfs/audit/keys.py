"""The journal key: made at first use, kept wrapped in ``P.state`` (docs/audit.md section 2).

The journal key is random, not derived from the volume key, so that rotating the volume
key only rewraps the state file (:func:`rewrap_journal_key`) and leaves the records and
their chain alone.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from dermfs.audit.layout import STATE_FORMAT, VERSION, JournalFiles
from dermfs.cryptocore import (
    Aead,
    Mac,
    SecretKey,
    expand_subkey,
    random_key,
    unwrap_key,
    wrap_key,
)
from dermfs.errors import IntegrityError, WrongKeyError

_WRAP_LABEL = b"dermfs v1 audit journal key wrapping"
_RECORD_LABEL = b"dermfs v1 audit record seal"
_CHECKPOINT_LABEL = b"dermfs v1 audit checkpoint mac"
_SEGMENT_LABEL = b"dermfs v1 audit segment header mac"


class JournalKeys:
    """The ciphers of one journal, derived from its journal key."""

    __slots__ = ("checkpoint_mac", "journal_id", "record_aead", "segment_mac")

    def __init__(self, journal_key: SecretKey, journal_id: bytes) -> None:
        self.journal_id = journal_id
        self.record_aead = Aead(expand_subkey(journal_key, _RECORD_LABEL))
        self.checkpoint_mac = Mac(expand_subkey(journal_key, _CHECKPOINT_LABEL))
        self.segment_mac = Mac(expand_subkey(journal_key, _SEGMENT_LABEL))

    def __repr__(self) -> str:
        return f"<JournalKeys {self.journal_id.hex()}>"


def _wrapping_key(audit_key: SecretKey) -> SecretKey:
    return expand_subkey(audit_key, _WRAP_LABEL)


def _state_bytes(journal_id: bytes, wrapped: bytes, created: str) -> bytes:
    body = {
        "format": STATE_FORMAT,
        "version": VERSION,
        "journal_id": journal_id.hex(),
        "wrapped_key": base64.urlsafe_b64encode(wrapped).rstrip(b"=").decode(),
        "created": created,
    }
    return json.dumps(body, indent=1).encode() + b"\n"


def write_private_file(path: Path, temporary: Path, data: bytes) -> None:
    """Write *data* to *path* atomically, mode 0600: temporary file, fsync, rename, fsync."""
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new name in *directory* durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_journal_key(
    files: JournalFiles, journal_id: bytes, audit_key: SecretKey, created: str
) -> JournalKeys:
    """Make a new journal key and store it wrapped in the state file.

    Raises:
        OSError: the state file could not be written.
    """
    journal_key = random_key()
    try:
        wrapped = wrap_key(_wrapping_key(audit_key), journal_key, journal_id)
        write_private_file(files.state, files.state_tmp, _state_bytes(journal_id, wrapped, created))
        return JournalKeys(journal_key, journal_id)
    finally:
        journal_key.wipe()


def _read_state(files: JournalFiles, journal_id: bytes) -> tuple[bytes, str]:
    """Return the wrapped key and creation time of the state file.

    Raises:
        FileNotFoundError: there is no state file.
        IntegrityError: it is malformed or belongs to another journal.
    """
    data = files.state.read_bytes()
    try:
        obj = json.loads(data)
        if obj["format"] != STATE_FORMAT or obj["version"] != VERSION:
            raise IntegrityError("audit state file is of an unknown format")
        if bytes.fromhex(obj["journal_id"]) != journal_id:
            raise IntegrityError("audit state file belongs to another volume's journal")
        text = obj["wrapped_key"]
        wrapped = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return wrapped, str(obj["created"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError("audit state file is malformed") from None


def load_journal_key(files: JournalFiles, journal_id: bytes, audit_key: SecretKey) -> JournalKeys:
    """Unwrap the journal key from the state file.

    Raises:
        FileNotFoundError: there is no state file.
        IntegrityError: the state file is malformed, was changed, or belongs to another
            volume, or *audit_key* is not the one it was wrapped under.
    """
    wrapped, _created = _read_state(files, journal_id)
    journal_key = unwrap_key(_wrapping_key(audit_key), wrapped, journal_id)
    try:
        return JournalKeys(journal_key, journal_id)
    finally:
        journal_key.wipe()


def rewrap_journal_key(
    journal: Path, journal_id: bytes, old_audit_key: SecretKey, new_audit_key: SecretKey
) -> None:
    """Rewrap the journal key under a new audit subkey, after a volume-key rotation.

    The records, the chain and the checkpoint are not touched. Safe to repeat: a state
    file already wrapped under *new_audit_key* is left as it is.

    Raises:
        WrongKeyError: neither key unwraps the state file.
        FileNotFoundError: the journal has no state file.
        OSError: the state file could not be rewritten.
    """
    files = JournalFiles(journal)
    wrapped, created = _read_state(files, journal_id)
    try:
        unwrap_key(_wrapping_key(new_audit_key), wrapped, journal_id).wipe()
        return
    except IntegrityError:
        pass
    try:
        journal_key = unwrap_key(_wrapping_key(old_audit_key), wrapped, journal_id)
    except IntegrityError:
        raise WrongKeyError("the audit journal key does not unwrap under the old key") from None
    try:
        rewrapped = wrap_key(_wrapping_key(new_audit_key), journal_key, journal_id)
    finally:
        journal_key.wipe()
    write_private_file(files.state, files.state_tmp, _state_bytes(journal_id, rewrapped, created))
