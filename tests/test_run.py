"""Running code: values both ways, errors, limits, console, globals — in both modes.

Every test runs against a real worker process ("process") and the in-process engine
("inprocess"): the same results and the same errors are part of the contract.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

import isobox
from isobox import IsoBox


@pytest.fixture(scope="module", params=["process", "inprocess"])
def box(request: pytest.FixtureRequest) -> Iterator[IsoBox]:
    with IsoBox(mode=request.param, timeout=5.0, memory_limit=32 * 2**20,
                pool={"min": 2, "max": 2}) as b:
        b.warmup_pool()
        yield b


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("1 + 2", 3),
        ("'a' + 'b'", "ab"),
        ("[1, 'x', null, true, 2.5]", [1, "x", None, True, 2.5]),
        ("({a: {b: [1]}})", {"a": {"b": [1]}}),
        ("undefined", None),
        ("null", None),
        ("({a: undefined})", {"a": None}),
        ("2n ** 70n", 2**70),
        ("5n", 5),
        ("new Uint8Array([1, 2, 255])", b"\x01\x02\xff"),
        ("new Uint16Array([1]).buffer", b"\x01\x00"),
        ("new DataView(new Uint8Array([7, 8]).buffer, 1)", b"\x08"),
        ("new Date(Date.UTC(2020, 0, 2))", datetime(2020, 1, 2, tzinfo=UTC)),
        ("Infinity", math.inf),
        ("-Infinity", -math.inf),
        ("new Map([['k', 1]])", {"k": 1}),
        ("new Set([1, 2])", [1, 2]),
        ("'\\ud800x\\u0000y'", "\ud800x\x00y"),
        ("({'$isobox': 'u', v: 1})", {"$isobox": "u", "v": 1}),
        ("Number.MAX_SAFE_INTEGER + 2", 9007199254740992),
        ("-0", 0),
    ],
)
def test_results_follow_the_value_table(box: IsoBox, code: str, expected: object) -> None:
    """JS results come back as the documented Python values."""
    assert box.run(code) == expected


def test_nan_comes_back_as_float_nan(box: IsoBox) -> None:
    """NaN crosses as a float NaN."""
    assert math.isnan(box.run("NaN"))


@pytest.mark.parametrize(
    ("value", "check"),
    [
        (2**70, "typeof v === 'bigint' && v === 2n ** 70n"),
        (b"\x00\x01", "v instanceof Uint8Array && v.length === 2 && v[1] === 1"),
        (datetime(2021, 5, 6, tzinfo=UTC), "v instanceof Date && v.getUTCFullYear() === 2021"),
        (math.nan, "Number.isNaN(v)"),
        (-math.inf, "v === -Infinity"),
        ("a\x00\ud800", "v.length === 3 && v.charCodeAt(1) === 0 && v.charCodeAt(2) === 0xd800"),
        ({"$isobox": "big", "v": "1"}, "v.$isobox === 'big' && v.v === '1'"),
        ((1, 2), "Array.isArray(v) && v.length === 2"),
        (None, "v === null"),
    ],
)
def test_inputs_follow_the_value_table(box: IsoBox, value: object, check: str) -> None:
    """Python sandbox values arrive in JS as the documented JS values."""
    assert box.run(check, sandbox={"v": value}) is True


def test_values_round_trip(box: IsoBox) -> None:
    """A mixed structure survives Python -> JS -> Python."""
    data = {"n": [1, 2.5, 2**60], "b": b"\x00", "d": datetime(2000, 1, 1, tzinfo=UTC), "s": "é"}
    assert box.run("v", sandbox={"v": data}) == data


def test_each_run_starts_clean(box: IsoBox) -> None:
    """Globals defined by one run are invisible to the next."""
    box.run("globalThis.leak = 1; var v1 = 2; Object.prototype.polluted = 3")
    assert box.run("[typeof leak, typeof v1, ({}).polluted]") == ["undefined", "undefined", None]


def test_safe_globals(box: IsoBox) -> None:
    """No process, require, Buffer, std or os unless provided."""
    names = ["process", "require", "Buffer", "std", "os", "module", "exports"]
    assert box.run(f"{names!r}.map(n => typeof globalThis[n])") == ["undefined"] * len(names)


def test_env_is_exposed_read_only(box: IsoBox) -> None:
    """env= appears as a frozen process.env, and process has nothing else."""
    mode = "inprocess" if not box.pool_stats().workers else "process"
    with IsoBox(mode=mode, env={"A": "1"}, pool={"min": 1, "max": 1}) as with_env:
        code = "'use strict'; let e = ''; try { process.env.A = 'x' } catch (x) { e = x.name }; [process.env.A, e, Object.keys(process)]"
        assert with_env.run(code) == ["1", "TypeError", ["env"]]


def test_top_level_await_keeps_the_completion_value(box: IsoBox) -> None:
    """Top-level await works and the last expression is the result."""
    assert box.run("const x = await Promise.resolve(20);\nlet y = x + 1;\ny * 2") == 42
    assert box.run("await null; 'done';") == "done"


def test_promise_results_are_awaited(box: IsoBox) -> None:
    """A promise as completion value resolves to its value."""
    assert box.run("(async () => { await 0; return 7 })()") == 7


def test_rejected_promise_is_a_script_error(box: IsoBox) -> None:
    """A rejection surfaces as ScriptError with the JS error's name."""
    with pytest.raises(isobox.ScriptError) as info:
        box.run("await Promise.reject(new RangeError('nope'))")
    assert (info.value.name, info.value.message) == ("RangeError", "nope")


def test_unsettled_promise_is_reported(box: IsoBox) -> None:
    """A promise that can never settle is an error, not a hang."""
    with pytest.raises(isobox.ScriptError, match="never settled"):
        box.run("await new Promise(() => {})")


def test_script_error_carries_name_message_and_sandbox_stack(box: IsoBox) -> None:
    """Thrown errors keep name, message and a stack naming only sandbox frames."""
    with pytest.raises(isobox.ScriptError) as info:
        box.run("function inner() { throw new TypeError('bad') }\ninner()")
    err = info.value
    assert (err.name, err.message) == ("TypeError", "bad")
    assert "inner" in err.stack
    assert "isobox" not in err.stack
    assert "/" not in err.stack


def test_thrown_non_errors_become_script_errors(box: IsoBox) -> None:
    """Throwing a string or an object still gives ScriptError with a readable message."""
    with pytest.raises(isobox.ScriptError, match="boom"):
        box.run("throw 'boom'")
    with pytest.raises(isobox.ScriptError, match='"code":1'):
        box.run("throw {code: 1}")


def test_compile_error_has_line_and_column(box: IsoBox) -> None:
    """Syntax errors raise CompileError at the user's line and column."""
    with pytest.raises(isobox.CompileError) as info:
        box.run("let a = 1;\nlet b = ;")
    assert (info.value.line, info.value.column) == (2, 9)
    with pytest.raises(isobox.CompileError) as info:
        box.run("await 1;\nlet b = ;")
    assert info.value.line == 2


def test_runtime_syntax_error_is_not_a_compile_error(box: IsoBox) -> None:
    """JSON.parse failing at run time is a ScriptError named SyntaxError, not CompileError."""
    with pytest.raises(isobox.ScriptError) as info:
        box.run("JSON.parse('{')")
    assert info.value.name == "SyntaxError"
    assert not isinstance(info.value, isobox.CompileError)


@pytest.mark.parametrize(
    ("code", "path"),
    [("({f() {}})", "result.f"), ("[1, Symbol('s')]", "result[1]"),
     ("let o = {a: {}}; o.a.back = o; o", "result.a.back")],
)
def test_unserializable_results_name_the_path(box: IsoBox, code: str, path: str) -> None:
    """Functions, symbols and cycles raise SerializationError naming the path."""
    with pytest.raises(isobox.SerializationError) as info:
        box.run(code)
    assert info.value.path == path


def test_cpu_timeout(box: IsoBox) -> None:
    """A busy loop ends with TimeoutError(kind='cpu') near the limit."""
    with pytest.raises(isobox.TimeoutError) as info:
        box.run("while (true) {}", timeout=0.2)
    assert info.value.kind in ("cpu", "wall")
    assert isinstance(info.value, TimeoutError)  # also the builtin
    assert box.run("1") == 1


def test_microtask_flood_is_bounded_by_the_whole_run_budget(box: IsoBox) -> None:
    """An endless await chain cannot reset the budget per job."""
    with pytest.raises(isobox.TimeoutError):
        box.run("(async () => { for (;;) await 0 })()", timeout=0.3)


def test_memory_limit(box: IsoBox) -> None:
    """Allocating past the heap limit raises MemoryLimitError with the limit."""
    with pytest.raises(isobox.MemoryLimitError) as info:
        box.run("const a = []; while (true) a.push('x'.repeat(1000) + a.length)",
                memory_limit=8 * 2**20)
    assert info.value.limit == 8 * 2**20
    assert box.run("2") == 2


def test_stack_limit(box: IsoBox) -> None:
    """Deep recursion is a catchable RangeError, reported as ScriptError."""
    with pytest.raises(isobox.ScriptError) as info:
        box.run("function f() { return f() + 1 } f()", stack_limit=256 * 1024)
    assert info.value.name == "RangeError"


def test_result_size_cap() -> None:
    """A result over max_result_size raises SerializationError naming the cap."""
    with IsoBox(mode="inprocess", max_result_size=1000) as small, \
            pytest.raises(isobox.SerializationError, match="exceeds the cap of 1000"):
        small.run("'x'.repeat(5000)")


def test_input_size_cap(box: IsoBox) -> None:
    """A sandbox value over max_input_size is refused before it is sent."""
    with IsoBox(mode="inprocess", max_input_size=1000) as small, \
            pytest.raises(isobox.SerializationError, match="exceeds the cap"):
        small.run("1", sandbox={"s": "x" * 5000})


def test_error_message_cap() -> None:
    """A huge error message is truncated to max_error_size, not copied whole."""
    with IsoBox(mode="inprocess", max_error_size=100) as small, \
            pytest.raises(isobox.ScriptError) as info:
        small.run("throw new Error('m'.repeat(100000))")
    assert len(info.value.message) < 200
    assert info.value.message.endswith("[truncated]")


def test_console_output_cap() -> None:
    """Console output past max_console_size fails the run with MemoryLimitError."""
    with IsoBox(mode="inprocess", max_console_size=10_000) as small, \
            pytest.raises(isobox.MemoryLimitError, match="console output"):
        small.run("for (let i = 0; i < 1000; i++) console.log('line ' + i)")


def test_console_is_captured_in_order(box: IsoBox) -> None:
    """console methods are captured with their kind, in order, objects as JSON."""
    result = box.execute("console.log('a', 1); console.warn({x: [1]}); console.error('e'); 5")
    assert result.console == [("log", "a 1"), ("warn", '{"x":[1]}'), ("error", "e")]
    assert result.value == 5


def test_console_off_captures_nothing(box: IsoBox) -> None:
    """console='off' drops output."""
    assert box.execute("console.log('a'); 1", console="off").console == []


def test_execution_result_fields(box: IsoBox) -> None:
    """ExecutionResult carries type, duration, cpu time, heap and the worker pid."""
    result = box.execute("[1, 2]")
    assert result.type == "array"
    assert result.duration > 0
    assert result.cpu_time >= 0
    assert result.memory > 0
    assert (result.worker_pid is None) == (box.pool_stats().workers == [])


def test_on_output_receives_lines(box: IsoBox) -> None:
    """on_output(kind, message) gets every line."""
    seen: list[tuple[str, str]] = []
    box.execute("console.log('x'); console.info('y')", on_output=lambda k, m: seen.append((k, m)))
    assert seen == [("log", "x"), ("info", "y")]


def test_validate_code(box: IsoBox) -> None:
    """validate_code parses without running and reports CompileError positions."""
    assert box.validate_code("while (true) {}").valid
    assert box.validate_code("await fetchIt(); 1").valid
    bad = box.validate_code("let x = 1;\nlet = = 2")
    assert not bad.valid
    assert isinstance(bad.error, isobox.CompileError)
    assert bad.error.line == 2


@pytest.mark.parametrize("size", [1000, 5000, 200_000])
def test_long_concatenated_results(box: IsoBox, size: int) -> None:
    """Long results built by concatenation (QuickJS ropes) come back whole."""
    assert box.run(f"'a'.repeat({size} / 2) + 'b'.repeat({size} / 2)") == "a" * (size // 2) + "b" * (size // 2)
    assert box.run(f"[('x'.repeat({size}) + 'y')]") == ["x" * size + "y"]
    with pytest.raises(isobox.ScriptError) as info:
        box.run(f"throw new Error('m'.repeat(500) + 'n'.repeat({size} % 60000))")
    assert info.value.message.startswith("m" * 500)


def test_failing_on_output_handler_does_not_break_the_run(box: IsoBox) -> None:
    """An on_output handler that raises is logged; the run still returns its value."""
    def bad(kind: str, message: str) -> None:
        raise RuntimeError("handler bug")
    assert box.execute("console.log('x'); 5", on_output=bad).value == 5
    assert box.run("1") == 1


def test_dates_are_exact_to_the_millisecond(box: IsoBox) -> None:
    """Dates before 1970 and far ahead keep their exact millisecond; sub-ms is truncated."""
    for value in (datetime(1901, 1, 1, 0, 0, 0, 4000, tzinfo=UTC),
                  datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)):
        assert box.run("v", sandbox={"v": value}) == value
    assert box.run("v", sandbox={"v": datetime(2000, 1, 1, 0, 0, 0, 1999, tzinfo=UTC)}) == \
        datetime(2000, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)


def test_dates_python_cannot_hold_are_serialization_errors(box: IsoBox) -> None:
    """An Invalid Date, or one past year 9999, raises SerializationError."""
    with pytest.raises(isobox.SerializationError, match="Invalid Date"):
        box.run("new Date(NaN)")
    with pytest.raises(isobox.SerializationError, match="outside"):
        box.run("new Date(8.64e15)")


def test_console_can_be_replaced_and_deleted(box: IsoBox) -> None:
    """The lazily built console behaves like a global: replaceable, deletable, stable."""
    assert box.run("typeof console + (console === console)") == "objecttrue"
    assert box.run("console = {log: (x) => x * 2}; console.log(21)") == 42
    assert box.run("delete globalThis.console; typeof console") == "undefined"
    assert box.execute("console.log.call(null, 'unbound'); 1").console == [("log", "unbound")]
