"""The worker process's main loop: one channel, one engine, one request at a time.

::

    supervisor ──RUN──▶ worker: Engine.run() ──OUTPUT* CALL/REPLY*──▶ ──RESULT──▶ supervisor
                                 then Engine.prepare() (next context, off the request path)
    supervisor ──RUN op=stream──▶ pump within credit ──ITEMS*──▶ ◀──CREDIT* / CANCEL── RESULT

The worker owns nothing but its channel (a socket inherited from the fork server), its engine
and the session contexts the engine holds. EOF or SHUTDOWN ends it with exit code 0; a bad frame
ends it with exit code 3. It never imports the supervisor. Timeouts are the supervisor's
business: it SIGKILLs a worker past the deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import time
from collections import deque
from typing import Any

from isobox.protocol import Frame, FrameDecoder, MsgType, ProtocolError, encode_frame
from isobox.workers.confine import ConfinementRefused, confine
from isobox.workers.engine import Engine, EngineIO, RunOutcome, RunSpec, prelude_mode

__all__ = ["serve"]

EXIT_PROTOCOL = 3


class _ChannelGone(Exception):
    """EOF, SHUTDOWN or a bad frame: the worker must exit with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def reply_body(outcome: RunOutcome) -> dict[str, Any]:
    """The RESULT body of an outcome (also what in-process mode hands the API)."""
    body: dict[str, Any] = {
        "cpu_total": time.process_time(),  # the worker's CPU so far: the next run's baseline
        "kind": outcome.kind,
        "payload": outcome.payload,
        "console": outcome.console,
        "cpu_time": outcome.cpu_time,
        "memory": outcome.memory,
        "retire": outcome.retire,
    }
    if outcome.state is not None:
        body["state"] = outcome.state
    if outcome.dropped:
        body["dropped"] = True
    if outcome.violations:
        body["violations"] = outcome.violations
    if outcome.transpiled is not None:
        body["transpiled"] = outcome.transpiled
    if outcome.files is not None:
        body["files"] = outcome.files
    if outcome.outcomes is not None:
        body["outcomes"] = outcome.outcomes
    return body


def _result_frame(rid: int, outcome: RunOutcome) -> bytes:
    """The RESULT frame; one too large for the channel becomes a serialization error."""
    try:
        return encode_frame(MsgType.RESULT, rid, reply_body(outcome))
    except ProtocolError as exc:
        message = f"the result does not fit the channel: {exc}"
        small = RunOutcome("S", json.dumps({"message": message}), [], outcome.cpu_time,
                           outcome.memory, outcome.retire)
        return encode_frame(MsgType.RESULT, rid, reply_body(small))


class Channel(EngineIO):
    """The worker's socket, read frame by frame; also the engine's way to its host."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.buf = bytearray(1 << 20)  # reused: big values in few reads, no allocation per read
        self.view = memoryview(self.buf)
        self.frames: deque[Frame] = deque()
        self.control: deque[Frame] = deque()  # CREDIT / CANCEL seen while waiting for a REPLY
        self.rid = 0
        self.cid = 0
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def send(self, msg: MsgType, body: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(msg, self.rid, body))

    def next_frame(self, timeout: float | None) -> Frame | None:
        """The next frame, or None after ``timeout`` seconds (None: wait for ever)."""
        while not self.frames:
            if timeout is not None and not self.poller.poll(max(0.0, timeout) * 1000):
                return None
            size = self.sock.recv_into(self.buf)
            if not size:
                raise _ChannelGone(0)
            try:
                self.frames.extend(self.decoder.feed(self.view[:size]))
            except ProtocolError:
                raise _ChannelGone(EXIT_PROTOCOL) from None
        frame = self.frames.popleft()
        if frame.type is MsgType.SHUTDOWN:
            raise _ChannelGone(0)
        return frame

    # -- EngineIO --------------------------------------------------------------------------
    def output(self, lines: list[tuple[str, str]]) -> None:
        self.send(MsgType.OUTPUT, {"console": lines})

    def call(self, name: str, args: str) -> str:
        self.cid += 1
        cid = self.cid
        self.send(MsgType.CALL, {"cid": cid, "name": name, "args": args, "sync": True})
        while True:  # the supervisor's watchdog bounds this wait
            frame = self.next_frame(None)
            if frame is None:
                continue
            if (frame.type is MsgType.REPLY and frame.request_id == self.rid
                    and frame.body.get("cid") == cid):
                return str(frame.body.get("reply", "e{}"))
            self._stash(frame)

    def start_call(self, cid: int, name: str, args: str) -> None:
        self.send(MsgType.CALL, {"cid": -cid, "name": name, "args": args, "sync": False})

    def wait(self, timeout: float) -> list[tuple[int, str]]:
        replies: list[tuple[int, str]] = []
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next_frame(max(0.0, deadline - time.monotonic()) if not replies else 0)
            if frame is None:
                return replies
            if (frame.type is MsgType.REPLY and frame.request_id == self.rid
                    and isinstance(frame.body.get("cid"), int)):
                replies.append((-int(frame.body["cid"]), str(frame.body.get("reply", "e{}"))))
            else:
                self._stash(frame)

    def _stash(self, frame: Frame) -> None:
        """Keep a control frame of the current request for later; drop stale ones (a late
        REPLY, CREDIT or CANCEL of a request that already ended)."""
        if frame.type not in (MsgType.CREDIT, MsgType.CANCEL, MsgType.REPLY, MsgType.PING):
            raise _ChannelGone(EXIT_PROTOCOL)
        if frame.type is not MsgType.REPLY and frame.request_id == self.rid:
            self.control.append(frame)


def _stream(chan: Channel, engine: Engine, spec: RunSpec, window: int) -> RunOutcome:
    """Pump a stream within the consumer's credit until it ends or is cancelled."""
    credit = window
    deadline = time.monotonic() + spec.wall_timeout
    stream = engine.open_stream(spec, chan)
    while not stream.done:
        wait: float | None = 0.0 if credit > 0 else deadline - time.monotonic()
        cancelled = False
        while True:
            frame = chan.control.popleft() if chan.control else chan.next_frame(wait)
            if frame is None:
                break
            if frame.request_id != chan.rid:
                continue  # control of a stream that already ended
            if frame.type is MsgType.CREDIT:
                credit += int(frame.body.get("n", 0))
                wait = 0.0
            elif frame.type is MsgType.CANCEL:
                cancelled = True
                break
            elif frame.type is not MsgType.PING:
                chan._stash(frame)  # a stray REPLY is dropped; anything else is a bad frame
        if cancelled:
            stream.close()
            return RunOutcome("R", "undefined\nnull", stream.outcome.console
                              if stream.outcome else [])
        if credit <= 0:
            if time.monotonic() >= deadline:
                stream.close()
                return RunOutcome("W", "{}")
            continue
        items, count = stream.pump(credit)
        if count:
            chan.send(MsgType.ITEMS, {"items": items, "n": count})
            credit -= count
    return stream.outcome or RunOutcome("R", "undefined\nnull")


def _handle(chan: Channel, engine: Engine, body: dict[str, Any]) -> RunOutcome:
    for sid in body.get("drop", ()):
        engine.drop_session(str(sid))
    op = body.get("op", "run")
    fields = {k: v for k, v in body.items()
              if k not in ("op", "drop", "window", "map_items", "cpu_watch")}
    spec = RunSpec.from_body(fields)
    if op == "run":
        return engine.run(spec, chan)
    if op == "stream":
        return _stream(chan, engine, dataclasses.replace(spec, stream=True),
                       max(1, int(body.get("window", 256))))
    if op == "state":
        return engine.session_state(spec)
    if op == "map":
        items = body.get("map_items")
        if not isinstance(items, list) or not all(
                isinstance(i, list) and len(i) == 2 for i in items):
            raise TypeError("map_items must be [[globals_json, tagged], ...]")
        return engine.run_chunk(spec, items, chan)
    if op == "drop":
        return RunOutcome("R", "undefined\nnull")
    raise TypeError(f"unknown op {op!r}")


def serve(sock: socket.socket, engine: Engine, confinement: dict[str, Any] | None = None) -> int:
    """Answer frames until EOF or SHUTDOWN; returns the process exit code."""
    chan = Channel(sock)
    sock.sendall(encode_frame(MsgType.READY, 0, {"pid": os.getpid(), "cpu": time.process_time(),
                                                 "confinement": confinement or {},
                                                 "prelude": prelude_mode()}))
    try:
        while True:
            frame = chan.control.popleft() if chan.control else chan.next_frame(None)
            if frame is None or frame.type in (MsgType.CREDIT, MsgType.CANCEL, MsgType.REPLY):
                continue  # left over from a request that already ended
            if frame.type is MsgType.PING:
                sock.sendall(encode_frame(MsgType.PONG, frame.request_id, {}))
                continue
            if frame.type is not MsgType.RUN:
                return EXIT_PROTOCOL
            chan.rid = frame.request_id
            try:
                outcome = _handle(chan, engine, frame.body)
            except TypeError:
                return EXIT_PROTOCOL
            if outcome.retire and engine.session_count:
                # Fresh contexts are freed after every run anyway; retiring would cost the
                # sessions this worker holds their closures, so it stays.
                outcome.retire = False
            sock.sendall(_result_frame(chan.rid, outcome))
            if outcome.retire:
                return 0
            # The reply's wakeup tends to put the caller on this CPU; step aside so it runs
            # now instead of after the next context is built (measured: 770 -> 85 us).
            os.sched_yield()
            engine.prepare()
    except _ChannelGone as gone:
        return gone.code


EXIT_UNCONFINED = 5


def worker_main(fd: int, *, strict: bool = True) -> None:
    """Entry point in a freshly forked child: confine, prepare, serve, exit. A worker that
    could not be confined says why in its READY frame and exits (strict mode)."""
    code = 1
    try:
        try:
            report = confine(fd, strict=strict).body()
        except ConfinementRefused as exc:
            with socket.socket(fileno=fd) as sock:
                sock.sendall(encode_frame(MsgType.READY, 0, {"pid": os.getpid(),
                                                             "refused": str(exc)}))
            code = EXIT_UNCONFINED
            return
        sock = socket.socket(fileno=fd)
        engine = Engine()
        engine.prepare()
        code = serve(sock, engine, report)
    except BaseException:
        code = 1
    finally:
        os._exit(code)
