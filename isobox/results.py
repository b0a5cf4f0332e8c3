"""Named results: frozen, typed value objects returned by the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CodeValidation",
    "ExecutionMetrics",
    "ExecutionResult",
    "GlobalMetrics",
    "PoolStats",
    "SessionInfo",
    "WorkerStats",
]


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """Everything one run produced. ``memory`` is JS heap bytes in use at the end."""

    value: Any
    duration: float
    cpu_time: float
    memory: int
    type: str
    console: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    worker_pid: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionMetrics:
    """One run as history remembers it; ``status`` is ok, error, timeout, memory or crashed."""

    duration: float
    cpu_time: float
    memory: int
    status: str
    worker_pid: int | None
    timestamp: float


@dataclass(frozen=True, slots=True)
class GlobalMetrics:
    """Aggregates over every run of one box (percentiles over the most recent 10,000)."""

    total_executions: int
    errors: int
    error_rate: float
    timeouts: int
    avg_duration: float
    min_duration: float
    max_duration: float
    p50_duration: float
    p95_duration: float
    p99_duration: float
    peak_memory: int
    total_duration: float
    worker_restarts: int


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """One worker process: psutil figures (bytes, percent) and counters."""

    pid: int
    state: str
    rss: int
    uss: int
    cpu_percent: float
    runs: int
    started_at: float
    confinement: list[str] = field(default_factory=list)  # the layers applied (README)
    prelude: str = ""  # "bytecode" or "source": how the trusted JS enters each context (README)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The pool: its workers, restarts so far and runs waiting for a worker."""

    workers: list[WorkerStats]
    restarts: int
    queued: int
    confinement_error: str = ""  # why the last worker refused to start unconfined, if one did


@dataclass(frozen=True, slots=True)
class CodeValidation:
    """Whether source parses; ``error`` holds the :class:`~isobox.errors.CompileError`."""

    valid: bool
    error: Any = None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session: wall-clock times (``time.time()``), runs so far, TTL and its worker."""

    id: str
    created_at: float
    last_used: float
    execution_count: int
    ttl: float | None
    worker_pid: int | None
