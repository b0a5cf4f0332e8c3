"""The worker pool: hand idle workers to runs, replace the dead, keep the pool sized.

::

    caller threads / event loops                      maintainer thread ("isobox-pool")
      run() ─ acquire() ─▶ idle deque ──────────────▶ spawns up to the deficit (backoff,
         │      └─ or wait in FIFO waiters              crash-loop breaker), polls idle
         ├─ RUN ─▶ worker ─ OUTPUT* ─ RESULT ─▶          channels for deaths, reaps workers
         │        (poll until the wall deadline;          idle past idle_timeout
         │         past it: SIGKILL = the watchdog)
         └─ release() / discard() ─▶ idle deque or waiter, or replacement

The run's own thread (or task) does the IO with its worker: one hop, no hand-off. One lock
guards the pool's lists; no IO happens under it. Shutdown: SHUTDOWN to every worker, a bounded
wait, SIGTERM, SIGKILL, then the fork server is stopped and reaps what is left.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import json
import logging
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from isobox.errors import (
    ClosedError,
    IsoBoxError,
    SerializationError,
    SessionError,
    TimeoutError,
    WorkerCrashedError,
    describe_death,
)
from isobox.protocol import Frame, MsgType, ProtocolError, encode_frame
from isobox.supervisor import stats
from isobox.supervisor.handle import ChannelClosed, WorkerHandle
from isobox.supervisor.health import HealthConfig, WorkerHealth
from isobox.supervisor.policy import Backoff, CrashLoopBreaker, classify_exit, jittered_max_runs
from isobox.supervisor.zygote import ZygoteClient

log = logging.getLogger("isobox")

__all__ = ["AsyncCalls", "HostCaller", "PinLost", "Pool", "PoolConfig"]

Emit = Callable[[str, dict[str, Any]], None]
OnOutput = Callable[[list[tuple[str, str]]], None]


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Pool sizing and recycling (see README: "Pool")."""

    min: int = 1
    max: int = 2
    idle_timeout: float = 300.0
    max_runs: int | None = 10_000
    max_queue: int = 10_000
    start_timeout: float = 10.0
    # heartbeats, RSS ceiling and growth trend (health.py)
    health: HealthConfig = field(default_factory=HealthConfig)
    preload_typescript: bool = False  # the fork server loads the TypeScript compiler
    strict_confinement: bool = True  # a worker missing a required layer refuses to start


class PinLost(Exception):
    """A session's pinned worker left the pool: place the session on another worker."""


class HostCaller(Protocol):
    """Answers a worker's host-function calls (see :class:`isobox.host.HostFunctions`)."""

    def call(self, name: str, args: str) -> str: ...

    def call_until(self, name: str, args: str, deadline: float) -> str: ...

    async def acall(self, name: str, args: str) -> str: ...


class _Waiter:
    """One run waiting for a worker: a thread (Event) or a task (Future)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None,
                 want: WorkerHandle | None = None) -> None:
        self.want = want  # a session's pinned worker, or None for any
        self.handle: WorkerHandle | None = None
        self.error: BaseException | None = None
        self.event = threading.Event()
        self.loop = loop
        self.future: asyncio.Future[None] | None = loop.create_future() if loop else None

    def wake(self) -> None:
        if self.future is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self._resolve)
        else:
            self.event.set()

    def _resolve(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


def _crash_loop() -> WorkerCrashedError:
    return WorkerCrashedError(
        "workers keep crashing (crash-loop breaker open); not respawning for now",
        cause="crash loop")


class Pool:
    """Workers forked from one fork server, shared by every thread of the caller."""

    def __init__(self, config: PoolConfig, emit: Emit) -> None:
        self.config = config
        self._emit = emit
        self._zygote = ZygoteClient(preload_typescript=config.preload_typescript,
                                    strict_confinement=config.strict_confinement)
        self.confinement_error = ""  # why the last worker refused to start, if one did
        self._lock = threading.Lock()
        self._handles: dict[int, WorkerHandle] = {}
        self._idle: deque[WorkerHandle] = deque()
        self._waiters: deque[_Waiter] = deque()
        self._spawning = 0
        self._session_workers = 0  # workers sessions need (placement grows the pool to it)
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._backoff = Backoff()
        self._breaker = CrashLoopBreaker()
        self._ready = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self.restarts = 0
        self._rids = itertools.count(1)
        self._thread = threading.Thread(target=self._maintain, name="isobox-pool", daemon=True)

    # -- start and stop --------------------------------------------------------------------
    def start(self) -> None:
        """Start the fork server and the maintainer; workers come up in the background."""
        self._zygote.start()
        self._thread.start()

    def warmup(self, timeout: float = 30.0) -> int:
        """Block until ``min`` workers are ready (or ``timeout``); returns how many are."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while len(self._handles) - self._starting() < self.config.min and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            return len(self._handles) - self._starting()

    def _starting(self) -> int:
        return sum(1 for h in self._handles.values() if h.state == "starting")

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker (SHUTDOWN, bounded wait, SIGTERM, SIGKILL) and the fork server."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for waiter in self._waiters:
                waiter.error = ClosedError("the box was shut down")
            waiters = list(self._waiters)
            self._waiters.clear()
            handles = list(self._handles.values())
            idle = list(self._idle)
            self._idle.clear()
        self._stopping.set()
        for waiter in waiters:
            waiter.wake()
        self._poke()
        for handle in idle:
            with contextlib.suppress(Exception):
                handle.send(encode_frame(MsgType.SHUTDOWN, 0, {}), time.monotonic() + 0.1)
        self._escalate(handles, timeout)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # Bounded: the backoff sleep wakes on _stopping, a spawn gives up at start_timeout.
            self._thread.join(timeout + self.config.start_timeout + 1.0)
        self._zygote.stop(timeout)
        for handle in idle:  # busy ones belong to their runs, which close them on the way out
            handle.close()
        if not self._thread.is_alive():  # never close fds a live maintainer might still poll
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _escalate(self, handles: list[WorkerHandle], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for sig, wait in ((None, deadline), (signal.SIGTERM, None), (signal.SIGKILL, None)):
            alive = [h for h in handles if h.origin.exit_status(h.pid, 0) is None]
            if not alive:
                return
            if sig is not None:
                for handle in alive:
                    handle.kill("stopped at shutdown", sig)
            end = wait if wait is not None else time.monotonic() + 1.0
            for handle in alive:
                handle.origin.exit_status(handle.pid, max(0.0, end - time.monotonic()))

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` began."""
        return self._closed

    # -- acquire and release ---------------------------------------------------------------
    def _take_or_wait(
        self, loop: asyncio.AbstractEventLoop | None = None, want: WorkerHandle | None = None
    ) -> WorkerHandle | _Waiter:
        """An idle worker at once, or a new waiter queued FIFO (built only when needed).
        With ``want``, only that worker will do (a session's); :class:`PinLost` if it is gone."""
        with self._lock:
            if self._closed:
                raise ClosedError("the box was shut down")
            if want is not None:
                if self._handles.get(want.pid) is not want or want.exited:
                    raise PinLost
                if want in self._idle:
                    self._idle.remove(want)
                    want.state = "busy"
                    return want
            elif self._idle:
                handle = self._idle.popleft()
                handle.state = "busy"
                return handle
            if len(self._waiters) >= self.config.max_queue:
                waiting = len(self._waiters)
                raise IsoBoxError(f"queue full: {waiting} runs already wait for a worker")
            if not self._handles and self._breaker.is_open(time.monotonic()):
                raise _crash_loop()
            waiter = _Waiter(loop, want)
            self._waiters.append(waiter)
        self._poke()
        return waiter

    def _abandon(self, waiter: _Waiter) -> WorkerHandle | None:
        """The waiter gave up; returns a handle that was delivered meanwhile, if any."""
        with self._lock:
            if waiter.handle is None:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            return waiter.handle

    def acquire(self, deadline: float, want: WorkerHandle | None = None) -> WorkerHandle:
        """An idle worker for this thread (``want``: that one), waiting FIFO until ``deadline``."""
        waiter = self._take_or_wait(None, want)
        if isinstance(waiter, WorkerHandle):
            return waiter
        try:
            waiter.event.wait(max(0.0, deadline - time.monotonic()))
        except BaseException:  # Ctrl-C or a signal handler raising: give back a late worker
            late = self._abandon(waiter)
            if late is not None:
                self._offer(late)
            raise
        return self._after_wait(waiter)

    async def acquire_async(self, deadline: float,
                            want: WorkerHandle | None = None) -> WorkerHandle:
        """An idle worker for this task (``want``: that one), waiting FIFO until ``deadline``."""
        waiter = self._take_or_wait(asyncio.get_running_loop(), want)
        if isinstance(waiter, WorkerHandle):
            return waiter
        if waiter.future is None:
            raise RuntimeError("async waiter without a future")
        try:
            await asyncio.wait_for(waiter.future, max(0.0, deadline - time.monotonic()))
        except builtins.TimeoutError:
            pass
        except asyncio.CancelledError:
            late = self._abandon(waiter)
            if late is not None:
                self._offer(late)
            raise
        return self._after_wait(waiter)

    def _after_wait(self, waiter: _Waiter) -> WorkerHandle:
        handle = self._abandon(waiter)
        if handle is not None:
            return handle
        if waiter.error is not None:
            raise waiter.error
        raise TimeoutError("no worker became free before the deadline", kind="wall")

    def _next_waiter(self, handle: WorkerHandle) -> _Waiter | None:
        """The waiter ``handle`` should go to: one pinned to it first, else the oldest free."""
        chosen = next((w for w in self._waiters if w.want is handle), None)
        if chosen is None:
            chosen = next((w for w in self._waiters if w.want is None), None)
        if chosen is not None:
            self._waiters.remove(chosen)
        return chosen

    def _offer(self, handle: WorkerHandle) -> None:
        """Give a ready worker to the oldest waiter, or park it idle."""
        with self._lock:
            waiter = None if self._closed else self._next_waiter(handle)
            if self._closed:
                handle.state = "stopping"
            elif waiter is not None:
                handle.state = "busy"
                waiter.handle = handle
                waiter.wake()
                self._ready.notify_all()
                return
            else:
                handle.state = "idle"
                handle.last_used = time.monotonic()
                self._idle.append(handle)
                self._ready.notify_all()
                return
        self._stop_one(handle)

    def release(self, handle: WorkerHandle) -> None:
        """A run finished cleanly on ``handle``: recycle it at max_runs, else offer it."""
        handle.runs += 1
        self._backoff.succeeded()
        # A worker that hosts sessions is not recycled: that would cost them their closures.
        if handle.max_runs is not None and handle.runs >= handle.max_runs and not handle.sessions:
            self._retire(handle, "max_runs reached", expected=True)
            self._stop_one(handle)
            return
        if handle.retire_after:  # found unhealthy while it ran: drained now, so recycled
            self._retire(handle, handle.retire_after, expected=True)
            self._stop_one(handle)
            return
        self._offer(handle)

    def discard(self, handle: WorkerHandle, reason: str, *, expected: bool) -> None:
        """Take ``handle`` out of the pool (it exited, was killed, or asked to retire)."""
        self._retire(handle, reason, expected=expected)
        handle.close()

    def _retire(self, handle: WorkerHandle, reason: str, *, expected: bool) -> None:
        with self._lock:
            known = self._handles.pop(handle.pid, None) is not None
            with contextlib.suppress(ValueError):
                self._idle.remove(handle)
            pinned = [w for w in self._waiters if w.want is handle]
            for waiter in pinned:  # sessions waiting for this worker must move elsewhere
                self._waiters.remove(waiter)
                waiter.error = PinLost()
                waiter.wake()
            if known:
                self.restarts += 1
            if not expected:
                self._breaker.record(time.monotonic())
                self._backoff.failed()
                self._fail_queued_if_looping()
        stats.forget(handle.pid)
        if known and expected:
            self._emit("worker:recycled", {"pid": handle.pid, "reason": reason})
        self._poke()

    def _fail_queued_if_looping(self) -> None:
        """After a death (under ``_lock``): if the breaker is open and no worker is up or
        starting, nothing will serve the queued runs until it closes, so they fail now, as new
        runs do, instead of waiting out their deadline."""
        if self._handles or self._spawning or not self._breaker.is_open(time.monotonic()):
            return
        for waiter in self._waiters:
            waiter.error = _crash_loop()
            waiter.wake()
        self._waiters.clear()

    def _stop_one(self, handle: WorkerHandle) -> None:
        with contextlib.suppress(Exception):
            handle.send(encode_frame(MsgType.SHUTDOWN, 0, {}), time.monotonic() + 0.1)
        handle.close()

    def crash_error(
        self, handle: WorkerHandle, detail: str, *, unexpected: bool = False
    ) -> IsoBoxError:
        """Classify the death of ``handle`` (which just lost its channel) and drop it."""
        if self._closed:
            self.discard(handle, "stopped at shutdown", expected=True)
            closed = ClosedError("the box was shut down during the run")
            closed.worker_pid = handle.pid
            return closed
        status = handle.origin.exit_status(handle.pid, 1.0)
        death = classify_exit(status, killed_by_us=handle.kill_reason)
        crashed = unexpected or not handle.kill_reason
        self.discard(handle, death.cause, expected=not crashed)
        if crashed:
            self._emit("worker:crashed", {"pid": handle.pid, "exitcode": death.exitcode,
                                          "signal": death.signal, "cause": death.cause})
        message = describe_death(handle.pid, death.exitcode, death.signal, death.cause)
        error = WorkerCrashedError(f"{message}; {detail}" if detail else message, pid=handle.pid,
                                   exitcode=death.exitcode, signal=death.signal, cause=death.cause)
        error.worker_pid = handle.pid
        return error

    # -- one run ---------------------------------------------------------------------------
    def run(self, body: dict[str, Any], *, deadline: float, kill_at: float,
            on_output: OnOutput | None, host: HostCaller | None = None,
            want: WorkerHandle | None = None) -> tuple[dict[str, Any], WorkerHandle]:
        """Run one request on a worker from this thread; returns the RESULT body and the
        worker it ran on.

        ``deadline`` bounds the wait for a worker; past ``kill_at`` the worker is SIGKILLed
        (the wall-clock watchdog) and :class:`TimeoutError` is raised. ``want`` pins the run
        to a session's worker. Host-function calls are answered by ``host`` on this thread.
        """
        handle, rid = self.send_request(body, deadline=deadline, kill_at=kill_at, want=want)
        watch = CpuWatch.of(handle, body)
        reply = self._await_reply(handle, rid, kill_at, on_output, host, watch=watch)
        return self._finish(handle, reply), handle

    def holds(self, handle: WorkerHandle) -> bool:
        """Whether ``handle`` is still one of the pool's live workers."""
        with self._lock:
            if self._handles.get(handle.pid) is not handle:
                return False
        return handle.alive()

    def send_request(self, body: dict[str, Any], *, deadline: float, kill_at: float,
                     want: WorkerHandle | None, what: str = "run", retry: bool = True
                     ) -> tuple[WorkerHandle, int]:
        """Acquire a worker (``want``: that one) and send it ``body``; its handle and the
        request id. A worker that died before it could read the request ran nothing, so
        another is tried once (with ``retry``); a session's request raises PinLost instead."""
        rid = next(self._rids)
        for attempt in (1, 2):
            handle = self.acquire(deadline, want)
            frame = self.request_frame(rid, handle, body)
            handle.run_cpu_base, handle.cpu_mark = (handle.cpu_mark if what == "run" else None,
                                                    None)
            try:
                handle.send(frame, kill_at)
            except BaseException as exc:
                failure = self._send_failure(handle, exc, want=want, what=what,
                                             last=attempt == 2 or not retry, verb="interrupted")
                if failure is None:
                    continue
                if failure is exc:
                    raise
                raise failure from None
            return handle, rid
        raise AssertionError("unreachable")

    async def asend_request(self, body: dict[str, Any], *, deadline: float, kill_at: float,
                            want: WorkerHandle | None, what: str = "run", retry: bool = True
                            ) -> tuple[WorkerHandle, int]:
        """The asyncio twin of :meth:`send_request`."""
        rid = next(self._rids)
        for attempt in (1, 2):
            handle = await self.acquire_async(deadline, want)
            frame = self.request_frame(rid, handle, body)
            handle.run_cpu_base, handle.cpu_mark = (handle.cpu_mark if what == "run" else None,
                                                    None)
            try:
                sent = handle.try_send(frame)  # the usual case: no wait, no timer
                if sent < len(frame):
                    async with asyncio.timeout_at(_loop_time(kill_at)):
                        await handle.asend(frame[sent:])
            except BaseException as exc:
                failure = self._send_failure(handle, exc, want=want, what=what,
                                             last=attempt == 2 or not retry, verb="cancelled")
                if failure is None:
                    continue
                if failure is exc:
                    raise
                raise failure from None
            return handle, rid
        raise AssertionError("unreachable")

    def _send_failure(self, handle: WorkerHandle, exc: BaseException, *,
                      want: WorkerHandle | None, what: str, last: bool, verb: str
                      ) -> BaseException | None:
        """What a failed send means: the error to raise, or None to try another worker."""
        if isinstance(exc, builtins.TimeoutError):
            return self._wall_timeout(handle)
        if isinstance(exc, ChannelClosed):
            error = self.crash_error(handle, f"before the {what} started")
            if want is not None:
                return PinLost()  # placed again, from its checkpoint
            return error if last else None
        self._kill_and_drop(handle, f"the {what} was {verb}")
        return exc

    def request_frame(self, rid: int, handle: WorkerHandle, body: dict[str, Any]) -> bytes:
        """The RUN frame of ``body`` for the just-acquired ``handle``, with its pending session
        drops; if the request cannot be encoded, the worker goes back to the pool."""
        drops: list[str] = []
        while handle.drops:  # popleft is atomic: a drop added meanwhile is never lost
            drops.append(handle.drops.popleft())
        try:
            frame = _request_frame(rid, {**body, "drop": drops} if drops else body)
        except BaseException:
            handle.drops.extendleft(reversed(drops))
            self._offer(handle)
            raise
        return frame

    def place_session(self, deadline: float, per_worker: int) -> WorkerHandle:
        """The live worker with the fewest sessions and room for one more; grows the pool
        (up to ``max``) when every worker is full. Raises SessionError when none has room."""
        while True:
            with self._lock:
                if self._closed:
                    raise ClosedError("the box was shut down")
                live = [h for h in self._handles.values() if h.state != "starting"
                        and not h.exited]
                roomy = [h for h in live if len(h.sessions) < per_worker]
                if roomy:
                    return min(roomy, key=lambda h: len(h.sessions))
                full = len(live) >= self.config.max
                if not full:
                    self._session_workers = len(live) + 1
            if full:
                raise SessionError(f"every worker already holds {per_worker} sessions "
                                   f"(pool max {self.config.max}); close some sessions")
            self._poke()
            with self._ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no worker could host the session before the deadline",
                                       kind="wall")
                self._ready.wait(min(left, 0.05))

    def _await_reply(self, handle: WorkerHandle, rid: int, kill_at: float,
                     on_output: OnOutput | None, host: HostCaller | None, *,
                     watch: CpuWatch | None = None) -> dict[str, Any]:
        try:
            while True:
                frame = handle.recv(kill_at if watch is None else min(kill_at, watch.check_at))
                if frame is None:
                    if watch is None or time.monotonic() >= kill_at:
                        raise self._wall_timeout(handle, watch)
                    if watch.exceeded():
                        raise self._cpu_timeout(handle, watch.limit)
                    continue
                if frame.type is MsgType.CALL:
                    answer = answer_call(frame, rid, caller(host, kill_at))
                    handle.send(answer, kill_at)
                    continue
                reply = read_reply(frame, rid, on_output)
                if reply is not None:
                    return reply
        except (TimeoutError, WorkerCrashedError):  # ours (a builtins.TimeoutError too)
            raise
        except builtins.TimeoutError:
            raise self._wall_timeout(handle, watch) from None
        except (ChannelClosed, ProtocolError) as exc:
            raise self._lost(handle, exc) from None
        except BaseException:
            self._kill_and_drop(handle, "the run was interrupted")
            raise

    async def run_async(self, body: dict[str, Any], *, deadline: float, kill_at: float,
                        on_output: OnOutput | None, host: HostCaller | None = None,
                        want: WorkerHandle | None = None) -> tuple[dict[str, Any], WorkerHandle]:
        """The asyncio twin of :meth:`run`; cancelling it kills the worker it ran on."""
        handle, rid = await self.asend_request(body, deadline=deadline, kill_at=kill_at,
                                               want=want)
        watch = CpuWatch.of(handle, body)
        reply = await self._await_reply_async(handle, rid, kill_at, on_output, host,
                                              watch=watch)
        return self._finish(handle, reply), handle

    async def _await_reply_async(self, handle: WorkerHandle, rid: int, kill_at: float,
                                 on_output: OnOutput | None, host: HostCaller | None, *,
                                 watch: CpuWatch | None = None) -> dict[str, Any]:
        calls = AsyncCalls(handle, rid, host)
        watcher = watch.schedule(asyncio.get_running_loop()) if watch else None
        try:
            async with asyncio.timeout_at(_loop_time(kill_at)):
                while True:
                    frame = await handle.arecv()
                    if frame.type is MsgType.CALL:
                        await calls.start(frame)
                        continue
                    reply = read_reply(frame, rid, on_output)
                    if reply is not None:
                        return reply
        except builtins.TimeoutError:
            raise self._wall_timeout(handle, watch) from None
        except (ChannelClosed, ProtocolError) as exc:
            if watch is not None and watch.killed:
                raise self._cpu_timeout(handle, watch.limit) from None
            raise self._lost(handle, exc) from None
        except BaseException:
            self._kill_and_drop(handle, "the run was cancelled")
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            await calls.close()

    def _lost(self, handle: WorkerHandle, exc: ChannelClosed | ProtocolError) -> IsoBoxError:
        """The error for a run whose channel closed or carried a bad frame (which kills it)."""
        if isinstance(exc, ProtocolError):
            handle.kill(f"bad frame from the worker: {exc}")
            return self.crash_error(handle, "bad frame", unexpected=True)
        return self.crash_error(handle, "during the run")

    def _wall_timeout(self, handle: WorkerHandle, watch: CpuWatch | None = None) -> TimeoutError:
        if watch is not None and watch.over_budget():  # both limits passed: CPU is the cause
            return self._cpu_timeout(handle, watch.limit)
        handle.kill("killed by the watchdog past the wall-clock deadline")
        handle.origin.exit_status(handle.pid, 1.0)
        self.discard(handle, "wall timeout", expected=True)
        error = TimeoutError("the run exceeded its wall-clock timeout", kind="wall")
        error.worker_pid = handle.pid
        return error

    def _cpu_timeout(self, handle: WorkerHandle, limit: float) -> TimeoutError:
        """The CPU watchdog's verdict: a run whose worker spent its CPU budget (plus grace)
        without the engine noticing (native calls between interrupt polls) is killed."""
        handle.kill("killed by the watchdog past the run's CPU budget")
        handle.origin.exit_status(handle.pid, 1.0)
        self.discard(handle, "cpu timeout", expected=True)
        error = TimeoutError(f"the run exceeded its CPU budget of {limit}s", kind="cpu",
                             limit=limit)
        error.worker_pid = handle.pid
        return error

    def condemn(self, pid: int | None, reason: str) -> None:
        """Kill and drop the worker ``pid`` (if it is still ours): it sent what a real worker
        never would, found only after its reply was accepted."""
        with self._lock:
            handle = self._handles.get(pid) if pid is not None else None
        if handle is not None:
            log.error("isobox worker %d: %s", handle.pid, reason)
            self._kill_and_drop(handle, reason)

    def _kill_and_drop(self, handle: WorkerHandle, reason: str) -> None:
        handle.kill(reason)
        self.discard(handle, reason, expected=True)

    def _finish(self, handle: WorkerHandle, reply: dict[str, Any]) -> dict[str, Any]:
        handle.cpu_mark = _cpu_figure(reply.get("cpu_total"))
        if reply.get("retire"):
            self.discard(handle, f"retired after outcome {reply.get('kind')}", expected=True)
        else:
            self.release(handle)
        return reply

    # -- the maintainer --------------------------------------------------------------------
    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _deficit(self) -> int:
        with self._lock:
            if self._closed or self._breaker.is_open(time.monotonic()):
                return 0
            busy = len(self._handles) - len(self._idle)
            free = sum(1 for w in self._waiters if w.want is None)
            target = min(self.config.max, max(self.config.min, busy + free,
                                              self._session_workers))
            return target - len(self._handles) - self._spawning

    def _maintain(self) -> None:
        """Maintainer loop: spawn to the deficit, notice idle deaths, reap idle workers."""
        while not self._closed:
            with contextlib.suppress(Exception):
                self._maintain_once()

    def _maintain_once(self) -> None:
        while self._deficit() > 0 and not self._closed:
            delay = self._backoff.delay()
            if delay and self._stopping.wait(delay):
                return
            self._spawn_one()
        # Watch every live worker's pidfd (readable once the process exits). Runs never touch
        # pidfds, so this never races a run's IO, and it wakes only for deaths and pokes.
        with self._lock:
            watched = {h.pidfd: h for h in self._handles.values() if not h.exited}
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in watched:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(1000):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._wake_r, 4096)
            elif fd in watched:
                self._exited(watched[fd])
        self._reap_idle()
        self._check_health()

    def _check_health(self) -> None:
        """Ping and measure the workers due for a check (health.py decides). An idle one is
        taken out of the pool while it is checked; a busy one is only measured, and if it
        must go it is recycled when its run ends (drained first)."""
        now = time.monotonic()
        with self._lock:
            due = [h for h in self._handles.values()
                   if h.health is not None and h.health.due(now) and h.state in ("idle", "busy")]
            idle = [h for h in due if h in self._idle]
            for handle in idle:
                self._idle.remove(handle)
                handle.state = "checking"
        for handle in due:
            checking = handle in idle
            if checking and not self._heartbeat(handle):
                continue
            sample = stats.sample(handle.pid)
            health = handle.health
            verdict = (health.sampled(time.monotonic(), sample.rss, sample.uss)
                       if sample is not None and health is not None else None)
            if verdict is not None and handle.sessions and not verdict.startswith("rss "):
                verdict = None  # sessions grow by design; only the hard ceiling moves them
            if verdict is not None and not checking:
                handle.retire_after = verdict
            elif verdict is not None:
                log.warning("isobox worker %d recycled: %s", handle.pid, verdict)
                self._retire(handle, verdict, expected=True)
                self._stop_one(handle)
            elif checking:
                self._offer(handle)

    def _heartbeat(self, handle: WorkerHandle) -> bool:
        """PING an idle worker; one that does not PONG in time is stuck and is killed."""
        timeout = self.config.health.heartbeat_timeout
        try:
            handle.send(encode_frame(MsgType.PING, 0, {}), time.monotonic() + timeout)
            frame = handle.recv(time.monotonic() + timeout)
        except (ChannelClosed, ProtocolError, OSError):
            frame = None
        if frame is not None and frame.type is MsgType.PONG:
            return True
        reason = f"stuck: no heartbeat answer within {timeout}s"
        log.warning("isobox worker %d %s", handle.pid, reason)
        self._kill_and_drop(handle, reason)
        return False

    def _exited(self, handle: WorkerHandle) -> None:
        """A worker's process is gone: if it was idle, classify and replace it now; a busy one
        is handled by its run, which sees the channel close."""
        with self._lock:
            if self._handles.get(handle.pid) is not handle:
                return
            handle.exited = True
            if handle not in self._idle:
                return
            self._idle.remove(handle)
            handle.state = "stopping"
        self.crash_error(handle, "while idle", unexpected=True)

    def _reap_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            extra = len(self._handles) - self.config.min
            old = [h for h in self._idle
                   if now - h.last_used > self.config.idle_timeout and not h.sessions]
            stale = old[: max(0, extra)]
            for handle in stale:
                self._idle.remove(handle)
                handle.state = "stopping"
        for handle in stale:
            self._retire(handle, "idle timeout", expected=True)
            self._stop_one(handle)

    def _spawn_one(self) -> None:
        with self._lock:
            self._spawning += 1
        handle: WorkerHandle | None = None
        try:
            zygote = self._current_zygote()
            handle = WorkerHandle(zygote.spawn(), jittered_max_runs(self.config.max_runs), zygote)
            handle.health = WorkerHealth(self.config.health)
            handle.health.checked_at = time.monotonic()
            frame = handle.recv(time.monotonic() + self.config.start_timeout)
            if frame is None or frame.type is not MsgType.READY:
                raise IsoBoxError("worker did not become READY")
            refused = frame.body.get("refused")
            if refused is not None:
                self.confinement_error = str(refused)[:500]
                log.error("isobox worker %d refused to start unconfined: %s (pass "
                          "confinement='best-effort' to run without the missing layers)",
                          handle.pid, refused)
                raise IsoBoxError("worker refused to start unconfined")
            handle.cpu_mark = _cpu_figure(frame.body.get("cpu"))
            handle.prelude = str(frame.body.get("prelude", ""))[:16]
            report = frame.body.get("confinement")
            if isinstance(report, dict):
                handle.confinement = [str(x) for x in report.get("applied", [])]
                missing = report.get("missing") or {}
                if missing:
                    log.warning("isobox worker %d runs without %s", handle.pid, missing)
        except (IsoBoxError, ChannelClosed, ProtocolError, OSError):
            if handle is not None:
                handle.kill("failed to start")
                handle.close()
            with self._lock:
                self._spawning -= 1
                self._backoff.failed()
                self._breaker.record(time.monotonic())
                self._fail_queued_if_looping()
            return
        with self._lock:
            self._spawning -= 1
            closed = self._closed
            if not closed:
                self._handles[handle.pid] = handle
                self._ready.notify_all()
        if closed:  # shutdown began while it started: it never joins the pool
            handle.kill("stopped at shutdown")
            handle.close()
            return
        self._emit("worker:started", {"pid": handle.pid})
        self._offer(handle)
        self._poke()  # watch the new worker's pidfd

    def _current_zygote(self) -> ZygoteClient:
        """The live fork server, restarting a dead one (never once shutdown has begun)."""
        with self._lock:
            if self._closed:
                raise IsoBoxError("the box is shutting down")
            zygote = self._zygote
        if zygote.alive:
            return zygote
        zygote.stop(1.0)
        fresh = ZygoteClient(preload_typescript=self.config.preload_typescript,
                             strict_confinement=self.config.strict_confinement)
        fresh.start()
        with self._lock:
            closed = self._closed
            if not closed:
                self._zygote = fresh
        if closed:
            fresh.stop(1.0)
            raise IsoBoxError("the box is shutting down")
        return fresh

    # -- figures ---------------------------------------------------------------------------
    def snapshot(self) -> tuple[list[dict[str, Any]], int]:
        """Per-worker figures (with a psutil sample each) and the queue length."""
        with self._lock:
            handles = list(self._handles.values())
            queued = len(self._waiters)
        rows = []
        for h in handles:
            sample = stats.sample(h.pid)
            rows.append({"pid": h.pid, "state": h.state, "runs": h.runs, "started_at": h.started_at,
                         "rss": sample.rss if sample else 0, "uss": sample.uss if sample else 0,
                         "cpu_percent": sample.cpu_percent if sample else 0.0,
                         "confinement": list(h.confinement), "prelude": h.prelude})
        return rows, queued


def _loop_time(monotonic_deadline: float) -> float:
    """A ``time.monotonic`` deadline on the running event loop's clock."""
    return asyncio.get_running_loop().time() + max(0.0, monotonic_deadline - time.monotonic())


def _request_frame(rid: int, body: dict[str, Any]) -> bytes:
    """The RUN frame; a request too large for the channel is the caller's SerializationError."""
    try:
        return encode_frame(MsgType.RUN, rid, body)
    except ProtocolError as exc:
        raise SerializationError(f"the request does not fit the channel: {exc}",
                                 path="code") from None


CPU_GRACE = 0.25  # seconds of worker CPU past a run's budget before the watchdog steps in
CPU_POLL = 0.1  # how often it looks once the budget could have been spent


def _cpu_figure(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value >= 0 else None


class CpuWatch:
    """The CPU half of the watchdog. QuickJS polls its interrupt only every so many branches,
    so a loop around slow native calls can overrun the engine's CPU limit by seconds; the
    supervisor reads the worker's CPU time from /proc once the budget could have been spent
    (CPU never runs ahead of wall time) and kills it past the budget plus a grace."""

    __slots__ = ("base", "check_at", "handle", "killed", "limit")

    def __init__(self, handle: WorkerHandle, base: float, limit: float) -> None:
        self.handle, self.base, self.limit = handle, base, limit
        self.check_at = time.monotonic() + limit + CPU_GRACE
        self.killed = False

    @classmethod
    def of(cls, handle: WorkerHandle, body: dict[str, Any]) -> CpuWatch | None:
        """A watch for a run whose baseline is known (not after a stream), else None."""
        # A map chunk's items each have the run's budget: the watch allows their sum.
        limit = body.get("cpu_watch", body.get("cpu_timeout"))
        base = getattr(handle, "run_cpu_base", None)
        if base is None or not isinstance(limit, int | float) or limit <= 0:
            return None
        return cls(handle, base, float(limit))

    def exceeded(self) -> bool:
        """Whether the worker spent more than the budget; else schedules the next look."""
        used = self.handle.cpu_seconds()
        if used is not None and used - self.base > self.limit + CPU_GRACE:
            return True
        self.check_at = time.monotonic() + CPU_POLL
        return False

    def over_budget(self) -> bool:
        """Whether the worker already spent the whole budget (asked at the wall deadline)."""
        used = self.handle.cpu_seconds()
        return used is not None and used - self.base > self.limit

    def schedule(self, loop: asyncio.AbstractEventLoop) -> _Rearm:
        """The asyncio form: a timer on ``loop`` (no task per run) that looks when the budget
        could be spent and kills the worker past it (the reader then sees its channel
        close). Cancel the returned handle when the run ends."""
        rearm = _Rearm()

        def look() -> None:
            if self.exceeded():
                self.killed = True
                self.handle.kill("killed by the watchdog past the run's CPU budget")
            else:
                rearm.timer = loop.call_later(max(0.0, self.check_at - time.monotonic()), look)

        rearm.timer = loop.call_later(max(0.0, self.check_at - time.monotonic()), look)
        return rearm


class _Rearm:
    """The current timer of a :meth:`CpuWatch.schedule` (it re-arms itself)."""

    __slots__ = ("timer",)

    def __init__(self) -> None:
        self.timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def read_reply(frame: Frame, request_id: int, on_output: OnOutput | None) -> dict[str, Any] | None:
    """Sans-IO step of a run: OUTPUT goes to ``on_output``; RESULT ends the run."""
    if frame.request_id != request_id:
        raise ProtocolError(f"reply for request {frame.request_id}, expected {request_id}")
    if frame.type is MsgType.OUTPUT:
        lines = _console_lines(frame.body.get("console"), "OUTPUT")
        if on_output is not None:
            on_output(lines)
        return None
    if frame.type is MsgType.RESULT:
        return _checked_result(frame.body)
    raise ProtocolError(f"unexpected {frame.type.name} frame during a run")


_KINDS = frozenset("RECSMXTW")  # the outcomes a worker reports (README, "Errors")
_RECORD_KINDS = frozenset("ECS")  # ... whose payload is a JSON error record


def _checked_result(body: dict[str, Any]) -> dict[str, Any]:
    """A RESULT body a worker sent, checked for what the API relies on: a known kind, string
    payload, numeric figures, console pairs, and a JSON object as an error record. (A value's
    JSON is checked when it is decoded.)"""
    kind, payload = body.get("kind"), body.get("payload", "")
    if not isinstance(kind, str) or kind not in _KINDS or not isinstance(payload, str):
        raise ProtocolError(f"malformed RESULT frame: kind {kind!r}")
    for key, types in (("cpu_time", (int, float)), ("memory", (int,)), ("cpu_total", (int, float))):
        value = body.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, types):
            raise ProtocolError(f"malformed RESULT frame: {key}")
    if not isinstance(body.get("files", {}), dict) or not isinstance(body.get("violations", []),
                                                                     list):
        raise ProtocolError("malformed RESULT frame: files or violations")
    if kind in _RECORD_KINDS:
        try:
            record = json.loads(payload)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ProtocolError("malformed RESULT frame: the error record is not an object")
    elif kind == "R" and "\n" not in payload:
        raise ProtocolError("malformed RESULT frame: a value without its type")
    outcomes = body.get("outcomes")
    if outcomes is not None and not (isinstance(outcomes, list) and all(
            isinstance(o, list) and len(o) == 2 and isinstance(o[0], str) and o[0] in _KINDS
            and isinstance(o[1], str) for o in outcomes)):
        raise ProtocolError("malformed RESULT frame: map outcomes")
    body["console"] = _console_lines(body.get("console", []), "RESULT")
    return body


def _console_lines(lines: Any, what: str) -> list[tuple[str, str]]:
    """A frame's console lines, checked: a list of ``[kind, message]`` string pairs."""
    if not isinstance(lines, list) or not all(
            isinstance(line, list) and len(line) == 2
            and isinstance(line[0], str) and isinstance(line[1], str) for line in lines):
        raise ProtocolError(f"malformed {what} frame: console lines must be [kind, message]")
    return [(k, m) for k, m in lines]


def caller(host: HostCaller | None, deadline: float) -> Callable[[str, str], str] | None:
    """How a sync run answers a host call: on a helper thread, given up at ``deadline`` (so
    a host function that blocks cannot hold up the watchdog)."""
    if host is None:
        return None
    return lambda name, args: host.call_until(name, args, deadline)


def parse_call(frame: Frame, request_id: int) -> tuple[int, str, str]:
    """Sans-IO check of a worker's CALL: ``(cid, name, args)``; a bad one kills the channel."""
    if frame.request_id != request_id:
        raise ProtocolError(f"call for request {frame.request_id}, expected {request_id}")
    cid, name, args = frame.body.get("cid"), frame.body.get("name"), frame.body.get("args")
    if type(cid) is not int or not isinstance(name, str) or not isinstance(args, str):
        raise ProtocolError("malformed CALL frame")
    return cid, name, args


_NO_HOST = 'e{"message": "no host functions are available in this run"}'


def reply_frame(request_id: int, cid: int, reply: str) -> bytes:
    """The REPLY frame; a reply too large for the channel becomes an error the script sees
    (it is the host's result that is too big, not the worker that misbehaved)."""
    try:
        return encode_frame(MsgType.REPLY, request_id, {"cid": cid, "reply": reply})
    except ProtocolError:
        message = f"the host function's result of {len(reply)} characters does not fit the channel"
        return encode_frame(MsgType.REPLY, request_id,
                            {"cid": cid, "reply": "e" + json.dumps({"message": message})})


def answer_call(frame: Frame, request_id: int, call: Callable[[str, str], str] | None) -> bytes:
    """The REPLY frame for a worker's CALL, computed by ``call`` on this thread."""
    cid, name, args = parse_call(frame, request_id)
    reply = call(name, args) if call is not None else _NO_HOST
    return reply_frame(request_id, cid, reply)


class AsyncCalls:
    """Host calls of one async run or stream: sync ones are answered in order; async ones run
    as tasks so a script's ``Promise.all`` over host calls overlaps them. Replies share one
    send lock, and a reply is never cut off mid-frame: :meth:`close` stops the calls still
    computing but waits for a reply being sent (a torn frame would poison the next request)."""

    def __init__(self, handle: WorkerHandle, rid: int, host: HostCaller | None) -> None:
        self.handle = handle
        self.rid = rid
        self.host = host
        self.tasks: set[asyncio.Task[None]] = set()
        self.sending: set[asyncio.Task[Any] | None] = set()
        self.lock = asyncio.Lock()
        self.closed = False

    async def start(self, frame: Frame) -> None:
        cid, name, args = parse_call(frame, self.rid)
        if frame.body.get("sync", True):
            await self._answer(cid, name, args)
            return
        task = asyncio.get_running_loop().create_task(self._answer(cid, name, args))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, cid: int, name: str, args: str) -> None:
        try:
            reply = await self.host.acall(name, args) if self.host is not None else _NO_HOST
        except Exception as exc:  # acall never raises for the function's own errors
            failure = f"host function {name} failed ({type(exc).__name__})"
            reply = "e" + json.dumps({"message": failure})
        answer = reply_frame(self.rid, cid, reply)
        async with self.lock:
            if self.closed:
                return  # the run is over: the worker would drop this reply anyway
            task = asyncio.current_task()
            self.sending.add(task)  # from here on, close() waits for it instead of cancelling
            try:
                with contextlib.suppress(ChannelClosed, OSError):
                    await self.handle.asend(answer)
            finally:
                self.sending.discard(task)

    def abort(self) -> None:
        """The worker is being killed: stop every call still computing."""
        self.closed = True
        for task in self.tasks:
            if task not in self.sending:
                task.cancel()

    async def close(self) -> None:
        """End of the run: stop the calls still computing; let a reply being sent finish."""
        self.closed = True
        sending = [t for t in self.tasks if t in self.sending]
        for task in self.tasks:
            if task not in self.sending:
                task.cancel()
        if sending:
            await asyncio.wait(sending, timeout=5.0)
