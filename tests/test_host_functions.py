"""Host functions: Python callables that sandboxed JS calls (``functions={"name": fn}``).

Real worker processes ("process") and the in-process engine ("inprocess") where both apply.
Every call runs in this test process, so the host functions below may record what they saw.
Timing bounds are generous: the machine may be shared.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

import isobox
from isobox import AsyncIsoBox, IsoBox
from isobox import TimeoutError as BoxTimeoutError

MODES = ["process", "inprocess"]
HOST_PATH = "/srv/isobox-private/keys/service-account.json"
RECORDED: list[tuple[Any, ...]] = []


# -- host functions shared by the module's boxes ---------------------------------------------
def add(a: int, b: int) -> int:
    """Sum of two numbers."""
    return a + b


def echo(*args: Any) -> list[Any]:
    """Its arguments, as a list."""
    return list(args)


def record(*args: Any) -> int:
    """Remember the arguments; return how many there were."""
    RECORDED.append(args)
    return len(args)


def nothing(*_args: Any) -> None:
    """Return None (null in JS)."""


def give(key: str) -> Any:
    """One Python value of the value table, by name."""
    return GIVEN[key][0]


def bad_result() -> object:
    """A value that cannot cross into the sandbox."""
    return object()


def leak() -> None:
    """Raise with a host path and a host environment value in the message."""
    token = os.environ.get("ISOBOX_TEST_TOKEN", "")
    raise PermissionError(f"cannot read {HOST_PATH} with token {token}")


async def adouble(x: int) -> int:
    """Twice ``x``, after yielding to the event loop."""
    await asyncio.sleep(0.01)
    return x * 2


async def aboom() -> None:
    """An async function that raises."""
    await asyncio.sleep(0)
    raise KeyError("no such key")


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "add": add, "echo": echo, "record": record, "nothing": nothing, "give": give,
    "bad_result": bad_result, "leak": leak, "adouble": adouble, "aboom": aboom,
}

# name -> (Python value returned by give(), JS check that must hold for `v`)
GIVEN: dict[str, tuple[Any, str]] = {
    "int": (42, "v === 42"),
    "float": (2.5, "v === 2.5"),
    "nan": (math.nan, "Number.isNaN(v)"),
    "inf": (-math.inf, "v === -Infinity"),
    "big": (2**70, "v === 2n ** 70n"),
    "negbig": (-(2**60), "v === -(2n ** 60n)"),
    "str": ("h\u00e9\ud800\x00", "v === 'h\\u00e9\\ud800\\u0000'"),
    "bool": (True, "v === true"),
    "none": (None, "v === null"),
    "bytes": (b"\x00\xff", "v instanceof Uint8Array && v.length === 2 && v[1] === 255"),
    "bytearray": (bytearray(b"ab"), "v instanceof Uint8Array && v[0] === 97"),
    "aware": (datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC),
              "v instanceof Date && v.getTime() === Date.UTC(2020, 0, 2, 3, 4, 5)"),
    "naive": (datetime(2020, 1, 2), "v instanceof Date && v.getTime() === Date.UTC(2020, 0, 2)"),
    "tuple": ((1, "x"), "Array.isArray(v) && v[0] === 1 && v[1] === 'x'"),
    "dict": ({"a": [1, {"b": None}]}, "v.a[1].b === null && Object.keys(v).length === 1"),
    "tagkey": ({"$isobox": "u", "v": 1}, "v.$isobox === 'u' && v.v === 1"),
}


@pytest.fixture(scope="module", params=MODES)
def box(request: pytest.FixtureRequest) -> Iterator[IsoBox]:
    """A shared box (both modes) with the module's host functions."""
    with IsoBox(mode=request.param, timeout=5.0, memory_limit=32 * 2**20,
                pool={"min": 2, "max": 2}, functions=FUNCTIONS) as b:
        b.warmup_pool()
        yield b


@pytest.fixture
def recorded() -> Iterator[list[tuple[Any, ...]]]:
    """The argument tuples ``record()`` saw during one test."""
    RECORDED.clear()
    yield RECORDED
    RECORDED.clear()


def assert_serves(box: IsoBox) -> None:
    """The box still runs code and host functions correctly."""
    assert box.run("add(1, 2)") == 3


# -- calling --------------------------------------------------------------------------------
def test_sync_function_returns_its_value(box: IsoBox) -> None:
    """A sync host function is a plain JS function returning the callable's result."""
    assert box.run("add(2, 3) * 10") == 50
    assert box.run("[typeof add, add.name, add(add(1, 1), 1)]") == ["function", "add", 3]


def test_async_function_returns_a_promise(box: IsoBox) -> None:
    """An ``async def`` host function returns a Promise that resolves to its result."""
    assert box.run("[adouble(1) instanceof Promise, await adouble(21)]") == [True, 42]
    assert box.run("Promise.all([adouble(1), adouble(2), adouble(3)])") == [2, 4, 6]


def test_async_box_calls_sync_and_async_functions() -> None:
    """AsyncIsoBox (both modes) calls sync and async host functions, errors included."""
    async def main(mode: str) -> list[Any]:
        async with AsyncIsoBox(mode=mode, timeout=5.0, pool={"min": 1, "max": 1},
                               functions=FUNCTIONS) as ab:
            return [
                await ab.run("add(20, 22)"),
                await ab.run("await adouble(4)"),
                await ab.run("let m; try { await aboom() } catch (e) { m = e.message }; m"),
                await ab.run("let n; try { leak() } catch (e) { n = e.name }; n"),
            ]

    for mode in MODES:
        assert asyncio.run(main(mode)) == [
            42, 8, "host function aboom failed: KeyError: 'no such key'", "Error"], mode


# -- the value table ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("js", "expected"),
    [
        ("1, 2.5, 'x', true, null", (1, 2.5, "x", True, None)),
        ("undefined", (None,)),
        ("2n ** 70n, 5n, -0", (2**70, 5, 0)),
        ("new Uint8Array([1, 2, 255]), new Uint16Array([1]).buffer", (b"\x01\x02\xff", b"\x01\x00")),
        ("new Date(Date.UTC(2020, 0, 2))", (datetime(2020, 1, 2, tzinfo=UTC),)),
        ("[1, [2, {a: 'b'}]], {k: {n: null}}", ([1, [2, {"a": "b"}]], {"k": {"n": None}})),
        ("new Map([['k', 1]]), new Set([1, 2])", ({"k": 1}, [1, 2])),
        ("Infinity, -Infinity", (math.inf, -math.inf)),
        ("'\\ud800x\\u0000y'", ("\ud800x\x00y",)),
        ("({'$isobox': 'u', v: 1})", ({"$isobox": "u", "v": 1},)),
    ],
)
def test_arguments_follow_the_value_table(box: IsoBox, recorded: list[tuple[Any, ...]],
                                          js: str, expected: tuple[Any, ...]) -> None:
    """JS arguments reach the host function as the documented Python values."""
    assert box.run(f"record({js})") == len(expected)
    assert recorded == [expected]


def test_nan_argument_is_a_float_nan(box: IsoBox, recorded: list[tuple[Any, ...]]) -> None:
    """NaN reaches the host function as a float NaN."""
    box.run("record(NaN)")
    assert len(recorded) == 1
    assert math.isnan(recorded[0][0])


@pytest.mark.parametrize("key", sorted(GIVEN))
def test_results_follow_the_value_table(box: IsoBox, key: str) -> None:
    """Host results become the documented JS values."""
    check = GIVEN[key][1]
    assert box.run(f"const v = give({key!r}); {check}") is True


def test_values_round_trip_through_a_host_function(box: IsoBox) -> None:
    """Special values survive JS -> Python -> JS -> Python unchanged."""
    code = """
        const [u8, d, big, m, nested] = echo(new Uint8Array([1, 2]), new Date(86400000),
                                             2n ** 64n, new Map([['a', 1]]), {x: [1, null]});
        [u8 instanceof Uint8Array && u8[1] === 2, d instanceof Date && d.getTime() === 86400000,
         big === 2n ** 64n, m.a === 1, nested.x[1] === null, u8, d, big, nested]
    """
    assert box.run(code) == [True, True, True, True, True, b"\x01\x02",
                             datetime(1970, 1, 2, tzinfo=UTC), 2**64, {"x": [1, None]}]


def test_none_and_undefined_arguments(box: IsoBox, recorded: list[tuple[Any, ...]]) -> None:
    """undefined and null arguments arrive as None; missing ones are simply absent."""
    code = "[record(), record(undefined), record(null, undefined), record({a: undefined}), " \
           "record([1, , 3])]"
    assert box.run(code) == [0, 1, 2, 1, 1]
    assert recorded == [(), (None,), (None, None), ({"a": None},), ([1, None, 3],)]
    assert box.run("[nothing() === null, typeof nothing(undefined)]") == [True, "object"]


# -- errors ---------------------------------------------------------------------------------
def test_function_argument_is_a_catchable_type_error(
        box: IsoBox, recorded: list[tuple[Any, ...]]) -> None:
    """A JS function as an argument throws a catchable TypeError; the host is not called."""
    code = """
        let caught;
        try { record(() => 1) } catch (e) { caught = [e instanceof TypeError, e.message] }
        caught.concat(add(1, 1))
    """
    is_type_error, message, after = box.run(code)
    assert is_type_error is True
    assert "host function record" in message
    assert "arguments[0] is a function" in message
    assert after == 2
    assert recorded == []


def test_function_argument_to_an_async_function_rejects(box: IsoBox) -> None:
    """An async host function given a JS function rejects with the same TypeError."""
    code = "let m; try { await adouble({f() {}}) } catch (e) { m = [e.name, e.message] }; m"
    name, message = box.run(code)
    assert name == "TypeError"
    assert "host function adouble" in message
    assert "arguments[0].f is a function" in message


def test_raising_function_is_a_catchable_sanitized_error(
        box: IsoBox, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python exception becomes a catchable JS Error with paths and env values scrubbed."""
    marker = "tok-3f9a1c77e2b4d5"
    monkeypatch.setenv("ISOBOX_TEST_TOKEN", marker)
    code = """
        let caught;
        try { leak() } catch (e) { caught = [e instanceof Error, e.name, e.message] }
        caught.concat(add(2, 2))
    """
    is_error, name, message, after = box.run(code)
    assert is_error is True
    assert name == "Error"
    assert message.startswith("host function leak failed: PermissionError: cannot read ")
    assert HOST_PATH not in message
    assert "isobox-private" not in message
    assert marker not in message
    assert "<path>" in message
    assert "<redacted>" in message
    assert after == 4


def test_uncaught_host_error_fails_the_run_with_its_message(box: IsoBox) -> None:
    """A host error the script does not catch is the run's ScriptError."""
    with pytest.raises(isobox.ScriptError) as info:
        box.run("aboom()")
    assert info.value.message == "host function aboom failed: KeyError: 'no such key'"
    assert_serves(box)


def test_unconvertible_result_is_a_catchable_error(box: IsoBox) -> None:
    """A result that cannot cross becomes a catchable Error mentioning 'cannot cross'."""
    code = "let m; try { bad_result() } catch (e) { m = [e.name, e.message] } m.concat(add(1, 2))"
    name, message, after = box.run(code)
    assert name == "Error"
    assert "bad_result" in message
    assert "cannot cross" in message
    assert after == 3


# -- limits ---------------------------------------------------------------------------------
def test_ten_thousand_calls_in_one_run(box: IsoBox) -> None:
    """10,000 sync calls in one run all happen, in order, with the right sum."""
    code = "let s = 0; for (let i = 0; i < 10000; i++) s += add(i, 1); s"
    assert box.run(code, timeout=30.0) == sum(range(1, 10001))


def test_max_host_calls_caps_calls_per_run(box: IsoBox) -> None:
    """Past max_host_calls a call throws a catchable RangeError; the count is per run."""
    code = """
        let n = 0, err;
        try { for (;;) { add(1, 1); n++ } } catch (e) { err = [e instanceof RangeError, e.message] }
        [n, ...err]
    """
    n, is_range, message = box.run(code, max_host_calls=50)
    assert (n, is_range) == (50, True)
    assert "host call limit" in message
    counted = "let s = 0; for (let i = 0; i < 5; i++) s += add(i, 0); s"
    assert box.run(counted, max_host_calls=5) == 10
    assert box.run(counted, max_host_calls=5) == 10


def test_max_host_calls_counts_async_calls(box: IsoBox) -> None:
    """Async calls count too: past the cap the returned Promise rejects with a RangeError."""
    code = """
        let n = 0, name;
        try { for (;;) { await adouble(1); n++ } } catch (e) { name = e.name }
        [n, name]
    """
    assert box.run(code, max_host_calls=3) == [3, "RangeError"]


def test_max_host_calls_box_option() -> None:
    """max_host_calls set on the box applies to every run (and a run may raise it)."""
    with IsoBox(timeout=5.0, pool={"min": 1, "max": 1}, functions={"add": add},
                max_host_calls=3) as b:
        code = "let n = 0; try { for (;;) { add(1, 1); n++ } } catch (e) { }; n"
        assert b.run(code) == 3
        assert b.run(code, max_host_calls=7) == 7


def test_sync_host_functions_are_bounded_by_the_wall_timeout() -> None:
    """With sync host functions bound there is no CPU limit, but the watchdog ends the run."""
    with IsoBox(timeout=5.0, pool={"min": 1, "max": 1}, functions={"add": add}) as b:
        started = time.monotonic()
        with pytest.raises(BoxTimeoutError) as info:
            b.run("for (;;) { add(1, 1) }", timeout=0.5)
        assert info.value.kind == "wall"
        assert time.monotonic() - started < 5.0
        assert b.run("add(1, 2)") == 3


# -- a host function that blocks ------------------------------------------------------------
def sleeper(seconds: float) -> Callable[[], int]:
    """A host function that blocks for ``seconds``."""
    def sleep() -> int:
        time.sleep(seconds)
        return 1

    return sleep


@pytest.mark.timeout(30)
def test_blocking_function_past_the_timeout_is_a_wall_timeout() -> None:
    """A host function blocking past ``timeout`` fails the run with a wall TimeoutError; the
    worker is replaced and the box keeps serving."""
    with IsoBox(timeout=5.0, pool={"min": 1, "max": 1},
                functions={"sleep": sleeper(1.5), "add": add}) as b:
        b.warmup_pool()
        before = b.execute("add(1, 1)").worker_pid
        with pytest.raises(BoxTimeoutError) as info:
            b.run("sleep()", timeout=0.5)
        assert info.value.kind == "wall"
        after = b.execute("add(1, 2)")
        assert after.value == 3
        assert after.worker_pid != before
        assert b.get_history()[-2].status == "timeout"


@pytest.mark.timeout(30)
def test_blocking_function_times_out_at_the_deadline() -> None:
    """The wall timeout ends a run whose sync host function blocks, at about ``timeout``."""
    with IsoBox(timeout=5.0, pool={"min": 1, "max": 1}, functions={"sleep": sleeper(3.0)}) as b:
        b.warmup_pool()
        started = time.monotonic()
        with pytest.raises(BoxTimeoutError):
            b.run("sleep()", timeout=0.5)
        assert time.monotonic() - started < 2.0


@pytest.mark.timeout(30)
def test_async_box_times_out_a_blocking_function_at_the_deadline() -> None:
    """In AsyncIsoBox a blocking sync host function is cut off at about the wall timeout."""
    async def main() -> float:
        async with AsyncIsoBox(timeout=5.0, pool={"min": 1, "max": 1},
                               functions={"sleep": sleeper(3.0), "add": add}) as ab:
            await ab.warmup_pool()
            started = time.monotonic()
            with pytest.raises(BoxTimeoutError) as info:
                await ab.run("sleep()", timeout=0.5)
            elapsed = time.monotonic() - started
            assert info.value.kind == "wall"
            assert await ab.run("add(2, 2)") == 4
            return elapsed

    assert asyncio.run(main()) < 2.5


# -- where functions come from --------------------------------------------------------------
def test_box_session_and_run_functions_merge() -> None:
    """Functions merge run over session over box; session ones stay in their session."""
    def named(who: str) -> Callable[[], str]:
        def fn() -> str:
            return who

        return fn

    with IsoBox(timeout=5.0, pool={"min": 1, "max": 1},
                functions={"who": named("box"), "boxonly": named("b")}) as b:
        assert b.run("[who(), boxonly(), typeof sessiononly]") == ["box", "b", "undefined"]
        assert b.run("[who(), boxonly()]", functions={"who": named("run")}) == ["run", "b"]
        with b.create_session("merge", functions={"who": named("session"),
                                                  "sessiononly": named("s")}) as s:
            assert s.run("[who(), boxonly(), sessiononly()]") == ["session", "b", "s"]
            assert s.run("[who(), sessiononly(), runonly()]",
                         functions={"who": named("run"), "runonly": named("r")}) == [
                             "run", "s", "r"]
            # A run's own function does not outlive its run (the session keeps its global).
            assert s.run("typeof runonly") == "undefined"
            assert s.run("who()") == "session"
        assert b.run("[who(), typeof sessiononly]") == ["box", "undefined"]


def test_session_host_functions_in_process_and_inprocess() -> None:
    """Session functions work in both modes, with the call cap counted per run."""
    for mode in MODES:
        with IsoBox(mode=mode, timeout=5.0, pool={"min": 1, "max": 1}) as b, \
                b.create_session("s", functions={"add": add}, max_host_calls=2) as s:
            assert s.run("x = add(1, 2); x") == 3
            assert s.run("add(x, 1) + add(x, 2)") == 9
            assert s.run("let n = 0; try { for (;;) { add(0, 0); n++ } } catch (e) {}; n") == 2


# -- concurrency ----------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_async_calls_overlap_in_the_async_box() -> None:
    """In AsyncIsoBox, async host calls awaited together with Promise.all run concurrently."""
    async def nap(x: int) -> int:
        await asyncio.sleep(0.4)
        return x

    async def main() -> tuple[Any, float]:
        async with AsyncIsoBox(timeout=10.0, pool={"min": 1, "max": 1},
                               functions={"nap": nap}) as ab:
            await ab.warmup_pool()
            started = time.monotonic()
            value = await ab.run("await Promise.all([nap(1), nap(2), nap(3), nap(4)])")
            return value, time.monotonic() - started

    value, elapsed = asyncio.run(main())
    assert value == [1, 2, 3, 4]
    assert 0.35 < elapsed < 1.2  # one after another would take 1.6 s


# -- names ----------------------------------------------------------------------------------
BAD_NAMES = ["1abc", "a-b", "", "has space", "console", "setTimeout", "setInterval",
             "clearTimeout", "clearInterval", "queueMicrotask", "globalThis", "eval", "process"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_value_errors(box: IsoBox, name: str) -> None:
    """Names that are not JS identifiers or are reserved raise ValueError, everywhere."""
    with pytest.raises(ValueError, match="host function name"):
        IsoBox(functions={name: add})
    with pytest.raises(ValueError, match="host function name"):
        box.run("1", functions={name: add})
    with pytest.raises(ValueError, match="host function name"):
        box.create_session(f"bad-{name}", functions={name: add})
    assert box.run("add(1, 1)") == 2


def test_non_callables_are_type_errors(box: IsoBox) -> None:
    """A non-callable value, a non-str name or a non-dict table raise TypeError or ValueError."""
    with pytest.raises(TypeError, match="not callable"):
        IsoBox(functions={"f": 42})
    with pytest.raises(TypeError, match="not callable"):
        box.run("1", functions={"f": "print"})
    with pytest.raises(TypeError, match="dict"):
        IsoBox(functions=[("f", add)])
    with pytest.raises(ValueError, match="not a JS identifier"):
        IsoBox(functions={3: add})


def test_dollar_and_underscore_names_work(box: IsoBox) -> None:
    """Any JS identifier that is not reserved may name a host function."""
    fns = {"$fetch": add, "_private": add, "camelCase9": add}
    assert box.run("[$fetch(1, 1), _private(2, 2), camelCase9(3, 3)]", functions=fns) == [2, 4, 6]


@pytest.mark.parametrize("name", ["undefined", "NaN", "Infinity"])
def test_unbindable_global_names_are_rejected_or_work(box: IsoBox, name: str) -> None:
    """A name the sandbox cannot bind is refused up front, or the run still works."""
    try:
        value = box.run("1 + 1", functions={name: add})
    except ValueError:
        return
    assert value == 2


# -- from timers and streams ----------------------------------------------------------------
def test_host_function_called_from_a_timer_callback(box: IsoBox) -> None:
    """Sync and async host functions work inside timer and interval callbacks."""
    code = "await new Promise(r => setTimeout(() => r(add(40, 2)), 10))"
    assert box.run(code) == 42
    code = "await new Promise(r => setTimeout(async () => r(await adouble(21)), 10))"
    assert box.run(code) == 42
    code = """
        let s = 0;
        await new Promise(r => {
            let n = 0;
            const id = setInterval(() => { s = add(s, n); if (++n === 5) { clearInterval(id); r() } }, 2);
        });
        s
    """
    assert box.run(code) == 10


def test_host_function_called_inside_a_stream(box: IsoBox) -> None:
    """A sync host function works inside a streaming generator, around timers too."""
    assert list(box.run_stream("for (let i = 0; i < 4; i++) yield add(i, i)")) == [0, 2, 4, 6]
    code = """
        for (let i = 0; i < 3; i++) {
            await new Promise(r => setTimeout(r, 5));
            yield echo(i, 'x');
        }
    """
    assert list(box.run_stream(code)) == [[0, "x"], [1, "x"], [2, "x"]]


@pytest.mark.timeout(30)
def test_async_host_function_awaited_inside_a_stream(box: IsoBox) -> None:
    """An async host function awaited inside a streaming generator resolves."""
    code = "for (let i = 0; i < 3; i++) yield await adouble(i)"
    assert list(box.run_stream(code, timeout=1.5)) == [0, 2, 4]


@pytest.mark.timeout(30)
def test_host_function_called_inside_an_async_box_stream() -> None:
    """AsyncIsoBox streams call sync host functions too."""
    async def main() -> list[Any]:
        async with AsyncIsoBox(timeout=5.0, pool={"min": 1, "max": 1},
                               functions={"add": add}) as ab:
            return [v async for v in ab.run_stream("for (let i = 0; i < 3; i++) yield add(i, 10)")]

    assert asyncio.run(main()) == [10, 11, 12]


# -- sanitizing -----------------------------------------------------------------------------
def test_env_value_containing_another_env_value_is_fully_redacted(
        box: IsoBox, monkeypatch: pytest.MonkeyPatch) -> None:
    """An env value (a DB URL) that contains another env value (its user) is fully redacted."""
    monkeypatch.setenv("ISOBOX_TEST_DB_USER", "alice_admin_01")
    url = "postgres://alice_admin_01:hunter2-pass-9@db.internal:5432/app"
    monkeypatch.setenv("ISOBOX_TEST_DB_URL", url)

    def connect() -> None:
        raise ConnectionError(f"cannot reach {os.environ['ISOBOX_TEST_DB_URL']}")

    code = "let m; try { connect() } catch (e) { m = e.message }; m"
    message = box.run(code, functions={"connect": connect})
    assert message.startswith("host function connect failed: ConnectionError: cannot reach ")
    assert "alice_admin_01" not in message
    assert "hunter2-pass-9" not in message
