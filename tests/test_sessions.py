"""Sessions end to end: REPL semantics, state, limits, TTL, crash recovery, placement, threads.

Everything runs real worker processes (and the in-process engine where the behaviour is the
engine's own: REPL rewriting and the state operations). Tests that kill workers or hit wall
timeouts get a box of their own, so the crash-loop breaker and the pool size of one test never
leak into another. Timing bounds are generous: the machine is shared.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import psutil
import pytest
from helpers import alive, serving_pids, wait_until

from isobox import (
    AsyncIsoBox,
    AsyncSession,
    ClosedError,
    CompileError,
    IsoBox,
    MemoryLimitError,
    ScriptError,
    SerializationError,
    Session,
    SessionError,
    WorkerCrashedError,
)
from isobox import TimeoutError as BoxTimeoutError

MIB = 2**20
POOL = {"min": 2, "max": 2}
MODES = ["process", "inprocess"]
RECOVERY_BOUND = 5.0  # seconds: kill -> the next run answered from the checkpoint
MEMORY_BOMB = "const xs = []; while (true) xs.push(new Array(1e5).fill(1))"
NATIVE_HANG = "[].reverse.call({length: 2**53 - 1})"  # one native call that never polls

_ids = itertools.count(1)


# -- helpers ---------------------------------------------------------------------------------
def new_id(prefix: str = "s") -> str:
    """A session id no other test uses."""
    return f"{prefix}-{next(_ids)}"


def pid_of(session: Session) -> int:
    """The pid of the worker holding ``session``'s live context (process mode)."""
    pid = session.info().worker_pid
    assert pid is not None, "the session holds no worker"
    return pid


class KillWhenBusy:
    """SIGKILL ``pid`` from a thread once it has burnt CPU on the run in flight."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.killed_at: float | None = None
        self.error: BaseException | None = None
        proc = psutil.Process(pid)
        self._proc = proc
        self._spent = sum(proc.cpu_times()[:2])
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if not wait_until(lambda: sum(self._proc.cpu_times()[:2]) > self._spent + 0.05, 10.0):
                raise AssertionError("the worker never started the run")
            self.killed_at = time.monotonic()
            os.kill(self.pid, signal.SIGKILL)
        except BaseException as exc:
            self.error = exc

    def join(self) -> float:
        """Wait for the kill; returns when it happened (``time.monotonic``)."""
        self.thread.join(10.0)
        assert self.error is None, repr(self.error)
        assert self.killed_at is not None
        return self.killed_at


class Expiries:
    """Collects ``session:expired`` payloads (the sweeper thread emits them)."""

    def __init__(self, box: IsoBox | AsyncIsoBox) -> None:
        self.box = box
        self.lock = threading.Lock()
        self.items: list[dict[str, Any]] = []
        box.on("session:expired", self.handler)

    def handler(self, payload: dict[str, Any]) -> None:
        with self.lock:
            self.items.append(dict(payload))

    def of(self, sid: str) -> list[dict[str, Any]]:
        """The payloads that name ``sid``."""
        with self.lock:
            return [p for p in self.items if p.get("id") == sid]

    def close(self) -> None:
        self.box.off("session:expired", self.handler)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pbox() -> Iterator[IsoBox]:
    """A shared process box (pool 2/2) for tests that kill nothing."""
    with IsoBox(timeout=5.0, pool=POOL) as box:
        assert box.warmup_pool() == 2
        yield box


@pytest.fixture(scope="module")
def lbox() -> Iterator[IsoBox]:
    """A shared in-process box."""
    with IsoBox(mode="inprocess", timeout=5.0) as box:
        yield box


@pytest.fixture(params=MODES)
def box(request: pytest.FixtureRequest, pbox: IsoBox, lbox: IsoBox) -> IsoBox:
    """The shared box of each mode."""
    return pbox if request.param == "process" else lbox


@pytest.fixture
def make_box() -> Iterator[Callable[..., IsoBox]]:
    """A factory of warmed-up process boxes of the test's own, shut down afterwards."""
    boxes: list[IsoBox] = []

    def make(pool: dict[str, Any] | None = None, **options: Any) -> IsoBox:
        options.setdefault("timeout", 5.0)
        pool = pool or POOL
        made = IsoBox(pool=pool, **options)
        boxes.append(made)
        assert made.warmup_pool() == pool["min"]
        return made

    yield make
    for made in boxes:
        made.shutdown()


# -- 1. REPL semantics -----------------------------------------------------------------------
def test_seed_counter_persists_across_runs(box: IsoBox) -> None:
    """A global assigned in one run is there in the next: the counter counts."""
    with box.create_session(new_id()) as s:
        assert s.run("counter = 0") == 0
        assert s.run("counter++; counter") == 1
        for expected in range(2, 6):
            assert s.run("counter++; counter") == expected


def test_let_const_class_persist_and_may_be_redeclared(box: IsoBox) -> None:
    """Top-level let/const/class persist across runs and may be declared again."""
    with box.create_session(new_id()) as s:
        assert s.run("let x = 1; const y = 'a';\nclass K { get v() { return 1; } }\n"
                     "[x, y, new K().v]") == [1, "a", 1]
        assert s.run("let x = 2; const y = 'b';\nclass K { get v() { return 2; } }\n"
                     "[x, y, new K().v]") == [2, "b", 2]
        assert s.run("[x, y, new K().v, typeof K, K.name]") == [2, "b", 2, "function", "K"]
        assert s.run("class Sub extends K { get v() { return super.v * 10; } }\n"
                     "new Sub().v") == 20
        assert s.run("new Sub() instanceof K") is True
        assert s.run("let x = 3, z = 4; x + z") == 7
        assert s.run("const c1 = 1\nconst c2 = 2\nc1 + c2") == 3
        assert s.run("[x, z, c1, c2]") == [3, 4, 1, 2]


def test_destructuring_declarations_persist(box: IsoBox) -> None:
    """Object and array destructuring at top level declares persistent globals."""
    with box.create_session(new_id()) as s:
        assert s.run("const {a, b} = {a: 1, b: 2}; a + b") == 3
        assert s.run("[a, b]") == [1, 2]
        assert s.run("let [p, , q = 9] = [5, 6]; [p, q]") == [5, 9]
        assert s.run("const {a: renamed, ...rest} = {a: 1, c: 3, d: 4}; [renamed, rest]") == [
            1, {"c": 3, "d": 4}]
        assert s.run("[a, b, p, q, renamed, rest.d]") == [1, 2, 5, 9, 1, 4]


def test_keywords_in_strings_comments_templates_and_regex_are_untouched(box: IsoBox) -> None:
    """The REPL rewrite never touches let/const/class inside strings, comments, templates or
    regular expressions, and still rewrites the real declarations around them."""
    code = (
        "const words = 'let a = 1; const b = 2; class C {}';\n"
        'const dq = "let x; const y = 0; class Z {} \\" let esc";\n'
        "// let commented = 1; const c2 = 2; class Gone {}\n"
        "/* let block = 1;\n   class Gone2 {} */\n"
        "const tpl = `let ${'const'} class ${ `nested let ${1 + 1}` } ${ {k: 'class'}.k }`;\n"
        "const re = /let|const|class \\{/g;\n"
        "const found = 'let const class {'.match(re);\n"
        "const quote = \"it's\".replace(/'/g, ''); let after = 1;\n"
        "const half = 10 / 2; let also = half / 5 / 1;\n"
        "[words, dq, tpl, found, quote, after, also,\n"
        " typeof commented, typeof block, typeof Gone, typeof Gone2]"
    )
    words = "let a = 1; const b = 2; class C {}"
    dq = 'let x; const y = 0; class Z {} " let esc'
    tpl = "let const class nested let 2 class"
    undefined4 = ["undefined"] * 4
    with box.create_session(new_id()) as s:
        assert s.run(code) == [words, dq, tpl, ["let", "const", "class {"], "its", 1, 1.0,
                               *undefined4]
        assert s.run("[words, dq, tpl, re.source, found.length, quote, after, also]") == [
            words, dq, tpl, "let|const|class \\{", 3, "its", 1, 1.0]
        state = s.get_state()
        assert {"a", "b", "x", "y", "commented", "block"}.isdisjoint(state)
        assert state["words"] == words


def test_block_scoped_and_loop_lets_stay_local(box: IsoBox) -> None:
    """let/const in for loops, blocks, if bodies and functions stay local to them."""
    code = (
        "let total = 0;\n"
        "for (let i = 0; i < 3; i++) { let sq = i * i; total += sq; }\n"
        "for (const k of [1, 2]) { total += k; }\n"
        "{ let hidden = 1; const hidden2 = 2; class Hid {} }\n"
        "if (true) { const fromIf = 3; }\n"
        "function fn() { let local = 4; const local2 = 5; return local + local2; }\n"
        "const viaFn = fn();\n"
        "[total, typeof i, typeof sq, typeof k, typeof hidden, typeof hidden2, typeof Hid,\n"
        " typeof fromIf, typeof local, typeof local2, viaFn]"
    )
    with box.create_session(new_id()) as s:
        assert s.run(code) == [8, *["undefined"] * 9, 9]
        assert s.run("[total, viaFn, typeof i, typeof hidden, typeof local]") == [
            8, 9, "undefined", "undefined", "undefined"]
        assert s.get_state() == {"total": 8, "viaFn": 9}


def test_functions_and_closures_live_on_but_are_not_state(box: IsoBox) -> None:
    """Functions and closures persist in the live context; get_state leaves them out."""
    with box.create_session(new_id()) as s:
        s.run("let count = 0; const bump = () => ++count;\n"
              "function twice() { return bump() + bump(); }\nclass Box2 {}\n0")
        assert s.run("bump()") == 1
        assert s.run("twice()") == 5
        assert s.run("[typeof bump, typeof twice, typeof Box2]") == ["function"] * 3
        assert s.get_state() == {"count": 3}


def test_let_const_names_starting_with_in_persist(box: IsoBox) -> None:
    """let/const bindings named index, input, info persist like any other name."""
    with box.create_session(new_id()) as s:
        assert s.run("let index = 1; const input = 'x'; const info = {a: 1}; index") == 1
        assert s.run("[typeof index, typeof input, typeof info]") == ["number", "string",
                                                                     "object"]


def test_declarations_after_a_nested_template_literal_persist(box: IsoBox) -> None:
    """A template nested directly in a substitution does not stop later declarations from
    persisting."""
    with box.create_session(new_id()) as s:
        assert s.run("const t = `a${`b`}c`;\nconst after = 1;\n[t, after]") == ["abc", 1]
        assert s.run("[typeof t, typeof after]") == ["string", "number"]


def test_top_level_await_declarations_stay_local_but_assignments_persist(box: IsoBox) -> None:
    """As documented: a snippet with top-level await runs as an async function body, so its
    declarations stay local to the run, while plain assignments to globals persist."""
    with box.create_session(new_id()) as s:
        assert s.run("const data = await Promise.resolve(5); kept = await Promise.resolve(6);"
                     " data + kept") == 11
        assert s.run("[typeof data, kept]") == ["undefined", 6]
        assert s.get_state() == {"kept": 6}


def test_declarations_in_strict_code_stay_local_but_global_assignments_persist(
        box: IsoBox) -> None:
    """As documented: strict-mode eval code has its own scope, so a 'use strict' snippet's
    declarations stay local; what it assigns to globalThis persists."""
    with box.create_session(new_id()) as s:
        assert s.run("'use strict'; let sx = 1; globalThis.gx = 2; sx + gx") == 3
        assert s.run("[typeof sx, gx]") == ["undefined", 2]
        assert s.run("let a /* comment */ = 1; const /* c */ b = 2; a + b") == 3
        assert s.run("[a, b]") == [1, 2]


def test_session_sandbox_is_applied_to_each_run_and_is_state(box: IsoBox) -> None:
    """As documented, a session's sandbox= globals are set before each of its runs (so a run's
    reassignment lasts until the next run) and belong to the session's state."""
    with box.create_session(new_id(), sandbox={"limit": 10, "cfg": {"a": 1}}) as s:
        assert s.run("[limit, cfg.a]") == [10, 1]
        assert s.run("limit = 20; cfg.a = 2; mine = 3; limit") == 20
        assert s.run("[limit, cfg.a, mine]") == [10, 1, 3]
        assert s.get_state() == {"limit": 10, "cfg": {"a": 1}, "mine": 3}
        assert s.run("[limit, other]", sandbox={"other": 5}) == [10, 5]


# -- 2. isolation ----------------------------------------------------------------------------
def test_plain_runs_start_clean_and_never_see_session_globals(box: IsoBox) -> None:
    """box.run starts from a clean global: no session's globals, no earlier run's."""
    with box.create_session(new_id()) as s:
        s.run("leak = 1; let leak2 = 2; class LeakK {}; 0")
        assert box.run("[typeof leak, typeof leak2, typeof LeakK]") == ["undefined"] * 3
        assert box.run("plainGlobal = 1; plainGlobal") == 1
        assert box.run("typeof plainGlobal") == "undefined"
        assert s.run("[leak, leak2, typeof plainGlobal]") == [1, 2, "undefined"]


def test_sessions_do_not_see_each_others_globals(box: IsoBox) -> None:
    """Two sessions keep separate globals, even under the same names."""
    with box.create_session(new_id()) as a, box.create_session(new_id()) as b:
        a.run("shared = 'a'; let onlyA = 1; 0")
        b.run("shared = 'b'; 0")
        assert a.run("shared") == "a"
        assert b.run("[shared, typeof onlyA]") == ["b", "undefined"]
        assert a.get_state() == {"shared": "a", "onlyA": 1}
        assert b.get_state() == {"shared": "b"}


def test_session_functions_are_visible_only_in_that_session(box: IsoBox) -> None:
    """Host functions given to a session are callable there, nowhere else, and not state."""
    calls: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    with box.create_session(new_id(), functions={"add": add}) as s, \
            box.create_session(new_id()) as other:
        assert s.run("total = add(2, 3); total") == 5
        assert calls == [(2, 3)]
        assert s.run("typeof add") == "function"
        assert s.get_state() == {"total": 5}
        assert other.run("typeof add") == "undefined"
        assert box.run("typeof add") == "undefined"
        assert s.run("[add(1, 1), twice(4)]", functions={"twice": lambda x: x * 2}) == [2, 8]
        assert s.run("[typeof add, typeof twice]") == ["function", "undefined"]


# -- 3. state operations, info, close ------------------------------------------------------
def test_get_state_holds_only_own_json_able_globals(box: IsoBox) -> None:
    """get_state: {} at first, then the session's JSON-able globals (let/const included);
    functions, classes, symbols and the built-ins are left out."""
    with box.create_session(new_id()) as s:
        assert s.get_state() == {}
        s.run("n = 1; let str1 = 'x'; const o = {a: [1, 2]}; var v = null;\n"
              "f = () => 1; class C {}; sym = Symbol('q'); 0")
        assert s.get_state() == {"n": 1, "str1": "x", "o": {"a": [1, 2]}, "v": None}


def test_set_state_merges_and_runs_see_it(box: IsoBox) -> None:
    """set_state merges into the globals; runs see the values, including special ones."""
    when = datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    with box.create_session(new_id()) as s:
        s.run("n = 1; keep = 'yes'; 0")
        s.set_state({"n": 10, "extra": [True, None, 1.5], "when": when, "big": 2**70,
                     "raw": b"\x00\x01"})
        assert s.run("n + extra.length") == 13
        assert s.run("[when instanceof Date, when.getUTCFullYear(), typeof big,"
                     " raw instanceof Uint8Array, raw[1], keep]") == [
            True, 2020, "bigint", True, 1, "yes"]
        state = s.get_state()
        assert state == {"n": 10, "keep": "yes", "extra": [True, None, 1.5], "when": when,
                         "big": 2**70, "raw": b"\x00\x01"}
        s.set_state({})
        assert s.get_state() == state


def test_set_state_rejects_bad_input_and_the_session_survives(box: IsoBox) -> None:
    """set_state refuses non-dicts, non-str keys and values that cannot cross."""
    with box.create_session(new_id()) as s:
        s.run("n = 1")
        with pytest.raises(TypeError, match="str keys"):
            s.set_state({1: 2})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="str keys"):
            s.set_state([1])  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            s.set_state({"a": object()})
        assert s.get_state() == {"n": 1}
        assert s.run("n + 1") == 2


def test_reset_clears_context_and_checkpoint(box: IsoBox) -> None:
    """reset drops globals, closures and checkpoint; the session stays open and usable."""
    with box.create_session(new_id()) as s:
        s.run("counter = 5; let kept = 1; g = () => 1; 0")
        s.reset()
        assert s.get_state() == {}
        assert s.run("[typeof counter, typeof kept, typeof g]") == ["undefined"] * 3
        assert s.run("counter = 1; let kept = 2; [counter, kept]") == [1, 2]
        assert s.get_state() == {"counter": 1, "kept": 2}


def test_info_counts_runs_and_advances_last_used(box: IsoBox) -> None:
    """info(): id and ttl as created, the run count (failed runs included) and last_used
    advance; worker_pid names the holding worker in process mode, None in-process."""
    sid = new_id()
    with box.create_session(sid, ttl=30.0) as s:
        first = s.info()
        assert (first.id, first.ttl, first.execution_count, first.worker_pid) == (
            sid, 30.0, 0, None)
        assert first.last_used >= first.created_at
        time.sleep(0.02)
        result = s.execute("x = 1")
        with pytest.raises(ScriptError):
            s.run("throw new Error('counted too')")
        time.sleep(0.02)
        s.run("x + 1")
        later = s.info()
        assert later.execution_count == 3
        assert later.created_at == first.created_at
        assert later.last_used > first.last_used
        if box.pool_stats().workers:
            assert later.worker_pid == result.worker_pid
            assert later.worker_pid in {w.pid for w in box.pool_stats().workers}
        else:
            assert later.worker_pid is None
        time.sleep(0.02)
        s.get_state()
        assert s.info().last_used > later.last_used
        assert s.info().execution_count == 3  # state operations are not runs


def test_execute_returns_the_full_result(box: IsoBox) -> None:
    """execute in a session returns value, type and console like a plain execute."""
    with box.create_session(new_id()) as s:
        s.run("n = 21")
        result = s.execute("console.log('n is', n); n * 2")
        assert result.value == 42
        assert result.type == "number"
        assert result.console == [("log", "n is 21")]
        assert result.worker_pid == s.info().worker_pid


def test_run_stream_sees_and_sets_session_globals(box: IsoBox) -> None:
    """run_stream in a session reads its globals, and globals it assigns stay."""
    with box.create_session(new_id()) as s:
        s.run("base = 10")
        assert list(s.run_stream("for (let k = 0; k < 3; k++) yield base + k", window=2)) == [
            10, 11, 12]
        assert list(s.run_stream("streamed = 'yes'; yield streamed")) == ["yes"]
        assert s.run("[base, streamed, typeof k]") == [10, "yes", "undefined"]


def test_close_and_context_manager_end_the_session(box: IsoBox) -> None:
    """After close (or leaving the with block) every call raises SessionError, get_session
    does too, closing again is harmless, and the id may be reused for a clean session."""
    sid = new_id()
    with box.create_session(sid) as s:
        s.run("x = 1")
        assert box.get_session(sid).run("x") == 1
    for call in (lambda: s.run("1"), lambda: s.execute("1"), s.get_state,
                 lambda: s.set_state({"a": 1}), s.info):
        with pytest.raises(SessionError, match="closed"):
            call()
    with pytest.raises(SessionError, match="no open session"):
        box.get_session(sid)
    s.close()  # idempotent
    with box.create_session(sid) as again:
        assert again.run("typeof x") == "undefined"
        assert again.info().execution_count == 1


def test_get_session_returns_the_same_live_session(box: IsoBox) -> None:
    """get_session hands back the open session: same globals, same counters, and closing
    through it closes the original."""
    sid = new_id()
    s = box.create_session(sid)
    s.run("x = 41")
    found = box.get_session(sid)
    assert isinstance(found, Session)
    assert found.id == sid
    assert found.run("++x") == 42
    assert s.info().execution_count == 2
    found.close()
    with pytest.raises(SessionError):
        s.run("x")


def test_script_and_compile_errors_keep_the_session(box: IsoBox) -> None:
    """A script error keeps the live context (assignments before the throw included); a
    compile error changes nothing; the session goes on."""
    with box.create_session(new_id()) as s:
        s.run("n = 1; f = () => n; 0")
        with pytest.raises(ScriptError, match="boom"):
            s.run("n = 2; throw new Error('boom')")
        with pytest.raises(CompileError):
            s.run("let = = 1")
        assert s.run("[n, f()]") == [2, 2]


# -- 4. limits per run -----------------------------------------------------------------------
def test_cpu_timeout_keeps_the_context_and_closures(box: IsoBox) -> None:
    """A CPU timeout raises TimeoutError(kind="cpu") and the live context, closures and all,
    is still there (with what the run assigned before it spun)."""
    with box.create_session(new_id()) as s:
        s.run("counter = 5; f = () => counter * 2; 0")
        pid = s.info().worker_pid
        with pytest.raises(BoxTimeoutError) as info:
            s.run("counter = 6; while (true) {}", cpu_timeout=0.3)
        assert info.value.kind == "cpu"
        assert info.value.limit == 0.3
        assert s.run("f()") == 12
        assert s.info().worker_pid == pid


def test_memory_limit_drops_the_context_but_keeps_json_state(box: IsoBox) -> None:
    """A memory bomb raises MemoryLimitError; the next run restores the last checkpoint: JSON
    globals are back, functions and the bomb's own globals are not."""
    with box.create_session(new_id()) as s:
        s.run("counter = 5; let label = 'kept'; f = () => 1; 0")
        with pytest.raises(MemoryLimitError):
            s.run(MEMORY_BOMB, memory_limit=16 * MIB)
        assert s.run("[counter, label, typeof f, typeof xs]") == [5, "kept", "undefined",
                                                                  "undefined"]
        assert s.run("counter += 1; counter") == 6


def test_session_options_apply_to_every_run_and_a_run_may_override(box: IsoBox) -> None:
    """Options given at creation bound every run of the session; a run's own option wins."""
    with box.create_session(new_id(), cpu_timeout=0.3) as s:
        with pytest.raises(BoxTimeoutError) as info:
            s.run("while (true) {}")
        assert (info.value.kind, info.value.limit) == ("cpu", 0.3)
        spin = "let t0 = Date.now(); while (Date.now() - t0 < 400) {} 'done'"
        assert s.run(spin, cpu_timeout=3.0) == "done"
    with box.create_session(new_id(), memory_limit=16 * MIB) as s, pytest.raises(
            MemoryLimitError):
        s.run(MEMORY_BOMB)


def test_wall_timeout_kills_the_worker_and_the_next_run_restores(
        make_box: Callable[..., IsoBox]) -> None:
    """A native hang past the wall timeout gets the worker killed (TimeoutError kind "cpu"
    when it spent its CPU budget, "wall" when a loaded machine gave it less); the next run
    lands on another worker with the checkpoint: values back, functions gone."""
    box = make_box()
    s = box.create_session(new_id())
    s.run("counter = 7; let label = 'kept'; f = () => 1; 0")
    pid = pid_of(s)
    started = time.monotonic()
    with pytest.raises(BoxTimeoutError) as info:
        s.run(NATIVE_HANG, timeout=0.5)
    assert info.value.kind in ("cpu", "wall")
    assert time.monotonic() - started < RECOVERY_BOUND
    assert wait_until(lambda: not alive(pid))
    assert s.run("[counter, label, typeof f]") == [7, "kept", "undefined"]
    assert time.monotonic() - started < RECOVERY_BOUND + 1.0
    assert pid_of(s) != pid
    assert s.run("counter += 1; counter") == 8


def test_wall_timeout_of_one_session_restores_its_neighbours(
        make_box: Callable[..., IsoBox]) -> None:
    """Sessions sharing the killed worker lose only their closures: their next run restores
    their own checkpoint on the replacement worker."""
    box = make_box(pool={"min": 1, "max": 1})
    a, b = box.create_session(new_id()), box.create_session(new_id())
    a.run("x = 1; fa = () => 1; 0")
    b.run("y = 2; fb = () => 2; 0")
    pid = pid_of(a)
    assert pid_of(b) == pid
    with pytest.raises(BoxTimeoutError):
        a.run(NATIVE_HANG, timeout=0.5)
    assert b.run("[y, typeof fb, typeof x]") == [2, "undefined", "undefined"]
    assert a.run("[x, typeof fa, typeof y]") == [1, "undefined", "undefined"]
    assert pid_of(a) == pid_of(b) != pid


def test_neighbour_failures_do_not_cost_a_session_its_closures(
        make_box: Callable[..., IsoBox]) -> None:
    """On one worker: another session's memory bomb and a plain run's CPU timeout neither
    kill the worker nor touch this session's live context."""
    box = make_box(pool={"min": 1, "max": 1})
    a, b = box.create_session(new_id()), box.create_session(new_id())
    a.run("n = 0; inc1 = () => ++n; 0")
    pid = pid_of(a)
    with pytest.raises(MemoryLimitError):
        b.run(MEMORY_BOMB, memory_limit=16 * MIB)
    with pytest.raises(BoxTimeoutError) as info:
        box.run("while (true) {}", cpu_timeout=0.2)
    assert info.value.kind == "cpu"
    assert box.run("typeof n") == "undefined"
    assert a.run("inc1()") == 1
    assert pid_of(a) == pid
    assert serving_pids(box) == {pid}


def test_a_worker_holding_sessions_is_not_recycled_at_max_runs(
        make_box: Callable[..., IsoBox]) -> None:
    """max_runs does not recycle a worker that hosts a session (it would cost its closures)."""
    box = make_box(pool={"min": 1, "max": 1, "max_runs": 3})
    s = box.create_session(new_id())
    s.run("n = 0; inc1 = () => ++n; 0")
    pid = pid_of(s)
    for expected in range(1, 11):
        assert s.run("inc1()") == expected
    assert pid_of(s) == pid
    assert serving_pids(box) == {pid}


# -- 5. TTL ----------------------------------------------------------------------------------
def test_ttl_expiry_raises_and_emits_the_event_once(pbox: IsoBox) -> None:
    """An idle session past its TTL expires: one session:expired event with its id and ttl,
    then run, state, info and get_session raise SessionError."""
    expiries = Expiries(pbox)
    try:
        sid = new_id()
        s = pbox.create_session(sid, ttl=0.3)
        s.run("x = 1")
        time.sleep(0.8)
        assert wait_until(lambda: bool(expiries.of(sid)), 5.0)
        with pytest.raises(SessionError, match="expired"):
            s.run("x")
        for call in (s.get_state, s.info):
            with pytest.raises(SessionError, match="expired"):
                call()
        with pytest.raises(SessionError, match="no open session"):
            pbox.get_session(sid)
        time.sleep(0.3)  # a few more sweeps: still exactly one event
        assert expiries.of(sid) == [{"id": sid, "ttl": 0.3}]
        with pbox.create_session(sid) as again:  # the id is free again
            assert again.run("typeof x") == "undefined"
    finally:
        expiries.close()


def test_a_session_in_use_does_not_expire(pbox: IsoBox) -> None:
    """TTL counts from the last use: runs and state operations keep a session alive."""
    expiries = Expiries(pbox)
    try:
        sid = new_id()
        with pbox.create_session(sid, ttl=1.0) as s:
            s.run("n = 0")
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                s.run("n++")
                time.sleep(0.1)
            for op in (s.get_state, lambda: s.set_state({"m": 1}), s.get_state):
                time.sleep(0.3)
                op()
            time.sleep(0.3)
            assert s.run("[n > 5, m]") == [True, 1]
            assert expiries.of(sid) == []
    finally:
        expiries.close()


def test_a_long_run_does_not_expire_while_it_runs(pbox: IsoBox) -> None:
    """A run longer than the TTL is not cut short, and the TTL restarts when it ends."""
    with pbox.create_session(new_id(), ttl=0.3) as s:
        assert s.run("let t0 = Date.now(); while (Date.now() - t0 < 800) {} 'done'") == "done"
        assert s.run("typeof t0") == "number"


def test_ttl_none_is_kept_and_reported(box: IsoBox) -> None:
    """ttl=None means no expiry; info reports it; bad ttls are refused at creation."""
    with box.create_session(new_id(), ttl=None) as s:
        assert s.info().ttl is None
        assert s.run("1") == 1
    bad: Any  # deliberately not a float
    for bad in (0, -1, True, "10"):
        with pytest.raises(ValueError, match="ttl"):
            box.create_session(new_id(), ttl=bad)


# -- 6. errors and limits on sessions --------------------------------------------------------
def test_unknown_session_raises(box: IsoBox) -> None:
    """get_session of an id never created raises SessionError."""
    with pytest.raises(SessionError, match="no open session 'never-made'"):
        box.get_session("never-made")


@pytest.mark.parametrize("bad", ["", None, 5, "x" * 257])
def test_bad_session_ids_are_refused(lbox: IsoBox, bad: Any) -> None:
    """An id must be a non-empty str of at most 256 characters."""
    with pytest.raises(SessionError, match="non-empty str"):
        lbox.create_session(bad)


def test_duplicate_id_raises_and_keeps_the_first(box: IsoBox) -> None:
    """A second create_session with an open id raises; the first session is untouched."""
    sid = new_id()
    with box.create_session(sid) as s:
        s.run("x = 1")
        with pytest.raises(SessionError, match="already exists"):
            box.create_session(sid)
        assert s.run("x") == 1
        assert box.get_session(sid).run("x") == 1


def test_bad_options_are_refused_at_creation_without_taking_the_id(lbox: IsoBox) -> None:
    """Unknown or invalid options and bad functions raise at creation; the id stays free."""
    sid = new_id()
    with pytest.raises(TypeError, match="unknown run option"):
        lbox.create_session(sid, bogus=1)
    with pytest.raises(ValueError, match="memory_limit"):
        lbox.create_session(sid, memory_limit=5)
    with pytest.raises(TypeError, match="not callable"):
        lbox.create_session(sid, functions={"f": 5})
    with pytest.raises(SessionError):
        lbox.get_session(sid)
    with lbox.create_session(sid) as s:
        assert s.run("1") == 1


def test_max_sessions_limit() -> None:
    """max_sessions caps open sessions with a clear message; closing one frees a slot."""
    with pytest.raises(ValueError, match="max_sessions"):
        IsoBox(mode="inprocess", max_sessions=0)
    with pytest.raises(ValueError, match="max_sessions_per_worker"):
        IsoBox(mode="inprocess", max_sessions_per_worker=True)
    with IsoBox(mode="inprocess", max_sessions=2) as box:
        a = box.create_session("a")
        box.create_session("b")
        with pytest.raises(SessionError, match=r"already has 2 open sessions \(max_sessions\)"):
            box.create_session("c")
        a.close()
        assert box.create_session("c").run("1") == 1
        with pytest.raises(SessionError, match="max_sessions"):
            box.create_session("d")


def test_per_worker_limit_and_expiry_frees_the_slot(make_box: Callable[..., IsoBox]) -> None:
    """With every worker full and the pool at max, a new session's first run raises
    SessionError saying so; the first session's expiry frees its slot."""
    box = make_box(pool={"min": 1, "max": 1}, max_sessions_per_worker=1)
    expiries = Expiries(box)
    first = box.create_session(new_id(), ttl=0.3)
    first.run("1")
    second = box.create_session(new_id())
    started = time.monotonic()
    with pytest.raises(SessionError, match=r"every worker already holds 1 sessions \(pool max 1\)"):
        second.run("1")
    assert time.monotonic() - started < 2.0  # refused at once, not after the timeout
    assert second.info().execution_count == 0
    assert wait_until(lambda: bool(expiries.of(first.id)), 5.0)
    assert second.run("2") == 2


def test_shutdown_ends_sessions(make_box: Callable[..., IsoBox]) -> None:
    """After shutdown a session's calls raise SessionError and new sessions ClosedError."""
    box = make_box()
    sid = new_id()
    s = box.create_session(sid)
    s.run("x = 1")
    box.shutdown()
    with pytest.raises(SessionError, match="closed"):
        s.run("x")
    with pytest.raises(SessionError):
        box.get_session(sid)
    with pytest.raises(ClosedError):
        box.create_session(new_id())


# -- 7. crash recovery -----------------------------------------------------------------------
def test_idle_worker_killed_next_run_restores_the_checkpoint(
        make_box: Callable[..., IsoBox]) -> None:
    """kill -9 of the session's idle worker: the next run restores the checkpoint on another
    worker (values back, functions gone, host functions bound again) within the bound."""
    box = make_box()
    s = box.create_session(new_id(), functions={"add": lambda a, b: a + b})
    s.run("counter = 41; let label = 'kept'; function f() { return 1; }; 0")
    pid = pid_of(s)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))
    assert s.run("[counter, label, typeof f, add(counter, 1)]") == [41, "kept", "undefined", 42]
    recovery = time.monotonic() - killed_at
    assert recovery < RECOVERY_BOUND, f"recovery took {recovery:.2f}s"
    assert pid_of(s) != pid
    assert s.run("counter += 1; counter") == 42


def test_kill_during_a_run_fails_it_and_the_next_run_has_the_last_checkpoint(
        make_box: Callable[..., IsoBox]) -> None:
    """kill -9 mid-run: that run raises WorkerCrashedError naming the worker; the next run
    sees the last good checkpoint (not the dying run's writes) on another worker."""
    box = make_box()
    s = box.create_session(new_id())
    s.run("counter = 9; let label = 'kept'; 0")
    s.run("g = () => 1; 0")
    pid = pid_of(s)
    killer = KillWhenBusy(pid)
    with pytest.raises(WorkerCrashedError) as info:
        s.run("counter = 100; h = () => 2; while (true) {}", timeout=10.0)
    killed_at = killer.join()
    assert info.value.pid == pid
    assert info.value.signal == signal.SIGKILL
    assert s.run("[counter, label, typeof g, typeof h]") == [9, "kept", "undefined",
                                                            "undefined"]
    recovery = time.monotonic() - killed_at
    assert recovery < RECOVERY_BOUND, f"recovery took {recovery:.2f}s"
    assert pid_of(s) != pid


def test_state_operations_after_a_crash_restore_the_checkpoint(
        make_box: Callable[..., IsoBox]) -> None:
    """set_state checkpoints too; after kill -9 get_state restores it, special values intact."""
    box = make_box()
    s = box.create_session(new_id())
    s.run("d = new Date(0); big = 2n ** 70n; nan = NaN; inf = -Infinity;"
          " raw = new Uint8Array([1, 2]); nested = {a: [1, {b: null}], s: 'é'}; 0")
    s.set_state({"k": 1})
    before = s.get_state()
    pid = pid_of(s)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))
    after = s.get_state()
    assert after.keys() == before.keys()
    assert after["k"] == 1
    assert after["big"] == 2**70
    assert after["nested"] == {"a": [1, {"b": None}], "s": "é"}
    assert pid_of(s) != pid
    assert s.run("[d instanceof Date, d.getTime(), typeof big, Number.isNaN(nan),"
                 " inf === -Infinity, raw instanceof Uint8Array, raw[1], nested.a[1].b, k]") == [
        True, 0, "bigint", True, True, True, 2, None, 1]


# -- 8. many sessions across workers ---------------------------------------------------------
def test_many_sessions_spread_over_workers_and_stay_consistent(
        make_box: Callable[..., IsoBox]) -> None:
    """8 sessions on a 2-worker pool (4 per worker) keep their own counters through
    interleaved runs; a 9th cannot be placed until one closes."""
    box = make_box(max_sessions_per_worker=4)
    sessions = [box.create_session(new_id()) for _ in range(8)]
    for s in sessions:
        s.run("n = 0; 0")
    for rnd in range(3):
        for i, s in enumerate(sessions):
            assert s.run(f"n += {i}; n") == (rnd + 1) * i
    assert [s.run("n") for s in sessions] == [3 * i for i in range(8)]
    per_worker = collections.Counter(pid_of(s) for s in sessions)
    assert sorted(per_worker.values()) == [4, 4]
    assert set(per_worker) == serving_pids(box)
    ninth = box.create_session(new_id())
    with pytest.raises(SessionError, match=r"every worker already holds 4 sessions \(pool max 2\)"):
        ninth.run("1")
    freed = pid_of(sessions[0])
    sessions[0].close()
    assert ninth.run("n = 99; n") == 99
    assert pid_of(ninth) == freed
    assert [s.run("n") for s in sessions[1:]] == [3 * i for i in range(1, 8)]


# -- 9. concurrency --------------------------------------------------------------------------
def test_threads_on_their_own_sessions_stay_consistent(pbox: IsoBox) -> None:
    """4 threads each run their own session 20 times concurrently; every count is exact."""
    sessions = [pbox.create_session(new_id()) for _ in range(4)]
    errors: list[BaseException] = []

    def hammer(i: int, s: Session) -> None:
        try:
            s.run(f"n = 0; tag = {i}; seen = []; 0")
            for k in range(20):
                assert s.run(f"n++; seen.push({k}); [n, tag]") == [k + 1, i]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i, s)) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    assert not errors, errors
    for i, s in enumerate(sessions):
        assert s.get_state() == {"n": 20, "tag": i, "seen": list(range(20))}
        assert s.info().execution_count == 21
        s.close()


def test_threads_sharing_one_session_are_serialized(box: IsoBox) -> None:
    """4 threads running one session 20 times each lose no increment."""
    errors: list[BaseException] = []
    with box.create_session(new_id()) as s:
        s.run("n = 0")

        def hammer() -> None:
            try:
                for _ in range(20):
                    s.run("n++")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30.0)
        assert not errors, errors
        assert s.run("n") == 80
        assert s.info().execution_count == 82


def test_a_busy_session_fails_clearly_instead_of_waiting_for_ever(box: IsoBox) -> None:
    """A run that cannot get the session within its timeout (another thread's run or an open
    stream holds it) raises SessionError saying so; the session then works as before."""
    with box.create_session(new_id()) as s:
        s.run("n = 0")
        stream = s.run_stream("yield 1; yield 2")
        assert next(stream) == 1
        started = time.monotonic()
        with pytest.raises(SessionError, match=r"stayed busy for 0\.3s"):
            s.run("n++", timeout=0.3)
        assert time.monotonic() - started < 3.0
        stream.close()
        assert s.run("++n") == 1
        errors: list[BaseException] = []

        def long_run() -> None:
            try:
                s.run("let t0 = Date.now(); while (Date.now() - t0 < 1500) {} n++")
            except BaseException as exc:
                errors.append(exc)

        holder = threading.Thread(target=long_run)
        holder.start()
        try:
            assert wait_until(lambda: s._state.busy > 0, 5.0)
            with pytest.raises(SessionError, match="stayed busy"):
                s.run("n++", timeout=0.3)
        finally:
            holder.join(10.0)
        assert not errors, errors
        assert s.run("n") == 2


def test_a_state_over_the_result_cap_keeps_the_previous_checkpoint(
        make_box: Callable[..., IsoBox]) -> None:
    """As documented: a state larger than max_result_size is not checkpointed; get_state says
    so, the live context still has it, and a crash falls back to the previous checkpoint."""
    box = make_box(max_result_size=1024)
    s = box.create_session(new_id())
    s.run("small = 1; 0")
    s.run("small = 2; big = 'x'.repeat(2000); 0")
    with pytest.raises(SerializationError, match="exceeds the result cap"):
        s.get_state()
    assert s.run("[small, big.length]") == [2, 2000]
    pid = pid_of(s)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))
    assert s.run("[small, typeof big]") == [1, "undefined"]


# -- events ----------------------------------------------------------------------------------
def test_metrics_recorded_fires_for_session_runs(pbox: IsoBox) -> None:
    """metrics:recorded fires for every session run with its status and worker."""
    seen: list[Any] = []

    def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["metrics"])

    pbox.on("metrics:recorded", handler)
    try:
        with pbox.create_session(new_id()) as s:
            s.run("1")
            with pytest.raises(ScriptError):
                s.run("throw new Error('x')")
            with pytest.raises(BoxTimeoutError):
                s.run("while (true) {}", cpu_timeout=0.2)
            s.get_state()  # a state operation is not a run
            pid = pid_of(s)
    finally:
        pbox.off("metrics:recorded", handler)
    assert [m.status for m in seen] == ["ok", "error", "timeout"]
    assert {m.worker_pid for m in seen} == {pid}


# -- 10. the asyncio twin --------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_async_session_run_state_and_close(mode: str) -> None:
    """AsyncSession: run with REPL semantics, execute, get/set_state, info, get_session,
    reset and close, in both modes."""

    async def main() -> None:
        async with AsyncIsoBox(mode=mode, timeout=5.0, pool=POOL) as box:
            sid = new_id("async")
            s = await box.create_session(sid)
            assert isinstance(s, AsyncSession)
            assert await s.run("counter = 0") == 0
            assert await s.run("counter++; counter") == 1
            assert await s.run("let x = 1; x") == 1
            assert await s.run("let x = 2; const y = 3; x + y") == 5
            await s.set_state({"z": [1, 2]})
            assert await s.get_state() == {"counter": 1, "x": 2, "y": 3, "z": [1, 2]}
            assert (await s.execute("counter + z.length")).value == 3
            info = await s.info()
            assert (info.id, info.execution_count) == (sid, 5)
            assert (info.worker_pid is None) == (mode == "inprocess")
            assert await box.run("typeof counter") == "undefined"
            assert await (await box.get_session(sid)).run("x") == 2
            await s.reset()
            assert await s.get_state() == {}
            await s.close()
            with pytest.raises(SessionError, match="closed"):
                await s.run("1")
            with pytest.raises(SessionError):
                await box.get_session(sid)

    asyncio.run(main())


def test_async_with_closes_the_session() -> None:
    """`async with` on an AsyncSession closes it on the way out."""

    async def main() -> None:
        async with AsyncIsoBox(timeout=5.0, pool=POOL) as box:
            sid = new_id("async")
            async with await box.create_session(sid) as s:
                await s.run("n = 1")
                assert await s.run("n + 1") == 2
            with pytest.raises(SessionError, match="closed"):
                await s.run("n")
            with pytest.raises(SessionError):
                await box.get_session(sid)

    asyncio.run(main())


def test_async_crash_recovery() -> None:
    """Async: an idle kill and a mid-run kill both end in a run that sees the checkpoint."""

    async def main() -> None:
        async with AsyncIsoBox(timeout=5.0, pool=POOL) as box:
            assert await box.warmup_pool() == 2
            s = await box.create_session(new_id("async"))
            await s.run("counter = 1; f = () => 1; 0")
            pid = (await s.info()).worker_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert await asyncio.to_thread(wait_until, lambda: not alive(pid))
            assert await s.run("[counter, typeof f]") == [1, "undefined"]
            busy = (await s.info()).worker_pid
            assert busy is not None
            assert busy != pid
            killer = KillWhenBusy(busy)
            with pytest.raises(WorkerCrashedError):
                await s.run("counter = 100; while (true) {}", timeout=10.0)
            killed_at = await asyncio.to_thread(killer.join)
            assert await s.run("counter") == 1
            assert time.monotonic() - killed_at < RECOVERY_BOUND

    asyncio.run(main())


def test_async_ttl_expiry() -> None:
    """Async: an idle session expires, emits session:expired once, then raises SessionError."""

    async def main() -> None:
        async with AsyncIsoBox(mode="inprocess") as box:
            expiries = Expiries(box)
            sid = new_id("async")
            s = await box.create_session(sid, ttl=0.3)
            await s.run("1")
            await asyncio.sleep(0.8)
            assert await asyncio.to_thread(wait_until, lambda: bool(expiries.of(sid)))
            with pytest.raises(SessionError, match="expired"):
                await s.run("1")
            assert expiries.of(sid) == [{"id": sid, "ttl": 0.3}]

    asyncio.run(main())


def test_async_tasks_on_their_own_sessions_stay_consistent() -> None:
    """Async: 4 tasks each run their own session 20 times concurrently; counts are exact."""

    async def hammer(s: AsyncSession, i: int) -> list[Any]:
        await s.run(f"n = 0; tag = {i}; 0")
        for k in range(20):
            assert await s.run("++n") == k + 1
        return cast("list[Any]", await s.run("[n, tag]"))

    async def main() -> list[list[Any]]:
        async with AsyncIsoBox(timeout=5.0, pool=POOL) as box:
            sessions = [await box.create_session(new_id("async")) for _ in range(4)]
            return await asyncio.gather(*(hammer(s, i) for i, s in enumerate(sessions)))

    assert asyncio.run(main()) == [[20, i] for i in range(4)]
