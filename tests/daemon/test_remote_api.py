"""Streams and sessions through the daemon, with real daemon, worker and client processes:
the same behaviour as embedded mode, plus what only remote mode has (scopes, reconnecting,
host functions called back in whichever client runs the session)."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from daemon_helpers import Daemon, wait_until

import isobox
from isobox import AsyncIsoBox, IsoBox

pytestmark = pytest.mark.timeout(60)


# -- streams ---------------------------------------------------------------------------------
def test_stream_values_and_box_defaults(shared_daemon: Daemon) -> None:
    """run_stream yields the generator's values in order; the box's sandbox reaches it."""
    box = shared_daemon.box(sandbox={"base": 10})
    assert list(box.run_stream("for (let i = 0; i < 5; i++) yield i * base")) == [0, 10, 20, 30,
                                                                                  40]


def test_long_stream_with_small_window(shared_daemon: Daemon) -> None:
    """20,000 values with a window of 16 all arrive, in order (credit flows end to end)."""
    box = shared_daemon.box()
    got = list(box.run_stream("for (let i = 0; i < 20000; i++) yield i", window=16))
    assert got == list(range(20000))


def test_leaving_an_infinite_stream_early_frees_the_worker(shared_daemon: Daemon) -> None:
    """Breaking out of an infinite stream cancels it in the daemon: the workers go idle and
    the next run works."""
    box = shared_daemon.box()
    gen = box.run_stream("let i = 0; while (true) yield i++", window=8)
    assert [next(gen) for _ in range(5)] == [0, 1, 2, 3, 4]
    gen.close()
    assert wait_until(lambda: not shared_daemon.busy_workers(), 10)
    assert box.run("6 * 7") == 42


def test_stream_errors_are_typed(shared_daemon: Daemon) -> None:
    """A stream that throws after some values raises ScriptError after them; a stream that
    spins is a TimeoutError."""
    box = shared_daemon.box(timeout=2)
    got: list[Any] = []
    with pytest.raises(isobox.ScriptError, match="boom"):
        for value in box.run_stream("yield 1; yield 2; throw new Error('boom')"):
            got.append(value)
    assert got == [1, 2]
    with pytest.raises(isobox.TimeoutError):
        list(box.run_stream("yield 1; while (true) {}", cpu_timeout=0.3))


def test_stream_console_and_host_functions(shared_daemon: Daemon) -> None:
    """Console lines reach on_output and host functions are called in this process."""
    lines: list[tuple[str, str]] = []
    box = shared_daemon.box(on_output=lambda kind, msg: lines.append((kind, msg)))
    seen_pid: list[int] = []

    def where(x: int) -> int:
        seen_pid.append(os.getpid())
        return x + 1

    got = list(box.run_stream("console.log('start'); for (let i = 0; i < 3; i++) yield where(i)",
                              functions={"where": where}))
    assert got == [1, 2, 3]
    assert ("log", "start") in lines
    assert seen_pid == [os.getpid()] * 3


# -- sessions --------------------------------------------------------------------------------
def test_session_keeps_state_and_values_cross(shared_daemon: Daemon) -> None:
    """A remote session keeps its globals between runs; state, info and special values cross
    as in embedded mode; close ends it."""
    box = shared_daemon.box()
    session = box.create_session("keep", functions={"twice": lambda x: 2 * x})
    assert session.run("var n = twice(21); n") == 42
    assert session.run("n + 1") == 43
    assert session.get_state()["n"] == 42
    when = datetime.datetime(2020, 1, 2, tzinfo=datetime.UTC)
    session.set_state({"when": when, "big": 2**70})
    assert session.run("[when.getUTCFullYear(), big * 2n]") == [2020, 2**71]
    info = session.info()
    assert info.id == "keep" and info.execution_count >= 3 and info.worker_pid
    assert list(session.run_stream("for (let i = 0; i < 3; i++) yield n + i")) == [42, 43, 44]
    session.close()
    with pytest.raises(isobox.SessionError):
        session.run("n")


def test_session_errors_keep_the_session(shared_daemon: Daemon) -> None:
    """A throw and a CPU timeout in a session are typed errors; the session goes on."""
    box = shared_daemon.box()
    with box.create_session("errors") as session:
        session.run("var k = 7")
        with pytest.raises(isobox.ScriptError):
            session.run("null.x")
        with pytest.raises(isobox.TimeoutError):
            session.run("while (true) {}", timeout=1, cpu_timeout=0.3)
        assert session.run("k") == 7


def test_sessions_are_scoped_per_client(shared_daemon: Daemon) -> None:
    """Another client cannot see a session (not by id alone); one given the same
    session_scope can; ids may repeat across scopes without clashing."""
    owner = shared_daemon.box(session_scope="scope-a")
    owner.create_session("mine").run("var secret = 'a'")
    stranger = shared_daemon.box()
    with pytest.raises(isobox.SessionError):
        stranger.get_session("mine")
    stranger.create_session("mine").run("var secret = 'b'")
    friend = shared_daemon.box(session_scope="scope-a")
    assert friend.get_session("mine").run("secret") == "a"
    assert stranger.get_session("mine").run("secret") == "b"
    owner.get_session("mine").close()
    stranger.get_session("mine").close()


def test_session_survives_the_client_process(shared_daemon: Daemon) -> None:
    """A session created by a client process that then dies (SIGKILL) is still there for a
    new client with the same scope: sessions live in the daemon."""
    code = (
        "import isobox, os, signal, sys\n"
        f"box = isobox.IsoBox(address={shared_daemon.address!r}, session_scope='survivor')\n"
        "s = box.create_session('long')\n"
        "s.run('var counter = 41')\n"
        "print('ready', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)
    assert "ready" in proc.stdout and proc.returncode == -signal.SIGKILL
    box = shared_daemon.box(session_scope="survivor")
    session = box.get_session("long")
    assert session.run("++counter") == 42
    session.close()


def test_per_client_session_limit(start_daemon: Any) -> None:
    """--max-client-sessions caps one client's open sessions with a SessionError; closing
    one makes room."""
    daemon = start_daemon("--max-client-sessions", "2")
    box = daemon.box()
    first = box.create_session("one")
    box.create_session("two")
    with pytest.raises(isobox.SessionError, match="2 open sessions"):
        box.create_session("three")
    assert daemon.box().create_session("other-client").run("1") == 1
    first.close()
    assert box.create_session("three").run("3") == 3


def test_session_worker_killed_restores_from_checkpoint(shared_daemon: Daemon) -> None:
    """kill -9 of the worker holding a session: the next call fails or succeeds typed, and
    the session then goes on from its last checkpoint (as in embedded mode)."""
    box = shared_daemon.box()
    session = box.create_session("restore")
    session.run("var saved = 5")
    pid = session.info().worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: pid not in [w["pid"] for w in shared_daemon.stats()["workers"]],
                      10)
    assert session.run("saved") == 5
    session.close()


# -- events, async ----------------------------------------------------------------------------
def test_worker_events_reach_remote_clients(shared_daemon: Daemon) -> None:
    """worker:crashed and worker:started of the daemon's pool reach a connected client."""
    box = shared_daemon.box()
    seen: list[str] = []
    box.on("worker:crashed", lambda p: seen.append("crashed"))
    box.on("worker:started", lambda p: seen.append("started"))
    pid = box.execute("1").worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: "crashed" in seen and "started" in seen, 10)


def test_async_streams_and_sessions(shared_daemon: Daemon) -> None:
    """AsyncIsoBox remote: gather of runs, an async stream, an async session."""
    async def main() -> tuple[list[Any], list[Any], Any]:
        box = AsyncIsoBox(address=shared_daemon.address)
        try:
            runs = await asyncio.gather(*(box.run(f"{i} * 2") for i in range(6)))
            streamed = [v async for v in box.run_stream("for (let i = 0; i < 4; i++) yield i")]
            session = await box.create_session("async")
            await session.run("var z = 5")
            z = await session.run("z")
            await session.close()
            return runs, streamed, z
        finally:
            await box.shutdown()

    runs, streamed, z = asyncio.run(main())
    assert runs == [0, 2, 4, 6, 8, 10] and streamed == [0, 1, 2, 3] and z == 5


def test_box_level_defaults_reach_sessions(shared_daemon: Daemon) -> None:
    """A box's sandbox and timeout apply to its remote sessions unless a call overrides them."""
    box = shared_daemon.box(sandbox={"greeting": "hi"}, timeout=1)
    with box.create_session("defaults") as session:
        assert session.run("greeting") == "hi"
        start = time.monotonic()
        with pytest.raises(isobox.TimeoutError):
            session.run("while (true) {}")
        assert time.monotonic() - start < 20


# -- scheduling ---------------------------------------------------------------------------------
_SLOW = "let t = Date.now(); while (Date.now() - t < 150) {}; tag"


def _finish_order(daemon: Daemon, late: dict[str, Any]) -> list[str]:
    """Client A queues 6 slow runs on a 1-worker daemon; then ``late`` (box options and run
    options of one more run, on its own connection unless told) is sent. Returns the tags in
    the order the runs finished."""
    order: list[str] = []
    lock = threading.Lock()
    first = daemon.box(timeout=30)

    def run(box: IsoBox, tag: str, **options: Any) -> None:
        box.run(_SLOW, sandbox={"tag": tag}, **options)
        with lock:
            order.append(tag)

    threads = [threading.Thread(target=run, args=(first, f"a{i}")) for i in range(6)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: daemon.stats()["queued"] >= 4, 10)
    other = first if late.get("same_client") else daemon.box(timeout=30)
    late_thread = threading.Thread(target=run, args=(other, "late"),
                                   kwargs=late.get("run", {}))
    late_thread.start()
    for thread in [*threads, late_thread]:
        thread.join(30)
    return order


def test_fair_share_between_clients(start_daemon: Any) -> None:
    """A second client's single run is served right after the runs already started, not
    after the first client's whole backlog."""
    daemon = start_daemon("--workers", "1", "--min-workers", "1", defaults=False)
    order = _finish_order(daemon, {})
    assert len(order) == 7
    assert order.index("late") <= 2, order


def test_priority_within_one_client(start_daemon: Any) -> None:
    """In one client's backlog, a run with a higher priority goes before the waiting ones."""
    daemon = start_daemon("--workers", "1", "--min-workers", "1", defaults=False)
    order = _finish_order(daemon, {"same_client": True, "run": {"priority": 5}})
    assert len(order) == 7
    assert order.index("late") <= 2, order


# -- a client killed mid-stream, the soak ---------------------------------------------------------
def test_client_killed_mid_stream_frees_the_worker(start_daemon: Any) -> None:
    """A client process killed (SIGKILL) while it consumes an infinite stream: the daemon
    cancels the stream, the worker is freed (or replaced), and other clients are served."""
    daemon = start_daemon("--workers", "1", "--min-workers", "1", defaults=False)
    code = (
        "import isobox\n"
        f"box = isobox.IsoBox(address={daemon.address!r}, timeout=120)\n"
        "for i, v in enumerate(box.run_stream('let i = 0; while (true) yield i++', window=4)):\n"
        "    if i == 3:\n"
        "        print('streaming', flush=True)\n"
        "    if i > 3:\n"
        "        import time; time.sleep(0.01)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "streaming"
        assert daemon.busy_workers()
        proc.kill()
        proc.wait(10)
        assert wait_until(lambda: not daemon.busy_workers() and daemon.stats()["clients"] <= 1,
                          10)
        assert daemon.box(timeout=10).run("'served'") == "served"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_soak_daemon_rss_stays_flat(start_daemon: Any) -> None:
    """20,000 runs from 4 threads: every one succeeds and the daemon's own RSS grows by less
    than 16 MiB (the benchmark's 100,000-run figure is in the README)."""
    daemon = start_daemon("--workers", "2", "--min-workers", "2", defaults=False)
    box = daemon.box(timeout=30)
    for _ in range(200):
        box.run("1 + 2")
    proc = psutil.Process(daemon.pid)
    before = proc.memory_info().rss
    failures: list[BaseException] = []

    def work() -> None:
        for i in range(5000):
            try:
                assert box.run(f"{i} + 1") == i + 1
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(170)
    after = proc.memory_info().rss
    print(f"daemon RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB over 20,000 runs")
    assert not failures, failures[:3]
    assert after - before < 16 * 2**20


# -- batch jobs through the daemon -----------------------------------------------------------------
def test_map_through_the_daemon(shared_daemon: Daemon) -> None:
    """box.map on a remote box: values in order, a failing item typed, chunking included."""
    box = shared_daemon.box(timeout=5)
    items = list(box.map("if (input === 3) throw new RangeError('three'); input * 2",
                         range(300), chunk_size=16))
    assert [i.index for i in items] == list(range(300))
    assert items[3].ok is False and isinstance(items[3].error, isobox.ScriptError)
    assert all(i.value == 2 * i.index for i in items if i.index != 3)


def test_batch_cli_through_the_daemon(shared_daemon: Daemon, tmp_path: Any) -> None:
    """isobox batch --address runs on the daemon's workers: every line once, exit 8 for the
    one failing item."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"x": {i}}}\n' for i in range(1000)))
    script = tmp_path / "t.js"
    script.write_text("if (input.x === 5) throw new Error('five'); input.x + 1")
    out = tmp_path / "out.jsonl"
    isobox_cli = str(Path(sys.executable).with_name("isobox"))
    proc = subprocess.run([isobox_cli, "batch", str(script), "--input",
                           str(source), "--output", str(out), "--address",
                           shared_daemon.address, "--quiet"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 8, proc.stderr
    import json

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(1000))
    assert [r["index"] for r in records if not r["ok"]] == [5]
