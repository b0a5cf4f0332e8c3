"""Per-box run metrics: counters, a bounded history, percentiles over recent durations."""

from __future__ import annotations

import threading
from collections import deque

from isobox.results import ExecutionMetrics, GlobalMetrics

__all__ = ["MetricsRecorder"]


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class MetricsRecorder:
    """Thread-safe; recording is O(1), reading sorts at most ``window`` durations."""

    def __init__(self, history: int = 1000, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._history: deque[ExecutionMetrics] = deque(maxlen=history)
        self._recent: deque[float] = deque(maxlen=window)
        self._total = 0
        self._errors = 0
        self._timeouts = 0
        self._sum = 0.0
        self._min = float("inf")
        self._max = 0.0
        self._peak_memory = 0

    def record(self, item: ExecutionMetrics) -> None:
        """Add one finished run."""
        with self._lock:
            self._history.append(item)
            self._recent.append(item.duration)
            self._total += 1
            self._errors += item.status != "ok"
            self._timeouts += item.status == "timeout"
            self._sum += item.duration
            self._min = min(self._min, item.duration)
            self._max = max(self._max, item.duration)
            self._peak_memory = max(self._peak_memory, item.memory)

    def history(self, limit: int | None = None) -> list[ExecutionMetrics]:
        """The most recent runs, oldest first."""
        with self._lock:
            items = list(self._history)
        return items[-limit:] if limit else items

    def snapshot(self, worker_restarts: int) -> GlobalMetrics:
        """Aggregates as a frozen value."""
        with self._lock:
            ordered = sorted(self._recent)
            total = self._total
            return GlobalMetrics(
                total_executions=total,
                errors=self._errors,
                error_rate=self._errors / total if total else 0.0,
                timeouts=self._timeouts,
                avg_duration=self._sum / total if total else 0.0,
                min_duration=self._min if total else 0.0,
                max_duration=self._max,
                p50_duration=_percentile(ordered, 0.50),
                p95_duration=_percentile(ordered, 0.95),
                p99_duration=_percentile(ordered, 0.99),
                peak_memory=self._peak_memory,
                total_duration=self._sum,
                worker_restarts=worker_restarts,
            )
