"""The public surface: names, twins, options, events, metrics, pool figures, lifecycle."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import isobox
from isobox import AsyncIsoBox, IsoBox

PUBLIC = {
    "AsyncIsoBox", "BatchItem", "ClosedError", "DaemonError", "CodeValidation", "CompileError", "ExecutionMetrics",
    "ExecutionResult", "GlobalMetrics", "IsoBox", "IsoBoxError", "MemoryLimitError",
    "PoolStats", "ScriptError", "SecurityError", "SerializationError", "SessionError",
    "TimeoutError", "WorkerCrashedError", "WorkerStats", "Session", "AsyncSession", "SessionInfo",
}


@pytest.fixture(scope="module")
def box() -> Iterator[IsoBox]:
    with IsoBox(timeout=5.0, pool={"min": 2, "max": 2}) as b:
        b.warmup_pool()
        yield b


def test_public_names_are_pinned() -> None:
    """The package exports exactly the documented names, and each resolves."""
    assert set(isobox.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(isobox, name) is not None


def test_error_tree() -> None:
    """The error classes form the documented tree; TimeoutError is also the builtin."""
    assert issubclass(isobox.CompileError, isobox.ScriptError)
    assert issubclass(isobox.SecurityError, isobox.ScriptError)
    for name in ("ScriptError", "TimeoutError", "MemoryLimitError", "SerializationError",
                 "WorkerCrashedError", "SessionError", "ClosedError", "DaemonError"):
        assert issubclass(getattr(isobox, name), isobox.IsoBoxError)
    assert issubclass(isobox.TimeoutError, TimeoutError)


@pytest.mark.parametrize(("sync_cls", "async_cls"), [
    (IsoBox, AsyncIsoBox), (isobox.Session, isobox.AsyncSession)])
def test_sync_and_async_twins_mirror_each_other(sync_cls: type, async_cls: type) -> None:
    """Every public method of a sync class exists on its async twin (awaitable, or an async
    iterator for run_stream) with the same parameters."""
    def methods(cls: type) -> dict[str, Any]:
        return {n: m for n, m in inspect.getmembers(cls) if not n.startswith("_") and callable(m)}
    sync, asyn = methods(sync_cls), methods(async_cls)
    assert set(sync) == set(asyn)
    for name, method in sync.items():
        params = list(inspect.signature(method).parameters.values())
        assert params == list(inspect.signature(asyn[name]).parameters.values()), name
        if name not in ("on", "off", "get_metrics", "get_history", "run_stream", "map"):
            assert inspect.iscoroutinefunction(asyn[name]), name


def test_import_stays_light() -> None:
    """import isobox loads neither the engine nor the supervisor."""
    code = ("import sys, isobox; bad = [m for m in ('_quickjs', 'isobox.supervisor.pool', "
            "'isobox.api', 'psutil') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"timeout": -1}, ValueError),
        ({"timeout": float("nan")}, ValueError),
        ({"timeout": "5"}, TypeError),
        ({"memory_limit": 1000}, ValueError),
        ({"stack_limit": 2**30}, ValueError),
        ({"console": "loud"}, ValueError),
        ({"env": {"A": 1}}, TypeError),
        ({"sandbox": {1: 2}}, TypeError),
        ({"pool": {"min": 3, "max": 2}}, ValueError),
        ({"pool": {"size": 2}}, ValueError),
        ({"mode": "thread"}, ValueError),
        ({"no_such_option": 1}, TypeError),
    ],
)
def test_bad_options_fail_fast(options: dict[str, Any], error: type[Exception]) -> None:
    """Bad constructor options raise at once, naming the option, and start nothing."""
    with pytest.raises(error):
        IsoBox(mode=options.pop("mode", "inprocess"), **options)


def test_bad_run_options_fail_fast(box: IsoBox) -> None:
    """Bad per-run options raise before anything is sent."""
    with pytest.raises(ValueError, match="timeout"):
        box.run("1", timeout=0)
    with pytest.raises(TypeError, match="unknown run option"):
        box.run("1", colour="red")
    with pytest.raises(TypeError, match="code must be str"):
        box.run(b"1")  # type: ignore[arg-type]
    with pytest.raises(isobox.SerializationError):
        box.run("1", sandbox={"x": object()})
    with pytest.raises(ValueError, match="language"):
        box.run("1", language="coffeescript")
    assert box.run("1") == 1


def test_remote_address_is_checked(tmp_path: Any) -> None:
    """address= is validated, a daemon that is not there is a DaemonError, a TCP address needs
    a token, and a token without an address is a TypeError (not silently ignored)."""
    with pytest.raises(isobox.DaemonError, match="cannot reach"):
        IsoBox(address=f"unix://{tmp_path}/nobody.sock")
    with pytest.raises(ValueError, match="unix:///path or tcp://host:port"):
        IsoBox(address="http://localhost:1")
    with pytest.raises(ValueError, match="token"):
        IsoBox(address="tcp://127.0.0.1:9")
    with pytest.raises(TypeError, match="token"):
        IsoBox(token="secret")
    with pytest.raises(ValueError, match="pool"):
        IsoBox(address=f"unix://{tmp_path}/x.sock", pool={"max": 2})


def test_events_and_metrics(box: IsoBox) -> None:
    """metrics:recorded fires per run; error and timeout fire on failures; metrics add up."""
    seen: dict[str, list[dict[str, Any]]] = {"metrics:recorded": [], "error": [], "timeout": []}
    handlers = {name: (lambda p, n=name: seen[n].append(p)) for name in seen}
    for name, handler in handlers.items():
        box.on(name, handler)
    before = box.get_metrics()
    try:
        box.run("1")
        with pytest.raises(isobox.ScriptError):
            box.run("throw new Error('x')")
        with pytest.raises(isobox.TimeoutError):
            box.run("for(;;){}", timeout=0.1)
    finally:
        for name, handler in handlers.items():
            box.off(name, handler)
    after = box.get_metrics()
    assert len(seen["metrics:recorded"]) == 3
    assert len(seen["error"]) == 2
    assert len(seen["timeout"]) == 1
    assert after.total_executions - before.total_executions == 3
    assert after.errors - before.errors == 2
    assert after.timeouts - before.timeouts == 1
    assert after.p50_duration <= after.p95_duration <= after.p99_duration <= after.max_duration
    history = box.get_history(3)
    assert [h.status for h in history] == ["ok", "error", "timeout"]
    assert all(h.worker_pid for h in history)


def test_handler_errors_do_not_break_runs(box: IsoBox) -> None:
    """A raising event handler is logged, and the run still returns its value."""
    def bad(_: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")
    box.on("metrics:recorded", bad)
    try:
        assert box.run("41 + 1") == 42
    finally:
        box.off("metrics:recorded", bad)


def test_unknown_event_is_rejected(box: IsoBox) -> None:
    """on() with an unknown event name raises ValueError."""
    with pytest.raises(ValueError, match="unknown event"):
        box.on("no:such", print)


def test_pool_stats_report_psutil_figures(box: IsoBox) -> None:
    """pool_stats lists each worker with pid, state, rss, uss and run counts."""
    box.warmup_pool()
    stats = box.pool_stats()
    assert len(stats.workers) == 2
    for worker in stats.workers:
        assert worker.state in ("idle", "busy", "starting")
        assert worker.rss > worker.uss > 0
        assert worker.started_at <= time.time()
    assert stats.queued == 0


def test_output_is_delivered_while_the_run_goes_on(box: IsoBox) -> None:
    """on_output sees lines printed before an await long before the run ends."""
    times: list[float] = []
    code = ("console.log('early'); let n = 0; for (let i = 0; i < 200000; i++) { await 0; n++ } "
            "console.log('late'); n")
    started = time.monotonic()
    result = box.execute(code, on_output=lambda k, m: times.append(time.monotonic() - started))
    total = time.monotonic() - started
    assert result.value == 200000
    assert result.console == [("log", "early"), ("log", "late")]
    assert len(times) == 2
    assert times[0] < total * 0.5


def test_closed_box_raises_closed_error() -> None:
    """After shutdown every run raises ClosedError; shutdown twice is fine."""
    b = IsoBox(pool={"min": 1, "max": 1})
    assert b.run("1") == 1
    b.shutdown()
    b.shutdown()
    with pytest.raises(isobox.ClosedError):
        b.run("1")


def test_async_twin_runs_concurrently() -> None:
    """AsyncIsoBox runs many awaits at once and returns the same values as IsoBox."""
    async def main() -> list[Any]:
        async with AsyncIsoBox(pool={"min": 2, "max": 2}) as ab:
            await ab.warmup_pool()
            results = await asyncio.gather(*(ab.run("n * 2", sandbox={"n": i}) for i in range(20)))
            with pytest.raises(isobox.ScriptError):
                await ab.run("throw new Error('x')")
            valid = await ab.validate_code("let x = ;")
            assert not valid.valid
            stats = await ab.pool_stats()
            assert len(stats.workers) == 2
            return results
    assert asyncio.run(main()) == [i * 2 for i in range(20)]


def test_async_inprocess_mode() -> None:
    """AsyncIsoBox(mode='inprocess') gives the same results."""
    async def main() -> Any:
        async with AsyncIsoBox(mode="inprocess") as ab:
            return await ab.run("[1, 2].map(x => x + 1)")
    assert asyncio.run(main()) == [2, 3]


def test_queue_limit_gives_a_clear_error() -> None:
    """With every worker busy and the queue full, a run fails fast with IsoBoxError."""
    import threading
    with IsoBox(pool={"min": 1, "max": 1, "max_queue": 1}, timeout=5) as b:
        b.warmup_pool()
        t1 = threading.Thread(target=lambda: b.run("let t = Date.now(); while (Date.now() - t < 700) {}"))
        t2 = threading.Thread(target=lambda: b.run("1"))
        t1.start()
        time.sleep(0.2)
        t2.start()
        time.sleep(0.2)
        with pytest.raises(isobox.IsoBoxError, match="queue full"):
            b.run("1")
        t1.join()
        t2.join()


def test_max_runs_recycles_workers() -> None:
    """A worker retires after max_runs (with jitter) and a fresh one takes its place."""
    recycled: list[dict[str, Any]] = []
    with IsoBox(pool={"min": 1, "max": 1, "max_runs": 5}) as b:
        b.on("worker:recycled", recycled.append)
        pids = {b.execute("1").worker_pid for _ in range(20)}
    assert len(pids) >= 2
    assert recycled
    assert recycled[0]["reason"] == "max_runs reached"


def test_idle_timeout_reaps_workers_above_min() -> None:
    """Workers idle past idle_timeout are retired down to min, with a worker:recycled event."""
    import threading
    recycled: list[dict[str, Any]] = []
    started: list[dict[str, Any]] = []
    with IsoBox(pool={"min": 1, "max": 2, "idle_timeout": 0.3}) as b:
        b.on("worker:recycled", recycled.append)
        b.on("worker:started", started.append)
        b.warmup_pool()
        slow = "let t = Date.now(); while (Date.now() - t < 300) {} 1"
        threads = [threading.Thread(target=b.run, args=(slow,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert started, "a second worker should have been started for the second run"
        deadline = time.monotonic() + 10
        while not any(r["reason"] == "idle timeout" for r in recycled):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert len(b.pool_stats().workers) == 1
        assert b.run("1") == 1
