"""Hypothesis: random values survive Python -> JS -> Python through the real engine."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isobox import IsoBox

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False) | st.text() | st.binary(max_size=64)
    | st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1),
                   timezones=st.just(UTC)).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@pytest.fixture(scope="module")
def box() -> Iterator[IsoBox]:
    with IsoBox(mode="inprocess") as b:
        yield b


def _normal(value: Any) -> Any:
    """What a value becomes after the trip: tuples are lists, floats that are integral ints."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values)
def test_random_values_round_trip(box: IsoBox, value: Any) -> None:
    """Any value of the table comes back equal (integral floats come back as ints)."""
    assert box.run("v", sandbox={"v": value}) == _normal(value)
