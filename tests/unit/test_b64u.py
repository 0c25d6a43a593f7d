"""base64url as the format uses it: one encoding per byte string, nothing else accepted."""

from __future__ import annotations

import os

import pytest

from dermfs import format
from dermfs.errors import FormatError


@pytest.mark.parametrize("size", [1, 2, 3, 16, 19, 20, 21, 60])
def test_round_trip(size: int) -> None:
    data = os.urandom(size)

    assert format.b64u_decode(format.b64u_encode(data)) == data


@pytest.mark.parametrize("size", [19, 20])
def test_unused_low_bits_of_the_last_character_are_refused(size: int) -> None:
    # A second spelling of the same bytes would give one encrypted name two backing names.
    encoded = format.b64u_encode(b"\0" * size)
    assert encoded.endswith("A")

    with pytest.raises(FormatError):
        format.b64u_decode(encoded[:-1] + "B")


@pytest.mark.parametrize("text", ["AAAA!AAA", "AA AA", "AAAA\tAAAA", "AAA.AAAA", "AAAAA"])
def test_characters_outside_the_alphabet_are_refused(text: str) -> None:
    with pytest.raises(FormatError):
        format.b64u_decode(text)
