"""The fork server: workers come from it, die with it, and a dead one is replaced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import cast

import psutil
import pytest

import isobox
from isobox import IsoBox


def _wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return alive


@pytest.mark.timeout(60)
def test_workers_are_children_of_the_fork_server_not_the_caller() -> None:
    """Workers are forked from the fork server; the caller's only child is the fork server."""
    with IsoBox(pool={"min": 2, "max": 2}) as box:
        box.warmup_pool()
        assert box._pool is not None
        server = box._pool._zygote.pid
        me = psutil.Process()
        assert [c.pid for c in me.children()] == [server]
        for worker in box.pool_stats().workers:
            assert psutil.Process(worker.pid).ppid() == server


@pytest.mark.timeout(60)
def test_confinement_of_a_worker() -> None:
    """A worker has an empty environment, only its channel and stdio open, cwd /, no core."""
    with IsoBox(pool={"min": 1, "max": 1}) as box:
        box.warmup_pool()
        pid = box.pool_stats().workers[0].pid
        proc = psutil.Process(pid)
        assert proc.environ() == {}
        assert proc.cwd() == "/"
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
        assert fds[:3] == [0, 1, 2]
        assert len(fds) <= 5  # stdio, the channel, and the engine's own (epoll or none)
        for std in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{std}") == "/dev/null"
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]
        assert proc.pid == os.getpgid(pid) == os.getsid(pid)  # a session of its own


@pytest.mark.timeout(60)
def test_killed_fork_server_takes_its_workers_and_is_replaced() -> None:
    """SIGKILL of the fork server kills its workers; the box starts a new one and serves."""
    with IsoBox(pool={"min": 2, "max": 2}) as box:
        box.warmup_pool()
        assert box._pool is not None
        server = cast(int, box._pool._zygote.pid)  # the warmed-up pool's fork server runs
        old = [w.pid for w in box.pool_stats().workers]
        os.kill(server, signal.SIGKILL)
        assert _wait_gone(old) == []
        deadline = time.monotonic() + 20
        while True:
            try:
                assert box.run("6 * 7") == 42
                break
            except isobox.WorkerCrashedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert box._pool._zygote.pid != server
        deadline = time.monotonic() + 5  # the maintainer drops the dead handles on its own
        while set(old) & {w.pid for w in box.pool_stats().workers}:
            assert time.monotonic() < deadline
            time.sleep(0.02)
