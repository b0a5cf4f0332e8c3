"""run_project, the CommonJS module system and the require policy, with real workers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import isobox
import isobox.projects
from isobox import AsyncIsoBox, IsoBox

SEED = [{"path": "/index.js", "code": 'require("./utils").add(1, 2)'},
        {"path": "/utils.js", "code": "module.exports = { add: (a, b) => a + b }"}]


@pytest.fixture(scope="module", params=["process", "inprocess"])
def box(request: pytest.FixtureRequest) -> Iterator[IsoBox]:
    with IsoBox(mode=request.param, timeout=5.0, pool={"min": 1, "max": 1}) as b:
        yield b


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host node_modules with a package (main in a subfolder, a nested relative require),
    a scoped package, a package off the whitelist, and a link pointing out of the folder."""
    root = tmp_path_factory.mktemp("host") / "node_modules"
    (root / "leftpad" / "lib").mkdir(parents=True)
    (root / "leftpad" / "package.json").write_text('{"main": "lib/index.js"}')
    (root / "leftpad" / "lib" / "index.js").write_text(
        "const h = require('./helper'); module.exports = (s, n) => h.pad(s, n)")
    (root / "leftpad" / "lib" / "helper.js").write_text(
        "exports.pad = (s, n) => '.'.repeat(Math.max(0, n - s.length)) + s")
    (root / "@acme" / "util").mkdir(parents=True)
    (root / "@acme" / "util" / "index.js").write_text("module.exports = 'acme'")
    (root / "secret").mkdir()
    (root / "secret" / "index.js").write_text("module.exports = 'secret'")
    outside = root.parent / "outside.js"
    outside.write_text("module.exports = 'outside'")
    (root / "leftpad" / "lib" / "escape.js").symlink_to(outside)
    return root


def test_seed_example(box: IsoBox) -> None:
    """The contract's seed: require("./utils").add(1, 2) gives 3."""
    assert box.run_project(files=SEED, entrypoint="/index.js") == 3


def test_files_as_a_mapping_and_relative_paths(box: IsoBox) -> None:
    """Files may be a {path: code} mapping; paths are made absolute and normalized."""
    files = {"src/main.js": "require('../lib/x.js').v + require('/lib/x').v",
             "lib/x.js": "exports.v = 2"}
    assert box.run_project(files, "src/main.js") == 4


def test_resolution_rules(box: IsoBox) -> None:
    """Extensions, index files, package.json main and .json modules resolve as in Node."""
    files = {"/main.js": "[require('./a'), require('./dir'), require('./pkg'), require('./d.json').n,"
                         " require('./c.cjs')]",
             "/a.js": "module.exports = 'a'", "/dir/index.js": "module.exports = 'dir'",
             "/pkg/package.json": '{"main": "src/m.js"}', "/pkg/src/m.js": "module.exports = 'pkg'",
             "/d.json": '{"n": 5}', "/c.cjs": "module.exports = 'cjs'"}
    assert box.run_project(files, "/main.js") == ["a", "dir", "pkg", 5, "cjs"]


def test_module_names(box: IsoBox) -> None:
    """module, exports, __filename and __dirname are the virtual ones."""
    files = {"/main.js": "const m = require('./sub/m'); [m.f, m.d, m.same, __filename]",
             "/sub/m.js": "exports.f = __filename; exports.d = __dirname;"
                          " exports.same = module.exports === exports"}
    assert box.run_project(files, "/main.js") == ["/sub/m.js", "/sub", True, "/main.js"]


def test_entry_exports_when_it_has_no_completion_value(box: IsoBox) -> None:
    """An entrypoint whose completion value is undefined gives what it exported."""
    assert box.run_project({"/i.js": "module.exports = {answer: 42}"}, "/i.js") == {"answer": 42}
    assert box.run_project({"/i.js": "exports.a = 1; void 0"}, "/i.js") == {"a": 1}
    # A completion value wins, as for any script: an assignment's value is its completion.
    assert box.run_project({"/i.js": "exports.a = 1;"}, "/i.js") == 1


def test_module_cache_per_run(box: IsoBox) -> None:
    """A module runs once per run however often it is required; each run starts fresh."""
    files = {"/i.js": "require('./c'); require('./c'); require('./c').n",
             "/c.js": "globalThis.count = (globalThis.count || 0) + 1; exports.n = count"}
    assert box.run_project(files, "/i.js") == 1
    assert box.run_project(files, "/i.js") == 1


def test_circular_requires_see_partial_exports(box: IsoBox) -> None:
    """Node's semantics: a cycle sees the exports made so far."""
    files = {"/a.js": "exports.a1 = 1; const b = require('./b'); exports.a2 = 2; b.seen",
             "/b.js": "exports.seen = Object.keys(require('./a'));"}
    assert box.run_project(files, "/a.js") == ["a1"]


def test_missing_module_names_it(box: IsoBox) -> None:
    """A missing module is a ScriptError naming it and where it was required from."""
    with pytest.raises(isobox.ScriptError, match=r"Cannot find module './nope' from '/lib'"):
        box.run_project({"/i.js": "require('./lib/x')", "/lib/x.js": "require('./nope')"}, "/i.js")


def test_failing_module_in_a_cycle_repeats_its_error(box: IsoBox) -> None:
    """A module that throws is not cached: requiring it again throws again."""
    files = {"/i.js": "let n = 0; for (let i = 0; i < 2; i++) { try { require('./bad') } "
                      "catch (e) { n++ } } n",
             "/bad.js": "require('./i'); throw new Error('bad module')"}
    assert box.run_project(files, "/i.js") == 2


def test_stack_names_the_module(box: IsoBox) -> None:
    """A module's top-level frame names its path; the loader's own frames are not shown."""
    files = {"/i.js": "require('./bad')", "/bad.js": "\nthrow new Error('boom')"}
    with pytest.raises(isobox.ScriptError) as info:
        box.run_project(files, "/i.js")
    assert "at /bad.js (<input>:2:" in info.value.stack
    assert "isoboxMod" not in info.value.stack


@pytest.mark.parametrize("path", ["../../etc/passwd", "/../../etc/passwd", "//etc//passwd",
                                  "./a/../../../etc/passwd", "%2e%2e/etc/passwd"])
def test_paths_are_clamped_to_the_virtual_root(box: IsoBox, path: str) -> None:
    """Traversal in a project path or a require stays inside the virtual root."""
    files = {"/i.js": f"try {{ require({path!r}) }} catch (e) {{ e.code || e.name }}"}
    assert box.run_project(files, "/i.js") in ("MODULE_NOT_FOUND", "SecurityError")
    assert isobox.projects.virtual_path(path).startswith("/")
    assert ".." not in isobox.projects.virtual_path(path)


def test_builtins_are_denied_with_an_event(box: IsoBox) -> None:
    """Node built-ins are denied: a catchable SecurityError, a security:violation event, and
    an isobox.SecurityError when uncaught."""
    events: list[dict[str, Any]] = []
    box.on("security:violation", events.append)
    try:
        code = "try { require('child_process') } catch (e) { [e.name, e.message] }"
        name, message = box.run_project({"/i.js": code}, "/i.js")
        assert name == "SecurityError" and "child_process" in message
        with pytest.raises(isobox.SecurityError, match="'node:fs' is not allowed"):
            box.run_project({"/i.js": "require('node:fs')"}, "/i.js")
    finally:
        box.off("security:violation", events.append)
    assert [e["type"] for e in events] == ["unauthorized_require"] * 2
    assert events[0]["details"] == {"module": "child_process"}


def test_path_is_a_pure_builtin(box: IsoBox) -> None:
    """The path module is provided (POSIX, pure)."""
    code = ("const p = require('path'); [p.join('/a/b', '../c'), p.basename('/x/y.js', '.js'),"
            " p.extname('f.txt'), p.dirname('/a/b/c'), p.resolve('a', '/b', 'c'),"
            " p.relative('/a/b', '/a/c/d'), p.normalize('a//b/../c')]")
    assert box.run_project({"/i.js": code}, "/i.js") == [
        "/a/c", "y", ".txt", "/a/b", "/b/c", "../c/d", "a/c"]


def test_whitelist_modules_and_mocks(box: IsoBox) -> None:
    """Host-provided modules need the whitelist (exact or @scope/*); mocks are always allowed;
    a str mock is source, anything else is module.exports."""
    require = {"whitelist": ["lodash", "@acme/*"],
               "modules": {"lodash": "module.exports = {x: 1}", "@acme/util": "exports.y = 2",
                           "hidden": "module.exports = 'no'"},
               "mocks": {"fs": {"readFileSync": "mocked"}, "cfg": "module.exports = {z: 3}"}}
    code = ("[require('lodash').x, require('@acme/util').y, require('fs').readFileSync,"
            " require('cfg').z]")
    assert box.run_project({"/i.js": code}, "/i.js", require=require) == [1, 2, "mocked", 3]
    with pytest.raises(isobox.SecurityError, match="not on the whitelist"):
        box.run_project({"/i.js": "require('hidden')"}, "/i.js", require=require)


def test_node_modules_packages(box: IsoBox, node_modules: Path) -> None:
    """Whitelisted packages come from the host node_modules (read by the supervisor), with
    package.json main and their own relative requires; others are denied."""
    require = {"whitelist": ["leftpad", "@acme/*"], "node_modules": str(node_modules)}
    code = "[require('leftpad')('x', 3), require('@acme/util')]"
    assert box.run_project({"/i.js": code}, "/i.js", require=require) == ["..x", "acme"]
    assert box.run("require('leftpad')('ab', 4)", require=require) == "..ab"
    with pytest.raises(isobox.SecurityError):
        box.run("require('secret')", require=require)


def test_node_modules_links_out_of_the_folder_are_not_read(box: IsoBox,
                                                           node_modules: Path) -> None:
    """A link inside a package that points out of node_modules is not read."""
    require = {"whitelist": ["leftpad"], "node_modules": str(node_modules)}
    with pytest.raises(isobox.ScriptError, match="Cannot find module"):
        box.run("require('leftpad/lib/escape')", require=require)


def test_bad_projects_are_refused_before_running(box: IsoBox) -> None:
    """Bad files, entrypoints and require options raise at once, naming the problem."""
    with pytest.raises(ValueError, match="entrypoint"):
        box.run_project(SEED, "/missing.js")
    with pytest.raises(TypeError):
        box.run_project([{"path": "/a.js"}], "/a.js")
    with pytest.raises(ValueError, match="twice"):
        box.run_project({"/a.js": "1", "a.js": "2"}, "/a.js")
    with pytest.raises(ValueError, match="unknown require"):
        box.run_project(SEED, "/index.js", require={"allow": []})
    with pytest.raises(ValueError, match="not a directory"):
        box.run("1", require={"node_modules": "/no/such/dir"})


def test_require_is_absent_without_the_option(box: IsoBox) -> None:
    """A plain run has no require (safe globals)."""
    assert box.run("typeof require") == "undefined"


def test_async_twin() -> None:
    """AsyncIsoBox.run_project gives the same result."""
    async def main() -> Any:
        async with AsyncIsoBox(timeout=5.0) as ab:
            return await ab.run_project(files=SEED, entrypoint="/index.js")

    assert asyncio.run(main()) == 3


def test_a_broken_module_fails_only_where_it_is_required(box: IsoBox) -> None:
    """Modules are compiled together; a syntax error in one does not break the others, and
    requiring the broken one raises its own SyntaxError."""
    files = {"/i.js": "const ok = require('./ok').v; let err;"
                      " try { require('./broken') } catch (e) { err = e.name } [ok, err]",
             "/ok.js": "exports.v = 1", "/broken.js": "exports.v = ;"}
    assert box.run_project(files, "/i.js") == [1, "SyntaxError"]


def test_projects_in_a_session(box: IsoBox) -> None:
    """A session runs projects in its live context: what the entrypoint declares persists."""
    with box.create_session("project-session") as s:
        main = {"path": "/main.js", "code": "let total = require('./utils').add(2, 2); total"}
        assert s.run_project([*SEED, main], "/main.js") == 4
        assert s.run("total + 1") == 5


def test_projects_in_an_async_session() -> None:
    """AsyncSession.run_project gives the same result."""
    async def main() -> Any:
        async with AsyncIsoBox(timeout=5.0) as ab:
            session = await ab.create_session("async-project")
            return await session.run_project(files=SEED, entrypoint="/index.js")

    assert asyncio.run(main()) == 3
