"""Hostile clients on raw sockets: garbage, oversized length headers, half frames, no HELLO,
protocol abuse. Each is dropped (the daemon closes its connection) while a well-behaved client
on another connection keeps getting correct results, during and after. --frame-timeout is 1s.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from daemon_helpers import Background, Daemon, Raw, no_new_processes, wait_until

from isobox import IsoBox
from isobox.protocol import MsgType, encode_frame

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(scope="module")
def hostile_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with a 1s frame timeout for the whole module."""
    folder = tmp_path_factory.mktemp("hostile") / "s"
    folder.mkdir(mode=0o700)
    path = str(folder / "d.sock")
    daemon = Daemon(folder, ["--socket", path, "--workers", "2", "--min-workers", "2",
                             "--frame-timeout", "1", "--grace", "2"], socket_path=path)
    with no_new_processes(), daemon.serving():
        yield daemon


@pytest.fixture(scope="module")
def good(hostile_daemon: Daemon) -> IsoBox:
    """The well-behaved client, connected for the whole module."""
    return hostile_daemon.box(timeout=5)


def serves(box: IsoBox, rounds: int = 3) -> None:
    """The well-behaved client gets correct answers."""
    for i in range(rounds):
        assert box.run("x * 3", sandbox={"x": i}) == i * 3


def connect(daemon: Daemon) -> Raw:
    return daemon.raw(timeout=5)


def framed(obj: object) -> bytes:
    """``obj`` packed with msgpack behind a correct length header."""
    payload: bytes = msgpack.packb(obj)
    return struct.pack(">I", len(payload)) + payload


@pytest.mark.parametrize("garbage", [
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",  # a length header of ~1.2 GB
    b"\x00\x00\x00\x04abcd",  # undecodable payload
    framed({"a": 1}),  # not a 4-element array
    framed([9, MsgType.HELLO, 0, {}]),  # wrong protocol version
    framed([1, 99, 0, {}]),  # unknown frame type
    framed([1, MsgType.HELLO, -1, {}]),  # negative request id
    framed([1, MsgType.HELLO, 0, ["token"]]),  # body not a map
    framed([1, MsgType.HELLO, 0, {1: "x"}]),  # non-string map key
], ids=["http", "undecodable", "not-an-array", "version", "type", "request-id", "body",
        "map-key"])
def test_garbage_is_dropped(hostile_daemon: Daemon, good: IsoBox, garbage: bytes) -> None:
    """Bytes that are not a valid frame get the connection closed; nothing else changes."""
    raw = connect(hostile_daemon)
    try:
        raw.send(garbage)
        serves(good)
        assert raw.dropped(5)
    finally:
        raw.close()
    serves(good)
    assert hostile_daemon.alive()


def test_huge_length_header_is_dropped_without_waiting(hostile_daemon: Daemon,
                                                       good: IsoBox) -> None:
    """A length header above the frame cap is refused as soon as it is read (the log names
    the cap), before HELLO and after it."""
    raw = connect(hostile_daemon)
    try:
        raw.send(b"\xff\xff\xff\xff" + b"\x00" * 16)
        assert raw.dropped(5)
    finally:
        raw.close()
    raw = connect(hostile_daemon)
    try:
        assert raw.hello().type is MsgType.WELCOME
        raw.send(struct.pack(">I", 2**31))
        assert raw.dropped(5)
    finally:
        raw.close()
    assert hostile_daemon.wait_log("frame of 4294967295 bytes exceeds the cap")
    assert hostile_daemon.wait_log("frame of 2147483648 bytes exceeds the cap")
    serves(good)


def test_half_a_frame_then_stall_is_dropped(hostile_daemon: Daemon, good: IsoBox) -> None:
    """A client that sends half a RUN frame and stalls is dropped after the frame timeout;
    the good client runs normally while it stalls and after."""
    raw = connect(hostile_daemon)
    try:
        assert raw.hello().type is MsgType.WELCOME
        frame = encode_frame(MsgType.RUN, 1, {"body": {"code": "1", "wall_timeout": 5.0}})
        raw.send(frame[: len(frame) // 2])
        serves(good, 5)  # while it stalls
        assert raw.dropped(6)
    finally:
        raw.close()
    assert hostile_daemon.wait_log("stalled in the middle of a frame")
    serves(good)


def test_client_without_hello_is_dropped(hostile_daemon: Daemon, good: IsoBox) -> None:
    """Connections that never send HELLO (or send a partial one) are dropped after the frame
    timeout; many at once do not disturb the good client."""
    silent = [connect(hostile_daemon) for _ in range(20)]
    partial = connect(hostile_daemon)
    try:
        partial.send(encode_frame(MsgType.HELLO, 0, {"token": ""})[:6])
        serves(good, 5)
        assert partial.dropped(6)
        assert all(raw.dropped(6) for raw in silent)
    finally:
        for raw in [*silent, partial]:
            raw.close()
    serves(good)


def test_first_frame_must_be_hello(hostile_daemon: Daemon, good: IsoBox) -> None:
    """A RUN before HELLO is not run: the connection is dropped."""
    runs = hostile_daemon.stats()["runs"]
    raw = connect(hostile_daemon)
    try:
        raw.frame(MsgType.RUN, 1, {"body": {"code": "1", "wall_timeout": 5.0}})
        assert raw.dropped(5)
    finally:
        raw.close()
    assert hostile_daemon.wait_log("the first frame must be HELLO")
    assert hostile_daemon.stats()["runs"] == runs
    serves(good)


@pytest.mark.parametrize("msg", [MsgType.RESULT, MsgType.READY, MsgType.SPAWN, MsgType.HELLO,
                                 MsgType.WELCOME])
def test_frames_a_client_never_sends_drop_it(hostile_daemon: Daemon, good: IsoBox,
                                             msg: MsgType) -> None:
    """After HELLO, a frame type only daemons or workers send drops the connection."""
    raw = connect(hostile_daemon)
    try:
        assert raw.hello().type is MsgType.WELCOME
        raw.frame(msg, 1, {})
        assert raw.dropped(5)
    finally:
        raw.close()
    serves(good)


def test_reused_request_id_drops_the_client_and_cancels_its_run(hostile_daemon: Daemon,
                                                                good: IsoBox) -> None:
    """Two RUNs with one request id in flight: the connection is dropped and its running
    request cancelled (its worker freed), not left to run to its timeout."""
    raw = connect(hostile_daemon)
    try:
        assert raw.hello().type is MsgType.WELCOME
        raw.frame(MsgType.RUN, 7, {"body": {"code": "while (true) {}", "wall_timeout": 15.0}})
        assert wait_until(hostile_daemon.busy_workers, 5)
        raw.frame(MsgType.RUN, 7, {"body": {"code": "1", "wall_timeout": 5.0}})
        assert raw.dropped(5)
    finally:
        raw.close()
    assert hostile_daemon.wait_log("already in flight")
    assert wait_until(lambda: not hostile_daemon.busy_workers(), 5)
    serves(good)


def test_bad_bodies_are_refused_but_the_connection_lives(hostile_daemon: Daemon) -> None:
    """RUN bodies that fail the daemon's checks get an ERROR (DaemonError) for that request;
    stray REPLY and CANCEL frames are ignored; the same connection then runs code."""
    raw = connect(hostile_daemon)
    try:
        assert raw.hello().type is MsgType.WELCOME
        bad: list[dict[str, Any]] = [
            {"body": "1+1"}, {}, {"body": {"code": "1", "wall_timeout": 5.0, "op": "drop"}},
            {"body": {"code": "1", "wall_timeout": 5.0, "session": "someone-else"}},
            {"body": {"code": "1", "wall_timeout": 1e9}},
            {"body": {"code": "1", "wall_timeout": 5.0, "memory_limit": 2**40}},
            {"body": {"code": "1", "wall_timeout": 5.0, "evil": True}}]
        for rid, body in enumerate(bad, start=1):
            raw.frame(MsgType.RUN, rid, body)
            answer = raw.answer(rid)
            assert answer.type is MsgType.ERROR, body
            assert answer.body["error"]["type"] == "DaemonError"
        raw.frame(MsgType.REPLY, 99, {"cid": 12345, "reply": "j1"})
        raw.frame(MsgType.CANCEL, 98, {})
        raw.frame(MsgType.RUN, 50, {"body": {"code": "20 + 22", "wall_timeout": 5.0}})
        answer = raw.answer(50)
        assert answer.type is MsgType.RESULT
        assert answer.body["reply"]["kind"] == "R"
        assert answer.body["reply"]["payload"].endswith("42")
        raw.frame(MsgType.PING, 51, {})
        assert raw.answer(51, MsgType.PONG).type is MsgType.PONG
    finally:
        raw.close()


def test_a_client_that_never_reads_does_not_block_others(hostile_daemon: Daemon,
                                                         good: IsoBox) -> None:
    """A client that sends runs with large console output and never reads its socket only
    fills its own buffers: the good client keeps working."""
    raw = connect(hostile_daemon)
    try:
        assert raw.hello().type is MsgType.WELCOME
        noisy = "for (let i = 0; i < 2000; i++) console.log('x'.repeat(400)); 1"
        for rid in range(1, 5):
            raw.frame(MsgType.RUN, rid, {"body": {"code": noisy, "wall_timeout": 10.0}})
        call = Background(lambda: serves(good, 5))
        call.result(15)
    finally:
        raw.close()
    serves(good)


def test_trickling_client_is_dropped_after_the_frame_timeout(hostile_daemon: Daemon) -> None:
    """A client that sends a HELLO one byte every 0.4s (never finishing within the 1s frame
    timeout) is dropped within a few seconds."""
    raw = connect(hostile_daemon)
    frame = encode_frame(MsgType.HELLO, 0, {"token": "x" * 200})
    dropped = False
    try:
        for i in range(12):  # ~4.8s, well past the 1s frame timeout
            try:
                raw.send(frame[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
            if raw.dropped(0.4):
                dropped = True
                break
    finally:
        raw.close()
    assert dropped, "a client still inside its first frame after ~5s was kept"


def test_oversized_hello_is_refused_before_buffering(hostile_daemon: Daemon) -> None:
    """A first frame announcing megabytes (a HELLO is a few bytes) is refused at once: the
    sender cannot push 8 MiB into the daemon before authenticating."""
    raw = connect(hostile_daemon)
    refused = False
    try:
        raw.send(struct.pack(">I", 64 * 2**20))
        chunk = b"\x00" * 2**16
        for _ in range(128):  # 8 MiB
            try:
                raw.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                refused = True
                break
    finally:
        raw.close()
    assert refused, "the daemon accepted 8 MiB from a client that had not authenticated"
