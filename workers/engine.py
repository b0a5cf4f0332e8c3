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
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import _quickjs

from isobox.workers.bytecode import LOADER

log = logging.getLogger("isobox")

__all__ = ["Engine", "EngineIO", "RunOutcome", "RunSpec", "Stream", "prelude_mode"]

_PRELUDE = resources.files(__package__).joinpath("prelude.js").read_text(encoding="utf-8")
# Library sources are handed over as plain strings (ASCII, so the binding copies them intact).
_HOT = resources.files(__package__).joinpath("hot.js").read_text(encoding="utf-8")
_COLD = resources.files(__package__).joinpath("cold.js").read_text(encoding="utf-8")
_LOOP = resources.files(__package__).joinpath("loop.js").read_text(encoding="utf-8")
_MODS = resources.files(__package__).joinpath("modules.js").read_text(encoding="utf-8")
_MEMFS = resources.files(__package__).joinpath("memfs.js").read_text(encoding="utf-8")
_SOURCES = {"prelude": _PRELUDE, "hot": _HOT, "cold": _COLD, "loop": _LOOP, "mods": _MODS,
            "memfs": _MEMFS}
if not all(src.isascii() for src in _SOURCES.values()):
    raise RuntimeError("the JS prelude and libraries must be ASCII")


def _compile_all() -> dict[str, bytes]:
    """The trusted sources as bytecode, compiled once per process (the fork server's copy is
    shared by every worker); empty when bytecode is unavailable (then source is parsed)."""
    if LOADER is None:
        return {}
    try:
        return {name: LOADER.compile(src) for name, src in _SOURCES.items()}
    except RuntimeError as exc:
        log.warning("isobox: trusted JS is parsed in every context: %s", exc)
        return {}


_BYTECODE = _compile_all()


def prelude_mode() -> str:
    """How the trusted JS enters each context here: ``"bytecode"`` or ``"source"``."""
    return "bytecode" if _BYTECODE else "source"

_LIBS = (("h", "hot"), ("c", "cold"), ("l", "loop"))  # what the prelude's `libs` op reports
_SESSION_LIBS = frozenset(("hot", "cold", "loop"))  # a session uses them all, sooner or later
_HAND_OVER = frozenset(("mods", "memfs"))  # prelude ops that only take a library
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
    wall_timeout: float = 30.0  # the engine's own bound on waiting for timers and host replies
    memory_limit: int = 128 * 2**20
    stack_limit: int = 1 * 2**20
    console: str = "redirect"
    max_result: int = 16 * 2**20
    max_console: int = 1 * 2**20
    max_error: int = 64 * 2**10
    max_timers: int = 1000
    max_host_calls: int = 100_000
    functions: list[list[Any]] | None = None  # [[name, is_async], ...]
    validate: bool = False  # only parse the code; the outcome is R (valid) or C
    stream: bool = False
    session: str | None = None
    restore_json: str | None = None  # a session's checkpoint, applied when its context is new
    restore_tagged: bool = False
    files: dict[str, str] | None = None  # a project's virtual files (path -> source)
    entry: str | None = None  # a project's entrypoint (its source is ``code``)
    require: dict[str, Any] | None = None  # the require policy (whitelist, modules, mocks)
    filesystem: dict[str, Any] | None = None  # MemFS: {"quota", "files", "readOnly"}
    typescript: bool = False  # ``code`` is TypeScript: transpile it first, in this process
    filename: str | None = None  # the snippet's file name (for the compiler's messages)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RunSpec:
        """The spec of a RUN frame body (unknown keys are ignored; a bad type raises)."""
        return cls(**{k: v for k, v in body.items() if k in _SPEC_FIELDS})

    @property
    def unlimited(self) -> bool:
        """True when a sync host function may be called: the binding refuses calls into Python
        under a time limit, so user code then runs without the in-engine CPU limit."""
        return any(not is_async for _, is_async in self.functions or ())


@dataclass(slots=True)
class RunOutcome:
    """What a run produced. ``kind``: R ok, E script error, C compile error, S serialization,
    T CPU timeout, W wall timeout seen by the engine, M memory limit, X console overflow.
    ``retire``: the context or the process may be damaged, so the worker should be replaced.
    ``state``: a session's JSON-able globals after a successful run (its checkpoint)."""

    kind: str
    payload: str  # R: the value as tagged JSON; otherwise a JSON error record
    console: list[tuple[str, str]] = field(default_factory=list)
    cpu_time: float = 0.0
    memory: int = 0
    retire: bool = False
    state: str | None = None
    dropped: bool = False  # the session's context was discarded (restore it from a checkpoint)
    violations: list[dict[str, Any]] = field(default_factory=list)  # security:violation events
    transpiled: str | None = None  # the JS a TypeScript snippet became (the caller caches it)
    files: dict[str, Any] | None = None  # MemFS content at the end: {path: ["t"|"b", data]}
    outcomes: list[list[str]] | None = None  # a chunk of map items: [kind, payload] each
    redo: bool = False  # a map item to run again in a fresh context (see _SetupFailed)


_SPEC_FIELDS = frozenset(RunSpec.__dataclass_fields__)
OutputSink = Callable[[list[tuple[str, str]]], None]


class EngineIO:
    """How a run reaches its host: console output, host-function calls, and waiting.

    The worker implements it over frames; in-process mode calls the host directly. This base
    has no host: calls fail inside JS, waits just sleep.
    """

    def output(self, lines: list[tuple[str, str]]) -> None:
        """Console lines produced so far (flushed while the run goes on)."""

    def call(self, name: str, args: str) -> str:
        """A sync host call: blocks; returns ``j``/``t`` + JSON (tagged) or ``e`` + JSON."""
        return "e" + json.dumps({"message": f"host function {name} is not available"})

    def start_call(self, cid: int, name: str, args: str) -> None:
        """Begin an async host call; its reply comes back through :meth:`wait`."""

    def wait(self, timeout: float) -> list[tuple[int, str]]:
        """Wait up to ``timeout`` seconds for async host replies; returns those that came."""
        time.sleep(max(0.0, timeout))
        return []


class _SinkIO(EngineIO):
    def __init__(self, sink: OutputSink | None) -> None:
        self.sink = sink

    def output(self, lines: list[tuple[str, str]]) -> None:
        if self.sink is not None:
            self.sink(lines)


class _Budget:
    """The run's CPU budget, measured on the CPU clock of whichever thread drives it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.mark = time.thread_time()

    def resume(self) -> None:
        self.mark = time.thread_time()

    def pause(self) -> None:
        self.spent += time.thread_time() - self.mark
        self.mark = time.thread_time()

    def remaining(self) -> float:
        return self.seconds - self.used()

    def used(self) -> float:
        return self.spent + time.thread_time() - self.mark


class _CpuExhausted(Exception):
    pass


class _WallExpired(Exception):
    pass


class _SetupFailed(Exception):
    """A map item's globals could not be installed in its chunk's context (an earlier item
    froze the global object or made ``input`` read-only): the item goes to a fresh context."""


# What the prelude answers when something outside the script's own try failed (setup).
_FAIL_PREFIX = 'E2:[]{"name":"IsoBoxInternal"'


class JsContext:
    """One QuickJS context with the trusted prelude: a fresh run's, or a session's."""

    __slots__ = ("ctx", "fn", "host_bound", "memfs", "mods", "pristine", "session")

    def __init__(self, preload: frozenset[str] = frozenset()) -> None:
        """A context with the prelude, and the libraries in ``preload`` read in as bytecode
        (the others are parsed from source when a run first needs them)."""
        self.ctx = _quickjs.Context()
        self.pristine = True  # no user code has run here yet: bytecode may still be read in
        fn = self._read("prelude")
        self.fn = fn if fn is not None else self.ctx.eval(_PRELUDE)
        for _flag, name in _LIBS:
            self.fn(name, self.library(name) if name in preload else _SOURCES[name])
        self.host_bound = False
        self.mods = False  # modules.js handed over (only contexts that need it pay for it)
        self.memfs = False  # memfs.js handed over
        self.session = False

    def _read(self, name: str) -> _quickjs.Object | None:
        code = _BYTECODE.get(name)
        if code is None or LOADER is None or not self.pristine:
            return None
        return LOADER.load(self.ctx, code)

    def library(self, name: str) -> str | _quickjs.Object:
        """What the prelude gets for library ``name``: its factory read from bytecode while
        the context is pristine (JS_ReadObject trusts its input, and only trusted code may have
        run), else its source, which the prelude parses when a run first needs it."""
        return self._read(name) or _SOURCES[name]

    def libraries_used(self) -> frozenset[str]:
        """The libraries a run in this context loaded (the next fresh context gets them read
        in beforehand); empty if the context no longer answers."""
        try:
            self.ctx.set_time_limit(0.01)
            found = self.fn("libs", "")
        except Exception:
            return frozenset()
        if not isinstance(found, str):
            return frozenset()
        return frozenset(name for flag, name in _LIBS if flag in found)


class _Drive:
    """One run (or stream) on one context: the budget, the deadline, and the turns of JS."""

    def __init__(self, engine: Engine, jc: JsContext, spec: RunSpec, io: EngineIO) -> None:
        self.engine = engine
        self.jc = jc
        self.spec = spec
        self.io = io
        self.budget = _Budget(spec.cpu_timeout)
        self.wall = time.monotonic() + spec.wall_timeout
        self.unlimited = spec.unlimited
        self.next_flush = 0.0
        self.reused = False  # a later item of a map chunk, in a context earlier items used

    def call(self, op: str, arg: str | _quickjs.Object = "", *, user: bool = False) -> str:
        """One call into the prelude under the remaining budget (no limit when ``user`` code
        may call a sync host function)."""
        left = self.budget.remaining()
        if left <= 0:
            raise _CpuExhausted
        ctx = self.jc.ctx
        if op not in _HAND_OVER:
            self.jc.pristine = False  # what follows may run user code or read user data
        ctx.set_time_limit(-1 if user and self.unlimited else max(left, _MIN_CALL_BUDGET))
        result = self.jc.fn(op, arg)
        if not isinstance(result, str):
            raise _quickjs.JSException("prelude returned a non-string")
        if result == _OOM and op != "finish":  # `finish` reports it itself; others cannot
            raise _quickjs.JSException("InternalError: out of memory")
        return result

    def drain(self) -> None:
        """Run queued promise jobs under the budget, flushing console output now and then."""
        ctx = self.jc.ctx
        for _ in range(_MAX_JOBS):
            left = self.budget.remaining()
            if left <= 0:
                raise _CpuExhausted
            ctx.set_time_limit(-1 if self.unlimited else max(left, _MIN_CALL_BUDGET))
            if not ctx.execute_pending_job():
                return
            if time.monotonic() >= self.next_flush:
                self.flush()
        raise _CpuExhausted

    def flush(self) -> None:
        self.next_flush = time.monotonic() + _CONSOLE_EVERY
        lines = self.call("console")
        if lines not in ("[]", '"overflow"'):
            self.io.output([(str(k), str(m)) for k, m in json.loads(lines)])

    def poll(self) -> tuple[bool, float, bool]:
        """Ask JS what is pending and send the host calls it queued: whether what the engine
        waits for is ready, ms until the next timer (-1: none), and whether anything (a timer,
        a host reply) may still come."""
        head, pending, calls = self.call(".poll").split(" ", 2)
        queued = json.loads(calls)
        for cid, name, args in queued:
            self.io.start_call(int(cid), str(name), str(args))
        due = float(head[1:])
        return head[0] == "D", due, due >= 0 or int(pending) > 0 or bool(queued)

    def step(self) -> bool:
        """One turn of the event loop: send queued host calls, then fire a due timer or wait
        for the next timer or host reply. False when nothing is pending (it never settles)."""
        done, due, more = self.poll()
        if done:
            return True
        if not more:
            return False
        if 0 <= due < 0.5:
            self.call(".fire", user=True)
            return True
        left = self.wall - time.monotonic()
        if left <= 0:
            raise _WallExpired
        wait = left if due < 0 else min(left, due / 1000.0)
        for cid, reply in self.io.wait(wait):
            self.call(".settle", json.dumps([cid, reply]), user=True)
        return True

    def files(self) -> dict[str, Any] | None:
        """MemFS content at the end of the run (with a small budget of its own)."""
        self.budget.seconds = self.budget.used() + 1.0
        try:
            found = json.loads(self.call("fsdump"))
        except (ValueError, _CpuExhausted, _quickjs.JSException):
            return None
        return found if isinstance(found, dict) else None

    def violations(self) -> list[dict[str, Any]]:
        """The run's security violations (``security:violation`` events for the host)."""
        try:
            found = json.loads(self.call("violations"))
        except (ValueError, _CpuExhausted, _quickjs.JSException):
            return []
        return [v for v in found if isinstance(v, dict)][:100] if isinstance(found, list) else []

    def request(self) -> str:
        spec = self.spec
        limits = json.dumps({"result": spec.max_result, "console": spec.max_console,
                             "error": spec.max_error, "timers": spec.max_timers,
                             "calls": spec.max_host_calls})
        extra = ""
        if spec.functions:
            extra += f',"fns":{json.dumps(spec.functions)}'
        if spec.stream:
            extra += ',"stream":true'
        if self.jc.session:
            extra += ',"session":true'
        if spec.entry is not None:
            extra += f',"project":{json.dumps(spec.entry)}'
        if spec.files:
            extra += f',"files":{json.dumps(spec.files)}'
        if spec.require is not None:
            extra += f',"require":{json.dumps(spec.require)}'
        if spec.filesystem is not None:
            extra += f',"fs":{json.dumps(spec.filesystem)}'
        # Globals and env arrive as JSON text already; splice them in rather than re-encode.
        return (f'{{"limits":{limits},"console":{json.dumps(spec.console)},'
                f'"tagged":{"true" if spec.tagged else "false"},"code":{json.dumps(spec.code)},'
                f'"globals":{spec.globals_json or "null"},"env":{spec.env_json or "null"}{extra}}}')

    def start(self) -> None:
        """Set the globals up and evaluate the code (one crossing)."""
        if (self.spec.entry is not None or self.spec.require is not None or self.spec.files
                or self.spec.filesystem is not None) and not self.jc.mods:
            self.call("mods", self.jc.library("mods"))
            self.jc.mods = True
        if self.spec.filesystem is not None and not self.jc.memfs:
            self.call("memfs", self.jc.library("memfs"))
            self.jc.memfs = True
        if self.unlimited and not self.jc.host_bound:
            self.jc.ctx.add_callable("__isoboxHost", self.engine.host_trampoline)
            self.jc.host_bound = True
        answer = self.call("run", self.request(), user=True)
        if self.reused and answer.startswith(_FAIL_PREFIX):
            raise _SetupFailed

    def settle(self) -> str:
        """Drive jobs, timers and host replies until the run's value is ready; its finish."""
        while True:
            # Drained even when the completion value is not a promise: `p.then(...)` reactions
            # and their output belong to the run (it returns at once on an empty queue).
            self.drain()
            text = self.call("finish")
            if text != "L":
                return text
            if not self.step():
                return self.call("finish")
_OOM = "M2:[]{}"  # the prelude's answer when it ran out of memory
_NEVER = ('E2:[]{"name":"Error","message":"the script\'s promise never settled and nothing '
          'is left to run","stack":""}')
MAX_SESSIONS = 256  # per engine (per worker): a backstop behind the supervisor's own limits


class Engine:
    """Runs requests in fresh QuickJS contexts, or in a session's own context, one at a time
    (not thread-safe: in-process mode keeps one per thread, or a lock per session)."""

    def __init__(self) -> None:
        self._ready: JsContext | None = None
        self._spent: JsContext | None = None
        self._sessions: dict[str, JsContext] = {}
        self._io: EngineIO = EngineIO()
        self._modules_wanted = False  # the last fresh-context run used the module system
        self._libraries_wanted: frozenset[str] = frozenset()  # and these libraries

    def prepare(self) -> None:
        """Free the last run's context and build the next one, while nobody waits for either.
        The libraries the last run loaded (and the module system, if it used it) are read into
        the next context beforehand: runs tend to come in series of one kind, and loading them
        is then off the request path."""
        spent, self._spent = self._spent, None
        if spent is not None:
            self._libraries_wanted = spent.libraries_used()
        if self._ready is None:
            jc = JsContext(self._libraries_wanted)
            if self._modules_wanted:
                jc.fn("mods", jc.library("mods"))
                jc.mods = True
            self._ready = jc

    def host_trampoline(self, name: Any, args: Any) -> str:
        """The one Python callable JS may call (sync host functions). It must never raise: an
        exception here would leave the binding's error flag set and fail the whole eval."""
        try:
            return self._io.call(str(name), str(args))
        except BaseException as exc:
            failure = f"host function {name} failed ({type(exc).__name__})"
            return "e" + json.dumps({"message": failure})

    # -- contexts --------------------------------------------------------------------------
    def _context(self, spec: RunSpec) -> JsContext:
        if spec.session is None:
            self.prepare()
            if self._ready is None:
                raise RuntimeError("engine has no prepared context")
            jc = self._ready
            self._spent, self._ready = jc, None
            return jc
        found = self._sessions.get(spec.session)
        if found is None:
            if len(self._sessions) >= MAX_SESSIONS:
                raise _TooManySessions
            jc = JsContext(_SESSION_LIBS)
            jc.session = True
            jc.fn(".base", "")
            self._sessions[spec.session] = jc
            if spec.restore_json is not None:  # a checkpoint from a worker that died
                restore = replace(spec, globals_json=spec.restore_json, tagged=spec.restore_tagged,
                                  functions=None, stream=False, env_json=None)
                drive = _Drive(self, jc, restore, EngineIO())
                with contextlib.suppress(Exception):
                    drive.call("setup", drive.request())
            return jc
        return found

    def drop_session(self, sid: str) -> bool:
        """Free a session's context; True if it existed."""
        return self._sessions.pop(sid, None) is not None

    @property
    def session_count(self) -> int:
        """How many session contexts this engine holds."""
        return len(self._sessions)

    def _begin(self, spec: RunSpec, io: EngineIO | None) -> _Drive:
        if spec.session is None:
            self._modules_wanted = bool(spec.entry or spec.require or spec.files
                                        or spec.filesystem)
        jc = self._context(spec)
        jc.ctx.set_memory_limit(spec.memory_limit)
        jc.ctx.set_max_stack_size(spec.stack_limit)  # also re-reads this thread's stack top
        self._io = io or EngineIO()
        return _Drive(self, jc, spec, self._io)

    # -- runs ------------------------------------------------------------------------------
    def run(self, spec: RunSpec, on_output: OutputSink | EngineIO | None = None) -> RunOutcome:
        """Run one request; never raises for anything the script does."""
        io = on_output if isinstance(on_output, EngineIO) else _SinkIO(on_output)
        try:
            drive = self._begin(spec, io)
        except _TooManySessions:
            return _internal(f"this worker already holds {MAX_SESSIONS} sessions")
        outcome = self._guard(drive, lambda: self._run(drive))
        if drive.jc.session:
            self._after_session_run(drive, outcome)
        return outcome

    def _run(self, drive: _Drive) -> RunOutcome:
        failed = _transpile_sources(drive)
        if failed is not None:
            return failed
        spec = drive.spec
        if spec.validate:
            drive.call("setup", drive.request())
            error = drive.call("validate", json.dumps(spec.code))
            return RunOutcome("C", error) if error else RunOutcome("R", "null\nnull")
        drive.start()
        text = drive.settle()
        flagged = text.startswith("!")  # the run recorded security violations
        outcome = _parse_finish(_NEVER if text == "L" else text[flagged:], spec)
        if flagged:
            outcome.violations = drive.violations()
        if spec.typescript and outcome.kind in "RE":
            outcome.transpiled = spec.code
        if spec.filesystem is not None and outcome.kind in "REST":
            outcome.files = drive.files()
        return outcome

    def _guard(self, drive: _Drive, body: Callable[[], RunOutcome], *,
               measure: bool = True) -> RunOutcome:
        """Run ``body``, turning engine-level failures into outcomes; figures filled in
        (the heap figure walks the whole heap: a chunk's items skip it but the last)."""
        drive.budget.resume()
        try:
            outcome = body()
        except _quickjs.JSException as exc:
            outcome = _classify_engine_failure(str(exc), drive)
        except _CpuExhausted:
            outcome = _timeout_outcome(drive)
        except _WallExpired:
            outcome = RunOutcome("W", "{}", _take_console(drive))
        except _SetupFailed:
            outcome = RunOutcome("E", "{}", redo=True)
        except Exception as exc:  # the binding failed to convert something: never crash the worker
            log.debug("isobox engine failure", exc_info=exc)
            record = {"name": "InternalError", "stack": "",
                      "message": "the engine failed to report the outcome of this run"}
            outcome = RunOutcome("E", json.dumps(record), retire=True)
        drive.budget.pause()
        outcome.cpu_time = drive.budget.used()
        if measure:
            with contextlib.suppress(Exception):  # a poisoned runtime may refuse; optional
                outcome.memory = int(drive.jc.ctx.memory()["memory_used_size"])
        return outcome

    def _after_session_run(self, drive: _Drive, outcome: RunOutcome) -> None:
        """A session keeps its context through script errors and CPU timeouts; after a memory
        limit or an engine failure it is dropped and restored from the last checkpoint."""
        sid = drive.spec.session
        if outcome.kind == "M" or outcome.retire:
            if sid is not None:
                self.drop_session(sid)
            outcome.dropped = True
            outcome.retire = False  # the context had its own runtime; the process is fine
            return
        if outcome.kind == "R" and not drive.spec.validate:
            with contextlib.suppress(Exception):
                drive.budget.seconds = drive.budget.used() + 1.0  # a bounded extra for the state
                state = drive.call(".state")
                outcome.state = state or None

    def session_state(self, spec: RunSpec) -> RunOutcome:
        """A session's JSON-able globals, after setting those in ``spec``'s globals if any
        (``get_state`` and ``set_state``)."""
        try:
            drive = self._begin(spec, None)
        except _TooManySessions:
            return _internal(f"this worker already holds {MAX_SESSIONS} sessions")

        def body() -> RunOutcome:
            drive.call("setup", drive.request())
            state = drive.call(".state")
            if not state:
                return RunOutcome("S", json.dumps({"message": "the session state exceeds the "
                                                   "result cap"}))
            return RunOutcome("R", "object\n" + state, state=state)

        return self._guard(drive, body)

    # -- map chunks ------------------------------------------------------------------------
    def run_chunk(self, spec: RunSpec, items: list[Any],
                  on_output: OutputSink | EngineIO | None = None) -> RunOutcome:
        """Run ``spec.code`` once per item of a ``map`` chunk, each ``[globals_json, tagged]``
        (the item as the global ``input``), in one fresh context: one context and one round
        trip for the chunk instead of one per item. Each item is a run of its own (its own
        CPU budget, value or error conversion, violations); a context an item may have left
        damaged or busy (anything but a value or a throw) is replaced before the next item.
        TypeScript is transpiled once, by the first item."""
        io = on_output if isinstance(on_output, EngineIO) else _SinkIO(on_output)
        chunk = RunOutcome("R", "undefined\nnull", outcomes=[])
        jc: JsContext | None = None
        for number, entry in enumerate(items):
            item = replace(spec, globals_json=str(entry[0]), tagged=bool(entry[1]))
            last = number == len(items) - 1
            outcome = None
            if jc is not None:
                drive = _Drive(self, jc, item, io)
                drive.reused = True
                outcome = self._guard(drive, lambda d=drive: self._run(d),  # type: ignore[misc]
                                      measure=last)
            if outcome is None or outcome.redo:
                drive = self._begin(item, io)
                jc = drive.jc
                outcome = self._guard(drive, lambda d=drive: self._run(d),  # type: ignore[misc]
                                      measure=last)
            if spec.typescript and outcome.transpiled is not None:
                spec = replace(spec, code=outcome.transpiled, typescript=False)
            chunk.cpu_time += outcome.cpu_time
            chunk.memory = max(chunk.memory, outcome.memory)
            chunk.console += outcome.console
            chunk.violations += outcome.violations
            if chunk.outcomes is not None:
                chunk.outcomes.append([outcome.kind, outcome.payload])
            if outcome.retire:
                chunk.retire = True
                break  # the process may be damaged: the client runs the rest elsewhere
            if outcome.kind not in "RE":
                jc = None
        return chunk

    # -- streams ---------------------------------------------------------------------------
    def open_stream(self, spec: RunSpec, io: EngineIO | None = None) -> Stream:
        """Start a stream: evaluate the code and settle its value (the iterator comes next)."""
        return Stream(self, spec, io or EngineIO())


class _TooManySessions(Exception):
    pass


class Stream:
    """A running stream: :meth:`pump` pulls the next batch; :meth:`close` runs ``return()``."""

    def __init__(self, engine: Engine, spec: RunSpec, io: EngineIO) -> None:
        self.engine = engine
        self.outcome: RunOutcome | None = None
        try:
            self.drive: _Drive | None = engine._begin(spec, io)
        except _TooManySessions:
            self.drive = None
            self.outcome = _internal(f"this worker already holds {MAX_SESSIONS} sessions")
            return
        drive = self.drive
        outcome = engine._guard(drive, lambda: self._start(drive))
        if outcome.kind != "R":
            self._end(outcome)

    def _start(self, drive: _Drive) -> RunOutcome:
        failed = _transpile_sources(drive)
        if failed is not None:
            return failed
        drive.start()
        while True:
            drive.drain()
            if not drive.step():  # step() says "ready" once the value settled
                return RunOutcome("R", "undefined\nnull")
            if drive.poll()[0]:
                return RunOutcome("R", "undefined\nnull")

    def _end(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        drive = self.drive
        if drive is not None and not outcome.violations:
            outcome.violations = drive.violations()
        if drive is not None and drive.jc.session:
            self.engine._after_session_run(drive, outcome)
            outcome.state = None  # a stream does not checkpoint; the next run will

    @property
    def done(self) -> bool:
        """True once the stream ended (``outcome`` says how)."""
        return self.outcome is not None

    def pump(self, limit: int) -> tuple[str, int]:
        """At most ``limit`` more values as one JSON array text, and how many it holds; once
        the stream ends, :attr:`outcome` is set (R when the iterator finished)."""
        drive = self.drive
        if drive is None or self.outcome is not None:
            return "[]", 0
        result: list[str] = []

        def body() -> RunOutcome:
            while True:
                text = drive.call(".pump", str(max(1, limit)), user=True)
                drive.drain()
                head, _, tail = text.partition("\n")
                state, items = head[0], head[1:]
                if items != "[]" or state != "W":
                    result.append(items)
                    result.append(state)
                    result.append(tail)
                    return RunOutcome("R", "")
                while True:
                    drive.drain()
                    if drive.poll()[0]:
                        break
                    if not drive.step():
                        return _parse_finish(_NEVER, drive.spec)

        outcome = self.engine._guard(drive, body)
        drive.budget.pause()
        with contextlib.suppress(_CpuExhausted, _quickjs.JSException):
            drive.flush()
        if not result:
            self._end(outcome)
            return "[]", 0
        items, state, tail = result
        if state == "D":
            self._end(RunOutcome("R", "undefined\nnull"))
        elif state == "F":
            self._end(_parse_finish(tail[0] + "2:[]" + tail[1:], drive.spec))
        count = 0 if items == "[]" else _count_items(items)
        return items, count

    def close(self) -> None:
        """Stop early: run the iterator's ``return()`` (its ``finally`` blocks) briefly."""
        drive = self.drive
        if drive is None or self.outcome is not None:
            return
        drive.budget.seconds = drive.budget.used() + 0.1
        drive.wall = min(drive.wall, time.monotonic() + 0.2)

        def body() -> RunOutcome:
            if drive.call(".close", user=True) == "W":
                drive.settle()
            drive.flush()
            return RunOutcome("R", "undefined\nnull")

        self._end(self.engine._guard(drive, body))


_TS_FILE = (".ts", ".tsx", ".mts", ".cts")
_ESM = re.compile(r"^\s*(?:import\s*[\w{*'\"]|export\s)", re.MULTILINE)


def _transpile_sources(drive: _Drive) -> RunOutcome | None:
    """Turn a TypeScript snippet, and a project's TypeScript and ES-module files, into
    CommonJS JS before the run (replacing ``drive.spec``); an outcome if that failed."""
    spec = drive.spec
    wanted = {p for p, src in (spec.files or {}).items() if spec.entry is not None
              and (p.endswith(_TS_FILE) or _ESM.search(src))}
    if not spec.typescript and not wanted:
        return None
    from isobox.workers import typescript  # noqa: PLC0415 - only TypeScript runs load it

    files = dict(spec.files or {})
    current = ""
    try:
        for path in sorted(wanted):
            current = path
            files[path] = typescript.transpile(files[path], path,
                                               cpu=drive.budget.remaining()).code
        code = spec.code
        if spec.entry is not None and spec.entry in wanted:
            code = files[spec.entry]
        elif spec.typescript:
            current = spec.filename or "<input>.ts"
            code = typescript.transpile(spec.code, current, cpu=drive.budget.remaining()).code
    except typescript.TranspileError as exc:
        where = f" in {current}" if spec.entry is not None else ""
        record = {"name": "SyntaxError", "message": exc.message + where, "stack": "",
                  "compile": True, "line": exc.line, "column": exc.column}
        return RunOutcome("C", json.dumps(record))
    except _quickjs.JSException as exc:
        kind = "T" if "interrupted" in str(exc) else "M"
        return RunOutcome(kind, "{}")
    drive.spec = replace(spec, code=code, files=files or None)
    return None


def _count_items(items: str) -> int:
    """How many values a pump's JSON array holds (parsed: values may contain commas)."""
    return len(json.loads(items))


def _internal(message: str) -> RunOutcome:
    return RunOutcome("E", json.dumps({"name": "IsoBoxInternal", "message": message, "stack": ""}))


def _take_console(drive: _Drive) -> list[tuple[str, str]]:
    try:
        drive.jc.ctx.set_time_limit(0.05)
        lines = drive.jc.fn("console", "")
        if isinstance(lines, str) and lines.startswith("["):
            return [(str(k), str(m)) for k, m in json.loads(lines)]
    except Exception:
        return []
    return []


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


_TRUSTED_FRAMES = ("at dispatch (", "at isobox (", "at failed ", "at settle ", "at isoboxFire (",
                   "at isoboxPump (", "at isoboxSettle (", "at isoboxClose (")


_LIBRARY_FRAME = "at isoboxMod"  # the module system's frames, between user frames


def clean_stack(stack: str) -> str:
    """Drop the prelude's own frames (and the native call that entered user code) from a
    stack: everything from the first trusted frame on, and the module system's frames (with
    the native call into them) wherever they are."""
    lines: list[str] = []
    for line in stack.splitlines():
        if _LIBRARY_FRAME in line:
            while lines and lines[-1].strip().endswith("(native)"):
                lines.pop()
            continue
        lines.append(line)
    for i, line in enumerate(lines):
        if any(marker in line for marker in _TRUSTED_FRAMES):
            keep = lines[:i]
            while keep and keep[-1].strip().endswith("(native)"):
                keep.pop()
            return "\n".join(keep) + ("\n" if keep else "")
    return stack


def _classify_engine_failure(message: str, drive: _Drive) -> RunOutcome:
    """An uncatchable error escaped the prelude: the time limit, the memory limit, or a bug."""
    if "interrupted" in message:
        return _timeout_outcome(drive)
    if message.startswith("null") or "out of memory" in message:
        return RunOutcome("M", "{}", retire=True)
    if "stack size exceeded" in message:
        record = {"name": "RangeError", "message": "Maximum call stack size exceeded", "stack": ""}
        return RunOutcome("E", json.dumps(record), retire=True)
    record = {"name": "InternalError", "message": message[:200], "stack": ""}
    return RunOutcome("E", json.dumps(record), retire=True)


def _timeout_outcome(drive: _Drive) -> RunOutcome:
    """CPU budget spent: keep what the script printed before it, with a small extra budget.
    A session's context survives an interrupt, so only a fresh context's worker retires."""
    return RunOutcome("T", "{}", _take_console(drive), retire=not drive.jc.session)
