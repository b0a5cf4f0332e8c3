"""Supervisor side of the fork server: start it, ask it for workers, hear about their exits.

::

    Pool ──spawn()──▶ ZygoteClient ──SPAWN+fd──▶ fork server ──fork──▶ worker
                      reader thread ◀──SPAWNED+pidfd / EXITED{pid,status}──

One reader thread per client owns the receiving side of the control socket; ``spawn`` may be
called from any thread. Exit statuses are kept (bounded) so the pool can classify a death after
it saw the worker's channel close. Stopping closes the control socket: the fork server kills its
workers and exits, and is reaped here with SIGTERM/SIGKILL escalation.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from isobox.errors import IsoBoxError
from isobox.protocol import FrameDecoder, MsgType, ProtocolError, encode_frame

__all__ = ["SpawnedWorker", "ZygoteClient", "signal_worker"]

_MAX_EXITS = 4096
_SOCKET_BUFFER = 4 * 2**20


class SpawnedWorker:
    """A freshly forked worker: its pid, a pidfd for race-free signals, and its channel."""

    __slots__ = ("channel", "pid", "pidfd")

    def __init__(self, pid: int, pidfd: int, channel: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.channel = channel


class ZygoteClient:
    """Owns one fork server process."""

    def __init__(self, on_exit: Callable[[int, int], None] | None = None, *,
                 preload_typescript: bool = False, strict_confinement: bool = True) -> None:
        self._on_exit = on_exit
        self._preload_typescript = preload_typescript
        self._strict_confinement = strict_confinement
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._spawned: dict[int, tuple[int, int]] = {}
        self._abandoned: set[int] = set()
        self._exits: OrderedDict[int, int] = OrderedDict()
        self._ids = itertools.count(1)
        self._reader: threading.Thread | None = None
        self.alive = False

    @property
    def pid(self) -> int | None:
        """The fork server's pid, while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 60.0) -> None:
        """Start the fork server and wait until it has preloaded the engine."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "isobox.workers.forkserver", str(child.fileno())]
        if self._preload_typescript:
            cmd.append("--typescript")
        if not self._strict_confinement:
            cmd.append("--best-effort")
        # The fork server (and so every worker's initial environment block, which stays
        # readable in /proc/PID/environ even after os.environ.clear()) gets no environment
        # beyond what Python needs to find isobox.
        env = {k: os.environ[k] for k in ("PYTHONPATH", "ISOBOX_BYTECODE") if k in os.environ}
        self._proc = subprocess.Popen(
            cmd, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, start_new_session=True, env=env,
        )
        child.close()
        parent.settimeout(timeout)
        try:
            msg, _fds, _f, _a = socket.recv_fds(parent, 4096, 1)
            frames = FrameDecoder(max_frame=4096).feed(msg) if msg else []
        except (OSError, ProtocolError) as exc:
            parent.close()  # EOF tells the fork server to exit, so the reap below is quick
            self._kill_proc(1.0)
            raise IsoBoxError(f"the fork server did not start: {exc}") from exc
        if not frames or frames[0].type is not MsgType.READY:
            parent.close()
            self._kill_proc(1.0)
            raise IsoBoxError("the fork server did not start (no READY)")
        parent.settimeout(None)
        self._ctl = parent
        self.alive = True
        self._reader = threading.Thread(target=self._read_loop, name="isobox-zygote", daemon=True)
        self._reader.start()

    def spawn(self, timeout: float = 10.0) -> SpawnedWorker:
        """Fork one worker; returns before it is READY (the caller waits for that)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):  # big values cross in fewer wakeups
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        rid = next(self._ids)
        try:
            with self._send_lock:
                if not self.alive or self._ctl is None:
                    raise IsoBoxError("the fork server is not running")
                frame = encode_frame(MsgType.SPAWN, rid, {})
                socket.send_fds(self._ctl, [frame], [theirs.fileno()])
        except OSError as exc:
            ours.close()
            raise IsoBoxError(f"the fork server did not take the request: {exc}") from exc
        finally:
            theirs.close()
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._spawned:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    ours.close()
                    self._abandoned.add(rid)  # a late SPAWNED reply's pidfd gets closed
                    raise IsoBoxError("the fork server did not fork a worker in time")
                self._cond.wait(left)
            pid, pidfd = self._spawned.pop(rid)
        return SpawnedWorker(pid, pidfd, ours)

    def exit_status(self, pid: int, timeout: float) -> int | None:
        """The raw wait status of ``pid`` once the fork server reaped it, or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while pid not in self._exits:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return self._exits.get(pid)
                self._cond.wait(left)
            return self._exits[pid]

    def _read_loop(self) -> None:
        ctl = self._ctl  # stop() sets the attribute to None; the local keeps the socket object
        if ctl is None:
            return
        decoder = FrameDecoder(max_frame=4096)
        try:
            while True:
                msg, fds, _f, _a = socket.recv_fds(ctl, 4096, 1)
                if not msg:
                    break
                for frame in decoder.feed(msg):
                    self._dispatch(frame.type, frame.request_id, frame.body, fds)
        except (OSError, ProtocolError):
            pass
        finally:
            with self._cond:
                self.alive = False
                self._cond.notify_all()

    def _dispatch(self, kind: MsgType, rid: int, body: dict[str, object], fds: list[int]) -> None:
        pid = body.get("pid")
        if not isinstance(pid, int):
            for fd in fds:
                os.close(fd)
            return
        if kind is MsgType.SPAWNED and fds:
            with self._cond:
                if rid in self._abandoned:
                    self._abandoned.discard(rid)
                    os.close(fds[0])  # nobody waits; the worker exits at its channel's EOF
                    return
                self._spawned[rid] = (pid, fds[0])
                self._cond.notify_all()
        elif kind is MsgType.EXITED:
            status = body.get("status")
            if isinstance(status, int):
                with self._cond:
                    self._exits[pid] = status
                    while len(self._exits) > _MAX_EXITS:
                        self._exits.popitem(last=False)
                    self._cond.notify_all()
                if self._on_exit is not None:
                    self._on_exit(pid, status)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the control socket; the fork server kills its workers and exits; reap it."""
        with self._send_lock:
            if self._ctl is not None:
                with contextlib.suppress(OSError):
                    self._ctl.shutdown(socket.SHUT_RDWR)
                self._ctl.close()
                self._ctl = None
        self._kill_proc(timeout)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)
        with self._cond:
            for _pid, pidfd in self._spawned.values():
                os.close(pidfd)
            self._spawned.clear()

    def _kill_proc(self, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(1.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.alive = False


def signal_worker(pidfd: int, sig: int) -> None:
    """Send ``sig`` through a pidfd (no pid-reuse race); a gone process is not an error."""
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, sig)
