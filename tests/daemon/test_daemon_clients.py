"""Many clients at once: threads multiplexing one connection, separate client processes,
AsyncIsoBox with asyncio.gather; a client process killed mid-run has its work cancelled."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import psutil
import pytest
from daemon_helpers import Background, Daemon, StartDaemon, gone, wait_until

from isobox import AsyncIsoBox, DaemonError, IsoBox, remote

pytestmark = pytest.mark.timeout(20)

CLIENT = """
import json, sys
from isobox import IsoBox
address, tag = sys.argv[1], sys.argv[2]
with IsoBox(address=address) as box:
    out = [box.run("tag() + ':' + n * 2", sandbox={"n": i}, functions={"tag": lambda: tag})
           for i in range(10)]
print(json.dumps(out))
"""

HOG = """
import sys
from isobox import IsoBox
box = IsoBox(address=sys.argv[1])
print("connected", flush=True)
box.run("while (true) {}", timeout=60)
"""


def test_threads_share_one_connection(daemon: Daemon) -> None:
    """Four threads on one IsoBox (one connection, requests multiplexed by id) each get their
    own results and their own host-function calls, while runs overlap (a barrier two runs
    must reach together would time out if they were serialised)."""
    box = daemon.box()
    barrier = threading.Barrier(2)
    results: dict[str, list[Any]] = {}

    def client(name: str) -> None:
        got = [box.run("meet() && who() + ':' + n", sandbox={"n": i},
                       functions={"who": lambda: name, "meet": lambda: barrier.wait(10) >= 0})
               for i in range(2)]
        got += [box.run("who() + ':' + n", sandbox={"n": i}, functions={"who": lambda: name})
                for i in range(2, 8)]
        results[name] = got

    calls = [Background(partial(client, f"t{k}")) for k in range(4)]
    for call in calls:
        call.result(15)
    assert results == {f"t{k}": [f"t{k}:{i}" for i in range(8)] for k in range(4)}
    assert box._remote is not None and box._remote.daemon_pid == daemon.pid


def test_processes_and_threads_at_once(daemon: Daemon) -> None:
    """Three client processes and four threads of this one all get correct results
    concurrently."""
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, daemon.address, f"p{k}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(3)]
    box = daemon.box()
    try:
        # mypy cannot infer a lambda with a default argument from a Callable[[], ...] context
        threads = [Background(cast("Callable[[], list[Any]]",
                                   lambda k=k: [box.run("x + y", sandbox={"x": k, "y": i})
                                                for i in range(10)])) for k in range(4)]
        for k, call in enumerate(threads):
            assert call.result(15) == [k + i for i in range(10)]
        for k, proc in enumerate(procs):
            out, err = proc.communicate(timeout=15)
            assert proc.returncode == 0, err
            assert json.loads(out) == [f"p{k}:{i * 2}" for i in range(10)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_async_box_runs_concurrently(daemon: Daemon) -> None:
    """AsyncIsoBox(address=...) runs many requests at once under asyncio.gather: results come
    back in order, async host functions are awaited, and two runs overlap (a barrier)."""
    barrier = threading.Barrier(2)

    async def main() -> tuple[list[Any], list[Any]]:
        async with AsyncIsoBox(address=daemon.address) as box:
            plain = await asyncio.gather(*(box.run("n * n", sandbox={"n": i})
                                           for i in range(12)))

            async def double(x: int) -> int:
                await asyncio.sleep(0)
                return x * 2

            meet = await asyncio.gather(*(
                box.run("meet() ? double(n) : -1", sandbox={"n": i},
                        functions={"double": double, "meet": lambda: barrier.wait(10) >= 0})
                for i in range(2)))
            stats = await box.pool_stats()
            assert stats.workers
            return plain, meet

    plain, meet = asyncio.run(asyncio.wait_for(main(), 15))
    assert plain == [i * i for i in range(12)]
    assert meet == [0, 2]


def test_cancelling_an_async_remote_run_cancels_it_in_the_daemon(start_daemon: StartDaemon
                                                                ) -> None:
    """Cancelling the task awaiting a remote run (here by wait_for) stops the run in the
    daemon too: its worker is killed and the daemon has no busy worker left."""
    daemon = start_daemon("--workers", "1")

    async def main() -> list[int]:
        box = AsyncIsoBox(address=daemon.address)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(box.run("while (true) {}", timeout=30), 1.0)
            await asyncio.to_thread(wait_until, lambda: not daemon.busy_workers(), 3.0)
            return daemon.busy_workers()
        finally:
            await box.shutdown()  # closing the connection makes the daemon cancel it

    assert asyncio.run(main()) == []


def test_cancelling_an_async_remote_session_run_cancels_it_in_the_daemon(
        start_daemon: StartDaemon) -> None:
    """The same for a run in a remote session: the daemon stops it (its worker is freed long
    before the run's 30 s), and the session is usable again (restored from its checkpoint)."""
    daemon = start_daemon("--workers", "1")

    async def main() -> tuple[list[int], Any]:
        box = AsyncIsoBox(address=daemon.address)
        try:
            session = await box.create_session("cancelled")
            await session.run("globalThis.kept = 41")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(session.run("while (true) {}", timeout=30), 1.0)
            await asyncio.to_thread(wait_until, lambda: not daemon.busy_workers(), 3.0)
            busy = daemon.busy_workers()
            return busy, await asyncio.wait_for(session.run("kept + 1"), 10)
        finally:
            await box.shutdown()

    busy, value = asyncio.run(main())
    assert busy == []
    assert value == 42


@pytest.mark.parametrize("in_session", [False, True], ids=["plain", "session"])
def test_cancelling_an_async_remote_stream_cancels_it_in_the_daemon(
        start_daemon: StartDaemon, in_session: bool) -> None:
    """A task consuming a remote stream is cancelled while the stream computes its next value:
    the daemon stops the stream and frees the worker, without waiting for the timeout. (A
    stream's values travel in batches, so the spin comes before the first value.)"""
    daemon = start_daemon("--workers", "1")

    async def main() -> tuple[list[int], list[Any]]:
        box = AsyncIsoBox(address=daemon.address, timeout=30)
        try:
            source: Any = box
            if in_session:
                source = await box.create_session("streaming")
            stream = source.run_stream("while (true) {}")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stream.__anext__(), 1.0)
            await asyncio.to_thread(wait_until, lambda: not daemon.busy_workers(), 3.0)
            busy = daemon.busy_workers()
            after = [v async for v in source.run_stream("yield 1; yield 2")]
            return busy, after
        finally:
            await box.shutdown()

    busy, after = asyncio.run(main())
    assert busy == []
    assert after == [1, 2]


def test_abandoning_a_request_before_it_is_sent_still_cancels_it(
        start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of a cancelled async caller: abandon() lands after the request got its id but
    before it went out, so a CANCEL sent then would reach the daemon before the RUN. The
    request's own thread must still cancel it once it is out: the caller gets DaemonError and
    the daemon frees the worker at once, not after the run's 30 s."""
    daemon = start_daemon("--workers", "1")
    box = IsoBox(address=daemon.address)
    client = box._remote
    assert client is not None
    real = remote._issued

    def issued_then_abandoned(rid: int) -> None:
        real(rid)
        client.abandon(rid)  # what the event loop does if the task is cancelled right now

    monkeypatch.setattr(remote, "_issued", issued_then_abandoned)
    try:
        started = time.monotonic()
        with pytest.raises(DaemonError, match="cancelled"):
            box.run("while (true) {}", timeout=30)
        assert time.monotonic() - started < 5
        assert wait_until(lambda: not daemon.busy_workers(), 3.0)
        monkeypatch.setattr(remote, "_issued", real)
        assert box.run("6 * 7") == 42
    finally:
        box.shutdown()


def test_killed_client_process_has_its_run_cancelled(start_daemon: StartDaemon) -> None:
    """SIGKILL of a client in the middle of `while(true){}` (timeout 60): the daemon sees the
    connection drop, kills the worker running it and starts another; a new run succeeds
    within its own short timeout and the daemon stays up."""
    daemon = start_daemon("--workers", "1", "--min-workers", "1")
    restarts = daemon.stats()["restarts"]
    proc = subprocess.Popen([sys.executable, "-c", HOG, daemon.address], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        assert wait_until(daemon.busy_workers, 10), "the hog's run never reached a worker"
        (hog_worker,) = daemon.busy_workers()
        worker = psutil.Process(hog_worker)
        daemon.track()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_until(lambda: gone(worker), 5), "the hog's worker is still running"
    assert wait_until(lambda: daemon.stats()["restarts"] > restarts, 5)
    daemon.settled()
    with IsoBox(address=daemon.address, timeout=5) as box:
        assert box.run("1 + 1") == 2
        assert box.pool_stats().workers[0].pid != hog_worker
    assert daemon.alive()
    assert wait_until(lambda: daemon.stats()["clients"] == 1, 5)  # only the asking one


def test_connecting_while_workers_come_and_go(start_daemon: StartDaemon) -> None:
    """New connections succeed while the daemon's workers are being recycled (here after
    every run, --max-runs 1, so worker events flow all the time)."""
    daemon = start_daemon("--max-runs", "1")
    box = daemon.box()
    stop = threading.Event()

    def hammer() -> int:
        runs = 0
        while not stop.is_set():
            box.run("1")
            runs += 1
        return runs

    churn = Background(hammer)
    failures: list[DaemonError] = []
    connections = 0
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end and not failures:
            try:
                IsoBox(address=daemon.address).shutdown()
                connections += 1
            except DaemonError as exc:
                failures.append(exc)
    finally:
        stop.set()
    assert churn.result(10) > 0
    assert not failures, f"{failures[0]} (after {connections} good connections)"
