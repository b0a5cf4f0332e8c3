"""The ``isobox-supervisor`` daemon: the embedded supervisor (:class:`Pool`) behind a socket.

::

    client ──HELLO──▶ daemon: token checked in constant time ──WELCOME──▶
    client ──RUN {"body"}──▶ fair queue ──▶ Pool.run_async ──▶ worker
           ◀──OUTPUT / CALL (host functions run in the client) ── REPLY──▶
           ◀──RESULT {"reply", "pid"} | ERROR {"error"}──

One asyncio loop serves every client; one connection multiplexes many requests by request id.
Workers are the same as in embedded mode; the daemon adds authentication, per-client limits,
fair scheduling between clients (:mod:`.scheduler`), Prometheus metrics (:mod:`.observe`) and
a lifecycle: SIGTERM/SIGINT drain in-flight runs within a grace period, SIGHUP re-reads the
config, and a dropped client's requests are cancelled (their workers killed and replaced).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import functools
import hmac
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isobox.errors import (
    DaemonError,
    IsoBoxError,
    MemoryLimitError,
    TimeoutError,
    WorkerCrashedError,
    error_to_dict,
)
from isobox.protocol import (
    MAX_FRAME,
    VERSION,
    Frame,
    FrameDecoder,
    MsgType,
    ProtocolError,
    encode_frame,
)
from isobox.supervisor.connection import Client
from isobox.supervisor.observe import DaemonMetrics, serve_http
from isobox.supervisor.pool import Pool
from isobox.supervisor.remote_api import RemoteAPI
from isobox.supervisor.scheduler import FairQueue, QueueFull

__all__ = ["Daemon", "DaemonConfig", "default_socket_path", "parse_listen"]

log = logging.getLogger("isobox.daemon")


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/isobox/supervisor.sock``, else ``/tmp/isobox-<uid>/supervisor.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return str(Path(runtime) / "isobox" / "supervisor.sock")
    return f"/tmp/isobox-{os.getuid()}/supervisor.sock"  # noqa: S108 - a private 0700 folder


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen wants HOST:PORT with a port from 0 to 65535, got {text!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """What the daemon is told on its command line, environment or config file."""

    socket: str | None = None  # Unix socket path (the default transport)
    listen: str | None = None  # "HOST:PORT": TCP instead, token required
    token: str | None = None  # required on TCP; optional on the Unix socket
    workers: int = 2  # the pool's maximum (and how many runs go at once)
    min_workers: int = 1
    idle_timeout: float = 300.0
    max_runs: int | None = 10_000
    max_queue: int = 1_000  # waiting requests, all clients together
    max_client_queue: int = 500  # waiting requests of one client
    max_client_runs: int = 1_000  # requests of one client in flight (waiting or running)
    max_timeout: float = 300.0  # ceiling on any run's timeout and cpu_timeout
    max_memory: int = 1 << 30  # ceiling on any run's memory_limit
    grace: float = 10.0  # SIGTERM: how long in-flight runs may still finish
    frame_timeout: float = 10.0  # a client that stalls mid-frame (or before HELLO) is dropped
    max_frame: int = MAX_FRAME
    max_rss: int | None = None  # a worker above this RSS is recycled (health.py)
    max_rss_growth: int | None = 256 * 2**20  # a worker whose memory climbs this much is too
    health_interval: float = 5.0  # idle workers are pinged and measured this often
    heartbeat_timeout: float = 2.0
    max_sessions: int = 1_000  # open sessions, all clients together
    max_client_sessions: int = 100  # open sessions of one client scope
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    confinement: str = "strict"

    def __post_init__(self) -> None:
        if self.listen is not None:
            parse_listen(self.listen)
            if not self.token:
                raise ValueError("TCP (--listen) needs a token (--token-file): refusing to "
                                 "serve unauthenticated clients over the network")
        if self.workers < 1 or not 0 <= self.min_workers <= self.workers:
            raise ValueError("workers must be >= 1 and min_workers between 0 and workers")
        for name in ("max_queue", "max_client_queue", "max_client_runs", "max_sessions",
                     "max_client_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.confinement not in ("strict", "best-effort"):
            raise ValueError("confinement must be 'strict' or 'best-effort'")

    def pool_options(self) -> dict[str, Any]:
        """The pool's part of the configuration (the ``pool`` option of a box)."""
        return {"min": self.min_workers, "max": self.workers, "idle_timeout": self.idle_timeout,
                "max_runs": self.max_runs, "max_queue": self.max_queue, "max_rss": self.max_rss,
                "max_rss_growth": self.max_rss_growth, "health_interval": self.health_interval,
                "heartbeat_timeout": self.heartbeat_timeout}


_MAX_HELLO = 4096  # bytes: the cap on frames before a client has authenticated

# Every key a RUN body may carry, with the type it must have (see RunSpec).
_STR = ("code", "console", "globals_json", "env_json", "entry", "filename")
_BOOL = ("tagged", "validate", "typescript")
_NUM = ("cpu_timeout", "wall_timeout")
_INT = ("memory_limit", "stack_limit", "max_result", "max_console", "max_error", "max_timers",
        "max_host_calls")
_DICT = ("files", "require", "filesystem")
_CONSOLE = ("redirect", "inherit", "off")


def _field_ok(key: str, value: Any, config: DaemonConfig) -> bool:
    """Whether one RUN body field has the type a worker expects (DaemonError if unknown)."""
    if key in _STR:
        return isinstance(value, str)
    if key in _BOOL:
        return type(value) is bool
    if key in _NUM:
        return type(value) in (int, float) and 0 < value <= config.max_timeout
    if key in _INT:
        return type(value) is int and value > 0
    if key in _DICT:
        return isinstance(value, dict)
    if key == "op":
        return bool(value == "map")  # a chunk of map items; sessions and streams use API frames
    if key == "map_items":
        return isinstance(value, list) and all(
            isinstance(i, list) and len(i) == 2 and isinstance(i[0], str)
            and type(i[1]) is bool for i in value)
    if key == "cpu_watch":
        return type(value) in (int, float) and value > 0
    if key == "functions":
        return isinstance(value, list) and all(
            isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and type(f[1]) is bool
            for f in value)
    if key in ("session", "stream", "restore_json", "restore_tagged", "drop"):
        raise DaemonError(f"{key!r} is not available over a remote connection yet "
                          "(sessions and streams run in embedded mode)")
    raise DaemonError(f"unknown run field {key!r}")


def check_body(body: Any, config: DaemonConfig) -> dict[str, Any]:
    """A client's RUN body, checked key by key against what a worker accepts and against the
    daemon's ceilings; raises :class:`DaemonError` naming the first problem."""
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):
        raise DaemonError("a run needs a body with its code")
    for key, value in body.items():
        if not _field_ok(key, value, config):
            raise DaemonError(f"bad run field {key!r} (or beyond the daemon's ceilings: "
                              f"timeouts up to {config.max_timeout}s)")
    if body.get("console", "redirect") not in _CONSOLE:
        raise DaemonError("bad run field 'console'")
    if int(body.get("memory_limit", 0)) > config.max_memory:
        raise DaemonError(f"memory_limit above the daemon's ceiling of {config.max_memory} bytes")
    if "wall_timeout" not in body:
        raise DaemonError("a run needs its wall_timeout")
    return body


def outcome_of(reply: dict[str, Any] | None, error: BaseException | None) -> tuple[str, str]:
    """The metrics outcome (and timeout kind) of a finished request."""
    if isinstance(error, TimeoutError):
        return "timeout", error.kind
    if isinstance(error, MemoryLimitError):
        return "memory", ""
    if isinstance(error, WorkerCrashedError):
        return "crashed", ""
    if isinstance(error, DaemonError):
        return "rejected", ""
    if error is not None or reply is None:
        return "error", ""
    kind = str(reply.get("kind", "E"))
    return {"R": ("ok", ""), "T": ("timeout", "cpu"), "W": ("timeout", "wall"),
            "M": ("memory", ""), "X": ("memory", "")}.get(kind, ("error", ""))


class Dispatcher:
    """As many runs at once as the pool has workers; the rest wait in a :class:`FairQueue`."""

    def __init__(self, slots: int, queue: FairQueue[asyncio.Future[None]]) -> None:
        self.free = slots
        self.queue = queue

    async def acquire(self, client: Hashable, priority: int, deadline: float) -> None:
        """Wait for a slot (fairly, by priority) until ``deadline``; raises DaemonError if the
        queue is full and TimeoutError past the deadline."""
        if self.free > 0 and not len(self.queue):
            self.free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self.queue.push(client, future, priority)
        except QueueFull as exc:
            raise DaemonError(str(exc)) from None
        try:
            # Not wait_for: on 3.11 it lets a grant that lands with a cancel swallow the cancel.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.shield(future)
        except BaseException as exc:
            if not self.queue.remove(client, future, priority) and future.done():
                self.release()  # the slot came just as we gave up: pass it on
            if isinstance(exc, builtins.TimeoutError) and not isinstance(exc, TimeoutError):
                raise TimeoutError("no worker became free before the deadline",
                                   kind="wall") from None
            raise

    def release(self) -> None:
        """Give the slot to the next waiter in turn, or free it."""
        while True:
            future = self.queue.pop()
            if future is None:
                self.free += 1
                return
            if not future.done():
                future.set_result(None)
                return


class _RemoteHost:
    """Host functions of a remote run: each call goes back to the client that sent the run."""

    def __init__(self, client: Client, rid: int) -> None:
        self.client = client
        self.rid = rid

    async def acall(self, name: str, args: str) -> str:
        return await self.client.host_call(self.rid, name, args)

    def call(self, name: str, args: str) -> str:
        raise RuntimeError("remote host calls are answered on the event loop only")

    def call_until(self, name: str, args: str, deadline: float) -> str:
        raise RuntimeError("remote host calls are answered on the event loop only")


class Daemon:
    """The daemon: a pool, a listening socket, and the clients connected to it."""

    def __init__(self, config: DaemonConfig,
                 reload: Callable[[], DaemonConfig] | None = None) -> None:
        self.config = config
        self._reload = reload
        self.metrics = DaemonMetrics()
        from isobox.api import AsyncIsoBox  # noqa: PLC0415 - the API imports this package

        # Sessions and streams reuse the embedded API: a box over the daemon's one pool.
        self.box = AsyncIsoBox(pool=config.pool_options(), confinement=config.confinement,
                               max_sessions=config.max_sessions)
        if self.box._pool is None:
            raise RuntimeError("the daemon's box has no pool")
        self.pool: Pool = self.box._pool
        for event in ("worker:started", "worker:crashed", "worker:recycled"):
            self.box.on(event, functools.partial(self._on_event, event))
        self.api = RemoteAPI(self.box, config.max_client_sessions)
        self.queue: FairQueue[asyncio.Future[None]] = FairQueue(config.max_queue,
                                                                config.max_client_queue)
        self.dispatch = Dispatcher(config.workers, self.queue)
        self.clients: set[Client] = set()
        self.started = time.time()
        self.runs = 0
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._path: str | None = None

    # -- events from the pool --------------------------------------------------------------
    def _on_event(self, name: str, payload: dict[str, Any]) -> None:
        """A pool event (from any thread: the maintainer emits worker:started)."""
        plain = {k: v for k, v in payload.items() if isinstance(v, (str, int, float, type(None)))}
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(self._broadcast, name, plain)
        if name == "worker:crashed":
            self.metrics.restarts.labels(str(payload.get("cause") or "crash")).inc()
            log.warning("worker %s crashed (%s)", payload.get("pid"), payload.get("cause"))
        elif name == "worker:recycled":
            self.metrics.restarts.labels(str(payload.get("reason") or "recycled")).inc()
            log.info("worker %s recycled (%s)", payload.get("pid"), payload.get("reason"))
        elif name == "worker:started":
            log.debug("worker %s started", payload.get("pid"))

    def _broadcast(self, name: str, plain: dict[str, Any]) -> None:
        """Send an event to every client (on the loop: connections are not thread-safe)."""
        for client in list(self.clients):
            client.send(MsgType.EVENT, 0, {"name": name, "payload": plain})

    # -- figures ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What ``isobox status`` and ``pool_stats()`` of a remote box show."""
        rows, _queued = self.pool.snapshot()
        return {"pid": os.getpid(), "uptime": time.time() - self.started, "runs": self.runs,
                "clients": len(self.clients), "queued": len(self.queue),
                "restarts": self.pool.restarts, "workers": rows,
                "sessions": len(self.box._sessions),
                "confinement_error": self.pool.confinement_error,
                "address": self.address}

    @property
    def address(self) -> str:
        """Where clients connect (``unix://...`` or ``tcp://...``)."""
        if self.config.listen is not None:
            return f"tcp://{self.config.listen}"
        return f"unix://{self._path or self.config.socket or default_socket_path()}"

    def _refresh_gauges(self) -> None:
        rows, _ = self.pool.snapshot()
        self.metrics.set_workers(str(r["state"]) for r in rows)
        self.metrics.queue_depth.set(len(self.queue))
        self.metrics.clients.set(len(self.clients))
        self.metrics.sessions.set(len(self.box._sessions))

    def _health(self) -> tuple[bool, str]:
        if self._stopping is not None and self._stopping.is_set():
            return False, "draining"
        if self.pool.confinement_error:
            return False, f"workers refuse to start: {self.pool.confinement_error}"
        return True, "ok"

    # -- lifecycle -------------------------------------------------------------------------
    async def serve(self, ready: Callable[[str], None] | None = None) -> int:
        """Listen until SIGTERM or SIGINT, then drain; returns the exit code (0)."""
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        sock = self._bind()
        if sock.family == socket.AF_UNIX:
            self._server = await asyncio.start_unix_server(self._connection, sock=sock,
                                                           limit=2**16)
        else:
            self._server = await asyncio.start_server(self._connection, sock=sock, limit=2**16)
        http = None
        if self.config.metrics_port is not None:
            http = serve_http(self.metrics, self.config.metrics_host, self.config.metrics_port,
                              self._health, self._refresh_gauges)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        log.info("isobox-supervisor %d listening on %s (%d workers)", os.getpid(), self.address,
                 self.config.workers)
        if ready is not None:
            ready(self.address)
        try:
            await self._stopping.wait()
            await self._drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if http is not None:
                http[0].shutdown()
                http[0].server_close()
            await self.box.shutdown(5.0)
            self._unlink()
        log.info("isobox-supervisor %d stopped", os.getpid())
        return 0

    def _sighup(self) -> None:
        """Re-read the configuration: the limits that apply per request change at once; the
        transport and the pool size need a restart (logged)."""
        if self._reload is None:
            return
        try:
            fresh = self._reload()
        except (OSError, ValueError) as exc:
            log.warning("SIGHUP: the configuration could not be reloaded: %s", exc)
            return
        fixed = ("socket", "listen", "workers", "min_workers", "metrics_port", "metrics_host",
                 "confinement")
        changed = [k for k in fixed if getattr(fresh, k) != getattr(self.config, k)]
        if changed:
            log.warning("SIGHUP: %s change only with a restart; kept as they were", changed)
        self.config = dataclasses.replace(fresh, **{k: getattr(self.config, k) for k in fixed})
        self.queue.max_total = self.config.max_queue
        self.queue.max_per_client = self.config.max_client_queue
        log.info("SIGHUP: configuration reloaded")

    async def _drain(self) -> None:
        """Stop accepting, let in-flight runs finish within the grace period, then cancel."""
        if self._server is not None:
            self._server.close()
        self._unlink()
        tasks = [t for c in self.clients for t in c.tasks.values()]
        log.info("draining %d in-flight requests (grace %.1fs)", len(tasks), self.config.grace)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.config.grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for client in list(self.clients):
            with contextlib.suppress(Exception):
                await client.writer.drain()
            client.writer.close()

    def _bind(self) -> socket.socket:
        if self.config.listen is not None:
            host, port = parse_listen(self.config.listen)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise DaemonError(f"cannot listen on {self.config.listen}: {exc}") from None
        else:
            path = self.config.socket or default_socket_path()
            _clear_stale(path)
            folder = Path(path).parent
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            owner = folder.stat()
            if owner.st_uid != os.getuid() or owner.st_mode & 0o022:
                raise DaemonError(f"{folder} is not a private folder of this user; refusing to "
                                  "put the socket there")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # created 0600: no window in which others could connect
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self._path = path
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def _unlink(self) -> None:
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None

    # -- one client ------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        client = Client(writer)
        decoder = FrameDecoder(max_frame=_MAX_HELLO)  # nothing large before authentication
        peer = writer.get_extra_info("peername") or "unix"
        try:
            hello = await self._read_frame(client, reader, decoder, first=True)
            if hello is None or hello.type is not MsgType.HELLO:
                raise ProtocolError("the first frame must be HELLO")
            decoder.max_frame = self.config.max_frame
            if not self._authorised(hello.body.get("token")):
                writer.write(encode_frame(MsgType.ERROR, 0, {"error": {
                    "type": "DaemonError", "message": "authentication failed: wrong or missing "
                    "token"}}))
                await writer.drain()
                log.warning("client %s refused: wrong or missing token", peer)
                return
            scope = hello.body.get("scope")
            client.scope = scope if isinstance(scope, str) and 0 < len(scope) <= 256 \
                else f"client-{client.id}"
            self.clients.add(client)
            client.send(MsgType.WELCOME, 0, {"pid": os.getpid(), "client": client.id,
                                             "version": VERSION})
            log.info("client %d connected (%s)", client.id, peer)
            while True:
                frame = await self._read_frame(client, reader, decoder)
                if frame is None:
                    break
                self._dispatch_frame(client, frame)
                await writer.drain()
        except (ProtocolError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.warning("client %d dropped: %s", client.id, exc)
        finally:
            client.closed = True
            self.clients.discard(client)
            for task in list(client.tasks.values()):
                task.cancel()  # the pool kills a cancelled run's worker and replaces it
            for future in client.calls.values():
                future.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            log.info("client %d disconnected (%d requests cancelled)", client.id,
                     len(client.tasks))

    async def _read_frame(self, client: Client, reader: asyncio.StreamReader,
                          decoder: FrameDecoder, first: bool = False) -> Frame | None:
        """The next frame; None at EOF. Waiting is unbounded between frames (an idle client
        is fine), but a frame once begun (and HELLO) must be whole within the frame timeout:
        a client that stalls or trickles is dropped."""
        deadline: float | None = None
        while not client.decoded:
            if deadline is None and (first or decoder.buffered > 0):
                deadline = time.monotonic() + self.config.frame_timeout
            try:
                if deadline is None:
                    data = await reader.read(2**16)
                else:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        data = await reader.read(2**16)
            except builtins.TimeoutError:
                raise ProtocolError("the client stalled in the middle of a frame") from None
            if not data:
                if decoder.buffered:
                    raise ProtocolError("connection closed mid-frame")
                return None
            client.decoded.extend(decoder.feed(data))
        return client.decoded.popleft()

    def _authorised(self, token: Any) -> bool:
        expected = self.config.token
        if not expected:
            return True
        given = token if isinstance(token, str) else ""
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                   expected.encode("utf-8", "surrogatepass"))

    def _dispatch_frame(self, client: Client, frame: Frame) -> None:
        rid = frame.request_id
        if frame.type in (MsgType.RUN, MsgType.API):
            self._start(client, frame)
        elif frame.type is MsgType.CREDIT:
            credit = client.credits.get(rid)
            n = frame.body.get("n")
            if credit is not None and type(n) is int and n > 0:
                credit.grant(n)
        elif frame.type is MsgType.REPLY:
            cid = frame.body.get("cid")
            future = client.calls.get(cid) if type(cid) is int else None
            if future is not None and not future.done():
                future.set_result(str(frame.body.get("reply", "e{}")))
        elif frame.type is MsgType.CANCEL:
            task = client.tasks.get(rid)
            if task is not None:
                task.cancel()
        elif frame.type is MsgType.STATS:
            client.send(MsgType.RESULT, rid, {"stats": self.stats()})
        elif frame.type is MsgType.PING:
            client.send(MsgType.PONG, rid, {})
        else:
            raise ProtocolError(f"unexpected {frame.type.name} frame from a client")

    def _start(self, client: Client, frame: Frame) -> None:
        """Start a RUN or API request as a task of its own (unless a limit refuses it)."""
        rid = frame.request_id
        if rid in client.tasks:
            raise ProtocolError(f"request id {rid} is already in flight")
        refusal = ""
        if len(client.tasks) >= self.config.max_client_runs:
            refusal = f"this client already has {self.config.max_client_runs} requests in flight"
        elif self._stopping is not None and self._stopping.is_set():
            refusal = "the daemon is shutting down"
        if refusal:
            client.send(MsgType.ERROR, rid, {"error": {"type": "DaemonError",
                                                        "message": refusal}})
            self.metrics.finished("rejected", 0.0)
            return
        job = (self._run(client, rid, frame.body.get("body"), frame.body.get("priority", 0))
               if frame.type is MsgType.RUN else self._api(client, rid, frame.body))
        client.tasks[rid] = asyncio.get_running_loop().create_task(job)

    async def _run(self, client: Client, rid: int, body: Any, priority: Any) -> None:
        started = time.monotonic()
        reply: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            body = check_body(body, self.config)
            timeout = float(body["wall_timeout"])
            if isinstance(body.get("map_items"), list):  # a chunk: each item has the timeout
                timeout *= max(1, len(body["map_items"]))
            deadline = started + timeout
            kill_at = deadline + min(1.0, 0.02 + 0.1 * timeout)
            level = priority if type(priority) is int else 0
            await self.dispatch.acquire(client.id, level, deadline)
            try:
                host = _RemoteHost(client, rid) if body.get("functions") else None
                reply, handle = await self.pool.run_async(
                    body, deadline=deadline, kill_at=kill_at, host=host,
                    on_output=lambda lines: client.send(MsgType.OUTPUT, rid, {"console": lines}))
            finally:
                self.dispatch.release()
            self.runs += 1
            client.send(MsgType.RESULT, rid, {"reply": reply, "pid": handle.pid})
        except IsoBoxError as exc:
            error = exc
            client.send(MsgType.ERROR, rid, {"error": error_to_dict(exc)})
        except asyncio.CancelledError:
            error = DaemonError("cancelled")
            raise
        except Exception as exc:  # never let one request take the daemon down
            error = exc
            log.exception("request %d of client %d failed inside the daemon", rid, client.id)
            client.send(MsgType.ERROR, rid, {"error": {
                "type": "IsoBoxError", "message": f"the daemon failed: {type(exc).__name__}"}})
        finally:
            client.tasks.pop(rid, None)
            outcome, kind = outcome_of(reply, error)
            self.metrics.finished(outcome, time.monotonic() - started, kind)


    async def _api(self, client: Client, rid: int, body: dict[str, Any]) -> None:
        """A stream or a session operation (see :mod:`.remote_api`); those that need a worker
        wait for it in the same fair queue as runs."""
        started = time.monotonic()
        slot = body.get("op") in _WORKER_OPS
        try:
            if slot:
                options = body.get("options")
                timeout = options.get("timeout") if isinstance(options, dict) else None
                wait = self.config.max_timeout
                if isinstance(timeout, (int, float)) and 0 < timeout < wait:
                    wait = float(timeout)
                priority = body.get("priority", 0)
                await self.dispatch.acquire(client.id, priority if type(priority) is int else 0,
                                            started + wait)
            try:
                result = await self.api.handle(client, rid, body)
            finally:
                if slot:
                    self.dispatch.release()
            client.send(MsgType.RESULT, rid, {"result": result})
        except IsoBoxError as exc:
            client.send(MsgType.ERROR, rid, {"error": error_to_dict(exc)})
        except (TypeError, ValueError) as exc:  # the options did not validate
            client.send(MsgType.ERROR, rid, {"error": {"type": type(exc).__name__,
                                                        "message": str(exc)}})
        except Exception as exc:  # never let one request take the daemon down
            log.exception("request %d of client %d failed inside the daemon", rid, client.id)
            client.send(MsgType.ERROR, rid, {"error": {
                "type": "IsoBoxError", "message": f"the daemon failed: {type(exc).__name__}"}})
        finally:
            client.tasks.pop(rid, None)


# API operations that occupy a worker (the others only touch the daemon's bookkeeping).
_WORKER_OPS = frozenset({"stream", "session.execute", "session.project", "session.stream",
                         "session.get_state", "session.set_state"})


def _clear_stale(path: str) -> None:
    """Refuse to start over a live daemon's socket; remove a dead one's."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise DaemonError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: the daemon that made it is gone
        log.info("removed the stale socket %s", path)
        return
    finally:
        probe.close()
    raise DaemonError(f"another daemon is already listening on {path}")
