"""Timers: setTimeout, setInterval, clearTimeout, clearInterval and queueMicrotask.

They are implemented in JS and driven by the worker with real delays. Every test runs against
a real worker process ("process") and the in-process engine ("inprocess") where both apply.
Timing bounds are generous lower bounds or loose upper bounds: the machine may be shared.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import isobox
from isobox import AsyncIsoBox, IsoBox
from isobox import TimeoutError as BoxTimeoutError

MODES = ["process", "inprocess"]
SLEEP = "await new Promise(r => setTimeout(r, {ms}));"


@pytest.fixture(scope="module", params=MODES)
def box(request: pytest.FixtureRequest) -> Iterator[IsoBox]:
    """A shared box (both modes)."""
    with IsoBox(mode=request.param, timeout=5.0, memory_limit=32 * 2**20,
                pool={"min": 2, "max": 2}) as b:
        b.warmup_pool()
        yield b


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Call ``fn``; return its value and how long it took."""
    started = time.monotonic()
    value = fn(*args, **kwargs)
    return value, time.monotonic() - started


# -- the basics -----------------------------------------------------------------------------
def test_timer_functions_exist_in_every_run(box: IsoBox) -> None:
    """The five timer functions are there in every run, without any option."""
    names = ["setTimeout", "setInterval", "clearTimeout", "clearInterval", "queueMicrotask"]
    code = f"{names!r}.map(n => typeof globalThis[n])"
    assert box.run(code) == ["function"] * 5


def test_delays_are_real(box: IsoBox) -> None:
    """Awaiting a 100 ms timer takes at least about 100 ms of wall time."""
    value, elapsed = timed(box.run, "await new Promise(r => setTimeout(() => r('done'), 100))")
    assert value == "done"
    assert elapsed >= 0.09


def test_timer_ids_are_distinct_numbers(box: IsoBox) -> None:
    """setTimeout and setInterval return distinct positive numeric ids."""
    ids = box.run("[setTimeout(() => {}, 1000), setTimeout(() => {}, 1000), "
                  "setInterval(() => {}, 1000)]")
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(set(ids)) == 3


def test_timer_callbacks_get_extra_arguments(box: IsoBox) -> None:
    """Arguments after the delay are passed to setTimeout and setInterval callbacks."""
    code = "await new Promise(r => setTimeout((a, b) => r([a, b]), 10, 'a', 'b'))"
    assert box.run(code) == ["a", "b"]
    code = """
        const got = [];
        await new Promise(r => {
            const id = setInterval((x, y) => {
                got.push(x + y);
                if (got.length === 3) { clearInterval(id); r() }
            }, 2, 20, 1);
        });
        got
    """
    assert box.run(code) == [21, 21, 21]


def test_zero_negative_and_odd_delays_still_fire(box: IsoBox) -> None:
    """Zero, negative, NaN and string delays fire soon, like a minimal delay."""
    code = """
        const got = [];
        await new Promise(r => {
            setTimeout(() => got.push('zero'), 0);
            setTimeout(() => got.push('neg'), -50);
            setTimeout(() => got.push('nan'), NaN);
            setTimeout(() => got.push('str'), '5');
            setTimeout(r, 40);
        });
        got.sort()
    """
    value, elapsed = timed(box.run, code)
    assert value == ["nan", "neg", "str", "zero"]
    assert elapsed < 3.0


def test_bad_callbacks_are_type_errors(box: IsoBox) -> None:
    """A non-function callback is a catchable TypeError (strings are not evaluated)."""
    code = """
        const out = [];
        for (const f of [() => setTimeout('globalThis.x = 1', 1), () => setInterval(null, 1),
                         () => queueMicrotask(42)]) {
            try { f(); out.push('no error') } catch (e) { out.push(e.name) }
        }
        out.concat(typeof globalThis.x)
    """
    assert box.run(code) == ["TypeError", "TypeError", "TypeError", "undefined"]


def test_clear_timeout_cancels(box: IsoBox) -> None:
    """A cleared timeout never fires; clearing an unknown id or undefined is harmless."""
    code = f"""
        let fired = 0;
        const id = setTimeout(() => fired++, 10);
        clearTimeout(id);
        clearTimeout(123456); clearInterval(undefined); clearTimeout('x');
        {SLEEP.format(ms=60)}
        fired
    """
    assert box.run(code) == 0


# -- ordering -------------------------------------------------------------------------------
def test_timers_fire_by_due_time_then_creation_order(box: IsoBox) -> None:
    """Timers fire in due-time order; those with the same delay in creation order."""
    code = f"""
        const got = [];
        setTimeout(() => got.push('c'), 300);
        setTimeout(() => got.push('a1'), 100);
        setTimeout(() => got.push('a2'), 100);
        setTimeout(() => got.push('a3'), 100);
        setTimeout(() => got.push('first'), 0);
        setTimeout(() => got.push('b'), 200);
        {SLEEP.format(ms=400)}
        got
    """
    assert box.run(code) == ["first", "a1", "a2", "a3", "b", "c"]


def test_microtasks_run_before_timers(box: IsoBox) -> None:
    """Promise jobs and queueMicrotask run before any timer, also between two timers."""
    code = f"""
        const got = [];
        setTimeout(() => {{ got.push('t1'); queueMicrotask(() => got.push('t1-micro')) }}, 50);
        setTimeout(() => got.push('t2'), 50);
        setTimeout(() => got.push('t0'), 0);
        queueMicrotask(() => got.push('micro'));
        Promise.resolve().then(() => got.push('then'));
        got.push('sync');
        {SLEEP.format(ms=120)}
        got
    """
    assert box.run(code) == ["sync", "micro", "then", "t0", "t1", "t1-micro", "t2"]


def test_set_interval_repeats_until_cleared(box: IsoBox) -> None:
    """setInterval fires again and again; after clearInterval at tick N it fires no more."""
    code = f"""
        let ticks = 0;
        await new Promise(r => {{
            const id = setInterval(() => {{ if (++ticks === 7) {{ clearInterval(id); r() }} }}, 3);
        }});
        const atClear = ticks;
        {SLEEP.format(ms=60)}
        [atClear, ticks]
    """
    assert box.run(code) == [7, 7]


def test_interval_cleared_from_outside(box: IsoBox) -> None:
    """An interval cleared by another timer stops; it ticked several times before."""
    code = f"""
        let ticks = 0;
        const id = setInterval(() => ticks++, 5);
        await new Promise(r => setTimeout(() => {{ clearInterval(id); r() }}, 100));
        const atClear = ticks;
        {SLEEP.format(ms=50)}
        [atClear, ticks]
    """
    at_clear, final = box.run(code)
    assert at_clear >= 3
    assert final == at_clear


def test_nested_timeout_chains(box: IsoBox) -> None:
    """A chain of timeouts each scheduling the next runs in order, one delay after another."""
    code = """
        const got = [];
        await new Promise(r => {
            const step = (n) => { got.push(n); if (n === 10) r(); else setTimeout(step, 10, n + 1) };
            setTimeout(step, 10, 1);
        });
        got
    """
    value, elapsed = timed(box.run, code)
    assert value == list(range(1, 11))
    assert elapsed >= 0.09


def test_thousand_timers_within_the_limit(box: IsoBox) -> None:
    """1,000 pending timers (the default limit) all fire, each exactly once."""
    code = """
        const seen = new Set();
        let sum = 0, done;
        const all = new Promise(r => { done = r });
        for (let i = 0; i < 1000; i++) {
            setTimeout(() => { seen.add(i); sum += i; if (seen.size === 1000) done() }, (i * 7) % 50);
        }
        await all;
        [seen.size, sum]
    """
    assert box.run(code) == [1000, sum(range(1000))]


# -- when a run ends ------------------------------------------------------------------------
def test_pending_timers_are_dropped_when_the_value_is_ready(box: IsoBox) -> None:
    """A run returns as soon as its value is ready; a 10 s timer it left is dropped."""
    value, elapsed = timed(box.run, "setTimeout(() => {}, 10000); setInterval(() => {}, 1); 1")
    assert value == 1
    assert elapsed < 2.0
    value, elapsed = timed(box.run, f"setTimeout(() => {{}}, 10000); {SLEEP.format(ms=10)} 2")
    assert value == 2
    assert elapsed < 2.0


def test_awaiting_a_timer_past_the_timeout_is_a_wall_timeout(box: IsoBox) -> None:
    """A run awaiting a timer due after its timeout fails with a wall TimeoutError at about
    the timeout, not at the timer; the box keeps serving."""
    started = time.monotonic()
    with pytest.raises(BoxTimeoutError) as info:
        box.run(f"{SLEEP.format(ms=10000)} 1", timeout=1.0)
    elapsed = time.monotonic() - started
    assert info.value.kind == "wall"
    assert 0.9 <= elapsed < 4.0
    assert box.run("1 + 1") == 2


def test_uncaught_error_in_a_timer_fails_the_run(box: IsoBox) -> None:
    """An exception thrown by a timer callback fails the run with that error."""
    code = f"setTimeout(() => {{ throw new RangeError('boom in timer') }}, 5); {SLEEP.format(ms=200)} 1"
    with pytest.raises(isobox.ScriptError) as info:
        box.run(code)
    assert info.value.name == "RangeError"
    assert info.value.message == "boom in timer"
    assert box.run("1 + 1") == 2


def test_uncaught_error_in_an_interval_fails_the_run(box: IsoBox) -> None:
    """An exception thrown by an interval callback fails the run, which does not hang."""
    code = "let n = 0; setInterval(() => { if (++n === 3) throw new Error('third tick') }, 2); " \
           "await new Promise(() => {})"
    with pytest.raises(isobox.ScriptError, match="third tick"):
        box.run(code)


def test_uncaught_error_in_a_microtask_fails_the_run(box: IsoBox) -> None:
    """An exception thrown by a queueMicrotask callback fails the run with that error."""
    with pytest.raises(isobox.ScriptError) as info:
        box.run("queueMicrotask(() => { throw new TypeError('boom in microtask') }); 1")
    assert info.value.name == "TypeError"
    assert info.value.message == "boom in microtask"
    with pytest.raises(isobox.ScriptError, match="boom again"):
        box.run(f"queueMicrotask(() => {{ throw new Error('boom again') }}); {SLEEP.format(ms=50)} 1")


def test_caught_errors_in_callbacks_do_not_fail_the_run(box: IsoBox) -> None:
    """A callback that catches its own error leaves the run alone."""
    code = f"""
        let caught = '';
        setTimeout(() => {{ try {{ throw new Error('inner') }} catch (e) {{ caught = e.message }} }}, 5);
        {SLEEP.format(ms=30)}
        caught
    """
    assert box.run(code) == "inner"


# -- limits ---------------------------------------------------------------------------------
def test_max_timers_limit_is_a_catchable_range_error(box: IsoBox) -> None:
    """Beyond max_timers pending timers, setTimeout throws a catchable RangeError."""
    code = """
        let n = 0, err;
        try { for (;;) { setTimeout(() => {}, 1000); n++ } }
        catch (e) { err = [e instanceof RangeError, e.message] }
        [n, ...err]
    """
    n, is_range, message = box.run(code)
    assert (n, is_range) == (1000, True)
    assert "too many pending timers" in message
    n, is_range, _message = box.run(code, max_timers=5)
    assert (n, is_range) == (5, True)
    intervals = "let n = 0; try { for (;;) { setInterval(() => {}, 1000); n++ } } catch (e) {}; n"
    assert box.run(intervals, max_timers=3) == 3


def test_fired_timers_free_their_slots(box: IsoBox) -> None:
    """Timers that fired or were cleared no longer count against max_timers."""
    code = f"""
        for (let i = 0; i < 5; i++) setTimeout(() => {{}}, 1);
        {SLEEP.format(ms=30)}
        const ids = [];
        for (let i = 0; i < 6; i++) ids.push(setTimeout(() => {{}}, 1000));
        ids.forEach(clearTimeout);
        for (let i = 0; i < 6; i++) setTimeout(() => {{}}, 1000);
        'ok'
    """
    assert box.run(code, max_timers=6) == "ok"  # 5 timers and the sleep's own fit


def test_max_timers_box_option() -> None:
    """max_timers set on the box applies to every run (and a run may raise it)."""
    code = "let n = 0; try { for (;;) { setTimeout(() => {}, 1000); n++ } } catch (e) {}; n"
    with IsoBox(timeout=5.0, pool={"min": 1, "max": 1}, max_timers=4) as b:
        assert b.run(code) == 4
        assert b.run(code, max_timers=9) == 9
    with pytest.raises(ValueError, match="max_timers"):
        IsoBox(mode="inprocess", max_timers=0)


def test_waiting_on_timers_does_not_spend_the_cpu_budget(box: IsoBox) -> None:
    """Time spent waiting for a timer is not CPU time: a 0.2 s CPU budget allows a 0.5 s wait."""
    result = box.execute(f"{SLEEP.format(ms=500)} 'waited'", cpu_timeout=0.2)
    assert result.value == "waited"
    assert result.duration >= 0.45
    assert result.cpu_time < 0.2


@pytest.mark.timeout(30)
def test_interval_flood_never_cleared_times_out(box: IsoBox) -> None:
    """setInterval(() => {}, 1) never cleared, with a promise that never settles, ends with a
    TimeoutError; the box keeps serving."""
    started = time.monotonic()
    with pytest.raises(BoxTimeoutError):
        box.run("setInterval(() => {}, 1); await new Promise(() => {})", timeout=1.0)
    assert time.monotonic() - started < 5.0
    assert box.run("1 + 1") == 2


@pytest.mark.timeout(30)
def test_cpu_bound_interval_callbacks_time_out(box: IsoBox) -> None:
    """Interval callbacks that burn CPU forever end with a TimeoutError (CPU or wall)."""
    code = ("setInterval(() => { const t = Date.now(); while (Date.now() - t < 20) {} }, 1); "
            "await new Promise(() => {})")
    started = time.monotonic()
    with pytest.raises(BoxTimeoutError) as info:
        box.run(code, timeout=2.0, cpu_timeout=0.5)
    assert info.value.kind in ("cpu", "wall")
    assert time.monotonic() - started < 6.0
    assert box.run("1 + 1") == 2


def test_never_settling_promise_without_timers_is_reported(box: IsoBox) -> None:
    """A promise that can never settle (no timers pending) fails at once, not at the timeout."""
    started = time.monotonic()
    with pytest.raises(isobox.ScriptError, match="never settled"):
        box.run("await new Promise(() => {})")
    assert time.monotonic() - started < 2.0


# -- sessions, streams and the async box ----------------------------------------------------
def test_timers_in_a_session(box: IsoBox) -> None:
    """Timers work in sessions; a timer left pending at the end of a run never fires later."""
    with box.create_session("timers") as s:
        assert s.run(f"count = 0; {SLEEP.format(ms=20)} count = 1; count") == 1
        assert s.run("setTimeout(() => { count = 99 }, 20); count + 1") == 2
        time.sleep(0.1)
        assert s.run(f"{SLEEP.format(ms=60)} count") == 1
        code = "await new Promise(r => { const id = setInterval(() => { if (++count === 4) " \
               "{ clearInterval(id); r() } }, 2) }); count"
        assert s.run(code) == 4


def test_timers_in_a_stream(box: IsoBox) -> None:
    """An async generator awaiting setTimeout streams its values with real delays."""
    code = f"""
        for (let i = 0; i < 4; i++) {{
            {SLEEP.format(ms=25)}
            yield i * i;
        }}
    """
    values, elapsed = timed(lambda: list(box.run_stream(code)))
    assert values == [0, 1, 4, 9]
    assert elapsed >= 0.09


def test_timer_error_in_a_stream_fails_the_stream(box: IsoBox) -> None:
    """An uncaught timer error while a stream waits fails the stream with that error."""
    code = f"""
        setTimeout(() => {{ throw new Error('timer broke the stream') }}, 5);
        yield 1;
        {SLEEP.format(ms=200)}
        yield 2;
    """
    got: list[Any] = []
    with pytest.raises(isobox.ScriptError, match="timer broke the stream"):
        for value in box.run_stream(code):
            got.append(value)
    assert got in ([], [1])


@pytest.mark.timeout(30)
def test_timers_in_the_async_box() -> None:
    """AsyncIsoBox (both modes) drives timers; concurrent timers in one run overlap."""
    async def main(mode: str) -> list[Any]:
        async with AsyncIsoBox(mode=mode, timeout=5.0, pool={"min": 1, "max": 1}) as ab:
            started = time.monotonic()
            both = await ab.run("await Promise.all([1, 2, 3].map(x => new Promise(r => "
                                "setTimeout(() => r(x), 400))))")
            elapsed = time.monotonic() - started
            stream = [v async for v in ab.run_stream(
                f"for (let i = 0; i < 3; i++) {{ {SLEEP.format(ms=10)} yield i }}")]
            with pytest.raises(BoxTimeoutError):
                await ab.run(f"{SLEEP.format(ms=10000)} 1", timeout=0.5)
            return [both, elapsed, stream]

    for mode in MODES:
        both, elapsed, stream = asyncio.run(main(mode))
        assert both == [1, 2, 3], mode
        assert 0.38 <= elapsed < 1.0, (mode, elapsed)  # one after another would take 1.2 s
        assert stream == [0, 1, 2], mode


@pytest.mark.timeout(30)
def test_concurrent_runs_keep_their_own_timers() -> None:
    """Timers of runs on different workers do not mix: each run sees only its own."""
    with IsoBox(timeout=5.0, pool={"min": 2, "max": 2}) as b:
        b.warmup_pool()
        results: dict[int, Any] = {}

        def run(n: int) -> None:
            code = f"""
                const got = [];
                for (let i = 0; i < 5; i++) setTimeout(() => got.push({n} * 10 + i), 5 * i);
                {SLEEP.format(ms=80)}
                got
            """
            results[n] = b.run(code)

        threads = [threading.Thread(target=run, args=(n,)) for n in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert results == {1: [10, 11, 12, 13, 14], 2: [20, 21, 22, 23, 24]}
