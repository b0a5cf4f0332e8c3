"""IsoBox: run untrusted JavaScript from Python in supervised QuickJS worker processes.

``import isobox`` stays light: the API classes (and with them the supervisor) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from isobox.errors import (
    ClosedError,
    CompileError,
    DaemonError,
    IsoBoxError,
    MemoryLimitError,
    ScriptError,
    SecurityError,
    SerializationError,
    SessionError,
    TimeoutError,
    WorkerCrashedError,
)

if TYPE_CHECKING:
    from isobox.api import AsyncIsoBox, IsoBox
    from isobox.batch import BatchItem
    from isobox.results import (
        CodeValidation,
        ExecutionMetrics,
        ExecutionResult,
        GlobalMetrics,
        PoolStats,
        SessionInfo,
        WorkerStats,
    )
    from isobox.sessions import AsyncSession, Session

__version__ = "0.1.0"

__all__ = [
    "AsyncIsoBox",
    "AsyncSession",
    "BatchItem",
    "ClosedError",
    "CodeValidation",
    "CompileError",
    "DaemonError",
    "ExecutionMetrics",
    "ExecutionResult",
    "GlobalMetrics",
    "IsoBox",
    "IsoBoxError",
    "MemoryLimitError",
    "PoolStats",
    "ScriptError",
    "SecurityError",
    "SerializationError",
    "Session",
    "SessionError",
    "SessionInfo",
    "TimeoutError",
    "WorkerCrashedError",
    "WorkerStats",
]

_LAZY = {
    "BatchItem": "isobox.batch",
    "IsoBox": "isobox.api",
    "AsyncIsoBox": "isobox.api",
    "Session": "isobox.sessions",
    "AsyncSession": "isobox.sessions",
    "SessionInfo": "isobox.results",
    "CodeValidation": "isobox.results",
    "ExecutionMetrics": "isobox.results",
    "ExecutionResult": "isobox.results",
    "GlobalMetrics": "isobox.results",
    "PoolStats": "isobox.results",
    "WorkerStats": "isobox.results",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'isobox' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - lazy on purpose: `import isobox` stays light

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
