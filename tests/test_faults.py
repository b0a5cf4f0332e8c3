"""End-to-end fault matrix: real worker processes, real signals, real hangs and memory bombs.

Every test pins one behaviour (its docstring) and ends by checking the box still serves. Kill
tests use their own box; nothing here asserts tight timings, only generous bounds, because the
machine may be shared. Worker pids come from ``pool_stats()``; the fork server pid from the
pool's fork-server client.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import psutil
import pytest
from helpers import alive, serving_pids, wait_until

import isobox
from isobox import (
    AsyncIsoBox,
    ClosedError,
    IsoBox,
    IsoBoxError,
    MemoryLimitError,
    ScriptError,
    SerializationError,
    WorkerCrashedError,
)
from isobox import TimeoutError as BoxTimeoutError
from isobox.protocol import MsgType, encode_frame

if TYPE_CHECKING:
    from isobox.supervisor.pool import Pool

POOL = {"min": 2, "max": 2}
MIB = 2**20
EVENTS = ("worker:crashed", "worker:recycled", "worker:started", "timeout", "error")


# -- helpers ---------------------------------------------------------------------------------
def pool_full_without(box: IsoBox, gone: int, size: int = 2) -> bool:
    """The pool is back to ``size`` serving workers and ``gone`` is not one of them."""
    pids = serving_pids(box)
    return len(pids) == size and gone not in pids


def assert_serves(box: IsoBox) -> None:
    """The box still runs code correctly."""
    assert box.run("1+2") == 3


class Recorder:
    """Thread-safe log of box events (handlers run on the pool's threads)."""

    def __init__(self, box: IsoBox | AsyncIsoBox) -> None:
        self._lock = threading.Lock()
        self.items: list[tuple[str, dict[str, Any]]] = []
        for name in EVENTS:
            box.on(name, self._handler(name))

    def _handler(self, name: str) -> Callable[[dict[str, Any]], None]:
        def handler(payload: dict[str, Any]) -> None:
            with self._lock:
                self.items.append((name, payload))

        return handler

    def find(self, name: str, **match: Any) -> dict[str, Any] | None:
        """The first ``name`` event whose payload has every ``match`` item."""
        with self._lock:
            for kind, payload in self.items:
                if kind == name and all(payload.get(k) == v for k, v in match.items()):
                    return payload
        return None

    def wait(self, name: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """Wait for a matching event; fail the test if it does not come."""
        assert wait_until(lambda: self.find(name, **match) is not None, timeout), (
            f"no {name} event matching {match}; saw {self.items}")
        found = self.find(name, **match)
        assert found is not None
        return found


class BusyRun:
    """``box.run(code)`` on a background thread, plus the pid of the worker running it."""

    def __init__(self, box: IsoBox, code: str, **options: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        before = {w.pid for w in box.pool_stats().workers if w.state == "busy"}
        self.thread = threading.Thread(target=self._run, args=(box, code, options), daemon=True)
        self.thread.start()

        def busy() -> list[int]:
            return [w.pid for w in box.pool_stats().workers
                    if w.state == "busy" and w.pid not in before]

        assert wait_until(lambda: bool(busy())), "no worker became busy"
        self.pid = busy()[0]
        # "busy" is set when the worker is handed out, a moment before the request is sent:
        # wait until it has burnt some CPU on the run, so a kill lands mid-run.
        proc = psutil.Process(self.pid)
        spent = sum(proc.cpu_times()[:2])
        assert wait_until(lambda: sum(proc.cpu_times()[:2]) > spent + 0.05), (
            "the busy worker never started running")

    def _run(self, box: IsoBox, code: str, options: dict[str, Any]) -> None:
        try:
            self.value = box.run(code, **options)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 5.0) -> BaseException | None:
        """Wait for the run to end (failing the test if it hangs); returns its error."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not end within {timeout}s"
        return self.error


def timed_error(fn: Callable[[], Any], limit: float) -> tuple[BaseException, float]:
    """Call ``fn``, which must raise within ``limit`` seconds; returns the error and the time."""
    started = time.monotonic()
    with pytest.raises(IsoBoxError) as info:
        fn()
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"took {elapsed:.1f}s, more than {limit}s"
    return info.value, elapsed


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def make_box() -> Iterator[Callable[..., IsoBox]]:
    """A factory of warmed-up process boxes (pool 2/2), all shut down after the test."""
    boxes: list[IsoBox] = []

    def make(**options: Any) -> IsoBox:
        options.setdefault("timeout", 5.0)
        options.setdefault("memory_limit", 32 * MIB)
        box = IsoBox(pool=POOL, **options)
        boxes.append(box)
        assert box.warmup_pool() == 2
        return box

    yield make
    for box in boxes:
        box.shutdown()


@pytest.fixture
def box(make_box: Callable[..., IsoBox]) -> IsoBox:
    """A fresh box of its own for one test."""
    return make_box()


# -- 1. workers killed by signals -----------------------------------------------------------
KILL_SIGNALS = [pytest.param(signal.SIGKILL, id="SIGKILL"),
                pytest.param(signal.SIGSEGV, id="SIGSEGV")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", KILL_SIGNALS)
def test_idle_worker_killed_before_any_run(box: IsoBox, sig: int) -> None:
    """An idle worker killed before any run is classified, replaced, and the next run works."""
    events = Recorder(box)
    victim = box.pool_stats().workers[0].pid
    os.kill(victim, sig)
    assert wait_until(lambda: not alive(victim))
    result = box.execute("20+22")
    assert result.value == 42
    assert result.worker_pid != victim
    crashed = events.wait("worker:crashed", pid=victim)
    assert crashed["signal"] == sig
    assert crashed["exitcode"] is None
    assert wait_until(lambda: pool_full_without(box, victim))
    assert_serves(box)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", KILL_SIGNALS)
def test_worker_killed_during_run(box: IsoBox, sig: int) -> None:
    """A worker killed mid-run fails that run with WorkerCrashedError naming pid and signal."""
    events = Recorder(box)
    run = BusyRun(box, "while(true){}", timeout=5)
    killed_at = time.monotonic()
    os.kill(run.pid, sig)
    error = run.join(5.0)
    assert time.monotonic() - killed_at < 5.0
    assert isinstance(error, WorkerCrashedError), repr(error)
    assert error.pid == run.pid
    assert error.signal == sig
    assert error.exitcode is None
    assert error.cause
    assert events.wait("worker:crashed", pid=run.pid)["signal"] == sig
    assert wait_until(lambda: pool_full_without(box, run.pid))
    history = box.get_history()
    assert history[-1].status == "crashed"
    assert history[-1].worker_pid == run.pid
    assert_serves(box)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", KILL_SIGNALS)
def test_worker_killed_after_run(box: IsoBox, sig: int) -> None:
    """The worker that just served a run, killed afterwards, is replaced; later runs work."""
    events = Recorder(box)
    victim = box.execute("1").worker_pid
    assert victim is not None
    os.kill(victim, sig)
    assert wait_until(lambda: not alive(victim))
    pids = {box.execute(f"{i}*3").worker_pid for i in range(6)}
    assert victim not in pids
    assert events.wait("worker:crashed", pid=victim)["signal"] == sig
    assert wait_until(lambda: pool_full_without(box, victim))
    assert_serves(box)


@pytest.mark.timeout(30)
def test_fork_server_killed(box: IsoBox) -> None:
    """Killing the fork server takes its workers down; the pool starts a new one and serves."""
    old_server = cast("Pool", box._pool)._zygote.pid
    old_workers = serving_pids(box)
    assert old_server is not None
    os.kill(old_server, signal.SIGKILL)
    assert wait_until(lambda: not any(alive(p) for p in old_workers))

    def recovered() -> bool:
        try:
            return cast(bool, box.run("1+2") == 3)
        except WorkerCrashedError:  # a run may still meet a dying worker during the switch
            return False

    assert wait_until(recovered, timeout=15.0, interval=0.1)
    assert cast("Pool", box._pool)._zygote.pid != old_server
    assert wait_until(lambda: len(serving_pids(box) - old_workers) == 2, timeout=10.0)
    assert_serves(box)


# -- 2. hangs --------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_js_infinite_loop_is_a_cpu_timeout(box: IsoBox) -> None:
    """A JS infinite loop ends in TimeoutError(kind="cpu") at its CPU budget; worker retired."""
    events = Recorder(box)
    error, _ = timed_error(lambda: box.run("while(true){}", timeout=5, cpu_timeout=1), 5.0)
    assert isinstance(error, BoxTimeoutError)
    assert isinstance(error, TimeoutError)  # also the builtin
    assert error.kind == "cpu"
    assert error.limit == 1
    recycled = events.wait("worker:recycled")
    assert "T" in recycled["reason"]
    events.wait("timeout", kind="cpu")
    assert box.get_metrics().timeouts == 1
    assert_serves(box)


@pytest.mark.timeout(30)
def test_native_loop_ignoring_interrupt_is_killed_at_the_deadline(box: IsoBox) -> None:
    """A native loop that never polls the interrupt is SIGKILLed at the wall deadline: a
    TimeoutError whose kind says which budget it spent ("cpu" once the worker's CPU time
    passed the budget, "wall" if a loaded machine gave it less)."""
    events = Recorder(box)
    error, _ = timed_error(lambda: box.run("[].reverse.call({length: 2**53-1})", timeout=2), 6.0)
    assert isinstance(error, BoxTimeoutError)
    assert error.kind in ("cpu", "wall")
    recycled = events.wait("worker:recycled", reason=f"{error.kind} timeout")
    assert wait_until(lambda: not alive(recycled["pid"]))
    assert wait_until(lambda: pool_full_without(box, recycled["pid"]))
    assert_serves(box)


CONVERSION_HANGS = [
    pytest.param("({toJSON() { for (;;) {} }})", id="toJSON"),
    pytest.param("({get x() { for (;;) {} }})", id="getter"),
    pytest.param("new Proxy({}, {ownKeys() { for (;;) {} }})", id="proxy-ownKeys"),
    pytest.param("new Proxy({}, {get() { for (;;) {} }, getOwnPropertyDescriptor() { for (;;) {} },"
                 " getPrototypeOf() { for (;;) {} }})", id="proxy-get"),
    pytest.param("const e = new Error('x');"
                 " Object.defineProperty(e, 'message', {get() { for (;;) {} }}); throw e",
                 id="error-message-getter"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("code", CONVERSION_HANGS)
def test_hang_while_converting_result_is_a_timeout(box: IsoBox, code: str) -> None:
    """A loop run while converting the result/error ends in TimeoutError, never hangs."""
    error, _ = timed_error(lambda: box.run(code, timeout=3, cpu_timeout=1), 8.0)
    assert isinstance(error, BoxTimeoutError), repr(error)
    assert error.kind in ("cpu", "wall")
    assert_serves(box)


@pytest.mark.timeout(30)
def test_looping_error_to_string_does_not_hang(box: IsoBox) -> None:
    """A looping toString on an error subclass is never called for the error record: plain
    error. (Error.prototype itself is frozen: replacing its toString is a TypeError.)"""
    code = ("class E extends Error {}; E.prototype.toString = function () { for (;;) {} };"
            " throw new E('x')")
    error, _ = timed_error(lambda: box.run(code, timeout=3, cpu_timeout=1), 8.0)
    assert isinstance(error, ScriptError), repr(error)
    assert (error.name, error.message) == ("Error", "x")
    frozen, _ = timed_error(lambda: box.run(
        "Error.prototype.toString = function () { for (;;) {} }; throw new Error('x')"), 8.0)
    assert isinstance(frozen, ScriptError), repr(frozen)
    assert frozen.name == "TypeError" and "read only property 'toString'" in frozen.message
    assert_serves(box)


# -- 3. memory bombs -------------------------------------------------------------------------
MEMORY_BOMBS = [
    pytest.param("var a = []; for (;;) a.push({x: a.length})", id="array-of-objects-global"),
    pytest.param("const a = []; for (;;) a.push(a.length)", id="array-of-numbers"),
    # Regression (fixed in 0934d26): garbage freed before the heap check made this an
    # anonymous ScriptError('null') instead of MemoryLimitError, and the worker was kept.
    pytest.param("const a = []; for (;;) a.push({x: a.length, s: 'abc' + a.length})",
                 id="array-of-objects-const"),
    pytest.param("let s = 'x'; for (;;) s = s + s", id="string-doubling"),
    pytest.param("new Uint8Array(1e9)", id="uint8array-1e9"),
    pytest.param("new ArrayBuffer(2**31)", id="arraybuffer-2gib"),
    pytest.param("const a = []; for (;;) a.push(new Uint8Array(1e6))", id="many-typed-arrays"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("code", MEMORY_BOMBS)
def test_memory_bomb_is_a_typed_error(make_box: Callable[..., IsoBox], code: str) -> None:
    """A memory bomb under 16 MiB ends in MemoryLimitError (worker replaced) or RangeError/
    InternalError, never a hang or a crash."""
    box = make_box(memory_limit=16 * MIB)
    events = Recorder(box)
    error, _ = timed_error(lambda: box.run(code), 10.0)
    assert not isinstance(error, (WorkerCrashedError, BoxTimeoutError)), repr(error)
    if isinstance(error, MemoryLimitError):
        assert error.limit == 16 * MIB
        recycled = events.wait("worker:recycled")
        assert "M" in recycled["reason"]
        assert wait_until(lambda: not alive(recycled["pid"]))
        assert wait_until(lambda: pool_full_without(box, recycled["pid"]))
    else:
        assert isinstance(error, ScriptError), repr(error)
        assert error.name in ("RangeError", "InternalError"), (error.name, error.message)
    assert_serves(box)


# -- 4. recursion and nesting ----------------------------------------------------------------
@pytest.mark.timeout(30)
def test_deep_recursion_is_a_range_error(box: IsoBox) -> None:
    """Unbounded recursion ends in ScriptError(name="RangeError"), not a crashed worker."""
    error, _ = timed_error(lambda: box.run("function f(){return f()+1}; f()"), 10.0)
    assert isinstance(error, ScriptError), repr(error)
    assert error.name == "RangeError"
    assert "stack" in error.message
    assert_serves(box)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("code", [
    pytest.param("let a = []; for (let i = 0; i < 1e5; i++) a = [a]; a", id="arrays"),
    pytest.param("let a = {}; for (let i = 0; i < 1e5; i++) a = {a}; a", id="objects"),
])
def test_deeply_nested_result_is_a_serialization_error(box: IsoBox, code: str) -> None:
    """A result nested 100k deep is refused as SerializationError (or ScriptError), no crash."""
    error, _ = timed_error(lambda: box.run(code), 10.0)
    assert isinstance(error, (SerializationError, ScriptError)), repr(error)
    assert not isinstance(error, WorkerCrashedError)
    if isinstance(error, SerializationError):
        assert "nested" in str(error)
    assert_serves(box)


# -- 5. huge outputs -------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_50mb_result_exceeds_default_cap(box: IsoBox) -> None:
    """A 50 MB result string is refused with SerializationError naming the 32 MiB cap."""
    error, _ = timed_error(
        lambda: box.run("'x'.repeat(50 * 2**20)", memory_limit=256 * MIB, timeout=15), 20.0)
    assert isinstance(error, SerializationError), repr(error)
    assert str(32 * MIB) in str(error)
    assert error.path == "result"
    assert_serves(box)


@pytest.mark.timeout(30)
def test_result_cap_can_be_lowered_per_box(make_box: Callable[..., IsoBox]) -> None:
    """max_result_size=1_000_000 refuses a 2 MB result, naming that cap; 900 kB still passes."""
    box = make_box(max_result_size=1_000_000)
    error, _ = timed_error(lambda: box.run("'x'.repeat(2_000_000)"), 10.0)
    assert isinstance(error, SerializationError), repr(error)
    assert "1000000" in str(error)
    assert len(box.run("'x'.repeat(900_000)")) == 900_000
    assert_serves(box)


# Regression (fixed in 0934d26): any reply text over ~500 characters reached the quickjs-ng
# binding as a rope string ("Unknown quickjs tag: -6"); the worker exited with code 1 and the
# run failed with WorkerCrashedError.


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("code", "expected"), [
    pytest.param("'x'.repeat(600)", "x" * 600, id="string-600"),
    pytest.param("'x'.repeat(900_000)", "x" * 900_000, id="string-900k"),
    pytest.param("Array.from({length: 200}, (_, i) => i)", list(range(200)), id="array-200"),
    pytest.param("({s: 'y'.repeat(1000)})", {"s": "y" * 1000}, id="object"),
])
def test_large_result_under_the_cap_round_trips(box: IsoBox, code: str, expected: Any) -> None:
    """A result well under max_result_size comes back whole, without killing the worker."""
    assert box.run(code) == expected
    assert_serves(box)


@pytest.mark.timeout(30)
def test_long_error_message_is_a_script_error(box: IsoBox) -> None:
    """A thrown error with a 1000-character message is a ScriptError carrying that message."""
    with pytest.raises(ScriptError) as info:
        box.run("throw new Error('m'.repeat(1000))")
    assert info.value.message == "m" * 1000
    assert_serves(box)


@pytest.mark.timeout(30)
def test_long_console_line_is_delivered(box: IsoBox) -> None:
    """A 5000-character console line under the console cap reaches result.console."""
    result = box.execute("console.log('y'.repeat(5000)); 1")
    assert result.value == 1
    assert result.console == [("log", "y" * 5000)]
    assert_serves(box)


@pytest.mark.timeout(30)
def test_endless_console_flood_is_typed(box: IsoBox) -> None:
    """An endless console flood ends in MemoryLimitError (console cap) or TimeoutError."""
    code = "for (;;) console.log('x'.repeat(1000))"
    error, _ = timed_error(lambda: box.run(code, timeout=2), 8.0)
    assert isinstance(error, (MemoryLimitError, BoxTimeoutError)), repr(error)
    if isinstance(error, MemoryLimitError):
        assert "console" in str(error)
    assert_serves(box)


@pytest.mark.timeout(30)
def test_finite_console_flood_is_a_console_memory_error(box: IsoBox) -> None:
    """10 MB of console output that ends is MemoryLimitError about the 1 MiB console cap."""
    code = "for (let i = 0; i < 1e4; i++) console.log('x'.repeat(1000)); 5"
    error, _ = timed_error(lambda: box.run(code, timeout=5), 8.0)
    assert isinstance(error, MemoryLimitError), repr(error)
    assert "console" in str(error)
    assert error.limit == MIB
    assert_serves(box)


# -- 6. bad frames and deaths mid-stream -----------------------------------------------------
_SYS_PIDFD_GETFD = 438  # same number on every Linux architecture (the unified syscall table)


def steal_channel(pid: int) -> int:
    """A duplicate of the worker's end of its channel (``pidfd_getfd``); skips if not allowed.

    Writing to it is the same as the worker writing to its supervisor: the only way to feed the
    supervisor a bad frame from outside without changing the library.
    """
    fds = [int(name) for name in os.listdir(f"/proc/{pid}/fd")
           if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")]
    assert len(fds) == 1, fds
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fds[0], 0)
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.EPERM, errno.EACCES, errno.ENOSYS):
                pytest.skip(f"pidfd_getfd not permitted here: {os.strerror(err)}")
            raise OSError(err, os.strerror(err))
        return int(fd)
    finally:
        os.close(pidfd)


BAD_FRAMES = [
    pytest.param(struct.pack(">I", 3) + b"\xc1\xc1\xc1", "undecodable", id="garbage"),
    pytest.param(struct.pack(">I", 2**31) + b"x", "exceeds the cap", id="oversized-length"),
    pytest.param(encode_frame(MsgType.RESULT, 2**40, {"kind": "R", "payload": "number\n1"}),
                 "expected", id="wrong-request-id"),
    pytest.param(encode_frame(MsgType.READY, 0, {}), "", id="unexpected-type"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("frame", "why"), BAD_FRAMES)
def test_bad_frame_during_run_kills_worker(box: IsoBox, frame: bytes, why: str) -> None:
    """A bad frame on a busy worker's channel: worker SIGKILLed, run fails WorkerCrashedError."""
    events = Recorder(box)
    run = BusyRun(box, "while(true){}", timeout=5)
    fd = steal_channel(run.pid)
    try:
        os.write(fd, frame)
    finally:
        os.close(fd)
    error = run.join(5.0)
    assert isinstance(error, WorkerCrashedError), repr(error)
    assert error.pid == run.pid
    assert error.signal == signal.SIGKILL
    assert "bad frame" in error.cause
    assert why in error.cause
    assert events.wait("worker:crashed", pid=run.pid)["cause"] == error.cause
    assert wait_until(lambda: not alive(run.pid))
    assert wait_until(lambda: pool_full_without(box, run.pid))
    assert_serves(box)


@pytest.mark.timeout(30)
def test_idle_worker_sending_data_is_killed(box: IsoBox) -> None:
    """Data from an idle worker never becomes a result: it is a bad frame, the worker dies."""
    victim = box.pool_stats().workers[0].pid
    fd = steal_channel(victim)
    try:
        os.write(fd, b"unsolicited")
    finally:
        os.close(fd)
    # The pool may notice at once or only when a run next reads that channel; either way no
    # run returns a wrong value, at most the one run on the victim fails, typed.
    failures: list[WorkerCrashedError] = []
    for _ in range(4):
        if victim not in serving_pids(box):
            break
        try:
            assert box.run("1+2") == 3
        except WorkerCrashedError as crash:
            failures.append(crash)
    assert len(failures) <= 1, failures
    for exc in failures:
        assert exc.pid == victim
        assert "bad frame" in exc.cause
    assert wait_until(lambda: not alive(victim))
    assert wait_until(lambda: pool_full_without(box, victim))
    assert_serves(box)


@pytest.mark.timeout(30)
def test_worker_dying_while_streaming_output(box: IsoBox) -> None:
    """A worker killed while it streams console output: lines so far delivered, then a crash."""
    lines: list[str] = []
    code = "(async () => { for (;;) { console.log('tick'); await null; } })()"
    run = BusyRun(box, code, timeout=5, on_output=lambda _kind, msg: lines.append(msg))
    assert wait_until(lambda: len(lines) >= 10), "no console output was streamed"
    os.kill(run.pid, signal.SIGKILL)
    error = run.join(5.0)
    assert isinstance(error, WorkerCrashedError), repr(error)
    assert error.pid == run.pid
    assert error.signal == signal.SIGKILL
    assert set(lines) == {"tick"}
    assert wait_until(lambda: pool_full_without(box, run.pid))
    assert_serves(box)


# -- 7. the caller exits without shutdown ----------------------------------------------------
CALLER = """
import json, os, signal, sys
from isobox import IsoBox
b = IsoBox(pool={"min": 2, "max": 2})
b.warmup_pool()
assert b.run("1+2") == 3
print(json.dumps({"server": b._pool._zygote.pid,
                  "workers": [w.pid for w in b.pool_stats().workers]}), flush=True)
how = sys.argv[1]
if how == "os_exit":
    os._exit(0)
elif how == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("how", "returncode"), [
    ("normal", 0), ("os_exit", 0), ("sigkill", -signal.SIGKILL),
])
def test_caller_exit_without_shutdown_leaves_no_process(
        how: str, returncode: int, tmp_path: Path, box: IsoBox) -> None:
    """Whether the caller exits normally, by os._exit or by SIGKILL, fork server and workers go."""
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err, subprocess.Popen(
            [sys.executable, "-c", CALLER, how], stdout=subprocess.PIPE, stderr=err,
            stdin=subprocess.DEVNULL, text=True) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the caller printed nothing; stderr: {stderr.read_text()[-2000:]}"
        assert proc.wait(20) == returncode, stderr.read_text()[-2000:]
    pids = json.loads(line)
    everything = [pids["server"], *pids["workers"]]
    assert len(set(everything)) == 3
    assert wait_until(lambda: not any(alive(p) for p in everything), timeout=5.0), (
        [(p, alive(p)) for p in everything])
    assert_serves(box)


# -- 8. shutdown -----------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_shutdown_stops_everything_and_closes(box: IsoBox) -> None:
    """After shutdown() no worker or fork server is alive, runs raise ClosedError, twice is ok."""
    assert_serves(box)
    server = cast("Pool", box._pool)._zygote.pid
    assert server is not None
    everything = [server, *serving_pids(box)]
    assert len(everything) == 3
    assert all(alive(p) for p in everything)
    box.shutdown()
    assert wait_until(lambda: not any(alive(p) for p in everything))
    with pytest.raises(ClosedError):
        box.run("1+2")
    with pytest.raises(ClosedError):
        box.execute("1+2")
    box.shutdown()  # idempotent
    with pytest.raises(ClosedError):
        box.run("1+2")
    assert isinstance(ClosedError("x"), IsoBoxError)


@pytest.mark.timeout(30)
def test_shutdown_during_a_run_ends_the_run(box: IsoBox) -> None:
    """shutdown() with a run in flight returns within its bound; the run gets ClosedError."""
    server = cast("Pool", box._pool)._zygote.pid
    assert server is not None
    everything = [server, *serving_pids(box)]
    run = BusyRun(box, "while(true){}", timeout=10)
    started = time.monotonic()
    box.shutdown(timeout=1.0)
    assert time.monotonic() - started < 8.0
    error = run.join(5.0)
    assert isinstance(error, ClosedError), repr(error)
    assert wait_until(lambda: not any(alive(p) for p in everything))
    with pytest.raises(ClosedError):
        box.run("1+2")


# -- 9. concurrency --------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_threads_share_one_box(box: IsoBox) -> None:
    """8 threads x 50 runs on one box each get their own correct values."""
    results: dict[int, list[Any]] = {}
    failures: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            results[k] = [box.run(f"{k} * 1000 + {i}") for i in range(50)]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures
    for k in range(8):
        assert results[k] == [k * 1000 + i for i in range(50)]
    assert box.get_metrics().total_executions == 400
    assert box.get_metrics().errors == 0
    assert_serves(box)


@pytest.mark.timeout(30)
def test_async_gather_and_cancel() -> None:
    """AsyncIsoBox: 20 gathered runs are correct; a cancelled run's worker is killed."""

    async def main() -> None:
        box = AsyncIsoBox(timeout=5.0, pool=POOL)
        try:
            assert await box.warmup_pool() == 2
            events = Recorder(box)
            values = await asyncio.gather(*(box.run(f"{i} * 2") for i in range(20)))
            assert values == [i * 2 for i in range(20)]

            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(box.run("while(true){}", timeout=10), 0.3)
            assert time.monotonic() - started < 5.0
            recycled = await asyncio.to_thread(
                events.wait, "worker:recycled", 5.0, reason="the run was cancelled")
            victim = recycled["pid"]
            assert await asyncio.to_thread(wait_until, lambda: not alive(victim))

            def back() -> bool:
                pids = {w.pid for w in box._pool_stats().workers if w.state in ("idle", "busy")}
                return len(pids) == 2 and victim not in pids

            assert await asyncio.to_thread(wait_until, back)
            assert await box.run("1+2") == 3
            assert await asyncio.gather(*(box.run(f"{i} + 1") for i in range(4))) == [1, 2, 3, 4]
        finally:
            await box.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_async_run_on_killed_worker() -> None:
    """AsyncIsoBox: a worker killed mid-run fails that await with WorkerCrashedError."""

    async def main() -> None:
        box = AsyncIsoBox(timeout=5.0, pool=POOL)
        try:
            assert await box.warmup_pool() == 2
            task = asyncio.create_task(box.run("while(true){}"))

            def busy() -> list[int]:
                return [w.pid for w in box._pool_stats().workers if w.state == "busy"]

            assert await asyncio.to_thread(wait_until, lambda: bool(busy()))
            pid = busy()[0]
            await asyncio.sleep(0.2)
            os.kill(pid, signal.SIGSEGV)
            with pytest.raises(WorkerCrashedError) as info:
                await asyncio.wait_for(task, 5.0)
            assert info.value.pid == pid
            assert info.value.signal == signal.SIGSEGV
            assert await box.run("1+2") == 3
        finally:
            await box.shutdown()

    asyncio.run(main())


# -- 10. repeated crashes --------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_five_kills_in_a_row(box: IsoBox) -> None:
    """Five workers killed one after another: each time the box serves; restarts count up."""
    events = Recorder(box)
    restarts = [box.get_metrics().worker_restarts]
    for i in range(5):
        victim = box.execute(f"{i}").worker_pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        events.wait("worker:crashed", pid=victim)
        assert box.run(f"{i} + 100") == i + 100
        assert wait_until(partial(pool_full_without, box, victim))
        restarts.append(box.get_metrics().worker_restarts)
    assert restarts == sorted(restarts)
    assert len(set(restarts)) == 6, restarts
    assert restarts[-1] - restarts[0] >= 5
    assert box.pool_stats().restarts == restarts[-1]
    assert_serves(box)


@pytest.mark.timeout(10)
def test_error_tree() -> None:
    """Every error this file expects is an IsoBoxError, exported from the package."""
    for name in ("TimeoutError", "MemoryLimitError", "ScriptError", "CompileError",
                 "SerializationError", "WorkerCrashedError", "ClosedError"):
        assert issubclass(getattr(isobox, name), IsoBoxError)


@pytest.mark.timeout(60)
def test_runs_queued_when_the_crash_loop_breaker_opens_fail_at_once() -> None:
    """The tenth unexpected death within 10 s opens the crash-loop breaker, and no worker is
    left: a run already queued for a worker fails at once with the breaker's
    WorkerCrashedError (cause "crash loop"), as a new run would, instead of waiting out its
    30 s deadline."""
    with IsoBox(pool={"min": 1, "max": 1}, timeout=30.0) as box:
        assert box._pool is not None
        box._pool._breaker.window = 300.0  # ten deaths surely fall in it, however slow we are
        for _ in range(9):  # each worker serves a run first, so respawns are not backed off
            assert box.run("1") == 1
            (pid,) = serving_pids(box)
            os.kill(pid, signal.SIGKILL)
            # mypy cannot infer a lambda with a default argument from a Callable[[], ...] context
            assert wait_until(cast("Callable[[], set[int]]", lambda p=pid: serving_pids(box) - {p}),
                              10.0)
        outcomes: dict[str, Any] = {}

        def run(name: str, code: str) -> None:
            started = time.monotonic()
            try:
                outcomes[name] = box.run(code)
            except isobox.IsoBoxError as exc:
                outcomes[name] = exc
            outcomes[name + "_took"] = time.monotonic() - started

        hog = threading.Thread(target=run, args=("hog", "while (true) {}"))
        hog.start()
        assert wait_until(lambda: [w for w in box.pool_stats().workers if w.state == "busy"])
        queued = threading.Thread(target=run, args=("queued", "2"))
        queued.start()
        assert wait_until(lambda: box.pool_stats().queued == 1)
        (pid,) = serving_pids(box)
        os.kill(pid, signal.SIGKILL)
        hog.join(10)
        queued.join(10)
        assert not hog.is_alive() and not queued.is_alive()
    assert isinstance(outcomes["hog"], WorkerCrashedError)
    error = outcomes["queued"]
    assert isinstance(error, WorkerCrashedError), error
    assert error.cause == "crash loop"
    assert outcomes["queued_took"] < 10.0
