"""Remote mode: the client side of a connection to an ``isobox-supervisor`` daemon.

One :class:`RemoteClient` per box holds one connection; many threads share it. Each request
gets an id; a reader thread hands every frame to the queue of the request it belongs to, so
concurrent runs never wait for each other's replies. Host functions are called back here, in
the thread that made the run. If the connection drops, every request in flight fails with
:class:`DaemonError` (the daemon cancels their work) and the next request reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from isobox import values
from isobox.errors import DaemonError, TimeoutError, error_from_dict
from isobox.protocol import Frame, FrameDecoder, MsgType, ProtocolError, encode_frame

__all__ = ["Cancellable", "RemoteClient", "parse_address"]

OnOutput = Callable[[list[tuple[str, str]]], None]
_GONE = object()  # put in every waiting queue when the connection drops
_ABANDONED = object()  # put in a request's queue when its caller gave up
_T = TypeVar("_T")
_CANCEL_WAIT = 2.0  # how long a cancelled caller waits for its thread to give up


class _Tickets:
    """The daemon requests in flight that a thread made for an asyncio caller, and whether
    that caller gave up (then the thread may start no more)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the caller's loop thread and the worker thread
        self.ids: list[int] = []
        self.cancelled = False


_TICKETS: contextvars.ContextVar[_Tickets | None] = contextvars.ContextVar(
    "isobox_remote_tickets", default=None)


def _issued(rid: int) -> None:
    """Before request ``rid`` is sent: note it, or refuse it if the caller gave up."""
    tickets = _TICKETS.get()
    if tickets is not None:
        with tickets.lock:
            if tickets.cancelled:
                raise DaemonError("the request was cancelled")
            tickets.ids.append(rid)


def _settled(rid: int) -> None:
    tickets = _TICKETS.get()
    if tickets is not None:
        with tickets.lock, contextlib.suppress(ValueError):
            tickets.ids.remove(rid)


class Cancellable:
    """Blocking remote calls made on a thread for an asyncio caller, cancellable: if the task
    awaiting one is cancelled, every daemon request the calls made is abandoned (CANCEL, so the
    daemon stops its work, and the waiting thread returns at once), and the thread is given a
    moment to finish before the cancellation goes on, so it never keeps a request running."""

    def __init__(self, remote: RemoteClient) -> None:
        self._remote = remote
        self._tickets = _Tickets()
        self._context = contextvars.copy_context()  # the calls run in it: they see the tickets
        self._context.run(_TICKETS.set, self._tickets)

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` on a thread (one call at a time per instance)."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, functools.partial(self._context.run, fn, *args,
                                                            **kwargs))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            self.abandon()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(work, _CANCEL_WAIT)
            raise

    def abandon(self) -> None:
        """Give up every request the calls made and still wait for (answered ones are not
        affected); a call that had not sent its request yet will not send it."""
        with self._tickets.lock:
            self._tickets.cancelled = True
            ids, self._tickets.ids = self._tickets.ids, []
        for rid in ids:
            self._remote.abandon(rid)


@dataclass(frozen=True, slots=True)
class Address:
    """Where the daemon listens: a Unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.path else f"tcp://{self.host}:{self.port}"


def parse_address(address: str) -> Address:
    """``unix:///path/to.sock`` or ``tcp://host:port``; anything else is a ValueError."""
    if not isinstance(address, str):
        raise TypeError(f"address must be str, not {type(address).__name__}")
    parts = urlsplit(address)
    if parts.scheme == "unix" and parts.path:
        return Address(path=parts.path)
    if parts.scheme == "tcp" and parts.hostname and parts.port:
        return Address(host=parts.hostname, port=parts.port)
    raise ValueError(f"address must be unix:///path or tcp://host:port, got {address!r}")


class RemoteClient:
    """A thread-safe connection to the daemon, re-established on demand."""

    def __init__(self, address: str, token: str | None = None,
                 connect_timeout: float = 5.0, scope: str | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.address = parse_address(address)
        if token is not None and not isinstance(token, str):
            raise TypeError("token must be str")
        if self.address.host is not None and not token:
            raise ValueError("a TCP address needs a token (token=...)")
        self.token = token
        self.connect_timeout = connect_timeout
        if scope is not None and (not isinstance(scope, str) or not 0 < len(scope) <= 256):
            raise ValueError("session_scope must be a non-empty str of at most 256 characters")
        # Sessions in the daemon are scoped by this: random unless the caller shares one.
        self.scope = scope or secrets.token_hex(16)
        self.on_event = on_event
        self._lock = threading.Lock()  # connection state and sending
        self._sock: socket.socket | None = None
        self._waiting: dict[int, queue.SimpleQueue[Any]] = {}
        self._owner: dict[int, socket.socket] = {}  # the connection each request went out on
        self._rids = itertools.count(1)
        self._closed = False
        self.daemon_pid = 0
        self._connect()

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        """Connect and say HELLO (under ``_lock`` or from ``__init__``)."""
        if self._closed:
            raise DaemonError("the connection to the daemon was closed")
        try:
            if self.address.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                sock.connect(self.address.path)
            else:
                sock = socket.create_connection((self.address.host, self.address.port),
                                                timeout=self.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise DaemonError(f"cannot reach the daemon at {self.address}: {exc}") from None
        decoder = FrameDecoder()
        try:
            sock.sendall(encode_frame(MsgType.HELLO, 0, {"token": self.token or "",
                                                          "scope": self.scope}))
            welcome, early = _handshake(sock, decoder)
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise DaemonError(f"the daemon at {self.address} did not answer: {exc}") from None
        if welcome is None or welcome.type is not MsgType.WELCOME:
            sock.close()
            error = welcome.body.get("error") if welcome is not None else None
            if isinstance(error, dict):
                raise DaemonError(str(error.get("message", "refused")))
            raise DaemonError(f"the daemon at {self.address} refused the connection")
        self.daemon_pid = int(welcome.body.get("pid", 0))
        for frame in early:  # events that came in the same read as WELCOME
            if frame.type is MsgType.EVENT:
                self._event(frame)
        sock.settimeout(None)
        self._sock = sock
        threading.Thread(target=self._reader, args=(sock, decoder), daemon=True,
                         name="isobox-remote").start()
        return sock

    def _reader(self, sock: socket.socket, decoder: FrameDecoder) -> None:
        """Hand each frame to the request it belongs to; on EOF or a bad frame, fail them all."""
        try:
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    break
                for frame in decoder.feed(data):
                    if frame.type is MsgType.EVENT:
                        self._event(frame)
                        continue
                    waiter = self._waiting.get(frame.request_id)
                    if waiter is not None:
                        waiter.put(frame)
        except (OSError, ProtocolError):
            pass
        with self._lock:
            if self._sock is sock:
                self._sock = None
            gone = [w for rid, w in list(self._waiting.items()) if self._owner.get(rid) is sock]
        sock.close()
        for waiter in gone:
            waiter.put(_GONE)

    def _event(self, frame: Frame) -> None:
        name, payload = frame.body.get("name"), frame.body.get("payload")
        if self.on_event is not None and isinstance(name, str) and isinstance(payload, dict):
            with contextlib.suppress(Exception):  # a handler's failure is not the link's
                self.on_event(name, payload)

    def _send(self, msg: MsgType, rid: int, body: dict[str, Any]) -> None:
        frame = encode_frame(msg, rid, body)
        with self._lock:
            sock = self._sock or self._connect()
            if msg in (MsgType.RUN, MsgType.STATS, MsgType.API):
                self._owner[rid] = sock
            try:
                sock.sendall(frame)
            except OSError as exc:
                raise DaemonError(f"the connection to the daemon was lost: {exc}") from None

    def close(self) -> None:
        """Close the connection; requests in flight fail with DaemonError."""
        with self._lock:
            self._closed = True
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)

    # -- requests --------------------------------------------------------------------------
    def request(self, msg: MsgType, body: dict[str, Any], *, timeout: float,
                on_output: OnOutput | None = None,
                call: Callable[[str, str], str] | None = None) -> dict[str, Any]:
        """Send one request and wait for its RESULT body (an ERROR raises its typed error).
        ``timeout`` bounds the wait; the daemon's own watchdog answers well before it."""
        rid = next(self._rids)
        waiter: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting[rid] = waiter  # first: abandon() must find it once the id is known
        answered = False
        try:
            _issued(rid)
            self._send(msg, rid, body)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    item = waiter.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError("the daemon did not answer in time", kind="wall",
                                       limit=timeout) from None
                frame = self._frame(item, "request")
                if frame.type is MsgType.RESULT:
                    answered = True
                    return frame.body
                if frame.type is MsgType.ERROR:
                    answered = True
                    raise _error(frame)
                if frame.type is MsgType.OUTPUT and on_output is not None:
                    lines = frame.body.get("console", [])
                    on_output([(str(k), str(m)) for k, m in lines])
                elif frame.type is MsgType.CALL:
                    self._answer(rid, frame, call)
        finally:
            if not answered:  # a timeout, an abandon, Ctrl-C: the daemon stops its work
                self._cancel(rid)
            _settled(rid)
            self._waiting.pop(rid, None)
            self._owner.pop(rid, None)

    def _frame(self, item: Any, what: str) -> Frame:
        """What a request's queue held: a frame, or the end of the connection or the request."""
        if item is _GONE:
            raise DaemonError(f"the connection to the daemon at {self.address} was lost during "
                              f"the {what}; the daemon cancels its work")
        if item is _ABANDONED:
            raise DaemonError(f"the {what} was cancelled")
        frame: Frame = item
        return frame

    def _answer(self, rid: int, frame: Frame, call: Callable[[str, str], str] | None) -> None:
        cid, name, args = frame.body.get("cid"), frame.body.get("name"), frame.body.get("args")
        if call is None:
            reply = 'e{"message": "no host functions are available in this run"}'
        else:
            reply = call(str(name), str(args))
        self._send(MsgType.REPLY, rid, {"cid": cid, "reply": reply})

    def abandon(self, rid: int) -> None:
        """Give up request ``rid`` from another thread (its caller was cancelled): the thread
        waiting for it returns at once and cancels it, and so does a short thread of its own
        in case that one is busy (a host function, a large send). Never blocks the caller,
        which may be an event loop."""
        waiter = self._waiting.get(rid)
        if waiter is not None:
            waiter.put(_ABANDONED)
        threading.Thread(target=self._cancel, args=(rid,), daemon=True,
                         name="isobox-cancel").start()

    def _cancel(self, rid: int) -> None:
        """CANCEL request ``rid`` if it went out on the connection still open; never connects
        (on a connection that was lost, the daemon cancelled it already) and never raises."""
        frame = encode_frame(MsgType.CANCEL, rid, {})
        with self._lock:
            sock = self._sock
            if sock is None or self._owner.get(rid) is not sock:
                return
            with contextlib.suppress(OSError):
                sock.sendall(frame)

    def run(self, body: dict[str, Any], *, timeout: float, on_output: OnOutput | None,
            call: Callable[[str, str], str] | None, priority: int = 0
            ) -> tuple[dict[str, Any], int | None]:
        """One run: the worker's RESULT body and the pid of the worker that ran it."""
        frame: dict[str, Any] = {"body": body}
        if priority:
            frame["priority"] = priority
        answer = self.request(MsgType.RUN, frame, timeout=timeout, on_output=on_output,
                              call=call)
        reply = answer.get("reply")
        if not isinstance(reply, dict):
            raise DaemonError("the daemon sent a malformed result")
        pid = answer.get("pid")
        return reply, pid if type(pid) is int else None

    def api(self, body: dict[str, Any], *, timeout: float, on_output: OnOutput | None = None,
            call: Callable[[str, str], str] | None = None) -> Any:
        """A session operation run by the daemon; its result."""
        return self.request(MsgType.API, body, timeout=timeout, on_output=on_output,
                            call=call).get("result")

    def stream(self, body: dict[str, Any], *, window: int, timeout: float,
               on_output: OnOutput | None = None,
               call: Callable[[str, str], str] | None = None) -> Generator[Any, None, None]:
        """Values of a stream run by the daemon, granting credit as they are taken; leaving
        early cancels it there (the worker runs the generator's ``return()``)."""
        rid = next(self._rids)
        waiter: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting[rid] = waiter  # first: abandon() must find it once the id is known
        finished = False
        try:
            _issued(rid)
            self._send(MsgType.API, rid, {**body, "window": window})
            quarter, taken = max(1, window // 4), 0
            while True:
                try:
                    item = waiter.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError("the daemon sent nothing for the stream in time",
                                       kind="wall", limit=timeout) from None
                frame = self._frame(item, "stream")
                if frame.type is MsgType.ITEMS:
                    batch = values.decode(str(frame.body.get("items", "[]")))
                    for value in batch if isinstance(batch, list) else ():
                        yield value
                        taken += 1
                        if taken >= quarter:
                            self._send(MsgType.CREDIT, rid, {"n": taken})
                            taken = 0
                elif frame.type is MsgType.RESULT:
                    finished = True
                    return
                elif frame.type is MsgType.ERROR:
                    finished = True
                    raise _error(frame)
                elif frame.type is MsgType.OUTPUT and on_output is not None:
                    on_output([(str(k), str(m)) for k, m in frame.body.get("console", [])])
                elif frame.type is MsgType.CALL:
                    self._answer(rid, frame, call)
        finally:
            if not finished:
                self._cancel(rid)
            _settled(rid)
            self._waiting.pop(rid, None)
            self._owner.pop(rid, None)

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """The daemon's figures (pool, clients, queue)."""
        answer = self.request(MsgType.STATS, {}, timeout=timeout)
        stats = answer.get("stats")
        if not isinstance(stats, dict):
            raise DaemonError("the daemon sent malformed figures")
        return stats


def _error(frame: Frame) -> Exception:
    """The typed error of an ERROR frame (option errors stay TypeError / ValueError)."""
    data = frame.body.get("error")
    data = data if isinstance(data, dict) else {}
    builtin = {"TypeError": TypeError, "ValueError": ValueError}.get(str(data.get("type")))
    if builtin is not None:
        return builtin(str(data.get("message", "")))
    return error_from_dict(data)


def _handshake(sock: socket.socket, decoder: FrameDecoder) -> tuple[Frame | None, list[Frame]]:
    """The daemon's answer to HELLO (WELCOME or ERROR), read synchronously before the reader
    thread starts, and any frames that came with it (worker events: the daemon broadcasts
    them to every client, so one may arrive first or in the same read)."""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return None, []
        frames = list(decoder.feed(data))
        while frames and frames[0].type is MsgType.EVENT:
            frames.pop(0)  # an event before WELCOME: not for us yet
        if frames:
            return frames[0], frames[1:]
