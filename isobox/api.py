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
import dataclasses
import json
import logging
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from isobox import values
from isobox.errors import (
    ClosedError,
    CompileError,
    IsoBoxError,
    MemoryLimitError,
    ScriptError,
    SecurityError,
    SerializationError,
    TimeoutError,
    WorkerCrashedError,
)
from isobox.events import EventEmitter, Handler
from isobox.metrics import MetricsRecorder
from isobox.options import RUN_OVERRIDES, BoxOptions, RunRequest, build_request, pool_config
from isobox.results import (
    CodeValidation,
    ExecutionMetrics,
    ExecutionResult,
    GlobalMetrics,
    PoolStats,
    WorkerStats,
)
from isobox.supervisor.pool import Pool

__all__ = ["AsyncIsoBox", "IsoBox"]

log = logging.getLogger("isobox")

_MODES = ("process", "inprocess")


def _grace(timeout: float) -> float:
    """How long past the wall deadline the watchdog waits, so a CPU timeout can report itself."""
    return min(1.0, 0.02 + 0.1 * timeout)


class _BoxCore:
    """IO-free logic shared by the sync and async boxes."""

    def __init__(self, *, mode: str, pool: Mapping[str, Any] | None, address: str | None,
                 options: dict[str, Any]) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if address is not None:
            raise IsoBoxError("remote mode (address=...) is not available yet")
        for unsupported in ("filesystem", "require", "functions"):
            if options.get(unsupported):
                raise IsoBoxError(f"the {unsupported!r} option is not available yet")
            options.pop(unsupported, None)
        self._options = BoxOptions(**options)
        config = pool_config(pool)
        self._mode = mode
        self._events = EventEmitter()
        self._metrics = MetricsRecorder()
        self._closed = False
        self._pool: Pool | None = None
        self._engines = threading.local()
        if mode == "process":
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
        if self._pool is None:
            return PoolStats(workers=[], restarts=0, queued=0)
        rows, queued = self._pool.snapshot()
        return PoolStats(workers=[WorkerStats(**row) for row in rows],
                         restarts=self._pool.restarts, queued=queued)

    # -- preparing and completing runs -----------------------------------------------------
    def _prepare(self, code: str, overrides: dict[str, Any], *, validate: bool = False
                 ) -> RunRequest:
        if self._closed:
            raise ClosedError("the box was shut down")
        filename = overrides.pop("filename", None)
        language = overrides.pop("language", None)
        unknown = set(overrides) - RUN_OVERRIDES
        if unknown:
            raise TypeError(f"unknown run option(s) {sorted(unknown)}")
        return build_request(code, self._options.with_overrides(overrides), filename, language,
                             validate=validate)

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
        value = values.decode(text)
        self._record(duration, cpu_time, memory, None, pid)
        return ExecutionResult(value=value, duration=duration, cpu_time=cpu_time, memory=memory,
                               type=type_name, console=list(streamed), worker_pid=pid)

    def _error_for(self, kind: str, payload: str, request: RunRequest) -> IsoBoxError:
        opts = request.options
        record: dict[str, Any] = json.loads(payload) if payload else {}
        if kind == "T":
            return TimeoutError(f"the run exceeded its CPU budget of {opts.effective_cpu_timeout}s",
                                kind="cpu", limit=opts.effective_cpu_timeout)
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
        if name == "SecurityError":
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

    def _failed(self, error: IsoBoxError, started: float) -> None:
        """Record a run that ended without a reply (wall timeout, crash)."""
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

    def _inprocess_reply(self, request: RunRequest, sink: Any) -> dict[str, Any]:
        from isobox.workers.engine import RunSpec  # noqa: PLC0415 - only in-process mode needs it
        from isobox.workers.worker import reply_body  # noqa: PLC0415

        spec = RunSpec.from_body(request.body)
        # No watchdog here: the CPU budget is the only bound, so it never exceeds the timeout.
        spec = dataclasses.replace(spec, cpu_timeout=min(spec.cpu_timeout, request.options.timeout))
        engine = self._engine()
        outcome = engine.run(spec, sink)
        if outcome.retire:
            self._engines.engine = None
        else:
            engine.prepare()
        return reply_body(outcome)


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
        request = self._prepare(code, options)
        reply, pid, started, streamed = self._send(request)
        return self._complete(request, reply, pid, started, streamed)

    def validate_code(self, code: str, **options: Any) -> CodeValidation:
        """Parse ``code`` in the sandbox without running it."""
        request = self._prepare(code, options, validate=True)
        reply, _pid, _started, _streamed = self._send(request)
        return self._validation(request, reply)

    def _send(self, request: RunRequest
              ) -> tuple[dict[str, Any], int | None, float, list[tuple[str, str]]]:
        started = time.monotonic()
        streamed: list[tuple[str, str]] = []
        sink = self._output_sink(request, streamed)
        if self._pool is None:
            return self._inprocess_reply(request, sink), None, started, streamed
        deadline = started + request.options.timeout
        try:
            reply, pid = self._pool.run(request.body, deadline=deadline,
                                        kill_at=deadline + _grace(request.options.timeout),
                                        on_output=sink)
        except (TimeoutError, WorkerCrashedError) as exc:
            self._failed(exc, started)
            raise
        return reply, pid, started, streamed

    def pool_stats(self) -> PoolStats:
        """Per-worker figures (rss, uss, cpu) and pool counts."""
        return self._pool_stats()

    def warmup_pool(self, timeout: float = 30.0) -> int:
        """Block until the pool's ``min`` workers are ready; returns how many are."""
        return self._pool.warmup(timeout) if self._pool else 0

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker and the fork server; later runs raise :class:`ClosedError`."""
        self._closed = True
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
        request = self._prepare(code, options)
        reply, pid, started, streamed = await self._send(request)
        return self._complete(request, reply, pid, started, streamed)

    async def validate_code(self, code: str, **options: Any) -> CodeValidation:
        """Parse ``code`` in the sandbox without running it."""
        request = self._prepare(code, options, validate=True)
        reply, _pid, _started, _streamed = await self._send(request)
        return self._validation(request, reply)

    async def _send(self, request: RunRequest
                    ) -> tuple[dict[str, Any], int | None, float, list[tuple[str, str]]]:
        started = time.monotonic()
        streamed: list[tuple[str, str]] = []
        sink = self._output_sink(request, streamed)
        if self._pool is None:
            reply = await asyncio.to_thread(self._inprocess_reply, request, sink)
            return reply, None, started, streamed
        deadline = started + request.options.timeout
        try:
            reply, pid = await self._pool.run_async(
                request.body, deadline=deadline,
                kill_at=deadline + _grace(request.options.timeout), on_output=sink)
        except (TimeoutError, WorkerCrashedError) as exc:
            self._failed(exc, started)
            raise
        return reply, pid, started, streamed

    async def pool_stats(self) -> PoolStats:
        """Per-worker figures (rss, uss, cpu) and pool counts."""
        return await asyncio.to_thread(self._pool_stats)

    async def warmup_pool(self, timeout: float = 30.0) -> int:
        """Wait until the pool's ``min`` workers are ready; returns how many are."""
        pool = self._pool
        return await asyncio.to_thread(pool.warmup, timeout) if pool else 0

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker and the fork server; later runs raise :class:`ClosedError`."""
        self._closed = True
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, timeout)
            self._finalizer.detach()

    async def __aenter__(self) -> AsyncIsoBox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
