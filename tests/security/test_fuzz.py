"""Hypothesis fuzzing of IsoBox's three trust boundaries, on real engines and real processes.

1. **Values** (README "The value table"): random Python values cross into the sandbox as
   ``sandbox={"v": value}`` and come back from ``box.run("v")``, and also go JS -> Python ->
   JS as the argument and result of a host function (``echo(v)``), in both modes.
2. **The wire** (``isobox/protocol.py``, ``supervisor/pool.py``): the pool is handed an
   impostor, a real worker forked by the box's own fork server whose channel end is held by this
   test instead of the pool; the test answers the pool's RUN request with random bytes, random
   frames (``encode_frame`` with random types, request ids and msgpack bodies) and mutations of
   them. The pool reads a real socketpair and kills and classifies a real process by its pidfd.
3. **Programs**: random JS from a small grammar (expressions, loops with bounds up to infinite,
   allocations, recursion, try/catch/throw, promises, timers) under tight limits, in both modes.

Every property is "a value or a typed ``IsoBoxError``, never anything else, never a hang, and the
box serves on". The bugs these tests found (non-string keys, RESULT and ITEMS bodies a real
worker never sends, big ints, Invalid Date arguments, deep nesting, slow native loops past the
CPU budget) are fixed; their ``@example`` cases keep them fixed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

import isobox
from isobox import IsoBox
from isobox.protocol import MAX_FRAME, Frame, FrameDecoder, MsgType, ProtocolError, encode_frame
from isobox.supervisor.handle import WorkerHandle
from isobox.supervisor.pool import Pool
from isobox.supervisor.zygote import SpawnedWorker

S = st.SearchStrategy
MODES = ["process", "inprocess"]
FIXTURES = [HealthCheck.function_scoped_fixture]
# The pool's maintainer thread draws from the global `random` (jittered max_runs) whenever it
# replaces a worker, and Hypothesis notices the global state move while it generates an example.
_RANDOM_IN_BACKGROUND = pytest.mark.filterwarnings(
    "ignore::hypothesis.errors.HypothesisDeprecationWarning")


@pytest.fixture(scope="module")
def boxes() -> Iterator[dict[str, IsoBox]]:
    """One box per mode, shared by groups 1 and 3."""
    with IsoBox(timeout=5.0, pool={"min": 2, "max": 2}, typescript="lazy") as process_box, \
            IsoBox(mode="inprocess", timeout=5.0) as local_box:
        process_box.warmup_pool()
        yield {"process": process_box, "inprocess": local_box}


def _serves(box: IsoBox) -> None:
    """The box still runs code (a real worker, or the in-process engine)."""
    assert box.run("1 + 2") == 3


# =============================================================================================
# 1. Values through the boundary
# =============================================================================================

class _Unrepresentable(Exception):
    """The value cannot come back as a Python value (a date outside years 1..9999 in UTC)."""


_MS = timedelta(milliseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SPECIAL_KEYS = ["__proto__", "$isobox", "constructor", "toJSON", "prototype", "hasOwnProperty",
                 "v", "length", "0", "", "$isobox\x00", "__proto__ "]
_ODD_CHARS = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\u2028", "\ufeff", "\U0001f600"]

def _view(data: bytes) -> memoryview:
    return memoryview(data)


texts = st.text(alphabet=st.characters(exclude_categories=()) | st.sampled_from(_ODD_CHARS),
                max_size=12)
offsets = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
datetimes = st.datetimes(timezones=st.none() | st.just(UTC) | offsets)
scalars: S[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53) - 2, max_value=2**53 + 2),  # around the number/BigInt edge
    st.integers(min_value=-(2**4000), max_value=2**4000),  # BigInts (1,205 digits at most)
    st.floats(),  # NaN, +-inf, -0.0, subnormals, integral floats beyond 2**53
    texts,
    st.binary(max_size=32),
    st.binary(max_size=8).map(bytearray),
    st.binary(max_size=8).map(_view),
    datetimes,
)
keys = st.sampled_from(_SPECIAL_KEYS) | texts
values: S[Any] = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


def _expected(value: Any) -> Any:
    """What ``value`` comes back as, per the value table: tuples as lists, bytes-likes as bytes,
    integral numbers up to 2**53 as ints (so -0.0 is 0), other floats as floats, every datetime
    as an aware one in UTC truncated to the millisecond (a naive one is taken as UTC)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) <= 2**53:
            return int(value)
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        try:
            return _EPOCH + ((aware - _EPOCH) // _MS) * _MS
        except OverflowError:
            raise _Unrepresentable from None
    if isinstance(value, list | tuple):
        return [_expected(v) for v in value]
    if isinstance(value, dict):
        return {k: _expected(v) for k, v in value.items()}
    raise AssertionError(f"not a table value: {value!r}")


def _same(got: Any, want: Any) -> bool:
    """Equality that also checks types (True is not 1, 1.0 is not 1), treats NaN as equal to
    NaN, and wants datetimes in UTC."""
    if type(got) is not type(want):
        return False
    if isinstance(want, float):
        return (math.isnan(got) and math.isnan(want)) or got == want
    if isinstance(want, datetime):
        return bool(got == want and got.tzinfo == UTC)
    if isinstance(want, list):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return bool(got == want)


def _echo(x: Any) -> Any:
    return x


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURES)
@given(value=values)
@example(value={"__proto__": {"a": 1}, "$isobox": "big", "v": "5", "constructor": 2})
@example(value=[float("nan"), -0.0, float("inf"), 2**53, 2**53 + 1, -(2**64), 1e300])
@example(value=["\ud800\x00\udfff", b"\x00\xff", datetime(2000, 1, 1, 1, 1, 1, 123456), (1, 2)])
@example(value=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))))  # year 0 in UTC
def test_values_round_trip_through_the_sandbox(
        boxes: dict[str, IsoBox], mode: str, value: Any) -> None:
    """``run("v", sandbox={"v": value})`` gives the value back (as the table converts it); a
    datetime that is outside years 1..9999 once in UTC gives a SerializationError."""
    box = boxes[mode]
    try:
        want = _expected(value)
    except _Unrepresentable:
        with pytest.raises(isobox.SerializationError):
            box.run("v", sandbox={"v": value})
        return
    got = box.run("v", sandbox={"v": value})
    assert _same(got, want), (got, want)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURES)
@given(value=values)
@example(value={"__proto__": None, "$isobox": {"$isobox": "date", "v": 0}, "toJSON": 1})
@example(value=[float("nan"), -0.0, -(2**53) - 1, "\udfff", bytearray(b"\x00"), (None, True)])
def test_values_round_trip_through_a_host_function(
        boxes: dict[str, IsoBox], mode: str, value: Any) -> None:
    """``echo(v)`` takes the value from JS to Python as an argument and back as a result: it
    arrives as it would from ``run("v")``. A date that cannot become a Python datetime makes
    the call throw a TypeError in JS, uncaught here (README, host functions; see also
    test_unconvertible_host_argument_is_a_js_type_error)."""
    box = boxes[mode]
    try:
        want = _expected(value)
    except _Unrepresentable:
        with pytest.raises(isobox.ScriptError) as info:
            box.run("echo(v)", sandbox={"v": value}, functions={"echo": _echo})
        assert info.value.name == "TypeError"
        _serves(box)
        return
    got = box.run("echo(v)", sandbox={"v": value}, functions={"echo": _echo})
    assert _same(got, want), (got, want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=10, deadline=None, suppress_health_check=FIXTURES)
@given(value=st.integers(min_value=10**4300, max_value=10**6000) | st.integers(
    min_value=-(10**6000), max_value=-(10**4300)))
@example(value=10**4300)
@example(value=-(10**5000) - 1)
def test_huge_ints_cross_every_way(boxes: dict[str, IsoBox], mode: str, value: int) -> None:
    """Ints past CPython's 4,300-digit str limit are BigInts like any other (README: every
    BigInt comes back as an int): into the sandbox, out as a result, through a host function,
    and made in JS."""
    box = boxes[mode]
    assert box.run("v", sandbox={"v": value}) == value
    assert box.run("echo(v)", sandbox={"v": value}, functions={"echo": _echo}) == value
    sign = "-" if value < 0 else ""  # in hex: str() of such an int is refused by CPython itself
    assert box.run(f"{sign}BigInt('{hex(abs(value))}')") == value


def _nested(depth: int, shape: list[bool]) -> Any:
    value: Any = 0
    for level in range(depth):
        value = [value] if shape[level % len(shape)] else {"k": value}
    return value


def _same_nesting(got: Any, depth: int, shape: list[bool]) -> bool:
    """``got == _nested(depth, shape)``, walked without recursion (== would recurse)."""
    for level in reversed(range(depth)):
        if shape[level % len(shape)]:
            if type(got) is not list or len(got) != 1:
                return False
            got = got[0]
        else:
            if type(got) is not dict or list(got) != ["k"]:
                return False
            got = got["k"]
    return type(got) is int and got == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=15, deadline=None, suppress_health_check=FIXTURES)
@given(depth=st.integers(0, 3000), shape=st.lists(st.booleans(), min_size=1, max_size=4),
       echo=st.booleans())
@example(depth=2000, shape=[True], echo=False)
@example(depth=2000, shape=[False], echo=True)
def test_deeply_nested_values_cross_or_are_refused(
        boxes: dict[str, IsoBox], mode: str, depth: int, shape: list[bool], echo: bool) -> None:
    """A value nested thousands deep comes back whole, or is refused with SerializationError
    (or, as a host argument, a JS error); never an untyped exception (RecursionError)."""
    box = boxes[mode]
    value = _nested(depth, shape)
    try:
        if echo:
            got = box.run("echo(v)", sandbox={"v": value}, functions={"echo": _echo})
        else:
            got = box.run("v", sandbox={"v": value})
    except isobox.SerializationError:
        event("refused")
    except isobox.ScriptError as exc:
        assert echo, exc
        event(f"host call failed: {exc.name}")
    else:
        assert _same_nesting(got, depth, shape)
    _serves(box)


# Values the table refuses, each at a random place in a random structure; the error's path
# names that place.
_UNSENDABLE = [{1, 2}, frozenset(), object(), 1j, Decimal("1.5"), print, range(3), ...]


@st.composite
def _buried(draw: st.DrawFn, leaves: S[Any]) -> tuple[Any, str]:
    """``(value, path)``: a leaf from ``leaves`` buried in lists and dicts; ``path`` is where
    (as SerializationError names it, below ``sandbox.v``)."""
    value: Any = draw(leaves)
    path = ""
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            before = draw(st.lists(st.integers(), max_size=2))
            path = f"[{len(before)}]{path}"
            value = [*before, value, *draw(st.lists(st.text(max_size=3), max_size=2))]
        else:
            key = draw(keys)
            others: dict[str, int] = draw(st.dictionaries(keys, st.integers(), max_size=2))
            others.pop(key, None)
            path = f".{key}{path}"
            value = {**others, key: value}
    return value, path


@pytest.mark.timeout(30)
@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(case=_buried(st.sampled_from(_UNSENDABLE)))
def test_values_outside_the_table_are_refused_with_their_path(
        boxes: dict[str, IsoBox], case: tuple[Any, str]) -> None:
    """A set, an arbitrary object, a complex, a Decimal, a function... anywhere in the sandbox
    is a SerializationError naming its place, raised before anything runs (in the caller, so
    one mode is enough)."""
    value, path = case
    with pytest.raises(isobox.SerializationError) as info:
        boxes["inprocess"].run("v", sandbox={"v": value})
    assert info.value.path == f"sandbox.v{path}"


@pytest.mark.timeout(30)
def test_a_cycle_is_refused_with_its_path(boxes: dict[str, IsoBox]) -> None:
    """A list that contains itself is a SerializationError naming where it comes round."""
    inner: list[Any] = [1]
    inner.append({"again": inner})
    with pytest.raises(isobox.SerializationError) as info:
        boxes["process"].run("v", sandbox={"v": [0, inner]})
    assert info.value.path == "sandbox.v[1][1].again"


@pytest.mark.timeout(30)
@settings(max_examples=20, deadline=None, suppress_health_check=FIXTURES)
@given(case=_buried(st.dictionaries(
    st.integers() | st.floats(allow_nan=False) | st.booleans() | st.none(),
    st.integers() | st.text(max_size=3), min_size=1, max_size=3)))
@example(case=({1: "a"}, ""))
def test_non_string_keys_are_refused(boxes: dict[str, IsoBox], case: tuple[Any, str]) -> None:
    """README, value table: a non-str key raises SerializationError before anything is sent."""
    value, path = case
    with pytest.raises(isobox.SerializationError) as info:
        boxes["inprocess"].run("v", sandbox={"v": value})
    assert info.value.path == f"sandbox.v{path}"


# JS values that cannot become Python values: Invalid Dates and dates outside years 1..9999.
_UNCONVERTIBLE_ARGS = st.one_of(
    st.sampled_from(["new Date(NaN)", "new Date(8.64e15)", "new Date(-8.64e15)",
                     "new Date(253402300800000)", "new Date(-62135596800001)"]),
    st.integers(253402300800000, 8_640_000_000_000_000).map(lambda ms: f"new Date({ms})"),
    st.integers(-8_640_000_000_000_000, -62135596800001).map(lambda ms: f"new Date({ms})"),
).flatmap(lambda arg: st.sampled_from([arg, f"[1, {arg}]", f"{{a: {{b: {arg}}}}}"]))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=8, deadline=None, suppress_health_check=FIXTURES)
@given(arg=_UNCONVERTIBLE_ARGS)
@example(arg="new Date(8.64e15)")
def test_unconvertible_host_argument_is_a_js_type_error(
        boxes: dict[str, IsoBox], mode: str, arg: str) -> None:
    """README, host functions: anything unconvertible as an argument throws a TypeError in JS
    (the script may catch it); it never fails the run from outside, in either mode."""
    box = boxes[mode]
    code = f"try {{ echo({arg}); 'returned' }} catch (e) {{ e.name }}"
    assert box.run(code, functions={"echo": _echo}) == "TypeError"
    _serves(box)


# =============================================================================================
# 2. Random frames from a worker
# =============================================================================================

_WIRE_TIMEOUT = 0.3  # per run with an impostor: a frame that never completes costs this much
_FIELDS = ["kind", "payload", "console", "cpu_time", "memory", "retire", "transpiled",
           "violations", "files", "cid", "name", "args", "sync", "items", "n", "state", "refused",
           "confinement", "pid", "status", "reply"]

msgpack_values: S[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
              st.text(max_size=10), st.binary(max_size=10),
              st.sampled_from(["R", "E", "T", "W", "M", "X", "S", "C", "number\n3", "x\n{",
                               "string\n\"a\"", "\n", "{}", '{"name": 5}', "[]"])),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6,
)
bodies = st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), msgpack_values,
                         max_size=5)


@dataclass(frozen=True)
class _FrameSpec:
    """One frame of a reply; its request id is the request's, off by ``rid_delta``, or
    ``raw_rid`` when set (any uint64/int64, to reach the id range check)."""

    type: MsgType
    body: dict[str, Any]
    rid_delta: int = 0
    raw_rid: int | None = None

    def encode(self, rid: int) -> bytes:
        return encode_frame(self.type, self.raw_rid if self.raw_rid is not None
                            else rid + self.rid_delta, self.body)


@dataclass(frozen=True)
class _Reply:
    """What the impostor answers, as a function of the request id it was sent: random bytes
    and frames, then at most one mutation (flip bytes, cut, append, insert)."""

    raw: bytes = b""
    frames: tuple[_FrameSpec, ...] = ()
    mutation: str = "none"
    where: int = 0
    noise: bytes = b"\x00"

    def build(self, rid: int) -> bytes:
        data = self.raw + b"".join(f.encode(rid) for f in self.frames)
        if not data or self.mutation == "none":
            return data
        at = self.where % len(data)
        if self.mutation == "flip":
            flipped = bytearray(data)
            for i, mask in enumerate(self.noise):
                flipped[(at + 7 * i) % len(data)] ^= mask or 0x80
            return bytes(flipped)
        if self.mutation == "cut":
            return data[:at]
        if self.mutation == "append":
            return data + self.noise
        return data[:at] + self.noise + data[at:]  # insert


frame_specs = st.builds(
    _FrameSpec,
    type=st.sampled_from(MsgType),
    body=bodies,
    rid_delta=st.sampled_from([0, 0, 0, 1, -1, 2**32]),
    raw_rid=st.none() | st.none() | st.integers(-(2**63), 2**64 - 1),
)
_shapes = st.one_of(  # a well-delimited frame whose msgpack payload is the wrong shape
    msgpack_values,
    st.tuples(st.integers(-2, 3), st.integers(-1, 20), st.integers(-1, 5), msgpack_values)
    .map(list),
).map(lambda obj: msgpack.packb(obj, use_bin_type=True)).map(
    lambda p: struct.pack(">I", len(p)) + p)
_json_texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
    | st.fixed_dictionaries({"$isobox": st.sampled_from(["big", "date", "bytes", "num", "obj",
                                                          "u", "x"]), "v": msgpack_values}),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=5,
).map(lambda v: json.dumps(v, default=repr)) | st.text(max_size=12)
calls = st.builds(  # well-formed host calls, some to the run's function f, with any arguments
    _FrameSpec,
    type=st.just(MsgType.CALL),
    body=st.fixed_dictionaries({"cid": st.integers(-(2**63), 2**64 - 1),
                                "name": st.sampled_from(["f", "g", "", "__proto__"]),
                                "args": _json_texts}, optional={"sync": st.booleans()}),
)
replies = st.builds(
    _Reply,
    raw=st.binary(max_size=24) | _shapes | st.just(b""),
    frames=st.lists(frame_specs | calls, max_size=3).map(tuple),
    mutation=st.sampled_from(["none", "none", "flip", "cut", "append", "insert"]),
    where=st.integers(0, 2**16),
    noise=st.binary(min_size=1, max_size=6),
)


@dataclass
class _Impostor:
    """A worker forked by the box's fork server, in the pool under the test's control."""

    pid: int
    worker_end: socket.socket  # connected to the forked worker: held open, never read
    peer: socket.socket  # the other end of the channel the pool talks on
    thread: threading.Thread
    seen: dict[str, Any] = field(default_factory=dict)  # the request id and the reply sent


def _plant(pool: Pool, answer: Callable[[int], bytes]) -> _Impostor:
    """Fork a worker, give the pool a channel to this test in place of the worker's, and put
    it first in the idle queue, so the next run goes to it. A thread reads the RUN request and
    sends ``answer(request_id)``."""
    spawned = pool._zygote.spawn()
    ours, peer = socket.socketpair()
    seen: dict[str, Any] = {}

    def reply() -> None:
        peer.settimeout(10)
        decoder = FrameDecoder()
        frames: list[Frame] = []
        try:
            while not frames:
                chunk = peer.recv(1 << 16)
                if not chunk:
                    return
                frames = decoder.feed(chunk)
            seen["rid"] = frames[0].request_id
            seen["reply"] = answer(frames[0].request_id)
            peer.sendall(seen["reply"])
        except OSError:  # the pool killed the impostor and closed its channel already
            return

    thread = threading.Thread(target=reply, name="impostor", daemon=True)
    thread.start()
    handle = WorkerHandle(SpawnedWorker(spawned.pid, spawned.pidfd, ours), None, pool._zygote)
    with pool._lock:
        pool._handles[handle.pid] = handle
        handle.state = "idle"
        pool._idle.appendleft(handle)
    pool._poke()  # the maintainer watches its pidfd from now on
    return _Impostor(spawned.pid, spawned.channel, peer, thread, seen)


def _unplant(pool: Pool, impostor: _Impostor) -> None:
    """End the impostor (its worker exits at EOF if nobody killed it) and wait until the pool
    has let go of it, so the next run goes to a real worker."""
    impostor.peer.close()
    impostor.worker_end.close()
    impostor.thread.join(5)
    deadline = time.monotonic() + 5
    while impostor.pid in pool._handles and time.monotonic() < deadline:
        time.sleep(0.005)
    assert impostor.pid not in pool._handles, "the pool kept a dead worker"


def _pool(box: IsoBox) -> Pool:
    pool = box._pool
    assert pool is not None
    return pool


def _killed(pool: Pool, pid: int) -> bool:
    status = pool._zygote.exit_status(pid, 5.0)
    return status is not None and os.waitstatus_to_exitcode(status) == -signal.SIGKILL


def _frames_in(data: bytes) -> Iterator[Frame]:
    """The frames at the start of ``data`` that decode on their own, in order."""
    pos = 0
    while len(data) - pos >= 4:
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 4 + length
        if length > MAX_FRAME or end > len(data):
            return
        try:
            (frame,) = FrameDecoder().feed(data[pos:end])
        except ProtocolError:
            return
        yield frame
        pos = end


def _reaches_a_result(data: bytes, rid: int) -> bool:
    """Whether the pool, reading ``data`` frame by frame, could get to a RESULT for the run
    (past OUTPUT frames and well-formed host calls for it): what a RESULT's body may do is the
    subject of test_a_result_frame_with_any_body_gives_a_value_or_a_typed_error."""
    for frame in _frames_in(data):
        if frame.request_id != rid:
            return False
        if frame.type is MsgType.RESULT:
            return True
        if frame.type is MsgType.OUTPUT:
            continue
        body = frame.body
        if frame.type is not MsgType.CALL or type(body.get("cid")) is not int or not (
                isinstance(body.get("name"), str) and isinstance(body.get("args"), str)):
            return False
    return False


@pytest.fixture(scope="module")
def wire_box() -> Iterator[IsoBox]:
    """A box of its own: impostors die by the dozen, which opens its crash-loop breaker."""
    with IsoBox(timeout=5.0, pool={"min": 2, "max": 2}, typescript="lazy") as box:
        box.warmup_pool()
        yield box


def _run_against(box: IsoBox, answer: Callable[[int], bytes],
                 action: Callable[[], Any] | None = None) -> tuple[Any, _Impostor, float]:
    """One run (by default ``execute("1 + 2")`` with a host function ``f``) answered by an
    impostor: its outcome (a typed error is returned, anything else propagates), the impostor,
    and how long the run took."""
    pool = _pool(box)
    impostor = _plant(pool, answer)
    started = time.monotonic()
    try:
        try:
            outcome = action() if action is not None else box.execute(
                "1 + 2", timeout=_WIRE_TIMEOUT, functions={"f": _echo})
        except isobox.IsoBoxError as exc:
            outcome = exc
        elapsed = time.monotonic() - started
    finally:
        _unplant(pool, impostor)
    return outcome, impostor, elapsed


@pytest.mark.timeout(110)
@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES)
@given(reply=replies)
@example(reply=_Reply(raw=b"\xff\xff\xff\xff"))
@example(reply=_Reply(raw=b"\x00\x00\x00\x02\x91"))  # a frame that never completes
@example(reply=_Reply(frames=(_FrameSpec(MsgType.CALL, {"cid": 1, "name": "f", "args": "[]"}),
                              _FrameSpec(MsgType.PONG, {}))))
@example(reply=_Reply(frames=(_FrameSpec(MsgType.RESULT, {"kind": "R", "payload": "number\n7"},
                                         rid_delta=1),)))
def test_garbage_from_a_worker_kills_it_and_is_reported(wire_box: IsoBox, reply: _Reply) -> None:
    """Whatever a worker sends that is not a result for the run (random bytes, frames of any
    type for any request id with any body, host calls with any arguments, cut, flipped or
    padded ones) ends the run within its deadline with WorkerCrashedError or a wall
    TimeoutError, the worker is SIGKILLed, and the box serves on."""
    outcome, impostor, elapsed = _run_against(wire_box, reply.build)
    sent = impostor.seen.get("reply")
    assert sent is not None, "the run never reached the impostor"
    assume(not _reaches_a_result(sent, impostor.seen["rid"]))
    event(f"{type(outcome).__name__} {getattr(outcome, 'cause', '')[:40]}")
    assert isinstance(outcome, isobox.WorkerCrashedError | isobox.TimeoutError), outcome
    if isinstance(outcome, isobox.TimeoutError):
        assert outcome.kind == "wall"
    assert outcome.worker_pid == impostor.pid
    assert _killed(_pool(wire_box), impostor.pid)
    assert elapsed < _WIRE_TIMEOUT + 2.0
    _serves(wire_box)


_good_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53)
                            | st.text(max_size=6),
                            lambda c: st.lists(c, max_size=3)
                            | st.dictionaries(st.text(max_size=3), c, max_size=3),
                            max_leaves=6)
_lines = st.lists(st.tuples(st.sampled_from(["log", "warn", "error"]), st.text(max_size=8)),
                  max_size=3)


@pytest.mark.timeout(60)
@settings(max_examples=15, deadline=None, suppress_health_check=FIXTURES)
@given(value=_good_values, streamed=_lines, final=_lines, call=st.booleans())
def test_a_well_formed_result_from_a_worker_is_the_value(
        wire_box: IsoBox, value: Any, streamed: list[tuple[str, str]],
        final: list[tuple[str, str]], call: bool) -> None:
    """The other side of the property: OUTPUT lines, perhaps a host call, then a RESULT for the
    run, in the shapes the real worker sends, give the value and the console, and the worker
    goes back to the pool."""
    frames = [_FrameSpec(MsgType.OUTPUT, {"console": [list(x) for x in streamed]})]
    if call:
        frames.append(_FrameSpec(MsgType.CALL, {"cid": 1, "name": "f", "args": "[]"}))
    frames.append(_FrameSpec(MsgType.RESULT, {
        "kind": "R", "payload": "value\n" + json.dumps(value), "cpu_time": 0.001,
        "memory": 1000, "console": [list(x) for x in final]}))
    outcome, impostor, _elapsed = _run_against(wire_box, _Reply(frames=tuple(frames)).build)
    assert isinstance(outcome, isobox.ExecutionResult), outcome
    assert outcome.value == value
    assert outcome.console == [*streamed, *final]
    assert outcome.worker_pid == impostor.pid
    _serves(wire_box)


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None, suppress_health_check=FIXTURES)
@given(body=bodies)
@example(body={"kind": "R"})
def test_a_result_frame_with_any_body_gives_a_value_or_a_typed_error(
        wire_box: IsoBox, body: dict[str, Any]) -> None:
    """A RESULT for the run with a random body: a value only if the body is a well-formed
    result, else a typed IsoBoxError; the box serves on."""
    outcome, _impostor, _elapsed = _run_against(
        wire_box, _Reply(frames=(_FrameSpec(MsgType.RESULT, body),)).build)
    if isinstance(outcome, isobox.ExecutionResult):
        assert body.get("kind") == "R"
        assert isinstance(body.get("payload"), str)
    _serves(wire_box)


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None, suppress_health_check=FIXTURES)
@given(body=st.fixed_dictionaries({"console": st.lists(
    st.lists(st.text(max_size=4), min_size=2, max_size=2) | msgpack_values, max_size=3)}) | bodies)
@example(body={"console": [1]})
def test_an_output_frame_with_any_body_gives_a_value_or_a_typed_error(
        wire_box: IsoBox, body: dict[str, Any]) -> None:
    """OUTPUT for the run with a random body, then a good RESULT: the value and the lines if
    they are ``[kind, message]`` pairs of strings, else a typed IsoBoxError (it was a bare
    TypeError at c71a982); the box serves on."""
    good = {"kind": "R", "payload": "number\n7", "console": []}
    outcome, _impostor, _elapsed = _run_against(wire_box, _Reply(frames=(
        _FrameSpec(MsgType.OUTPUT, body), _FrameSpec(MsgType.RESULT, good))).build)
    assert isinstance(outcome, isobox.ExecutionResult | isobox.IsoBoxError), outcome
    if isinstance(outcome, isobox.ExecutionResult):
        assert outcome.value == 7
        assert outcome.console == [tuple(line) for line in body.get("console", [])]
    _serves(wire_box)


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None, suppress_health_check=FIXTURES)
@given(items=_json_texts, n=st.integers(0, 3))
@example(items="{", n=1)
def test_an_items_frame_with_any_payload_gives_values_or_a_typed_error(
        wire_box: IsoBox, items: str, n: int) -> None:
    """A stream's batch with any text: the values it holds (as many as it says), or a typed
    IsoBoxError; the box serves on."""
    def stream() -> list[Any]:
        return list(wire_box.run_stream("for (;;) yield 1", window=4, timeout=_WIRE_TIMEOUT))

    end = {"kind": "R", "payload": "undefined\nnull"}
    outcome, _impostor, _elapsed = _run_against(wire_box, _Reply(frames=(
        _FrameSpec(MsgType.ITEMS, {"items": items, "n": n}),
        _FrameSpec(MsgType.RESULT, end))).build, stream)
    if isinstance(outcome, list):
        sent = json.loads(items)
        assert isinstance(sent, list)
        assert len(outcome) == len(sent) == n
    _serves(wire_box)


# =============================================================================================
# 3. Random programs under tight limits
# =============================================================================================

_LIMITS: dict[str, Any] = {"timeout": 0.5, "memory_limit": 16 * 2**20}
_ALLOWED = (isobox.ScriptError, isobox.TimeoutError, isobox.MemoryLimitError,
            isobox.SerializationError)  # ScriptError covers CompileError and SecurityError
_NAMES = ["a", "b", "c", "x", "i", "nope"]
_BINOPS = ["+", "-", "*", "/", "%", "**", "&", "|", "^", "<<", ">>", ">>>", "&&", "||", "??",
           "==", "===", "!=", "<", ">=", "in", "instanceof"]
_UNOPS = ["-", "+", "!", "~", "typeof ", "void "]
_JS_KEYS = ["a", "__proto__", "toJSON", "length", "0", "$isobox", "constructor"]
_NEVER_POLLING = [  # DESIGN.md §9: native loops that never poll the interrupt; a regex bomb
    "Array.prototype.reverse.call({length: 2 ** 53 - 1})",
    "Array.prototype.copyWithin.call({length: 2 ** 53 - 1}, 1)",
    "Array.prototype.join.call({length: 2 ** 53 - 1}, '')",
    "new Array(2 ** 32 - 1).indexOf(1)",
    "/(a+)+$/.test('a'.repeat(40) + 'b')",
]
_PREAMBLE = ("function rec(n) { return n <= 0 ? 0 : 1 + rec(n - 1); }\n"
             "const twice = (g, y) => g(g(y));\n")


def _js_number(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x)


def _expressions(sizes: S[str], fills: S[str], big: int) -> S[str]:
    bounds = st.sampled_from(["0", "1", "3", "100", "100000", "2 ** 31", "Infinity"])
    atoms = st.one_of(
        st.integers(-(2**60), 2**60).map(str),
        st.floats().map(_js_number),
        texts.map(json.dumps),  # lone surrogates and NUL included
        st.integers(-big, big).map(lambda n: f"{n}n"),
        st.sampled_from(["true", "false", "null", "undefined", "-0", "[]", "({})", "''",
                         "(() => 1)", "Symbol('s')", "new Date(0)", "new Date(NaN)",
                         "new Date(8.64e15)", "globalThis", "Math.PI", *_NAMES]),
    )

    def extend(e: S[str]) -> S[str]:
        two = st.tuples(e, e)
        return st.one_of(
            st.tuples(e, st.sampled_from(_BINOPS), e).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(st.sampled_from(_UNOPS), e).map(lambda t: f"({t[0]}{t[1]})"),
            st.lists(e, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
            st.lists(st.tuples(st.sampled_from(_JS_KEYS), e), max_size=3).map(
                lambda kv: "({" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in kv) + "})"),
            st.tuples(e, sizes).map(lambda t: f"String({t[0]}).repeat({t[1]})"),
            st.tuples(fills, e).map(lambda t: f"new Array({t[0]}).fill({t[1]})"),
            st.tuples(st.sampled_from(["0", "1", "3", "10"]), e, e).map(
                lambda t: f"new Array({t[0]}).fill({t[1]}).map((x, i) => {t[2]})"),
            st.tuples(sizes, e).map(lambda t: f"Array.from({{length: {t[0]}}}, (x, i) => {t[1]})"),
            st.tuples(e, st.sampled_from(_JS_KEYS)).map(lambda t: f"({t[0]})[{json.dumps(t[1])}]"),
            two.map(lambda t: f"({t[0]})[{t[1]}]"),
            st.tuples(e, e, e).map(lambda t: f"({t[0]} ? {t[1]} : {t[2]})"),
            e.map(lambda s: f"JSON.stringify({s})"),
            e.map(lambda s: f"JSON.parse(JSON.stringify({s}) ?? 'null')"),
            e.map(lambda s: f"String({s})"),
            e.map(lambda s: f"BigInt({s})"),
            e.map(lambda s: f"Object.keys({s})"),
            two.map(lambda t: f"Math.max({t[0]}, {t[1]})"),
            e.map(lambda s: f"twice(y => y + 1, {s})"),
            bounds.map(lambda n: f"rec({n})"),
            two.map(lambda t: f"new Map([[{t[0]}, {t[1]}]])"),
            two.map(lambda t: f"new Set([{t[0]}, {t[1]}])"),
            sizes.map(lambda n: f"new Uint8Array({n})"),
            st.tuples(sizes, e).map(lambda t: f"new Float64Array({t[0]}).fill({t[1]})"),
            sizes.map(lambda n: f"new ArrayBuffer({n})"),
            e.map(lambda s: f"new Date({s})"),
            two.map(lambda t: f"(() => {{ try {{ return {t[0]}; }} catch (err) {{ return {t[1]}; }} }})()"),
        )

    return st.recursive(atoms, extend, max_leaves=8)


def _statements(exprs: S[str]) -> S[str]:
    bounds = st.sampled_from(["0", "1", "3", "10", "1000", "100000", "10000000", "2 ** 31",
                              "Infinity"])
    delays = st.sampled_from(["0", "1", "5", "30", "5000"])

    def extend(s: S[str]) -> S[str]:
        block = st.lists(s, max_size=3).map(" ".join)
        return st.one_of(
            st.tuples(st.sampled_from(["let", "var", "const", ""]), st.sampled_from(_NAMES),
                      exprs).map(lambda t: f"{t[0]} {t[1]} = {t[2]};"),
            st.tuples(bounds, block).map(lambda t: f"for (let i = 0; i < {t[0]}; i++) {{ {t[1]} }}"),
            st.tuples(bounds, block).map(
                lambda t: f"{{ let k = 0; while (k++ < {t[0]}) {{ {t[1]} }} }}"),
            block.map(lambda b: f"while (true) {{ {b} }}"),
            st.tuples(exprs, block, block).map(
                lambda t: f"if ({t[0]}) {{ {t[1]} }} else {{ {t[2]} }}"),
            st.tuples(block, block, block).map(
                lambda t: f"try {{ {t[0]} }} catch (err) {{ {t[1]} }} finally {{ {t[2]} }}"),
            exprs.map(lambda e: f"throw {e};"),
            st.tuples(exprs, block).map(lambda t: f"for (const x of {t[0]}) {{ {t[1]} }}"),
            st.tuples(bounds, exprs).map(
                lambda t: f"{{ const keep = []; for (let j = 0; j < {t[0]}; j++) keep.push({t[1]}); }}"),
            bounds.map(lambda n: f"{{ let s = 'x'; for (let j = 0; j < {n}; j++) s += s; }}"),
            st.tuples(bounds, exprs).map(
                lambda t: f"{{ const m = new Map(); for (let j = 0; j < {t[0]}; j++) m.set(j, {t[1]}); }}"),
            exprs.map(lambda e: f"await {e};"),
            delays.map(lambda d: f"await new Promise(r => setTimeout(r, {d}));"),
            exprs.map(lambda e: f"await Promise.reject({e});"),
            st.sampled_from(["for (;;) await 0;", "await new Promise(() => {});"]),
            st.tuples(block, delays).map(lambda t: f"setTimeout(() => {{ {t[0]} }}, {t[1]});"),
            block.map(lambda b: f"queueMicrotask(() => {{ {b} }});"),
            block.map(lambda b: f"Promise.resolve().then(() => {{ {b} }});"),
            st.tuples(block, exprs).map(lambda t: f"x = (() => {{ {t[0]} return {t[1]}; }})();"),
            st.tuples(st.sampled_from(["log", "error", "warn"]), exprs).map(
                lambda t: f"console.{t[0]}({t[1]});"),
            bounds.map(lambda n: f"for (let j = 0; j < {n}; j++) x = [x];"),
        )

    return st.recursive(exprs.map(lambda e: f"{e};"), extend, max_leaves=6)


def programs(*, heavy: bool) -> S[str]:
    """Programs: the preamble (``rec``, ``twice``), up to four statements, a final expression.

    Light programs keep every single native call cheap or failing at once (small fills,
    repeats and BigInts; sizes past the heap limit or invalid): QuickJS consults its interrupt handler only
    every so many polls, so a loop around an expensive native call overruns the CPU limit by
    far (see test_cpu_limit_stops_a_loop_of_costly_native_calls), and in-process nothing else
    stops a run. Heavy programs add megabyte-sized natives and the never-polling ones of
    DESIGN.md §9: only the process mode's watchdog bounds those."""
    fast_fail = ["-1", "1.5", "NaN", "2 ** 53"]
    if heavy:
        sizes = st.sampled_from(["0", "1", "7", "1000", "100000", "1048576", "10000000",
                                 "268435456", "2147483647", "4294967295", *fast_fail])
        fills = sizes
        hazards: S[str | None] = st.sampled_from([None] * 6 + _NEVER_POLLING)
        big = 2**70
    else:
        sizes = st.sampled_from(["0", "1", "3", "10", "268435456", "2147483647", *fast_fail])
        fills = st.sampled_from(["0", "1", "3", "10", "2 ** 32", *fast_fail])
        hazards = st.none()
        big = 300  # so that a ** b ** c over BigInts stays cheap
    exprs = _expressions(sizes, fills, big)
    return st.tuples(hazards, st.lists(_statements(exprs), max_size=4), exprs).map(
        lambda t: _PREAMBLE + ("" if t[0] is None else f"{t[0]};\n") + "\n".join(t[1])
        + "\n" + t[2])


def _table_value(value: Any) -> bool:
    """Whether ``value`` is made only of what the value table hands back."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return True
    if isinstance(value, datetime):
        return value.tzinfo == UTC
    if isinstance(value, list):
        return all(_table_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _table_value(v) for k, v in value.items())
    return False


def _outcome(boxes: dict[str, IsoBox], mode: str, code: str
             ) -> tuple[Any, list[tuple[str, str]]] | isobox.IsoBoxError:
    """The program's value and console output, or the typed error it ended with (any other
    exception escapes)."""
    try:
        result = boxes[mode].execute(code, **_LIMITS)
    except _ALLOWED as exc:
        event(f"{mode}: {type(exc).__name__} {getattr(exc, 'kind', '')}")
        return exc
    event(f"{mode}: value")
    assert _table_value(result.value), result.value
    assert all(type(k) is str and type(m) is str for k, m in result.console), result.console
    return result.value, result.console


def _agree(one: tuple[Any, list[tuple[str, str]]] | isobox.IsoBoxError,
           other: tuple[Any, list[tuple[str, str]]] | isobox.IsoBoxError) -> None:
    """Both modes ended the same way: equal value and console, or the same error."""
    if isinstance(one, tuple) and isinstance(other, tuple):
        assert _same(one[0], other[0]), (one[0], other[0])
        assert one[1] == other[1]
        return
    assert type(one) is type(other), (one, other)
    if isinstance(one, isobox.ScriptError) and isinstance(other, isobox.ScriptError):
        assert (one.name, one.message) == (other.name, other.message)
    elif isinstance(one, isobox.SerializationError | isobox.MemoryLimitError):
        assert str(one) == str(other)


@_RANDOM_IN_BACKGROUND
@pytest.mark.timeout(100, method="thread")  # thread: a native hang never returns to Python
@settings(max_examples=70, deadline=None, suppress_health_check=FIXTURES)
@given(code=programs(heavy=False))
@example(code="for (;;) {}")
@example(code="await new Promise(r => setTimeout(r, 5000)); 1")
@example(code="let s = 'x'; for (;;) s += s")
@example(code="rec(1e6)")
@example(code="[new Map([[1, 2]]), new Set([3]), new Uint8Array(2), 2n ** 64n, undefined]")
def test_random_programs_end_in_a_value_or_a_typed_error(
        boxes: dict[str, IsoBox], code: str) -> None:
    """In both modes: a value of the table or one of ScriptError (CompileError), TimeoutError,
    MemoryLimitError, SerializationError, never anything else; a worker run ends within its
    deadline (the watchdog); unless one of them ran out of time, both modes end the same way,
    with the same value and console output or the same error (README: "same results and
    errors"); both serve on."""
    started = time.monotonic()
    in_worker = _outcome(boxes, "process", code)
    assert time.monotonic() - started < _LIMITS["timeout"] + 3.0
    local = _outcome(boxes, "inprocess", code)
    if not isinstance(in_worker, isobox.TimeoutError) and not isinstance(local, isobox.TimeoutError):
        _agree(in_worker, local)  # how far a run gets within its CPU budget may differ
    _serves(boxes["process"])
    _serves(boxes["inprocess"])


@_RANDOM_IN_BACKGROUND
@pytest.mark.timeout(100)
@settings(max_examples=45, deadline=None, suppress_health_check=FIXTURES)
@given(code=programs(heavy=True))
@example(code="Array.prototype.reverse.call({length: 2 ** 53 - 1})")
@example(code="new Array(4294967295).fill(1)")
@example(code="const keep = []; for (;;) keep.push(new Float64Array(1048576))")
def test_random_heavy_programs_in_a_worker_end_in_time(
        boxes: dict[str, IsoBox], code: str) -> None:
    """Process mode only, with huge natives and never-polling loops: still a value or a typed
    error, within the run's deadline, and the pool serves on."""
    started = time.monotonic()
    _outcome(boxes, "process", code)
    assert time.monotonic() - started < _LIMITS["timeout"] + 3.0
    _serves(boxes["process"])


# Each turn costs ~0.4 ms of native work (JSON text for 2,000 numbers) and polls once.
_COSTLY_TURNS = "let n = 0; for (;;) { n += JSON.stringify(new Array(2000).fill(1.5)).length }"


@pytest.mark.timeout(60)
# In a worker the watchdog reads the worker's CPU from /proc and reports kind "cpu". In
# process mode there is no watchdog: the engine notices seconds late (README, "Watchdog").
@pytest.mark.parametrize("mode", ["process"])
def test_cpu_limit_stops_a_loop_of_costly_native_calls(
        boxes: dict[str, IsoBox], mode: str) -> None:
    """A JS loop that polls is a CPU timeout that reports itself: kind "cpu", soon after the
    budget (README: the watchdog's grace lets "a CPU timeout report itself"; killing is for
    native loops that never poll)."""
    started = time.monotonic()
    with pytest.raises(isobox.TimeoutError) as info:
        boxes[mode].run(_COSTLY_TURNS, **_LIMITS)
    assert info.value.kind == "cpu"
    assert time.monotonic() - started < 1.5 * _LIMITS["timeout"]
    _serves(boxes[mode])
