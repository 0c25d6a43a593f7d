"""Key providers: the KMS back ends that wrap and unwrap the volume key.

Each provider lives in its own module, ``dermfs.keys.<provider>``, imported only when a
configuration names it, and defines::

    def from_config(kms, *, passphrase_stdin: TextIO | None) -> KeyProvider

A provider that needs an optional Python package (``hvac`` for ``openbao``,
``python-pkcs11`` for ``pkcs11``) imports it at module level; if the package is missing,
:func:`provider_from_config` says which one to install instead of raising ImportError.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, TextIO

from dermfs.errors import KeyProviderError
from dermfs.keys.base import KeyProvider, WrappedKey

if TYPE_CHECKING:
    from dermfs.config import KmsConfig

__all__ = ["KeyProvider", "WrappedKey", "provider_from_config"]

#: Python distributions to install, by the top-level module a provider imports.
_DISTRIBUTIONS = {"hvac": "hvac", "pkcs11": "python-pkcs11"}


def provider_from_config(
    kms_config: KmsConfig, *, passphrase_stdin: TextIO | None = None
) -> KeyProvider:
    """Make the key provider a configuration's ``kms`` section describes.

    Nothing is read or contacted yet; that happens at the first wrap or unwrap.

    Args:
        kms_config: the checked ``kms`` section.
        passphrase_stdin: the stream a passphrase is read from when the configuration
            says so (``local`` with ``passphrase_file: '-'``); normally ``sys.stdin``.

    Returns:
        The provider.

    Raises:
        KeyProviderError: this version of dermfs has no such provider, or a Python
            package the provider needs is not installed.
    """
    module = _import_provider(kms_config.provider)
    factory: Callable[..., KeyProvider] = module.from_config
    return factory(kms_config, passphrase_stdin=passphrase_stdin)


def _import_provider(provider: str) -> ModuleType:
    module_name = f"{__name__}.{provider}"
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or ""
        top_level = missing.partition(".")[0]
        if missing == module_name and isinstance(exc, ModuleNotFoundError):
            raise KeyProviderError(
                f"key provider {provider} is not available in this version of dermfs"
            ) from None
        if top_level == "dermfs":
            raise
        package = _DISTRIBUTIONS.get(top_level, top_level or "it needs")
        if isinstance(exc, ModuleNotFoundError):
            raise KeyProviderError(
                f"key provider {provider} needs the Python package {package}, which is not "
                f"installed (pip install {package}, or install dermfs[{provider}])"
            ) from None
        raise KeyProviderError(
            f"key provider {provider} could not load the Python package {package}: {exc}"
        ) from None
