"""The ``dermfs`` command line.

::

    dermfs [-v] init CONFIG
    dermfs [-v] fsck CONFIG [--no-progress]
    dermfs [-v] mount CONFIG MOUNTPOINT [-f] [-o OPTIONS]
    dermfs [-v] umount MOUNTPOINT
    dermfs [-v] audit verify CONFIG
    dermfs [-v] audit query CONFIG [--patient ID] [--path PATH] [--uid UID] [--user USER]
                                   [--since TIME] [--until TIME] [--event EVENT] [--json]
    dermfs [-v] audit report CONFIG --patient ID
    dermfs [-v] rewrap CONFIG [--key-label LABEL | --new-keyfile PATH
                               | --new-passphrase-file PATH]
    dermfs [-v] rekey CONFIG
    dermfs --version
    dermfs CONFIG MOUNTPOINT [-o OPTIONS]    (as mount.fuse3 runs it, for fstab)

Secrets never come from the command line: a key or passphrase comes from the file the
configuration names, or from standard input when it says ``passphrase_file: '-'``.

:func:`main` is the one error boundary. A :class:`~dermfs.errors.DermfsError` prints one
line, ``dermfs: <message>``, and exits with the code :mod:`dermfs.exitcodes` gives it; a
bad command line exits 2; Ctrl-C exits 130; anything else is an internal error, printed
as one line and exit 1, with the traceback only when ``DERMFS_DEBUG=1``.

Each command other than ``init`` lives in its own module, imported only when run; a
command whose module is not part of this version says so and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dermfs
from dermfs import exitcodes, format, logsetup
from dermfs.config import LocalKmsConfig, load_config
from dermfs.errors import DermfsError, StoreError
from dermfs.keys import provider_from_config
from dermfs.keys.local import create_keyfile

log = logging.getLogger(__name__)

_VERSION = getattr(dermfs, "__version__", "unknown")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``dermfs`` command.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` if ``None``.

    Returns:
        The exit status (:mod:`dermfs.exitcodes`).
    """
    parser = _build_parser()
    argv = fstab_form(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage, help or the version
        return exitcodes.OK if exc.code in (0, None) else exitcodes.USAGE

    with logsetup.logging_to_stderr(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except DermfsError as exc:
        _print_error(str(exc) or type(exc).__name__)
        return exitcodes.for_exception(exc)
    except KeyboardInterrupt:
        _print_error("interrupted")
        return exitcodes.INTERRUPTED
    except Exception as exc:
        if logsetup.debug_enabled():
            traceback.print_exc()
        _print_error(f"internal error: {type(exc).__name__}: {exc}")
        return exitcodes.GENERIC


def _print_error(message: str) -> None:
    print(f"dermfs: {' '.join(message.splitlines())}", file=sys.stderr)


# ------------------------------------------------------------------------------ parser

_COMMANDS = frozenset({"init", "fsck", "mount", "umount", "audit", "rewrap", "rekey"})


def fstab_form(argv: Sequence[str]) -> list[str]:
    """Turn ``CONFIG MOUNTPOINT [-o OPTIONS]`` into ``mount CONFIG MOUNTPOINT ...``.

    ``mount.fuse3`` (which ``mount -t fuse.dermfs`` and an fstab line run) calls
    ``dermfs CONFIG MOUNTPOINT -o OPTIONS``, with no command. That form is taken only when
    the first argument is not a command name and is an existing file and the second an
    existing directory; a configuration file named like a command must be given as
    ``./NAME``. Any other command line is returned unchanged.
    """
    args = list(argv)
    if (
        len(args) >= 2
        and args[0] not in _COMMANDS
        and not args[0].startswith("-")
        and os.path.isfile(args[0])
        and os.path.isdir(args[1])
    ):
        return ["mount", *args]
    return args


def _build_parser() -> argparse.ArgumentParser:
    verbose_help = "log more: once for progress information, twice for debugging detail"
    # -v may also come after the command; there it overrides only when given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help=verbose_help
    )

    parser = argparse.ArgumentParser(
        prog="dermfs",
        description="A transparent encrypting FUSE filesystem with an audit journal.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    parser.add_argument("--version", action="version", version=f"dermfs {_VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], summary: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(handler=handler)
        return sub

    def config_argument(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("config", metavar="CONFIG", type=Path, help="the volume's YAML file")

    sub = command("init", _cmd_init, "create a store, and for provider local its key file")
    config_argument(sub)

    sub = command("fsck", _cmd_fsck, "check every header, chunk and name of a store")
    config_argument(sub)
    sub.add_argument(
        "--no-progress", action="store_true", help="never show progress (shown on a terminal)"
    )

    sub = command("mount", _cmd_mount, "mount a volume")
    config_argument(sub)
    sub.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    sub.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    sub.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        action="append",
        default=[],
        help="comma-separated mount options (may be repeated)",
    )

    sub = command("umount", _cmd_umount, "flush and unmount a mounted volume")
    sub.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)

    audit = command("audit", _cmd_audit, "verify, query or report from the audit journal")
    audit_commands = audit.add_subparsers(
        dest="audit_command", metavar="AUDIT_COMMAND", required=True
    )
    sub = audit_commands.add_parser(
        "verify", parents=[common], help="check that no record was changed, removed or moved"
    )
    config_argument(sub)
    sub = audit_commands.add_parser("query", parents=[common], help="list matching records")
    config_argument(sub)
    sub.add_argument("--patient", metavar="ID", help="records about this patient id")
    sub.add_argument("--path", metavar="PATH", help="records of this path inside the mount")
    sub.add_argument("--uid", metavar="UID", type=int, help="records of this uid")
    sub.add_argument("--user", metavar="USER", help="records of this user name or uid")
    sub.add_argument("--since", metavar="TIME", help="records at or after TIME")
    sub.add_argument("--until", metavar="TIME", help="records before TIME")
    sub.add_argument(
        "--event",
        metavar="EVENT",
        action="append",
        default=[],
        help="records of this event; repeat it or give a comma list for several",
    )
    sub.add_argument("--json", action="store_true", help="print JSON lines, not a table")
    sub = audit_commands.add_parser(
        "report", parents=[common], help="a patient's access history, for a privacy officer"
    )
    config_argument(sub)
    sub.add_argument("--patient", metavar="ID", required=True, help="the patient id")

    sub = command("rewrap", _cmd_rewrap, "rewrap the volume key under the current KMS key")
    config_argument(sub)
    sub.add_argument(
        "--key-label",
        metavar="LABEL",
        help="pkcs11: wrap under this key on the token instead of kms.key_label",
    )
    sub.add_argument(
        "--new-keyfile",
        metavar="PATH",
        type=Path,
        help="local: wrap under this key file (created, mode 0600, if missing)",
    )
    sub.add_argument(
        "--new-passphrase-file",
        metavar="PATH",
        type=Path,
        help="local: wrap under the passphrase in this file (mode 0600)",
    )
    sub = command("rekey", _cmd_rekey, "make a new volume key and rewrap every file header")
    config_argument(sub)

    return parser


# ------------------------------------------------------------------------------ commands


def _cmd_init(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    create_store = _command_function("init", "dermfs.volume", "create_store")
    if create_store is None:
        return _unavailable("init")
    _check_new_store(config.store)

    kms = config.kms
    if isinstance(kms, LocalKmsConfig) and kms.keyfile is not None and not kms.keyfile.exists():
        create_keyfile(kms.keyfile)
        print(
            f"created key file {kms.keyfile}; keep a copy in a safe place, "
            "because without it the volume cannot be opened"
        )
    provider = provider_from_config(kms, passphrase_stdin=sys.stdin)
    _make_store_directory(config.store)

    create_store(config.store, provider, config.chunk_size)
    log.info("initialised store %s with key provider %s", config.store, provider.name)
    return exitcodes.OK


def _check_new_store(store: Path) -> None:
    """Refuse a store that cannot be initialised; a missing or empty directory can."""
    if not store.parent.is_dir():
        raise StoreError(f"the parent directory of store {store} does not exist")
    if not store.exists():
        return
    if not store.is_dir():
        raise StoreError(f"store {store} exists and is not a directory")
    try:
        entries = {entry.name for entry in store.iterdir()}
    except OSError as exc:
        raise StoreError(f"cannot read store {store}: {exc.strerror}") from None
    if format.VOLUME_FILE in entries:
        raise StoreError(f"store {store} is already initialised")
    if entries:
        raise StoreError(f"store {store} is not empty and is not a dermfs store")


def _make_store_directory(store: Path) -> None:
    if store.is_dir():
        return
    try:
        store.mkdir(mode=0o700)
        os.chmod(store, 0o700)
    except OSError as exc:
        raise StoreError(f"cannot create store {store}: {exc.strerror}") from None
    log.info("created store directory %s", store)


def _cmd_fsck(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    return _dispatch("fsck", "dermfs.fsck", "run_fsck", config, progress=not args.no_progress)


def _cmd_mount(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    options = [option for group in args.options for option in group.split(",") if option]
    return _dispatch(
        "mount",
        "dermfs.fuse.mount",
        "run_mount",
        config,
        args.mountpoint,
        args.foreground,
        options,
    )


def _cmd_umount(args: argparse.Namespace) -> int:
    return _dispatch("umount", "dermfs.fuse.mount", "run_umount", args.mountpoint)


def _cmd_audit(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    return _dispatch(f"audit {args.audit_command}", "dermfs.audit.cli", "run", config, args)


def _cmd_rewrap(args: argparse.Namespace) -> int:
    return _rotate("rewrap", "run_rewrap", args)


def _cmd_rekey(args: argparse.Namespace) -> int:
    return _rotate("rekey", "run_rekey", args)


def _rotate(command: str, function: str, args: argparse.Namespace) -> int:
    config = load_config(args.config)
    return _dispatch(command, "dermfs.rotation", function, config, args)


# ------------------------------------------------------------------------------ dispatch


def _dispatch(command: str, module: str, function: str, *args: Any, **kwargs: Any) -> int:
    run = _command_function(command, module, function)
    if run is None:
        return _unavailable(command)
    status: int = run(*args, **kwargs)
    return status


def _command_function(command: str, module_name: str, function: str) -> Any | None:
    """Return ``module_name.function``, or ``None`` if this version has no such module.

    Only the absence of *module_name* itself (or of a dermfs package above it) counts; a
    module that exists but fails to import is an error like any other.
    """
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing.startswith("dermfs.") and f"{module_name}.".startswith(f"{missing}."):
            log.debug("command %s: module %s is missing", command, missing)
            return None
        raise
    return getattr(module, function)


def _unavailable(command: str) -> int:
    _print_error(f"command {command} is not available in this version")
    return exitcodes.GENERIC
