"""Passphrase key derivation for the ``local`` provider: scrypt or Argon2id.

The configuration chooses the KDF and may override its parameters; the volume file stores
the parameters used, beside the wrapped key (``docs/format.md`` section 2.1). Both places
check the parameters here, so that a typo in the configuration and a damaged volume file
are refused alike, before any memory is spent on them.

Caveats:

- The checks bound the memory a KDF may use (4 GiB), so that a changed volume file cannot
  make ``mount`` exhaust memory, but they set no lower bound on the cost: weak parameters
  are allowed, because tests need them and an administrator may choose them explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from dermfs import cryptocore
from dermfs.cryptocore import SecretKey
from dermfs.errors import FormatError

SCRYPT = "scrypt"
ARGON2ID = "argon2id"
DEFAULT_KDF = ARGON2ID

#: Default parameters of each KDF, also the set of parameter names each one takes.
DEFAULT_PARAMS: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        ARGON2ID: MappingProxyType({"iterations": 3, "memory_kib": 65536, "lanes": 4}),
        SCRYPT: MappingProxyType({"n": 32768, "r": 8, "p": 1}),
    }
)
KDFS = frozenset(DEFAULT_PARAMS)

#: Bytes of random salt made for each wrap.
SALT_SIZE = 16
#: Most memory a KDF may be asked to use, in bytes.
MAX_MEMORY = 4 << 30
#: Largest value Argon2 accepts for its 32-bit parameters.
_MAX_U32 = (1 << 32) - 1


def check_params(kdf: str, params: Mapping[str, object], where: str = "") -> dict[str, int]:
    """Check a complete set of parameters for *kdf*.

    Args:
        kdf: ``scrypt`` or ``argon2id``.
        params: every parameter of that KDF, and nothing else (no ``kdf`` or ``salt``).
        where: a prefix for parameter names in messages, such as ``kms.kdf_params.``.

    Returns:
        The parameters as a plain ``dict`` of integers.

    Raises:
        FormatError: *kdf* is unknown, a parameter is unknown, missing, not an integer,
            or out of range; the message names the parameter.
    """
    if kdf not in KDFS:
        raise FormatError(f"unknown passphrase KDF {kdf!r} (known: {', '.join(sorted(KDFS))})")
    expected = DEFAULT_PARAMS[kdf]
    unknown = sorted(set(params) - set(expected))
    if unknown:
        raise FormatError(f"unknown key {where}{unknown[0]}")
    missing = sorted(set(expected) - set(params))
    if missing:
        raise FormatError(f"missing key {where}{missing[0]}")

    values: dict[str, int] = {}
    for name in expected:
        value = params[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FormatError(f"{where}{name}: must be a positive integer")
        values[name] = value

    if kdf == SCRYPT:
        _check_scrypt(values, where)
    else:
        _check_argon2id(values, where)
    return values


def _check_scrypt(params: Mapping[str, int], where: str) -> None:
    n, r = params["n"], params["r"]
    if n < 2 or n & (n - 1):
        raise FormatError(f"{where}n: must be a power of two, at least 2")
    if 128 * n * r > MAX_MEMORY:
        raise FormatError(f"{where}n: scrypt would need more than {MAX_MEMORY >> 30} GiB")
    if r * params["p"] >= 1 << 30:
        raise FormatError(f"{where}p: r * p must be less than 2**30")


def _check_argon2id(params: Mapping[str, int], where: str) -> None:
    lanes, memory_kib = params["lanes"], params["memory_kib"]
    if params["iterations"] > _MAX_U32:
        raise FormatError(f"{where}iterations: must be at most {_MAX_U32}")
    if lanes >= 1 << 24:
        raise FormatError(f"{where}lanes: must be less than 2**24")
    if memory_kib < 8 * lanes:
        raise FormatError(f"{where}memory_kib: must be at least 8 times lanes")
    if memory_kib * 1024 > MAX_MEMORY:
        raise FormatError(f"{where}memory_kib: must be at most {MAX_MEMORY >> 10}")


def derive(kdf: str, passphrase: SecretKey, salt: bytes, params: Mapping[str, int]) -> SecretKey:
    """Derive a 256-bit key-encryption key from *passphrase*.

    Args:
        kdf: ``scrypt`` or ``argon2id``.
        passphrase: the passphrase bytes.
        salt: the random salt stored beside the wrapped key.
        params: parameters that passed :func:`check_params`.

    Returns:
        The key-encryption key.

    Raises:
        FormatError: *kdf* is unknown.
    """
    if kdf == SCRYPT:
        return cryptocore.kek_from_scrypt(
            passphrase.reveal(), salt, n=params["n"], r=params["r"], p=params["p"]
        )
    if kdf == ARGON2ID:
        return cryptocore.kek_from_argon2id(
            passphrase.reveal(),
            salt,
            iterations=params["iterations"],
            memory_kib=params["memory_kib"],
            lanes=params["lanes"],
        )
    raise FormatError(f"unknown passphrase KDF {kdf!r}")
