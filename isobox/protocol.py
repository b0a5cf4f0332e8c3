"""Wire protocol between supervisor and workers (sans-IO).

::

    frame := length:uint32 big-endian | msgpack([version, type, request_id, body])

    supervisor                         worker
        | <------------- READY -------------- |   once, after start-up and confinement
        | -------------- RUN ---------------> |   body "op": run | stream | state | drop
        | <------------- OUTPUT ------------- |   zero or more, while the run goes on
        | <------------- CALL --------------- |   a host function call {"cid", "name", "args"}
        | -------------- REPLY -------------> |   its answer {"cid", "reply"}
        | <------------- ITEMS -------------- |   stream values {"items", "n"}, within credit
        | -------------- CREDIT ------------> |   the consumer took {"n"} more values
        | -------------- CANCEL ------------> |   the consumer left: run return(), then RESULT
        | <------------- RESULT | ERROR ----- |   exactly one per RUN
        | -------------- PING --------------> |
        | <------------- PONG --------------- |
        | -------------- SHUTDOWN ----------> |   worker exits 0; EOF means the same

    client                             daemon (isobox-supervisor; the same frames)
        | -------------- HELLO -------------> |   {"token"}: the first frame, or the link drops
        | <------------- WELCOME | ERROR ---- |
        | -------------- RUN ---------------> |   {"body": a run body}; many may be in flight
        | <------------- OUTPUT / CALL ------ |   as from a worker, under the client's id
        | -------------- REPLY / CANCEL ----> |
        | <------------- RESULT | ERROR ----- |   {"reply", "pid"} or {"error"}
        | -------------- STATS -------------> |   answered by RESULT {"stats"}
        | -------------- API ---------------> |   {"op": "stream" | "session.*"}: RESULT
        | <------------- ITEMS -------------- |   stream values within the client's CREDIT
        | <------------- EVENT -------------- |   worker:started / crashed / recycled

    supervisor                         fork server (one SOCK_SEQPACKET message per frame)
        | <------------- READY -------------- |   preloaded, ready to fork
        | -------------- SPAWN + fd --------> |   fd: the worker's end of a new socketpair
        | <------------- SPAWNED + pidfd ---- |
        | <------------- EXITED ------------- |   {"pid", "status"}: it reaped a worker

Every frame is capped in size (:data:`MAX_FRAME`), decoded with ``strict_map_key`` and explicit
length limits, and checked for shape. The body is always a dict with ``str`` keys. No pickle.
A :class:`FrameDecoder` that raised is dead: every later call raises again, and the owner must
drop the channel and kill the peer. This module imports only the stdlib and msgpack, so both
sides (and the fork server) can use it cheaply.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "MAX_FRAME",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "MsgType",
    "ProtocolError",
    "encode_frame",
]

VERSION = 1
MAX_FRAME = 96 * 2**20  # above the 64 MiB default value caps, so caps trip before the frame cap
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame was malformed, too large, or of the wrong version; the channel is dead."""


class MsgType(enum.IntEnum):
    """Frame types; see the module diagram for who sends which."""

    READY = 1
    RUN = 2
    OUTPUT = 3
    RESULT = 4
    ERROR = 5
    PING = 6
    PONG = 7
    SHUTDOWN = 8
    SPAWN = 9  # supervisor -> fork server, with the worker's channel fd attached
    SPAWNED = 10  # fork server -> supervisor: {"pid"}, with a pidfd attached
    EXITED = 11  # fork server -> supervisor: {"pid", "status"} once it reaped a worker
    CALL = 12  # worker -> supervisor: a host function call
    REPLY = 13  # supervisor -> worker: a host function's answer
    ITEMS = 14  # worker -> supervisor: a batch of stream values
    CREDIT = 15  # supervisor -> worker: room for more stream values
    CANCEL = 16  # supervisor -> worker: stop the stream; client -> daemon: give up a request
    HELLO = 17  # client -> daemon: {"token"} first frame of a remote connection
    WELCOME = 18  # daemon -> client: {"pid", "client"} the connection is accepted
    STATS = 19  # client -> daemon: pool and daemon figures, answered by a RESULT
    API = 20  # client -> daemon: a stream or a session operation {"op", ...}
    EVENT = 21  # daemon -> client: a worker event {"name", "payload"} (request id 0)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded message."""

    type: MsgType
    request_id: int
    body: dict[str, Any]


def encode_frame(
    msg_type: MsgType, request_id: int, body: dict[str, Any], *, max_frame: int = MAX_FRAME
) -> bytes:
    """Encode one frame; raises :class:`ProtocolError` if it would exceed ``max_frame``."""
    # Strings may hold lone surrogates (JS strings can): both ends pass them through.
    payload: bytes = msgpack.packb([VERSION, int(msg_type), request_id, body], use_bin_type=True,
                                   unicode_errors="surrogatepass")
    if len(payload) > max_frame:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the cap of {max_frame}")
    return _HEADER.pack(len(payload)) + payload


def _check_shape(obj: object) -> Frame:
    if not isinstance(obj, list) or len(obj) != 4:
        raise ProtocolError("frame is not a 4-element array")
    version, msg_type, request_id, body = obj
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r}")
    if type(msg_type) is not int:
        raise ProtocolError("frame type is not an integer")
    try:
        kind = MsgType(msg_type)
    except ValueError:
        raise ProtocolError(f"unknown frame type {msg_type}") from None
    if type(request_id) is not int or not 0 <= request_id < 2**63:
        raise ProtocolError("request id is not a non-negative integer")
    if not isinstance(body, dict):
        raise ProtocolError("frame body is not a map")
    return Frame(kind, request_id, body)


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes, get whole frames back."""

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame  # may be raised later (the daemon, after authentication)
        self._buffer = bytearray()
        self._dead: str | None = None

    @property
    def dead(self) -> bool:
        """True once a bad frame was seen; the channel must be dropped."""
        return self._dead is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """Add received bytes; return the frames completed by them, in order."""
        if self._dead is not None:
            raise ProtocolError(f"decoder is dead: {self._dead}")
        self._buffer += data
        frames: list[Frame] = []
        try:
            while len(self._buffer) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buffer)
                if length > self.max_frame:
                    raise ProtocolError(f"frame of {length} bytes exceeds the cap")
                end = _HEADER.size + length
                if len(self._buffer) < end:
                    break
                payload = bytes(self._buffer[_HEADER.size : end])
                del self._buffer[:end]
                frames.append(_check_shape(self._unpack(payload)))
        except ProtocolError as exc:
            self._dead = str(exc)
            self._buffer.clear()
            raise
        return frames

    def _unpack(self, payload: bytes) -> Any:
        limit = len(payload)
        try:
            return msgpack.unpackb(
                payload,
                raw=False,
                unicode_errors="surrogatepass",
                strict_map_key=True,
                use_list=True,
                max_str_len=limit,
                max_bin_len=limit,
                max_array_len=limit,
                max_map_len=limit,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises several unrelated types; all mean "bad frame"
            raise ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
