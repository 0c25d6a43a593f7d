"""Mount options: what ``-o`` and the configuration's ``mount`` section may say.

Always set: ``default_permissions`` (the kernel checks POSIX permissions, also with
``allow_other``), ``fsname=`` naming the store (so that ``df`` shows it and GIO does not
take the mount for a system one or for ``none``), and ``subtype=dermfs`` (the type reads
``fuse.dermfs``).

Passed to FUSE: ``allow_other`` (also from ``mount.allow_other``), ``allow_root``,
``auto_unmount``, ``debug``, ``max_read=N`` and the generic mount flags (``ro``, ``rw``,
``noatime``, ``nosuid``, ``nodev``, ``noexec`` and the like).

dermfs's own: ``attr_timeout=S``, ``entry_timeout=S``, ``keep_cache`` / ``nokeep_cache``,
``writeback_cache`` / ``nowriteback_cache``, ``read_ahead_kb=N`` (defaults chosen by
measurement, see ``docs/fuse.md``), and ``log=PATH`` or ``log=syslog`` for where a background daemon
logs (syslog by default).

Ignored, because ``mount(8)`` and fstab use them: ``defaults``, ``auto``, ``noauto``,
``user``, ``users``, ``nouser``, ``nofail``, ``_netdev`` and ``x-*``.

Anything else is refused by name with a :class:`~dermfs.errors.MountError`.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from dermfs.errors import MountError
from dermfs.fuse.attributes import CacheSettings

#: Options passed to FUSE as they are.
_FUSE_FLAGS = frozenset(
    {
        "allow_other",
        "allow_root",
        "auto_unmount",
        "debug",
        "ro",
        "rw",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "async",
        "sync",
        "dirsync",
        "atime",
        "noatime",
        "diratime",
        "nodiratime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
    }
)
#: Options with a value passed to FUSE as they are.
_FUSE_VALUED = frozenset({"max_read"})
#: Options mount(8) and fstab use that mean nothing to the daemon.
_IGNORED = frozenset({"defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev"})
#: Options dermfs always sets itself.
_OURS = frozenset({"default_permissions", "fsname", "subtype"})

SYSLOG = "syslog"

#: Characters left as they are in ``fsname``; everything else is %-encoded, so that the
#: value is ASCII (pyfuse3 requires it) and holds no comma (FUSE's option separator).
_FSNAME_SAFE = "/._-~+:@="


@dataclass(frozen=True)
class MountOptions:
    """Everything the options decide.

    Attributes:
        fuse: the option set for :func:`pyfuse3.init`.
        cache: kernel cache settings for the handlers.
        log: ``syslog`` or a file a background daemon logs to.
    """

    fuse: frozenset[str]
    cache: CacheSettings
    log: str = SYSLOG


def fsname_of(store: Path) -> str:
    """Return the ``fsname`` of a store: its absolute path, %-encoded where needed."""
    return urllib.parse.quote(str(store), safe=_FSNAME_SAFE)


def store_of_fsname(fsname: str) -> Path:
    """Return the store path an ``fsname`` made by :func:`fsname_of` names."""
    return Path(urllib.parse.unquote(fsname))


def parse_options(
    store: Path,
    options: Iterable[str],
    *,
    allow_other: bool = False,
    defaults: CacheSettings | None = None,
) -> MountOptions:
    """Check and split mount options.

    Args:
        store: the absolute store path, for ``fsname``.
        options: the options, one per item (already split at commas), configuration
            options first, then the command line's.
        allow_other: the configuration's ``mount.allow_other``.
        defaults: cache settings to start from.

    Raises:
        MountError: an option is unknown, or has a bad value.
    """
    fuse = {"default_permissions", f"fsname={fsname_of(store)}", "subtype=dermfs"}
    if allow_other:
        fuse.add("allow_other")
    cache = defaults or CacheSettings()
    log = SYSLOG

    for option in options:
        option = option.strip()
        if not option:
            continue
        key, has_value, value = option.partition("=")
        if key in _IGNORED or key.startswith("x-"):
            continue
        if key in _OURS:
            raise MountError(f"mount option {key} is always set by dermfs and cannot be given")
        if key in _FUSE_FLAGS and not has_value:
            fuse.add(key)
        elif key in _FUSE_VALUED and has_value:
            fuse.add(f"{key}={_positive_int(key, value)}")
        elif key == "attr_timeout" and has_value:
            cache = replace(cache, attr_timeout=_seconds(key, value))
        elif key == "entry_timeout" and has_value:
            cache = replace(cache, entry_timeout=_seconds(key, value))
        elif key == "read_ahead_kb" and has_value:
            cache = replace(cache, read_ahead_kb=_kibibytes(key, value))
        elif key in ("keep_cache", "writeback_cache") and not has_value:
            cache = replace(cache, **{key: True})
        elif key in ("nokeep_cache", "nowriteback_cache") and not has_value:
            cache = replace(cache, **{key[2:]: False})
        elif key == "log" and value:
            log = value
        elif key in _FUSE_FLAGS or key in _FUSE_VALUED or key in _CACHE_KEYS or key == "log":
            raise MountError(f"mount option {key}: bad value")
        else:
            raise MountError(f"unknown mount option {key}")

    if "ro" in fuse and "rw" in fuse:
        raise MountError("mount options ro and rw contradict each other")
    return MountOptions(frozenset(fuse), cache, log)


_CACHE_KEYS = frozenset(
    {
        "read_ahead_kb",
        "attr_timeout",
        "entry_timeout",
        "keep_cache",
        "nokeep_cache",
        "writeback_cache",
        "nowriteback_cache",
    }
)


def _seconds(key: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise MountError(f"mount option {key}: not a number of seconds") from None
    if not 0 <= seconds <= 86400:
        raise MountError(f"mount option {key}: must be from 0 to 86400 seconds")
    return seconds


def _kibibytes(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise MountError(f"mount option {key}: not an integer") from None
    if not 0 <= number <= 65536:
        raise MountError(f"mount option {key}: must be from 0 to 65536")
    return number


def _positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise MountError(f"mount option {key}: not an integer") from None
    if number <= 0:
        raise MountError(f"mount option {key}: must be positive")
    return number
