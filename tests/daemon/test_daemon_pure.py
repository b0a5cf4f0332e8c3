"""The daemon's pure parts: FairQueue, check_body, outcome_of, parse_listen, DaemonConfig and the
Dispatcher's fairness (driven by a real asyncio loop, no processes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from isobox.errors import (
    CompileError,
    DaemonError,
    MemoryLimitError,
    ScriptError,
    TimeoutError,
    WorkerCrashedError,
)
from isobox.options import BoxOptions, build_request
from isobox.supervisor.daemon import (
    DaemonConfig,
    Dispatcher,
    check_body,
    outcome_of,
    parse_listen,
)
from isobox.supervisor.scheduler import FairQueue, QueueFull

pytestmark = pytest.mark.timeout(20)

CONFIG = DaemonConfig(socket="/tmp/unused.sock", max_timeout=60.0, max_memory=256 * 2**20)


def drain(queue: FairQueue[Any]) -> list[Any]:
    """Pop everything, in the order the queue gives it."""
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


# -- FairQueue -------------------------------------------------------------------------------
def test_fair_queue_higher_priority_first() -> None:
    """Higher priorities pop first, whatever the order they were pushed in."""
    q: FairQueue[str] = FairQueue(10, 10)
    q.push("a", "low", 0)
    q.push("a", "high", 5)
    q.push("b", "mid", 1)
    q.push("b", "negative", -3)
    assert drain(q) == ["high", "mid", "low", "negative"]
    assert len(q) == 0


def test_fair_queue_round_robin_between_clients_fifo_within() -> None:
    """At one priority, clients take turns; each client's own requests keep their order."""
    q: FairQueue[str] = FairQueue(100, 100)
    for i in range(4):
        q.push("batch", f"b{i}")
    q.push("interactive", "i0")
    q.push("other", "o0")
    q.push("other", "o1")
    assert drain(q) == ["b0", "i0", "o0", "b1", "o1", "b2", "b3"]


def test_fair_queue_new_client_waits_at_most_one_turn() -> None:
    """A client arriving behind a batch of 20 is served after at most one batch item."""
    q: FairQueue[str] = FairQueue(100, 100)
    for i in range(20):
        q.push("batch", f"b{i}")
    assert q.pop() == "b0"
    q.push("late", "late")
    assert drain(q)[:2] == ["b1", "late"]


def test_fair_queue_bounds_raise_clear_messages() -> None:
    """Past the total bound and past a client's bound, push raises QueueFull naming which."""
    q: FairQueue[int] = FairQueue(3, 2)
    q.push("a", 1)
    q.push("a", 2)
    with pytest.raises(QueueFull, match="this client already has 2 waiting requests"):
        q.push("a", 3)
    q.push("b", 4)
    with pytest.raises(QueueFull, match=r"queue is full \(3 waiting requests\)"):
        q.push("c", 5)
    assert len(q) == 3 and q.depth("a") == 2 and q.depth("b") == 1 and q.depth("c") == 0
    q.pop()
    q.push("c", 5)  # room again once one left
    assert len(q) == 3


@pytest.mark.parametrize(("total", "per_client"), [(0, 1), (1, 0), (-1, 5)])
def test_fair_queue_rejects_bad_bounds(total: int, per_client: int) -> None:
    """Bounds below 1 are a ValueError at construction."""
    with pytest.raises(ValueError, match="bounds"):
        FairQueue(total, per_client)


def test_fair_queue_remove() -> None:
    """remove() takes a waiting item out (keeping counts right); False if not queued there."""
    q: FairQueue[str] = FairQueue(10, 10)
    q.push("a", "x")
    q.push("a", "y")
    q.push("b", "z", 2)
    assert q.remove("a", "x") is True
    assert q.remove("a", "x") is False  # already gone
    assert q.remove("b", "z", 0) is False  # wrong priority
    assert q.remove("nobody", "y") is False
    assert len(q) == 2 and q.depth("a") == 1
    assert q.remove("b", "z", 2) is True
    assert q.depth("b") == 0
    assert drain(q) == ["y"]
    assert q.pop() is None and len(q) == 0


# -- check_body ------------------------------------------------------------------------------
def body(**extra: Any) -> dict[str, Any]:
    """A real run body, as the client library builds it, with ``extra`` keys merged in."""
    return {**build_request("1+2", BoxOptions()).body, **extra}


def test_check_body_accepts_what_the_client_builds() -> None:
    """Bodies from build_request (plain, validate, TypeScript, sandbox, env) pass unchanged."""
    plain = build_request("1+2", BoxOptions()).body
    assert check_body(dict(plain), CONFIG) == plain
    richer = build_request("let x: number = n", BoxOptions(sandbox={"n": 1}, env={"A": "b"},
                                                            max_timers=5),
                           "a.ts", validate=True).body
    assert check_body(dict(richer), CONFIG) == richer
    with_host = body(functions=[["add", False], ["fetch", True]], files={"/a.js": "1"},
                     entry="/a.js", require={"whitelist": []}, filesystem={"quota": 1000})
    assert check_body(dict(with_host), CONFIG) == with_host


@pytest.mark.parametrize("key", ["bogus", "__proto__", "cwd"])
def test_check_body_rejects_unknown_keys(key: str) -> None:
    """A key no worker knows is refused, naming it."""
    with pytest.raises(DaemonError, match=f"unknown run field '{key}'"):
        check_body(body(**{key: 1}), CONFIG)


@pytest.mark.parametrize(("key", "value"), [
    ("memory_limit", "big"), ("memory_limit", 1.5), ("memory_limit", True), ("memory_limit", 0),
    ("stack_limit", -1), ("tagged", 1), ("validate", "yes"), ("globals_json", {}),
    ("wall_timeout", "5"), ("wall_timeout", True), ("cpu_timeout", 0), ("cpu_timeout", -1.0),
    ("wall_timeout", float("nan")), ("wall_timeout", float("inf")), ("files", ["a"]),
    ("functions", [["add"]]), ("functions", [[1, False]]), ("functions", [["f", 1]]),
    ("functions", "add"), ("console", "loud"), ("max_timers", None),
])
def test_check_body_rejects_wrong_types(key: str, value: Any) -> None:
    """A field of the wrong type (or an out-of-range number) is a DaemonError naming it."""
    with pytest.raises(DaemonError, match=repr(key)):
        check_body(body(**{key: value}), CONFIG)


@pytest.mark.parametrize("bad", [None, [], "1+2", {"wall_timeout": 1.0}, {"code": 5}])
def test_check_body_needs_a_dict_with_code(bad: Any) -> None:
    """Something that is not a body with string code is refused."""
    with pytest.raises(DaemonError, match="body with its code"):
        check_body(bad, CONFIG)


def test_check_body_needs_a_wall_timeout() -> None:
    """The daemon's deadline comes from wall_timeout: a body without one is refused."""
    plain = body()
    del plain["wall_timeout"]
    with pytest.raises(DaemonError, match="wall_timeout"):
        check_body(plain, CONFIG)


@pytest.mark.parametrize("key", ["wall_timeout", "cpu_timeout"])
def test_check_body_enforces_the_timeout_ceiling(key: str) -> None:
    """Timeouts up to max_timeout pass; above it they are refused, naming the ceiling."""
    assert check_body(body(**{key: 60.0}), CONFIG)[key] == 60.0
    with pytest.raises(DaemonError, match=r"timeouts up to 60\.0s"):
        check_body(body(**{key: 60.5}), CONFIG)


def test_check_body_enforces_the_memory_ceiling() -> None:
    """memory_limit up to max_memory passes; one byte more is refused, naming the ceiling."""
    assert check_body(body(memory_limit=256 * 2**20), CONFIG)
    with pytest.raises(DaemonError, match=f"ceiling of {256 * 2**20} bytes"):
        check_body(body(memory_limit=256 * 2**20 + 1), CONFIG)


@pytest.mark.parametrize("key", ["session", "stream", "restore_json", "restore_tagged",
                                 "drop"])
def test_check_body_refuses_session_and_stream_keys(key: str) -> None:
    """RUN bodies cannot reach into sessions or streams (a stream of its own, or another
    client's session)."""
    with pytest.raises(DaemonError, match=f"{key!r} is not available over a remote"):
        check_body(body(**{key: "x"}), CONFIG)


@pytest.mark.parametrize("op", ["state", "stream", "drop", "run"])
def test_check_body_allows_only_the_map_op(op: str) -> None:
    """The one op a RUN body may name is a chunk of map items; the others (session state,
    streams) go through API frames, where the daemon scopes them."""
    with pytest.raises(DaemonError, match="bad run field 'op'"):
        check_body(body(op=op), CONFIG)
    assert check_body(body(op="map", map_items=[["{}", False]], cpu_watch=1.0), CONFIG)


# -- outcome_of ------------------------------------------------------------------------------
@pytest.mark.parametrize(("reply", "error", "expected"), [
    ({"kind": "R"}, None, ("ok", "")),
    ({"kind": "T"}, None, ("timeout", "cpu")),
    ({"kind": "W"}, None, ("timeout", "wall")),
    ({"kind": "M"}, None, ("memory", "")),
    ({"kind": "X"}, None, ("memory", "")),
    ({"kind": "E"}, None, ("error", "")),
    ({"kind": "C"}, None, ("error", "")),
    ({"kind": "S"}, None, ("error", "")),
    ({}, None, ("error", "")),
    (None, None, ("error", "")),
    (None, TimeoutError("t", kind="cpu"), ("timeout", "cpu")),
    (None, TimeoutError("t", kind="wall"), ("timeout", "wall")),
    (None, MemoryLimitError("m"), ("memory", "")),
    (None, WorkerCrashedError("c", pid=1, signal=9), ("crashed", "")),
    (None, DaemonError("full"), ("rejected", "")),
    (None, ScriptError("boom"), ("error", "")),
    (None, CompileError("x"), ("error", "")),
    (None, RuntimeError("inside"), ("error", "")),
])
def test_outcome_of(reply: dict[str, Any] | None, error: BaseException | None,
                    expected: tuple[str, str]) -> None:
    """Each reply kind and error type maps to its metrics outcome (and timeout kind)."""
    assert outcome_of(reply, error) == expected


# -- parse_listen and DaemonConfig -----------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:9000", ("::1", 9000)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),  # noqa: S104 - only parsed
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT (brackets around IPv6) parses to (host, port)."""
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8080", ":8080", "host:", "host:http", "host:-1", "", "::"])
def test_parse_listen_rejects_garbage(text: str) -> None:
    """Anything but HOST:PORT is a ValueError quoting it."""
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(text)


def test_parse_listen_rejects_ports_out_of_range() -> None:
    """A port above 65535 is a ValueError, like any other bad --listen value."""
    with pytest.raises(ValueError, match=r"HOST:PORT|port"):
        parse_listen("127.0.0.1:99999")


def test_daemon_config_tcp_needs_a_token() -> None:
    """TCP without a token is refused at configuration time; with one it is fine."""
    with pytest.raises(ValueError, match="needs a token"):
        DaemonConfig(listen="127.0.0.1:7000")
    with pytest.raises(ValueError, match="needs a token"):
        DaemonConfig(listen="127.0.0.1:7000", token="")
    assert DaemonConfig(listen="127.0.0.1:7000", token="t").token == "t"
    assert DaemonConfig(socket="/tmp/x.sock").token is None  # a Unix socket may go without


@pytest.mark.parametrize("fields", [
    {"listen": "nonsense", "token": "t"}, {"workers": 0}, {"workers": 2, "min_workers": 3},
    {"min_workers": -1}, {"max_queue": 0}, {"max_client_queue": 0}, {"max_client_runs": 0},
    {"confinement": "none"},
])
def test_daemon_config_rejects_bad_values(fields: dict[str, Any]) -> None:
    """Impossible settings are a ValueError at construction."""
    with pytest.raises(ValueError):
        DaemonConfig(**fields)


# -- Dispatcher ------------------------------------------------------------------------------
def test_dispatcher_serves_a_second_client_within_a_couple_of_slots() -> None:
    """One slot; a client with 20 queued requests and another with 1: the other's request is
    served among the next two slots, not after the 20."""

    async def main() -> list[str]:
        dispatch = Dispatcher(1, FairQueue(100, 100))
        order: list[str] = []
        deadline = time.monotonic() + 10
        await dispatch.acquire("batch", 0, deadline)  # the batch holds the only slot

        async def one(client: str) -> None:
            await dispatch.acquire(client, 0, deadline)
            order.append(client)
            await asyncio.sleep(0)
            dispatch.release()

        tasks = [asyncio.create_task(one("batch")) for _ in range(20)]
        await asyncio.sleep(0)  # the 20 are queued first
        tasks.append(asyncio.create_task(one("interactive")))
        await asyncio.sleep(0)
        assert len(dispatch.queue) == 21
        dispatch.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert dispatch.free == 1 and len(dispatch.queue) == 0
        return order

    order = asyncio.run(main())
    assert len(order) == 21
    assert order.index("interactive") <= 1


def test_dispatcher_priority_jumps_the_queue() -> None:
    """A waiting request of higher priority gets the next slot before earlier ones."""

    async def main() -> list[str]:
        dispatch = Dispatcher(1, FairQueue(100, 100))
        order: list[str] = []
        deadline = time.monotonic() + 10
        await dispatch.acquire("a", 0, deadline)

        async def one(name: str, client: str, priority: int) -> None:
            await dispatch.acquire(client, priority, deadline)
            order.append(name)
            dispatch.release()

        tasks = [asyncio.create_task(one(f"a{i}", "a", 0)) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(one("urgent", "b", 10)))
        await asyncio.sleep(0)
        dispatch.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    assert asyncio.run(main())[0] == "urgent"


def test_dispatcher_queue_full_and_deadline() -> None:
    """A full queue is a DaemonError at once; a waiter past its deadline gets TimeoutError
    (kind wall) and leaves the queue; the slot count stays right."""

    async def main() -> None:
        dispatch = Dispatcher(1, FairQueue(1, 1))
        await dispatch.acquire("a", 0, time.monotonic() + 10)
        waiter = asyncio.create_task(dispatch.acquire("b", 0, time.monotonic() + 0.2))
        await asyncio.sleep(0)
        with pytest.raises(DaemonError, match="queue is full"):
            await dispatch.acquire("c", 0, time.monotonic() + 10)
        with pytest.raises(TimeoutError) as info:
            await asyncio.wait_for(waiter, 5)
        assert info.value.kind == "wall"
        assert len(dispatch.queue) == 0
        dispatch.release()
        assert dispatch.free == 1

    asyncio.run(main())


def test_dispatcher_cancelled_waiter_passes_the_slot_on() -> None:
    """A waiter cancelled just as the slot reaches it hands the slot to the next waiter (or
    frees it): no slot is lost."""

    async def main() -> None:
        dispatch = Dispatcher(1, FairQueue(10, 10))
        deadline = time.monotonic() + 10
        await dispatch.acquire("a", 0, deadline)
        first = asyncio.create_task(dispatch.acquire("b", 0, deadline))
        second = asyncio.create_task(dispatch.acquire("c", 0, deadline))
        await asyncio.sleep(0)
        dispatch.release()  # the slot goes to "b"'s future ...
        first.cancel()  # ... which gives up before it runs
        try:
            await first
        except asyncio.CancelledError:
            pass
        else:  # (the grant won the race: the slot is ours to pass on)
            dispatch.release()
        await asyncio.wait_for(second, 5)  # "c" got the slot "b" dropped
        dispatch.release()
        assert dispatch.free == 1 and len(dispatch.queue) == 0

        waiting = asyncio.create_task(dispatch.acquire("d", 0, deadline))
        await dispatch.acquire("e", 0, deadline)  # takes the free slot at once
        await asyncio.sleep(0)
        waiting.cancel()  # cancelled while still queued: simply removed
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(dispatch.queue) == 0
        dispatch.release()
        assert dispatch.free == 1

    asyncio.run(main())


def test_dispatcher_cancel_racing_the_grant_is_not_lost() -> None:
    """A request cancelled just as the slot reaches it ends cancelled (the slot moves on)."""

    async def main() -> None:
        dispatch = Dispatcher(1, FairQueue(10, 10))
        deadline = time.monotonic() + 10
        await dispatch.acquire("a", 0, deadline)
        waiter = asyncio.create_task(dispatch.acquire("b", 0, deadline))
        await asyncio.sleep(0)
        dispatch.release()
        waiter.cancel()
        cancelled = False
        try:
            await waiter
        except asyncio.CancelledError:
            cancelled = True
        else:
            dispatch.release()
        assert cancelled, "the cancellation was swallowed: the request went on running"
        assert dispatch.free == 1

    asyncio.run(main())
