"""A worker that speaks garbage is killed, classified, and replaced; the box keeps serving.

The misbehaving peer is a real process on a real socketpair, handed to the pool in place of a
forked worker (the only way to make a worker send bytes the real one never would).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import isobox
from isobox import IsoBox
from isobox.protocol import MsgType, encode_frame
from isobox.supervisor.handle import WorkerHandle
from isobox.supervisor.zygote import SpawnedWorker

GARBAGE = {
    "not msgpack": b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1",
    "wrong version": encode_frame(MsgType.RESULT, 1, {})[:5] + b"\x09" + encode_frame(
        MsgType.RESULT, 1, {})[6:],
    "oversized header": b"\xff\xff\xff\xff",
    "wrong request id": encode_frame(MsgType.RESULT, 999, {"kind": "R", "payload": "x\n1"}),
    "unexpected type": encode_frame(MsgType.READY, 1, {}),
}


def _fake_worker(reply: bytes) -> tuple[subprocess.Popen[bytes], SpawnedWorker]:
    """A process that reads one request, answers ``reply``, then waits to be killed."""
    ours, theirs = socket.socketpair()
    script = ("import os, socket, sys, time\n"
              "s = socket.socket(fileno=int(sys.argv[1]))\n"
              "s.recv(65536)\n"
              f"s.sendall({reply!r})\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(theirs.fileno())],
                            pass_fds=[theirs.fileno()])
    theirs.close()
    return proc, SpawnedWorker(proc.pid, os.pidfd_open(proc.pid), ours)


@pytest.fixture
def box() -> Iterator[IsoBox]:
    with IsoBox(timeout=5.0, pool={"min": 0, "max": 1}) as b:
        yield b


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_bad_frame_kills_and_reports(box: IsoBox, kind: str) -> None:
    """A bad frame during a run gives WorkerCrashedError, kills the peer, and the box serves on."""
    proc, spawned = _fake_worker(GARBAGE[kind])
    pool = box._pool
    assert pool is not None
    handle = WorkerHandle(spawned, None, pool._zygote)
    with pool._lock:
        pool._handles[handle.pid] = handle
    pool._offer(handle)
    crashed: list[dict[str, object]] = []
    box.on("worker:crashed", crashed.append)
    with pytest.raises(isobox.WorkerCrashedError) as info:
        box.run("1 + 1")
    assert info.value.pid == proc.pid
    assert "bad frame" in str(info.value)
    assert proc.wait(5) == -9
    assert crashed and crashed[0]["pid"] == proc.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            assert box.run("1 + 1") == 2
            break
        except isobox.WorkerCrashedError:
            time.sleep(0.05)
    assert box.run("2 + 2") == 4
