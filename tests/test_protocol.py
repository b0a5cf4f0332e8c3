"""The wire protocol: framing, caps, strict decoding, and a decoder that dies on bad input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isobox.protocol import (
    MAX_FRAME,
    VERSION,
    Frame,
    FrameDecoder,
    MsgType,
    ProtocolError,
    encode_frame,
)


def test_round_trip_of_one_frame() -> None:
    """A frame decodes to the type, request id and body it was encoded with."""
    data = encode_frame(MsgType.RUN, 7, {"code": "1+2", "n": [1, 2.5, None, b"\x00"]})
    assert FrameDecoder().feed(data) == [Frame(MsgType.RUN, 7, {"code": "1+2", "n": [1, 2.5, None, b"\x00"]})]


def test_frames_split_at_every_byte_reassemble() -> None:
    """Bytes fed one at a time still yield whole frames, in order."""
    data = encode_frame(MsgType.OUTPUT, 1, {"a": 1}) + encode_frame(MsgType.RESULT, 1, {"b": 2})
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(data)):
        frames.extend(decoder.feed(data[i : i + 1]))
    assert [f.type for f in frames] == [MsgType.OUTPUT, MsgType.RESULT]
    assert decoder.buffered == 0


def test_encoding_over_the_cap_is_refused() -> None:
    """The encoder refuses a frame larger than its cap instead of sending it."""
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        encode_frame(MsgType.RUN, 1, {"code": "x" * 2000}, max_frame=1000)


def test_announced_length_over_the_cap_kills_the_decoder() -> None:
    """A header announcing more than the cap fails at once, before the bytes arrive."""
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        decoder.feed(struct.pack(">I", 1025))
    assert decoder.dead


def test_dead_decoder_stays_dead() -> None:
    """After one bad frame every later feed raises, even with good bytes."""
    decoder = FrameDecoder()
    bad = msgpack.packb([VERSION, 99, 1, {}])
    with pytest.raises(ProtocolError, match="unknown frame type"):
        decoder.feed(struct.pack(">I", len(bad)) + bad)
    with pytest.raises(ProtocolError, match="dead"):
        decoder.feed(encode_frame(MsgType.PING, 1, {}))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([2, 2, 1, {}], "version"),
        ([VERSION, 2, -1, {}], "request id"),
        ([VERSION, 2, 1, []], "body"),
        ([VERSION, 2, 1], "4-element"),
        ({"a": 1}, "4-element"),
        ([VERSION, "2", 1, {}], "type"),
        ([True, 2, 1, {}], "version"),
    ],
)
def test_malformed_shapes_are_rejected(payload: object, reason: str) -> None:
    """Each field of the frame is checked for type and range."""
    raw = msgpack.packb(payload)
    with pytest.raises(ProtocolError, match=reason):
        FrameDecoder().feed(struct.pack(">I", len(raw)) + raw)


def test_non_string_map_keys_are_rejected() -> None:
    """strict_map_key: a body with integer keys is a bad frame."""
    raw = msgpack.packb([VERSION, 2, 1, {1: "x"}])
    with pytest.raises(ProtocolError, match="undecodable"):
        FrameDecoder().feed(struct.pack(">I", len(raw)) + raw)


def test_trailing_bytes_inside_a_frame_are_rejected() -> None:
    """A frame whose payload holds more than one msgpack object is bad."""
    raw = msgpack.packb([VERSION, 2, 1, {}]) + b"\x00"
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(raw)) + raw)


def test_extension_types_are_rejected() -> None:
    """msgpack ext types (a route to custom deserialisation) are not accepted."""
    raw = msgpack.packb([VERSION, 2, 1, {"x": msgpack.ExtType(1, b"abc")}])
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(raw)) + raw)


def test_default_cap_is_above_value_caps() -> None:
    """The frame cap leaves room for a 64 MiB value plus envelope."""
    assert MAX_FRAME > 64 * 2**20


def _feed_all(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=1 << 16)
    try:
        decoder.feed(data)
    except ProtocolError:
        assert decoder.dead


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    """Random bytes either decode or raise ProtocolError, never anything else."""
    _feed_all(data)


@settings(max_examples=400, deadline=None)
@given(
    st.integers(min_value=0, max_value=200),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=0, max_value=40),
)
def test_fuzz_mutated_valid_frames_raise_only_protocol_error(pos: int, byte: int, cut: int) -> None:
    """A valid frame with one byte changed, or truncated, never raises a foreign error."""
    frame = bytearray(encode_frame(MsgType.RESULT, 3, {"kind": "R", "payload": "1", "console": [["log", "x"]]}))
    frame[pos % len(frame)] = byte
    _feed_all(bytes(frame[: max(1, len(frame) - cut)]))


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
))
def test_fuzz_random_bodies_round_trip(value: object) -> None:
    """Any msgpack-able body survives a round trip through encode and decode."""
    frame = FrameDecoder().feed(encode_frame(MsgType.RESULT, 1, {"v": value}))[0]
    assert frame.body == {"v": value}
