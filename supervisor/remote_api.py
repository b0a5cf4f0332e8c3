"""Streams and sessions for remote clients: the daemon runs them with an :class:`AsyncIsoBox`
that shares its pool, so they behave exactly as in embedded mode.

::

    client ──API {"op": "stream" | "session.*", "options", ...}──▶ daemon
           ◀── OUTPUT / CALL (host functions, back in the client) ── REPLY ──▶
           ◀── ITEMS {"items", "n"} within the client's CREDIT (streams)
           ◀── RESULT {"result"} | ERROR {"error"}

Sessions live in the daemon: a client that reconnects finds them again. Their ids are scoped by
the ``scope`` the client sent in HELLO, so one client cannot see another's sessions unless it
knows both the scope and the id. A session's host functions are proxies that call back the
client whose request is running, whichever connection that is now.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from isobox import values
from isobox.errors import DaemonError, SessionError
from isobox.host import RelayedError
from isobox.protocol import MsgType

if TYPE_CHECKING:
    from isobox.api import AsyncIsoBox
    from isobox.sessions import AsyncSession
    from isobox.supervisor.connection import Client

__all__ = ["RemoteAPI"]

# The client and request id of the request running in this task (host calls go back there).
_LINK: contextvars.ContextVar[tuple[Client, int] | None] = contextvars.ContextVar(
    "isobox_remote_link", default=None)
_OPTIONS = frozenset({"sandbox_json", "timeout", "cpu_timeout", "memory_limit", "stack_limit",
                      "console", "max_timers", "max_host_calls", "functions", "require",
                      "filesystem", "filename", "language"})


async def _relay(name: str, args: tuple[Any, ...]) -> Any:
    """Call host function ``name`` in the client of the running request."""
    link = _LINK.get()
    if link is None or link[0].closed:
        raise RelayedError("e" + json.dumps({"message": f"host function {name} is not "
                                             "available: its client is not connected"}))
    client, rid = link
    text, _tagged = values.encode(list(args), what="arguments")
    reply = await client.host_call(rid, name, text)
    if reply[:1] in ("j", "t"):
        return values.decode(reply[1:], what="result")
    raise RelayedError(reply)


def _proxy(name: str, is_async: bool) -> Callable[..., Any]:
    """A stand-in for the client's function: async, or sync returning an awaitable (which the
    box awaits on the loop), so the script sees the same kind of function as in the client."""
    if is_async:
        async def relay_async(*args: Any) -> Any:
            return await _relay(name, args)
        return relay_async

    def relay(*args: Any) -> Coroutine[Any, Any, Any]:
        return _relay(name, args)
    return relay


def decode_options(raw: Any) -> dict[str, Any]:
    """User-level options from the wire: the sandbox decoded, functions made proxies."""
    if not isinstance(raw, dict):
        raise DaemonError("options must be a map")
    unknown = set(raw) - _OPTIONS
    if unknown:
        raise DaemonError(f"unknown option(s) {sorted(unknown)}")
    options = dict(raw)
    sandbox = options.pop("sandbox_json", None)
    if sandbox is not None:
        if not isinstance(sandbox, str):
            raise DaemonError("sandbox_json must be a str")
        options["sandbox"] = values.decode(sandbox, what="sandbox")
    spec = options.pop("functions", None)
    if spec is not None:
        if not isinstance(spec, list) or not all(
                isinstance(f, list) and len(f) == 2 and isinstance(f[0], str)
                and type(f[1]) is bool for f in spec):
            raise DaemonError("functions must be [[name, is_async], ...]")
        options["functions"] = {name: _proxy(name, is_async) for name, is_async in spec}
    if options.get("console") == "inherit":
        options["console"] = "redirect"  # printed by the client, not on the daemon's stderr
    return options


def encode_result(result: Any) -> dict[str, Any]:
    """An ExecutionResult as the client rebuilds it."""
    text, _tagged = values.encode(result.value, what="result", limit=None)
    return {"value": text, "type": result.type, "duration": result.duration,
            "cpu_time": result.cpu_time, "memory": result.memory, "console": result.console,
            "files": result.files, "worker_pid": result.worker_pid}


class RemoteAPI:
    """Streams and sessions of every client, on one AsyncIsoBox over the daemon's pool."""

    def __init__(self, box: AsyncIsoBox, max_client_sessions: int) -> None:
        self.box = box
        self.max_client_sessions = max_client_sessions

    @staticmethod
    def key(scope: str, session_id: Any) -> str:
        if not isinstance(session_id, str) or not session_id or len(session_id) > 256:
            raise SessionError("session id must be a non-empty str of at most 256 characters")
        return f"{scope}\x00{session_id}"

    async def handle(self, client: Client, rid: int, body: dict[str, Any]) -> Any:
        """Run one API request for ``client``; returns the RESULT's ``result``."""
        _LINK.set((client, rid))
        op = body.get("op")
        if op == "stream":
            await self._stream(client, rid, body, None)
            return None
        if not isinstance(op, str) or not op.startswith("session."):
            raise DaemonError(f"unknown remote operation {op!r}")
        key = self.key(client.scope, body.get("id"))
        if op == "session.create":
            return await self._create(client, key, body)
        session = await self._session(key)
        return await self._session_op(client, rid, op[len("session."):], session, body)

    async def _create(self, client: Client, key: str, body: dict[str, Any]) -> Any:
        prefix = client.scope + "\x00"
        owned = sum(1 for k in self.box._sessions if k.startswith(prefix))
        if owned >= self.max_client_sessions:
            raise SessionError(f"this client already has {self.max_client_sessions} open "
                               "sessions (the daemon's --max-client-sessions)")
        ttl = body.get("ttl", 600.0)
        if ttl is not None and type(ttl) not in (int, float):
            raise DaemonError("ttl must be a number or None")
        await self.box.create_session(key, ttl=ttl, **decode_options(body.get("options", {})))
        return True

    async def _session(self, key: str) -> AsyncSession:
        try:
            return await self.box.get_session(key)
        except SessionError:
            shown = key.split("\x00", 1)[1]
            raise SessionError(f"no open session {shown!r} (unknown, closed or expired)") \
                from None

    async def _session_op(self, client: Client, rid: int, op: str, session: AsyncSession,
                          body: dict[str, Any]) -> Any:
        options = decode_options(body.get("options", {}))
        options.update(self._output(client, rid))
        if op == "execute":
            return encode_result(await session.execute(str(body.get("code", "")), **options))
        if op == "project":
            files, entry = body.get("files"), body.get("entry")
            value = await session.run_project(files, str(entry), **options)
            return {"value": values.encode(value, what="result")[0]}
        if op == "stream":
            await self._stream(client, rid, body, session)
            return None
        if op == "get_state":
            return values.encode(await session.get_state(), what="result")[0]
        if op == "set_state":
            await session.set_state(values.decode(str(body.get("state", "{}")), what="state"))
            return True
        if op == "reset":
            await session.reset()
            return True
        if op == "info":
            info = await session.info()
            return {"created_at": info.created_at, "last_used": info.last_used,
                    "execution_count": info.execution_count, "ttl": info.ttl,
                    "worker_pid": info.worker_pid}
        if op == "close":
            await session.close()
            return True
        raise DaemonError(f"unknown session operation {op!r}")

    @staticmethod
    def _output(client: Client, rid: int) -> dict[str, Any]:
        def forward(kind: str, message: str) -> None:
            client.send(MsgType.OUTPUT, rid, {"console": [[kind, message]]})
        return {"on_output": forward}

    async def _stream(self, client: Client, rid: int, body: dict[str, Any],
                      session: AsyncSession | None) -> None:
        """Pump a stream to the client within its credit; the box's own stream keeps the
        worker within the window, so memory stays bounded at both hops."""
        window = body.get("window", 256)
        idle = body.get("idle_timeout")
        if type(window) is not int or window < 1:
            raise DaemonError("window must be an int >= 1")
        options = decode_options(body.get("options", {}))
        options.update(self._output(client, rid))
        code = str(body.get("code", ""))
        if session is not None:
            agen = session.run_stream(code, window=window, idle_timeout=idle, **options)
        else:
            agen = self.box.run_stream(code, window=window, idle_timeout=idle, **options)
        queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(maxsize=window)
        credit = client.credit_for(rid, window)

        async def pump() -> None:
            try:
                async with contextlib.aclosing(agen) as values_:
                    async for value in values_:
                        await queue.put((True, value))
            except Exception as exc:  # the stream's typed error goes to the client in order
                await queue.put((False, exc))
                return
            await queue.put((False, None))

        task = asyncio.get_running_loop().create_task(pump())
        try:
            done = False
            while not done:
                await credit.wait()
                ok, item = await queue.get()
                batch: list[Any] = []
                while ok:
                    batch.append(item)
                    if len(batch) >= credit.left or queue.empty():
                        break
                    ok, item = queue.get_nowait()
                if batch:
                    text, _tagged = values.encode(batch, what="result", limit=None)
                    client.send(MsgType.ITEMS, rid, {"items": text, "n": len(batch)})
                    credit.spend(len(batch))
                    await client.writer.drain()
                if not ok:
                    done = True
                    if isinstance(item, BaseException):
                        raise item
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            client.credits.pop(rid, None)
