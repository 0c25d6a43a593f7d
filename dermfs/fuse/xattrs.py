"""Extended attributes: ``user.*`` stored encrypted on the backing object.

Names are encrypted with :class:`~dermfs.metadata.XattrTransform`, values are sealed and
bound to the object's id (the file id from its header, or the directory id) and to the
backing name, so a value copied to another object or another name fails to verify.

Other namespaces are not stored: reading one answers ENODATA, setting one ENOTSUP, and
listing shows none (the backing filesystem's ``security.*`` labels stay hidden). Symlinks
carry no ``user.*`` attributes on Linux; they answer as the kernel would (EPERM on set).

Every function takes a *target*: an absolute backing path or an open descriptor (for a
file that is open, perhaps unlinked).
"""

from __future__ import annotations

import errno
import logging
import os

from dermfs.errors import IntegrityError
from dermfs.metadata import XattrTransform

log = logging.getLogger(__name__)

Target = str | int


def _follow(target: Target) -> bool:
    # A descriptor is the object itself; a path must not be followed past a symlink.
    return isinstance(target, int)


def _no_attribute() -> OSError:
    return OSError(errno.ENODATA, "no such attribute")


def get(transform: XattrTransform, target: Target, object_id: bytes | None, name: bytes) -> bytes:
    """Return the plaintext value of *name*.

    Raises:
        OSError: ENODATA when it is not set or not a ``user.`` attribute.
        IntegrityError: the stored value does not verify.
    """
    if object_id is None or not transform.is_stored(name):
        raise _no_attribute()
    try:
        backing = transform.encrypt_name(name)
    except ValueError:
        raise _no_attribute() from None
    sealed = os.getxattr(target, backing, follow_symlinks=_follow(target))
    return transform.decrypt_value(object_id, backing, sealed)


def put(
    transform: XattrTransform, target: Target, object_id: bytes | None, name: bytes, value: bytes
) -> None:
    """Set *name* to *value*.

    Raises:
        OSError: ENOTSUP for a namespace dermfs does not store; EPERM on a symlink;
            ENAMETOOLONG for a name too long once encrypted; or the backing error.
    """
    if not transform.is_stored(name):
        raise OSError(errno.ENOTSUP, "only user. attributes are stored")
    if object_id is None:
        raise OSError(errno.EPERM, "no user. attributes on this kind of object")
    try:
        backing = transform.encrypt_name(name)
    except ValueError:
        raise OSError(errno.ERANGE, "attribute name is too long") from None
    sealed = transform.encrypt_value(object_id, backing, value)
    os.setxattr(target, backing, sealed, follow_symlinks=_follow(target))


def names(transform: XattrTransform, target: Target, inode: int) -> list[bytes]:
    """Return the plaintext names of the ``user.`` attributes; skip any that fail to decrypt."""
    listed = []
    for backing in os.listxattr(target, follow_symlinks=_follow(target)):
        encoded = os.fsencode(backing)
        if not transform.is_stored(encoded):
            continue
        try:
            listed.append(transform.decrypt_name(encoded))
        except IntegrityError:
            log.warning("inode %d: skipping an xattr whose name fails to decrypt", inode)
    return listed


def remove(transform: XattrTransform, target: Target, name: bytes) -> None:
    """Remove *name*.

    Raises:
        OSError: ENODATA when it is not set or not a ``user.`` attribute.
    """
    if not transform.is_stored(name):
        raise _no_attribute()
    try:
        backing = transform.encrypt_name(name)
    except ValueError:
        raise _no_attribute() from None
    os.removexattr(target, backing, follow_symlinks=_follow(target))
