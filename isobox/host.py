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
import inspect
import json
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from isobox import values
from isobox.errors import SerializationError

__all__ = ["HostFunctions", "sanitize"]

log = logging.getLogger("isobox")

_NAME = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.@+-]+){2,}[/\\]?")
_MAX_MESSAGE = 500
_RESERVED = frozenset({"console", "setTimeout", "setInterval", "clearTimeout", "clearInterval",
                       "queueMicrotask", "globalThis", "eval", "process"})


def sanitize(message: str) -> str:
    """A host exception's message as the sandbox may see it: no paths, no environment values,
    bounded in length."""
    for value in os.environ.values():
        if len(value) >= 8 and value in message:
            message = message.replace(value, "<redacted>")
    message = _PATH.sub("<path>", message)
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "..."


def _error(message: str) -> str:
    return "e" + json.dumps({"message": message}, ensure_ascii=True)


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
                raise ValueError(f"host function name {name!r} is reserved")
            if not callable(fn):
                raise TypeError(f"host function {name!r} is not callable")
            table[name] = (fn, inspect.iscoroutinefunction(fn))
        self._table = table
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._table)

    def merged(self, more: Mapping[str, Callable[..., Any]] | None) -> HostFunctions:
        """A table with ``more`` added (per-session or per-run functions)."""
        if not more:
            return self
        combined = {name: fn for name, (fn, _) in self._table.items()}
        combined.update(more)
        return HostFunctions(combined)

    def spec(self) -> list[list[Any]]:
        """What the worker binds: ``[[name, is_async], ...]``."""
        return [[name, is_async] for name, (_, is_async) in sorted(self._table.items())]

    # -- calling ---------------------------------------------------------------------------
    def _prepare(self, name: str, args: str) -> tuple[Callable[..., Any], list[Any]] | str:
        entry = self._table.get(name)
        if entry is None:
            return _error(f"host function {name} is not available")
        try:
            decoded = values.decode(args)
        except (ValueError, TypeError):
            return _error(f"host function {name}: its arguments could not be decoded")
        return entry[0], decoded if isinstance(decoded, list) else [decoded]

    @staticmethod
    def _encode(name: str, result: Any) -> str:
        try:
            text, tagged = values.encode(result, what="result")
        except (SerializationError, TypeError, ValueError) as exc:
            return _error(f"host function {name} returned a value that cannot cross into the "
                          f"sandbox ({type(result).__name__}): {sanitize(str(exc))}")
        return ("t" if tagged else "j") + text

    @staticmethod
    def _failed(name: str, exc: BaseException) -> str:
        log.debug("isobox host function %s raised", name, exc_info=exc)
        return _error(f"host function {name} failed: {type(exc).__name__}: {sanitize(str(exc))}")

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
                result = asyncio.run_coroutine_threadsafe(_await(result), self._private_loop()
                                                          ).result()
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

    def _private_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="isobox-host", daemon=True).start()
                self._loop = loop
            return self._loop


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
