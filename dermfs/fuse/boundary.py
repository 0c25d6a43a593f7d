"""The error boundary: the one place in dermfs that raises :class:`pyfuse3.FUSEError`.

Every request handler of :class:`~dermfs.fuse.operations.DermfsOperations` is wrapped in
:func:`boundary`: an ``OSError`` keeps its errno, an
:class:`~dermfs.errors.IntegrityError` becomes EIO with a WARNING that names the inode and
chunk (the exception's message does), a name or target too long once encrypted becomes
ENAMETOOLONG, and anything else EIO with an ERROR. Lower layers and the helpers of this
package raise ``OSError`` or dermfs exceptions, never ``FUSEError``.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from dermfs.errors import DermfsError, IntegrityError
from dermfs.metadata import TooLongError

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def boundary(
    handler: Callable[_P, Awaitable[_R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Wrap a handler so that it raises only :class:`pyfuse3.FUSEError` (the error boundary)."""
    name = handler.__name__

    @functools.wraps(handler)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except IntegrityError as exc:
            log.warning("%s: %s", name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except TooLongError:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except ValueError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except DermfsError as exc:
            log.error("%s: %s", name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s: internal error", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded
