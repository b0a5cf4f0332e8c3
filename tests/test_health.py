"""The leak and health policy: pure decisions with plain numbers, then real workers (a
worker over its RSS ceiling is recycled, a stopped worker that misses its heartbeat is killed
and replaced, a worker hosting sessions is not recycled for growth)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from isobox import IsoBox
from isobox.supervisor.health import MIB, HealthConfig, WorkerHealth

pytestmark = pytest.mark.timeout(60)


def test_due_follows_the_interval() -> None:
    """A worker is due once ``interval`` passed since its last check; interval 0 is never."""
    health = WorkerHealth(HealthConfig(interval=5.0))
    health.checked_at = 100.0
    assert not health.due(104.9)
    assert health.due(105.0)
    assert not WorkerHealth(HealthConfig(interval=0)).due(1e9)


def test_rss_ceiling() -> None:
    """Above max_rss the verdict names both figures; at or below it the worker is healthy."""
    health = WorkerHealth(HealthConfig(max_rss=100 * MIB, max_growth=None))
    assert health.sampled(1.0, 100 * MIB, 10 * MIB) is None
    verdict = health.sampled(2.0, 101 * MIB, 10 * MIB)
    assert verdict is not None and "101 MiB above max_rss 100 MiB" in verdict
    assert health.checked_at == 2.0


def test_steady_growth_is_a_leak() -> None:
    """USS that climbs in most samples by more than max_growth in all is a leak."""
    health = WorkerHealth(HealthConfig(max_growth=50 * MIB, samples=5))
    verdicts = [health.sampled(float(i), 0, (10 + 15 * i) * MIB) for i in range(5)]
    assert verdicts[:4] == [None] * 4  # not enough samples yet
    assert verdicts[4] is not None and "grew 60 MiB over its last 5 samples" in verdicts[4]


def test_one_jump_then_flat_is_not_a_leak() -> None:
    """A large but stable allocation (one jump, then flat) does not trip the trend."""
    health = WorkerHealth(HealthConfig(max_growth=50 * MIB, samples=5))
    for i, uss in enumerate([10, 200, 200, 200, 200]):
        assert health.sampled(float(i), 0, uss * MIB) is None


def test_small_growth_is_not_a_leak() -> None:
    """Rising in every sample but less than max_growth in all is fine."""
    health = WorkerHealth(HealthConfig(max_growth=50 * MIB, samples=5))
    for i in range(10):
        assert health.sampled(float(i), 0, (10 + i) * MIB) is None


@pytest.mark.parametrize("bad", [{"interval": -1}, {"heartbeat_timeout": 0},
                                 {"max_rss": 0}, {"max_growth": -1}, {"samples": 1}])
def test_bad_config_is_refused(bad: dict[str, Any]) -> None:
    """Nonsense settings are a ValueError, not a policy that never or always fires."""
    with pytest.raises(ValueError, match=r"\w"):
        HealthConfig(**bad)


def test_pool_options_reach_the_policy() -> None:
    """The pool option names map onto the policy; unknown ones are still refused."""
    with pytest.raises(ValueError, match="max_rss"):
        IsoBox(pool={"max_rss": 0})
    with pytest.raises(ValueError, match="unknown pool option"):
        IsoBox(pool={"max_rs": 1})


def _wait_for(events: list[dict[str, Any]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not events and time.monotonic() < deadline:
        time.sleep(0.05)


def test_worker_over_its_rss_ceiling_is_recycled() -> None:
    """An idle worker above max_rss is recycled (worker:recycled names why) and replaced;
    the next run succeeds on a new worker."""
    events: list[dict[str, Any]] = []
    with IsoBox(pool={"min": 1, "max": 1, "health_interval": 0.2, "max_rss": 1 * MIB}) as box:
        box.on("worker:recycled", events.append)
        first = box.execute("1").worker_pid
        _wait_for(events, 10)
        assert events and "above max_rss" in events[0]["reason"]
        assert events[0]["pid"] == first
        assert box.execute("2").value == 2


def test_stuck_worker_misses_its_heartbeat_and_is_replaced() -> None:
    """A worker that stops answering (SIGSTOP) is killed after heartbeat_timeout and
    replaced; runs go on."""
    events: list[dict[str, Any]] = []
    with IsoBox(pool={"min": 1, "max": 1, "health_interval": 0.2,
                      "heartbeat_timeout": 0.3}) as box:
        box.on("worker:recycled", events.append)
        pid = box.execute("1").worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        _wait_for(events, 10)
        assert events and events[0]["pid"] == pid and "stuck" in events[0]["reason"]
        result = box.execute("1 + 1")
        assert result.value == 2 and result.worker_pid != pid


def test_healthy_workers_are_left_alone() -> None:
    """With frequent checks and no limits crossed, the worker serving runs stays the same."""
    events: list[dict[str, Any]] = []
    with IsoBox(pool={"min": 1, "max": 1, "health_interval": 0.1}) as box:
        box.on("worker:recycled", events.append)
        pids = set()
        for _ in range(10):
            pids.add(box.execute("1").worker_pid)
            time.sleep(0.05)
        assert len(pids) == 1 and events == []
