"""One worker as the supervisor sees it: its channel, pidfd, state and counters.

The channel socket is non-blocking. The sync path waits with ``poll`` against a monotonic
deadline (that deadline is the wall-clock watchdog: past it the caller SIGKILLs the worker);
the async path uses the event loop's ``sock_recv``/``sock_sendall``. A handle is used by one
run at a time (the pool guarantees it), so the two paths never share a socket concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import time
from collections import deque

from isobox.protocol import Frame, FrameDecoder
from isobox.supervisor.health import WorkerHealth
from isobox.supervisor.zygote import SpawnedWorker, ZygoteClient, signal_worker

__all__ = ["ChannelClosed", "WorkerHandle"]

_RECV = 1 << 20  # one reusable buffer per worker: big values in few reads, no per-read allocation


class ChannelClosed(Exception):
    """The worker's end of the channel is gone (it exited or was killed)."""


_TICKS = os.sysconf("SC_CLK_TCK")


class WorkerHandle:
    """Supervisor-side state of one worker process."""

    def __init__(self, spawned: SpawnedWorker, max_runs: int | None,
                 origin: ZygoteClient) -> None:
        self.pid = spawned.pid
        self.pidfd = spawned.pidfd
        self.sock = spawned.channel
        self.sock.setblocking(False)
        self.decoder = FrameDecoder()
        self.state = "starting"
        self.runs = 0
        self.max_runs = max_runs
        self.origin = origin  # the fork server that forked it, and so knows its exit status
        self.started_at = time.time()
        self.last_used = time.monotonic()
        self.kill_reason = ""
        self.exited = False  # set by the maintainer once the pidfd reports the process gone
        self.sessions: set[str] = set()  # sessions whose live context this worker holds
        self.drops: deque[str] = deque()  # sessions to free with the next request
        self.confinement: list[str] = []  # the confinement layers the worker applied
        self.prelude = ""  # how the worker loads the trusted JS: "bytecode" or "source"
        self.health: WorkerHealth | None = None  # heartbeats and RSS trend (set by the pool)
        self.retire_after = ""  # why to recycle it once its current run ends ("" = healthy)
        # The worker's CPU seconds when it last replied (None: unknown, as after a stream):
        # the baseline of the next run's CPU watchdog.
        self.cpu_mark: float | None = None
        self.run_cpu_base: float | None = None  # the current run's baseline
        self._frames: deque[Frame] = deque()
        self._buf = bytearray(_RECV)
        self._pollers: dict[int, select.poll] = {}
        self._view = memoryview(self._buf)
        self._closed = False

    def cpu_seconds(self) -> float | None:
        """The worker's CPU time so far (user + system), from /proc; None if it is gone."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15)

    def fileno(self) -> int:
        """The channel's fd (for the maintainer's liveness poll)."""
        return self.sock.fileno()

    # -- sync IO ---------------------------------------------------------------------------
    def send(self, data: bytes, deadline: float) -> None:
        """Write a whole frame, waiting for buffer space up to ``deadline``."""
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                if not self._wait(select.POLLOUT, deadline):
                    raise TimeoutError("channel send timed out") from None
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosed(str(exc)) from exc
            view = view[sent:]

    def recv(self, deadline: float) -> Frame | None:
        """The next frame, or None when ``deadline`` passes first."""
        while not self._frames:
            if not self._wait(select.POLLIN, deadline):
                return None
            self._read_some()
        return self._frames.popleft()

    def _wait(self, events: int, deadline: float) -> bool:
        poller = self._pollers.get(events)
        if poller is None:
            poller = self._pollers[events] = select.poll()
            poller.register(self.sock, events)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller.poll(left * 1000):
                return True

    def _read_some(self) -> None:
        try:
            size = self.sock.recv_into(self._buf)
        except BlockingIOError:
            return
        except OSError as exc:  # reset, or a socket closed under us at shutdown
            raise ChannelClosed(str(exc)) from exc
        if not size:
            raise ChannelClosed("EOF")
        self._frames.extend(self.decoder.feed(self._view[:size]))

    # -- async IO --------------------------------------------------------------------------
    def try_send(self, data: bytes) -> int:
        """Send what the socket takes now without waiting (a request frame usually fits
        whole); returns how many bytes went."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChannelClosed(str(exc)) from exc

    async def asend(self, data: bytes) -> None:
        """Write a whole frame from the event loop."""
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self.sock, data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChannelClosed(str(exc)) from exc

    async def arecv(self) -> Frame:
        """The next frame, from the event loop (the caller bounds it with a timeout)."""
        loop = asyncio.get_running_loop()
        while not self._frames:
            try:
                size = await loop.sock_recv_into(self.sock, self._buf)
            except ConnectionResetError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not size:
                raise ChannelClosed("EOF")
            self._frames.extend(self.decoder.feed(self._view[:size]))
        return self._frames.popleft()

    # -- lifecycle -------------------------------------------------------------------------
    def alive(self) -> bool:
        """Whether the process still runs (its pidfd turns readable when it exits)."""
        if self.exited or self._closed:
            return False
        try:
            ready = select.select([self.pidfd], [], [], 0)[0]
        except (OSError, ValueError):
            return False
        return not ready

    def kill(self, reason: str, sig: int = signal.SIGKILL) -> None:
        """Signal the worker through its pidfd, remembering why (for classification)."""
        if not self.kill_reason:
            self.kill_reason = reason
        signal_worker(self.pidfd, sig)

    def close(self) -> None:
        """Release the channel and the pidfd (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
