"""The Python side of the value table: encoding for the sandbox and decoding its results."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest

from isobox.errors import SerializationError
from isobox.values import decode, encode


def test_plain_json_takes_the_fast_path() -> None:
    """Plain JSON values are encoded untagged, as ASCII."""
    text, tagged = encode({"a": [1, 2.5, "é", None, True]})
    assert not tagged
    assert text.isascii()
    assert json.loads(text) == {"a": [1, 2.5, "é", None, True]}


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        (2**53 + 1, "big"),
        (-(2**70), "big"),
        (math.nan, "num"),
        (math.inf, "num"),
        (b"\x00\xff", "bytes"),
        (datetime(2020, 1, 2, tzinfo=UTC), "date"),
    ],
)
def test_special_values_are_tagged(value: object, tag: str) -> None:
    """Values JSON cannot carry are tagged and come back equal."""
    text, tagged = encode({"v": value})
    assert tagged
    assert f'"$isobox":"{tag}"' in text
    back = decode(text)["v"]
    assert back == value or (isinstance(value, float) and math.isnan(back))


def test_naive_datetime_is_taken_as_utc() -> None:
    """A naive datetime is read as UTC (documented)."""
    back = decode(encode({"d": datetime(2020, 1, 2, 3, 4, 5)})[0])["d"]
    assert back == datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_user_dict_with_the_tag_key_is_escaped() -> None:
    """A dict that has the "$isobox" key itself is not mistaken for a tag."""
    value = {"$isobox": "u", "v": 1}
    text, tagged = encode({"x": value})
    assert tagged
    assert decode(text) == {"x": value}


def test_safe_integers_stay_numbers() -> None:
    """Integers up to 2**53 are plain numbers, beyond it BigInts."""
    assert encode({"a": 2**53})[1] is False
    assert encode({"a": 2**53 + 1})[1] is True


@pytest.mark.parametrize(
    ("value", "path"),
    [({"s": {1, 2}}, "sandbox.s"), ({"o": [object()]}, "sandbox.o[0]"), ({"k": {1: 2, "x": math.nan}}, "sandbox.k")],
)
def test_unsupported_values_name_their_path(value: object, path: str) -> None:
    """A value that cannot cross raises SerializationError with its path."""
    with pytest.raises(SerializationError) as info:
        encode(value)
    assert info.value.path == path


def test_cycles_are_reported() -> None:
    """A cyclic structure is an error naming where the cycle closes."""
    data: dict[str, object] = {}
    data["self"] = data
    with pytest.raises(SerializationError, match="cyclic"):
        encode(data)


def test_size_cap_is_enforced() -> None:
    """An input over the cap is refused before it is sent."""
    with pytest.raises(SerializationError, match="exceeds the cap"):
        encode({"s": "x" * 1000}, limit=100)


def test_lone_surrogates_and_nul_survive_encoding() -> None:
    """Strings are carried as escaped ASCII JSON, so lone surrogates and NULs survive."""
    text, _ = encode({"s": "a\x00\ud800b"})
    assert text.isascii()
    assert decode(text) == {"s": "a\x00\ud800b"}
