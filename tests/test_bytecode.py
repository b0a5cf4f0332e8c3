"""The trusted JS read as bytecode: the loader, the engine's use of it, and parity with source.

The parity tests run the same programs in two interpreters, one with ``ISOBOX_BYTECODE=0``,
and require identical answers, stacks (lines and columns) included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import _quickjs
import pytest

from isobox import IsoBox, ScriptError
from isobox.workers import bytecode, engine

pytestmark = pytest.mark.timeout(120)

@pytest.fixture
def loader() -> bytecode.Loader:
    if bytecode.LOADER is None:
        pytest.skip(bytecode.disabled_reason())
    return bytecode.LOADER


def test_the_pinned_binding_gets_bytecode() -> None:
    # quickjs-ng 0.17 is what pyproject allows: on it the layout checks must pass.
    assert bytecode.LOADER is not None, bytecode.disabled_reason()
    assert engine.prelude_mode() == "bytecode"
    assert set(engine._BYTECODE) == {"prelude", "hot", "cold", "loop", "mods", "memfs"}


def test_round_trip_and_no_trace_on_the_global(loader: bytecode.Loader) -> None:
    code = loader.compile("({ a: [1, 'x'], f() { return 7; } })")
    ctx = _quickjs.Context()
    value = loader.load(ctx, code)
    assert value is not None
    assert value.json() == '{"a":[1,"x"]}'
    ctx.set("probe", value)
    assert ctx.eval("probe.f()") == 7
    names = ctx.eval("JSON.stringify(Object.getOwnPropertyNames(globalThis))")
    assert "__isobox" not in names


def test_a_refused_load_returns_none_and_leaves_the_context_usable(loader: bytecode.Loader) -> None:
    code = loader.compile("[1]")
    ctx = _quickjs.Context()
    ctx.eval("Object.freeze(globalThis)")  # the stash cannot be defined: evaluation throws
    assert loader.load(ctx, code) is None
    assert ctx.eval("1 + 1") == 2  # no exception was left pending


def test_out_of_memory_while_reading_returns_none(loader: bytecode.Loader) -> None:
    ctx = _quickjs.Context()
    ctx.set_memory_limit(ctx.memory()["memory_used_size"] + 4096)
    assert loader.load(ctx, engine._BYTECODE["loop"]) is None
    ctx.set_memory_limit(-1)
    assert ctx.eval("40 + 2") == 42


def test_a_syntax_error_in_trusted_source_is_refused(loader: bytecode.Loader) -> None:
    with pytest.raises(RuntimeError, match="did not compile"):
        loader.compile("(function ( {")


@pytest.mark.usefixtures("loader")
def test_a_context_gets_bytecode_only_while_pristine() -> None:
    jc = engine.JsContext()
    assert isinstance(jc.library("mods"), _quickjs.Object)
    jc.pristine = False  # user code ran: JS_ReadObject would then evaluate in a tampered realm
    assert jc.library("mods") == engine._MODS


def test_a_session_run_loads_the_module_system_from_source(
        loader: bytecode.Loader, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that already ran user code gets the module system as source: no bytecode is
    read into it (JS_ReadObject would evaluate in a realm the script could have tampered
    with)."""
    eng = engine.Engine()
    first = eng.run(engine.RunSpec(code="globalThis.x = 1", session="s"))
    assert first.kind == "R"
    jc = eng._sessions["s"]
    assert not jc.pristine and not jc.mods
    read: list[bytes] = []
    real = loader.load

    def spy(ctx: _quickjs.Context, code: bytes) -> _quickjs.Object | None:
        read.append(code)
        return real(ctx, code)

    monkeypatch.setattr(loader, "load", spy)
    spec = engine.RunSpec(code="require('util').format('%d', x + 1)", session="s",
                          require={})  # an empty policy: require() exists, nothing allowed
    assert eng.run(spec).kind in "RE"  # whatever the module says, it was loaded from source
    assert jc.mods
    assert engine._BYTECODE["mods"] not in read
    fresh = engine.JsContext()
    assert isinstance(fresh.library("mods"), _quickjs.Object)  # the spy sees reads at all
    assert engine._BYTECODE["mods"] in read


def test_the_next_context_preloads_what_the_last_run_used() -> None:
    eng = engine.Engine()
    eng.run(engine.RunSpec(code="1 + 2"))
    eng.prepare()
    assert eng._libraries_wanted == frozenset()
    eng.run(engine.RunSpec(code="({ a: 1 })"))  # an object result: hot.js
    eng.prepare()
    assert eng._libraries_wanted == {"hot"}
    eng.run(engine.RunSpec(code="throw new Error('x')"))  # an error: hot.js and cold.js
    eng.prepare()
    assert eng._libraries_wanted == {"hot", "cold"}
    eng.run(engine.RunSpec(code="await new Promise((r) => setTimeout(r, 1)); ({})"))
    eng.prepare()
    assert {"hot", "loop"} <= eng._libraries_wanted
    eng.run(engine.RunSpec(code="'plain'"))
    eng.prepare()
    assert eng._libraries_wanted == frozenset()


def test_preloaded_libraries_work_and_stay_out_of_reach() -> None:
    eng = engine.Engine()
    eng.run(engine.RunSpec(code="await new Promise((r) => setTimeout(r, 1)); throw new Error()"))
    eng.prepare()
    assert eng._libraries_wanted == {"hot", "cold", "loop"}
    printed: list[tuple[str, str]] = []
    outcome = eng.run(engine.RunSpec(code=(
        "const seen = Object.getOwnPropertyNames(globalThis).filter((k) => /isobox/i.test(k));"
        "await new Promise((r) => setTimeout(r, 1)); console.log('hi'); ({ seen })")),
        printed.extend)
    assert outcome.kind == "R"
    assert json.loads(outcome.payload.split("\n", 1)[1]) == {"seen": []}
    assert outcome.console + printed == [("log", "hi")]


def test_the_minimum_memory_limit_still_runs_with_every_library_preloaded() -> None:
    eng = engine.Engine()
    eng.run(engine.RunSpec(code="await new Promise((r) => setTimeout(r, 1)); throw new Error()"))
    eng.prepare()
    assert eng._libraries_wanted == {"hot", "cold", "loop"}
    outcome = eng.run(engine.RunSpec(code="({ a: [1, 2, 3] })", memory_limit=1 * 2**20))
    assert outcome.kind == "R"


_PARITY = textwrap.dedent("""
    import json, sys
    from isobox import IsoBox, IsoBoxError
    from isobox.workers.engine import prelude_mode
    programs = json.loads(sys.argv[1])
    out = []
    with IsoBox(mode="inprocess") as box:
        for code, options in programs:
            try:
                out.append(["ok", box.run(code, **options)])
            except IsoBoxError as exc:
                out.append(["error", type(exc).__name__, str(exc),
                            getattr(exc, "stack", None), getattr(exc, "line", None)])
            except Exception as exc:
                out.append(["other", repr(exc)])
    print(json.dumps([prelude_mode(), out], default=repr))
""")

_PROGRAMS: list[tuple[str, dict[str, object]]] = [
    ("1 + 2", {}),
    ("({ a: [1, 'x', null], b: { c: true } })", {}),
    ("function f() { throw new TypeError('deep'); }\nfunction g() { f(); }\ng()", {}),
    ("const o = {};\no.missing.field", {}),
    ("await new Promise((r) => setTimeout(() => r(41), 2)); 42", {}),
    ("console.log('a', { b: 1 }); console.error('e'); 7", {}),
    ("[NaN, Infinity, -0, undefined, 2n ** 70n, new Date(0)]", {}),
    ("input.x * 2", {"sandbox": {"input": {"x": 21}}}),
    ("process.env.K", {"env": {"K": "v"}}),
    ("typeof require + typeof process + typeof Buffer", {}),
    ("new WeakRef({}).deref() !== undefined", {}),
    ("syntax error here (", {}),
    ("async function f() { await 0; throw new Error('late'); }\nawait f()", {}),
    ("Promise.reject(new RangeError('rejected'))", {}),
    ("throw { toString() { return 'plain object'; } }", {}),
    ("(function r(n) { return r(n + 1); })(0)", {}),
]


def _parity_run(env_value: str | None) -> list[object]:
    env = dict(os.environ)
    env.pop("ISOBOX_BYTECODE", None)
    if env_value is not None:
        env["ISOBOX_BYTECODE"] = env_value
    done = subprocess.run([sys.executable, "-c", _PARITY, json.dumps(_PROGRAMS)], env=env,
                          capture_output=True, text=True, timeout=90, check=True)
    mode, answers = json.loads(done.stdout)
    assert mode == ("source" if env_value == "0" else "bytecode")
    assert isinstance(answers, list)
    return answers


@pytest.mark.usefixtures("loader")
def test_bytecode_and_source_give_identical_answers_and_stacks() -> None:
    with_bytecode = _parity_run(None)
    with_source = _parity_run("0")
    assert len(with_bytecode) == len(_PROGRAMS)
    for program, a, b in zip(_PROGRAMS, with_bytecode, with_source, strict=True):
        assert a == b, program
    stacks = [a[3] for a in with_bytecode if isinstance(a, list) and a[0] == "error"]
    assert any(s and "<input>:1" in s for s in stacks)  # the stacks compared carry positions


def test_workers_report_how_they_load_the_prelude() -> None:
    with IsoBox(pool={"min": 1, "max": 1}) as box:
        assert box.run("({ ok: 1 })") == {"ok": 1}
        modes = {w.prelude for w in box.pool_stats().workers}
    assert modes == {engine.prelude_mode()}


def test_isobox_bytecode_0_makes_workers_parse_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOBOX_BYTECODE", "0")  # read by the fork server this box starts
    with IsoBox(pool={"min": 1, "max": 1}) as box:
        assert box.run("[1, 2].map((x) => x * 2)") == [2, 4]
        with pytest.raises(ScriptError, match="Error: boom"):
            box.run("throw new Error('boom')")
        modes = {w.prelude for w in box.pool_stats().workers}
    assert modes == {"source"}
