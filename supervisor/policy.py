"""Restart policy, pure: no processes, no clocks of its own (callers pass ``now``).

- :func:`jittered_max_runs`: each worker retires after ``max_runs`` plus up to 10% jitter, so a
  pool started at once does not recycle all its workers at once (gunicorn's max_requests_jitter).
- :class:`Backoff`: exponential delay between consecutive failed or crashing spawns (none after
  a single one), reset by a healthy run.
- :class:`CrashLoopBreaker`: too many crashes within a window opens the breaker; runs then fail
  fast with a clear error instead of respawning in a tight loop, until the window has passed.
- :func:`classify_exit`: a raw wait status (plus what the supervisor knew) becomes
  exit code, signal and likely cause.
"""

from __future__ import annotations

import os
import random
import signal
from collections import deque
from dataclasses import dataclass

__all__ = ["Backoff", "CrashLoopBreaker", "Death", "classify_exit", "jittered_max_runs"]


def jittered_max_runs(max_runs: int | None, rng: random.Random | None = None) -> int | None:
    """The run count after which one worker retires; None means never."""
    if not max_runs:
        return None
    jitter = max(1, max_runs // 10)
    return max_runs + (rng or random).randint(0, jitter)


class Backoff:
    """Exponential backoff: 0, base, 2*base, ... up to ``cap`` seconds."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def failed(self) -> None:
        """Record one failed or crashed spawn."""
        self.failures += 1

    def succeeded(self) -> None:
        """A worker served a run: reset."""
        self.failures = 0

    def delay(self) -> float:
        """Seconds to wait before the next spawn: none after a single failure (a worker killed
        from outside is replaced at once), then base, 2*base, ... for consecutive failures."""
        if self.failures <= 1:
            return 0.0
        return float(min(self.cap, self.base * 2.0 ** (self.failures - 2)))


class CrashLoopBreaker:
    """Opens after ``threshold`` unexpected deaths within ``window`` seconds."""

    def __init__(self, threshold: int = 10, window: float = 10.0) -> None:
        self.threshold = threshold
        self.window = window
        self._deaths: deque[float] = deque()

    def record(self, now: float) -> None:
        """Record one unexpected worker death at ``now`` (monotonic seconds)."""
        self._deaths.append(now)
        self._trim(now)

    def is_open(self, now: float) -> bool:
        """True while too many deaths happened within the window."""
        self._trim(now)
        return len(self._deaths) >= self.threshold

    def _trim(self, now: float) -> None:
        while self._deaths and now - self._deaths[0] > self.window:
            self._deaths.popleft()


@dataclass(frozen=True, slots=True)
class Death:
    """How a worker died."""

    exitcode: int | None
    signal: int | None
    cause: str


def classify_exit(
    status: int | None, *, killed_by_us: str = "", near_memory_ceiling: bool = False
) -> Death:
    """Classify a raw wait status; ``killed_by_us`` names our reason when we sent the signal."""
    if status is None:
        return Death(None, None, killed_by_us or "channel closed; exit status unknown")
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        sig = -code
        if killed_by_us:
            cause = killed_by_us
        elif sig == signal.SIGKILL:
            cause = "killed by SIGKILL from outside, perhaps out of memory (OOM killer)"
        elif sig == signal.SIGSEGV:
            cause = "segmentation fault" + (", likely out of memory" if near_memory_ceiling else "")
        elif sig == signal.SIGXCPU:
            cause = "CPU-time rlimit exceeded"
        else:
            try:
                cause = f"killed by {signal.Signals(sig).name}"
            except ValueError:
                cause = f"killed by signal {sig}"
        return Death(None, sig, cause)
    if code == 0:
        return Death(0, None, killed_by_us or "exited")
    if code == 3:
        return Death(code, None, "protocol error in the worker")
    return Death(code, None, killed_by_us or "worker failed")
