"""Exceptions of the audit journal, and the description of damage that verify finds."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from dermfs.errors import AuditDamaged, AuditUnavailable

__all__ = ["AuditUnavailable", "Damage", "DamageKind", "JournalDamaged"]


class DamageKind(enum.StrEnum):
    """What verify found wrong (docs/audit.md section 10)."""

    TAMPERED = "tampered"
    MISSING = "missing"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    ROLLED_BACK = "rolled-back"
    FOREIGN = "foreign"


@dataclass(frozen=True)
class Damage:
    """The first bad thing in a journal.

    Attributes:
        kind: what kind of damage.
        seq: the seq of the first bad record (for a missing record, the seq that is
            missing), or ``None`` when the damage is not in a record (checkpoint, key file).
        file: the journal file where it was found, if any.
        offset: the byte offset in *file*, if any.
        what: a short description, with no patient data in it.
    """

    kind: DamageKind
    seq: int | None
    file: Path | None
    offset: int | None
    what: str

    def describe(self) -> str:
        """Return one line naming the first bad record and the kind."""
        where = ""
        if self.file is not None:
            where = f" in {self.file}"
            if self.offset is not None:
                where += f" at byte {self.offset}"
        return f"{self.what}{where} ({self.kind})"


class JournalDamaged(AuditDamaged):
    """The journal was found damaged; *damage* says where and how.

    Raised by :meth:`AuditJournal.open`, which refuses to write over the evidence, and by
    the readers behind ``query`` and ``report`` after the last intact record.
    """

    def __init__(self, damage: Damage) -> None:
        super().__init__(f"audit journal damaged: {damage.describe()}")
        self.damage = damage
