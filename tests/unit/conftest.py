"""Fixtures for the unit tests: an in-memory key provider and ready-made volumes.

The provider keeps its key-encryption key in memory, so these tests need neither a key
file nor a passphrase, and do not depend on the real ``local`` provider.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dermfs import format
from dermfs.cryptocore import SecretKey, random_key, unwrap_key, wrap_key
from dermfs.errors import IntegrityError, WrongKeyError
from dermfs.keys.base import WrappedKey
from dermfs.volume import Volume, create_store

#: The ``local`` provider's wrapping AAD prefix (docs/format.md section 2.1).
_WRAP_AAD = b"dermfs v1 local wrap"


class MemoryKeyProvider:
    """A key provider whose key-encryption key lives only in this object."""

    name = "local"

    def __init__(self) -> None:
        self._kek = random_key()

    def describe(self) -> str:
        return "an in-memory test key"

    def wrap(self, volume_key: SecretKey, volume_id: bytes) -> WrappedKey:
        blob = wrap_key(self._kek, volume_key, _WRAP_AAD + volume_id)
        return WrappedKey(self.name, "keyfile", 1, blob)

    def unwrap(self, wrapped: WrappedKey, volume_id: bytes) -> SecretKey:
        try:
            return unwrap_key(self._kek, wrapped.blob, _WRAP_AAD + volume_id)
        except IntegrityError:
            raise WrongKeyError("not this volume's key") from None


@pytest.fixture
def key_provider() -> MemoryKeyProvider:
    """A fresh in-memory key provider."""
    return MemoryKeyProvider()


@pytest.fixture
def make_store(tmp_path: Path, key_provider: MemoryKeyProvider) -> Callable[..., Path]:
    """Return a function that makes a new empty store under ``tmp_path``."""
    counter = iter(range(1_000_000))

    def make(chunk_size: int = format.MIN_CHUNK_SIZE) -> Path:
        store = tmp_path / f"store{next(counter)}"
        store.mkdir()
        create_store(store, key_provider, chunk_size)
        return store

    return make


@pytest.fixture
def open_volume(key_provider: MemoryKeyProvider) -> Iterator[Callable[[Path], Volume]]:
    """Return a function that opens a store for writing (running recovery).

    Every volume opened through it is closed at teardown unless the test closed it.
    """
    opened: list[Volume] = []

    def open_(store: Path) -> Volume:
        volume = Volume.open(store, key_provider)
        volume.start_writing()
        opened.append(volume)
        return volume

    yield open_
    for volume in opened:
        volume.close()


@pytest.fixture
def volume(make_store: Callable[..., Path], open_volume: Callable[[Path], Volume]) -> Volume:
    """A new store with 4096-byte chunks, open for writing."""
    return open_volume(make_store())
