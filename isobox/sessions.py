"""Sessions: one live JS context pinned to a worker, with REPL semantics and checkpoints.

::

    Session.run ─▶ box._session_reply ─▶ pinned worker (RUN session=id) ─▶ RESULT + state
                        │  worker gone? place on another worker, RUN with restore=checkpoint
                        └─ checkpoint := state (the JSON-able globals after each good run)

This module holds the IO-free record (:class:`SessionState`) and the two thin facades
(:class:`Session`, :class:`AsyncSession`) over the box's private session methods.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from isobox.errors import SessionError
from isobox.results import ExecutionResult, SessionInfo

if TYPE_CHECKING:
    from isobox.api import AsyncIsoBox, IsoBox
    from isobox.supervisor.handle import WorkerHandle
    from isobox.workers.engine import Engine

__all__ = ["AsyncSession", "Session", "SessionState"]

MAX_ID = 256


def check_id(session_id: object) -> str:
    """A session id must be a non-empty str of at most 256 characters."""
    if not isinstance(session_id, str) or not session_id or len(session_id) > MAX_ID:
        raise SessionError(f"session id must be a non-empty str of at most {MAX_ID} "
                           f"characters, got {session_id!r}")
    return session_id


@dataclass(eq=False)
class SessionState:
    """What the box knows of one session (guarded by ``lock`` while a call runs)."""

    id: str
    ttl: float | None
    overrides: dict[str, Any]
    functions: Mapping[str, Callable[..., Any]] | None
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    touched: float = field(default_factory=time.monotonic)
    execution_count: int = 0
    checkpoint: str | None = None  # tagged JSON object text of the JSON-able globals
    files: dict[str, Any] | None = None  # MemFS content at the checkpoint (wire form)
    handle: WorkerHandle | None = None  # process mode: the worker holding the live context
    engine: Engine | None = None  # in-process mode: the engine holding it
    ended: str = ""  # "", "closed" or "expired"
    generation: int = 0  # bumped by reset/close: a run that began before may not write back
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    alock: asyncio.Lock | None = None

    def check(self) -> None:
        """Raise :class:`SessionError` if the session can no longer run."""
        if self.ended:
            raise SessionError(f"session {self.id!r} is {self.ended}")

    def touch(self) -> None:
        self.last_used = time.time()
        self.touched = time.monotonic()

    def due(self, now: float) -> bool:
        """True when the TTL, counted from last use, has run out (never while busy)."""
        return (not self.ended and not self.busy and self.ttl is not None
                and now - self.touched > self.ttl)

    def info(self, pid: int | None) -> SessionInfo:
        return SessionInfo(id=self.id, created_at=self.created_at, last_used=self.last_used,
                           execution_count=self.execution_count, ttl=self.ttl, worker_pid=pid)

    def async_lock(self) -> asyncio.Lock:
        if self.alock is None:
            self.alock = asyncio.Lock()
        return self.alock


class Session:
    """A session of an :class:`~isobox.IsoBox` (create with ``box.create_session``)."""

    def __init__(self, box: IsoBox, state: SessionState) -> None:
        self._box = box
        self._state = state

    @property
    def id(self) -> str:
        """The session's id."""
        return self._state.id

    def run(self, code: str, **options: Any) -> Any:
        """Run ``code`` in the session's context; return its completion value."""
        return self.execute(code, **options).value

    def execute(self, code: str, **options: Any) -> ExecutionResult:
        """Run ``code`` in the session's context; return the full result."""
        return self._box._session_execute(self._state, code, options)

    def run_project(self, files: Any, entrypoint: str, **options: Any) -> Any:
        """Run a project from ``entrypoint`` in the session's context (see IsoBox.run_project)."""
        return self._box._session_execute(self._state, "", options,
                                          (files, entrypoint)).value

    def run_stream(self, code: str, *, window: int = 256, idle_timeout: float | None = None,
                   **options: Any) -> Generator[Any, None, None]:
        """Stream the values ``code`` yields, in the session's context."""
        return self._box._stream(code, options, window, idle_timeout,
                                 self._state)

    def get_state(self) -> dict[str, Any]:
        """The session's JSON-able globals (what a checkpoint keeps)."""
        return self._box._session_state(self._state, None)

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Set globals from ``state`` (merged into the existing ones)."""
        self._box._session_state(self._state, state)

    def reset(self) -> None:
        """Drop the context and its checkpoint: the next run starts from a clean global."""
        self._box._session_end(self._state, "")

    def info(self) -> SessionInfo:
        """Id, times, run count, TTL and the worker holding the context."""
        return self._box._session_info(self._state)

    def close(self) -> None:
        """Free the session; later calls raise :class:`SessionError`."""
        self._box._session_end(self._state, "closed")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSession:
    """A session of an :class:`~isobox.AsyncIsoBox`: the same names, awaited."""

    def __init__(self, box: AsyncIsoBox, state: SessionState) -> None:
        self._box = box
        self._state = state

    @property
    def id(self) -> str:
        """The session's id."""
        return self._state.id

    async def run(self, code: str, **options: Any) -> Any:
        """Run ``code`` in the session's context; return its completion value."""
        return (await self.execute(code, **options)).value

    async def execute(self, code: str, **options: Any) -> ExecutionResult:
        """Run ``code`` in the session's context; return the full result."""
        return await self._box._session_execute(self._state, code, options)

    async def run_project(self, files: Any, entrypoint: str, **options: Any) -> Any:
        """Run a project from ``entrypoint`` in the session's context."""
        return (await self._box._session_execute(self._state, "", options,
                                                 (files, entrypoint))).value

    def run_stream(self, code: str, *, window: int = 256, idle_timeout: float | None = None,
                   **options: Any) -> AsyncGenerator[Any, None]:
        """Stream the values ``code`` yields, in the session's context (async iterator)."""
        return self._box._stream(code, options, window, idle_timeout,
                                 self._state)

    async def get_state(self) -> dict[str, Any]:
        """The session's JSON-able globals (what a checkpoint keeps)."""
        return await self._box._session_state(self._state, None)

    async def set_state(self, state: Mapping[str, Any]) -> None:
        """Set globals from ``state`` (merged into the existing ones)."""
        await self._box._session_state(self._state, state)

    async def reset(self) -> None:
        """Drop the context and its checkpoint: the next run starts from a clean global."""
        self._box._session_end(self._state, "")

    async def info(self) -> SessionInfo:
        """Id, times, run count, TTL and the worker holding the context."""
        return self._box._session_info(self._state)

    async def close(self) -> None:
        """Free the session; later calls raise :class:`SessionError`."""
        self._box._session_end(self._state, "closed")

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
