"""TypeScript: the official compiler (the copy the ``dukpy`` package ships) in its own QuickJS
context, used to transpile untrusted source inside the sandboxed worker.

The compiler context is made once per process: in the fork server with
``typescript="preload"`` (workers then share it copy-on-write), or by a worker on its first
TypeScript run. It only ever parses and prints source (``ts.transpileModule``); user code never
runs in it. Each transpile has a CPU and memory budget; a compiler context that hit one is
dropped, so the next transpile makes a fresh one. Results are cached per process by content
hash (bounded), so a repeated file does not pay again.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from typing import Any

import _quickjs

__all__ = ["TranspileError", "Transpiled", "loaded", "preload", "transpile"]

_MEMORY = 512 * 2**20  # the compiler alone takes about 64 MB
_STACK = 4 * 2**20
_CACHE_SIZE = 512
# The source arrives as JSON text: the binding truncates strings with NUL or lone surrogates.
_DRIVER = r"""(function (srcJson, name) {
  const src = JSON.parse(srcJson);
  const out = ts.transpileModule(src, { fileName: name, reportDiagnostics: true,
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.CommonJS,
      jsx: ts.JsxEmit.React, experimentalDecorators: true, useDefineForClassFields: false,
      esModuleInterop: true, removeComments: false } });
  const diags = (out.diagnostics || []).map((d) => ({ start: d.start === undefined ? -1 : d.start,
    code: d.code, message: ts.flattenDiagnosticMessageText(d.messageText, '\n') }));
  return JSON.stringify({ code: out.outputText, diagnostics: diags });
})"""

_compiler: tuple[Any, Any] | None = None
_cache: OrderedDict[str, Transpiled] = OrderedDict()


@dataclass(frozen=True, slots=True)
class Transpiled:
    """Plain JS (CommonJS when the source has imports or exports)."""

    code: str


class TranspileError(Exception):
    """A syntax error in TypeScript source: ``message``, 1-based ``line`` and ``column``."""

    def __init__(self, message: str, line: int | None, column: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


def loaded() -> bool:
    """Whether this process holds a compiler context."""
    return _compiler is not None


_source: str | None = None


def read_source() -> str:
    """The compiler's JS source (9 MB), read once: the fork server reads it before forking,
    so a confined worker, which may not open files, can still load the compiler."""
    global _source  # noqa: PLW0603 - read once per process, by design
    if _source is None:
        _source = resources.files("dukpy").joinpath("jsmodules/typescriptServices.js"
                                                    ).read_text(encoding="utf-8")
    return _source


def preload() -> None:
    """Make the compiler context now (about 0.6 s and 64 MB here)."""
    global _compiler  # noqa: PLW0603 - one compiler per process, by design
    if _compiler is not None:
        return
    source = read_source()
    ctx = _quickjs.Context()
    ctx.set_memory_limit(_MEMORY)
    ctx.set_max_stack_size(_STACK)
    ctx.set("__tsSource", source)
    ctx.eval("(0, eval)(__tsSource); delete globalThis.__tsSource;")
    _compiler = (ctx, ctx.eval(_DRIVER))


def _compiler_name(filename: str) -> str:
    """The name the compiler sees: it keeps ES module output for .mjs/.mts whatever the
    module setting, so those pass as .js/.ts (the name only picks JS, TS or TSX parsing)."""
    for ext, plain in ((".mts", ".ts"), (".cts", ".ts"), (".mjs", ".js"), (".cjs", ".js")):
        if filename.endswith(ext):
            return filename[: -len(ext)] + plain
    return filename


def _line_column(source: str, offset: int) -> tuple[int | None, int | None]:
    if offset < 0:
        return None, None
    before = source[:offset]
    line = before.count("\n") + 1
    return line, offset - (before.rfind("\n") + 1) + 1


def transpile(source: str, filename: str, *, cpu: float) -> Transpiled:
    """TypeScript (or ES-module JS) to plain JS, CommonJS for modules; raises
    :class:`TranspileError` for syntax errors and ``_quickjs.JSException`` when the compiler
    ran out of its budget."""
    global _compiler  # noqa: PLW0603
    key = hashlib.sha256(f"{filename}\0{source}".encode("utf-8", "surrogatepass")).hexdigest()
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    preload()
    if _compiler is None:
        raise RuntimeError("the TypeScript compiler did not load")
    ctx, driver = _compiler
    ctx.set_time_limit(max(cpu, 0.001))
    ctx.set_max_stack_size(_STACK)
    try:
        text = driver(json.dumps(source), _compiler_name(filename))
    except _quickjs.JSException:
        _compiler = None  # out of budget or memory: never reuse a compiler that failed
        raise
    finally:
        if _compiler is not None:
            ctx.set_time_limit(-1)
    result = json.loads(text)
    diagnostics = result.get("diagnostics") or []
    if diagnostics:
        first = diagnostics[0]
        line, column = _line_column(source, int(first.get("start", -1)))
        raise TranspileError(f"TS{first.get('code')}: {first.get('message')}", line, column)
    out = Transpiled(str(result["code"]))
    _cache[key] = out
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return out
