"""run_stream end to end: real worker processes (and in-process mode for the basic cases).

What is pinned here: what a snippet streams (top-level ``yield``, iterables, async iterators,
the value table), that values arrive while the code still runs, credit flow control (a slow
consumer pauses an infinite producer), early exit (break, close, aclose, task cancellation)
running the iterator's ``finally`` and releasing the worker, bounded closes, stream timeouts,
typed errors at the point of iteration, worker death mid-stream, call-time validation,
sessions and throughput. Most tests use a pool of exactly one worker so "the same worker served
the next run" is checkable with ``execute("1").worker_pid``. Timing bounds are generous: the
machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psutil
import pytest

from isobox import (
    AsyncIsoBox,
    ClosedError,
    IsoBox,
    MemoryLimitError,
    ScriptError,
    SerializationError,
    SessionError,
    WorkerCrashedError,
)
from isobox import TimeoutError as BoxTimeoutError

POOL1 = {"min": 1, "max": 1}
MODES = ("process", "inprocess")
SLACK = 2  # values a producer may make beyond consumed + window (rounding in credit batches)

# An endless generator whose `finally` reports through the console when return() ran.
ENDLESS = "try { let i = 0; while (true) yield i++ } finally { console.log('finally ran') }"
# Yields once, then waits 10 s for a timer: a consumer asking for more waits on the worker.
STALLED = ("try { yield 0; await new Promise(r => setTimeout(r, 10000)); yield 1 }"
           " finally { console.log('finally ran') }")
# return() never finishes: a JS loop (interruptible) or a native loop that ignores the interrupt.
STUBBORN_JS = "try { while (true) yield 1 } finally { while (true) {} }"
STUBBORN_NATIVE = "try { while (true) yield 1 } finally { [].reverse.call({length: 2**53 - 1}) }"
# 20 ms of CPU per value: slow enough to kill the worker in the middle.
TICKING = "let i = 0; while (true) { const t = Date.now(); while (Date.now() - t < 20) {} yield i++ }"
FIRST_THEN_BUSY = ("yield 'first'; const t = Date.now(); while (Date.now() - t < 3000) {}"
                   " yield 'second'")
PRODUCER = ("let i = 0; while (true) { console.log('made ' + i);"
            " yield {i: i++, at: Date.now()} }")
MEMORY_BOMB = "yield 1; const a = []; while (true) a.push(new Array(100000).fill(1))"


# -- helpers ---------------------------------------------------------------------------------
class Lines:
    """An ``on_output`` handler that keeps the console lines it was given, in order."""

    def __init__(self) -> None:
        self._items: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str) -> None:
        with self._lock:
            self._items.append((kind, message))

    def messages(self) -> list[str]:
        with self._lock:
            return [message for _kind, message in self._items]

    def count(self, prefix: str) -> int:
        return sum(1 for message in self.messages() if message.startswith(prefix))


def worker_cpu(pid: int) -> float:
    """User plus system CPU seconds the worker ``pid`` has used so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def busy_pid(box: IsoBox) -> int:
    """The pid of the one busy worker (pool max 1, a stream running)."""
    busy = [w.pid for w in box.pool_stats().workers if w.state == "busy"]
    assert len(busy) == 1, box.pool_stats()
    return busy[0]


def assert_serves(box: IsoBox) -> int | None:
    """The box still runs code correctly; returns the worker pid that ran it."""
    result = box.execute("1 + 2")
    assert result.value == 3
    return result.worker_pid


def assert_same_worker_promptly(box: IsoBox, pid: int | None) -> None:
    """The next run is served at once by the worker ``pid`` (it was released, not killed)."""
    started = time.monotonic()
    result = box.execute("1 + 2")
    assert result.value == 3
    assert result.worker_pid == pid
    assert time.monotonic() - started < 2.0


def drain(gen: Iterator[Any]) -> tuple[list[Any], BaseException | None]:
    """Every value ``gen`` yields before it ends, and the error it ended with (or None)."""
    got: list[Any] = []
    try:
        for value in gen:
            got.append(value)
    except Exception as exc:
        return got, exc
    return got, None


async def adrain(gen: AsyncIterator[Any]) -> tuple[list[Any], BaseException | None]:
    """The asyncio twin of :func:`drain`."""
    got: list[Any] = []
    try:
        async for value in gen:
            got.append(value)
    except Exception as exc:
        return got, exc
    return got, None


def arun(body: Callable[[AsyncIsoBox], Awaitable[None]], mode: str = "process",
         **options: Any) -> None:
    """Run ``body(box)`` on a fresh, warmed-up AsyncIsoBox in a new event loop."""
    async def main() -> None:
        pool = POOL1 if mode == "process" else None
        async with AsyncIsoBox(mode=mode, pool=pool, timeout=10.0, **options) as box:
            await box.warmup_pool()
            await body(box)

    asyncio.run(main())


async def aserves(box: AsyncIsoBox) -> int | None:
    """The async box still runs code correctly; returns the worker pid that ran it."""
    result = await box.execute("1 + 2")
    assert result.value == 3
    return result.worker_pid


async def asame_worker_promptly(box: AsyncIsoBox, pid: int | None) -> None:
    """The asyncio twin of :func:`assert_same_worker_promptly`."""
    started = time.monotonic()
    result = await box.execute("1 + 2")
    assert result.value == 3
    assert result.worker_pid == pid
    assert time.monotonic() - started < 2.0


async def await_line(lines: Lines, message: str, timeout: float = 2.0) -> bool:
    """Wait (yielding to the loop) until ``message`` was printed; returns whether it was."""
    end = time.monotonic() + timeout
    while message not in lines.messages() and time.monotonic() < end:
        await asyncio.sleep(0.01)
    return message in lines.messages()


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def box() -> Iterator[IsoBox]:
    with IsoBox(timeout=10.0, pool=POOL1) as b:
        b.warmup_pool()
        yield b


@pytest.fixture(scope="module")
def local() -> Iterator[IsoBox]:
    with IsoBox(mode="inprocess", timeout=10.0) as b:
        yield b


@pytest.fixture(params=MODES)
def any_box(request: pytest.FixtureRequest, box: IsoBox, local: IsoBox) -> IsoBox:
    return box if request.param == "process" else local


# -- 1. what streams -------------------------------------------------------------------------
SEEDS = [
    pytest.param("for (let i = 0; i < 5; i++) yield i * 2", [0, 2, 4, 6, 8], id="seed"),
    pytest.param("[1, 'two', null, [3]]", [1, "two", None, [3]], id="array"),
    pytest.param("[]", [], id="empty-array"),
    pytest.param("if (false) yield 1", [], id="yields-nothing"),
    pytest.param("(function* () { yield 'a'; yield 'b' })()", ["a", "b"], id="generator-object"),
    pytest.param("yield* [1, 2]; yield* (function* () { yield 3 })(); yield 4", [1, 2, 3, 4],
                 id="yield-star"),
    pytest.param("(async function* () { for (let i = 0; i < 3; i++) {"
                 " await new Promise(r => setTimeout(r, 5)); yield i } })()", [0, 1, 2],
                 id="async-generator-object"),
    pytest.param("for (let i = 0; i < 3; i++) { await new Promise(r => setTimeout(r, 5));"
                 " yield i }", [0, 1, 2], id="async-body-settimeout"),
    pytest.param("const base = await Promise.resolve(10); yield base; yield base + 1", [10, 11],
                 id="top-level-await"),
    pytest.param("new Set(['x', 'y'])", ["x", "y"], id="set"),
    pytest.param("new Map([['k', 1]])", [["k", 1]], id="map-entries"),
    pytest.param("({ i: 0, next() { return { value: this.i, done: this.i++ >= 3 } } })",
                 [0, 1, 2], id="bare-iterator"),
    pytest.param("({ [Symbol.asyncIterator]() { let i = 0; return { next: () =>"
                 " Promise.resolve({ value: i, done: i++ >= 3 }) } } })", [0, 1, 2],
                 id="custom-async-iterable"),
    pytest.param("const yield_ = [1, 2]; yield_", [1, 2], id="yield-in-identifier"),
    pytest.param("var yield = [3, 4]; yield", [3, 4], id="sloppy-yield-identifier"),
    pytest.param("'yield'.length; [5]", [5], id="yield-in-string"),
    pytest.param("yield 1; return 99", [1], id="return-value-not-streamed"),
]


@pytest.mark.parametrize(("code", "expected"), SEEDS)
def test_stream_values(any_box: IsoBox, code: str, expected: list[Any]) -> None:
    """Generator bodies, iterables and (async) iterators stream exactly their values."""
    assert list(any_box.run_stream(code)) == expected


@pytest.mark.parametrize("mode", MODES)
def test_stream_values_async(mode: str) -> None:
    """AsyncIsoBox streams the same values for every seed case (one box, every case)."""
    async def body(box: AsyncIsoBox) -> None:
        for param in SEEDS:
            code, expected = param.values
            assert [v async for v in box.run_stream(str(code))] == expected, param.id

    arun(body, mode)


VALUE_TABLE_JS = r"""
yield new Uint8Array([0, 1, 255]);
yield new Uint8Array([7, 8]).buffer;
yield new Date(Date.UTC(2020, 0, 2, 3, 4, 5, 678));
yield 2n ** 70n;
yield -(2n ** 64n);
yield 1n;
yield undefined;
yield { a: undefined, b: [1, null, undefined] };
yield 'snow \u2603 nul \0 lone \ud800 end';
yield 1.5;
yield 2 ** 53;
yield Infinity;
yield -Infinity;
yield NaN;
yield [new Map([['k', 1n]]), new Set(['x'])];
yield blob; yield when; yield big;
"""
SANDBOX = {"blob": b"\x00\xfe\xff", "when": datetime(1999, 12, 31, 23, 59, 59, 123000, tzinfo=UTC),
           "big": -(2**70)}
VALUE_TABLE = [
    b"\x00\x01\xff", b"\x07\x08", datetime(2020, 1, 2, 3, 4, 5, 678000, tzinfo=UTC), 2**70,
    -(2**64), 1, None, {"a": None, "b": [1, None, None]}, "snow \u2603 nul \x00 lone \ud800 end",
    1.5, 2**53, math.inf, -math.inf, "nan", [{"k": 1}, ["x"]],
    b"\x00\xfe\xff", SANDBOX["when"], -(2**70),
]


def check_value_table(got: list[Any]) -> None:
    """``got`` is VALUE_TABLE (NaN compared as NaN), with the documented Python types."""
    assert len(got) == len(VALUE_TABLE)
    for index, (value, expected) in enumerate(zip(got, VALUE_TABLE, strict=True)):
        if expected == "nan":
            assert isinstance(value, float) and math.isnan(value), index
            continue
        assert value == expected, index
        assert type(value) is type(expected), index


def test_value_table_streams_intact(any_box: IsoBox) -> None:
    """bytes, dates, big ints, None for undefined, special floats and sandbox values cross."""
    check_value_table(list(any_box.run_stream(VALUE_TABLE_JS, sandbox=SANDBOX)))


@pytest.mark.parametrize("mode", MODES)
def test_value_table_streams_intact_async(mode: str) -> None:
    """The async twin streams the value table intact too."""
    async def body(box: AsyncIsoBox) -> None:
        check_value_table([v async for v in box.run_stream(VALUE_TABLE_JS, sandbox=SANDBOX)])

    arun(body, mode)


def double(x: int) -> int:
    """A sync host function."""
    return x * 2


async def adouble(x: int) -> int:
    """An ``async def`` host function (awaited by the stream between values)."""
    await asyncio.sleep(0.005)
    return x * 2


HOST_STREAM = "for (let i = 0; i < 4; i++) yield await double(i)"


@pytest.mark.parametrize("fn", [double, adouble], ids=["sync-fn", "async-fn"])
def test_host_function_called_per_value(any_box: IsoBox, fn: Callable[[int], Any]) -> None:
    """A stream may call a (sync or async) host function between values; results stream
    back in order."""
    assert list(any_box.run_stream(HOST_STREAM, functions={"double": fn})) == [0, 2, 4, 6]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", [double, adouble], ids=["sync-fn", "async-fn"])
def test_host_function_called_per_value_async(mode: str, fn: Callable[[int], Any]) -> None:
    """The async twin calls sync and async host functions between values."""
    async def body(box: AsyncIsoBox) -> None:
        got = [v async for v in box.run_stream(HOST_STREAM, functions={"double": fn})]
        assert got == [0, 2, 4, 6]

    arun(body, mode)


# -- 2. values arrive while the code still runs ----------------------------------------------
def test_first_value_arrives_before_the_code_finishes(box: IsoBox) -> None:
    """The first value arrives at once although the code then computes for 3 s; close is
    bounded (the busy worker is killed after the cancel grace) and the box serves."""
    started = time.monotonic()
    gen = box.run_stream(FIRST_THEN_BUSY)
    assert next(gen) == "first"
    assert time.monotonic() - started < 1.5
    closing = time.monotonic()
    gen.close()
    assert time.monotonic() - closing < 2.5
    assert assert_serves(box) is not None


def test_first_value_arrives_before_the_code_finishes_async() -> None:
    """The async twin: the first value well before the 3 s of computing; aclose is bounded."""
    async def body(box: AsyncIsoBox) -> None:
        started = time.monotonic()
        gen = box.run_stream(FIRST_THEN_BUSY)
        assert await anext(gen) == "first"
        assert time.monotonic() - started < 1.5
        closing = time.monotonic()
        await gen.aclose()
        assert time.monotonic() - closing < 2.5
        assert await aserves(box) is not None

    arun(body)


def test_console_output_arrives_while_the_stream_runs(box: IsoBox) -> None:
    """Console lines reach on_output before the value that follows them, not at the end."""
    lines = Lines()
    code = ("console.log('before'); yield 1; console.log('mid'); yield 2;"
            " await new Promise(r => setTimeout(r, 100)); console.log('late'); yield 3")
    gen = box.run_stream(code, on_output=lines)
    assert next(gen) == 1
    assert "before" in lines.messages()
    assert next(gen) == 2
    assert lines.messages()[:2] == ["before", "mid"]
    assert next(gen) == 3
    assert lines.messages() == ["before", "mid", "late"]
    assert list(gen) == []


def test_console_output_arrives_while_the_stream_runs_async() -> None:
    """The async twin delivers console lines before the value that follows them."""
    async def body(box: AsyncIsoBox) -> None:
        lines = Lines()
        gen = box.run_stream("console.log('before'); yield 1; console.log('mid'); yield 2",
                             on_output=lines)
        assert await anext(gen) == 1
        assert lines.messages() == ["before"]
        assert await anext(gen) == 2
        assert lines.messages() == ["before", "mid"]
        assert [v async for v in gen] == []

    arun(body)


# -- 3. flow control -------------------------------------------------------------------------
def check_paused(got: list[dict[str, Any]], before_pause: int, resumed: float, window: int,
                 cpu_during_pause: float) -> None:
    """The values are in order and at most consumed + window of them were made before the
    consumer resumed; the worker used (almost) no CPU while the consumer slept."""
    assert [v["i"] for v in got] == list(range(len(got)))
    made_before = [v for v in got if v["at"] < (resumed - 0.1) * 1000]
    assert len(made_before) <= before_pause + window + SLACK, len(made_before)
    assert len(got) > len(made_before)  # the rest was made after the consumer came back
    assert cpu_during_pause < 0.2, cpu_during_pause


def test_slow_consumer_pauses_an_infinite_producer(box: IsoBox) -> None:
    """With window=8 an infinite producer stops within the window while the consumer sleeps:
    made-lines never exceed consumed + window, no value is made during the pause, no CPU."""
    window = 8
    lines = Lines()
    pid = box.execute("1").worker_pid
    assert pid is not None
    gen = box.run_stream(PRODUCER, window=window, on_output=lines)
    try:
        got = [next(gen) for _ in range(3)]
        assert lines.count("made") <= len(got) + window + SLACK
        cpu = worker_cpu(pid)
        time.sleep(0.5)
        cpu = worker_cpu(pid) - cpu
        resumed = time.time()
        for _ in range(40):
            got.append(next(gen))
            assert lines.count("made") <= len(got) + window + SLACK
    finally:
        gen.close()
    check_paused(got, 3, resumed, window, cpu)
    assert_same_worker_promptly(box, pid)


def test_slow_consumer_pauses_an_infinite_producer_async() -> None:
    """The async twin: a sleeping consumer pauses the producer within window=8."""
    async def body(box: AsyncIsoBox) -> None:
        window = 8
        lines = Lines()
        pid = await aserves(box)
        assert pid is not None
        gen = box.run_stream(PRODUCER, window=window, on_output=lines)
        try:
            got = [await anext(gen) for _ in range(3)]
            assert lines.count("made") <= len(got) + window + SLACK
            cpu = worker_cpu(pid)
            await asyncio.sleep(0.5)
            cpu = worker_cpu(pid) - cpu
            resumed = time.time()
            for _ in range(40):
                got.append(await anext(gen))
                assert lines.count("made") <= len(got) + window + SLACK
        finally:
            await gen.aclose()
        check_paused(got, 3, resumed, window, cpu)
        await asame_worker_promptly(box, pid)

    arun(body)


def test_window_of_one_streams_everything(any_box: IsoBox) -> None:
    """window=1 (credit after every value) still delivers every value in order."""
    got = list(any_box.run_stream("for (let i = 0; i < 500; i++) yield i", window=1))
    assert got == list(range(500))


def test_slow_consumer_does_not_trip_idle_timeout(box: IsoBox) -> None:
    """idle_timeout bounds waits for a value, not the consumer's own time between values."""
    got = []
    for value in box.run_stream("for (let i = 0; i < 3; i++) yield i", idle_timeout=0.3):
        time.sleep(0.4)
        got.append(value)
    assert got == [0, 1, 2]


# -- 4. early exit ---------------------------------------------------------------------------
def leave_early(box: IsoBox, how: str, lines: Lines) -> None:
    """Consume a few values of ENDLESS, then leave the loop the way ``how`` says."""
    if how == "break":
        for value in box.run_stream(ENDLESS, on_output=lines):
            if value == 3:
                break
    elif how == "close":
        gen = box.run_stream(ENDLESS, on_output=lines)
        assert [next(gen) for _ in range(4)] == [0, 1, 2, 3]
        gen.close()
    else:
        def consume() -> None:
            for value in box.run_stream(ENDLESS, on_output=lines):
                if value == 3:
                    raise LookupError("the consumer failed")

        with pytest.raises(LookupError):
            consume()


@pytest.mark.parametrize("how", ["break", "close", "raise"])
def test_early_exit_runs_finally_and_releases_the_worker(any_box: IsoBox, how: str) -> None:
    """Leaving an infinite stream early (break, close(), an exception in the loop) runs the
    generator's finally at once and the same worker serves the next run promptly."""
    pid = assert_serves(any_box)
    lines = Lines()
    leave_early(any_box, how, lines)
    assert lines.messages() == ["finally ran"]
    assert_same_worker_promptly(any_box, pid)


def test_break_from_a_finished_stream_releases_the_worker(box: IsoBox) -> None:
    """Breaking out of a stream the worker already finished releases that worker."""
    pid = assert_serves(box)
    lines = Lines()
    for _value in box.run_stream("try { yield 1; yield 2 } finally { console.log('finally ran') }",
                                 on_output=lines):
        break
    assert lines.messages() == ["finally ran"]
    assert_same_worker_promptly(box, pid)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["aclose", "aclosing-break"])
def test_aclose_runs_finally_and_releases_the_worker(mode: str, how: str) -> None:
    """Once ``await gen.aclose()`` (or an aclosing block) returns, the generator's finally ran
    and the same worker serves the next run promptly."""
    async def body(box: AsyncIsoBox) -> None:
        pid = await aserves(box)
        lines = Lines()
        if how == "aclose":
            gen = box.run_stream(ENDLESS, on_output=lines)
            assert [await anext(gen) for _ in range(4)] == [0, 1, 2, 3]
            await gen.aclose()
        else:
            async with contextlib.aclosing(box.run_stream(ENDLESS, on_output=lines)) as gen:
                async for value in gen:
                    if value == 3:
                        break
        assert lines.messages() == ["finally ran"]
        await asame_worker_promptly(box, pid)

    arun(body, mode)


@pytest.mark.parametrize("mode", MODES)
def test_bare_async_break_runs_finally_and_releases_the_worker(mode: str) -> None:
    """A bare break from ``async for`` (the generator is finalized by the loop) still runs
    the finally soon and the same worker serves the next run."""
    async def body(box: AsyncIsoBox) -> None:
        pid = await aserves(box)
        lines = Lines()
        async for value in box.run_stream(ENDLESS, on_output=lines):
            if value == 3:
                break
        assert await await_line(lines, "finally ran")
        await asame_worker_promptly(box, pid)

    arun(body, mode)


def test_cancelling_a_task_in_its_loop_body_runs_finally() -> None:
    """Cancelling a task while it awaits in its loop body stops the stream: finally runs and
    the same worker serves the next run."""
    async def body(box: AsyncIsoBox) -> None:
        pid = await aserves(box)
        lines = Lines()
        got: list[Any] = []

        async def consume() -> None:
            async for value in box.run_stream(ENDLESS, on_output=lines):
                got.append(value)
                await asyncio.sleep(10)

        task = asyncio.create_task(consume())
        while not got:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert got == [0]
        assert await await_line(lines, "finally ran")
        await asame_worker_promptly(box, pid)

    arun(body)


def test_cancelling_a_task_awaiting_a_value_runs_finally() -> None:
    """Cancelling a task while it awaits the next value sends CANCEL: the generator's finally
    runs and the same worker serves the next run (it is not killed)."""
    async def body(box: AsyncIsoBox) -> None:
        pid = await aserves(box)
        lines = Lines()
        got: list[Any] = []

        async def consume() -> None:
            async for value in box.run_stream(ENDLESS, on_output=lines, window=4):
                got.append(value)
                await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        while len(got) < 1000:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await await_line(lines, "finally ran")
        await asame_worker_promptly(box, pid)

    arun(body)


def test_cancelling_a_task_while_the_generator_awaits_replaces_the_worker() -> None:
    """An async generator suspended in an await cannot run return() until that await settles
    (JS semantics): cancelling waits the 0.5 s grace, then the worker is replaced; no hang."""
    async def body(box: AsyncIsoBox) -> None:
        pid = await aserves(box)
        got: list[Any] = []

        async def consume() -> None:
            async for value in box.run_stream(STALLED):
                got.append(value)

        task = asyncio.create_task(consume())
        while not got:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 3.0
        assert got == [0]
        assert (await box.execute("1 + 1")).value == 2
        assert (await box.execute("1")).worker_pid != pid

    arun(body)


# -- 5. return() that never finishes ---------------------------------------------------------
@pytest.mark.parametrize("code", [STUBBORN_JS, STUBBORN_NATIVE], ids=["js-loop", "native-loop"])
def test_close_is_bounded_when_return_never_finishes(box: IsoBox, code: str) -> None:
    """close() returns within about a second even if return() loops for ever; a worker that
    cannot be interrupted is killed and replaced, and the box keeps serving."""
    pid = assert_serves(box)
    gen = box.run_stream(code)
    assert next(gen) == 1
    started = time.monotonic()
    gen.close()
    assert time.monotonic() - started < 2.0
    after = assert_serves(box)
    if code == STUBBORN_NATIVE:
        assert after != pid
    assert list(box.run_stream("[1, 2]")) == [1, 2]


@pytest.mark.parametrize("code", [STUBBORN_JS, STUBBORN_NATIVE], ids=["js-loop", "native-loop"])
def test_aclose_is_bounded_when_return_never_finishes(code: str) -> None:
    """The async twin: aclose() is bounded and the box keeps serving."""
    async def body(box: AsyncIsoBox) -> None:
        pid = await aserves(box)
        gen = box.run_stream(code)
        assert await anext(gen) == 1
        started = time.monotonic()
        await gen.aclose()
        assert time.monotonic() - started < 2.0
        after = await aserves(box)
        if code == STUBBORN_NATIVE:
            assert after != pid
        assert [v async for v in box.run_stream("[1, 2]")] == [1, 2]

    arun(body)


# -- 6. timeouts -----------------------------------------------------------------------------
def test_timeout_bounds_the_whole_stream(box: IsoBox) -> None:
    """timeout bounds the whole stream: an infinite stream consumed eagerly ends in a wall
    TimeoutError after some values, and the box keeps serving."""
    started = time.monotonic()
    # A producer that is always busy spends CPU as fast as wall time: a generous cpu_timeout
    # makes the wall bound the one that ends it.
    got, error = drain(box.run_stream("let i = 0; while (true) yield i++", timeout=0.5,
                                      cpu_timeout=10.0))
    assert isinstance(error, BoxTimeoutError), repr(error)
    assert error.kind == "wall"
    assert 0.4 < time.monotonic() - started < 3.0
    assert got and got == list(range(len(got)))
    assert_serves(box)


def test_timeout_bounds_the_whole_stream_async() -> None:
    """The async twin: the whole-stream timeout ends an infinite stream with a wall timeout."""
    async def body(box: AsyncIsoBox) -> None:
        started = time.monotonic()
        got, error = await adrain(box.run_stream("let i = 0; while (true) yield i++",
                                                 timeout=0.5, cpu_timeout=10.0))
        assert isinstance(error, BoxTimeoutError), repr(error)
        assert error.kind == "wall"
        assert 0.4 < time.monotonic() - started < 3.0
        assert got and got == list(range(len(got)))
        await aserves(box)

    arun(body)


STALLS = [
    pytest.param("yield 1; await new Promise(r => setTimeout(r, 2000)); yield 2", id="timer"),
    pytest.param("yield 1; const t = Date.now(); while (Date.now() - t < 2000) {} yield 2",
                 id="busy"),
]


@pytest.mark.parametrize("code", STALLS)
def test_idle_timeout_bounds_each_wait(box: IsoBox, code: str) -> None:
    """A generator that stalls 2 s between values with idle_timeout=0.3 ends in a wall
    TimeoutError soon after the first value; the box keeps serving."""
    started = time.monotonic()
    got, error = drain(box.run_stream(code, idle_timeout=0.3))
    assert got == [1]
    assert isinstance(error, BoxTimeoutError), repr(error)
    assert error.kind == "wall"
    assert time.monotonic() - started < 1.5
    assert_serves(box)


@pytest.mark.parametrize("code", STALLS)
def test_idle_timeout_bounds_each_wait_async(code: str) -> None:
    """The async twin of the idle timeout."""
    async def body(box: AsyncIsoBox) -> None:
        started = time.monotonic()
        got, error = await adrain(box.run_stream(code, idle_timeout=0.3))
        assert got == [1]
        assert isinstance(error, BoxTimeoutError), repr(error)
        assert error.kind == "wall"
        assert time.monotonic() - started < 1.5
        await aserves(box)

    arun(body)


STALL = "yield 1; await new Promise(r => setTimeout(r, 2000)); yield 2"


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_idle_timeout_error_names_its_limit_and_worker(box: IsoBox, twin: str) -> None:
    """An idle timeout says so: its message names idle_timeout, .limit is 0.3 and .worker_pid
    is the worker that stalled."""
    if twin == "sync":
        pid = assert_serves(box)
        _got, error = drain(box.run_stream(STALL, idle_timeout=0.3))
    else:
        async def body(abox: AsyncIsoBox) -> None:
            nonlocal pid, error
            pid = await aserves(abox)
            _got, error = await adrain(abox.run_stream(STALL, idle_timeout=0.3))

        pid, error = None, None
        arun(body)
    assert isinstance(error, BoxTimeoutError), repr(error)
    assert "idle_timeout" in str(error)
    assert error.limit == 0.3
    assert error.worker_pid == pid


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_stream_wall_timeout_error_names_its_worker(box: IsoBox, twin: str) -> None:
    """A stream the watchdog has to kill at its wall deadline (a native loop ignores the
    interrupt) raises TimeoutError(kind="wall") carrying the killed worker's pid."""
    code = "yield 1; [].reverse.call({length: 2**53 - 1})"
    if twin == "sync":
        pid = assert_serves(box)
        got, error = drain(box.run_stream(code, timeout=0.5))
    else:
        async def body(abox: AsyncIsoBox) -> None:
            nonlocal pid, got, error
            pid = await aserves(abox)
            got, error = await adrain(abox.run_stream(code, timeout=0.5))

        pid, got, error = None, [], None
        arun(body)
    assert got == [1]
    assert isinstance(error, BoxTimeoutError), repr(error)
    assert error.kind == "wall"
    assert error.worker_pid is not None
    assert error.worker_pid == pid


# -- 7. errors after values ------------------------------------------------------------------
def test_script_error_after_values(any_box: IsoBox) -> None:
    """A throw after two values: both values arrive, then ScriptError at that point; the same
    worker serves the next run (a script error does not cost the worker)."""
    pid = assert_serves(any_box)
    got, error = drain(any_box.run_stream("yield 1; yield 2; throw new RangeError('boom')"))
    assert got == [1, 2]
    assert isinstance(error, ScriptError), repr(error)
    assert error.name == "RangeError"
    assert "boom" in str(error)
    assert "isoboxPump" not in (error.stack or "")
    assert_same_worker_promptly(any_box, pid)


@pytest.mark.parametrize("mode", MODES)
def test_script_error_after_values_async(mode: str) -> None:
    """The async twin: values, then ScriptError at that point of iteration."""
    async def body(box: AsyncIsoBox) -> None:
        got, error = await adrain(box.run_stream("yield 1; yield 2; throw new RangeError('boom')"))
        assert got == [1, 2]
        assert isinstance(error, ScriptError), repr(error)
        assert error.name == "RangeError"
        await aserves(box)

    arun(body, mode)


def test_unserializable_value_after_values(any_box: IsoBox) -> None:
    """Yielding a function after a value: the value, then SerializationError."""
    got, error = drain(any_box.run_stream("yield 1; yield () => 1; yield 3"))
    assert got == [1]
    assert isinstance(error, SerializationError), repr(error)
    assert "function" in str(error)
    assert_serves(any_box)


@pytest.mark.parametrize("code", ["yield 'a'; yield Symbol('s')",
                                  "yield 'a'; const o = {}; o.o = o; yield o"],
                         ids=["symbol", "cycle"])
def test_other_unserializable_values(box: IsoBox, code: str) -> None:
    """Symbols and cycles in a streamed value are SerializationErrors after earlier values."""
    got, error = drain(box.run_stream(code))
    assert got == ["a"]
    assert isinstance(error, SerializationError), repr(error)
    assert_serves(box)


def test_unserializable_value_path_names_the_place(box: IsoBox) -> None:
    """The SerializationError of a streamed value names the place, like a run's path does."""
    _got, error = drain(box.run_stream("yield 1; yield {a: [1, {f() {}}]}"))
    assert isinstance(error, SerializationError), repr(error)
    assert "a[1].f" in error.path


def test_unserializable_value_after_values_async() -> None:
    """The async twin: a yielded function is a SerializationError after the earlier value."""
    async def body(box: AsyncIsoBox) -> None:
        got, error = await adrain(box.run_stream("yield 1; yield () => 1"))
        assert got == [1]
        assert isinstance(error, SerializationError), repr(error)
        await aserves(box)

    arun(body)


def test_value_over_the_result_cap() -> None:
    """A streamed value larger than max_result_size is a SerializationError after the
    earlier values (the cap applies per value)."""
    with IsoBox(timeout=10.0, pool=POOL1, max_result_size=1000) as capped:
        got, error = drain(capped.run_stream("yield 'ok'; yield 'x'.repeat(5000)"))
        assert got == ["ok"]
        assert isinstance(error, SerializationError), repr(error)
        assert list(capped.run_stream("for (let i = 0; i < 100; i++) yield 'x'.repeat(900)")
                    ) == ["x" * 900] * 100


def test_cpu_timeout_after_a_value(box: IsoBox) -> None:
    """A CPU loop after a value with a small cpu_timeout: the value, then TimeoutError cpu."""
    started = time.monotonic()
    got, error = drain(box.run_stream("yield 1; while (true) {}", cpu_timeout=0.3))
    assert got == [1]
    assert isinstance(error, BoxTimeoutError), repr(error)
    assert error.kind == "cpu"
    assert time.monotonic() - started < 3.0
    assert_serves(box)


def test_cpu_timeout_after_a_value_async() -> None:
    """The async twin of the CPU timeout after a value."""
    async def body(box: AsyncIsoBox) -> None:
        got, error = await adrain(box.run_stream("yield 1; while (true) {}", cpu_timeout=0.3))
        assert got == [1]
        assert isinstance(error, BoxTimeoutError), repr(error)
        assert error.kind == "cpu"
        await aserves(box)

    arun(body)


def test_memory_limit_after_a_value(box: IsoBox) -> None:
    """Exhausting the heap after a value: the value, then MemoryLimitError (as run() does)."""
    got, error = drain(box.run_stream(MEMORY_BOMB, memory_limit=16 * 2**20))
    assert got == [1]
    assert isinstance(error, MemoryLimitError), repr(error)
    assert_serves(box)


# -- 8. the worker dies mid-stream -----------------------------------------------------------
def test_worker_killed_mid_stream(box: IsoBox) -> None:
    """SIGKILL of the worker in the middle of a stream: the values so far, then
    WorkerCrashedError naming that worker; the box serves the next run on a new worker."""
    assert_serves(box)
    got: list[int] = []
    victim = 0
    with pytest.raises(WorkerCrashedError) as info:
        for value in box.run_stream(TICKING):
            got.append(value)
            if value == 2:
                victim = busy_pid(box)
                os.kill(victim, signal.SIGKILL)
    assert got[:3] == [0, 1, 2]
    assert got == list(range(len(got)))
    assert info.value.pid == victim
    assert info.value.signal == signal.SIGKILL
    after = assert_serves(box)
    assert after not in (None, victim)


def test_worker_killed_mid_stream_async() -> None:
    """The async twin: WorkerCrashedError at that point of iteration, then a new worker."""
    async def body(box: AsyncIsoBox) -> None:
        victim = await aserves(box)
        assert victim is not None
        got: list[int] = []
        with pytest.raises(WorkerCrashedError) as info:
            async for value in box.run_stream(TICKING):
                got.append(value)
                if value == 2:
                    os.kill(victim, signal.SIGKILL)
        assert got[:3] == [0, 1, 2]
        assert info.value.pid == victim
        assert info.value.signal == signal.SIGKILL
        assert await aserves(box) not in (None, victim)

    arun(body)


# -- 9. call-time validation -----------------------------------------------------------------
@pytest.mark.parametrize("code", ["42", "null", "undefined", "true", "({a: 1})", "() => 1",
                                  "Symbol('s')"])
def test_non_iterable_is_a_type_error(any_box: IsoBox, code: str) -> None:
    """A snippet that neither yields nor evaluates to an iterable raises ScriptError
    (TypeError) naming run_stream; the box keeps serving."""
    with pytest.raises(ScriptError) as info:
        list(any_box.run_stream(code))
    assert info.value.name == "TypeError"
    assert "run_stream" in str(info.value)
    assert_serves(any_box)


@pytest.mark.parametrize("mode", MODES)
def test_non_iterable_is_a_type_error_async(mode: str) -> None:
    """The async twin raises the same TypeError for a non-iterable."""
    async def body(box: AsyncIsoBox) -> None:
        _got, error = await adrain(box.run_stream("({a: 1})"))
        assert isinstance(error, ScriptError), repr(error)
        assert error.name == "TypeError"
        assert "run_stream" in str(error)

    arun(body, mode)


def test_compile_error_in_a_stream(box: IsoBox) -> None:
    """A snippet that does not parse raises ScriptError (a CompileError) from the stream."""
    with pytest.raises(ScriptError):
        list(box.run_stream("yield ((("))
    assert_serves(box)


BAD_LIMITS = [
    {"window": 0}, {"window": -1}, {"window": 65537}, {"window": True}, {"window": 1.5},
    {"window": "8"}, {"idle_timeout": 0}, {"idle_timeout": -0.5}, {"idle_timeout": "1"},
    {"idle_timeout": True}, {"idle_timeout": math.nan},
]


@pytest.mark.parametrize("limits", BAD_LIMITS, ids=repr)
def test_bad_window_or_idle_timeout_raise_at_call_time(any_box: IsoBox,
                                                       limits: dict[str, Any]) -> None:
    """Bad window/idle_timeout values raise ValueError when run_stream is called, before any
    iteration."""
    with pytest.raises(ValueError, match=r"window|idle_timeout"):
        any_box.run_stream("yield 1", **limits)


@pytest.mark.parametrize("limits", BAD_LIMITS, ids=repr)
def test_bad_window_or_idle_timeout_raise_at_call_time_async(limits: dict[str, Any]) -> None:
    """The async twin validates at call time too (run_stream is not a coroutine)."""
    abox = AsyncIsoBox(mode="inprocess")
    with pytest.raises(ValueError, match=r"window|idle_timeout"):
        abox.run_stream("yield 1", **limits)


def test_bad_run_options_raise_at_call_time(any_box: IsoBox) -> None:
    """Unknown or invalid run options raise at call time, like run() does."""
    with pytest.raises(TypeError):
        any_box.run_stream("yield 1", no_such_option=1)
    with pytest.raises(ValueError):
        any_box.run_stream("yield 1", timeout=-1)


def test_window_bounds_are_accepted(box: IsoBox) -> None:
    """window=1 and window=65536 are the accepted extremes."""
    assert list(box.run_stream("[1, 2, 3]", window=1)) == [1, 2, 3]
    assert list(box.run_stream("[1, 2, 3]", window=65536)) == [1, 2, 3]


def test_closed_box_refuses_streams() -> None:
    """run_stream on a shut-down box raises ClosedError at call time."""
    closed = IsoBox(mode="inprocess")
    closed.shutdown()
    with pytest.raises(ClosedError):
        closed.run_stream("yield 1")


# -- 10. sessions ----------------------------------------------------------------------------
def test_session_stream_sees_session_globals(any_box: IsoBox) -> None:
    """A session's stream sees its globals (and may change them); the session keeps working,
    also after a stream left early."""
    session = any_box.create_session(f"streams-{id(any_box)}-{time.monotonic_ns()}")
    try:
        session.run("counter = 10; const base = 5")
        assert list(session.run_stream("for (let i = 0; i < 3; i++) yield counter + base + i")
                    ) == [15, 16, 17]
        assert list(session.run_stream("counter += 1; yield counter")) == [11]
        assert session.run("counter") == 11
        lines = Lines()
        gen = session.run_stream("try { while (true) yield base } finally {"
                                 " console.log('finally ran') }", on_output=lines)
        assert next(gen) == 5
        gen.close()
        assert lines.messages() == ["finally ran"]
        assert session.run("counter + base") == 16
        assert session.get_state() == {"counter": 11, "base": 5}
    finally:
        session.close()
    with pytest.raises(SessionError):
        session.run_stream("yield 1")


@pytest.mark.parametrize("mode", MODES)
def test_session_stream_sees_session_globals_async(mode: str) -> None:
    """The async twin: an AsyncSession stream sees the session's globals and may change them;
    the session keeps working after it."""
    async def body(box: AsyncIsoBox) -> None:
        session = await box.create_session("streams-async")
        await session.run("counter = 10; const base = 5")
        assert [v async for v in session.run_stream("for (let i = 0; i < 3; i++)"
                                                    " yield counter + base + i")] == [15, 16, 17]
        assert [v async for v in session.run_stream("counter += 1; yield counter")] == [11]
        assert await session.run("counter + base") == 16
        assert await session.get_state() == {"counter": 11, "base": 5}
        await session.close()

    arun(body, mode)


def test_session_stream_left_early_async() -> None:
    """An AsyncSession stream left early runs its finally before the session's next run, which
    sees what the finally did (process mode: the run waits for the session's worker)."""
    async def body(box: AsyncIsoBox) -> None:
        session = await box.create_session("streams-async-early")
        await session.run("counter = 10")
        async with contextlib.aclosing(session.run_stream(
                "try { while (true) yield counter } finally { counter = 20 }")) as gen:
            async for value in gen:
                assert value == 10
                break
        assert await session.run("counter + 1") == 21
        await session.close()

    arun(body)


def test_session_run_while_its_stream_is_open_fails_clearly(any_box: IsoBox) -> None:
    """While a session's stream is open the session is busy: a run on it raises SessionError
    after its timeout instead of waiting for ever; once the stream is closed it runs again."""
    session = any_box.create_session(f"streams-busy-{time.monotonic_ns()}")
    try:
        session.run("n = 1")
        gen = session.run_stream("while (true) yield n")
        assert next(gen) == 1
        started = time.monotonic()
        with pytest.raises(SessionError, match="busy"):
            session.run("n", timeout=0.3)
        assert time.monotonic() - started < 2.0
        gen.close()
        assert session.run("n + 1") == 2
    finally:
        session.close()


def test_session_run_while_its_stream_is_open_fails_clearly_async() -> None:
    """The async twin: a run on a session whose stream is open raises SessionError after its
    timeout (it does not hang)."""
    async def body(box: AsyncIsoBox) -> None:
        session = await box.create_session("streams-busy-async")
        await session.run("n = 1")
        gen = session.run_stream("while (true) yield n")
        try:
            assert await anext(gen) == 1
            with pytest.raises(SessionError, match="busy"):
                await asyncio.wait_for(session.run("n", timeout=0.3), 3.0)
        finally:
            await gen.aclose()

    arun(body)


# -- 11. throughput --------------------------------------------------------------------------
COUNT_CODE = "let i = 0; while (i < 100000) yield i++"


def test_hundred_thousand_values(any_box: IsoBox) -> None:
    """100,000 small values all arrive, in order (count and sum)."""
    count = total = 0
    for value in any_box.run_stream(COUNT_CODE):
        assert value == count
        count += 1
        total += value
    assert (count, total) == (100_000, 100_000 * 99_999 // 2)


def test_hundred_thousand_values_async() -> None:
    """The async twin streams 100,000 values intact."""
    async def body(box: AsyncIsoBox) -> None:
        count = total = 0
        async for value in box.run_stream(COUNT_CODE):
            count += 1
            total += value
        assert (count, total) == (100_000, 100_000 * 99_999 // 2)

    arun(body)


# -- bookkeeping -----------------------------------------------------------------------------
def test_two_streams_interleave_on_two_workers() -> None:
    """Two streams open at once on a pool of two run on different workers and stay apart."""
    with IsoBox(timeout=10.0, pool={"min": 2, "max": 2}) as two:
        two.warmup_pool()
        evens = two.run_stream("let i = 0; while (true) { yield i; i += 2 }", window=4)
        odds = two.run_stream("let i = 1; while (true) { yield i; i += 2 }", window=4)
        try:
            pairs = [(next(evens), next(odds)) for _ in range(200)]
        finally:
            evens.close()
            odds.close()
        assert pairs == [(2 * k, 2 * k + 1) for k in range(200)]
        assert two.run("1 + 2") == 3


RECORDED = [
    pytest.param("[1, 2]", {}, "ok", id="finished"),
    pytest.param("yield 1; throw new Error('x')", {}, "error", id="script-error"),
    pytest.param("yield 1; yield () => 1", {}, "error", id="serialization"),
    pytest.param("yield 1; while (true) {}", {"cpu_timeout": 0.3}, "timeout", id="cpu-timeout"),
]


@pytest.mark.parametrize(("code", "options", "status"), RECORDED)
def test_a_stream_is_recorded_once(box: IsoBox, code: str, options: dict[str, Any],
                                   status: str) -> None:
    """A stream records exactly one metrics entry (and one metrics:recorded event) when it
    ends, whatever way it ends."""
    events: list[dict[str, Any]] = []

    def record(payload: dict[str, Any]) -> None:
        events.append(payload)

    box.on("metrics:recorded", record)
    try:
        before = box.get_metrics().total_executions
        drain(box.run_stream(code, **options))
        assert box.get_metrics().total_executions == before + 1
        assert len(events) == 1
        assert box.get_history(1)[0].status == status
    finally:
        box.off("metrics:recorded", record)


def test_a_stream_is_recorded_once_async() -> None:
    """The async twin records a stream that ends in a CPU timeout once."""
    async def body(box: AsyncIsoBox) -> None:
        _got, error = await adrain(box.run_stream("yield 1; while (true) {}", cpu_timeout=0.3))
        assert isinstance(error, BoxTimeoutError), repr(error)
        assert box.get_metrics().total_executions == 2  # the warm-up check run and the stream
        assert box.get_metrics().timeouts == 1

    async def warmed(box: AsyncIsoBox) -> None:
        await aserves(box)
        await body(box)

    arun(warmed)
