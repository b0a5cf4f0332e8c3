"""The one exception tree of IsoBox.

::

    IsoBoxError
    ├── ScriptError              the script threw: .name .message .stack (sandbox paths only)
    │   ├── CompileError         syntax error: .line .column
    │   └── SecurityError        a forbidden operation was not caught by the script
    ├── TimeoutError             also a builtins.TimeoutError: .kind "cpu" | "wall", .limit
    ├── MemoryLimitError         .limit
    ├── SerializationError       a value cannot cross the boundary: .path
    ├── WorkerCrashedError       .pid .exitcode .signal .cause
    ├── SessionError             closed, expired or unknown session
    ├── ClosedError              the box was shut down
    └── DaemonError              remote mode: the daemon refused us, is full, or the link dropped

"Closed" (you shut it down) is a different error from "crashed" (the other side broke).
Errors travel between processes as plain dicts (:func:`error_to_dict`, :func:`error_from_dict`);
no pickle is involved.
"""

from __future__ import annotations

import builtins
import signal as _signal
from typing import Any

__all__ = [
    "ClosedError",
    "CompileError",
    "DaemonError",
    "IsoBoxError",
    "MemoryLimitError",
    "ScriptError",
    "SecurityError",
    "SerializationError",
    "SessionError",
    "TimeoutError",
    "WorkerCrashedError",
    "error_from_dict",
    "error_to_dict",
]


class IsoBoxError(Exception):
    """Base of every error IsoBox raises; ``worker_pid`` names the worker when one was involved."""

    worker_pid: int | None = None


class ScriptError(IsoBoxError):
    """The script threw and did not catch it."""

    def __init__(self, message: str, *, name: str = "Error", stack: str = "") -> None:
        super().__init__(f"{name}: {message}" if name else message)
        self.name = name
        self.message = message
        self.stack = stack


class CompileError(ScriptError):
    """The source does not parse; ``line`` and ``column`` are 1-based when known."""

    def __init__(
        self,
        message: str,
        *,
        name: str = "SyntaxError",
        stack: str = "",
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message, name=name, stack=stack)
        self.line = line
        self.column = column


class SecurityError(ScriptError):
    """The script attempted a forbidden operation and did not catch the error."""


class TimeoutError(IsoBoxError, builtins.TimeoutError):
    """The run exceeded its CPU (``kind="cpu"``) or wall-clock (``kind="wall"``) budget."""

    def __init__(self, message: str, *, kind: str = "wall", limit: float = 0.0) -> None:
        super().__init__(message)
        self.kind = kind
        self.limit = limit


class MemoryLimitError(IsoBoxError):
    """The run exceeded its JS heap limit (or a size cap on what leaves the sandbox)."""

    def __init__(self, message: str, *, limit: int = 0) -> None:
        super().__init__(message)
        self.limit = limit


class SerializationError(IsoBoxError):
    """A value cannot cross the boundary; ``path`` names where, e.g. ``result.items[3]``."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class WorkerCrashedError(IsoBoxError):
    """The worker process died during the run."""

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        signal: int | None = None,
        cause: str = "",
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.cause = cause


class SessionError(IsoBoxError):
    """The session is closed, expired or unknown."""


class ClosedError(IsoBoxError):
    """The box was shut down; no further runs are accepted."""


class DaemonError(IsoBoxError):
    """Remote mode: the daemon refused the connection (a wrong token), its queue or the
    client's share of it is full, or the connection dropped while a request was in flight
    (the daemon then cancels that request's work)."""


def describe_death(pid: int | None, exitcode: int | None, sig: int | None, cause: str) -> str:
    """One line naming pid, exit code or signal and the likely cause."""
    if sig is not None:
        try:
            how = f"killed by {_signal.Signals(sig).name}"
        except ValueError:
            how = f"killed by signal {sig}"
    elif exitcode is not None:
        how = f"exited with code {exitcode}"
    else:
        how = "lost its channel"
    text = f"worker {pid} {how}"
    return f"{text} ({cause})" if cause else text


_SCRIPT_KINDS: dict[str, type[ScriptError]] = {
    "ScriptError": ScriptError,
    "CompileError": CompileError,
    "SecurityError": SecurityError,
}


def error_to_dict(exc: IsoBoxError) -> dict[str, Any]:
    """Flatten an IsoBox error into a msgpack-able dict (the wire form of errors)."""
    data: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, ScriptError):
        data.update(name=exc.name, message=exc.message, stack=exc.stack)
        if isinstance(exc, CompileError):
            data.update(line=exc.line, column=exc.column)
    elif isinstance(exc, TimeoutError):
        data.update(kind=exc.kind, limit=exc.limit)
    elif isinstance(exc, MemoryLimitError):
        data.update(limit=exc.limit)
    elif isinstance(exc, SerializationError):
        data.update(path=exc.path)
    elif isinstance(exc, WorkerCrashedError):
        data.update(pid=exc.pid, exitcode=exc.exitcode, signal=exc.signal, cause=exc.cause)
    if exc.worker_pid is not None:
        data["worker_pid"] = exc.worker_pid
    return data


def error_from_dict(data: dict[str, Any]) -> IsoBoxError:
    """Rebuild an error from :func:`error_to_dict` output; unknown types become IsoBoxError."""
    error = _rebuild(data)
    error.worker_pid = _int_or_none(data.get("worker_pid"))
    return error


def _rebuild(data: dict[str, Any]) -> IsoBoxError:
    kind = str(data.get("type", ""))
    message = str(data.get("message", ""))
    if kind in _SCRIPT_KINDS:
        name = str(data.get("name", "Error"))
        stack = str(data.get("stack", ""))
        if kind == "CompileError":
            return CompileError(
                message, name=name, stack=stack, line=data.get("line"), column=data.get("column")
            )
        return _SCRIPT_KINDS[kind](message, name=name, stack=stack)
    if kind == "TimeoutError":
        return TimeoutError(
            message, kind=str(data.get("kind", "cpu")), limit=float(data.get("limit", 0))
        )
    if kind == "MemoryLimitError":
        return MemoryLimitError(message, limit=int(data.get("limit", 0)))
    if kind == "SerializationError":
        return SerializationError(message, path=str(data.get("path", "")))
    if kind == "WorkerCrashedError":
        return WorkerCrashedError(message, pid=_int_or_none(data.get("pid")),
                                  exitcode=_int_or_none(data.get("exitcode")),
                                  signal=_int_or_none(data.get("signal")),
                                  cause=str(data.get("cause", "")))
    plain: dict[str, type[IsoBoxError]] = {"SessionError": SessionError,
                                           "ClosedError": ClosedError, "DaemonError": DaemonError}
    return plain.get(kind, IsoBoxError)(message)


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int else None
