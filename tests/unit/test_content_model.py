"""Model tests of ContentFile: random writes, truncates and reopens against a bytearray.

Hypothesis drives a state machine over one backing file. After every step the file read
back whole equals the model, ``size`` equals the model's length, the backing file has
exactly the size ``docs/format.md`` section 4.3 gives for that length, and every chunk
authenticates with the right index and final flag.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from dermfs import content
from dermfs.content import ContentFile
from dermfs.volume import Volume, create_store


def positions(chunk_size: int) -> st.SearchStrategy[int]:
    """Offsets and sizes: anywhere in a few chunks, next to a boundary, or far out."""
    near_boundary = st.builds(
        lambda count, delta: max(0, count * chunk_size + delta),
        st.integers(0, 8),
        st.integers(-2, 2),
    )
    return st.one_of(
        st.integers(0, 3 * chunk_size),
        near_boundary,
        st.integers(0, 20 * chunk_size),
    )


def lengths(chunk_size: int) -> st.SearchStrategy[int]:
    """Write lengths: tiny, one chunk give or take a byte, or several chunks."""
    return st.one_of(
        st.integers(1, 16),
        st.sampled_from([chunk_size - 1, chunk_size, chunk_size + 1, 2 * chunk_size]),
        st.integers(1, 3 * chunk_size + 5),
    )


def content_machine(provider: Any, base: Path, chunk_size: int) -> type[RuleBasedStateMachine]:
    """Return a state machine class over one file of a new store under *base*."""

    class ContentModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.directory = Path(tempfile.mkdtemp(dir=base))
            create_store(self.directory, provider, chunk_size)
            self.volume = Volume.open(self.directory, provider)
            self.volume.start_writing()
            self.fd = os.open(self.directory / "file", os.O_RDWR | os.O_CREAT, 0o600)
            self.inode = os.fstat(self.fd).st_ino
            self.file: ContentFile = self.volume.create_file(self.fd, self.inode, "file")
            self.keys = self.volume.read_file_keys(self.fd)
            self.model = bytearray()
            self.changed_since_clean = False

        @rule(offset=positions(chunk_size), length=lengths(chunk_size), seed=st.integers(0))
        def write(self, offset: int, length: int, seed: int) -> None:
            data = random.Random(seed).randbytes(length)

            assert self.file.write(offset, data) == length

            if offset > len(self.model):
                self.model.extend(bytes(offset - len(self.model)))
            self.model[offset : offset + length] = data
            self.changed_since_clean = True

        @rule(size=positions(chunk_size))
        def truncate(self, size: int) -> None:
            self.file.truncate(size)

            if size != len(self.model):
                self.changed_since_clean = True
            if size < len(self.model):
                del self.model[size:]
            else:
                self.model.extend(bytes(size - len(self.model)))

        @rule(offset=positions(chunk_size), length=st.integers(0, 3 * chunk_size))
        def read(self, offset: int, length: int) -> None:
            assert self.file.read(offset, length) == self.model[offset : offset + length]

        @rule()
        def checkpoint(self) -> None:
            self.file.checkpoint()
            self.check_clean()

        @rule(datasync=st.booleans())
        def sync(self, datasync: bool) -> None:
            self.file.sync(datasync)
            self.check_clean()

        @rule()
        def reopen(self) -> None:
            self.file = self.volume.open_file(self.fd, self.inode, "file")
            self.changed_since_clean = False

        def check_clean(self) -> None:
            assert self.volume.intent is not None
            if self.changed_since_clean:
                assert self.inode not in self.volume.intent.dirty_inodes
            self.changed_since_clean = False

        @invariant()
        def matches_model(self) -> None:
            size = len(self.model)
            assert self.file.size == size
            assert os.fstat(self.fd).st_size == self.volume.geometry.backing_size(size)
            assert self.file.read(0, size + 1) == self.model
            errors = [error for _index, error in content.iter_chunks(self.fd, self.keys)]
            assert errors == [None] * self.volume.geometry.chunk_count(size)

        def teardown(self) -> None:
            try:
                self.file.checkpoint()
                intent = self.volume.intent
                # A reopen drops an object without a checkpoint; its dirty mark stays.
                if intent is not None and self.inode in intent.dirty_inodes:
                    intent.clean(self.inode)
                os.close(self.fd)
                self.volume.close()
            finally:
                shutil.rmtree(self.directory)

    return ContentModel


@pytest.mark.parametrize(
    ("chunk_size", "max_examples"),
    [(4096, 120), (65536, 25)],
)
def test_content_file_matches_a_bytearray(
    key_provider: Any, tmp_path: Path, chunk_size: int, max_examples: int
) -> None:
    machine = content_machine(key_provider, tmp_path, chunk_size)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
