"""Leak and health policy of idle workers, pure: no processes, no clocks (callers pass ``now``
and the RSS figures they sampled).

Between runs the pool checks each idle worker every ``interval`` seconds: it pings it (a
worker that does not answer within ``heartbeat_timeout`` is stuck and is killed) and samples
its RSS. :class:`WorkerHealth` then says whether the worker should be recycled:

- its RSS is above the ceiling ``max_rss``;
- its unique memory (USS: what the worker added over the pages it shares with the fork
  server) grew by more than ``max_growth`` over the last ``samples`` samples and rose in most
  of them (a leak's steady climb, not one large but stable allocation).

A busy worker is never interrupted: the verdict waits for the run to end (the pool drains it
first). With :func:`~isobox.supervisor.policy.jittered_max_runs`, :class:`Backoff` and
:class:`CrashLoopBreaker` (in :mod:`.policy`) this is the whole restart policy.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

__all__ = ["HealthConfig", "WorkerHealth"]

MIB = 2**20


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """When idle workers are checked and what makes one due for recycling."""

    interval: float = 5.0  # seconds between checks of one idle worker (0: never)
    heartbeat_timeout: float = 2.0  # a PONG later than this means the worker is stuck
    max_rss: int | None = None  # bytes; None: no ceiling
    max_growth: int | None = 256 * MIB  # RSS growth over the recent samples; None: off
    samples: int = 6  # how many recent samples the growth trend looks at

    def __post_init__(self) -> None:
        if self.interval < 0 or self.heartbeat_timeout <= 0:
            raise ValueError("health interval must be >= 0 and heartbeat_timeout > 0")
        if self.max_rss is not None and self.max_rss <= 0:
            raise ValueError("max_rss must be a positive number of bytes or None")
        if self.max_growth is not None and self.max_growth <= 0:
            raise ValueError("max_rss_growth must be a positive number of bytes or None")
        if self.samples < 2:
            raise ValueError("the growth trend needs at least 2 samples")


class WorkerHealth:
    """One worker's recent memory samples and when it was last checked."""

    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self.uss: deque[int] = deque(maxlen=config.samples)
        self.checked_at = 0.0

    def due(self, now: float) -> bool:
        """Whether the worker should be checked (pinged and sampled) now."""
        return self.config.interval > 0 and now - self.checked_at >= self.config.interval

    def sampled(self, now: float, rss: int, uss: int) -> str | None:
        """Record a check at ``now`` that measured ``rss`` and ``uss``; returns why the worker
        should be recycled, or None if it is healthy."""
        self.checked_at = now
        self.uss.append(uss)
        limit = self.config.max_rss
        if limit is not None and rss > limit:
            return f"rss {rss // MIB} MiB above max_rss {limit // MIB} MiB"
        return self._leaking()

    def _leaking(self) -> str | None:
        growth_limit = self.config.max_growth
        if growth_limit is None or len(self.uss) < self.config.samples:
            return None
        values = list(self.uss)
        growth = values[-1] - values[0]
        rises = sum(1 for a, b in itertools.pairwise(values) if b > a)
        if growth > growth_limit and rises * 4 >= (len(values) - 1) * 3:
            return (f"memory grew {growth // MIB} MiB over its last {len(values)} samples "
                    f"(max_rss_growth {growth_limit // MIB} MiB)")
        return None
