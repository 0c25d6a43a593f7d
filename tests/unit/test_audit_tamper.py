"""Each way of tampering with the audit journal is caught by verify, which names it.

For every case, verify must fail, name the first bad record and say the kind of damage;
an untouched journal must verify. The writer must also refuse to append to a journal
that no longer matches its checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from dermfs.audit import AuditJournal, DamageKind, Event, JournalDamaged, ProcessCaller, verify
from dermfs.audit.layout import FRAME_HEADER, SEGMENT_HEADER_SIZE, JournalFiles
from dermfs.audit.verify import VerifyResult
from dermfs.cryptocore import random_id, random_key

PATIENT_ID = re.compile(r"^patients/(?P<patient>[^/]+)/")
CALLER = ProcessCaller(1001, 1001, 4242)
RECORDS = 30


class Volume:
    """A journal of *RECORDS* records, flushed every five, closed cleanly."""

    def __init__(self, directory: Path, records: int = RECORDS, max_bytes: int = 1 << 26) -> None:
        directory.mkdir()
        self.path = directory / "clinic.audit"
        self.volume_id = random_id()
        self.audit_key = random_key()
        self.max_bytes = max_bytes
        self.write(records)

    def open(self) -> AuditJournal:
        return AuditJournal.open(
            self.path,
            self.volume_id,
            self.audit_key,
            patient_id=PATIENT_ID,
            max_bytes=self.max_bytes,
        )

    def write(self, records: int) -> None:
        journal = self.open()
        for number in range(records):
            journal.record(Event.OPEN, CALLER, f"patients/{number % 4}/image{number}.jpg")
            if number % 5 == 4:
                journal.flush()
        journal.close()

    def verify(self) -> VerifyResult:
        return verify(self.path, self.volume_id, self.audit_key)


def frames(path: Path) -> list[tuple[int, int, int]]:
    """Return ``(start, end, seq)`` of every frame of a segment file."""
    data = path.read_bytes()
    found = []
    position = SEGMENT_HEADER_SIZE
    while position < len(data):
        length, _flags, seq, _journal_id = FRAME_HEADER.unpack_from(data, position)
        end = position + FRAME_HEADER.size + length
        found.append((position, end, seq))
        position = end
    return found


def frame_of(path: Path, seq: int) -> tuple[int, int]:
    [(start, end)] = [(start, end) for start, end, number in frames(path) if number == seq]
    return start, end


def assert_damage(result: VerifyResult, kind: DamageKind, seq: int | None) -> None:
    assert result.damage is not None, "verify did not find the damage"
    assert (result.damage.kind, result.damage.seq) == (kind, seq), result.summary()
    line = result.summary()
    assert "\n" not in line
    assert str(kind) in line
    if seq is not None:
        assert f"record {seq}" in line or "segment" in line


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    return Volume(tmp_path / "a")


def test_untouched_journal_verifies(volume: Volume) -> None:
    result = volume.verify()

    assert result.intact, result.summary()
    assert (result.records, result.last_seq, result.clean) == (RECORDS, RECORDS, True)
    assert result.summary().startswith("audit journal intact: 30 records")


def test_flipped_byte_in_a_record(volume: Volume) -> None:
    start, end = frame_of(volume.path, 7)
    data = bytearray(volume.path.read_bytes())
    data[(start + end) // 2] ^= 0x01
    volume.path.write_bytes(data)

    assert_damage(volume.verify(), DamageKind.TAMPERED, 7)


def test_flipped_byte_in_a_frame_header(volume: Volume) -> None:
    start, _end = frame_of(volume.path, 12)
    data = bytearray(volume.path.read_bytes())
    data[start + 12] ^= 0x40  # the low byte of the clear seq
    volume.path.write_bytes(data)

    assert_damage(volume.verify(), DamageKind.TAMPERED, 12)


def test_deleted_record(volume: Volume) -> None:
    start, end = frame_of(volume.path, 9)
    data = volume.path.read_bytes()
    volume.path.write_bytes(data[:start] + data[end:])

    assert_damage(volume.verify(), DamageKind.MISSING, 9)


def test_swapped_records(volume: Volume) -> None:
    start7, end7 = frame_of(volume.path, 7)
    start8, end8 = frame_of(volume.path, 8)
    data = volume.path.read_bytes()
    volume.path.write_bytes(data[:start7] + data[start8:end8] + data[start7:end7] + data[end8:])

    assert_damage(volume.verify(), DamageKind.REORDERED, 8)


def test_duplicated_record(volume: Volume) -> None:
    start, end = frame_of(volume.path, 4)
    data = volume.path.read_bytes()
    volume.path.write_bytes(data[:end] + data[start:end] + data[end:])

    assert_damage(volume.verify(), DamageKind.REORDERED, 4)


def test_truncated_tail(volume: Volume) -> None:
    data = volume.path.read_bytes()
    volume.path.write_bytes(data[:-10])

    assert_damage(volume.verify(), DamageKind.TRUNCATED, RECORDS)


def test_tail_cut_inside_a_group_commit(volume: Volume) -> None:
    start, _end = frame_of(volume.path, RECORDS - 2)
    volume.path.write_bytes(volume.path.read_bytes()[:start])

    assert_damage(volume.verify(), DamageKind.TRUNCATED, RECORDS - 2)


def test_older_copy_of_itself(volume: Volume, tmp_path: Path) -> None:
    old = tmp_path / "old.audit"
    shutil.copy2(volume.path, old)
    volume.write(10)
    assert volume.verify().intact

    shutil.copy2(old, volume.path)

    assert_damage(volume.verify(), DamageKind.ROLLED_BACK, RECORDS + 1)
    with pytest.raises(JournalDamaged) as caught:
        volume.open()
    assert caught.value.damage.kind is DamageKind.ROLLED_BACK


def test_records_spliced_from_another_volumes_journal(volume: Volume, tmp_path: Path) -> None:
    other = Volume(tmp_path / "b")
    start, end = frame_of(other.path, 7)
    foreign = other.path.read_bytes()[start:end]
    ours_start, _ours_end = frame_of(volume.path, 7)
    data = volume.path.read_bytes()

    volume.path.write_bytes(data[:ours_start] + foreign + data[ours_start:])

    assert_damage(volume.verify(), DamageKind.FOREIGN, 7)


def test_foreign_record_replacing_one_of_ours(volume: Volume, tmp_path: Path) -> None:
    other = Volume(tmp_path / "b")
    start, end = frame_of(other.path, 7)
    ours_start, ours_end = frame_of(volume.path, 7)
    data = volume.path.read_bytes()

    volume.path.write_bytes(
        data[:ours_start] + other.path.read_bytes()[start:end] + data[ours_end:]
    )

    assert_damage(volume.verify(), DamageKind.FOREIGN, 7)


def test_foreign_records_appended_after_a_clean_close(volume: Volume, tmp_path: Path) -> None:
    other = Volume(tmp_path / "b")
    start, end = frame_of(other.path, RECORDS)
    with open(volume.path, "ab") as file:
        file.write(other.path.read_bytes()[start:end])

    assert_damage(volume.verify(), DamageKind.FOREIGN, RECORDS + 1)
    with pytest.raises(JournalDamaged):
        volume.open()


def test_changed_checkpoint(volume: Volume) -> None:
    checkpoint = JournalFiles(volume.path).checkpoint
    checkpoint.write_bytes(checkpoint.read_bytes().replace(b'"last_seq": 30', b'"last_seq": 31'))

    assert_damage(volume.verify(), DamageKind.TAMPERED, None)
    with pytest.raises(JournalDamaged):
        volume.open()


def test_missing_checkpoint(volume: Volume) -> None:
    JournalFiles(volume.path).checkpoint.unlink()

    assert_damage(volume.verify(), DamageKind.MISSING, None)
    with pytest.raises(JournalDamaged):
        volume.open()


def test_missing_key_file(volume: Volume) -> None:
    JournalFiles(volume.path).state.unlink()

    assert_damage(volume.verify(), DamageKind.MISSING, None)
    with pytest.raises(JournalDamaged):
        volume.open()


def test_journal_that_is_not_there(tmp_path: Path) -> None:
    result = verify(tmp_path / "none.audit", random_id(), random_key())

    assert_damage(result, DamageKind.MISSING, None)


def test_other_volumes_key_does_not_verify(volume: Volume) -> None:
    result = verify(volume.path, random_id(), volume.audit_key)

    assert result.damage is not None


# ------------------------------------------------------------------------------ segments


@pytest.fixture
def rotated(tmp_path: Path) -> Volume:
    volume = Volume(tmp_path / "r", records=60, max_bytes=1500)
    assert len(JournalFiles(volume.path).sealed_segments()) >= 4
    assert volume.verify().intact
    return volume


def segment_first_seq(path: Path) -> int:
    return frames(path)[0][2]


def test_missing_middle_segment(rotated: Volume) -> None:
    sealed = JournalFiles(rotated.path).sealed_segments()
    second = sealed[2]
    first_seq = segment_first_seq(second)
    second.unlink()

    assert_damage(rotated.verify(), DamageKind.MISSING, first_seq)


def test_missing_last_sealed_segment(rotated: Volume) -> None:
    sealed = JournalFiles(rotated.path).sealed_segments()
    last = sealed[max(sealed)]
    first_seq = segment_first_seq(last)
    last.unlink()

    assert_damage(rotated.verify(), DamageKind.MISSING, first_seq)
    with pytest.raises(JournalDamaged):
        rotated.open()


def test_missing_first_segment(rotated: Volume) -> None:
    JournalFiles(rotated.path).sealed_segments()[1].unlink()

    assert_damage(rotated.verify(), DamageKind.MISSING, 1)


def test_swapped_segment_files(rotated: Volume, tmp_path: Path) -> None:
    sealed = JournalFiles(rotated.path).sealed_segments()
    spare = tmp_path / "spare"
    sealed[2].rename(spare)
    sealed[3].rename(sealed[2])
    spare.rename(sealed[3])

    result = rotated.verify()

    assert result.damage is not None
    assert result.damage.kind is DamageKind.REORDERED


def test_flipped_byte_in_a_sealed_segment(rotated: Volume) -> None:
    sealed = JournalFiles(rotated.path).sealed_segments()
    _start, end, seq = frames(sealed[2])[1]
    data = bytearray(sealed[2].read_bytes())
    data[end - 3] ^= 0x80
    sealed[2].write_bytes(data)

    assert_damage(rotated.verify(), DamageKind.TAMPERED, seq)


def test_truncated_sealed_segment(rotated: Volume) -> None:
    sealed = JournalFiles(rotated.path).sealed_segments()
    start, _end, seq = frames(sealed[2])[-1]
    sealed[2].write_bytes(sealed[2].read_bytes()[:start])

    result = rotated.verify()

    assert result.damage is not None
    assert result.damage.kind in (DamageKind.TRUNCATED, DamageKind.ROLLED_BACK)
    assert result.damage.seq == seq
