"""Races and edges of the pool and the fork-server client, with real processes and signals."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import psutil
import pytest

import isobox
from isobox import IsoBox
from isobox.supervisor.zygote import ZygoteClient


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _children() -> list[psutil.Process]:
    return [c for c in psutil.Process().children(recursive=True)
            if c.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.timeout(60)
def test_source_over_the_channel_is_a_serialization_error() -> None:
    """A source within max_input_size whose UTF-8 form overflows a frame is refused cleanly."""
    with IsoBox(pool={"min": 1, "max": 1}) as box:
        with pytest.raises(isobox.SerializationError, match="does not fit the channel"):
            box.run("//" + "\u4e00" * (32 * 2**20 - 2))
        assert box.run("1 + 2") == 3


@pytest.mark.timeout(90)
def test_result_over_the_channel_is_a_serialization_error() -> None:
    """A result within max_result_size whose UTF-8 form overflows a frame is refused, and the
    worker survives to serve the next run."""
    with IsoBox(pool={"min": 1, "max": 1}, timeout=60, memory_limit=2**30) as box:
        pid = box.execute("1").worker_pid
        with pytest.raises(isobox.SerializationError, match="does not fit the channel"):
            box.run("'\\u4e00'.repeat(32 * 2**20 - 16)")
        assert box.execute("1 + 2").worker_pid == pid


@pytest.mark.timeout(30)
def test_caps_cannot_exceed_what_a_frame_carries() -> None:
    """max_result_size and max_input_size are bounded by the channel."""
    with pytest.raises(ValueError, match="max_result_size"):
        IsoBox(mode="inprocess", max_result_size=2**30)
    with pytest.raises(ValueError, match="max_input_size"):
        IsoBox(mode="inprocess", max_input_size=2**30)


@pytest.mark.timeout(30)
def test_interrupted_wait_for_a_worker_does_not_leak_it() -> None:
    """An exception raised into a thread waiting for a worker gives the worker back."""
    class Interrupted(Exception):
        pass

    def alarm(*_: Any) -> None:
        raise Interrupted

    with IsoBox(pool={"min": 1, "max": 1}, timeout=10) as box:
        box.warmup_pool()
        busy = threading.Thread(target=box.run,
                                args=("let t = Date.now(); while (Date.now() - t < 800) {}",))
        busy.start()
        time.sleep(0.2)
        old = signal.signal(signal.SIGALRM, alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                box.run("1")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        busy.join()
        assert box.run("1 + 2", timeout=5) == 3
        assert [w.state for w in box.pool_stats().workers] == ["idle"]


@pytest.mark.timeout(60)
def test_shutdown_during_spawn_backoff_leaves_no_fork_server() -> None:
    """Shutting down while the maintainer backs off between respawns leaves no process behind
    and does not touch fds it no longer owns."""
    box = IsoBox(pool={"min": 1, "max": 1})
    box.warmup_pool()
    for _ in range(6):  # consecutive deaths grow the backoff to a second or more
        pid = box.pool_stats().workers[0].pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid in {w.pid for w in box.pool_stats().workers} or not box.pool_stats().workers:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    os.kill(box.pool_stats().workers[0].pid, signal.SIGKILL)
    time.sleep(0.1)
    box.shutdown(timeout=1)
    r, w = os.pipe()
    try:
        time.sleep(2.5)  # longer than the backoff the maintainer was sleeping
        os.write(w, b"user data")
        assert os.read(r, 100) == b"user data"
    finally:
        os.close(r)
        os.close(w)
    assert _children() == []


@pytest.mark.timeout(30)
def test_warmup_returns_when_a_slow_started_handler_delays_the_offer() -> None:
    """warmup_pool returns as soon as the worker is ready, even if worker:started is slow."""
    with IsoBox(pool={"min": 1, "max": 1}) as box:
        box.warmup_pool()
        box.on("worker:started", lambda _p: time.sleep(0.2))
        os.kill(box.pool_stats().workers[0].pid, signal.SIGKILL)
        time.sleep(0.05)
        started = time.monotonic()
        assert box.warmup_pool(timeout=5) == 1
        assert time.monotonic() - started < 2


@pytest.mark.timeout(30)
def test_spawn_timeouts_do_not_leak_pidfds() -> None:
    """Late SPAWNED replies for abandoned requests are closed, not kept."""
    client = ZygoteClient()
    client.start()
    try:
        before = _open_fds()
        assert client.pid is not None
        os.kill(client.pid, signal.SIGSTOP)
        for _ in range(3):
            with pytest.raises(isobox.IsoBoxError, match="in time"):
                client.spawn(timeout=0.2)
        os.kill(client.pid, signal.SIGCONT)
        time.sleep(1.0)
        assert _open_fds() <= before
    finally:
        client.stop()


@pytest.mark.timeout(30)
def test_failed_fork_server_start_is_quick() -> None:
    """A fork server that does not come up in time is reaped at once, not after 5 s."""
    client = ZygoteClient()
    started = time.monotonic()
    with pytest.raises(isobox.IsoBoxError, match="did not start"):
        client.start(timeout=0.001)
    assert time.monotonic() - started < 2.5
    assert _children() == []
