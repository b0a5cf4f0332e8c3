"""The value table: how Python values become JS values and back.

==========================  =====================================  ===========================
Python                      JS                                     back to Python
==========================  =====================================  ===========================
None                        null (``undefined`` also comes back    None
                            as None)
bool, str                   boolean, string (lone surrogates and   the same
                            NUL characters survive)
int, |i| <= 2**53           number                                 int (float past 2**53)
int beyond 2**53            BigInt                                 int (every BigInt)
float, NaN, +-Infinity      number                                 float (or int if integral)
bytes, bytearray,           Uint8Array (any typed array, DataView  bytes
memoryview                  or ArrayBuffer comes back as bytes)
datetime (naive = UTC;      Date                                   aware datetime in UTC
microseconds truncated)
list, tuple                 Array                                  list
dict with str keys          plain object                           dict
--                          Map / Set                              dict / list
==========================  =====================================  ===========================

Anything else (a set, a custom object, a dict with non-string keys) raises
:class:`~isobox.errors.SerializationError` naming the path. Values travel as ASCII JSON text in
which special values are tagged ``{"$isobox": kind, "v": ...}``; a user dict that itself has the
key ``"$isobox"`` is escaped as ``{"$isobox": "obj", "v": [[key, value], ...]}``. The plain-JSON
fast path (no specials) costs one ``json.dumps``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from isobox.errors import SerializationError

__all__ = ["decode", "encode"]

_TAG = "$isobox"
_SAFE = 2**53
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# Any run of 16 digits might be an int beyond 2**53; mapping digits to "9" and searching with
# str.find is ~15x faster than a regex over a large payload (false hits only cost the slow path).
_DIGITS = str.maketrans("012345678", "999999999")
_SIXTEEN_DIGITS = "9" * 16


def encode(value: Any, *, what: str = "sandbox", limit: int | None = None) -> tuple[str, bool]:
    """Encode ``value`` as ASCII JSON; returns ``(text, tagged)``.

    ``tagged`` says the text holds tagged specials, so the JS side must revive it.
    """
    try:
        return _encode(value, what, limit)
    except RecursionError:
        raise SerializationError(f"{what} is nested too deeply to cross the boundary",
                                 path=what) from None


def _encode(value: Any, what: str, limit: int | None) -> tuple[str, bool]:
    text: str | None = None
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=False, check_circular=True,
                          separators=(",", ":"))
    except (ValueError, TypeError):
        text = None
    tagged = True
    if text is not None and (_TAG in text or _SIXTEEN_DIGITS in text.translate(_DIGITS)
                             or _bad_key(value)):
        text = None  # the slow path tags the specials, or names the bad key
    if text is not None:
        tagged = False
    else:
        prepared = _prepare(value, what, set())
        text = json.dumps(prepared, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        tagged = _TAG in text
    if limit is not None and len(text) > limit:
        raise SerializationError(
            f"{what} of {len(text)} bytes exceeds the cap of {limit} bytes", path=what
        )
    return text, tagged


_CONTAINERS = (dict, list, tuple)


def _bad_key(value: Any) -> bool:
    """Whether ``value`` holds a dict key json.dumps would turn into a string without a word
    (int, float, bool, None: ``{1: 'a'}`` would come back as ``{'1': 'a'}``). Iterative, so
    any depth json.dumps accepted is fine; lists of scalars are skipped at C speed."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return True
            todo.extend(v for v in item.values() if isinstance(v, _CONTAINERS))
        elif isinstance(item, list | tuple) and not {dict, list, tuple}.isdisjoint(
                map(type, item)):
            todo.extend(v for v in item if isinstance(v, _CONTAINERS))
    return False


def _prepare(value: Any, path: str, active: set[int]) -> Any:
    """Slow path: rebuild ``value`` with tags for every special value."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        # Hex: CPython refuses decimal conversions of over 4,300 digits (sys.int_info).
        return value if -_SAFE <= value <= _SAFE else {_TAG: "big", "v": hex(value)}
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        name = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return {_TAG: "num", "v": name}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return {_TAG: "date", "v": (aware - _EPOCH) // _MS}  # exact; JS Dates hold whole ms
    if isinstance(value, (list, tuple, dict)):
        if id(value) in active:
            raise SerializationError(f"{path} is a cyclic reference", path=path)
        active.add(id(value))
        try:
            return _prepare_container(value, path, active)
        finally:
            active.discard(id(value))
    raise SerializationError(
        f"{path} is a {type(value).__name__}, which cannot cross into the sandbox", path=path
    )


def _prepare_container(value: list[Any] | tuple[Any, ...] | dict[Any, Any], path: str,
                       active: set[int]) -> Any:
    if not isinstance(value, dict):
        return [_prepare(item, f"{path}[{i}]", active) for i, item in enumerate(value)]
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise SerializationError(f"{path} has a non-string key {key!r}", path=path)
        out[key] = _prepare(item, f"{path}.{key}", active)
    if _TAG in out:
        return {_TAG: "obj", "v": [[k, v] for k, v in out.items()]}
    return out


def _revive(obj: dict[str, Any]) -> Any:
    kind = obj.get(_TAG)
    if kind is None or len(obj) != 2 or "v" not in obj:
        return obj
    try:
        return _revive_tag(kind, obj["v"], obj)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise SerializationError(f"malformed {kind!r} value from the sandbox: {exc}",
                                 path="result") from None


def _revive_tag(kind: Any, raw: Any, obj: dict[str, Any]) -> Any:
    if kind == "num":
        return float(raw)
    if kind == "big":
        return int(raw, 0)  # "0x..." / "-0x..." (a power-of-two base has no digit limit)
    if kind == "date":
        if not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise SerializationError("an Invalid Date cannot cross the boundary", path="result")
        try:
            return _EPOCH + timedelta(milliseconds=raw)
        except OverflowError:
            raise SerializationError(f"Date {raw} ms is outside Python's datetime range",
                                     path="result") from None
    if kind == "bytes":
        return base64.b64decode(raw)
    if kind == "u":
        return None
    if kind == "obj":
        return dict(raw)
    return obj


def _parse_int(digits: str) -> int | float:
    """A JSON integer from the sandbox is a JS number (BigInts are tagged): past 2**53 it is a
    double printed in shortest form, so its digits are not its exact value; keep it a float."""
    value = int(digits)
    return value if -_SAFE <= value <= _SAFE else float(digits)


def decode(text: str, *, what: str = "result") -> Any:
    """Decode tagged JSON text produced by the sandbox (or by :func:`encode`)."""
    hook = _revive if _TAG in text else None
    try:
        if _SIXTEEN_DIGITS in text.translate(_DIGITS):
            return json.loads(text, object_hook=hook, parse_int=_parse_int)
        return json.loads(text, object_hook=hook)
    except RecursionError:
        raise SerializationError(f"{what} is nested too deeply to cross the boundary "
                                 f"(Python's recursion limit)", path=what) from None
