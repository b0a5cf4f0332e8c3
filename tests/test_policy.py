"""The restart policy, pure: backoff, crash-loop breaker, max_runs jitter, death classification."""

from __future__ import annotations

import random
import signal

from isobox.errors import describe_death
from isobox.supervisor.policy import Backoff, CrashLoopBreaker, classify_exit, jittered_max_runs


def _status(*, code: int | None = None, sig: int | None = None) -> int:
    """A raw wait status as waitpid would return it."""
    return sig if sig is not None else (code or 0) << 8


def test_backoff_doubles_to_a_cap_and_resets() -> None:
    """Backoff is 0 after one failure, then base, 2*base, ... up to cap; success resets it."""
    backoff = Backoff(base=0.1, cap=0.5)
    delays = []
    for _ in range(6):
        delays.append(backoff.delay())
        backoff.failed()
    assert delays == [0.0, 0.0, 0.1, 0.2, 0.4, 0.5]
    backoff.succeeded()
    assert backoff.delay() == 0.0


def test_breaker_opens_within_window_and_closes_after() -> None:
    """Too many deaths within the window open the breaker until they age out."""
    breaker = CrashLoopBreaker(threshold=3, window=10.0)
    for t in (0.0, 1.0):
        breaker.record(t)
    assert not breaker.is_open(2.0)
    breaker.record(2.0)
    assert breaker.is_open(2.0)
    assert not breaker.is_open(12.5)


def test_max_runs_jitter_stays_within_ten_percent() -> None:
    """Each worker retires between max_runs and max_runs * 1.1; None means never."""
    rng = random.Random(1)
    values = {jittered_max_runs(100, rng) for _ in range(200)}
    assert min(v for v in values if v) >= 100
    assert max(v for v in values if v) <= 110
    assert len(values) > 1
    assert jittered_max_runs(None) is None


def test_classify_signals() -> None:
    """SIGKILL from outside hints at the OOM killer; SIGSEGV near the ceiling at memory."""
    death = classify_exit(_status(sig=signal.SIGKILL))
    assert (death.signal, death.exitcode) == (signal.SIGKILL, None)
    assert "out of memory" in death.cause
    segv = classify_exit(_status(sig=signal.SIGSEGV), near_memory_ceiling=True)
    assert "segmentation fault" in segv.cause
    assert "out of memory" in segv.cause


def test_classify_our_own_kill_keeps_our_reason() -> None:
    """When the supervisor sent the signal, its reason is the cause."""
    death = classify_exit(_status(sig=signal.SIGKILL), killed_by_us="watchdog")
    assert death.cause == "watchdog"


def test_classify_exit_codes_and_unknown() -> None:
    """Exit codes are kept; code 3 is a protocol error; no status means unknown."""
    assert classify_exit(_status(code=3)).cause == "protocol error in the worker"
    assert classify_exit(_status(code=1)).exitcode == 1
    assert "unknown" in classify_exit(None).cause


def test_describe_death_is_one_line_with_pid_and_signal() -> None:
    """The error text names pid, signal and cause on one line."""
    text = describe_death(42, None, signal.SIGSEGV, "segmentation fault")
    assert text == "worker 42 killed by SIGSEGV (segmentation fault)"
