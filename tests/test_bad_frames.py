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
    "malformed call": encode_frame(MsgType.CALL, 1, {"cid": "x", "name": 5}),
    "call for another request": encode_frame(MsgType.CALL, 7, {"cid": 1, "name": "f",
                                                              "args": "[]"}),
    "stream values in a run": encode_frame(MsgType.ITEMS, 1, {"items": "[1]", "n": 1}),
}
# What a worker might send a stream consumer (request id 1, window 2).
BAD_STREAM = {
    "values beyond its credit": encode_frame(MsgType.ITEMS, 1, {"items": "[1,2,3]", "n": 3}),
    "malformed values": encode_frame(MsgType.ITEMS, 1, {"items": 5, "n": 1}),
    "negative count": encode_frame(MsgType.ITEMS, 1, {"items": "[]", "n": -1}),
    "values for another request": encode_frame(MsgType.ITEMS, 9, {"items": "[1]", "n": 1}),
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


def _plant(box: IsoBox, spawned: SpawnedWorker) -> None:
    """Hand the fake worker to the pool as if the fork server had made it."""
    pool = box._pool
    assert pool is not None
    handle = WorkerHandle(spawned, None, pool._zygote)
    with pool._lock:
        pool._handles[handle.pid] = handle
    pool._offer(handle)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(BAD_STREAM))
def test_bad_stream_frame_kills_and_reports(box: IsoBox, kind: str) -> None:
    """A worker that breaks the stream protocol (values past its credit, malformed batches)
    fails the stream with WorkerCrashedError and is killed; the box serves on."""
    proc, spawned = _fake_worker(BAD_STREAM[kind])
    _plant(box, spawned)
    with pytest.raises(isobox.WorkerCrashedError, match="bad frame"):
        list(box.run_stream("for (;;) yield 1", window=2))
    assert proc.wait(5) == -9
    _serves_again(box)


def _serves_again(box: IsoBox) -> None:
    """The box serves again once the killed peer's replacement is up."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            assert box.run("1 + 1") == 2
            return
        except isobox.WorkerCrashedError:
            time.sleep(0.05)
    assert box.run("1 + 1") == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_bad_frame_kills_and_reports(box: IsoBox, kind: str) -> None:
    """A bad frame during a run gives WorkerCrashedError, kills the peer, and the box serves on."""
    proc, spawned = _fake_worker(GARBAGE[kind])
    _plant(box, spawned)
    crashed: list[dict[str, object]] = []
    box.on("worker:crashed", crashed.append)
    with pytest.raises(isobox.WorkerCrashedError) as info:
        box.run("1 + 1", functions={"f": lambda: 1})
    assert info.value.pid == proc.pid
    assert "bad frame" in str(info.value)
    assert proc.wait(5) == -9
    assert crashed and crashed[0]["pid"] == proc.pid
    _serves_again(box)
    assert box.run("2 + 2") == 4
