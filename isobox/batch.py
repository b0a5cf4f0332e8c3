"""``box.map``: one piece of code over many inputs, in chunks, with per-item outcomes.

How items run (decided here, carried out by :func:`map_sync` and :func:`map_async`):

- Items go to the workers in **chunks**: one run evaluates the code once per item of the chunk,
  in one fresh context, with the item as the global ``input``; each item's completion value (or
  what it threw) is its own outcome. A chunk costs one round trip and one context instead of
  one per item, which is what lets small items run near the pool's full speed. Items of one
  chunk share that context (like a warm serverless container): a script must not count on its
  globals between items. ``chunk_size=1`` gives every item a context of its own.
- A chunk that fails as a whole (a timeout, the memory limit, a value that cannot cross, a
  worker that died) is **split**: each of its items runs alone, so the failure lands on the item
  that caused it and the others succeed. Code with a top-level ``await`` always runs item by
  item (a chunk evaluates the code with ``eval``, which has no top-level await).
- An item whose worker died is **retried** on a fresh worker up to ``retries`` times, then
  recorded as failed with :class:`WorkerCrashedError`. Timeouts, memory bombs and throws are
  not retried: they would fail again.
- Inputs are read lazily, at most ``window`` chunks ahead of the oldest result not yet handed
  back (with ``ordered=True``) or not yet finished: memory stays bounded for an input of any
  length.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from isobox.errors import (
    IsoBoxError,
    MemoryLimitError,
    ScriptError,
    SecurityError,
    SerializationError,
    TimeoutError,
    WorkerCrashedError,
)

__all__ = ["BatchItem", "MapPlan", "map_async", "map_sync"]

_ITEMS = "__isoboxMapItems"
_TRAPPED = frozenset(f"{name} is not defined"
                     for name in ("process", "require", "Buffer", "global", "module"))
_AWAIT = re.compile(r"\bawait\b")
# The chunk runner. It runs before any item and keeps what it needs in its closure, so an
# item that replaces a built-in cannot change how the others are recorded (only its own value).
_CHUNK = """(async () => {
  const items = globalThis.%(items)s, ev = eval, dp = Object.defineProperty, P = Promise;
  const S = String, out = [];
  delete globalThis.%(items)s;
  const put = (i, v) => dp(out, i,
    {value: v, enumerable: true, writable: true, configurable: true});
  for (let i = 0; i < items.length; i++) {
    globalThis.input = items[i];
    try {
      let v = ev(%(code)s);
      if (v instanceof P) v = await v;
      put(i, [true, v]);
    } catch (e) {
      let name = 'Error', message = '', stack = '';
      try { name = S(e.name); message = S(e.message); stack = S(e.stack || ''); }
      catch (_) { try { message = S(e); } catch (_2) { message = '(unreadable)'; } }
      put(i, [false, [name, message, stack]]);
    }
  }
  return out;
})()"""


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One input's outcome: ``value`` when ``ok``, else ``error`` (the exception ``run``
    would have raised for it). ``attempts`` counts runs, retries after a crash included."""

    index: int
    ok: bool
    value: Any = None
    error: IsoBoxError | None = None
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class MapPlan:
    """How one ``map`` call runs (validated options)."""

    code: str
    retries: int = 2
    ordered: bool = True
    chunk_size: int = 64
    window: int = 8  # chunks in flight (and buffered, when ordered)
    sandbox: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.code, str):
            raise TypeError(f"code must be str, not {type(self.code).__name__}")
        for name in ("retries", "chunk_size", "window"):
            value = getattr(self, name)
            if type(value) is not int or value < (0 if name == "retries" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'retries' else 1}")

    @property
    def chunked(self) -> bool:
        return self.chunk_size > 1 and not _AWAIT.search(self.code)

    def chunk_code(self) -> str:
        return _CHUNK % {"items": _ITEMS, "code": json.dumps(self.code)}

    def chunk_sandbox(self, items: list[Any]) -> dict[str, Any]:
        return {**(self.sandbox or {}), _ITEMS: items}

    def item_sandbox(self, item: Any) -> dict[str, Any]:
        return {**(self.sandbox or {}), "input": item}


def chunk_outcomes(start: int, value: Any, count: int) -> list[BatchItem] | None:
    """The items of a chunk run's value, or None if it is not what the chunk runner returns
    (a script that broke the runner: its items then run alone)."""
    if not isinstance(value, list) or len(value) != count:
        return None
    items: list[BatchItem] = []
    for offset, entry in enumerate(value):
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], bool):
            return None
        if entry[0]:
            items.append(BatchItem(start + offset, True, entry[1]))
            continue
        parts = entry[1]
        if not isinstance(parts, list) or len(parts) != 3:
            return None
        name, message, stack = (str(p) for p in parts)
        # The trapped Node globals throw this (and record a violation): as in run, uncaught
        # it is a SecurityError.
        kind = SecurityError if name == "ReferenceError" and message in _TRAPPED else ScriptError
        items.append(BatchItem(start + offset, False,
                               error=kind(message, name=name, stack=stack)))
    return items


# Failures of a whole chunk that say nothing about which item caused them: split it.
_SPLIT = (TimeoutError, MemoryLimitError, SerializationError, WorkerCrashedError, ScriptError)

Execute = Callable[[str, dict[str, Any]], Any]  # (code, sandbox) -> ExecutionResult


def _run_alone(plan: MapPlan, execute: Execute, index: int, item: Any) -> BatchItem:
    attempts = 0
    while True:
        attempts += 1
        try:
            value = execute(plan.code, plan.item_sandbox(item)).value
        except WorkerCrashedError as exc:
            if attempts > plan.retries:
                return BatchItem(index, False, error=exc, attempts=attempts)
            continue
        except IsoBoxError as exc:
            return BatchItem(index, False, error=exc, attempts=attempts)
        return BatchItem(index, True, value, attempts=attempts)


def run_chunk(plan: MapPlan, execute: Execute, start: int, items: list[Any]) -> list[BatchItem]:
    """Outcomes of one chunk (sync): together if possible, else each item alone."""
    if plan.chunked and len(items) > 1:
        try:
            value = execute(plan.chunk_code(), plan.chunk_sandbox(items)).value
        except _SPLIT:
            value = None
        found = chunk_outcomes(start, value, len(items))
        if found is not None:
            return found
    return [_run_alone(plan, execute, start + i, item) for i, item in enumerate(items)]


def _ready(done: dict[int, list[BatchItem]], next_out: int, *,
           ordered: bool) -> tuple[list[BatchItem], int]:
    """The finished chunks that may be handed back now (taken out of ``done``), and the
    number of the next chunk an ordered map waits for."""
    ready: list[BatchItem] = []
    if ordered:
        while next_out in done:
            ready += done.pop(next_out)
            next_out += 1
    else:
        for number in sorted(done):
            ready += done.pop(number)
    return ready, next_out


def _chunks(inputs: Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    it = iter(inputs)
    start = 0
    while True:
        batch = list(itertools.islice(it, size))
        if not batch:
            return
        yield start, batch
        start += len(batch)


def map_sync(plan: MapPlan, inputs: Iterable[Any], execute: Execute,
             threads: int) -> Iterator[BatchItem]:
    """The sync ``map``: chunks run on ``threads`` threads; results as they finish (in input
    order when ``plan.ordered``)."""
    chunks = _chunks(inputs, plan.chunk_size)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                 thread_name_prefix="isobox-map")
    pending: dict[concurrent.futures.Future[list[BatchItem]], int] = {}
    done: dict[int, list[BatchItem]] = {}
    next_out = 0
    submitted = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) + len(done) < plan.window:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                pending[pool.submit(run_chunk, plan, execute, *chunk)] = submitted
                submitted += 1
            if not pending and not done:
                return
            if pending:
                finished, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    done[pending.pop(future)] = future.result()
            ready, next_out = _ready(done, next_out, ordered=plan.ordered)
            yield from ready
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


AExecute = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def _arun_alone(plan: MapPlan, execute: AExecute, index: int, item: Any) -> BatchItem:
    attempts = 0
    while True:
        attempts += 1
        try:
            value = (await execute(plan.code, plan.item_sandbox(item))).value
        except WorkerCrashedError as exc:
            if attempts > plan.retries:
                return BatchItem(index, False, error=exc, attempts=attempts)
            continue
        except IsoBoxError as exc:
            return BatchItem(index, False, error=exc, attempts=attempts)
        return BatchItem(index, True, value, attempts=attempts)


async def arun_chunk(plan: MapPlan, execute: AExecute, start: int,
                     items: list[Any]) -> list[BatchItem]:
    """The asyncio twin of :func:`run_chunk`."""
    if plan.chunked and len(items) > 1:
        try:
            value = (await execute(plan.chunk_code(), plan.chunk_sandbox(items))).value
        except _SPLIT:
            value = None
        found = chunk_outcomes(start, value, len(items))
        if found is not None:
            return found
    return [await _arun_alone(plan, execute, start + i, item) for i, item in enumerate(items)]


async def map_async(plan: MapPlan, inputs: Iterable[Any], execute: AExecute
                    ) -> AsyncIterator[BatchItem]:
    """The asyncio ``map``: chunks run as tasks; the same order and bounds as :func:`map_sync`."""
    chunks = _chunks(inputs, plan.chunk_size)
    pending: dict[asyncio.Task[list[BatchItem]], int] = {}
    done: dict[int, list[BatchItem]] = {}
    next_out = 0
    submitted = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) + len(done) < plan.window:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                pending[asyncio.ensure_future(arun_chunk(plan, execute, *chunk))] = submitted
                submitted += 1
            if not pending and not done:
                return
            if pending:
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    done[pending.pop(task)] = task.result()
            ready, next_out = _ready(done, next_out, ordered=plan.ordered)
            for item in ready:
                yield item
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
