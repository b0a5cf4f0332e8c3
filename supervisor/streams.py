"""The supervisor's side of one stream: batches in, credit out, cancel on early exit.

::

    consumer ── next_batch() ──▶ ITEMS* / OUTPUT* / CALL* ... RESULT   (from the worker)
             ── consumed(n) ───▶ CREDIT n  (every quarter window)     (to the worker)
             ── close() ───────▶ CANCEL, then RESULT within a grace, else SIGKILL

Flow control is by credit: the worker starts with ``window`` and sends at most that many values
that the consumer has not taken, so a slow consumer pauses an infinite producer. Sync and async
twins share every decision (:meth:`PoolStream._on_frame`); they differ only in how they wait.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from isobox import values
from isobox.errors import TimeoutError
from isobox.protocol import Frame, MsgType, ProtocolError, encode_frame
from isobox.supervisor.handle import ChannelClosed, WorkerHandle
from isobox.supervisor.pool import (
    AsyncCalls,
    HostCaller,
    OnOutput,
    answer_call,
    caller,
    read_reply,
)

if TYPE_CHECKING:
    from isobox.supervisor.pool import Pool

__all__ = ["PoolStream", "open_stream", "open_stream_async"]

CANCEL_GRACE = 0.5  # how long close() waits for return() to run before killing the worker


class PoolStream:
    """One stream running on ``handle`` (already sent); owned by one consumer."""

    def __init__(self, pool: Pool, handle: WorkerHandle, rid: int, *, kill_at: float,
                 on_output: OnOutput | None, host: HostCaller | None, window: int,
                 idle_timeout: float | None) -> None:
        self.pool = pool
        self.handle: WorkerHandle | None = handle
        self.rid = rid
        self.kill_at = kill_at
        self.on_output = on_output
        self.host = host
        self.window = window
        self.idle_timeout = idle_timeout
        self.batches: deque[tuple[list[Any], int]] = deque()
        self.result: dict[str, Any] | None = None
        self.unacked = 0
        self.granted_total = 0  # credit returned to the worker beyond the first window
        self.received = 0  # values received from the worker so far (flow-control figure)
        self.pid = handle.pid
        self.worker = handle  # kept after the stream ends (sessions need to know which)
        self.calls: AsyncCalls | None = None  # async twin only: host calls as tasks

    # -- shared decisions ------------------------------------------------------------------
    def _on_frame(self, frame: Frame) -> Frame | None:
        """Take one frame; returns it if it is a host call to answer."""
        if frame.type is MsgType.ITEMS:
            if frame.request_id != self.rid:
                raise ProtocolError("ITEMS for another request")
            items, count = frame.body.get("items"), frame.body.get("n")
            if not isinstance(items, str) or type(count) is not int or count < 0:
                raise ProtocolError("malformed ITEMS frame")
            self.received += count
            if self.received > self._granted():
                raise ProtocolError("the worker sent values beyond its credit")
            try:  # SerializationError (a value nested too deeply) is the script's, and passes
                batch = values.decode(items, what=f"stream[{self.received - count}]")
            except ValueError:
                raise ProtocolError("ITEMS frame with malformed values") from None
            if not isinstance(batch, list) or len(batch) != count:
                raise ProtocolError("ITEMS frame whose values do not match its count")
            self.batches.append((batch, count))
            return None
        if frame.type is MsgType.CALL:
            return frame
        reply = read_reply(frame, self.rid, self.on_output)
        if reply is not None:
            self.result = reply
        return None

    def _answer(self, frame: Frame, deadline: float) -> None:
        """Sync twin: answer a host call (on the helper pool, given up at the deadline)."""
        if self.handle is not None:
            self.handle.send(answer_call(frame, self.rid, caller(self.host, self.kill_at)),
                             deadline)

    async def _aanswer(self, frame: Frame) -> None:
        """Async twin: answer a host call without blocking the event loop."""
        if self.handle is None:
            return
        if self.calls is None:
            self.calls = AsyncCalls(self.handle, self.rid, self.host)
        await self.calls.start(frame)

    async def _aclose_calls(self) -> None:
        if self.calls is not None:
            await self.calls.close()

    def _granted(self) -> int:
        return self.window + self.granted_total

    def _ended(self, reply: dict[str, Any]) -> None:
        self.result = reply
        handle, self.handle = self.handle, None
        if handle is not None:
            self.pool._finish(handle, reply)

    def _deadline(self) -> tuple[float, bool]:
        """When to stop waiting for the next frame, and whether that is the idle bound."""
        if self.idle_timeout is None:
            return self.kill_at, False
        idle = time.monotonic() + self.idle_timeout
        return (idle, True) if idle < self.kill_at else (self.kill_at, False)

    def _credit_frame(self, n: int) -> bytes | None:
        self.unacked += n
        if self.result is not None or self.unacked < max(1, self.window // 4):
            return None
        grant, self.unacked = self.unacked, 0
        self.granted_total += grant
        return encode_frame(MsgType.CREDIT, self.rid, {"n": grant})

    def _timeout(self, idle: bool) -> TimeoutError:
        if self.calls is not None:
            self.calls.abort()
        handle, self.handle = self.handle, None
        if handle is None:
            return TimeoutError("the stream timed out", kind="wall")
        if idle:
            self.pool._kill_and_drop(handle, "stream idle timeout")
            error = TimeoutError(f"no stream value within idle_timeout={self.idle_timeout}s",
                                 kind="wall", limit=self.idle_timeout or 0.0)
            error.worker_pid = handle.pid
            return error
        return self.pool._wall_timeout(handle)

    def _lost(self, exc: ChannelClosed | ProtocolError) -> Exception:
        if self.calls is not None:
            self.calls.abort()
        handle, self.handle = self.handle, None
        if handle is None:
            return exc
        return self.pool._lost(handle, exc)

    def _abandon(self, reason: str) -> None:
        if self.calls is not None:
            self.calls.abort()
        handle, self.handle = self.handle, None
        if handle is not None:
            self.pool._kill_and_drop(handle, reason)

    # -- sync ------------------------------------------------------------------------------
    def next_batch(self) -> tuple[list[Any], int] | None:
        """The next batch of values (decoded, and their count); None once the stream ended."""
        while not self.batches:
            handle = self.handle
            if self.result is not None or handle is None:
                return None
            deadline, idle = self._deadline()
            try:
                frame = handle.recv(deadline)
                call = self._on_frame(frame) if frame is not None else None
                if call is not None:
                    self._answer(call, self.kill_at)
            except (ChannelClosed, ProtocolError) as exc:
                raise self._lost(exc) from None
            except builtins.TimeoutError:  # a host call or a send ran past the deadline
                raise self._timeout(False) from None
            if frame is None:
                raise self._timeout(idle)
            if self.result is not None:
                self._ended(self.result)
        return self.batches.popleft()

    def consumed(self, n: int) -> None:
        """The consumer took ``n`` values: return credit to the worker now and then."""
        frame = self._credit_frame(n)
        if frame is not None and self.handle is not None:
            # A failure here shows up at the next read, as the death or the timeout.
            with contextlib.suppress(ChannelClosed, builtins.TimeoutError):
                self.handle.send(frame, self.kill_at)

    def close(self) -> None:
        """Leave early: CANCEL, let ``return()`` run, release the worker (kill it if slow)."""
        handle = self.handle
        if handle is None or self.result is not None:
            return
        end = min(self.kill_at, time.monotonic() + CANCEL_GRACE)
        try:
            handle.send(encode_frame(MsgType.CANCEL, self.rid, {}), end)
            while self.result is None:
                frame = handle.recv(end)
                if frame is None:
                    break
                call = self._on_frame(frame)
                if call is not None:
                    self._answer(call, end)
        except (ChannelClosed, ProtocolError, builtins.TimeoutError, OSError):
            pass
        except BaseException:
            self._abandon("the stream was interrupted while closing")
            raise
        if self.result is None:
            self._abandon("the stream did not stop within its cancel grace")
        else:
            self._ended(self.result)

    # -- async -----------------------------------------------------------------------------
    async def anext_batch(self) -> tuple[list[Any], int] | None:
        """The asyncio twin of :meth:`next_batch`."""
        while not self.batches:
            handle = self.handle
            if self.result is not None or handle is None:
                return None
            deadline, idle = self._deadline()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    frame = await handle.arecv()
                    call = self._on_frame(frame)
                    if call is not None:
                        await self._aanswer(call)
                if self.result is not None:
                    await self._aclose_calls()
                    self._ended(self.result)
            except builtins.TimeoutError:
                raise self._timeout(idle) from None
            except (ChannelClosed, ProtocolError) as exc:
                raise self._lost(exc) from None
            except asyncio.CancelledError:
                raise  # the consumer's aclose() then sends CANCEL, so return() runs
            except BaseException:
                self._abandon("the stream was interrupted")
                raise
        return self.batches.popleft()

    async def aconsumed(self, n: int) -> None:
        """The asyncio twin of :meth:`consumed`."""
        frame = self._credit_frame(n)
        if frame is not None and self.handle is not None:
            with contextlib.suppress(ChannelClosed, OSError):
                await self.handle.asend(frame)

    async def aclose(self) -> None:
        """The asyncio twin of :meth:`close`."""
        handle = self.handle
        if handle is None or self.result is not None:
            return
        try:
            async with asyncio.timeout(max(0.0, min(self.kill_at - time.monotonic(),
                                                    CANCEL_GRACE))):
                await handle.asend(encode_frame(MsgType.CANCEL, self.rid, {}))
                while self.result is None:
                    call = self._on_frame(await handle.arecv())
                    if call is not None:
                        await self._aanswer(call)
                await self._aclose_calls()
        except (ChannelClosed, ProtocolError, builtins.TimeoutError, OSError):
            pass
        except BaseException:
            self._abandon("the stream was cancelled while closing")
            raise
        if self.result is None:
            self._abandon("the stream did not stop within its cancel grace")
        else:
            self._ended(self.result)


def open_stream(pool: Pool, body: dict[str, Any], *, deadline: float, kill_at: float,
                on_output: OnOutput | None, host: HostCaller | None,
                want: WorkerHandle | None, window: int, idle_timeout: float | None
                ) -> PoolStream:
    """Send a stream request to a worker (``want``: a session's) from this thread."""
    handle, rid = pool.send_request({**body, "op": "stream", "window": window},
                                    deadline=deadline, kill_at=kill_at, want=want,
                                    what="stream", retry=False)
    return PoolStream(pool, handle, rid, kill_at=kill_at, on_output=on_output, host=host,
                      window=window, idle_timeout=idle_timeout)


async def open_stream_async(pool: Pool, body: dict[str, Any], *, deadline: float,
                            kill_at: float, on_output: OnOutput | None,
                            host: HostCaller | None, want: WorkerHandle | None, window: int,
                            idle_timeout: float | None) -> PoolStream:
    """The asyncio twin of :func:`open_stream`."""
    handle, rid = await pool.asend_request({**body, "op": "stream", "window": window},
                                           deadline=deadline, kill_at=kill_at, want=want,
                                           what="stream", retry=False)
    return PoolStream(pool, handle, rid, kill_at=kill_at, on_output=on_output, host=host,
                      window=window, idle_timeout=idle_timeout)
