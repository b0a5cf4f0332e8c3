"""TypeScript: transpiled by the official compiler inside the sandbox, cached, with positions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

import isobox
from isobox import AsyncIsoBox, IsoBox

FEATURES = """
interface Point { x: number; y: number }
enum Color { Red, Green = 5, Blue }
namespace Geo { export const origin: Point = { x: 0, y: 0 } }
function first<T>(items: T[]): T { return items[0] }
function tag(value: unknown, context: unknown) { return value }
class Box<T> {
  constructor(public value: T, private readonly label: string = 'box') {}
  @tag method(): string { return this.label + ':' + String(this.value) }
}
const p: Point = { x: 1, y: 2 };
[p.x + p.y, Color.Blue, Geo.origin.x, first<string>(['a', 'b']), new Box<number>(7).method()]
"""


@pytest.fixture(scope="module", params=["process", "inprocess"])
def box(request: pytest.FixtureRequest) -> Iterator[IsoBox]:
    with IsoBox(mode=request.param, timeout=10.0, pool={"min": 1, "max": 1}) as b:
        yield b


def test_language_features(box: IsoBox) -> None:
    """Annotations, interfaces, enums, generics, parameter properties, decorators and
    namespaces compile and run."""
    assert box.run(FEATURES, language="typescript") == [3, 6, 0, "a", "box:7"]


def test_filename_selects_typescript(box: IsoBox) -> None:
    """A .ts or .tsx filename selects TypeScript without language=."""
    assert box.run("const n: number = 41; n + 1", filename="calc.ts") == 42
    code = ("const React = { createElement: (t: string, p: object, ...c: string[]) => [t, p, c] };"
            "\nconst el = <div id='a'>x</div>; el")
    assert box.run(code, filename="view.tsx") == ["div", {"id": "a"}, ["x"]]


def test_top_level_await_keeps_the_value(box: IsoBox) -> None:
    """Top-level await in TypeScript keeps the completion value."""
    code = "const f = async (n: number): Promise<number> => n * 2; await f(21)"
    assert box.run(code, language="typescript") == 42


def test_syntax_error_has_the_position_in_the_source(box: IsoBox) -> None:
    """A TypeScript syntax error is a CompileError at its line and column in the user's
    source."""
    with pytest.raises(isobox.CompileError) as info:
        box.run("const a = 1;\nlet x: = 5;\n", language="typescript")
    assert (info.value.line, info.value.column) == (2, 8)
    assert "TS1110" in info.value.message


def test_validate_code_understands_typescript(box: IsoBox) -> None:
    """validate_code parses TypeScript without running it."""
    assert box.validate_code("let n: number = 1", language="typescript").valid
    result = box.validate_code("let n: = 1", language="typescript")
    assert not result.valid and result.error.line == 1


def test_repeat_is_served_from_the_cache(box: IsoBox) -> None:
    """A repeated snippet runs its cached JS: the second run carries no TypeScript at all."""
    code = "const unique: string = 'cache-probe-1'; unique"
    assert box.run(code, language="typescript") == "cache-probe-1"
    request, _host = box._prepare(code, {"language": "typescript"})
    assert "typescript" not in request.body
    assert "string" not in request.body["code"]


def test_typescript_project_with_es_modules(box: IsoBox) -> None:
    """A project of .ts files with import/export runs; the result is the default export."""
    files = {"/main.ts": "import { add } from './math';\nimport cfg from './cfg.json';\n"
                         "export default add(cfg.base, 2) as number;",
             "/math.ts": "export function add(a: number, b: number): number { return a + b }",
             "/cfg.json": '{"base": 40}'}
    assert box.run_project(files, "/main.ts") == 42


def test_es_modules_in_javascript_projects(box: IsoBox) -> None:
    """ES import/export in .js and .mjs files works through the compiler's CommonJS output."""
    files = {"/main.js": "import def, { x } from './m.mjs'; export default def + x",
             "/m.mjs": "export const x = 1; export default 41"}
    assert box.run_project(files, "/main.js") == 42


def test_syntax_error_in_a_project_names_the_file(box: IsoBox) -> None:
    """A syntax error in one of a project's files names that file and its position."""
    with pytest.raises(isobox.CompileError, match=r"in /lib/b\.ts") as info:
        box.run_project({"/main.ts": "import './lib/b'", "/lib/b.ts": "\nlet = ;"}, "/main.ts")
    assert info.value.line == 2


def test_stream_and_session_in_typescript(box: IsoBox) -> None:
    """TypeScript works for streams and sessions too."""
    code = "for (let i: number = 0; i < 3; i++) yield i * 2"
    assert list(box.run_stream(code, language="typescript")) == [0, 2, 4]
    with box.create_session("ts-session") as s:
        s.run("let total: number = 1", language="typescript")
        assert s.run("total += 1; total", language="typescript") == 2


def _fork_server_rss(box: IsoBox) -> int:
    pool = box._pool
    assert pool is not None and pool._zygote.pid is not None
    return int(psutil.Process(pool._zygote.pid).memory_info().rss)


def test_preload_loads_the_compiler_in_the_fork_server() -> None:
    """The default (preload) holds the compiler in the fork server, which lazy does not; both
    run TypeScript."""
    sizes = {}
    for mode in ("preload", "lazy"):
        with IsoBox(typescript=mode, pool={"min": 1, "max": 1}, timeout=10.0) as b:
            b.warmup_pool()
            sizes[mode] = _fork_server_rss(b)
            assert b.run("const s: string = 'ts'; s", language="typescript") == "ts"
    assert sizes["preload"] - sizes["lazy"] > 30 * 2**20
    with pytest.raises(ValueError, match="typescript"):
        IsoBox(mode="inprocess", typescript="eager")


def test_async_twin() -> None:
    """AsyncIsoBox runs TypeScript the same way."""
    async def main() -> Any:
        async with AsyncIsoBox(timeout=10.0) as ab:
            return await ab.run("const n: number = 5; n * 2", language="typescript")

    assert asyncio.run(main()) == 10
