"""Hostile values aimed at the trusted prelude itself: thrown Proxies, replaced built-ins,
prototype toJSON, forged tags. Each must end in a typed error within the run's budget, caps
intact, in both modes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import isobox
from isobox import IsoBox


@pytest.fixture(scope="module", params=["process", "inprocess"])
def box(request: pytest.FixtureRequest) -> Iterator[IsoBox]:
    with IsoBox(mode=request.param, timeout=3.0, pool={"min": 2, "max": 2},
                max_error_size=1024, max_console_size=10_000) as b:
        yield b


LOOPING_TOSTRING = "{ toString() { for (;;) {} } }"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("code", [
    f"throw new Proxy({{}}, {{ getPrototypeOf() {{ throw {LOOPING_TOSTRING} }} }})",
    f"Object.defineProperty(InternalError, Symbol.hasInstance, {{ value() {{ throw {LOOPING_TOSTRING} }} }}); throw 1",
    f"Object.defineProperty(Error, Symbol.hasInstance, {{ value() {{ throw {LOOPING_TOSTRING} }} }}); throw new Error('x')",
    "throw new Proxy({}, { get() { for (;;) {} } })",
    "throw new Proxy(new Error('x'), { getPrototypeOf() { throw 'trap' } })",
])
def test_hostile_thrown_values_never_escape_the_budget(box: IsoBox, code: str) -> None:
    """A thrown value whose traps throw or loop gives a typed error within the budget."""
    started = time.monotonic()
    with pytest.raises(isobox.IsoBoxError):
        box.run(code, timeout=1.0)
    assert time.monotonic() - started < 2.5
    assert box.run("1 + 2") == 3


def test_throw_null_is_reported_as_memory_exhaustion(box: IsoBox) -> None:
    """Documented limitation: QuickJS throws null when it runs out of memory, so an uncaught
    null is reported as MemoryLimitError."""
    with pytest.raises(isobox.MemoryLimitError):
        box.run("throw null")


def test_prototype_tojson_cannot_inflate_console_past_its_cap(box: IsoBox) -> None:
    """A toJSON on Array.prototype cannot smuggle more console output than the cap."""
    code = ("console.log('a'); let d = false; Array.prototype.toJSON = function () { "
            "if (d) return this; d = true; return [['log', 'x'.repeat(5e6)]] }; 1")
    with pytest.raises(isobox.MemoryLimitError, match="console"):
        box.run(code)


def test_prototype_tojson_cannot_inflate_an_error_past_its_cap(box: IsoBox) -> None:
    """A toJSON on Object.prototype cannot inflate an error message past max_error_size."""
    code = ("Object.prototype.toJSON = () => ({name: 'E', message: 'y'.repeat(5e6), stack: ''});"
            " throw new Error('small')")
    with pytest.raises(isobox.ScriptError) as info:
        box.run(code)
    assert len(info.value.message) < 1100


def test_unserializable_path_is_capped(box: IsoBox) -> None:
    """A SerializationError naming a 5 MB key is clipped to max_error_size."""
    with pytest.raises(isobox.SerializationError) as info:
        box.run("({['k'.repeat(5e6)]: () => 1})")
    assert len(str(info.value)) < 1100


@pytest.mark.parametrize("tag", ["big", "num", "bytes", "date", "u", "obj"])
def test_maps_cannot_forge_tags(box: IsoBox, tag: str) -> None:
    """A Map whose keys look like a tag comes back as the plain dict it is."""
    assert box.run(f"new Map([['$isobox', '{tag}'], ['v', 'zz']])") == {"$isobox": tag, "v": "zz"}


def test_promise_reactions_run_even_for_plain_results(box: IsoBox) -> None:
    """then() callbacks queued by a script with a plain result still run, output included."""
    result = box.execute("Promise.resolve().then(() => console.log('then ran')); 'sync'")
    assert result.value == "sync"
    assert result.console == [("log", "then ran")]
