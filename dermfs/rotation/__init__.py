"""Key rotation: ``dermfs rewrap`` and ``dermfs rekey`` (docs/rotation.md).

The command functions are looked up here by the command line and imported only when
asked for, so that each command pulls in only its own modules.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Command function name -> the module that defines it.
_COMMANDS = {
    "run_rekey": "dermfs.rotation.rekey",
    "run_rewrap": "dermfs.rotation.rewrap",
}

__all__ = sorted(_COMMANDS)


def __getattr__(name: str) -> Any:
    module = _COMMANDS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
