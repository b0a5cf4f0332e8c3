"""``box.map`` with real workers: values and order, per-item failures with ``run``'s own error
types, special values, compile errors, top-level await, chunking, the sandbox, retries after
workers are SIGKILLed (at random, and deterministically from a host function), lazy input
reading, and the asyncio twin.

A reference outcome is always what ``box.run`` does with the same code and ``input``: map must
not invent its own semantics.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import random
import signal
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, cast

import pytest
from batch_helpers import SLOW, alive, kill, wait_until

from isobox import AsyncIsoBox, IsoBox, batch
from isobox.batch import BatchItem
from isobox.errors import (
    ClosedError,
    CompileError,
    IsoBoxError,
    MemoryLimitError,
    ScriptError,
    SecurityError,
    SerializationError,
    TimeoutError,
    WorkerCrashedError,
)

LIMITS: dict[str, Any] = {"cpu_timeout": 0.3, "memory_limit": 32 * 2**20}

# One item of each kind of failure, between items that succeed.
MIXED = """
if (input === 3) throw new TypeError('bad ' + input);
if (input === 5) { while (true) {} }
if (input === 7) { const a = []; for (;;) a.push('x'.repeat(1000) + a.length); }
if (input === 9) (() => input);
else ({n: input, sq: input * input})
"""
MIXED_ERRORS = {3: ScriptError, 5: TimeoutError, 7: MemoryLimitError, 9: SerializationError}


def outcome(item: BatchItem) -> tuple[Any, ...]:
    """What a test compares: the value, or the error's type and text."""
    if item.ok:
        return ("ok", item.value)
    assert item.error is not None
    return (type(item.error).__name__, str(item.error))


def run_outcome(box: IsoBox, code: str, item: Any, **options: Any) -> tuple[Any, ...]:
    """``run``'s outcome for one input: the reference for map's."""
    try:
        return ("ok", box.run(code, sandbox={"input": item}, **options))
    except IsoBoxError as exc:
        return (type(exc).__name__, str(exc))


def indices(items: list[BatchItem]) -> list[int]:
    return [item.index for item in items]


# -- values, order, failures -----------------------------------------------------------------
def test_values_in_input_order(box: IsoBox) -> None:
    """ordered=True (the default) yields every index once, in input order, with its value."""
    items = list(box.map("({i: input, d: input * 2})", range(1000), chunk_size=16))
    assert indices(items) == list(range(1000))
    assert all(item.ok and item.attempts == 1 for item in items)
    assert [item.value for item in items] == [{"i": i, "d": 2 * i} for i in range(1000)]


def test_unordered_yields_every_index_once(box: IsoBox) -> None:
    """ordered=False may yield out of order, but every index exactly once with its own value."""
    # Uneven work per chunk, so chunks finish out of order.
    code = "let s = 0; for (let i = 0; i < (input % 3) * 20000; i++) s++; input * 3 + (s - s)"
    items = list(box.map(code, range(1500), ordered=False, chunk_size=8))
    assert sorted(indices(items)) == list(range(1500))
    assert all(item.ok and item.value == item.index * 3 for item in items)


FAILURES = {
    "throw": ("if (input === 5) throw new TypeError('bad ' + input); input * 10", ScriptError),
    "cpu timeout": ("if (input === 5) { while (true) {} } input * 10", TimeoutError),
    "unserializable": ("input === 5 ? () => input : input * 10", SerializationError),
}
BOMBS = {  # QuickJS throws InternalError('out of memory'), or null when it cannot even do that
    "memory bomb (strings)": "if (input === 5) { const a = []; for (;;) a.push('x'.repeat(1000) + a.length); } input * 10",
    "memory bomb (objects)": "if (input === 5) { const a = []; for (;;) a.push({k: a.length}); } input * 10",
}


@pytest.mark.parametrize("kind", [*FAILURES, *BOMBS])
def test_each_failure_lands_on_its_own_item(box: IsoBox, kind: str) -> None:
    """A throw, a CPU timeout, a memory bomb or an unserializable value in a chunk fails only
    its own item, with the error (type and message) run raises for it; the neighbours in the
    same chunk succeed, and nothing counts as a retry."""
    code, error_type = FAILURES.get(kind) or (BOMBS[kind], MemoryLimitError)
    items = list(box.map(code, range(10), chunk_size=64, **LIMITS))  # all in one chunk
    assert indices(items) == list(range(10))
    failed = items[5]
    assert not failed.ok
    assert type(failed.error) is error_type, failed.error
    assert outcome(failed) == run_outcome(box, code, 5, **LIMITS)
    for item in items[:5] + items[6:]:
        assert item.ok, (item.index, item.error)
        assert item.value == item.index * 10
    assert all(item.attempts == 1 for item in items)


def test_mixed_failures_in_one_chunk(box: IsoBox) -> None:
    """All four kinds of failure in one chunk: each on its item, as run has it."""
    inputs = list(range(12))
    items = list(box.map(MIXED, inputs, chunk_size=64, **LIMITS))
    assert indices(items) == inputs
    for item in items:
        kind = MIXED_ERRORS.get(item.index)
        if kind is None:
            assert item.ok, (item.index, item.error)
            assert item.value == {"n": item.index, "sq": item.index ** 2}
        else:
            assert type(item.error) is kind, (item.index, item.error)
        assert outcome(item) == run_outcome(box, MIXED, item.index, **LIMITS), item.index


def test_the_error_objects_are_complete(box: IsoBox) -> None:
    """The errors carry the fields run's errors carry (name, kind, limit, path)."""
    items = list(box.map(MIXED, [3, 5, 7, 9], chunk_size=4, **LIMITS))
    thrown, timed_out, bombed, unserializable = (item.error for item in items)
    assert isinstance(thrown, ScriptError)
    assert (thrown.name, thrown.message) == ("TypeError", "bad 3")
    assert isinstance(timed_out, TimeoutError)
    assert isinstance(timed_out, builtins.TimeoutError)
    assert (timed_out.kind, timed_out.limit) == ("cpu", 0.3)
    assert isinstance(bombed, MemoryLimitError)
    assert bombed.limit == 32 * 2**20
    assert isinstance(unserializable, SerializationError)
    assert unserializable.path == "result"


def test_chunk_size_one_and_chunked_agree(box: IsoBox) -> None:
    """chunk_size=1 (a context per item) and chunks of several sizes give the same outcomes,
    failures included."""
    # One timeout in 30 items (each costs its budget twice) and a memory bomb.
    code = MIXED.replace("input === 5", "input === 25")
    inputs = list(range(30))
    alone = [outcome(i) for i in box.map(code, inputs, chunk_size=1, **LIMITS)]
    for size in (4, 64):
        assert [outcome(i) for i in box.map(code, inputs, chunk_size=size, **LIMITS)] == alone
    assert alone[25][0] == "TimeoutError"


def test_special_values_cross_both_ways(box: IsoBox) -> None:
    """bytes, datetimes, big ints and nested dicts cross into ``input`` and back as with run."""
    when = dt.datetime(2020, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    inputs = [b"\x00\xffbytes", when, 2**70, -(2**70), {"a": {"b": [1, {"c": None}], "d": "é\u2028"}},
              1.5, "", [], {}, True, None, [when, b"x", {"n": 2**64}]]
    items = list(box.map("input", inputs, chunk_size=5))
    assert [item.value for item in items] == inputs
    assert all(item.ok for item in items)
    assert [outcome(i) for i in items] == [run_outcome(box, "input", x) for x in inputs]
    made = "[new Uint8Array([1, 2, 255]), new Date(0), 2n ** 80n, new Map([['k', {z: [1n]}]])][input]"
    items = list(box.map(made, range(4), chunk_size=4))
    assert [item.value for item in items] == [
        b"\x01\x02\xff", dt.datetime(1970, 1, 1, tzinfo=dt.UTC), 2**80, {"k": {"z": [1]}}]
    assert [outcome(i) for i in items] == [run_outcome(box, made, x) for x in range(4)]


def test_input_that_cannot_cross_fails_only_its_item(box: IsoBox) -> None:
    """An input the value table refuses (a set, an object) is that item's SerializationError,
    as run's; the chunk's other items run."""
    inputs: list[Any] = [1, {1, 2}, 3, {"k": object()}, 5]
    items = list(box.map("input", inputs, chunk_size=8))
    assert [item.ok for item in items] == [True, False, True, False, True]
    assert [outcome(i) for i in items] == [run_outcome(box, "input", x) for x in inputs]


def test_compile_error_fails_every_item_without_running(box: IsoBox) -> None:
    """Code that does not parse: every item fails with the CompileError run raises, and no item
    runs (a host function at the top of the code is never called)."""
    calls: list[int] = []
    code = "count(); const x = (input;"
    items = list(box.map(code, range(50), functions={"count": lambda: calls.append(1)}))
    assert indices(items) == list(range(50))
    assert all(isinstance(item.error, CompileError) and not item.ok for item in items)
    with pytest.raises(CompileError) as raised:
        box.run(code, sandbox={"input": 1}, functions={"count": lambda: calls.append(1)})
    assert {str(item.error) for item in items} == {str(raised.value)}
    assert calls == []
    assert list(box.map("1 +", [])) == []


def test_top_level_await_runs_item_by_item(box: IsoBox) -> None:
    """Code with a top-level await works, and each item gets a context of its own (a global
    set by one item is not seen by the next, unlike items of one chunk)."""
    code = ("var seen = typeof seen === 'undefined' ? 0 : seen + 1;\n"
            "const v = await Promise.resolve(input * 3);\n[v, seen]")
    items = list(box.map(code, range(20), chunk_size=64))
    assert [item.value for item in items] == [[i * 3, 0] for i in range(20)]
    thrown = list(box.map("await null; if (input === 2) throw new Error('x'); input", range(4)))
    assert [item.ok for item in thrown] == [True, True, False, True]
    assert isinstance(thrown[2].error, ScriptError)


def test_sandbox_merges_with_input(box: IsoBox) -> None:
    """sandbox= gives every item the same globals; its own ``input`` is replaced by the item."""
    sandbox = {"k": 5, "table": {"a": 1}, "input": "shadowed"}
    for size in (1, 64):
        items = list(box.map("[input, k, table.a]", ["a", "b", "c"], chunk_size=size,
                             sandbox=sandbox))
        assert [item.value for item in items] == [["a", 5, 1], ["b", 5, 1], ["c", 5, 1]]


@pytest.mark.parametrize("mode", ["process", "inprocess"])
def test_the_box_sandbox_reaches_every_item(mode: str) -> None:
    """The box's own sandbox is under every item's globals, chunked or alone, as under every
    run's; map's sandbox= is merged over it (the README's rule for runs)."""
    with IsoBox(mode=mode, sandbox={"k": 1, "j": 2}, pool={"min": 1, "max": 1}) as own:
        for size in (1, 4):
            plain = list(own.map("[input, k, j]", ["a", "b"], chunk_size=size))
            assert [item.value for item in plain] == [["a", 1, 2], ["b", 1, 2]], size
            over = list(own.map("[input, k, j]", ["a", "b"], chunk_size=size,
                                sandbox={"k": 10}))
            assert [item.value for item in over] == [["a", 10, 2], ["b", 10, 2]], size
        assert own.run("k + j", sandbox=None) == 3  # None: no sandbox of its own


def test_empty_input(box: IsoBox) -> None:
    """No inputs: no items, no error."""
    assert list(box.map("input", [])) == []
    assert list(box.map("input", iter(()), ordered=False)) == []


def test_all_items_failing(box: IsoBox) -> None:
    """Every item throwing: each its own ScriptError with its own message, none lost."""
    items = list(box.map("throw new RangeError('no ' + input)", range(300), chunk_size=32))
    assert indices(items) == list(range(300))
    assert all(isinstance(item.error, ScriptError) for item in items)
    assert [(item.error.name, item.error.message) for item in items  # type: ignore[union-attr]
            ] == [("RangeError", f"no {i}") for i in range(300)]


def test_options_are_checked_before_the_first_item(box: IsoBox) -> None:
    """Bad map or run options fail at the call, not at the first item."""
    with pytest.raises(ValueError):
        box.map("input", [1], chunk_size=0)
    with pytest.raises(ValueError):
        box.map("input", [1], window=0)
    with pytest.raises(ValueError):
        box.map("input", [1], retries=-1)
    with pytest.raises(TypeError):
        box.map("input", [1], no_such_option=1)
    with IsoBox(pool={"min": 1, "max": 1}) as closed:
        pass
    with pytest.raises(ClosedError):
        closed.map("input", [1])


# -- lazy input ----------------------------------------------------------------------------
@pytest.mark.timeout(180)  # real processes: slow on a loaded machine
@pytest.mark.parametrize("ordered", [True, False])
def test_inputs_are_read_lazily(box: IsoBox, ordered: bool) -> None:
    """A generator of 200,000 inputs is never more than window * chunk_size items ahead of
    the results handed back."""
    total = 200_000 if ordered else 50_000
    window, chunk = 4, 64
    pulled = 0

    def inputs() -> Iterator[int]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield i

    got = 0
    ahead = 0
    seen = set()
    for item in box.map("input + 1", inputs(), window=window, chunk_size=chunk, ordered=ordered):
        got += 1
        ahead = max(ahead, pulled - got)
        assert pulled - got <= window * chunk, (pulled, got)
        assert item.ok and item.value == item.index + 1
        if ordered:
            assert item.index == got - 1
        seen.add(item.index)
    assert got == total and len(seen) == total
    assert ahead > 0  # it did read ahead (the bound above is not vacuous)


def test_leaving_early_stops_reading(box: IsoBox) -> None:
    """Breaking out of the loop stops the map: the input is not drained, the box still works."""
    pulled = 0

    def inputs() -> Iterator[int]:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield i

    # IsoBox.map is a generator (annotated as an Iterator); the test closes it.
    results = cast("Generator[BatchItem, None, None]",
                   box.map("input", inputs(), window=4, chunk_size=64))
    first = next(results)
    results.close()
    assert first.index == 0
    assert pulled <= 5 * 64
    assert box.run("1 + 1") == 2


# -- crashes and retries ---------------------------------------------------------------------
@pytest.mark.timeout(180)  # real processes: slow on a loaded machine
def test_killing_busy_workers_loses_nothing() -> None:
    """Workers SIGKILLed again and again during a map of 3,000 slow-ish items: every index
    comes back exactly once, ok, with its value (items of a crashed chunk run again)."""
    total = 3000
    killed: list[int] = []
    stop = threading.Event()
    rng = random.Random(7)
    with IsoBox(timeout=30.0, pool={"min": 2, "max": 2}) as box:
        box.warmup_pool()

        def killer() -> None:
            # At most 6 deaths, 0.4 s apart: below the crash-loop breaker (10 deaths in 10 s),
            # which would otherwise (by design) fail runs while no worker is up.
            while not stop.wait(0.4) and len(killed) < 6:
                busy = [w.pid for w in box.pool_stats().workers if w.state == "busy"]
                if busy:
                    pid = rng.choice(busy)
                    if kill(pid):
                        killed.append(pid)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            items = list(box.map(SLOW, range(total)))
        finally:
            stop.set()
            thread.join()
        restarts = box.pool_stats().restarts
    assert indices(items) == list(range(total))
    failed = [(item.index, item.error) for item in items if not item.ok]
    assert not failed
    assert [item.value for item in items] == [2 * i for i in range(total)]
    assert len(killed) >= 3, "the map ended before the workers could be killed"
    assert restarts >= len(killed)
    assert all(1 <= item.attempts <= 3 for item in items)


def _dying_box() -> tuple[IsoBox, list[int], Callable[[], int]]:
    """A box with one worker and a host function ``die()`` that SIGKILLs the worker that
    called it (the only busy one) and returns once it is dead."""
    box = IsoBox(timeout=10.0, pool={"min": 1, "max": 1})
    calls: list[int] = []

    def die() -> int:
        busy = [w.pid for w in box.pool_stats().workers if w.state == "busy"]
        assert len(busy) == 1
        calls.append(busy[0])
        kill(busy[0])
        assert wait_until(lambda: not alive(busy[0]), 5.0)
        return 0

    return box, calls, die


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("retries", [0, 2])
def test_a_worker_that_always_dies(retries: int, chunk_size: int) -> None:
    """An item that kills its worker every time: it fails with WorkerCrashedError after
    retries + 1 attempts (each on a fresh worker); the other items, those of its chunk
    included, succeed at the first attempt."""
    box, calls, die = _dying_box()
    try:
        items = list(box.map("if (input === 5) die(); input * 10", range(8), retries=retries,
                             chunk_size=chunk_size, functions={"die": die}))
    finally:
        box.shutdown()
    assert indices(items) == list(range(8))
    dead = items[5]
    assert not dead.ok
    assert isinstance(dead.error, WorkerCrashedError)
    assert dead.error.signal == signal.SIGKILL
    assert dead.error.pid in calls
    assert dead.attempts == retries + 1
    for item in items[:5] + items[6:]:
        assert item.ok and item.value == item.index * 10 and item.attempts == 1
    # Alone, the item ran retries + 1 times; in a chunk, the chunk's run may come first (a
    # chunk whose worker died is split and its items run alone).
    if chunk_size == 1:
        assert len(calls) == retries + 1
    else:
        assert retries + 1 <= len(calls) <= retries + 2
    assert len(set(calls)) == len(calls)  # a fresh worker every time


def test_a_crash_is_retried_then_succeeds() -> None:
    """An item whose worker dies on its first run only succeeds on the retry; its attempts
    count the crash."""
    box, calls, die = _dying_box()
    state = {"first": True}

    def die_once() -> int:
        if state["first"]:
            state["first"] = False
            return die()
        return 0

    try:
        items = list(box.map("if (input === 2) dieOnce(); input", range(4), chunk_size=1,
                             functions={"dieOnce": die_once}))
    finally:
        box.shutdown()
    assert [item.ok for item in items] == [True] * 4
    assert [item.attempts for item in items] == [1, 1, 2, 1]
    assert len(calls) == 1


@pytest.mark.timeout(120)
def test_items_ride_out_the_crash_loop_breaker() -> None:
    """Twelve items each kill their worker on their first run: the fourth death within 3 s
    opens the pool's crash-loop breaker (made 4 deaths in 3 s instead of 10 in 10 s, so that
    it surely opens, and closes soon), which refuses runs until the deaths age out. Items wait
    that out instead of spending their retries on refusals: every item succeeds, on its
    second run."""
    box, calls, die = _dying_box()
    assert box._pool is not None
    box._pool._breaker.threshold = 4
    box._pool._breaker.window = 3.0
    refusals: list[str] = []
    box.on("error", lambda event: refusals.append(getattr(event["error"], "cause", "")))
    first: set[int] = set()

    def die_once(index: int) -> int:
        if index in first:
            return 0
        first.add(index)
        return die()

    try:
        items = list(box.map("dieOnce(input); input", range(12), chunk_size=1,
                             functions={"dieOnce": die_once}))
    finally:
        box.shutdown()
    failed = [(item.index, item.error) for item in items if not item.ok]
    assert not failed
    assert [item.value for item in items] == list(range(12))
    assert [item.attempts for item in items] == [2] * 12
    assert len(calls) == 12
    assert "crash loop" in refusals, "the breaker never opened: the test proved nothing"


def test_the_retry_decision() -> None:
    """Crashes are retried after 50, 100, ... ms up to ``retries`` times; refusals by the
    crash-loop breaker cost no retry and are waited out up to CRASH_LOOP_WAIT seconds."""
    crash = WorkerCrashedError("died", cause="killed by signal 9")
    refused = WorkerCrashedError("breaker", cause="crash loop")
    tries = batch._Attempts(retries=2)
    pauses = []
    for _ in range(3):
        tries.runs += 1
        pauses.append(tries.pause_after(crash))
    assert pauses == [0.05, 0.1, None]
    tries = batch._Attempts(retries=0)
    waited = 0.0
    while True:
        tries.runs += 1
        pause = tries.pause_after(refused)
        if pause is None:
            break
        waited += pause
    assert tries.runs == 0  # refused runs never started
    assert batch.CRASH_LOOP_WAIT - 2.0 <= waited <= batch.CRASH_LOOP_WAIT
    tries.runs += 1
    assert tries.pause_after(crash) is None  # retries=0: the first real crash is final


# -- asyncio ---------------------------------------------------------------------------------
def test_async_map_gives_the_same_results(box: IsoBox) -> None:
    """AsyncIsoBox.map: an async iterator with the same outcomes as the sync map, ordered or
    not, failures included."""
    inputs = list(range(24))
    expected = [outcome(i) for i in box.map(MIXED, inputs, chunk_size=8, **LIMITS)]

    async def main() -> tuple[list[BatchItem], list[BatchItem], list[BatchItem]]:
        async with AsyncIsoBox(timeout=10.0, pool={"min": 2, "max": 2}) as abox:
            ordered = [i async for i in abox.map(MIXED, inputs, chunk_size=8, **LIMITS)]
            unordered = [i async for i in abox.map(MIXED, inputs, chunk_size=8, ordered=False,
                                                   **LIMITS)]
            empty = [i async for i in abox.map("input", [])]
            return ordered, unordered, empty

    ordered, unordered, empty = asyncio.run(main())
    assert indices(ordered) == inputs
    assert [outcome(i) for i in ordered] == expected
    assert sorted(indices(unordered)) == inputs
    assert [outcome(i) for i in sorted(unordered, key=lambda i: i.index)] == expected
    assert empty == []


def test_async_map_compile_error_and_await() -> None:
    """The asyncio map: a CompileError for every item, and top-level await code."""
    async def main() -> tuple[list[BatchItem], list[BatchItem]]:
        async with AsyncIsoBox(pool={"min": 1, "max": 1}) as abox:
            bad = [i async for i in abox.map("(", range(3))]
            awaited = [i async for i in abox.map("await 1; input * 2", range(5))]
            return bad, awaited

    bad, awaited = asyncio.run(main())
    assert all(isinstance(item.error, CompileError) for item in bad) and len(bad) == 3
    assert [item.value for item in awaited] == [0, 2, 4, 6, 8]


# -- chunks must not change what an item does ------------------------------------------------
# (Each of these failed on 0d91bdf, where a JS runner eval'd the items of a chunk.)
@pytest.mark.parametrize("code", ["throw 5", "throw 'plain'", "throw {name: 'X', message: 'm'}"])
def test_a_thrown_non_error_reads_as_in_run(box: IsoBox, code: str) -> None:
    """A thrown value that is not an Error reads in a chunk as run (and chunk_size=1) has it."""
    chunked = [outcome(i) for i in box.map(code, range(3), chunk_size=8)]
    alone = [outcome(i) for i in box.map(code, range(3), chunk_size=1)]
    assert chunked == alone == [run_outcome(box, code, i) for i in range(3)]


@pytest.mark.parametrize("code", ["process.exit(1)", "const p = process; p", "require('fs')"])
def test_trapped_globals_raise_security_error_in_chunks(box: IsoBox, code: str) -> None:
    """Reading a trapped Node global in a chunk is run's SecurityError, not undefined."""
    chunked = list(box.map(code, range(3), chunk_size=8))
    assert all(isinstance(item.error, SecurityError) for item in chunked), chunked
    assert [outcome(i) for i in chunked] == [run_outcome(box, code, i) for i in range(3)]


@pytest.mark.parametrize("chunk_size", [1, 8])
def test_typeof_a_trapped_global_records_no_violation(box: IsoBox, chunk_size: int) -> None:
    """``typeof process`` is how a script asks whether it runs in Node: it says "undefined"
    and records no security violation, as in run."""
    seen: list[dict[str, Any]] = []
    box.on("security:violation", seen.append)
    try:
        items = list(box.map("typeof process", range(3), chunk_size=chunk_size))
    finally:
        box.off("security:violation", seen.append)
    assert [item.value for item in items] == ["undefined"] * 3
    assert seen == []


def test_typescript_code_in_chunks(box: IsoBox) -> None:
    """language='typescript': the items of a chunk run the transpiled code, as alone."""
    code = "const x: number = input; x * 2"
    alone = list(box.map(code, [1, 2, 3], language="typescript", chunk_size=1))
    assert [item.value for item in alone] == [2, 4, 6]
    chunked = list(box.map(code, [1, 2, 3], language="typescript", chunk_size=8))
    assert [outcome(i) for i in chunked] == [outcome(i) for i in alone]


def test_error_stack_in_chunks_is_the_items_own(box: IsoBox) -> None:
    """A chunked item's error stack is the item's own (no runner or prelude frames)."""
    code = "input.a.b"
    alone = list(box.map(code, [{}, {}], chunk_size=1))
    chunked = list(box.map(code, [{}, {}], chunk_size=8))
    assert [i.error.stack for i in chunked] == [i.error.stack for i in alone]  # type: ignore[union-attr]


def test_raised_for_other_errors_unchanged(box: IsoBox) -> None:
    """A plain Error subclass thrown in a chunk reads exactly as in run (name, message)."""
    code = "class E extends Error { constructor(m) { super(m); this.name = 'E'; } }; throw new E('m' + input)"
    chunked = [outcome(i) for i in box.map(code, range(3), chunk_size=8)]
    assert chunked == [run_outcome(box, code, i) for i in range(3)]


FREEZERS = [
    "if (input === 0) Object.freeze(globalThis); input",
    "if (input === 0) Object.defineProperty(globalThis, 'input', "
    "{value: 'x', writable: false, configurable: false}); input",
    "if (input === 0) Object.defineProperty(globalThis, 'k', "
    "{value: 'forged', writable: false, configurable: false}); [input, k]",
]


@pytest.mark.parametrize("code", FREEZERS, ids=["freeze-globalThis", "frozen-input",
                                                "frozen-sandbox-global"])
def test_an_item_that_freezes_globals_does_not_break_its_neighbours(box: IsoBox,
                                                                    code: str) -> None:
    """An item may leave the chunk's shared globals changed (documented), but it must not make
    the other items of its chunk fail: their own ``input`` and sandbox still reach them."""
    alone = [outcome(i) for i in box.map(code, range(4), chunk_size=1, sandbox={"k": 5})]
    assert all(entry[0] == "ok" for entry in alone)
    chunked = [outcome(i) for i in box.map(code, range(4), chunk_size=4, sandbox={"k": 5})]
    assert chunked == alone
