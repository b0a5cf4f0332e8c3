"""``box.map``: one piece of code over many inputs, in chunks, with per-item outcomes.

How items run (decided here, carried out by :func:`map_sync` and :func:`map_async`):

- Items go to the workers in **chunks**: one request runs the code once per item of the chunk
  (the worker's ``map`` op, :meth:`Engine.run_chunk`), with the item as the global ``input``,
  each item a run of its own (its CPU budget, its value or error, its violations) in one
  fresh context for the chunk. A chunk costs one round trip and one context instead of one per
  item, which is what lets small items run near the pool's full speed. Items of one chunk
  share that context (like a warm serverless container): a script must not count on its
  globals between items. ``chunk_size=1`` gives every item a context of its own.
- A chunk that fails as a whole (the watchdog's timeout, a request too large, a worker that
  died) is **split**: each of its items runs alone, so the failure lands on the item that
  caused it and the others succeed.
- An item whose worker died is **retried** on a fresh worker up to ``retries`` times, after a
  growing pause (50 ms, 100 ms, ...), then recorded as failed with :class:`WorkerCrashedError`.
  Timeouts, memory bombs and throws are not retried: they would fail again. While the pool's
  crash-loop breaker is open (it refuses runs without starting them), an item waits it out,
  up to ``CRASH_LOOP_WAIT`` seconds, without spending its retries.
- Inputs are read lazily, at most ``window`` chunks ahead of the oldest result not yet handed
  back (with ``ordered=True``) or not yet finished: memory stays bounded for an input of any
  length.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from isobox.errors import (
    IsoBoxError,
    MemoryLimitError,
    SerializationError,
    TimeoutError,
    WorkerCrashedError,
)

__all__ = ["BatchItem", "MapPlan", "map_async", "map_sync"]

@dataclass(frozen=True, slots=True)
class BatchItem:
    """One input's outcome: ``value`` when ``ok``, else ``error`` (the exception ``run``
    would have raised for it). ``attempts`` counts runs, retries after a crash included (0 if
    the crash-loop breaker never let the item start)."""

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
        return self.chunk_size > 1

    def item_sandbox(self, item: Any) -> dict[str, Any]:
        return {**(self.sandbox or {}), "input": item}


# Failures of a whole chunk that say nothing about which item caused them: split it.
_SPLIT = (TimeoutError, MemoryLimitError, SerializationError, WorkerCrashedError)

Execute = Callable[[str, dict[str, Any]], Any]  # (code, sandbox) -> ExecutionResult
# A chunk's items -> an outcome per item, in order: (True, value) or (False, error). It may
# return fewer than it was given (the worker retired mid-chunk): the rest then run alone.
RunItems = Callable[[list[Any]], list[tuple[bool, Any]]]


# An open crash-loop breaker refuses runs without starting them: not the item's fault, so it
# waits (growing pauses, at most this long in all) instead of spending its retries.
CRASH_LOOP_WAIT = 30.0


class _Attempts:
    """The retry decision for one item run alone, shared by the sync and async maps."""

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.runs = 0  # runs that started (what BatchItem.attempts reports)
        self.refused = 0  # runs the crash-loop breaker refused
        self.waited = 0.0

    def pause_after(self, exc: WorkerCrashedError) -> float | None:
        """Seconds to wait before the next run, or None to give up with ``exc``. A crash is
        retried ``retries`` times, after 50 ms, 100 ms, ... (at most 2 s), so a crashing item
        does not feed the crash-loop breaker in a tight loop."""
        if exc.cause == "crash loop":
            self.runs -= 1
            self.refused += 1
            pause = min(2.0, 0.1 * 2.0 ** (self.refused - 1))
            if self.waited + pause > CRASH_LOOP_WAIT:
                return None
            self.waited += pause
            return pause
        if self.runs > self.retries:
            return None
        return min(2.0, 0.05 * 2.0 ** (self.runs - 1))


def _run_alone(plan: MapPlan, execute: Execute, index: int, item: Any) -> BatchItem:
    tries = _Attempts(plan.retries)
    while True:
        tries.runs += 1
        try:
            value = execute(plan.code, plan.item_sandbox(item)).value
        except WorkerCrashedError as exc:
            pause = tries.pause_after(exc)
            if pause is None:
                return BatchItem(index, False, error=exc, attempts=tries.runs)
            time.sleep(pause)
            continue
        except IsoBoxError as exc:
            return BatchItem(index, False, error=exc, attempts=tries.runs)
        return BatchItem(index, True, value, attempts=tries.runs)


def _outcomes(start: int, found: list[tuple[bool, Any]]) -> list[BatchItem]:
    return [BatchItem(start + i, ok, value if ok else None, None if ok else value)
            for i, (ok, value) in enumerate(found)]


def run_chunk(plan: MapPlan, execute: Execute, run_items: RunItems, start: int,
              items: list[Any]) -> list[BatchItem]:
    """Outcomes of one chunk (sync): together if possible, else each item alone."""
    done: list[BatchItem] = []
    if plan.chunked and len(items) > 1:
        try:
            done = _outcomes(start, run_items(items)[: len(items)])
        except _SPLIT:
            done = []
    return done + [_run_alone(plan, execute, start + i, item)
                   for i, item in enumerate(items) if i >= len(done)]


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


class _Window:
    """Which chunks are in flight and which finished chunks wait to be handed back (pure
    bookkeeping shared by the sync and async maps): at most ``plan.window`` of both."""

    def __init__(self, plan: MapPlan, inputs: Iterable[Any]) -> None:
        self.plan = plan
        self.chunks = _chunks(inputs, plan.chunk_size)
        self.in_flight = 0
        self.done: dict[int, list[BatchItem]] = {}
        self.next_out = 0
        self.submitted = 0
        self.exhausted = False

    def take(self) -> Iterator[tuple[int, tuple[int, list[Any]]]]:
        """The chunks to start now, each with its number (inputs are read only here)."""
        while not self.exhausted and self.in_flight + len(self.done) < self.plan.window:
            chunk = next(self.chunks, None)
            if chunk is None:
                self.exhausted = True
                return
            self.in_flight += 1
            self.submitted += 1
            yield self.submitted - 1, chunk

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.in_flight and not self.done

    def landed(self, number: int, items: list[BatchItem]) -> None:
        self.in_flight -= 1
        self.done[number] = items

    def ready(self) -> list[BatchItem]:
        items, self.next_out = _ready(self.done, self.next_out, ordered=self.plan.ordered)
        return items


def map_sync(plan: MapPlan, inputs: Iterable[Any], execute: Execute, run_items: RunItems,
             threads: int) -> Iterator[BatchItem]:
    """The sync ``map``: chunks run on ``threads`` threads; results as they finish (in input
    order when ``plan.ordered``)."""
    window = _Window(plan, inputs)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                 thread_name_prefix="isobox-map")
    pending: dict[concurrent.futures.Future[list[BatchItem]], int] = {}
    try:
        while True:
            for number, chunk in window.take():
                pending[pool.submit(run_chunk, plan, execute, run_items, *chunk)] = number
            if window.finished:
                return
            if pending:
                finished, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    window.landed(pending.pop(future), future.result())
            yield from window.ready()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


AExecute = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def _arun_alone(plan: MapPlan, execute: AExecute, index: int, item: Any) -> BatchItem:
    tries = _Attempts(plan.retries)
    while True:
        tries.runs += 1
        try:
            value = (await execute(plan.code, plan.item_sandbox(item))).value
        except WorkerCrashedError as exc:
            pause = tries.pause_after(exc)
            if pause is None:
                return BatchItem(index, False, error=exc, attempts=tries.runs)
            await asyncio.sleep(pause)
            continue
        except IsoBoxError as exc:
            return BatchItem(index, False, error=exc, attempts=tries.runs)
        return BatchItem(index, True, value, attempts=tries.runs)


ARunItems = Callable[[list[Any]], Awaitable[list[tuple[bool, Any]]]]


async def arun_chunk(plan: MapPlan, execute: AExecute, run_items: ARunItems, start: int,
                     items: list[Any]) -> list[BatchItem]:
    """The asyncio twin of :func:`run_chunk`."""
    done: list[BatchItem] = []
    if plan.chunked and len(items) > 1:
        try:
            done = _outcomes(start, (await run_items(items))[: len(items)])
        except _SPLIT:
            done = []
    return done + [await _arun_alone(plan, execute, start + i, item)
                   for i, item in enumerate(items) if i >= len(done)]


async def map_async(plan: MapPlan, inputs: Iterable[Any], execute: AExecute,
                    run_items: ARunItems) -> AsyncIterator[BatchItem]:
    """The asyncio ``map``: chunks run as tasks; the same order and bounds as :func:`map_sync`."""
    window = _Window(plan, inputs)
    pending: dict[asyncio.Task[list[BatchItem]], int] = {}
    try:
        while True:
            for number, chunk in window.take():
                task = asyncio.ensure_future(arun_chunk(plan, execute, run_items, *chunk))
                pending[task] = number
            if window.finished:
                return
            if pending:
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    window.landed(pending.pop(task), task.result())
            for item in window.ready():
                yield item
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
