"""The QuickJS engine wrapper: the only module that imports the binding.

One :class:`Engine` runs one request at a time in a fresh context and prepares the next context
while idle (:meth:`Engine.prepare`), so context creation is not on the request path. It is used
by the worker process and, unchanged, by ``mode="inprocess"``.

Budgeting (DESIGN.md §9): the binding restarts its CPU limit at every call into JS, so the engine
keeps one CPU budget for the whole run, sets the remaining part before each call, and stops
draining the promise queue when it is spent. Values and errors are converted inside JS by the
trusted prelude and come back as one string; the engine never calls ``.json()`` or ``get()`` on
an untrusted object.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import _quickjs

__all__ = ["Engine", "RunOutcome", "RunSpec"]

_PRELUDE = resources.files(__package__).joinpath("prelude.js").read_text(encoding="utf-8")
# Library sources are handed over as plain strings (ASCII, so the binding copies them intact).
_HOT = resources.files(__package__).joinpath("hot.js").read_text(encoding="utf-8")
_COLD = resources.files(__package__).joinpath("cold.js").read_text(encoding="utf-8")
if not (_PRELUDE.isascii() and _HOT.isascii() and _COLD.isascii()):
    raise RuntimeError("the JS prelude and libraries must be ASCII")
_MIN_CALL_BUDGET = 0.001
_MAX_JOBS = 10_000_000  # a backstop: the CPU budget ends job floods long before this
_CONSOLE_EVERY = 0.01  # seconds between console flushes while the promise queue drains


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One run request as the engine sees it (already validated by the caller)."""

    code: str
    globals_json: str | None = None  # ASCII JSON object (tagged specials), or None
    tagged: bool = False
    env_json: str | None = None
    cpu_timeout: float = 30.0
    memory_limit: int = 128 * 2**20
    stack_limit: int = 1 * 2**20
    console: str = "redirect"
    max_result: int = 16 * 2**20
    max_console: int = 1 * 2**20
    max_error: int = 64 * 2**10
    validate: bool = False  # only parse the code; the outcome is R (valid) or C

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RunSpec:
        """The spec of a RUN frame body (unknown keys are ignored; a bad type raises)."""
        return cls(**{k: v for k, v in body.items() if k in _SPEC_FIELDS})


@dataclass(slots=True)
class RunOutcome:
    """What a run produced. ``kind``: R ok, E script error, C compile error, S serialization,
    T CPU timeout, M memory limit, X console overflow. ``retire``: the context or the process
    may be damaged, so the worker should be replaced."""

    kind: str
    payload: str  # R: the value as tagged JSON; otherwise a JSON error record
    console: list[tuple[str, str]] = field(default_factory=list)
    cpu_time: float = 0.0
    memory: int = 0
    retire: bool = False


_SPEC_FIELDS = frozenset(RunSpec.__dataclass_fields__)
OutputSink = Callable[[list[tuple[str, str]]], None]


class _Budget:
    """The run's CPU budget, measured on this thread's CPU clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.thread_time()

    def remaining(self) -> float:
        return self.seconds - (time.thread_time() - self.start)

    def used(self) -> float:
        return time.thread_time() - self.start


class _CpuExhausted(Exception):
    pass


class Engine:
    """Runs requests in fresh QuickJS contexts, one at a time (not thread-safe)."""

    def __init__(self) -> None:
        self._ready: tuple[Any, Any] | None = None
        self._spent: tuple[Any, Any] | None = None

    def prepare(self) -> None:
        """Free the last run's context and build the next one, while nobody waits for either."""
        self._spent = None
        if self._ready is None:
            ctx = _quickjs.Context()
            fn = ctx.eval(_PRELUDE)
            fn("hot", _HOT)
            fn("cold", _COLD)
            self._ready = (ctx, fn)

    def run(self, spec: RunSpec, on_output: OutputSink | None = None) -> RunOutcome:
        """Run one request in a fresh context; never raises for anything the script does."""
        self.prepare()
        if self._ready is None:
            raise RuntimeError("engine has no prepared context")
        ctx, fn = self._spent = self._ready
        self._ready = None
        ctx.set_memory_limit(spec.memory_limit)
        ctx.set_max_stack_size(spec.stack_limit)
        budget = _Budget(spec.cpu_timeout)
        try:
            outcome = self._drive(ctx, fn, spec, budget, on_output)
        except _quickjs.JSException as exc:
            outcome = _classify_engine_failure(str(exc), spec, ctx, fn, budget)
        except _CpuExhausted:
            outcome = _timeout_outcome(spec, ctx, fn)
        except Exception as exc:  # the binding failed to convert something: never crash the worker
            record = {"name": "InternalError", "stack": "",
                      "message": f"the engine failed: {type(exc).__name__}: {exc}"[:500]}
            outcome = RunOutcome("E", json.dumps(record), retire=True)
        outcome.cpu_time = budget.used()
        with contextlib.suppress(Exception):  # a poisoned runtime may refuse; figure is optional
            outcome.memory = int(ctx.memory()["memory_used_size"])
        return outcome

    def _call(self, ctx: Any, fn: Any, budget: _Budget, op: str, arg: str = "") -> str:
        left = budget.remaining()
        if left <= 0:
            raise _CpuExhausted
        ctx.set_time_limit(max(left, _MIN_CALL_BUDGET))
        result = fn(op, arg)
        if not isinstance(result, str):
            raise _quickjs.JSException("prelude returned a non-string")
        return result

    def _drive(
        self, ctx: Any, fn: Any, spec: RunSpec, budget: _Budget, on_output: OutputSink | None
    ) -> RunOutcome:
        # Globals and env arrive as JSON text already; splice them in rather than re-encode.
        limits = json.dumps({"result": spec.max_result, "console": spec.max_console,
                             "error": spec.max_error})
        code = json.dumps(spec.code)
        request = (f'{{"limits":{limits},"console":{json.dumps(spec.console)},'
                   f'"tagged":{"true" if spec.tagged else "false"},"code":{code},'
                   f'"globals":{spec.globals_json or "null"},"env":{spec.env_json or "null"}}}')
        if spec.validate:
            self._call(ctx, fn, budget, "setup", request)
            error = self._call(ctx, fn, budget, "validate", code)
            return RunOutcome("C", error) if error else RunOutcome("R", "null\nnull")
        # One call sets the globals up and evaluates the code: one crossing fewer per run.
        self._call(ctx, fn, budget, "run", request)
        # Drained even when the completion value is not a promise: `p.then(...)` reactions and
        # their output belong to the run (it returns at once on an empty queue).
        self._drain_jobs(ctx, fn, budget, on_output)
        return _parse_finish(self._call(ctx, fn, budget, "finish"), spec)

    def _drain_jobs(
        self, ctx: Any, fn: Any, budget: _Budget, on_output: OutputSink | None
    ) -> None:
        next_flush = time.monotonic() + _CONSOLE_EVERY
        for _ in range(_MAX_JOBS):
            left = budget.remaining()
            if left <= 0:
                raise _CpuExhausted
            ctx.set_time_limit(max(left, _MIN_CALL_BUDGET))
            if not ctx.execute_pending_job():
                return
            if on_output is not None and time.monotonic() >= next_flush:
                next_flush = time.monotonic() + _CONSOLE_EVERY
                lines = self._call(ctx, fn, budget, "console")
                if lines not in ("[]", '"overflow"'):
                    on_output([(str(k), str(m)) for k, m in json.loads(lines)])
        raise _CpuExhausted


def _parse_finish(text: str, spec: RunSpec) -> RunOutcome:
    """Split the prelude's answer; a script that sabotaged the built-ins it relies on gets a
    plain error for its own run, never a crashed worker. The size caps are enforced here again:
    the JS side's checks run among user code (a user ``toJSON`` can inflate what it serialises)."""
    try:
        return _split_finish(text, spec)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        record = {"name": "Error", "stack": "",
                  "message": "the result could not be converted (were built-ins replaced?)"}
        return RunOutcome("E", json.dumps(record), retire=True)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "... [truncated]"


def _split_finish(text: str, spec: RunSpec) -> RunOutcome:
    kind = text[0]
    colon = text.index(":")
    length = int(text[1:colon])
    console_json = text[colon + 1 : colon + 1 + length]
    payload = text[colon + 1 + length :]
    if console_json == '"overflow"' or length > spec.max_console * 6 + 4096:
        return RunOutcome("X", "{}", retire=False)
    console = ([] if console_json == "[]"
               else [(str(k), str(m)) for k, m in json.loads(console_json)])
    if sum(len(m) for _, m in console) > spec.max_console:
        return RunOutcome("X", "{}", retire=False)
    if kind == "M":
        return RunOutcome("M", "{}", console, retire=True)
    if kind == "R" and len(payload) > spec.max_result + 64:
        message = f"result of {len(payload)} bytes exceeds the cap of {spec.max_result} bytes"
        return RunOutcome("S", json.dumps({"message": message}), console)
    if kind in "ECS":
        record = json.loads(payload)
        for key in ("name", "message", "stack"):
            if key in record:
                record[key] = _clip(str(record[key]), 200 if key == "name" else spec.max_error)
        if "stack" in record:
            record["stack"] = clean_stack(record["stack"])
        payload = json.dumps(record)
        if record.get("name") == "IsoBoxInternal":
            return RunOutcome("E", payload, console, retire=True)
    return RunOutcome(kind, payload, console)


_TRUSTED_FRAMES = ("at dispatch (", "at isobox (", "at failed ", "at settle ")


def clean_stack(stack: str) -> str:
    """Drop the prelude's own frames (and the ``eval`` that entered user code) from a stack."""
    lines = stack.splitlines()
    for i, line in enumerate(lines):
        if any(marker in line for marker in _TRUSTED_FRAMES):
            keep = lines[:i]
            if keep and keep[-1].strip() == "at eval (native)":
                keep.pop()
            return "\n".join(keep) + ("\n" if keep else "")
    return stack


def _classify_engine_failure(
    message: str, spec: RunSpec, ctx: Any, fn: Any, budget: _Budget
) -> RunOutcome:
    """An uncatchable error escaped the prelude: the time limit, the memory limit, or a bug."""
    if "interrupted" in message:
        return _timeout_outcome(spec, ctx, fn)
    if message.startswith("null") or "out of memory" in message:
        return RunOutcome("M", "{}", retire=True)
    if "stack size exceeded" in message:
        record = {"name": "RangeError", "message": "Maximum call stack size exceeded", "stack": ""}
        return RunOutcome("E", json.dumps(record), retire=True)
    record = {"name": "InternalError", "message": message[:200], "stack": ""}
    return RunOutcome("E", json.dumps(record), retire=True)


def _timeout_outcome(spec: RunSpec, ctx: Any, fn: Any) -> RunOutcome:
    """CPU budget spent: keep what the script printed before it, with a small extra budget."""
    console: list[tuple[str, str]] = []
    try:
        ctx.set_time_limit(0.05)
        lines = fn("console", "")
        if isinstance(lines, str) and lines.startswith("["):
            console = [(str(k), str(m)) for k, m in json.loads(lines)]
    except Exception:
        console = []
    return RunOutcome("T", "{}", console, retire=True)
