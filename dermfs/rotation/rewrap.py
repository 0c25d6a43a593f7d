"""``dermfs rewrap``: the same volume key, wrapped again under a newer or another KMS key.

The contract is ``docs/kms.md`` section 7. With the store lock
held, so never while the volume is mounted:

1. the volume is unlocked with the configured provider (every slot unwrapped, the volume
   file's MAC checked), and the volume file is read again under the lock to make sure
   nothing changed it in between;
2. the volume key is wrapped by the target provider and the new wrap is unwrapped and
   compared before anything is written (:meth:`~dermfs.volume.Volume.wrap_keys`);
3. the volume file is replaced atomically (temporary file, fsync, rename, fsync of the
   store directory) with the new slot and a fresh MAC
   (:meth:`~dermfs.volume.Volume.write_volume_file`);
4. a ``rewrap`` record goes to the audit journal.

The target is, by provider:

``openbao``
    The newest version of the configured Transit key (``kms.key``, so changing the key's
    name in the configuration and rewrapping moves the volume to another Transit key).
    Transit's own ``rewrap`` endpoint cannot be used, because it drops the associated
    data that binds the volume id (see :mod:`dermfs.keys.openbao`); the key is
    encrypted anew instead, which the volume-file MAC requires the volume key for anyway.
``pkcs11``
    The key labelled ``--key-label`` on the configured token, or ``kms.key_label``.
``local``
    A key file (``--new-keyfile``, created if missing) or a passphrase file
    (``--new-passphrase-file``).

The volume file names the key that wrapped it, so a later mount unwraps with the new key
even before ``kms.key_label``, ``kms.keyfile`` or ``kms.passphrase_file`` is changed; the
success line says which setting to update.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dermfs import exitcodes, format
from dermfs.audit import AuditJournal, Event, daemon_caller
from dermfs.audit.forward import SyslogForwarder
from dermfs.config import (
    AuditConfig,
    Config,
    LocalKmsConfig,
    OpenbaoKmsConfig,
    Pkcs11KmsConfig,
)
from dermfs.errors import AuditUnavailable, StoreError
from dermfs.keys import KeyProvider, provider_from_config
from dermfs.keys.local import create_keyfile
from dermfs.volume import Volume, read_volume_file

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)


class UsageError(Exception):
    """The options do not fit the configured provider."""


def run_rewrap(config: Config, args: argparse.Namespace) -> int:
    """Run ``dermfs rewrap CONFIG``: rewrap the volume key and print one line.

    Returns:
        :data:`~dermfs.exitcodes.OK`, or :data:`~dermfs.exitcodes.USAGE` when an option
        does not fit the configured provider.

    Raises:
        StoreError: the store is missing, not a store, mounted, being rekeyed, or its
            volume file changed while the command started.
        FormatError, WrongKeyError, KeyProviderError, InsecureFileError: from unlocking
            the volume or from the new wrap.
        AuditUnavailable: the audit journal cannot be written (``on_failure: deny``);
            the volume file is then left as it was.
    """
    try:
        target = _target_config(config, args)
    except UsageError as exc:
        print(f"dermfs: {exc}", file=sys.stderr)
        return exitcodes.USAGE

    providers: list[KeyProvider] = []
    try:
        provider = provider_from_config(config.kms, passphrase_stdin=sys.stdin)
        providers.append(provider)
        volume = Volume.open(config.store, provider)
        try:
            volume.lock()
            _check_unchanged(volume)
            if target is None:
                new_provider = provider
            else:
                _create_missing_keyfile(target)
                new_provider = provider_from_config(target, passphrase_stdin=None)
                providers.append(new_provider)
            old, new = rewrap_volume(volume, new_provider, config.audit)
        finally:
            volume.close()
    finally:
        for used in providers:
            wipe = getattr(used, "wipe", None)
            if callable(wipe):
                wipe()

    print(_success_line(config, target, old, new))
    return exitcodes.OK


def rewrap_volume(
    volume: Volume, provider: KeyProvider, audit: AuditConfig
) -> tuple[format.KeySlot, format.KeySlot]:
    """Rewrap every key of a locked, open *volume* with *provider*, and record it.

    Returns:
        The current generation's slot before and after.

    Raises:
        AuditUnavailable: the journal cannot be written and ``on_failure`` is ``deny``;
            nothing was changed.
        KeyProviderError, WrongKeyError: the provider could not wrap, or the new wrap
            does not unwrap; nothing was changed.
        OSError: the volume file could not be written; the old one is intact.
    """
    journal = _open_journal(volume, audit)
    try:
        old = volume.volume_file.current_key
        slots = volume.wrap_keys(provider)
        volume.write_volume_file(slots)
        new = volume.volume_file.current_key
        log.info(
            "rewrapped the volume key: %s %s v%d -> %s %s v%d",
            old.provider,
            old.key_name,
            old.key_version,
            new.provider,
            new.key_name,
            new.key_version,
        )
        if journal is not None:
            journal.record(Event.REWRAP, daemon_caller(), None)
    finally:
        if journal is not None:
            journal.close()
    return old, new


def _open_journal(volume: Volume, audit: AuditConfig) -> AuditJournal | None:
    audit_key = volume.audit_key()
    try:
        return AuditJournal.open(
            audit.journal,
            volume.volume_id,
            audit_key,
            patient_id=audit.patient_id,
            on_failure=audit.on_failure,
            max_bytes=audit.max_bytes,
            forwarder=SyslogForwarder() if audit.syslog else None,
        )
    except AuditUnavailable as exc:
        if audit.on_failure == "deny":
            raise
        log.warning("rewrap: not recorded in the audit journal: %s", exc)
        return None
    finally:
        audit_key.wipe()


def _check_unchanged(volume: Volume) -> None:
    """Refuse to go on if the volume file changed between opening and locking."""
    if read_volume_file(volume.store) != volume.volume_file:
        raise StoreError(
            f"the volume file of {volume.store} changed while rewrap was starting; run it again"
        )


# ------------------------------------------------------------------------------ targets


def _target_config(
    config: Config, args: argparse.Namespace
) -> LocalKmsConfig | Pkcs11KmsConfig | None:
    """Return the ``kms`` settings of the new wrap, or ``None`` for the configured ones."""
    kms = config.kms
    key_label: str | None = getattr(args, "key_label", None)
    new_keyfile: Path | None = getattr(args, "new_keyfile", None)
    new_passphrase_file: Path | None = getattr(args, "new_passphrase_file", None)

    if key_label is not None and not isinstance(kms, Pkcs11KmsConfig):
        raise UsageError(f"--key-label is for key provider pkcs11, not {kms.provider}")
    if (new_keyfile or new_passphrase_file) and not isinstance(kms, LocalKmsConfig):
        raise UsageError(
            f"--new-keyfile and --new-passphrase-file are for key provider local, not "
            f"{kms.provider}"
        )

    if isinstance(kms, OpenbaoKmsConfig):
        return None
    if isinstance(kms, Pkcs11KmsConfig):
        return dataclasses.replace(kms, key_label=key_label) if key_label else None

    if new_keyfile is not None and new_passphrase_file is not None:
        raise UsageError("give one of --new-keyfile and --new-passphrase-file, not both")
    if new_keyfile is not None:
        return LocalKmsConfig(keyfile=new_keyfile)
    if new_passphrase_file is not None:
        return LocalKmsConfig(
            passphrase_file=new_passphrase_file, kdf=kms.kdf, kdf_params=kms.kdf_params
        )
    raise UsageError(
        "for key provider local, give --new-keyfile PATH or --new-passphrase-file PATH"
    )


def _create_missing_keyfile(target: LocalKmsConfig | Pkcs11KmsConfig) -> None:
    """Create the new key file of a ``local`` rewrap, once the volume is unlocked and locked."""
    keyfile = target.keyfile if isinstance(target, LocalKmsConfig) else None
    if keyfile is not None and not keyfile.exists():
        create_keyfile(keyfile)


def _success_line(
    config: Config,
    target: LocalKmsConfig | Pkcs11KmsConfig | None,
    old: format.KeySlot,
    new: format.KeySlot,
) -> str:
    kms = config.kms
    if isinstance(kms, OpenbaoKmsConfig):
        return (
            f"rewrapped the volume key of {config.store} under Transit key "
            f"{kms.transit_mount}/{new.key_name} version {new.key_version} "
            f"(was {old.key_name} version {old.key_version})"
        )
    if isinstance(kms, Pkcs11KmsConfig):
        hint = ""
        if new.key_name != kms.key_label:
            hint = f"; set kms.key_label to {new.key_name} in {config.path}"
        return (
            f"rewrapped the volume key of {config.store} under HSM key {new.key_name} "
            f"(was {old.key_name}){hint}"
        )

    assert isinstance(target, LocalKmsConfig)
    if target.keyfile is not None:
        where, setting = f"key file {target.keyfile}", "kms.keyfile"
    else:
        where, setting = f"passphrase file {target.passphrase_file}", "kms.passphrase_file"
    return (
        f"rewrapped the volume key of {config.store} under {where}; point {setting} "
        f"at it in {config.path}"
    )
