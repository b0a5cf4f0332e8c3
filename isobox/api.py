"""The public API: :class:`IsoBox` and its asyncio twin :class:`AsyncIsoBox`.

::

    IsoBox.run(code) ─┐                         ┌─ mode="process": Pool.run() on this thread
    AsyncIsoBox.run ──┼─ _BoxCore.prepare() ────┤     (one frame to an idle worker and back)
                      │   (validate, encode)     └─ mode="inprocess": Engine.run() right here
                      └─ _BoxCore.complete() / fail(): result or typed error, metrics, events

``_BoxCore`` holds every IO-free step (options, encoding, decoding, metrics, events); the two
classes are thin shells that differ only in how they wait. Many threads may share one
``IsoBox``; an ``AsyncIsoBox`` may be shared by many tasks of one event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any

from isobox import values
from isobox.batch import BatchItem, MapPlan, map_async, map_sync
from isobox.errors import (
    ClosedError,
    CompileError,
    DaemonError,
    IsoBoxError,
    MemoryLimitError,
    ScriptError,
    SecurityError,
    SerializationError,
    SessionError,
    TimeoutError,
    WorkerCrashedError,
)
from isobox.events import EventEmitter, Handler
from isobox.host import HostFunctions
from isobox.metrics import MetricsRecorder
from isobox.options import RUN_OVERRIDES, BoxOptions, RunRequest, build_request, pool_config
from isobox.projects import (
    RequirePolicy,
    files_from_wire,
    filesystem_option,
    normalize_files,
    virtual_path,
)
from isobox.remote import Cancellable, RemoteClient, parse_address
from isobox.remote_session import (
    WIRE,
    AsyncRemoteSession,
    RemoteSession,
    athread_stream,
    remote_stream,
)
from isobox.results import (
    CodeValidation,
    ExecutionMetrics,
    ExecutionResult,
    GlobalMetrics,
    PoolStats,
    SessionInfo,
    WorkerStats,
)
from isobox.sessions import AsyncSession, Session, SessionState, check_id
from isobox.supervisor.handle import WorkerHandle
from isobox.supervisor.pool import PinLost, Pool
from isobox.supervisor.streams import PoolStream, open_stream, open_stream_async
from isobox.workers.engine import Engine, EngineIO, RunSpec
from isobox.workers.worker import reply_body

__all__ = ["AsyncIsoBox", "IsoBox"]

log = logging.getLogger("isobox")

_MODES = ("process", "inprocess")
_NOT_REMOTE = ("{what} are not available over a remote connection yet; use them in embedded "
               "mode (IsoBox() without address=)")
_SWEEP_EVERY = 0.1  # seconds between TTL sweeps while sessions exist
_TRANSPILE_CACHE = 1024  # TypeScript snippets whose JS the box keeps


class _LocalIO(EngineIO):
    """In-process mode: console to the sink, host functions called right here (async ones
    complete before their Promise is handed back; their replies wait in ``done``)."""

    def __init__(self, sink: Callable[[list[tuple[str, str]]], None] | None,
                 host: HostFunctions | None) -> None:
        self.sink = sink
        self.host = host
        self.done: list[tuple[int, str]] = []

    def output(self, lines: list[tuple[str, str]]) -> None:
        if self.sink is not None:
            self.sink(lines)

    def call(self, name: str, args: str) -> str:
        if self.host is None:
            return super().call(name, args)
        return self.host.call(name, args)

    def start_call(self, cid: int, name: str, args: str) -> None:
        self.done.append((cid, self.call(name, args)))

    def wait(self, timeout: float) -> list[tuple[int, str]]:
        if self.done:
            done, self.done = self.done, []
            return done
        return super().wait(timeout)


def _remote_options(mode: str, pool: Mapping[str, Any] | None, address: str | None,
                    options: dict[str, Any]) -> dict[str, Any]:
    """Take the remote-mode options out of ``options`` and check they fit together."""
    found = {"token": options.pop("token", None), "scope": options.pop("session_scope", None)}
    if address is None:
        if found["token"] is not None or found["scope"] is not None:
            raise TypeError("token= and session_scope= are for remote mode (address=...)")
        return found
    if mode != "process":
        raise ValueError(f"address= (remote mode) cannot be combined with mode={mode!r}")
    if pool is not None:
        raise ValueError("in remote mode the pool is the daemon's: configure it with "
                         "isobox-supervisor --workers")
    parse_address(address)
    return found


def _validation_options(options: dict[str, Any]) -> dict[str, Any]:
    """The run options that matter for parsing the code once (its language and file name)."""
    return {k: v for k, v in options.items() if k in ("filename", "language", "timeout")}


def _grace(timeout: float) -> float:
    """How long past the wall deadline the watchdog waits, so a CPU timeout can report itself."""
    return min(1.0, 0.02 + 0.1 * timeout)


class _BoxCore:
    """IO-free logic shared by the sync and async boxes."""

    def __init__(self, *, mode: str, pool: Mapping[str, Any] | None, address: str | None,
                 options: dict[str, Any]) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self._remote: RemoteClient | None = None
        remote = _remote_options(mode, pool, address, options)
        # Remote streams and sessions send the box's own defaults along (see remote_session).
        self._remote_defaults = {k: v for k, v in options.items() if k in WIRE}
        self._filesystem = filesystem_option(options.pop("filesystem", None))
        self._require = RequirePolicy.from_option(options.pop("require", None))
        confinement = options.pop("confinement", "strict")
        if confinement not in ("strict", "best-effort"):
            raise ValueError(f"confinement must be 'strict' or 'best-effort', got {confinement!r}")
        typescript = options.pop("typescript", "preload")
        if typescript not in ("lazy", "preload"):
            raise ValueError(f"typescript must be 'lazy' or 'preload', got {typescript!r}")
        self._transpiled: OrderedDict[str, str] = OrderedDict()  # TypeScript, by content hash
        self._transpiled_lock = threading.Lock()
        self._packages: dict[str, dict[str, str]] = {}  # node_modules packages, read once
        self._host = HostFunctions(options.pop("functions", None) or {})
        self._max_sessions = _count("max_sessions", options.pop("max_sessions", 1000))
        self._per_worker = _count("max_sessions_per_worker",
                                  options.pop("max_sessions_per_worker", 64))
        self._sessions: dict[str, SessionState] = {}
        self._sessions_lock = threading.Lock()
        self._sweeper: threading.Thread | None = None
        unknown = set(options) - {f.name for f in dataclasses.fields(BoxOptions)}
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}")
        self._options = BoxOptions(**options)
        if self._options.sandbox:  # refused now, not at the first run
            values.encode(dict(self._options.sandbox), what="sandbox",
                          limit=self._options.max_input_size)
        config = dataclasses.replace(pool_config(pool),
                                     preload_typescript=typescript == "preload",
                                     strict_confinement=confinement == "strict")
        self._mode = mode
        self._events = EventEmitter()
        self._metrics = MetricsRecorder()
        self._closed = False
        self._pool: Pool | None = None
        self._engines = threading.local()
        if address is not None:
            self._remote = RemoteClient(address, remote["token"], scope=remote["scope"],
                                        on_event=self._events.emit)
            self._finalizer = weakref.finalize(self, self._remote.close)
        elif mode == "process":
            self._pool = Pool(config, self._events.emit)
            self._pool.start()
            self._finalizer = weakref.finalize(self, self._pool.shutdown)

    # -- events and figures ----------------------------------------------------------------
    def on(self, name: str, handler: Handler) -> None:
        """Call ``handler(payload: dict)`` on event ``name`` (see README: Events)."""
        self._events.on(name, handler)

    def off(self, name: str, handler: Handler | None = None) -> None:
        """Stop calling ``handler`` (or every handler) for ``name``."""
        self._events.off(name, handler)

    def get_metrics(self) -> GlobalMetrics:
        """Aggregated metrics of every run of this box."""
        return self._metrics.snapshot(self._pool.restarts if self._pool else 0)

    def get_history(self, limit: int | None = None) -> list[ExecutionMetrics]:
        """The most recent runs (at most 1,000 are kept), oldest first."""
        return self._metrics.history(limit)

    def _pool_stats(self) -> PoolStats:
        if self._remote is not None:
            found = self._remote.stats()
            fields = {f.name for f in dataclasses.fields(WorkerStats)}
            return PoolStats(workers=[WorkerStats(**{k: v for k, v in row.items() if k in fields})
                                      for row in found.get("workers", [])],
                             restarts=int(found.get("restarts", 0)),
                             queued=int(found.get("queued", 0)),
                             confinement_error=str(found.get("confinement_error", "")))
        if self._pool is None:
            return PoolStats(workers=[], restarts=0, queued=0)
        rows, queued = self._pool.snapshot()
        return PoolStats(workers=[WorkerStats(**row) for row in rows],
                         restarts=self._pool.restarts, queued=queued,
                         confinement_error=self._pool.confinement_error)

    # -- preparing and completing runs -----------------------------------------------------
    def _prepare(self, code: str, overrides: dict[str, Any], *, validate: bool = False,
                 session: SessionState | None = None) -> tuple[RunRequest, HostFunctions]:
        if self._closed:
            raise ClosedError("the box was shut down")
        overrides = dict(overrides)
        host = self._host
        if session is not None:
            host = host.merged(session.functions)
            overrides = {**session.overrides, **overrides}
        host = host.merged(overrides.pop("functions", None))
        policy = self._require
        if "require" in overrides:
            policy = RequirePolicy.from_option(overrides.pop("require"))
        filesystem = self._filesystem
        if "filesystem" in overrides:
            filesystem = filesystem_option(overrides.pop("filesystem"))
        filename = overrides.pop("filename", None)
        language = overrides.pop("language", None)
        unknown = set(overrides) - RUN_OVERRIDES
        if unknown:
            raise TypeError(f"unknown run option(s) {sorted(unknown)}")
        request = build_request(code, self._options.with_overrides(overrides), filename,
                                language, validate=validate)
        if host:
            request.body["functions"] = host.spec()
        if session is not None:
            request.body["session"] = session.id
        if policy is not None:
            request.body["require"] = policy.wire()
            packages = policy.package_files(self._packages)
            if packages:
                request.body["files"] = packages
        if filesystem is not None:
            request.body["filesystem"] = filesystem
        if request.body.get("typescript"):
            request = self._cached_transpile(request)
        return request, host

    def _cached_transpile(self, request: RunRequest) -> RunRequest:
        """A TypeScript snippet seen before runs as its cached JS: no compiler at all."""
        body = request.body
        key = hashlib.sha256(f"{body['filename']}\0{body['code']}".encode(
            "utf-8", "surrogatepass")).hexdigest()
        with self._transpiled_lock:
            code = self._transpiled.get(key)
            if code is not None:
                self._transpiled.move_to_end(key)
        if code is None:
            return dataclasses.replace(request, cache_key=key)
        body["code"] = code
        del body["typescript"]
        return request

    def _remember_transpile(self, request: RunRequest, reply: dict[str, Any]) -> None:
        transpiled = reply.get("transpiled")
        if request.cache_key is None or not isinstance(transpiled, str):
            return
        with self._transpiled_lock:
            self._transpiled[request.cache_key] = transpiled
            while len(self._transpiled) > _TRANSPILE_CACHE:
                self._transpiled.popitem(last=False)

    def _project(self, files: object, entrypoint: str, options: dict[str, Any],
                 session: SessionState | None = None) -> tuple[RunRequest, HostFunctions]:
        """A run request for a project: the entrypoint's source as the code, every file in
        the virtual map (after any whitelisted node_modules packages)."""
        project = normalize_files(files)
        entry = virtual_path(entrypoint)
        if entry not in project:
            raise ValueError(f"entrypoint {entry!r} is not one of the project's files")
        # No filename: QuickJS names every evaluated file <input>, so the entry's name would
        # be wrong for the frames of the other modules.
        request, host = self._prepare(project[entry], options, session=session)
        total = sum(len(code) for code in project.values())
        if total > request.options.max_input_size:
            raise SerializationError(f"project of {total} characters exceeds the cap of "
                                     f"{request.options.max_input_size}", path="files")
        request.body["files"] = {**request.body.get("files", {}), **project}
        request.body["entry"] = entry
        request.body.setdefault("require", {"whitelist": [], "modules": {}, "mocks": {}})
        return request, host

    def _emit_violations(self, reply: dict[str, Any]) -> None:
        for found in reply.get("violations", ()):
            if isinstance(found, dict):
                self._events.emit("security:violation", {
                    "type": str(found.get("type", "")), "severity": str(found.get("severity", "")),
                    "details": found.get("details", {})})

    def _output_sink(self, request: RunRequest, collected: list[tuple[str, str]]
                     ) -> Any:
        opts = request.options
        if opts.console == "off":
            return None

        def sink(lines: list[tuple[str, str]]) -> None:
            collected.extend(lines)
            for kind, message in lines:
                if opts.console == "inherit":
                    stream = sys.stderr if kind in ("warn", "error", "trace") else sys.stdout
                    print(message, file=stream)
                elif opts.on_output is not None:
                    try:
                        opts.on_output(kind, message)
                    except Exception:
                        log.exception("isobox on_output handler raised")

        return sink

    def _complete(self, request: RunRequest, reply: dict[str, Any], pid: int | None,
                  started: float, streamed: list[tuple[str, str]]) -> ExecutionResult:
        self._emit_violations(reply)
        self._remember_transpile(request, reply)
        duration = time.monotonic() - started
        cpu_time = float(reply.get("cpu_time", 0.0))
        memory = int(reply.get("memory", 0))
        kind = str(reply.get("kind", "E"))
        final = [(str(k), str(m)) for k, m in reply.get("console", [])]
        if final:
            sink = self._output_sink(request, streamed)
            if sink is not None:
                sink(final)
        if kind != "R":
            error = self._error_for(kind, str(reply.get("payload", "{}")), request)
            error.worker_pid = pid
            self._record(duration, cpu_time, memory, error, pid)
            raise error
        type_name, _, text = str(reply.get("payload", "")).partition("\n")
        try:
            value = values.decode(text)
        except ValueError:  # not JSON: only a broken or subverted worker sends that
            if self._pool is not None:
                self._pool.condemn(pid, "it sent a result that is not JSON")
            crash = WorkerCrashedError("the worker sent a malformed result and was killed",
                                       pid=pid, signal=9, cause="bad frame")
            crash.worker_pid = pid
            self._record(duration, cpu_time, memory, crash, pid)
            raise crash from None
        self._record(duration, cpu_time, memory, None, pid)
        return ExecutionResult(value=value, duration=duration, cpu_time=cpu_time, memory=memory,
                               type=type_name, console=list(streamed), worker_pid=pid,
                               files=files_from_wire(reply.get("files")))

    def _error_for(self, kind: str, payload: str, request: RunRequest) -> IsoBoxError:
        opts = request.options
        record: dict[str, Any] = json.loads(payload) if payload else {}
        if kind == "T":
            return TimeoutError(f"the run exceeded its CPU budget of {opts.effective_cpu_timeout}s",
                                kind="cpu", limit=opts.effective_cpu_timeout)
        if kind == "W":
            return TimeoutError(f"the run exceeded its wall-clock timeout of {opts.timeout}s",
                                kind="wall", limit=opts.timeout)
        if kind == "M":
            return MemoryLimitError(f"the run exceeded its memory limit of {opts.memory_limit} "
                                    "bytes", limit=opts.memory_limit)
        if kind == "X":
            return MemoryLimitError(f"console output exceeded the cap of {opts.max_console_size} "
                                    "bytes", limit=opts.max_console_size)
        if kind == "S":
            message = str(record.get("message", "the result cannot be serialized"))
            return SerializationError(message, path=message.split(" ", 1)[0])
        stack = str(record.get("stack", ""))
        if request.filename:
            stack = stack.replace("<input>", request.filename)
        name = str(record.get("name", "Error"))
        message = str(record.get("message", ""))
        if kind == "C":
            return CompileError(message, name=name, stack=stack, line=record.get("line"),
                                column=record.get("column"))
        if name == "SecurityError" or record.get("security") is True:
            return SecurityError(message, name=name, stack=stack)
        return ScriptError(message, name=name, stack=stack)

    def _record(self, duration: float, cpu_time: float, memory: int,
                error: BaseException | None, pid: int | None) -> None:
        status = "ok"
        if isinstance(error, TimeoutError):
            status = "timeout"
        elif isinstance(error, MemoryLimitError):
            status = "memory"
        elif isinstance(error, WorkerCrashedError):
            status = "crashed"
        elif error is not None:
            status = "error"
        item = ExecutionMetrics(duration, cpu_time, memory, status, pid, time.time())
        self._metrics.record(item)
        if self._events.has("metrics:recorded"):
            self._events.emit("metrics:recorded", {"metrics": item})
        if error is not None:
            if status == "timeout" and self._events.has("timeout"):
                self._events.emit("timeout", {"error": error, "kind": getattr(error, "kind", "")})
            if self._events.has("error"):
                self._events.emit("error", {"error": error})

    def _failed(self, error: IsoBoxError, started: float, limit: float = 0.0) -> None:
        """Record a run that ended without a reply (wall timeout, crash); a watchdog timeout
        learns the run's limit here (the pool does not know it)."""
        if isinstance(error, TimeoutError) and not error.limit:
            error.limit = limit
        self._record(time.monotonic() - started, 0.0, 0, error, error.worker_pid)

    def _validation(self, request: RunRequest, reply: dict[str, Any]) -> CodeValidation:
        if reply.get("kind") == "R":
            return CodeValidation(valid=True)
        error = self._error_for("C", str(reply.get("payload", "{}")), request)
        return CodeValidation(valid=False, error=error)

    def _engine(self) -> Any:
        engine = getattr(self._engines, "engine", None)
        if engine is None:
            from isobox.workers.engine import Engine  # noqa: PLC0415 - only in-process mode needs it

            engine = self._engines.engine = Engine()
        return engine

    @staticmethod
    def _local_spec(request: RunRequest) -> RunSpec:
        spec = RunSpec.from_body(request.body)
        # No watchdog here: the CPU budget is the only bound, so it never exceeds the timeout.
        return dataclasses.replace(spec,
                                   cpu_timeout=min(spec.cpu_timeout, request.options.timeout))

    def _inprocess_reply(self, request: RunRequest, sink: Any, host: HostFunctions | None,
                         session: SessionState | None = None, op: str = "run"
                         ) -> dict[str, Any]:
        spec = self._local_spec(request)
        io = _LocalIO(sink, host)
        if session is not None:
            engine = session.engine
            if engine is None:
                engine = session.engine = Engine()
                body = dict(request.body)
                _restore_into(session, body)
                spec = RunSpec.from_body(body)
                spec = dataclasses.replace(spec, cpu_timeout=min(spec.cpu_timeout,
                                                                 request.options.timeout))
            outcome = engine.session_state(spec) if op == "state" else engine.run(spec, io)
            return reply_body(outcome)
        engine = self._engine()
        if op == "map":
            outcome = engine.run_chunk(spec, request.body["map_items"], io)
        else:
            outcome = engine.run(spec, io)
        if outcome.retire:
            self._engines.engine = None
        else:
            engine.prepare()
        return reply_body(outcome)

    # -- sessions (shared parts) -----------------------------------------------------------
    def _new_session(self, session_id: str, ttl: float | None,
                     options: dict[str, Any]) -> SessionState:
        if self._closed:
            raise ClosedError("the box was shut down")
        check_id(session_id)
        if ttl is not None:
            _positive_ttl(ttl)
        functions = options.pop("functions", None)
        if functions is not None:
            HostFunctions(functions)  # validated now, not at the first run
        self._prepare("", dict(options))  # validates the options now
        state = SessionState(session_id, ttl, dict(options), functions)
        with self._sessions_lock:
            if session_id in self._sessions:
                raise SessionError(f"session {session_id!r} already exists")
            if len(self._sessions) >= self._max_sessions:
                raise SessionError(f"this box already has {self._max_sessions} open sessions "
                                   "(max_sessions)")
            self._sessions[session_id] = state
            if self._sweeper is None:
                # A weak reference: a box dropped without shutdown() can still be collected
                # (which shuts its pool down), and the sweeper then ends.
                self._sweeper = threading.Thread(target=_sweep_loop, args=(weakref.ref(self),),
                                                 name="isobox-sessions", daemon=True)
                self._sweeper.start()
        return state

    def _lookup(self, session_id: str) -> SessionState:
        with self._sessions_lock:
            state = self._sessions.get(session_id)
        if state is None:
            raise SessionError(f"no open session {session_id!r} (unknown, closed or expired)")
        return state

    def _sweep(self) -> None:
        """Expire sessions whose TTL ran out since their last use."""
        now = time.monotonic()
        with self._sessions_lock:
            due = [s for s in self._sessions.values() if s.due(now)]
        for state in due:
            if self._session_end(state, "expired"):
                self._events.emit("session:expired", {"id": state.id, "ttl": state.ttl})

    def _session_end(self, state: SessionState, why: str) -> bool:
        """Drop the session's context (and checkpoint); with ``why``, end the session too.
        Returns False if it had already ended."""
        with self._sessions_lock:
            if state.ended:
                return False
            if why:
                state.ended = why
                if self._sessions.get(state.id) is state:
                    del self._sessions[state.id]
            handle, state.handle = state.handle, None
            state.engine = None
            state.checkpoint = None
            state.files = None
            state.generation += 1
            if handle is not None:
                handle.sessions.discard(state.id)
                handle.drops.append(state.id)
        return True

    def _session_info(self, state: SessionState) -> SessionInfo:
        state.check()
        handle = state.handle
        return state.info(handle.pid if handle is not None else None)

    def _pin(self, state: SessionState, request: RunRequest, deadline: float
             ) -> WorkerHandle:
        """The worker for the session's next call: its live one, or a new placement that
        restores the last checkpoint."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("no pool in in-process mode")
        handle = state.handle
        if handle is not None and pool.holds(handle):
            return handle
        handle = pool.place_session(deadline, self._per_worker)
        handle.sessions.add(state.id)
        state.handle = handle
        _restore_into(state, request.body)
        return handle

    def _session_done(self, state: SessionState, handle: WorkerHandle | None,
                      reply: dict[str, Any], generation: int) -> None:
        """Keep the checkpoint of a good run; forget a context the worker had to drop. A run
        that began before a reset() or close() changes nothing."""
        if generation != state.generation:
            return
        if isinstance(reply.get("state"), str):
            state.checkpoint = reply["state"]
            if isinstance(reply.get("files"), dict):
                state.files = reply["files"]
        if reply.get("dropped"):
            state.engine = None
            if handle is not None:
                handle.sessions.discard(state.id)
                if state.handle is handle:
                    state.handle = None


    def _state_request(self, state: SessionState, new: Mapping[str, Any] | None
                       ) -> tuple[RunRequest, HostFunctions]:
        """A request that reads the session's state (after setting ``new``'s globals)."""
        request, host = self._prepare("", {}, session=state)
        request.body.pop("globals_json", None)
        request.body.pop("tagged", None)
        if new is not None:
            if not isinstance(new, Mapping) or not all(isinstance(k, str) for k in new):
                raise TypeError("set_state takes a dict with str keys")
            text, tagged = values.encode(dict(new), what="state",
                                         limit=request.options.max_input_size)
            request.body["globals_json"] = text
            request.body["tagged"] = tagged
        return request, host

    def _state_of(self, request: RunRequest, reply: dict[str, Any]) -> dict[str, Any]:
        kind = str(reply.get("kind", "E"))
        if kind != "R":
            raise self._error_for(kind, str(reply.get("payload", "{}")), request)
        state = values.decode(str(reply.get("payload", "")).partition("\n")[2])
        return state if isinstance(state, dict) else {}

    def _stream_end(self, request: RunRequest, reply: dict[str, Any], pid: int | None,
                    started: float) -> IsoBoxError | None:
        """Record a stream that ended (once); returns its error, if it failed."""
        self._emit_violations(reply)
        final = [(str(k), str(m)) for k, m in reply.get("console", [])]
        if final:
            sink = self._output_sink(request, [])
            if sink is not None:
                sink(final)
        kind = str(reply.get("kind", "R"))
        error = None
        if kind != "R":
            error = self._error_for(kind, str(reply.get("payload", "{}")), request)
            error.worker_pid = pid
        self._record(time.monotonic() - started, float(reply.get("cpu_time", 0.0)),
                     int(reply.get("memory", 0)), error, pid)
        return error

    def _map_plan(self, code: str, options: dict[str, Any], *, retries: int, ordered: bool,
                  chunk_size: int, window: int | None) -> MapPlan:
        """Check a ``map`` call's options now (not at its first item)."""
        if self._closed:
            raise ClosedError("the box was shut down")
        sandbox = options.pop("sandbox", None)
        self._prepare("", {**options, "sandbox": sandbox})  # checked as run would check them
        if window is None:
            workers = self._pool.config.max if self._pool is not None else 4
            window = max(2, 2 * workers)
        return MapPlan(code, retries=retries, ordered=bool(ordered), chunk_size=chunk_size,
                       window=window, sandbox=dict(sandbox) if sandbox else None)

    def _chunk_request(self, plan: MapPlan, items: list[Any], options: dict[str, Any]
                       ) -> tuple[RunRequest, HostFunctions]:
        """One request for a chunk of map items (the worker's ``map`` op): every item's
        globals encoded here, the watchdog's budgets scaled to the chunk."""
        request, host = self._prepare(plan.code, {**options, "sandbox": plan.sandbox})
        opts = request.options
        base = dict(opts.sandbox or {})
        encoded = [values.encode({**base, "input": item}, what="input",
                                 limit=opts.max_input_size) for item in items]
        request.body["map_items"] = [[text, tagged] for text, tagged in encoded]
        request.body.pop("globals_json", None)
        request.body.pop("tagged", None)
        request.body["cpu_watch"] = opts.effective_cpu_timeout * len(items)
        # The supervisor's deadline covers the chunk; each item keeps its own CPU budget and
        # wall bound in the worker.
        scaled = dataclasses.replace(opts, timeout=opts.timeout * len(items))
        return dataclasses.replace(request, options=scaled), host

    def _chunk_outcomes(self, request: RunRequest, reply: dict[str, Any], pid: int | None,
                        started: float) -> list[tuple[bool, Any]]:
        """Each item's value or error from a chunk's reply (recorded as runs of their own)."""
        self._emit_violations(reply)
        found: list[tuple[bool, Any]] = []
        outcomes = reply.get("outcomes") or []
        share = (time.monotonic() - started) / max(1, len(outcomes))
        for kind, payload in outcomes:
            error: IsoBoxError | None = None
            if kind == "R":
                text = payload.partition("\n")[2]
                try:
                    found.append((True, values.decode(text)))
                except (ValueError, SerializationError) as exc:
                    error = exc if isinstance(exc, SerializationError) else SerializationError(
                        "the worker sent a malformed value", path="result")
            else:
                error = self._error_for(kind, payload, request)
            if error is not None:
                error.worker_pid = pid
                found.append((False, error))
            self._record(share, 0.0, 0, error, pid)
        return found

    def _remote_send(self, request: RunRequest, host: HostFunctions,
                     session: SessionState | None, *, sink: Any, started: float,
                     streamed: list[tuple[str, str]]
                     ) -> tuple[dict[str, Any], int | None, float, list[tuple[str, str]]]:
        """One run through the daemon (remote mode): the same reply a local worker gives."""
        if self._remote is None or session is not None:
            raise DaemonError(_NOT_REMOTE.format(what="sessions"))
        timeout = request.options.timeout
        try:
            reply, pid = self._remote.run(request.body, timeout=timeout + _grace(timeout) + 5.0,
                                          on_output=sink, call=host.call if host else None,
                                          priority=request.options.priority)
        except (TimeoutError, WorkerCrashedError) as exc:
            self._failed(exc, started, timeout)
            raise
        return reply, pid, started, streamed

    def _remote_result(self, found: Any, streamed: list[tuple[str, str]],
                       started: float) -> ExecutionResult:
        """A remote session run's result, rebuilt and recorded as a local one would be."""
        if not isinstance(found, dict):
            raise DaemonError("the daemon sent a malformed result")
        duration = time.monotonic() - started
        pid = found.get("worker_pid")
        result = ExecutionResult(
            value=values.decode(str(found.get("value", "null"))), duration=duration,
            cpu_time=float(found.get("cpu_time", 0.0)), memory=int(found.get("memory", 0)),
            type=str(found.get("type", "")), console=list(streamed),
            files=dict(found.get("files") or {}), worker_pid=pid if type(pid) is int else None)
        self._record(duration, result.cpu_time, result.memory, None, result.worker_pid)
        return result

    def _remote_failed(self, exc: BaseException, started: float) -> None:
        if isinstance(exc, IsoBoxError):
            self._record(time.monotonic() - started, 0.0, 0, exc, exc.worker_pid)

    def _end_all_sessions(self) -> None:
        with self._sessions_lock:
            states = list(self._sessions.values())
        for state in states:
            self._session_end(state, "closed")


def _sweep_loop(ref: weakref.ReferenceType[_BoxCore]) -> None:
    """The TTL sweeper thread: runs while its box lives and is open."""
    while True:
        time.sleep(_SWEEP_EVERY)
        box = ref()
        if box is None or box._closed:
            return
        box._sweep()
        del box


def _hold(state: SessionState, timeout: float) -> None:
    """Take a session's lock for a run or a stream, or fail clearly if it stays busy."""
    if not state.lock.acquire(timeout=timeout):
        raise SessionError(f"session {state.id!r} stayed busy for {timeout}s (another run or "
                           "an open stream holds it)")


async def _ahold(state: SessionState, timeout: float) -> asyncio.Lock:
    """The asyncio twin of :func:`_hold`; returns the lock to release."""
    lock = state.async_lock()
    try:
        async with asyncio.timeout(timeout):
            await lock.acquire()
    except builtins.TimeoutError:
        raise SessionError(f"session {state.id!r} stayed busy for {timeout}s (another run or "
                           "an open stream holds it)") from None
    return lock


def _restore_into(state: SessionState, body: dict[str, Any]) -> None:
    """A request that creates the session's context anew carries its last checkpoint: the
    JSON-able globals and, with MemFS, the files."""
    if state.checkpoint is not None:
        body["restore_json"] = state.checkpoint
        body["restore_tagged"] = True
    if state.files is not None and isinstance(body.get("filesystem"), dict):
        body["filesystem"] = {**body["filesystem"], "files": state.files}


def _stream_engine(session: SessionState | None, spec: RunSpec) -> tuple[Engine, RunSpec]:
    """In-process mode: a session's own engine (a new one restores the checkpoint), or a new
    engine for a stream (one may be pumped from several threads, so it never uses a thread's
    shared engine); and the stream's spec."""
    spec = dataclasses.replace(spec, stream=True)
    if session is None:
        return Engine(), spec
    if session.engine is None:
        session.engine = Engine()
        if session.checkpoint is not None:
            spec = dataclasses.replace(spec, restore_json=session.checkpoint,
                                       restore_tagged=True)
        if session.files is not None and spec.filesystem is not None:
            spec = dataclasses.replace(spec, filesystem={**spec.filesystem,
                                                         "files": session.files})
    return session.engine, spec


def _placement_failed() -> WorkerCrashedError:
    """Three placements of a session in a row lost their worker before the request went out."""
    return WorkerCrashedError("the session's worker kept leaving the pool",
                              cause="session placement")


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_ttl(ttl: Any) -> None:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")


def _stream_limits(window: Any, idle_timeout: Any) -> tuple[int, float | None]:
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 65536:
        raise ValueError(f"window must be an int between 1 and 65536, got {window!r}")
    if idle_timeout is not None and (isinstance(idle_timeout, bool)
                                     or not isinstance(idle_timeout, (int, float))
                                     or not idle_timeout > 0):
        raise ValueError(f"idle_timeout must be a positive number of seconds, got "
                         f"{idle_timeout!r}")
    return window, None if idle_timeout is None else float(idle_timeout)


class IsoBox(_BoxCore):
    """Runs untrusted JavaScript in supervised worker processes (or in-process)."""

    def __init__(self, *, mode: str = "process", pool: Mapping[str, Any] | None = None,
                 address: str | None = None, **options: Any) -> None:
        super().__init__(mode=mode, pool=pool, address=address, options=options)

    def run(self, code: str, **options: Any) -> Any:
        """Run ``code``; return its completion value (see README: the value table)."""
        return self.execute(code, **options).value

    def execute(self, code: str, **options: Any) -> ExecutionResult:
        """Run ``code``; return the value with console output, timings and memory."""
        request, host = self._prepare(code, options)
        reply, pid, started, streamed = self._send(request, host)
        return self._complete(request, reply, pid, started, streamed)

    def validate_code(self, code: str, **options: Any) -> CodeValidation:
        """Parse ``code`` in the sandbox without running it."""
        request, host = self._prepare(code, options, validate=True)
        reply, _pid, _started, _streamed = self._send(request, host)
        return self._validation(request, reply)

    def run_project(self, files: Any, entrypoint: str, **options: Any) -> Any:
        """Run a project of several files from ``entrypoint``; return its completion value
        (or what it exported). See README: Projects and require."""
        request, host = self._project(files, entrypoint, options)
        reply, pid, started, streamed = self._send(request, host)
        return self._complete(request, reply, pid, started, streamed).value

    def _send(self, request: RunRequest, host: HostFunctions,
              session: SessionState | None = None, op: str = "run"
              ) -> tuple[dict[str, Any], int | None, float, list[tuple[str, str]]]:
        started = time.monotonic()
        streamed: list[tuple[str, str]] = []
        sink = self._output_sink(request, streamed)
        generation = session.generation if session is not None else 0
        if self._remote is not None:
            return self._remote_send(request, host, session, sink=sink, started=started,
                                     streamed=streamed)
        if self._pool is None:
            reply = self._inprocess_reply(request, sink, host, session, op)
            if session is not None:
                self._session_done(session, None, reply, generation)
            return reply, None, started, streamed
        deadline = started + request.options.timeout
        kill_at = deadline + _grace(request.options.timeout)
        if op != "run":
            request.body["op"] = op
        try:
            for _attempt in range(3):
                want = self._pin(session, request, deadline) if session is not None else None
                try:
                    reply, handle = self._pool.run(request.body, deadline=deadline,
                                                   kill_at=kill_at, on_output=sink,
                                                   host=host or None, want=want)
                except PinLost:
                    continue  # the pinned worker left the pool: place the session again
                if session is not None:
                    self._session_done(session, handle, reply, generation)
                return reply, handle.pid, started, streamed
            raise _placement_failed()
        except (TimeoutError, WorkerCrashedError) as exc:
            self._failed(exc, started, request.options.timeout)
            raise

    def run_stream(self, code: str, *, window: int = 256, idle_timeout: float | None = None,
                   **options: Any) -> Generator[Any, None, None]:
        """Stream the values ``code`` yields (top-level ``yield``) or its iterable evaluates
        to; leaving the loop early stops the generator and frees the worker."""
        if self._remote is not None:
            return remote_stream(self, code, options, window, idle_timeout)
        return self._stream(code, options, window, idle_timeout, None)

    def _stream(self, code: str, options: dict[str, Any], window: int,
                idle_timeout: float | None, session: SessionState | None
                ) -> Generator[Any, None, None]:
        window, idle_timeout = _stream_limits(window, idle_timeout)
        request, host = self._prepare(code, options, session=session)
        if session is not None:
            session.check()
        return self._stream_values(request, host, window, idle_timeout, session)

    def _stream_values(self, request: RunRequest, host: HostFunctions, window: int,
                       idle_timeout: float | None, session: SessionState | None
                       ) -> Generator[Any, None, None]:
        if session is not None:
            _hold(session, request.options.timeout)
            try:
                session.check()
                session.busy += 1
                yield from self._stream_on(request, host, window, idle_timeout, session)
            finally:
                session.busy -= 1
                session.touch()
                session.lock.release()
        else:
            yield from self._stream_on(request, host, window, idle_timeout, None)

    def _stream_on(self, request: RunRequest, host: HostFunctions, window: int,
                   idle_timeout: float | None, session: SessionState | None
                   ) -> Generator[Any, None, None]:
        started = time.monotonic()
        streamed: list[tuple[str, str]] = []
        sink = self._output_sink(request, streamed)
        generation = session.generation if session is not None else 0
        if self._pool is None:
            yield from self._local_stream(request, host, sink, window=window, session=session,
                                          started=started)
            return
        deadline = started + request.options.timeout
        kill_at = deadline + _grace(request.options.timeout)
        stream: PoolStream | None = None
        try:
            for _attempt in range(3):
                want = self._pin(session, request, deadline) if session is not None else None
                try:
                    stream = open_stream(self._pool, request.body, deadline=deadline,
                                         kill_at=kill_at, on_output=sink, host=host or None,
                                         want=want, window=window, idle_timeout=idle_timeout)
                    break
                except PinLost:
                    continue
            if stream is None:
                raise _placement_failed()
            quarter, taken = max(1, window // 4), 0
            while (batch := stream.next_batch()) is not None:
                for value in batch[0]:
                    yield value
                    taken += 1
                    if taken >= quarter:  # credit goes back in quarter windows, not per value
                        stream.consumed(taken)
                        taken = 0
            reply = stream.result or {}
            if session is not None:
                self._session_done(session, stream.worker, reply, generation)
        except (TimeoutError, WorkerCrashedError) as exc:
            self._failed(exc, started, request.options.timeout)
            raise
        finally:
            if stream is not None and stream.result is None:
                stream.close()
        error = self._stream_end(request, reply, stream.pid, started)
        if error is not None:
            raise error

    def _local_stream(self, request: RunRequest, host: HostFunctions, sink: Any, *,
                      window: int, session: SessionState | None, started: float
                      ) -> Generator[Any, None, None]:
        generation = session.generation if session is not None else 0
        engine, spec = _stream_engine(session, self._local_spec(request))
        stream = engine.open_stream(spec, _LocalIO(sink, host))
        try:
            while not stream.done:
                items, _count = stream.pump(window)
                yield from values.decode(items)
        finally:
            stream.close()
        reply = reply_body(stream.outcome) if stream.outcome else {}
        if session is not None:
            self._session_done(session, None, reply, generation)
        error = self._stream_end(request, reply, None, started)
        if error is not None:
            raise error

    # -- sessions --------------------------------------------------------------------------
    def map(self, code: str, inputs: Iterable[Any], *, retries: int = 2, ordered: bool = True,
            chunk_size: int = 64, window: int | None = None,
            **options: Any) -> Iterator[BatchItem]:
        """Run ``code`` once per input (the global ``input``); yields a :class:`BatchItem` per
        input as results finish (in input order if ``ordered``). See README: Batch jobs."""
        plan = self._map_plan(code, options, retries=retries, ordered=ordered,
                              chunk_size=chunk_size, window=window)
        return self._map(plan, inputs, options)

    def _map(self, plan: MapPlan, inputs: Iterable[Any],
             options: dict[str, Any]) -> Iterator[BatchItem]:
        check = self.validate_code(plan.code, **_validation_options(options))
        if not check.valid:
            for index, _ in enumerate(inputs):
                yield BatchItem(index, False, error=check.error)
            return

        def execute(code: str, sandbox: dict[str, Any]) -> ExecutionResult:
            return self.execute(code, **options, sandbox=sandbox)

        def run_items(items: list[Any]) -> list[tuple[bool, Any]]:
            request, host = self._chunk_request(plan, items, options)
            reply, pid, started, _streamed = self._send(request, host, op="map")
            return self._chunk_outcomes(request, reply, pid, started)

        yield from map_sync(plan, inputs, execute, run_items, threads=plan.window)

    def create_session(self, session_id: str, *, ttl: float | None = 600.0,
                       **options: Any) -> Session:
        """A new session: one live context, kept between runs (see README: Sessions)."""
        if self._remote is not None:
            return RemoteSession.create(self, session_id, ttl, options)
        return Session(self, self._new_session(session_id, ttl, options))

    def get_session(self, session_id: str) -> Session:
        """The open session ``session_id``; :class:`SessionError` if unknown or ended."""
        if self._remote is not None:
            return RemoteSession.open(self, session_id)
        return Session(self, self._lookup(session_id))

    def _session_execute(self, state: SessionState, code: str, options: dict[str, Any],
                         project: tuple[object, str] | None = None) -> ExecutionResult:
        state.check()
        request, host = (self._prepare(code, options, session=state) if project is None
                         else self._project(*project, options, session=state))
        _hold(state, request.options.timeout)
        try:
            state.check()
            state.busy += 1
            try:
                reply, pid, started, streamed = self._send(request, host, state)
            except (TimeoutError, WorkerCrashedError):
                state.execution_count += 1  # it ran (or was let run) and died: it counts
                raise
            state.execution_count += 1
            return self._complete(request, reply, pid, started, streamed)
        finally:
            state.busy -= 1
            state.touch()
            state.lock.release()

    def _session_state(self, state: SessionState, new: Mapping[str, Any] | None
                       ) -> dict[str, Any]:
        state.check()
        request, host = self._state_request(state, new)
        _hold(state, request.options.timeout)
        try:
            state.check()
            state.busy += 1
            reply, _pid, _started, _streamed = self._send(request, host, state, "state")
            return self._state_of(request, reply)
        finally:
            state.busy -= 1
            state.touch()
            state.lock.release()

    def pool_stats(self) -> PoolStats:
        """Per-worker figures (rss, uss, cpu) and pool counts."""
        return self._pool_stats()

    def warmup_pool(self, timeout: float = 30.0) -> int:
        """Block until the pool's ``min`` workers are ready; returns how many are."""
        if self._remote is not None:
            return len(self._pool_stats().workers)
        return self._pool.warmup(timeout) if self._pool else 0

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker and the fork server (remote mode: close the connection; the
        daemon's workers stay); later runs raise :class:`ClosedError`."""
        self._closed = True
        self._end_all_sessions()
        if self._remote is not None:
            self._remote.close()
            self._finalizer.detach()
        if self._pool is not None:
            self._pool.shutdown(timeout)
            self._finalizer.detach()

    def __enter__(self) -> IsoBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class AsyncIsoBox(_BoxCore):
    """The asyncio twin of :class:`IsoBox`: the same names, awaited."""

    def __init__(self, *, mode: str = "process", pool: Mapping[str, Any] | None = None,
                 address: str | None = None, **options: Any) -> None:
        super().__init__(mode=mode, pool=pool, address=address, options=options)

    async def run(self, code: str, **options: Any) -> Any:
        """Run ``code``; return its completion value."""
        return (await self.execute(code, **options)).value

    async def execute(self, code: str, **options: Any) -> ExecutionResult:
        """Run ``code``; return the value with console output, timings and memory."""
        request, host = self._prepare(code, options)
        reply, pid, started, streamed = await self._send(request, host)
        return self._complete(request, reply, pid, started, streamed)

    async def validate_code(self, code: str, **options: Any) -> CodeValidation:
        """Parse ``code`` in the sandbox without running it."""
        request, host = self._prepare(code, options, validate=True)
        reply, _pid, _started, _streamed = await self._send(request, host)
        return self._validation(request, reply)

    async def run_project(self, files: Any, entrypoint: str, **options: Any) -> Any:
        """Run a project of several files from ``entrypoint``; return its completion value
        (or what it exported)."""
        request, host = self._project(files, entrypoint, options)
        reply, pid, started, streamed = await self._send(request, host)
        return self._complete(request, reply, pid, started, streamed).value

    async def _send(self, request: RunRequest, host: HostFunctions,
                    session: SessionState | None = None, op: str = "run"
                    ) -> tuple[dict[str, Any], int | None, float, list[tuple[str, str]]]:
        started = time.monotonic()
        streamed: list[tuple[str, str]] = []
        sink = self._output_sink(request, streamed)
        generation = session.generation if session is not None else 0
        if self._remote is not None:
            return await Cancellable(self._remote).call(
                self._remote_send, request, host, session, sink=sink, started=started,
                streamed=streamed)
        if self._pool is None:
            reply = await asyncio.to_thread(self._inprocess_reply, request, sink, host,
                                            session, op)
            if session is not None:
                self._session_done(session, None, reply, generation)
            return reply, None, started, streamed
        deadline = started + request.options.timeout
        kill_at = deadline + _grace(request.options.timeout)
        if op != "run":
            request.body["op"] = op
        try:
            for _attempt in range(3):
                want = (await asyncio.to_thread(self._pin, session, request, deadline)
                        if session is not None else None)
                try:
                    reply, handle = await self._pool.run_async(
                        request.body, deadline=deadline, kill_at=kill_at, on_output=sink,
                        host=host or None, want=want)
                except PinLost:
                    continue
                if session is not None:
                    self._session_done(session, handle, reply, generation)
                return reply, handle.pid, started, streamed
            raise _placement_failed()
        except (TimeoutError, WorkerCrashedError) as exc:
            self._failed(exc, started, request.options.timeout)
            raise

    def run_stream(self, code: str, *, window: int = 256, idle_timeout: float | None = None,
                   **options: Any) -> AsyncGenerator[Any, None]:
        """Stream the values ``code`` yields (an async iterator); leaving the loop early,
        ``aclose()`` or cancelling the task stops the generator and frees the worker."""
        if self._remote is not None:
            return athread_stream(self._remote,
                                  remote_stream(self, code, options, window, idle_timeout))
        return self._stream(code, options, window, idle_timeout, None)

    def _stream(self, code: str, options: dict[str, Any], window: int,
                idle_timeout: float | None, session: SessionState | None
                ) -> AsyncGenerator[Any, None]:
        window, idle_timeout = _stream_limits(window, idle_timeout)
        request, host = self._prepare(code, options, session=session)
        if session is not None:
            session.check()
        return self._stream_values(request, host, window, idle_timeout, session)

    async def _stream_values(self, request: RunRequest, host: HostFunctions, window: int,
                             idle_timeout: float | None, session: SessionState | None
                             ) -> AsyncGenerator[Any, None]:
        # Inner async generators are closed explicitly (aclosing): closing this one must run
        # their cleanup (CANCEL, return()) before it returns, not when the loop finalizes them.
        if session is None:
            async with contextlib.aclosing(self._stream_on(request, host, window, idle_timeout,
                                                           None)) as inner:
                async for value in inner:
                    yield value
            return
        lock = await _ahold(session, request.options.timeout)
        try:
            session.check()
            session.busy += 1
            async with contextlib.aclosing(self._stream_on(request, host, window, idle_timeout,
                                                           session)) as inner:
                async for value in inner:
                    yield value
        finally:
            session.busy -= 1
            session.touch()
            lock.release()

    async def _stream_on(self, request: RunRequest, host: HostFunctions, window: int,
                         idle_timeout: float | None, session: SessionState | None
                         ) -> AsyncGenerator[Any, None]:
        started = time.monotonic()
        streamed: list[tuple[str, str]] = []
        sink = self._output_sink(request, streamed)
        generation = session.generation if session is not None else 0
        if self._pool is None:
            async with contextlib.aclosing(self._local_stream(
                    request, host, sink, window=window, session=session,
                    started=started)) as inner:
                async for value in inner:
                    yield value
            return
        stream: PoolStream | None = None
        try:
            stream = await self._open_stream(request, host, sink, session, window=window,
                                             idle_timeout=idle_timeout)
            quarter, taken = max(1, window // 4), 0
            while (batch := await stream.anext_batch()) is not None:
                for value in batch[0]:
                    yield value
                    taken += 1
                    if taken >= quarter:
                        await stream.aconsumed(taken)
                        taken = 0
            reply = stream.result or {}
            if session is not None:
                self._session_done(session, stream.worker, reply, generation)
        except (TimeoutError, WorkerCrashedError) as exc:
            self._failed(exc, started, request.options.timeout)
            raise
        finally:
            if stream is not None and stream.result is None:
                await stream.aclose()
        error = self._stream_end(request, reply, stream.pid, started)
        if error is not None:
            raise error

    async def _open_stream(self, request: RunRequest, host: HostFunctions, sink: Any,
                           session: SessionState | None, *, window: int,
                           idle_timeout: float | None) -> PoolStream:
        pool = self._pool
        if pool is None:
            raise RuntimeError("no pool in in-process mode")
        started = time.monotonic()
        deadline = started + request.options.timeout
        kill_at = deadline + _grace(request.options.timeout)
        for _attempt in range(3):
            want = (await asyncio.to_thread(self._pin, session, request, deadline)
                    if session is not None else None)
            try:
                return await open_stream_async(
                    pool, request.body, deadline=deadline, kill_at=kill_at, on_output=sink,
                    host=host or None, want=want, window=window, idle_timeout=idle_timeout)
            except PinLost:
                continue
        raise _placement_failed()

    async def _local_stream(self, request: RunRequest, host: HostFunctions, sink: Any, *,
                            window: int, session: SessionState | None, started: float
                            ) -> AsyncGenerator[Any, None]:
        generation = session.generation if session is not None else 0
        engine, spec = _stream_engine(session, self._local_spec(request))
        stream = await asyncio.to_thread(engine.open_stream, spec, _LocalIO(sink, host))
        try:
            while not stream.done:
                items, _count = await asyncio.to_thread(stream.pump, window)
                for value in values.decode(items):
                    yield value
        finally:
            await asyncio.to_thread(stream.close)
        reply = reply_body(stream.outcome) if stream.outcome else {}
        if session is not None:
            self._session_done(session, None, reply, generation)
        error = self._stream_end(request, reply, None, started)
        if error is not None:
            raise error

    # -- sessions --------------------------------------------------------------------------
    def map(self, code: str, inputs: Iterable[Any], *, retries: int = 2, ordered: bool = True,
            chunk_size: int = 64, window: int | None = None,
            **options: Any) -> AsyncIterator[BatchItem]:
        """Run ``code`` once per input; an async iterator of :class:`BatchItem` (see
        :meth:`IsoBox.map`)."""
        plan = self._map_plan(code, options, retries=retries, ordered=ordered,
                              chunk_size=chunk_size, window=window)
        return self._map(plan, inputs, options)

    async def _map(self, plan: MapPlan, inputs: Iterable[Any],
                   options: dict[str, Any]) -> AsyncIterator[BatchItem]:
        check = await self.validate_code(plan.code, **_validation_options(options))
        if not check.valid:
            for index, _ in enumerate(inputs):
                yield BatchItem(index, False, error=check.error)
            return

        async def execute(code: str, sandbox: dict[str, Any]) -> ExecutionResult:
            return await self.execute(code, **options, sandbox=sandbox)

        async def run_items(items: list[Any]) -> list[tuple[bool, Any]]:
            request, host = self._chunk_request(plan, items, options)
            reply, pid, started, _streamed = await self._send(request, host, op="map")
            return self._chunk_outcomes(request, reply, pid, started)

        async for item in map_async(plan, inputs, execute, run_items):
            yield item

    async def create_session(self, session_id: str, *, ttl: float | None = 600.0,
                             **options: Any) -> AsyncSession:
        """A new session: one live context, kept between runs (see README: Sessions)."""
        if self._remote is not None:
            inner = await Cancellable(self._remote).call(RemoteSession.create, self, session_id,
                                                         ttl, options)
            return AsyncRemoteSession(self, inner)
        return AsyncSession(self, self._new_session(session_id, ttl, options))

    async def get_session(self, session_id: str) -> AsyncSession:
        """The open session ``session_id``; :class:`SessionError` if unknown or ended."""
        if self._remote is not None:
            inner = await Cancellable(self._remote).call(RemoteSession.open, self, session_id)
            return AsyncRemoteSession(self, inner)
        return AsyncSession(self, self._lookup(session_id))

    async def _session_execute(self, state: SessionState, code: str,
                               options: dict[str, Any],
                               project: tuple[object, str] | None = None) -> ExecutionResult:
        state.check()
        request, host = (self._prepare(code, options, session=state) if project is None
                         else self._project(*project, options, session=state))
        lock = await _ahold(state, request.options.timeout)
        try:
            state.check()
            state.busy += 1
            try:
                reply, pid, started, streamed = await self._send(request, host, state)
            except (TimeoutError, WorkerCrashedError):
                state.execution_count += 1  # it ran (or was let run) and died: it counts
                raise
            state.execution_count += 1
            return self._complete(request, reply, pid, started, streamed)
        finally:
            state.busy -= 1
            state.touch()
            lock.release()

    async def _session_state(self, state: SessionState, new: Mapping[str, Any] | None
                             ) -> dict[str, Any]:
        state.check()
        request, host = self._state_request(state, new)
        lock = await _ahold(state, request.options.timeout)
        try:
            state.check()
            state.busy += 1
            reply, _pid, _started, _streamed = await self._send(request, host, state, "state")
            return self._state_of(request, reply)
        finally:
            state.busy -= 1
            state.touch()
            lock.release()

    async def pool_stats(self) -> PoolStats:
        """Per-worker figures (rss, uss, cpu) and pool counts."""
        return await asyncio.to_thread(self._pool_stats)

    async def warmup_pool(self, timeout: float = 30.0) -> int:
        """Wait until the pool's ``min`` workers are ready; returns how many are."""
        if self._remote is not None:
            return len((await self.pool_stats()).workers)
        pool = self._pool
        return await asyncio.to_thread(pool.warmup, timeout) if pool else 0

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker and the fork server (remote mode: close the connection; the
        daemon's workers stay); later runs raise :class:`ClosedError`."""
        self._closed = True
        self._end_all_sessions()
        if self._remote is not None:
            self._remote.close()
            self._finalizer.detach()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, timeout)
            self._finalizer.detach()

    async def __aenter__(self) -> AsyncIsoBox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
