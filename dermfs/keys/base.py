"""The key-provider interface that every KMS back end implements.

A provider wraps the volume key for storage in the volume file and unwraps it at mount.
The store never holds the volume key in the clear; it holds a :class:`WrappedKey`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dermfs.cryptocore import SecretKey


@dataclass(frozen=True)
class WrappedKey:
    """The volume key as a provider wrapped it, with what is needed to unwrap it again.

    Attributes:
        provider: the provider's name (``local``, ``openbao``, ``pkcs11``).
        key_name: the name of the key-encryption key inside the provider.
        key_version: the version of that key, where the provider has versions, else 1.
        blob: the wrapped volume key, opaque to everyone but the provider.
        params: provider data stored beside the blob, such as KDF parameters and salt.
            Values must be JSON-serialisable.
    """

    provider: str
    key_name: str
    key_version: int
    blob: bytes
    params: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"WrappedKey(provider={self.provider!r}, key_name={self.key_name!r}, "
            f"key_version={self.key_version})"
        )


class KeyProvider(Protocol):
    """What dermfs needs of a KMS."""

    #: The provider's name, as written in the configuration and the volume file.
    name: str

    def describe(self) -> str:
        """Say where the key lives (an address, a module, a file), for error messages."""
        ...

    def wrap(self, volume_key: SecretKey, volume_id: bytes) -> WrappedKey:
        """Wrap *volume_key*, binding *volume_id* as associated data.

        Raises:
            KeyProviderError: the provider could not be reached or refused.
        """
        ...

    def unwrap(self, wrapped: WrappedKey, volume_id: bytes) -> SecretKey:
        """Unwrap what :meth:`wrap` made for the volume *volume_id*.

        Raises:
            WrongKeyError: the provider's key, passphrase or key file is not this volume's.
            KeyProviderError: the provider could not be reached or refused.
        """
        ...
