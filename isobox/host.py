"""Host functions: Python callables that sandboxed JS may call (``functions={"name": fn}``).

The call always runs in the caller's process (or the daemon's), never in the worker. Arguments
and results cross by the value table as JSON text. A callable that raises becomes a JS
``Error`` the script may catch; its message is sanitized first (:func:`sanitize`): host paths
and the values of the host's environment variables never reach the sandbox.

Reply format (what the JS side decodes): ``j`` + JSON, ``t`` + tagged JSON, ``e`` + JSON
``{"message"}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from isobox import values
from isobox.errors import SerializationError

__all__ = ["HostFunctions", "RelayedError", "sanitize"]

log = logging.getLogger("isobox")

_NAME = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
# Absolute or relative paths of two components or more, and absolute ones of one component
# ("/etc", "C:\\x") where a path can start (not "1/2" or "a/b" inside a word).
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.@+-]+){2,}[/\\]?"
                   r"|(?:(?<=[\s'\"=(:,\[])|^)(?:[A-Za-z]:)?[/\\][\w.@+-]+[/\\]?")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")  # "<object at 0x7f...>": host memory layout
_MAX_MESSAGE = 500
_MAX_RESULT = 32 * 2**20  # characters: a result must fit the channel's 96 MiB frame
# JS globals a host function may not shadow: the language's own (some cannot be redefined at
# all, and the sandbox's trusted libraries look some up by name) and IsoBox's.
_RESERVED = frozenset({
    "AggregateError", "Array", "ArrayBuffer", "Atomics", "BigInt", "BigInt64Array",
    "BigUint64Array", "Boolean", "DataView", "Date", "Error", "EvalError",
    "FinalizationRegistry", "Float16Array", "Float32Array", "Float64Array", "Function",
    "Infinity", "Int16Array", "Int32Array", "Int8Array", "InternalError", "Intl", "Iterator",
    "JSON", "Map", "Math", "NaN", "Number", "Object", "Promise", "Proxy", "RangeError",
    "ReferenceError", "Reflect", "RegExp", "Set", "SharedArrayBuffer", "String", "Symbol",
    "SyntaxError", "TypeError", "URIError", "Uint16Array", "Uint32Array", "Uint8Array",
    "Uint8ClampedArray", "WeakMap", "WeakRef", "WeakSet", "decodeURI", "decodeURIComponent",
    "encodeURI", "encodeURIComponent", "escape", "eval", "globalThis", "isFinite", "isNaN",
    "parseFloat", "parseInt", "performance", "undefined", "unescape", "console", "setTimeout",
    "setInterval", "clearTimeout", "clearInterval", "queueMicrotask", "process", "require",
    "module", "exports", "Buffer",
})


def sanitize(message: str) -> str:
    """A host exception's message as the sandbox may see it: no paths, no environment values,
    bounded in length."""
    # Paths first, so a path that contains an environment value goes whole; then values,
    # longest first, so a value that contains another goes whole too.
    message = _PATH.sub("<path>", message)
    for value in sorted(set(os.environ.values()), key=len, reverse=True):
        if len(value) >= 8 and value in message:
            message = message.replace(value, "<redacted>")
    message = _ADDRESS.sub("0x…", message)
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "..."


def _error(message: str, name: str = "Error") -> str:
    return "e" + json.dumps({"message": message, "name": name}, ensure_ascii=True)


class HostFunctions:
    """A validated name → callable table and the code that calls into it."""

    def __init__(self, functions: Mapping[str, Callable[..., Any]]) -> None:
        if not isinstance(functions, Mapping):
            raise TypeError("functions must be a dict of name -> callable")
        table: dict[str, tuple[Callable[..., Any], bool]] = {}
        for name, fn in functions.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"host function name {name!r} is not a JS identifier")
            if name in _RESERVED:
                raise ValueError(f"host function name {name!r} would shadow a JavaScript or "
                                 "IsoBox global")
            if not callable(fn):
                raise TypeError(f"host function {name!r} is not callable")
            table[name] = (fn, inspect.iscoroutinefunction(fn))
        self._table = table
        self._runners = _Runners()

    def __bool__(self) -> bool:
        return bool(self._table)

    def merged(self, more: Mapping[str, Callable[..., Any]] | None) -> HostFunctions:
        """A table with ``more`` added (per-session or per-run functions)."""
        if not more:
            return self
        combined = {name: fn for name, (fn, _) in self._table.items()}
        combined.update(more)
        table = HostFunctions(combined)
        table._runners = self._runners  # one helper pool and loop per box, not per run
        return table

    def spec(self) -> list[list[Any]]:
        """What the worker binds: ``[[name, is_async], ...]``."""
        return [[name, is_async] for name, (_, is_async) in sorted(self._table.items())]

    # -- calling ---------------------------------------------------------------------------
    def _prepare(self, name: str, args: str) -> tuple[Callable[..., Any], list[Any]] | str:
        entry = self._table.get(name)
        if entry is None:
            return _error(f"host function {name} is not available")
        try:
            decoded = values.decode(args, what="arguments")
        except SerializationError as exc:  # an Invalid Date, nesting past Python's limit
            return _error(f"host function {name}: its arguments cannot be passed to the host "
                          f"({exc})", "TypeError")
        except (ValueError, TypeError):
            return _error(f"host function {name}: its arguments could not be decoded",
                          "TypeError")
        return entry[0], decoded if isinstance(decoded, list) else [decoded]

    @staticmethod
    def _encode(name: str, result: Any) -> str:
        try:
            text, tagged = values.encode(result, what="result", limit=_MAX_RESULT)
        except (SerializationError, TypeError, ValueError) as exc:
            return _error(f"host function {name} returned a value that cannot cross into the "
                          f"sandbox ({type(result).__name__}): {sanitize(str(exc))}")
        return ("t" if tagged else "j") + text

    @staticmethod
    def _failed(name: str, exc: BaseException) -> str:
        if isinstance(exc, RelayedError):
            return exc.reply  # already formatted (and sanitized) by the host that ran it
        log.debug("isobox host function %s raised", name, exc_info=exc)
        try:
            text = sanitize(str(exc))
        except Exception:  # an exception whose __str__ raises still becomes a JS Error
            text = "(its message could not be read)"
        return _error(f"host function {name} failed: {type(exc).__name__}: {text}")

    def call_until(self, name: str, args: str, deadline: float) -> str:
        """:meth:`call` on a helper thread, given up at ``deadline`` (``time.monotonic``):
        raises :class:`builtins.TimeoutError` then, so the watchdog is never held up by a host
        function that blocks. (The function itself cannot be stopped; it finishes on its own.)"""
        future = self._runners.threads().submit(self.call, name, args)
        return future.result(timeout=max(0.0, deadline - time.monotonic()))

    def call(self, name: str, args: str) -> str:
        """Call from a thread (sync box or in-process mode); ``async def`` functions run to
        completion on a private event loop."""
        prepared = self._prepare(name, args)
        if isinstance(prepared, str):
            return prepared
        fn, decoded = prepared
        try:
            result = fn(*decoded)
            if inspect.isawaitable(result):
                result = asyncio.run_coroutine_threadsafe(_await(result),
                                                          self._runners.loop()).result()
        except Exception as exc:
            return self._failed(name, exc)
        return self._encode(name, result)

    async def acall(self, name: str, args: str) -> str:
        """Call from an event loop (async box): coroutines are awaited here, plain functions
        run in a thread so they cannot stall the loop."""
        prepared = self._prepare(name, args)
        if isinstance(prepared, str):
            return prepared
        fn, decoded = prepared
        try:
            if self._table[name][1]:
                result = await fn(*decoded)
            else:
                result = await asyncio.to_thread(fn, *decoded)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            return self._failed(name, exc)
        return self._encode(name, result)


class RelayedError(Exception):
    """A host function that ran in another process (remote mode: in the client) failed; its
    reply (``e`` + JSON, already sanitized there) reaches the sandbox unchanged."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class _Runners:
    """Where host calls run when they must not block the run's own thread: a thread pool
    (sync box: the watchdog keeps its deadline) and a private event loop (``async def``
    functions called from a thread). Made on first use, shared by a box's tables."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def threads(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(
                    max_workers=32, thread_name_prefix="isobox-host")
            return self._threads

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="isobox-host-loop",
                                 daemon=True).start()
                self._loop = loop
            return self._loop


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
