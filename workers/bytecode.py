"""The trusted JS, compiled once to QuickJS bytecode and read into each fresh context.

Parsing the prelude costs about 0.35 ms in every context, and each library 0.2-0.8 ms when a
run first needs it; reading the same code as bytecode costs a tenth of that. The binding
(quickjs-ng 0.17) only evaluates source, so this module calls the QuickJS functions its
extension module exports (``JS_Eval`` with ``COMPILE_ONLY``, ``JS_WriteObject``,
``JS_ReadObject``, ``JS_EvalFunction``) through ctypes, on the ``JSContext`` pointer stored in
the binding's ``Context`` object.

That layout belongs to one version of the binding, so it is checked before first use: the
version, the object's size, the runtime pointer beside the context pointer, and a round trip.
If any check fails, or ``ISOBOX_BYTECODE=0`` is set, :data:`LOADER` is ``None`` and the engine
parses source as before. ``JS_ReadObject`` trusts its input: only IsoBox's own sources, compiled
in this process, are ever read, and only into a context no user code has run in yet.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from importlib import metadata

import _quickjs

log = logging.getLogger("isobox")

__all__ = ["LOADER", "Loader", "disabled_reason"]

_EVAL_COMPILE_ONLY = 1 << 5  # JS_EVAL_TYPE_GLOBAL | JS_EVAL_FLAG_COMPILE_ONLY
_OBJ_BYTECODE = 1 << 0  # JS_WRITE_OBJ_BYTECODE / JS_READ_OBJ_BYTECODE
_TAG_EXCEPTION = 6
_LAYOUT_VERSION = "0.17."  # the binding version whose Context struct this module reads
_CONTEXT_FIELDS = 64  # its fields after PyObject_HEAD on 64-bit builds (module.c, RuntimeData)
# How an evaluated value reaches the binding: a global whose getter deletes it on first read.
_STASH = "__isobox_bytecode__"


class _JSValue(ctypes.Structure):
    """QuickJS's ``JSValue`` on 64-bit builds (no NaN boxing): a union and a tag."""

    _fields_ = [("u", ctypes.c_uint64), ("tag", ctypes.c_int64)]


def _bind(path: str) -> ctypes.PyDLL:
    # PyDLL keeps the GIL held: the binding's contexts are only ever used with it held.
    lib = ctypes.PyDLL(path)
    ptr, size = ctypes.c_void_p, ctypes.c_size_t
    for name, res, args in (
        ("JS_Eval", _JSValue, [ptr, ctypes.c_char_p, size, ctypes.c_char_p, ctypes.c_int]),
        ("JS_WriteObject", ptr, [ptr, ctypes.POINTER(size), _JSValue, ctypes.c_int]),
        ("JS_ReadObject", _JSValue, [ptr, ctypes.c_char_p, size, ctypes.c_int]),
        ("JS_EvalFunction", _JSValue, [ptr, _JSValue]),
        ("JS_FreeValue", None, [ptr, _JSValue]),
        ("JS_GetException", _JSValue, [ptr]),
        ("JS_GetRuntime", ptr, [ptr]),
        ("JS_UpdateStackTop", None, [ptr]),
        ("js_free", None, [ptr, ptr]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def wrap(source: str) -> str:
    """The source of a script whose value is ``source``'s (one expression), left in the stash.
    The wrapper goes on the first line only (its columns shift), so line numbers stay."""
    body = source.rstrip().rstrip(";")
    return (f"(function (v) {{ Object.defineProperty(globalThis, '{_STASH}', {{ configurable: "
            f"true, get() {{ delete globalThis['{_STASH}']; return v; }} }}); }})({body}\n)")


class Loader:
    """Compiles trusted sources to bytecode and evaluates it in fresh contexts."""

    def __init__(self, lib: ctypes.PyDLL, offset: int) -> None:
        self._lib = lib
        self._offset = offset  # where the binding's Context keeps its JSRuntime*, JSContext*

    def _pointer(self, ctx: _quickjs.Context) -> int:
        runtime, context = ctypes.cast(id(ctx) + self._offset, ctypes.POINTER(ctypes.c_void_p))[0:2]
        if not runtime or not context or self._lib.JS_GetRuntime(context) != runtime:
            raise RuntimeError("the binding's Context does not hold the expected pointers")
        # The stack limit is measured from the top QuickJS last recorded: this thread's, now
        # (the binding does the same before each of its own calls).
        self._lib.JS_UpdateStackTop(runtime)
        return int(context)

    def _clear(self, context: int) -> None:
        self._lib.JS_FreeValue(context, self._lib.JS_GetException(context))

    def compile(self, source: str) -> bytes:
        """Bytecode of ``source`` (ASCII), which must evaluate to one value (see :func:`wrap`).
        Compiled as the binding compiles (filename ``<input>``): stacks read the same."""
        ctx = _quickjs.Context()
        context = self._pointer(ctx)
        text = wrap(source).encode("ascii")
        fn = self._lib.JS_Eval(context, text, len(text), b"<input>", _EVAL_COMPILE_ONLY)
        if fn.tag == _TAG_EXCEPTION:
            self._clear(context)
            raise RuntimeError("a trusted source did not compile")
        try:
            size = ctypes.c_size_t()
            buf = self._lib.JS_WriteObject(context, ctypes.byref(size), fn, _OBJ_BYTECODE)
            if not buf:
                self._clear(context)
                raise RuntimeError("QuickJS could not write the bytecode")
            try:
                return ctypes.string_at(buf, size.value)
            finally:
                self._lib.js_free(context, buf)
        finally:
            self._lib.JS_FreeValue(context, fn)

    def load(self, ctx: _quickjs.Context, code: bytes) -> _quickjs.Object | None:
        """Evaluate ``code`` in ``ctx`` (which no user code has run in) and return its value,
        or None if QuickJS refused (out of memory, say): the caller then uses the source."""
        context = self._pointer(ctx)
        fn = self._lib.JS_ReadObject(context, code, len(code), _OBJ_BYTECODE)
        if fn.tag == _TAG_EXCEPTION:
            self._clear(context)
            return None
        done = self._lib.JS_EvalFunction(context, fn)  # takes ownership of fn
        if done.tag == _TAG_EXCEPTION:
            self._clear(context)
            return None
        self._lib.JS_FreeValue(context, done)
        value = ctx.get(_STASH)
        return value if isinstance(value, _quickjs.Object) else None


def _open() -> tuple[Loader | None, str]:
    if os.environ.get("ISOBOX_BYTECODE", "1") == "0":
        return None, "ISOBOX_BYTECODE=0"
    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None, "bytecode loading needs 64-bit CPython (id() as an address, no NaN boxing)"
    try:
        version = metadata.version("quickjs-ng")
        files = metadata.files("quickjs-ng") or []
    except metadata.PackageNotFoundError:
        return None, "the quickjs-ng distribution was not found"
    if not version.startswith(_LAYOUT_VERSION):
        return None, f"quickjs-ng {version} is not the {_LAYOUT_VERSION}x layout this reads"
    loaded = os.path.realpath(_quickjs.__file__ or "")
    if not any(os.path.realpath(str(f.locate())) == loaded for f in files):
        return None, "the loaded _quickjs module is not the quickjs-ng distribution's"
    offset = object.__basicsize__  # PyObject_HEAD, then JSRuntime* and JSContext*
    if _quickjs.Context.__basicsize__ != offset + _CONTEXT_FIELDS:
        return None, "the binding's Context is not the size of the layout this reads"
    try:
        loader = Loader(_bind(_quickjs.__file__), offset)
        probe = loader.load(_quickjs.Context(), loader.compile("[40 + 2, 'ok']"))
        if probe is None or probe.json() != '[42,"ok"]':
            return None, "the bytecode round trip gave a wrong answer"
    except (OSError, AttributeError, RuntimeError) as exc:
        return None, f"bytecode loading is unavailable ({exc})"
    return loader, ""


LOADER, _REASON = _open()
if LOADER is None:
    log.info("isobox: trusted JS is parsed in every context: %s", _REASON)


def disabled_reason() -> str:
    """Why :data:`LOADER` is None ('' when bytecode is in use)."""
    return _REASON
