"""Remote mode's streams and sessions, client side: the daemon runs them; these classes give
them the same API as embedded mode (:class:`~isobox.Session` / :class:`~isobox.AsyncSession`).

Options travel as user-level options: the sandbox as tagged JSON, host functions by name (the
daemon calls them back here, in the thread that made the request). A session's options are
fixed when it is created (with the box's own defaults under them), as in embedded mode.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from isobox import values
from isobox.host import HostFunctions
from isobox.remote import Cancellable, RemoteClient
from isobox.results import ExecutionResult, SessionInfo
from isobox.sessions import AsyncSession, Session, check_id

if TYPE_CHECKING:
    from isobox.api import AsyncIsoBox, _BoxCore

__all__ = ["AsyncRemoteSession", "RemoteSession", "remote_stream", "wire_options"]

# Box options that travel with a remote stream or session (the rest stay in the client).
# Box-wide settings (env, the max_*_size caps) are the daemon's for streams and sessions.
WIRE = frozenset({"sandbox", "timeout", "cpu_timeout", "memory_limit", "stack_limit", "console",
                  "max_timers", "max_host_calls", "functions", "require", "filesystem",
                  "filename", "language"})
_T = TypeVar("_T")
_SLACK = 5.0  # past the run's own timeout and grace: the daemon always answers before this


def wire_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """User-level options as the daemon takes them (see :mod:`isobox.supervisor.remote_api`)."""
    wire = {k: v for k, v in options.items() if k in WIRE and v is not None}
    sandbox = wire.pop("sandbox", None)
    if sandbox:
        wire["sandbox_json"] = values.encode(dict(sandbox), what="sandbox")[0]
    functions = wire.pop("functions", None)
    if functions:
        wire["functions"] = HostFunctions(functions).spec()
    return wire


class _Call:
    """One remote request's local side: options checked here, console sink, host table."""

    def __init__(self, box: _BoxCore, options: dict[str, Any],
                 functions: Mapping[str, Callable[..., Any]] | None) -> None:
        local = {k: v for k, v in options.items()
                 if (k in WIRE and k != "functions") or k in ("on_output", "priority")}
        request, host = box._prepare("", local)  # validates, as embedded mode would
        self.host = host.merged(functions).merged(options.get("functions"))
        self.streamed: list[tuple[str, str]] = []
        self.sink = box._output_sink(request, self.streamed)
        self.timeout = request.options.timeout + 1.0 + _SLACK
        self.priority = request.options.priority
        self.started = time.monotonic()

    @property
    def call(self) -> Callable[[str, str], str] | None:
        return self.host.call if self.host else None


def remote_stream(box: _BoxCore, code: str, options: dict[str, Any], window: int,
                  idle_timeout: float | None, *, session: str | None = None,
                  functions: Mapping[str, Callable[..., Any]] | None = None
                  ) -> Generator[Any, None, None]:
    """A stream run by the daemon (plain, or in session ``session``)."""
    remote = box._remote
    if remote is None:
        raise RuntimeError("not a remote box")
    sent = options if session is not None else {**box._remote_defaults, **options}
    if session is None and box._remote_defaults.get("functions") and "functions" in options:
        sent["functions"] = {**box._remote_defaults["functions"], **options["functions"]}
    call = _Call(box, sent, functions)
    body: dict[str, Any] = {"op": "session.stream" if session else "stream", "code": code,
                            "options": wire_options(sent), "idle_timeout": idle_timeout,
                            "priority": call.priority}
    if session is not None:
        body["id"] = session
    gap = idle_timeout if idle_timeout is not None else call.timeout
    yield from remote.stream(body, window=window, timeout=gap + _SLACK, on_output=call.sink,
                             call=call.call)


class RemoteSession(Session):
    """A session that lives in the daemon (same methods as :class:`~isobox.Session`)."""

    def __init__(self, box: _BoxCore, session_id: str,
                 functions: Mapping[str, Callable[..., Any]] | None = None) -> None:
        self._core = box  # no super().__init__: this session has no local state
        self._id = check_id(session_id)
        self._functions = dict(functions or {})

    @classmethod
    def open(cls, box: _BoxCore, session_id: str) -> RemoteSession:
        """An existing session of this box's scope (SessionError if there is none). Host
        functions given at its creation in another process are not known here: pass them
        again per call if this process must answer them."""
        session = cls(box, session_id)
        session.info()
        return session

    @classmethod
    def create(cls, box: _BoxCore, session_id: str, ttl: float | None,
               options: dict[str, Any]) -> RemoteSession:
        check_id(session_id)
        merged = {**box._remote_defaults, **options}
        functions = {**box._remote_defaults.get("functions", {}),
                     **(options.get("functions") or {})}
        if functions:
            merged["functions"] = functions
        session = cls(box, session_id, functions)
        call = _Call(box, merged, None)
        session._api({"op": "session.create", "ttl": ttl, "options": wire_options(merged)},
                     call)
        return session

    @property
    def id(self) -> str:
        """The session's id."""
        return self._id

    def _api(self, body: dict[str, Any], call: _Call) -> Any:
        remote = self._core._remote
        if remote is None:
            raise RuntimeError("not a remote box")
        return remote.api({"id": self._id, "priority": call.priority, **body},
                          timeout=call.timeout, on_output=call.sink, call=call.call)

    def _plain(self, op: str, **body: Any) -> Any:
        return self._api({"op": f"session.{op}", **body}, _Call(self._core, {}, None))

    def run(self, code: str, **options: Any) -> Any:
        """Run ``code`` in the session's context; return its completion value."""
        return self.execute(code, **options).value

    def execute(self, code: str, **options: Any) -> ExecutionResult:
        """Run ``code`` in the session's context; return the full result."""
        call = _Call(self._core, options, self._functions)
        try:
            found = self._api({"op": "session.execute", "code": code,
                               "options": wire_options(options)}, call)
        except Exception as exc:
            self._core._remote_failed(exc, call.started)
            raise
        return self._core._remote_result(found, call.streamed, call.started)

    def run_project(self, files: Any, entrypoint: str, **options: Any) -> Any:
        """Run a project from ``entrypoint`` in the session's context."""
        call = _Call(self._core, options, self._functions)
        found = self._api({"op": "session.project", "files": dict(files),
                           "entry": entrypoint, "options": wire_options(options)}, call)
        return values.decode(str(found.get("value", "null")))

    def run_stream(self, code: str, *, window: int = 256, idle_timeout: float | None = None,
                   **options: Any) -> Generator[Any, None, None]:
        """Stream the values ``code`` yields, in the session's context."""
        return remote_stream(self._core, code, options, window, idle_timeout,
                             session=self._id, functions=self._functions)

    def get_state(self) -> dict[str, Any]:
        """The session's JSON-able globals (what a checkpoint keeps)."""
        state = values.decode(str(self._plain("get_state")))
        return state if isinstance(state, dict) else {}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Set globals from ``state`` (merged into the existing ones)."""
        self._plain("set_state", state=values.encode(dict(state), what="state")[0])

    def reset(self) -> None:
        """Drop the context and its checkpoint."""
        self._plain("reset")

    def info(self) -> SessionInfo:
        """Id, times, run count, TTL and the worker holding the context."""
        found = self._plain("info")
        return SessionInfo(id=self._id, **found)

    def close(self) -> None:
        """Free the session; later calls raise :class:`SessionError`."""
        self._plain("close")

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRemoteSession(AsyncSession):
    """The asyncio twin of :class:`RemoteSession`: calls run on a thread, and cancelling the
    awaiting task cancels the operation in the daemon."""

    def __init__(self, box: AsyncIsoBox, inner: RemoteSession) -> None:
        self._core = box  # no super().__init__: the inner session holds everything
        self._inner = inner

    @property
    def id(self) -> str:
        """The session's id."""
        return self._inner.id

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        remote = self._core._remote
        if remote is None:
            raise RuntimeError("not a remote box")
        return await Cancellable(remote).call(fn, *args, **kwargs)

    async def run(self, code: str, **options: Any) -> Any:
        """Run ``code`` in the session's context; return its completion value."""
        return (await self.execute(code, **options)).value

    async def execute(self, code: str, **options: Any) -> ExecutionResult:
        """Run ``code`` in the session's context; return the full result."""
        return await self._call(self._inner.execute, code, **options)

    async def run_project(self, files: Any, entrypoint: str, **options: Any) -> Any:
        """Run a project from ``entrypoint`` in the session's context."""
        return await self._call(self._inner.run_project, files, entrypoint, **options)

    def run_stream(self, code: str, *, window: int = 256, idle_timeout: float | None = None,
                   **options: Any) -> AsyncGenerator[Any, None]:
        """Stream the values ``code`` yields, in the session's context."""
        remote = self._core._remote
        if remote is None:
            raise RuntimeError("not a remote box")
        return athread_stream(remote, self._inner.run_stream(code, window=window,
                                                             idle_timeout=idle_timeout,
                                                             **options))

    async def get_state(self) -> dict[str, Any]:
        """The session's JSON-able globals."""
        return await self._call(self._inner.get_state)

    async def set_state(self, state: Mapping[str, Any]) -> None:
        """Set globals from ``state``."""
        await self._call(self._inner.set_state, state)

    async def reset(self) -> None:
        """Drop the context and its checkpoint."""
        await self._call(self._inner.reset)

    async def info(self) -> SessionInfo:
        """Id, times, run count, TTL and the worker holding the context."""
        return await self._call(self._inner.info)

    async def close(self) -> None:
        """Free the session."""
        await self._call(self._inner.close)

    async def __aenter__(self) -> AsyncRemoteSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_END = object()


async def athread_stream(remote: RemoteClient, gen: Generator[Any, None, None]
                         ) -> AsyncGenerator[Any, None]:
    """A sync stream consumed from asyncio: each value is taken on a thread. Cancelling the
    consuming task cancels the stream in the daemon (its worker is freed at once)."""
    calls = Cancellable(remote)
    try:
        while True:
            value = await calls.call(next, gen, _END)
            if value is _END:
                return
            yield value
    finally:
        with contextlib.suppress(ValueError, RuntimeError):  # still running in a thread
            await calls.call(gen.close)
