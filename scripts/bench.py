"""Benchmark IsoBox against its floor: the same QuickJS binding, in-process, no isolation.

What it measures, IsoBox (``IsoBox(timeout=5, memory_limit=64 MiB, pool 2/2)``) side by side with
the floor (``_quickjs.Context()`` made fresh for every run, with the same memory, time and stack
limits, in this process):

- W1  ``1+2``: sequential latency p50/p99 on one thread, for IsoBox once with a ~1 ms idle gap
      between calls (the latency figure) and once back to back; then runs/s from 4 threads
      sharing one box with 2 workers (floor: 4 threads each making fresh contexts).
- W2  ``fib(25)`` (defined in the same snippet): median wall time of one run.
- W3  100,000 ints in and out (``data.map(x => x * 2)`` with ``sandbox={"data": ...}``): median
      wall time. The floor carries the data as JSON text (``ctx.set("S", json.dumps(data))``,
      ``JSON.parse`` in JS, ``JSON.stringify`` back, ``json.loads``), in a fresh context per run.
- W4  ``while(true){}`` with ``timeout=0.1``: median time until the error is raised, and median
      time from that error until the next ``1+2`` succeeds (IsoBox only).
- Respawn: ``SIGKILL`` an idle worker; time until ``pool_stats()`` (polled every ~1 ms) shows two
      idle workers again, and until a run then succeeds. Uses its own box so the faults of the
      other sections do not feed its crash-loop breaker or spawn backoff.
- Idle worker USS and RSS from ``pool_stats()`` (median over workers and samples).
- Stream: values/s of ``let i = 0; while (i < N) yield i++`` through ``run_stream`` to a Python
      consumer; floor: the same generator in-process, advanced by one call per value.
- Session: ``1+2`` p50 in a session against a plain ``run`` p50 on the same box.
- Session recovery: SIGKILL the worker holding a session (state: 1,000 numbers); time until
      the next session run returns, beside the time a live ``set_state`` of that state takes.
- TypeScript (the default ``typescript="preload"``): a warm worker's first compile of a small
      file (a new file every run, after each worker compiled once), and a cached repeat, each
      beside the same snippet in JavaScript.
- Project: 20 modules required by an entrypoint through ``run_project``, against the same
      code bundled into one script with ``run``.
- Prelude: a context with the trusted prelude read as bytecode (what workers do) against one
      with it parsed from source (what they did before) and a bare context, interleaved in
      this process; then two boxes, one started with ``ISOBOX_BYTECODE=0``: ``1+2`` back to
      back, an object result and a thrown error (p50), and W1 runs/s from 4 threads, in
      alternating rounds.
- Remote: an ``isobox-supervisor`` daemon (2 workers, started in a private temp folder) and
      ``IsoBox(address="unix://...")`` clients: ``1+2`` p50/p99 over the Unix socket with a ~1 ms
      idle gap (against the W1 floor, interleaved); runs/s from 4 client processes, one box
      each; the daemon's own RSS (its pid only, not its workers) right after start; and its RSS
      before and after 100,000 runs from one client with 4 threads (5,000 with ``--quick``),
      sampled on the way so a steady climb shows. The daemon is stopped with SIGTERM (SIGKILL
      if it does not exit) whatever happens.
- Batch: ``box.map("input.x * 2", {"x": i} for 100,000 items)`` (20,000 with ``--quick``) on a
      box of its own (2 workers), ``ordered=False``, default chunks: items/s (median of rounds),
      against the floor's per-item cost (a fresh context per item, the item set as the global
      ``input`` from JSON text; median, measured in the same rounds) times N over 2 workers;
      ``chunk_size=1`` items/s as a note. Then the ``isobox batch`` CLI (``--workers 2
      --quiet``) over a JSONL file of the same N lines in a private temp folder: lines/s by wall
      clock around the process (start-up and journal included). Then resume: the CLI is
      SIGKILLed once a third of the output is written, run again with ``--resume``; items it
      ran again beyond those missing at the kill (from its summary line), against the items in
      flight (map window x chunk size), and the final output is checked: every index once.

How: every series is warmed up first and then measured with ``time.perf_counter``; floor and
IsoBox series are interleaved in rounds so background load drifts hit both alike; figures are
medians and percentiles over many repetitions (the machine has 2 cores and is noisy). Each
target is judged PASS/MISS from the measured numbers. The report also says how many cores other
processes kept busy meanwhile (machine-wide busy CPU minus this process tree's), since that load
skews every figure. A section that fails is reported as such
and the run goes on. The script always exits 0 (it is a report, not a gate), shuts its boxes
down and checks that none of the processes they started is left.

Usage::

    python scripts/bench.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _quickjs
import psutil

from isobox import IsoBox, IsoBoxError
from isobox import TimeoutError as BoxTimeoutError
from isobox.workers import confine, engine

MIB = 2**20
TIMEOUT = 5.0
MEMORY_LIMIT = 64 * MIB
STACK_LIMIT = 1 * MIB
POOL = {"min": 2, "max": 2}
WORKERS = 2
THREADS = 4

ONE_PLUS_TWO = "1+2"
FIB = "function fib(n){return n<2?n:fib(n-1)+fib(n-2)} fib(25)"
FIB_25 = 75025
MAP = "data.map(x => x * 2)"
FLOOR_MAP = "JSON.stringify(JSON.parse(S).map(x => x * 2))"
W3_SIZE = 100_000
SPIN = "while(true){}"
SPIN_TIMEOUT = 0.1
IDLE_GAP = 0.001
POLL = 0.001
UNCHECKED = object()  # a Probe whose value is not checked


@dataclass(frozen=True, slots=True)
class Plan:
    """How many repetitions each section makes."""

    w1_rounds: int
    w1_block: int
    w1_warmup: int
    tput_seconds: float
    tput_reps: int
    w2_reps: int
    w3_reps: int
    w4_reps: int
    respawn_reps: int  # stays below the crash-loop breaker's 10 deaths per 10 s
    stream_reps: int
    ts_reps: int
    remote_runs: int  # the daemon RSS growth figure
    batch_items: int  # N of the map and of the batch CLI's input file
    batch_rounds: int  # map rounds (each beside a floor block) and timed CLI runs
    batch_single: int  # items of the chunk_size=1 map note


FULL = Plan(w1_rounds=6, w1_block=500, w1_warmup=200, tput_seconds=2.0, tput_reps=5,
            w2_reps=60, w3_reps=20, w4_reps=12, respawn_reps=8, stream_reps=5, ts_reps=40,
            remote_runs=100_000, batch_items=100_000, batch_rounds=3, batch_single=3_000)
QUICK = Plan(w1_rounds=2, w1_block=150, w1_warmup=30, tput_seconds=0.75, tput_reps=1,
             w2_reps=8, w3_reps=4, w4_reps=3, respawn_reps=3, stream_reps=1, ts_reps=8,
             remote_runs=5_000, batch_items=20_000, batch_rounds=1, batch_single=1_000)


# -- statistics --------------------------------------------------------------------------------
def percentile(samples: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between closest ranks."""
    data = sorted(samples)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def summary(samples: list[float]) -> dict[str, float]:
    """n, median, p99, min, max and mean of ``samples`` (seconds or counts)."""
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "p50": percentile(samples, 50), "p99": percentile(samples, 99),
            "min": min(samples), "max": max(samples), "mean": statistics.fmean(samples)}


# -- the floor ---------------------------------------------------------------------------------
def fresh_context() -> Any:
    """A new in-process context with IsoBox's limits."""
    ctx = _quickjs.Context()
    ctx.set_memory_limit(MEMORY_LIMIT)
    ctx.set_time_limit(TIMEOUT)
    ctx.set_max_stack_size(STACK_LIMIT)
    return ctx


def floor_eval(code: str) -> Any:
    """Run ``code`` in a fresh context; return its value."""
    return fresh_context().eval(code)


def floor_map(data: list[int]) -> Any:
    """W3 on the floor: data in and out as JSON text, in a fresh context."""
    ctx = fresh_context()
    ctx.set("S", json.dumps(data))
    return json.loads(ctx.eval(FLOOR_MAP))


# -- measuring helpers -------------------------------------------------------------------------
def check(value: object, expected: object, what: str) -> None:
    """Fail the section when a run returned something else than it should."""
    if expected is not UNCHECKED and value != expected:
        raise AssertionError(f"{what} returned a wrong value: {str(value)[:80]}")


@dataclass(frozen=True, slots=True)
class Probe:
    """One call to time, the value it must return, and its name for error messages."""

    call: Callable[[], object]
    expected: object
    what: str


def timed(probe: Probe) -> float:
    """Wall seconds one call takes; its value is checked after the clock stopped."""
    start = time.perf_counter()
    value = probe.call()
    elapsed = time.perf_counter() - start
    check(value, probe.expected, probe.what)
    return elapsed


def series(probe: Probe, count: int, gap: float = 0.0) -> list[float]:
    """``count`` timings of ``probe``, sleeping ``gap`` seconds between calls (not timed)."""
    out: list[float] = []
    for _ in range(count):
        out.append(timed(probe))
        if gap:
            time.sleep(gap)
    return out


def throughput(call: Callable[[], object], threads: int, seconds: float) -> tuple[float, int]:
    """Completed calls per second from ``threads`` threads for ``seconds``; and the errors."""
    barrier = threading.Barrier(threads + 1)
    done = [0] * threads
    failed = [0] * threads
    window = [0.0]

    def loop(index: int) -> None:
        barrier.wait()
        end = window[0]
        while time.perf_counter() < end:
            try:
                call()
            except (IsoBoxError, _quickjs.JSException):
                failed[index] += 1
                continue
            if time.perf_counter() <= end:
                done[index] += 1

    pool = [threading.Thread(target=loop, args=(i,), name=f"bench-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    window[0] = time.perf_counter() + seconds
    barrier.wait()
    for thread in pool:
        thread.join()
    return sum(done) / seconds, sum(failed)


def idle_workers(box: IsoBox, avoid: frozenset[int] = frozenset()) -> list[int]:
    """Pids of the idle workers, leaving out ``avoid``."""
    return [w.pid for w in box.pool_stats().workers if w.state == "idle" and w.pid not in avoid]


def wait_idle(box: IsoBox, count: int, avoid: frozenset[int] = frozenset(),
              timeout: float = 10.0) -> bool:
    """Poll ``pool_stats`` every ~1 ms until ``count`` workers (none in ``avoid``) are idle."""
    end = time.perf_counter() + timeout
    while len(idle_workers(box, avoid)) < count:
        if time.perf_counter() >= end:
            return False
        time.sleep(POLL)
    return True


def make_box() -> IsoBox:
    """A box with the benchmark's limits, its pool warmed up."""
    box = IsoBox(timeout=TIMEOUT, memory_limit=MEMORY_LIMIT, stack_limit=STACK_LIMIT, pool=POOL)
    box.warmup_pool()
    if not wait_idle(box, WORKERS):
        raise RuntimeError("the pool did not reach 2 idle workers within 10 s")
    return box


# -- the sections ------------------------------------------------------------------------------
def bench_w1_latency(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """W1: sequential 1+2, floor vs IsoBox with a ~1 ms idle gap vs back to back."""
    run_box = Probe(lambda: box.run(ONE_PLUS_TWO), 3, "IsoBox 1+2")
    run_floor = Probe(lambda: floor_eval(ONE_PLUS_TWO), 3, "floor 1+2")
    series(run_floor, plan.w1_warmup)
    series(run_box, plan.w1_warmup, IDLE_GAP)
    floor: list[float] = []
    gap: list[float] = []
    b2b: list[float] = []
    for _ in range(plan.w1_rounds):
        floor += series(run_floor, plan.w1_block)
        time.sleep(0.05)
        gap += series(run_box, plan.w1_block, IDLE_GAP)
        time.sleep(0.05)
        b2b += series(run_box, plan.w1_block)
        time.sleep(0.05)
    return {"floor": summary(floor), "isobox_gap": summary(gap), "isobox_b2b": summary(b2b)}


def bench_w1_throughput(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """W1: runs/s from 4 threads, one shared box (2 workers) vs fresh contexts per thread."""
    floor_rates: list[float] = []
    box_rates: list[float] = []
    box_errors = 0
    for _ in range(plan.tput_reps):
        rate, _errors = throughput(lambda: floor_eval(ONE_PLUS_TWO), THREADS, plan.tput_seconds)
        floor_rates.append(rate)
        wait_idle(box, WORKERS)
        rate, errors = throughput(lambda: box.run(ONE_PLUS_TWO), THREADS, plan.tput_seconds)
        box_rates.append(rate)
        box_errors += errors
    return {"floor": summary(floor_rates), "isobox": summary(box_rates),
            "isobox_errors": box_errors, "threads": THREADS, "seconds": plan.tput_seconds}


def bench_w2(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """W2: fib(25), interleaved floor and IsoBox runs."""
    run_box = Probe(lambda: box.run(FIB), FIB_25, "IsoBox fib(25)")
    run_floor = Probe(lambda: floor_eval(FIB), FIB_25, "floor fib(25)")
    timed(run_box)
    timed(run_floor)
    floor: list[float] = []
    isobox: list[float] = []
    for _ in range(plan.w2_reps):
        floor.append(timed(run_floor))
        isobox.append(timed(run_box))
    return {"floor": summary(floor), "isobox": summary(isobox)}


def bench_w3(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """W3: 100k ints in and out; IsoBox stops at its first failure (it is reported)."""
    data = list(range(W3_SIZE))
    expected = [x * 2 for x in data]
    run_box = Probe(lambda: box.run(MAP, sandbox={"data": data}), expected, "IsoBox map")
    run_floor = Probe(lambda: floor_map(data), expected, "floor map")
    timed(run_floor)
    floor: list[float] = []
    isobox: list[float] = []
    failure = ""
    for _ in range(plan.w3_reps):
        floor.append(timed(run_floor))
        if failure:
            continue
        try:
            isobox.append(timed(run_box))
        except (IsoBoxError, AssertionError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
    if failure:
        wait_idle(box, WORKERS)
        box.run(ONE_PLUS_TWO)  # a healthy run resets the pool's spawn backoff
    return {"floor": summary(floor), "isobox": summary(isobox), "isobox_failure": failure}


def bench_w4(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """W4: while(true){} with timeout=0.1: time to the error, then time to the next good run."""
    to_error: list[float] = []
    to_next: list[float] = []
    kinds: dict[str, int] = {}
    failures: list[str] = []
    for _ in range(plan.w4_reps):
        wait_idle(box, WORKERS)
        start = time.perf_counter()
        try:
            box.run(SPIN, timeout=SPIN_TIMEOUT)
        except BoxTimeoutError as exc:
            raised = time.perf_counter()
            kinds[exc.kind] = kinds.get(exc.kind, 0) + 1
        except IsoBoxError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        else:
            failures.append("no error was raised")
            continue
        check(box.run(ONE_PLUS_TWO), 3, "the run after the timeout")
        to_next.append(time.perf_counter() - raised)
        to_error.append(raised - start)
    return {"to_error": summary(to_error), "to_next": summary(to_next), "kinds": kinds,
            "failures": failures, "samples_to_error": to_error, "samples_to_next": to_next}


class EventClock:
    """When the pool announced ``worker:crashed`` / ``worker:started`` (perf_counter seconds)."""

    def __init__(self, box: IsoBox) -> None:
        self.crashed: dict[int, float] = {}
        self.started: dict[int, float] = {}
        box.on("worker:crashed", lambda p: self.crashed.setdefault(p["pid"], time.perf_counter()))
        box.on("worker:started", lambda p: self.started.setdefault(p["pid"], time.perf_counter()))

    def first_start_after(self, moment: float) -> float | None:
        """The first worker start announced after ``moment``."""
        later = [t for t in self.started.values() if t >= moment]
        return min(later) if later else None


def respawn_once(box: IsoBox, clock: EventClock) -> dict[str, float]:
    """Kill one idle worker; seconds from the kill to each milestone, and the polls made."""
    if not wait_idle(box, WORKERS):
        raise RuntimeError("the pool did not reach 2 idle workers before the kill")
    time.sleep(0.1)  # let the maintainer settle into its idle poll
    victim = idle_workers(box)[0]
    polls = 0
    start = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    end = start + 10.0
    while len(idle_workers(box, frozenset({victim}))) < WORKERS:
        polls += 1
        if time.perf_counter() >= end:
            raise RuntimeError(f"no replacement for worker {victim} within 10 s")
        time.sleep(POLL)
    ready = time.perf_counter()
    check(box.run(ONE_PLUS_TWO), 3, "the run after the respawn")
    ran = time.perf_counter()
    noticed = clock.crashed.get(victim)
    spawned = clock.first_start_after(start)
    return {"to_idle": ready - start, "to_run": ran - start, "polls": polls,
            "to_crash_event": noticed - start if noticed is not None else math.nan,
            "to_start_event": spawned - start if spawned is not None else math.nan}


def bench_respawn(plan: Plan, seen: set[int]) -> dict[str, Any]:
    """Respawn after SIGKILL of an idle worker, on a box of its own."""
    box = make_box()
    try:
        clock = EventClock(box)
        stats_cost = series(Probe(box.pool_stats, UNCHECKED, "pool_stats"), 50)
        restarts_before = box.pool_stats().restarts
        samples: list[dict[str, float]] = []
        for _ in range(plan.respawn_reps):
            seen.update(w.pid for w in box.pool_stats().workers)
            samples.append(respawn_once(box, clock))
            seen.update(w.pid for w in box.pool_stats().workers)
        restarts = box.pool_stats().restarts - restarts_before
    finally:
        seen.update(child.pid for child in psutil.Process().children(recursive=True))
        box.shutdown()
    out: dict[str, Any] = {
        key: summary([s[key] for s in samples if not math.isnan(s[key])])
        for key in ("to_idle", "to_run", "polls", "to_crash_event", "to_start_event")
    }
    out.update(pool_stats_call=summary(stats_cost), restarts=restarts,
               samples_to_run=[s["to_run"] for s in samples],
               samples_to_crash_event=[s["to_crash_event"] for s in samples])
    return out


def confine_once() -> float:
    """Seconds ``confine()`` takes in a freshly forked child (the fork server's filter is
    prebuilt, as in a real worker start); the child reports over the one fd it keeps."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: confine exactly as a worker does, report, exit
        try:
            ours.close()
            # Right after fork the child's first steps take the copy-on-write faults of the
            # interpreter, whatever they are: fork's cost, paid by every worker with or
            # without confinement. Settle them before the clock starts.
            confine.Confinement().body()
            time.sleep(0.001)
            start = time.perf_counter()
            confine.confine(theirs.fileno(), strict=False)
            os.write(theirs.fileno(), repr(time.perf_counter() - start).encode())
        finally:
            os._exit(0)
    theirs.close()
    with ours:
        ours.settimeout(10)
        text = ours.recv(64).decode()
    os.waitpid(pid, 0)
    return float(text)


def bench_confinement(plan: Plan) -> dict[str, Any]:
    """The cost of confinement per worker start (issue 5's target: under 5 ms)."""
    confine.prepare()
    samples = [confine_once() for _ in range(max(5, plan.respawn_reps * 2))]
    return {"confine": summary(samples), "samples": samples}


def bench_idle_memory(box: IsoBox) -> dict[str, Any]:
    """USS and RSS of idle workers (median over workers and three samples)."""
    uss: list[float] = []
    rss: list[float] = []
    for _ in range(3):
        wait_idle(box, WORKERS)
        time.sleep(0.2)
        for worker in box.pool_stats().workers:
            if worker.state == "idle" and worker.uss:
                uss.append(worker.uss / MIB)
                rss.append(worker.rss / MIB)
    return {"uss_mib": summary(uss), "rss_mib": summary(rss)}


def source_context() -> Any:
    """A context with the prelude parsed from source, as every context had before bytecode."""
    ctx = _quickjs.Context()
    fn = ctx.eval(engine._PRELUDE)
    for name in ("hot", "cold", "loop"):
        fn(name, engine._SOURCES[name])
    return fn


def source_box() -> IsoBox:
    """A box whose fork server (so its workers) parses the prelude from source."""
    previous = os.environ.get("ISOBOX_BYTECODE")
    os.environ["ISOBOX_BYTECODE"] = "0"  # read by the fork server make_box starts
    try:
        return make_box()
    finally:
        if previous is None:
            os.environ.pop("ISOBOX_BYTECODE", None)
        else:
            os.environ["ISOBOX_BYTECODE"] = previous


def bench_prelude(plan: Plan) -> dict[str, Any]:
    """The trusted JS as bytecode against source: per context in-process (interleaved with a
    bare context, the floor's), then W1 and object/error runs on two boxes, one started with
    ``ISOBOX_BYTECODE=0`` (its fork server parses source), in interleaved rounds."""
    probes = {"bare": _quickjs.Context, "source": source_context, "bytecode": engine.JsContext}
    per: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(plan.w1_rounds):
        for key, make in probes.items():
            per[key] += series(Probe(make, UNCHECKED, key), plan.w1_block)
    out: dict[str, Any] = {f"context_{k}": summary(v) for k, v in per.items()}
    out["bytecode_in_use"] = engine.prelude_mode() == "bytecode"
    boxes = {"source": source_box(), "bytecode": make_box()}
    codes = {"b2b": (ONE_PLUS_TWO, 3), "object": ("({a: [1, 2, 3], b: 'x'})", UNCHECKED),
             "error": ("throw new TypeError('bad')", UNCHECKED)}
    try:
        modes = {k: {w.prelude for w in b.pool_stats().workers} for k, b in boxes.items()}
        if modes != {"source": {"source"}, "bytecode": {engine.prelude_mode()}}:
            raise RuntimeError(f"the boxes load the prelude as {modes}")
        times: dict[str, list[float]] = {f"{m}_{c}": [] for m in boxes for c in codes}
        rates: dict[str, list[float]] = {m: [] for m in boxes}

        def attempt(box: IsoBox, code: str) -> object:
            try:
                return box.run(code)
            except IsoBoxError as exc:
                return type(exc).__name__

        for _ in range(plan.w1_rounds):
            for mode, box in boxes.items():
                for name, (code, expected) in codes.items():
                    probe = Probe(functools.partial(attempt, box, code), expected, name)
                    series(probe, plan.w1_warmup // 4)
                    times[f"{mode}_{name}"] += series(probe, plan.w1_block // 2)
        for _ in range(plan.tput_reps):
            for mode, box in boxes.items():
                wait_idle(box, WORKERS)
                rate, _errors = throughput(functools.partial(box.run, ONE_PLUS_TWO), THREADS,
                                           plan.tput_seconds)
                rates[mode].append(rate)
        out.update({k: summary(v) for k, v in times.items()})
        out.update({f"{m}_rate": summary(v) for m, v in rates.items()})
    finally:
        for box in boxes.values():
            box.shutdown()
    return out


# -- the report --------------------------------------------------------------------------------
STREAM_VALUES = 200_000
STREAM = f"let i = 0; while (i < {STREAM_VALUES}) yield i++"
STATE = {"numbers": list(range(1000)), "name": "bench"}


def floor_stream() -> int:
    """The floor's stream: the generator in-process, one binding call per value."""
    ctx = fresh_context()
    step = ctx.eval(f"(() => {{ const it = (function* () {{ {STREAM} }})(); "
                    "return () => { const r = it.next(); return r.done ? -1 : r.value; }; })()")
    total = 0
    while (value := step()) != -1:
        total += value
    return total


def bench_stream(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """Stream: values/s to a Python consumer, IsoBox vs the in-process floor."""
    expected = STREAM_VALUES * (STREAM_VALUES - 1) // 2
    floor: list[float] = []
    isobox: list[float] = []
    for _ in range(plan.stream_reps):
        started = time.perf_counter()
        check(floor_stream(), expected, "floor stream")
        floor.append(STREAM_VALUES / (time.perf_counter() - started))
        started = time.perf_counter()
        check(sum(box.run_stream(STREAM)), expected, "IsoBox stream")
        isobox.append(STREAM_VALUES / (time.perf_counter() - started))
    return {"floor": summary(floor), "isobox": summary(isobox), "values": STREAM_VALUES}


def bench_session(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """Session: 1+2 in a session vs a plain run, interleaved on the same box."""
    session = box.create_session("bench-latency")
    try:
        run_session = Probe(lambda: session.run(ONE_PLUS_TWO), 3, "session 1+2")
        run_plain = Probe(lambda: box.run(ONE_PLUS_TWO), 3, "IsoBox 1+2")
        series(run_session, plan.w1_warmup, IDLE_GAP)
        series(run_plain, plan.w1_warmup, IDLE_GAP)
        plain: list[float] = []
        inside: list[float] = []
        for _ in range(plan.w1_rounds):
            plain += series(run_plain, plan.w1_block, IDLE_GAP)
            inside += series(run_session, plan.w1_block, IDLE_GAP)
        return {"plain": summary(plain), "session": summary(inside)}
    finally:
        session.close()


def gone(pid: int, limit: float = 5.0) -> None:
    """Wait until ``pid`` has exited (a zombie counts: the fork server reaps it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.0002)
    raise RuntimeError(f"process {pid} did not exit within {limit} s")


def bench_session_recovery(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """Session recovery: kill the session's worker, time until its next run returns."""
    recovery: list[float] = []
    restore: list[float] = []
    for rep in range(plan.respawn_reps):
        wait_idle(box, WORKERS)
        session = box.create_session(f"bench-recovery-{rep}")
        try:
            session.set_state(STATE)
            check(session.run("numbers.length"), 1000, "session state")
            started = time.perf_counter()
            session.set_state(STATE)
            restore.append(time.perf_counter() - started)
            pid = session.info().worker_pid
            if pid is None:
                raise RuntimeError("the session has no worker")
            started = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            gone(pid)  # an idle death: the next run must not race the kill itself
            check(session.run("numbers[999] + name.length"), 1004, "restored session")
            recovery.append(time.perf_counter() - started)
        finally:
            session.close()
    return {"recovery": summary(recovery), "restore": summary(restore)}


TS_SNIPPET = "interface P {{ x: number }}\nconst p{i}: P = {{ x: {i} }};\np{i}.x * 2"
JS_SNIPPET = "const p{i} = {{ x: {i} }};\np{i}.x * 2"


def bench_typescript(plan: Plan) -> dict[str, Any]:
    """TypeScript: first compile of a new small file in a warm worker, and a cached repeat."""
    box = IsoBox(timeout=TIMEOUT, memory_limit=MEMORY_LIMIT, pool=POOL, typescript="preload")
    try:
        box.warmup_pool()
        wait_idle(box, WORKERS)
        for i in range(4 * WORKERS):  # every worker has compiled once: it is warm
            box.run(TS_SNIPPET.format(i=100_000 + i), language="typescript")
        first: list[float] = []
        cached: list[float] = []
        plain: list[float] = []
        for i in range(plan.ts_reps):
            ts_code = TS_SNIPPET.format(i=i)
            first.append(timed(Probe(lambda c=ts_code: box.run(c, language="typescript"),
                                     i * 2, "TS first compile")))
            cached.append(timed(Probe(lambda c=ts_code: box.run(c, language="typescript"),
                                      i * 2, "TS cached")))
            js_code = JS_SNIPPET.format(i=i)
            plain.append(timed(Probe(lambda c=js_code: box.run(c), i * 2, "JS")))
        return {"first": summary(first), "cached": summary(cached), "plain": summary(plain)}
    finally:
        box.shutdown()


PROJECT_MODULES = 20


def project_files() -> tuple[dict[str, str], str]:
    """20 modules and an entrypoint that requires them all; and the same code bundled."""
    files = {f"/lib/m{i}.js": f"const base = {i};\nmodule.exports = (x) => x * 2 + base;\n"
             for i in range(PROJECT_MODULES)}
    files["/index.js"] = ("let total = 0;\nfor (let i = 0; i < 20; i++) "
                          "total += require('./lib/m' + i)(i);\ntotal")
    bundle = "".join(f"const m{i} = ((x) => x * 2 + {i});\n" for i in range(PROJECT_MODULES))
    bundle += "let total = 0;\n" + "".join(f"total += m{i}({i});\n"
                                          for i in range(PROJECT_MODULES)) + "total"
    return files, bundle


def bench_project(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """A 20-module project through run_project vs the same code bundled into one run."""
    files, bundle = project_files()
    expected = sum(i * 2 + i for i in range(PROJECT_MODULES))
    run_project = Probe(lambda: box.run_project(files, "/index.js"), expected, "project")
    run_bundle = Probe(lambda: box.run(bundle), expected, "bundle")
    series(run_project, 20, IDLE_GAP)
    series(run_bundle, 20, IDLE_GAP)
    project: list[float] = []
    bundled: list[float] = []
    for _ in range(plan.w1_rounds):
        project += series(run_project, plan.w1_block // 5, IDLE_GAP)
        bundled += series(run_bundle, plan.w1_block // 5, IDLE_GAP)
    return {"project": summary(project), "bundle": summary(bundled)}


# -- remote mode: an isobox-supervisor daemon ------------------------------------------------
CLIENTS = 4  # client processes of the remote throughput figure
SUPERVISOR = Path(sys.executable).with_name("isobox-supervisor")
READY = "isobox-supervisor listening on"
GROWTH_SAMPLES = 10  # daemon RSS samples along the growth runs
CLIENT_MAIN = ("import sys; sys.path.insert(0, sys.argv[1]); import bench; "
               "bench.remote_client(sys.argv[2])")


def rss_mib(pid: int) -> float:
    """Resident MiB of ``pid`` itself (not its children)."""
    return float(psutil.Process(pid).memory_info().rss) / MIB


def family(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (the daemon's fork server and workers)."""
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def alive(pids: Iterable[int], limit: float) -> list[int]:
    """Those of ``pids`` still running (zombies excluded) after waiting up to ``limit`` s."""
    deadline = time.monotonic() + limit
    while True:
        left = []
        for pid in sorted(pids):
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def start_supervisor(folder: str) -> subprocess.Popen[bytes]:
    """``isobox-supervisor`` on ``folder``/d.sock with 2 workers kept started; its stderr goes
    to ``folder``/daemon.log."""
    with open(os.path.join(folder, "daemon.log"), "wb") as log:
        return subprocess.Popen(
            [str(SUPERVISOR), "--socket", os.path.join(folder, "d.sock"),
             "--workers", str(WORKERS), "--min-workers", str(WORKERS)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)


def wait_listening(daemon: subprocess.Popen[bytes], folder: str, limit: float = 30.0) -> None:
    """Poll the daemon's log (every ~1 ms) until it says it listens."""
    log = Path(folder, "daemon.log")
    deadline = time.monotonic() + limit
    while READY not in log.read_text(encoding="utf-8", errors="replace"):
        if daemon.poll() is not None or time.monotonic() >= deadline:
            tail = log.read_text(encoding="utf-8", errors="replace")[-500:]
            state = (f"exited with code {daemon.returncode}" if daemon.returncode is not None
                     else f"did not listen within {limit} s")
            raise RuntimeError(f"isobox-supervisor {state}; its log ends: {tail!r}")
        time.sleep(POLL)


def stop_supervisor(daemon: subprocess.Popen[bytes], seen: set[int]) -> dict[str, Any]:
    """SIGTERM the daemon, SIGKILL it if it has not exited 15 s later (its drain grace is
    10 s); then wait up to 5 s for its processes. Those still alive go into ``seen``, where the
    end-of-run check reports and kills them."""
    processes = family(daemon.pid)
    seen.update(processes | {daemon.pid})
    started = time.perf_counter()
    how = "SIGTERM"
    if daemon.poll() is not None:
        how = "none (it had exited)"
    else:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=15.0)
        except subprocess.TimeoutExpired:
            how = "SIGKILL (SIGTERM was not enough within 15 s)"
            daemon.kill()
            daemon.wait()
    took = time.perf_counter() - started
    return {"how": how, "returncode": daemon.returncode, "seconds": took,
            "outlived": alive(processes, 5.0)}


def remote_box(address: str) -> IsoBox:
    """A remote box with the benchmark's run limits."""
    return IsoBox(address=address, timeout=TIMEOUT, memory_limit=MEMORY_LIMIT,
                  stack_limit=STACK_LIMIT)


def remote_client(address: str) -> None:
    """One client process of the remote throughput figure (run by :class:`ClientProcess`):
    warm up, say ``ready``, then for every ``START END`` line (``time.monotonic()`` values: the
    same clock in every process) run ``1+2`` in a loop from START until END and answer with the
    completions as JSON; exit at the end of stdin."""
    box = remote_box(address)
    try:
        for _ in range(200):
            check(box.run(ONE_PLUS_TWO), 3, "remote 1+2")
        print("ready", flush=True)
        for line in sys.stdin:
            start, end = (float(v) for v in line.split())
            time.sleep(max(0.0, start - time.monotonic()))
            done = failed = 0
            while time.monotonic() < end:
                try:
                    box.run(ONE_PLUS_TWO)
                except IsoBoxError:
                    failed += 1
                    continue
                if time.monotonic() <= end:
                    done += 1
            print(json.dumps({"done": done, "failed": failed}), flush=True)
    finally:
        box.shutdown()


class ClientProcess:
    """A Python process running :func:`remote_client`, talked to over its stdin and stdout."""

    def __init__(self, address: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT_MAIN, str(Path(__file__).resolve().parent), address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True, name=f"client-{self.proc.pid}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self, limit: float) -> str:
        """Its next line; RuntimeError if it exits or says nothing for ``limit`` s."""
        try:
            line = self.lines.get(timeout=limit)
        except queue.Empty:
            raise RuntimeError(f"client process {self.proc.pid} said nothing for {limit} s"
                               ) from None
        if line is None:
            raise RuntimeError(f"client process {self.proc.pid} exited "
                               f"(code {self.proc.wait()})")
        return line

    def close(self) -> None:
        """End of stdin: it shuts its box down and exits; killed if it has not within 10 s."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def remote_latency(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """Sequential remote 1+2 with a ~1 ms idle gap, interleaved with the W1 floor."""
    run_remote = Probe(lambda: box.run(ONE_PLUS_TWO), 3, "remote 1+2")
    run_floor = Probe(lambda: floor_eval(ONE_PLUS_TWO), 3, "floor 1+2")
    series(run_floor, plan.w1_warmup)
    series(run_remote, plan.w1_warmup, IDLE_GAP)
    floor: list[float] = []
    gap: list[float] = []
    for _ in range(plan.w1_rounds):
        floor += series(run_floor, plan.w1_block)
        time.sleep(0.05)
        gap += series(run_remote, plan.w1_block, IDLE_GAP)
        time.sleep(0.05)
    return {"floor": summary(floor), "remote_gap": summary(gap)}


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds ``pid`` itself has used."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def remote_throughput(box: IsoBox, address: str, plan: Plan, pid: int,
                      seen: set[int]) -> dict[str, Any]:
    """Runs/s from 4 client processes, each with its own remote box, all at once; and the CPU
    the daemon process itself spent per run meanwhile."""
    clients: list[ClientProcess] = []
    daemon_cpu = 0.0
    total = 0
    try:
        for _ in range(CLIENTS):
            clients.append(ClientProcess(address))
            seen.add(clients[-1].proc.pid)
        for client in clients:
            if client.answer(60.0) != "ready":
                raise RuntimeError("a client process did not say ready")
        rates: list[float] = []
        per_client: list[float] = []
        errors = 0
        for _ in range(plan.tput_reps):
            wait_idle(box, WORKERS)
            start = time.monotonic() + 0.1
            cpu = cpu_seconds(pid)
            for client in clients:
                client.send(f"{start!r} {start + plan.tput_seconds!r}")
            answers = [json.loads(client.answer(plan.tput_seconds + 30.0)) for client in clients]
            daemon_cpu += cpu_seconds(pid) - cpu
            total += sum(a["done"] + a["failed"] for a in answers)
            rates.append(sum(a["done"] for a in answers) / plan.tput_seconds)
            per_client += [a["done"] / plan.tput_seconds for a in answers]
            errors += sum(a["failed"] for a in answers)
    finally:
        for client in clients:
            client.close()
    return {"throughput": summary(rates), "per_client": summary(per_client),
            "throughput_errors": errors, "clients": CLIENTS, "tput_seconds": plan.tput_seconds,
            "daemon_cpu_per_run": daemon_cpu / total if total else math.nan}


def run_many(box: IsoBox, count: int, threads: int) -> int:
    """``count`` runs of 1+2 split over ``threads`` threads; how many failed."""
    shares = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    failed = [0] * threads

    def loop(index: int) -> None:
        for _ in range(shares[index]):
            try:
                if box.run(ONE_PLUS_TWO) != 3:
                    failed[index] += 1
            except IsoBoxError:
                failed[index] += 1

    pool = [threading.Thread(target=loop, args=(i,), name=f"growth-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(failed)


def remote_growth(box: IsoBox, pid: int, plan: Plan) -> dict[str, Any]:
    """The daemon's RSS before, along and after ``plan.remote_runs`` runs from one client."""
    runs = plan.remote_runs
    failures = run_many(box, max(1000, runs // 50), THREADS)  # warm: threads, one connection
    time.sleep(0.2)
    restarts = box.pool_stats().restarts
    samples = [(0, rss_mib(pid))]
    started = time.perf_counter()
    for step in range(1, GROWTH_SAMPLES + 1):
        target = runs * step // GROWTH_SAMPLES
        failures += run_many(box, target - samples[-1][0], THREADS)
        samples.append((target, rss_mib(pid)))
    elapsed = time.perf_counter() - started
    restarts = box.pool_stats().restarts - restarts
    return {"growth_runs": runs, "growth_threads": THREADS, "rss_before_mib": samples[0][1],
            "rss_after_mib": samples[-1][1], "growth_mib": samples[-1][1] - samples[0][1],
            "growth_samples": samples, "growth_failures": failures,
            "growth_rate": runs / elapsed, "growth_seconds": elapsed,
            "worker_restarts": restarts}


def bench_remote(plan: Plan, seen: set[int]) -> dict[str, Any]:
    """Remote mode: a daemon of our own in a private temp folder; always stopped."""
    started = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="isobox-bench-")  # mode 0700, as the daemon wants
    address = f"unix://{os.path.join(folder, 'd.sock')}"
    daemon: subprocess.Popen[bytes] | None = None
    box: IsoBox | None = None
    out: dict[str, Any] = {}
    try:
        daemon = start_supervisor(folder)
        seen.add(daemon.pid)
        wait_listening(daemon, folder)
        out.update(daemon_pid=daemon.pid, rss_start_mib=rss_mib(daemon.pid))
        box = remote_box(address)
        if not wait_idle(box, WORKERS):
            raise RuntimeError("the daemon's pool did not reach 2 idle workers within 10 s")
        out["rss_workers_idle_mib"] = rss_mib(daemon.pid)  # still before any run
        seen.update(family(daemon.pid))
        out.update(remote_latency(box, plan))
        out.update(remote_throughput(box, address, plan, daemon.pid, seen))
        out.update(remote_growth(box, daemon.pid, plan))
        seen.update(family(daemon.pid))
    finally:
        if box is not None:
            box.shutdown()
        if daemon is not None:
            out["stop"] = stop_supervisor(daemon, seen)
        shutil.rmtree(folder, ignore_errors=True)
    out["section_seconds"] = time.perf_counter() - started
    return out


# -- batch jobs: box.map and the isobox batch CLI --------------------------------------------
BATCH_CODE = "input.x * 2"
FLOOR_ITEM = f"globalThis.input = JSON.parse(S); {BATCH_CODE}"
BATCH_CLI = Path(sys.executable).with_name("isobox")
CLI_CHUNK = 64  # the CLI's --chunk-size default
IN_FLIGHT = max(2, 2 * WORKERS) * CLI_CHUNK  # map's default window (2 x workers chunks) x chunk
KILL_AT = 1 / 3  # SIGKILL the CLI once this share of the output is written
BATCH_SUMMARY = re.compile(
    r"isobox batch: (\d+) ok, (\d+) failed, (\d+) already done; ([\d,.]+) items/s")


def floor_item(index: int) -> Any:
    """One item on the floor: a fresh context, the item as the global ``input`` (from JSON
    text, as ``ctx.set`` takes no dict), then the code."""
    ctx = fresh_context()
    ctx.set("S", json.dumps({"x": index}))
    return ctx.eval(FLOOR_ITEM)


def map_once(box: IsoBox, count: int, chunk_size: int | None = None) -> tuple[float, int]:
    """Wall seconds an unordered ``map`` over ``count`` items takes (consumed as they come;
    ``chunk_size`` None: map's default); and how many items failed. Each index must come back
    exactly once, each value right."""
    times = bytearray(count)
    failed = 0
    chunks = {} if chunk_size is None else {"chunk_size": chunk_size}
    started = time.perf_counter()
    for item in box.map(BATCH_CODE, ({"x": i} for i in range(count)), ordered=False,
                        **chunks):
        times[item.index] = min(255, times[item.index] + 1)
        if item.ok:
            check(item.value, item.index * 2, "map item")
        else:
            failed += 1
    elapsed = time.perf_counter() - started
    if times.count(1) != count:
        raise AssertionError(f"map did not hand back every index exactly once: "
                             f"{times.count(0)} missing, {count - times.count(0) - times.count(1)} "
                             "more than once")
    return elapsed, failed


def batch_map(box: IsoBox, plan: Plan) -> dict[str, Any]:
    """Map rounds, each beside a block of floor items; then the chunk_size=1 note."""
    count = plan.batch_items
    block = 4 * plan.w1_block
    series(Probe(lambda: floor_item(7), 14, "floor item"), plan.w1_warmup)
    map_once(box, min(count, 5_000))  # warm: threads, workers, the chunk runner
    floor: list[float] = []
    seconds: list[float] = []
    failed = 0
    for _ in range(plan.batch_rounds):
        floor += [timed(Probe(functools.partial(floor_item, i), i * 2, "floor item"))
                  for i in range(block)]
        wait_idle(box, WORKERS)
        elapsed, bad = map_once(box, count)
        seconds.append(elapsed)
        failed += bad
    wait_idle(box, WORKERS)
    single, single_failed = map_once(box, plan.batch_single, chunk_size=1)
    per_item = percentile(floor, 50)
    return {"map_items": count, "map_seconds": summary(seconds),
            "map_rate": summary([count / s for s in seconds]), "map_failed": failed,
            "floor_item": summary(floor), "floor_seconds": per_item * count / WORKERS,
            "floor_rate": WORKERS / per_item, "single_items": plan.batch_single,
            "single_rate": plan.batch_single / single, "single_failed": single_failed}


def write_batch_input(folder: str, count: int) -> None:
    """``in.jsonl`` (``{"x": i}`` per line) and ``script.js`` in ``folder``."""
    with open(os.path.join(folder, "in.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(f'{{"x": {i}}}\n' for i in range(count))
    Path(folder, "script.js").write_text(BATCH_CODE + "\n", encoding="utf-8")


def start_batch(folder: str, log: str, *flags: str) -> subprocess.Popen[bytes]:
    """``isobox batch script.js --input in.jsonl --output out.jsonl --workers 2 FLAGS`` in
    ``folder``; its stderr goes to ``folder``/``log``."""
    with open(os.path.join(folder, log), "wb") as err:
        return subprocess.Popen(
            [str(BATCH_CLI), "batch", "script.js", "--input", "in.jsonl", "--output",
             "out.jsonl", "--workers", str(WORKERS), *flags],
            cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def wait_batch(proc: subprocess.Popen[bytes], seen: set[int], limit: float = 300.0) -> int:
    """Wait for the CLI (a blocking wait, so the exit is seen at once); meanwhile a thread puts
    its processes into ``seen`` every 50 ms and SIGKILLs it after ``limit`` s."""
    stop = threading.Event()
    deadline = time.monotonic() + limit

    def watch() -> None:
        while not stop.wait(0.05):
            seen.update(family(proc.pid))
            if time.monotonic() >= deadline:
                proc.kill()
                return

    watcher = threading.Thread(target=watch, daemon=True, name="batch-watch")
    watcher.start()
    try:
        return proc.wait()
    finally:
        stop.set()
        watcher.join()


def clear_output(folder: str) -> None:
    """Remove out.jsonl and its journal (with SQLite's -wal and -shm files)."""
    for name in ("out.jsonl", "out.jsonl.journal", "out.jsonl.journal-wal",
                 "out.jsonl.journal-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))


def log_tail(folder: str, log: str) -> str:
    return Path(folder, log).read_text(encoding="utf-8", errors="replace")[-500:]


def batch_cli(folder: str, plan: Plan, seen: set[int]) -> dict[str, Any]:
    """Timed ``--quiet`` runs of the CLI over the whole file; the output size it ends with."""
    count = plan.batch_items
    rates: list[float] = []
    size = 0
    for _ in range(plan.batch_rounds):
        clear_output(folder)
        started = time.perf_counter()
        proc = start_batch(folder, "quiet.log", "--quiet")
        seen.add(proc.pid)
        code = wait_batch(proc, seen)
        elapsed = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"isobox batch exited with code {code}; its stderr ends: "
                               f"{log_tail(folder, 'quiet.log')!r}")
        data = Path(folder, "out.jsonl").read_bytes()
        check(data.count(b"\n"), count, "isobox batch (output lines)")
        size = len(data)
        rates.append(count / elapsed)
    return {"cli_lines": count, "cli_rate": summary(rates), "cli_output_bytes": size}


def journaled(path: str) -> int | None:
    """How many indices the journal holds (read-only; None if it cannot be read)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT COUNT(*) FROM done").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return None


def final_output(path: Path, count: int) -> dict[str, int]:
    """Lines of the resumed output; indices missing, repeated, or with a wrong record."""
    times = bytearray(count)
    wrong = 0
    lines = path.read_bytes().splitlines()
    for line in lines:
        record = json.loads(line)
        index = record.get("index")
        if not isinstance(index, int) or not 0 <= index < count:
            wrong += 1
            continue
        times[index] = min(255, times[index] + 1)
        if record.get("ok") is not True or record.get("value") != index * 2:
            wrong += 1
    return {"final_lines": len(lines), "missing": times.count(0),
            "repeated": count - times.count(0) - times.count(1), "wrong": wrong}


def batch_resume(folder: str, plan: Plan, seen: set[int], size: int) -> dict[str, Any]:
    """SIGKILL the CLI once ``KILL_AT`` of the output (``size`` bytes when whole) is written;
    ``--resume``; what it ran again, and the final output checked."""
    count = plan.batch_items
    clear_output(folder)
    out = Path(folder, "out.jsonl")
    started = time.perf_counter()
    proc = start_batch(folder, "killed.log")
    seen.add(proc.pid)
    deadline = time.monotonic() + 120.0
    while not out.exists() or out.stat().st_size <= size * KILL_AT:
        if proc.poll() is not None:
            raise RuntimeError(f"isobox batch exited (code {proc.returncode}) before the kill; "
                               f"its stderr ends: {log_tail(folder, 'killed.log')!r}")
        if time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("isobox batch wrote under a third of its output in 120 s")
        time.sleep(POLL)
    processes = family(proc.pid)
    seen.update(processes)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = time.perf_counter() - started
    data = out.read_bytes()
    complete = data.count(b"\n")
    at_kill = {"killed_after": killed_after, "kill_bytes": len(data), "kill_lines": complete,
               "kill_torn": bool(data) and not data.endswith(b"\n"),
               "kill_journaled": journaled(str(out) + ".journal"),
               "kill_outlived": alive(processes, 5.0)}
    started = time.perf_counter()
    proc = start_batch(folder, "resume.log", "--resume")
    seen.add(proc.pid)
    code = wait_batch(proc, seen)
    resume_seconds = time.perf_counter() - started
    log = Path(folder, "resume.log").read_text(encoding="utf-8", errors="replace")
    found = BATCH_SUMMARY.search(log)
    if code != 0 or found is None:
        raise RuntimeError(f"isobox batch --resume exited with code {code}"
                           + ("" if found else " without its summary line")
                           + f"; its stderr ends: {log[-500:]!r}")
    ok, failed, already = (int(found.group(i)) for i in (1, 2, 3))
    ran = ok + failed
    return {**at_kill, "resume_ok": ok, "resume_failed": failed, "resume_already": already,
            "resume_ran": ran, "redone": ran - (count - complete), "in_flight": IN_FLIGHT,
            "resume_seconds": resume_seconds,
            "resume_rate": float(found.group(4).replace(",", "")),
            **final_output(out, count)}


def bench_batch(plan: Plan, seen: set[int]) -> dict[str, Any]:
    """Batch jobs: ``map`` on a box of its own, then the CLI in a private temp folder (always
    removed)."""
    started = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="isobox-bench-batch-")
    box: IsoBox | None = None
    out: dict[str, Any] = {}
    try:
        box = make_box()
        seen.update(w.pid for w in box.pool_stats().workers)
        out.update(batch_map(box, plan))
        seen.update(w.pid for w in box.pool_stats().workers)
        seen.update(child.pid for child in psutil.Process().children(recursive=True))
        box.shutdown()  # its workers would only take CPU from the CLI's
        box = None
        write_batch_input(folder, plan.batch_items)
        out.update(batch_cli(folder, plan, seen))
        out.update(batch_resume(folder, plan, seen, out["cli_output_bytes"]))
    finally:
        if box is not None:
            seen.update(child.pid for child in psutil.Process().children(recursive=True))
            box.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    out["section_seconds"] = time.perf_counter() - started
    return out


def quickjs_build() -> dict[str, Any]:
    """The quickjs-ng distribution in use: version, wheel tags, and whether it is prebuilt."""
    dist = importlib.metadata.distribution("quickjs-ng")
    wheel = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    direct = dist.read_text("direct_url.json")
    if any("manylinux" in tag or "musllinux" in tag for tag in tags):
        kind = "prebuilt wheel from the index"
    elif tags:
        kind = "built from source on this machine"
    else:
        kind = "unknown"
    return {"version": importlib.metadata.version("quickjs-ng"), "build": kind, "tags": tags,
            "direct_url": json.loads(direct) if direct else None, "module": _quickjs.__file__}


def ms(seconds: float | None) -> str:
    """Seconds as a short millisecond figure."""
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.3f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


def ratio(value: float | None, floor: float | None) -> float | None:
    """value / floor, or None when either is missing."""
    if value is None or floor is None or not floor:
        return None
    return value / floor


def fig(section: dict[str, Any] | None, *keys: str) -> float | None:
    """A nested figure of a section, or None when the section failed or has no samples."""
    node: Any = section
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


@dataclass(frozen=True, slots=True)
class Target:
    """One goal, judged from a measured figure."""

    name: str
    measured: float | None
    limit: float
    shown: str
    at_least: bool = False

    @property
    def status(self) -> str:
        if self.measured is None or math.isnan(self.measured):
            return "MISS (no figure: the run failed)"
        ok = self.measured >= self.limit if self.at_least else self.measured <= self.limit
        return "PASS" if ok else "MISS"


def build_rows(res: dict[str, Any], plan: Plan) -> list[tuple[str, str, str, str]]:
    """The comparison table: metric, IsoBox, floor, IsoBox/floor."""
    lat, tput = res.get("w1_latency"), res.get("w1_throughput")
    w2, w3, w4, resp = res.get("w2"), res.get("w3"), res.get("w4"), res.get("respawn")
    mem = res.get("idle_memory")
    rows: list[tuple[str, str, str, str]] = []

    def timing(label: str, box: float | None, floor: float | None) -> None:
        r = ratio(box, floor)
        rows.append((label, ms(box), ms(floor), f"{r:.2f}x" if r is not None else "-"))

    def rate(label: str, box: float | None, floor: float | None) -> None:
        r = ratio(box, floor)
        rows.append((label, f"{box:,.0f}" if box is not None else "-",
                     f"{floor:,.0f}" if floor is not None else "-",
                     f"{r:.2f}x" if r is not None else "-"))

    for q in ("p50", "p99"):
        timing(f"W1 1+2 {q}, ~1 ms idle gap", fig(lat, "isobox_gap", q), fig(lat, "floor", q))
    for q in ("p50", "p99"):
        timing(f"W1 1+2 {q}, back to back", fig(lat, "isobox_b2b", q), fig(lat, "floor", q))
    rate(f"W1 runs/s, {THREADS} threads (median)", fig(tput, "isobox", "p50"),
         fig(tput, "floor", "p50"))
    timing("W2 fib(25) median", fig(w2, "isobox", "p50"), fig(w2, "floor", "p50"))
    timing("W3 100k ints map median", fig(w3, "isobox", "p50"), fig(w3, "floor", "p50"))
    timing("W4 time to error (100 ms limit) median", fig(w4, "to_error", "p50"), None)
    timing("W4 next run after the error median", fig(w4, "to_next", "p50"), None)
    timing("Respawn: kill -> 2 idle, median", fig(resp, "to_idle", "p50"), None)
    timing("Respawn: kill -> 2 idle + run ok, median", fig(resp, "to_run", "p50"), None)
    timing("Confinement per worker start, median", fig(res.get("confinement"), "confine", "p50"),
           None)
    pre = res.get("prelude")
    timing("Context + prelude p50, bytecode (vs source)", fig(pre, "context_bytecode", "p50"),
           fig(pre, "context_source", "p50"))
    timing("Context + prelude p50, bytecode (vs bare)", fig(pre, "context_bytecode", "p50"),
           fig(pre, "context_bare", "p50"))
    for key, label in (("b2b", "1+2 back to back"), ("object", "object result"),
                       ("error", "thrown error")):
        timing(f"{label} p50, bytecode box (vs source box)", fig(pre, f"bytecode_{key}", "p50"),
               fig(pre, f"source_{key}", "p50"))
    rate(f"W1 runs/s, {THREADS} threads, bytecode box (vs source box)",
         fig(pre, "bytecode_rate", "p50"), fig(pre, "source_rate", "p50"))
    stream = res.get("stream")
    rate("Stream values/s (median)", fig(stream, "isobox", "p50"),
         fig(stream, "floor", "p50"))
    sess, rec = res.get("session"), res.get("session_recovery")
    timing("Session 1+2 p50 (floor column: plain run)", fig(sess, "session", "p50"),
           fig(sess, "plain", "p50"))
    timing("Session recovery after kill -9, median", fig(rec, "recovery", "p50"), None)
    timing("Session set_state of that state, median", fig(rec, "restore", "p50"), None)
    tsr, proj = res.get("typescript"), res.get("project")
    timing("TS first compile, warm worker (vs JS)", fig(tsr, "first", "p50"),
           fig(tsr, "plain", "p50"))
    timing("TS cached repeat (vs JS)", fig(tsr, "cached", "p50"), fig(tsr, "plain", "p50"))
    timing("20-module project (vs bundled)", fig(proj, "project", "p50"),
           fig(proj, "bundle", "p50"))
    for key, label in (("uss_mib", "USS"), ("rss_mib", "RSS")):
        value = fig(mem, key, "p50")
        rows.append((f"Idle worker {label} median", f"{value:.1f} MiB" if value else "-", "-",
                     "-"))
    rem = res.get("remote")
    for q in ("p50", "p99"):
        timing(f"Remote 1+2 {q}, ~1 ms idle gap", fig(rem, "remote_gap", q), fig(rem, "floor", q))
    rate(f"Remote runs/s, {CLIENTS} client processes (floor: W1's)",
         fig(rem, "throughput", "p50"),
         fig(tput, "floor", "p50"))
    for key, label in (("rss_start_mib", "Daemon RSS right after start"),
                       ("rss_before_mib", "Daemon RSS before the growth runs"),
                       ("rss_after_mib", f"Daemon RSS after {plan.remote_runs:,} runs")):
        value = fig(rem, key)
        rows.append((label, f"{value:.1f} MiB" if value is not None else "-", "-", "-"))
    rows += batch_rows(res.get("batch"))
    return rows


def rate_text(rate: float | None) -> str:
    return f"{rate:,.0f}" if rate is not None else "-"


def batch_rows(bat: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """The batch section's rows: map items/s and time against the floor, CLI lines/s, resume."""
    count = (bat or {}).get("map_items")
    n = f"{count:,}" if count else "N"
    rate, floor_rate = fig(bat, "map_rate", "p50"), fig(bat, "floor_rate")
    r = ratio(rate, floor_rate)
    spent, floor_spent = fig(bat, "map_seconds", "p50"), fig(bat, "floor_seconds")
    t = ratio(spent, floor_spent)
    cli, redone = fig(bat, "cli_rate", "p50"), fig(bat, "redone")
    c = ratio(cli, floor_rate)
    return [
        (f"Batch map items/s, {n} items, {WORKERS} workers (median)", rate_text(rate),
         rate_text(floor_rate), f"{r:.2f}x" if r is not None else "-"),
        (f"Batch map time, {n} items (floor: per item x N / {WORKERS})", ms(spent),
         ms(floor_spent), f"{t:.2f}x" if t is not None else "-"),
        (f"Batch CLI lines/s, {n} lines, journal incl. (floor: map's)", rate_text(cli),
         rate_text(floor_rate), f"{c:.2f}x" if c is not None else "-"),
        ("Batch resume after SIGKILL: items redone", f"{redone:.0f}" if redone is not None
         else "-", "-", "-"),
    ]


def build_targets(res: dict[str, Any], plan: Plan) -> list[Target]:
    """Every target of the brief, judged from the measured figures."""
    lat, tput = res.get("w1_latency"), res.get("w1_throughput")
    w2, w3, w4, resp = res.get("w2"), res.get("w3"), res.get("w4"), res.get("respawn")
    w1r = ratio(fig(lat, "isobox_gap", "p50"), fig(lat, "floor", "p50"))
    w2r = ratio(fig(w2, "isobox", "p50"), fig(w2, "floor", "p50"))
    w3r = ratio(fig(w3, "isobox", "p50"), fig(w3, "floor", "p50"))
    rate = fig(tput, "isobox", "p50")
    err, nxt = fig(w4, "to_error", "p50"), fig(w4, "to_next", "p50")
    back, uss = fig(resp, "to_run", "p50"), fig(res.get("idle_memory"), "uss_mib", "p50")
    conf = fig(res.get("confinement"), "confine", "p50")

    def x(v: float | None) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    srate = fig(res.get("stream"), "isobox", "p50")
    sess, rec = res.get("session"), res.get("session_recovery")
    sr = ratio(fig(sess, "session", "p50"), fig(sess, "plain", "p50"))
    recovered, restored = fig(rec, "recovery", "p50"), fig(rec, "restore", "p50")
    rec_over = recovered - restored if recovered is not None and restored is not None else None
    tsr, proj = res.get("typescript"), res.get("project")
    ts_first = fig(tsr, "first", "p50")
    cached, plain = fig(tsr, "cached", "p50"), fig(tsr, "plain", "p50")
    ts_extra = cached - plain if cached is not None and plain is not None else None
    pr = ratio(fig(proj, "project", "p50"), fig(proj, "bundle", "p50"))
    rem = res.get("remote")
    rr = ratio(fig(rem, "remote_gap", "p50"), fig(rem, "floor", "p50"))
    rrate = fig(rem, "throughput", "p50")
    start_mib = fig(rem, "rss_start_mib")
    start_mb = start_mib * MIB / 1e6 if start_mib is not None else None
    growth = fig(rem, "growth_mib")
    bat = res.get("batch")
    mrate, mr = fig(bat, "map_rate", "p50"), ratio(fig(bat, "map_seconds", "p50"),
                                                 fig(bat, "floor_seconds"))
    crate, redone = fig(bat, "cli_rate", "p50"), fig(bat, "redone")
    once = None if bat is None or "missing" not in bat else float(
        bat["missing"] + bat["repeated"] + bat["wrong"])

    return [
        Target("W1 p50 (idle gap) <= 1.5x floor", w1r, 1.5, x(w1r)),
        Target(f">= 8000 runs/s, {THREADS} threads, 2 workers", rate, 8000,
               f"{rate:,.0f}/s" if rate is not None else "-", at_least=True),
        Target("W2 fib(25) <= 1.10x floor", w2r, 1.10, x(w2r)),
        Target("W3 100k ints <= 1.5x floor", w3r, 1.5, x(w3r)),
        Target("W4 error <= 150 ms (100 ms limit)", err, 0.150, ms(err)),
        Target("W4 next run <= 30 ms", nxt, 0.030, ms(nxt)),
        Target("Respawn <= 50 ms", back, 0.050, ms(back)),
        Target("Confinement < 5 ms per worker start", conf, 0.005, ms(conf)),
        Target("Idle USS <= 15 MiB", uss, 15.0, f"{uss:.1f} MiB" if uss is not None else "-"),
        Target(">= 100,000 stream values/s", srate, 100_000,
               f"{srate:,.0f}/s" if srate is not None else "-", at_least=True),
        Target("Session run p50 <= 1.5x plain run", sr, 1.5, x(sr)),
        Target("Session recovery <= 100 ms + restore", rec_over, 0.100, ms(rec_over)),
        Target("TS first compile <= 15 ms (warm worker)", ts_first, 0.015, ms(ts_first)),
        Target("TS cached repeat adds < 0.1 ms", ts_extra, 0.0001, ms(ts_extra)),
        Target("20-module project <= 3x bundled", pr, 3.0, x(pr)),
        Target("Remote 1+2 p50 <= 2.5x floor", rr, 2.5, x(rr)),
        Target(f">= 6000 remote runs/s, {CLIENTS} client processes", rrate, 6000,
               f"{rrate:,.0f}/s" if rrate is not None else "-", at_least=True),
        Target("Daemon RSS without workers < 60 MB", start_mb, 60.0,
               f"{start_mb:.1f} MB" if start_mb is not None else "-"),
        Target(f"Daemon RSS growth over {plan.remote_runs:,} runs < 10 MiB", growth, 10.0,
               f"{growth:+.1f} MiB" if growth is not None else "-"),
        Target(f">= 10,000 map items/s ({WORKERS} workers)", mrate, 10_000,
               f"{mrate:,.0f}/s" if mrate is not None else "-", at_least=True),
        Target("map time <= 1.5x floor per-item x N / workers", mr, 1.5, x(mr)),
        Target(">= 5,000 batch lines/s (journal included)", crate, 5_000,
               f"{crate:,.0f}/s" if crate is not None else "-", at_least=True),
        Target(f"resume redoes <= items in flight ({IN_FLIGHT})", redone, IN_FLIGHT,
               f"{redone:.0f}" if redone is not None else "-"),
        Target("resume: every index exactly once", once, 0,
               ("yes" if not once else f"{once:.0f} bad") if once is not None else "-"),
    ]


def notes(res: dict[str, Any]) -> list[str]:
    """Failures and side facts worth reading next to the table."""
    out = [f"{name}: FAILED: {err}" for name, err in res.get("errors", {}).items()]
    w3, w4, resp = res.get("w3") or {}, res.get("w4") or {}, res.get("respawn") or {}
    tput = res.get("w1_throughput") or {}
    if w3.get("isobox_failure"):
        out.append(f"W3 IsoBox run failed: {w3['isobox_failure']}")
    if w4:
        out.append(f"W4 timeout kinds: {w4.get('kinds')}; failures: {w4.get('failures') or 'none'}")
    if tput.get("isobox_errors"):
        out.append(f"W1 throughput: {tput['isobox_errors']} IsoBox runs raised")
    if resp:
        cost = fig(resp, "pool_stats_call", "p50")
        out.append(f"Respawn: {resp.get('restarts')} restarts counted; one pool_stats() call "
                   f"costs {ms(cost)} (median), so the poll period is ~1 ms plus that")
        late = [t for t in resp.get("samples_to_crash_event", []) if t > 0.1]
        out.append(f"Respawn: the death was noticed more than 100 ms after the kill in "
                   f"{len(late)} of {len(resp.get('samples_to_crash_event', []))} kills; "
                   f"slowest kill -> run ok: {ms(fig(resp, 'to_run', 'max'))}")
        out.append("Respawn breakdown (medians from the kill): pool reports worker:crashed "
                   f"after {ms(fig(resp, 'to_crash_event', 'p50'))}, worker:started after "
                   f"{ms(fig(resp, 'to_start_event', 'p50'))}, 2 idle seen after "
                   f"{ms(fig(resp, 'to_idle', 'p50'))}")
    out += remote_notes(res.get("remote") or {})
    out += batch_notes(res.get("batch") or {})
    return out


def batch_notes(bat: dict[str, Any]) -> list[str]:
    """The batch section's side facts: the floor, chunk_size=1, the kill and the resume."""
    out: list[str] = []
    if "map_seconds" in bat:
        seconds = bat["map_seconds"]
        out.append(f"Batch map: {seconds['n']} round(s) of {bat['map_items']:,} items "
                   f"(ordered=False, default chunks), {ms(seconds['min'])} .. "
                   f"{ms(seconds['max'])}; {bat['map_failed']} items failed; floor per item "
                   f"{ms(fig(bat, 'floor_item', 'p50'))} (median of {bat['floor_item']['n']:,} "
                   f"fresh contexts, input set from JSON text), so the floor time is "
                   f"{ms(bat['floor_seconds'])} for {bat['map_items']:,} items on {WORKERS} "
                   "workers")
        out.append(f"Batch map with chunk_size=1 (a context per item): "
                   f"{bat['single_rate']:,.0f} items/s over {bat['single_items']:,} items "
                   f"({bat['single_failed']} failed); the floor's "
                   f"{bat['floor_rate']:,.0f} items/s is {WORKERS} workers / per-item cost")
    if "cli_rate" in bat:
        rates = bat["cli_rate"]
        out.append(f"Batch CLI: {rates['n']} run(s) of `isobox batch --workers {WORKERS} --quiet` "
                   f"over {bat['cli_lines']:,} lines, {rates['min']:,.0f} .. "
                   f"{rates['max']:,.0f} lines/s (wall clock from spawn to exit); each output "
                   f"had {bat['cli_lines']:,} lines ({bat['cli_output_bytes']:,} bytes)")
    if "redone" in bat:
        journal = bat["kill_journaled"]
        out.append(f"Batch kill: SIGKILL {bat['killed_after']:.2f} s after the start, at "
                   f"{bat['kill_bytes']:,} bytes, {bat['kill_lines']:,} complete lines"
                   + (" and a torn one" if bat["kill_torn"] else "") + "; the journal held "
                   + (f"{journal:,}" if journal is not None else "(unreadable)")
                   + " indices; " + (f"its processes {bat['kill_outlived']} outlived it"
                                     if bat["kill_outlived"] else "none of its processes "
                                     "outlived it"))
        bad = bat["missing"] + bat["repeated"] + bat["wrong"]
        out.append(f"Batch resume: {bat['resume_ok']:,} ok + {bat['resume_failed']} failed "
                   f"run, {bat['resume_already']:,} already done, in "
                   f"{bat['resume_seconds']:.2f} s ({bat['resume_rate']:,.0f} items/s by its "
                   f"summary); redone = {bat['resume_ran']:,} - ({bat['map_items']:,} - "
                   f"{bat['kill_lines']:,}) = {bat['redone']}, bound {bat['in_flight']} "
                   f"(window {IN_FLIGHT // CLI_CHUNK} x chunk {CLI_CHUNK}): complete lines "
                   "the resume ran again; items done but not in the file at the kill (in "
                   "flight, or in the CLI's write buffer) are among the missing ones, so their "
                   "second run does not count here; final output "
                   f"{bat['final_lines']:,} lines, "
                   + ("every index exactly once with the right value" if not bad else
                      f"NOT exactly once: {bat['missing']} missing, {bat['repeated']} "
                      f"repeated, {bat['wrong']} wrong records"))
    if "section_seconds" in bat:
        out.append(f"Batch: section took {bat['section_seconds']:.0f} s")
    return out


def remote_notes(rem: dict[str, Any]) -> list[str]:
    """The remote section's side facts: memory along the way, clients, the daemon's end."""
    out: list[str] = []
    if "rss_start_mib" in rem:
        ready = rem.get("rss_workers_idle_mib")
        out.append(f"Remote: daemon pid {rem['daemon_pid']} (its own RSS only, not its fork "
                   f"server's or workers'): {rem['rss_start_mib']:.1f} MiB right after it "
                   "listened" + (f", {ready:.1f} MiB once its 2 workers were idle (still "
                                 "before any run)" if ready is not None else ""))
    if "per_client" in rem:
        out.append(f"Remote throughput: {rem['clients']} client processes x 1 thread, "
                   f"{rem['tput_seconds']} s windows; median per client "
                   f"{fig(rem, 'per_client', 'p50') or 0:,.0f} runs/s; "
                   f"{rem['throughput_errors']} runs raised; the daemon process itself spent "
                   f"{ms(rem['daemon_cpu_per_run'])} CPU per run; the floor column is W1's "
                   "floor (4 threads in this process)")
    samples = rem.get("growth_samples")
    if samples:
        half = samples[len(samples) // 2]
        out.append("Remote growth: daemon RSS in MiB after N runs: " + "; ".join(
            f"{runs:,}: {mib:.1f}" for runs, mib in samples) + "; over the second half "
            f"{samples[-1][1] - half[1]:+.1f} MiB")
        out.append(f"Remote growth runs: one client, {rem['growth_threads']} threads, "
                   f"{rem['growth_rate']:,.0f} runs/s, {rem['growth_failures']} failed, "
                   f"{rem['worker_restarts']} worker restarts meanwhile (the daemon recycles a "
                   "worker after ~10,000 runs by default)")
    stop = rem.get("stop")
    if stop:
        out.append(f"Remote: daemon stopped by {stop['how']} in {ms(stop['seconds'])}, exit "
                   f"code {stop['returncode']}; section took {rem.get('section_seconds', 0):.0f} s"
                   + (f"; its processes {stop['outlived']} outlived it" if stop["outlived"]
                      else "; none of its processes outlived it"))
    return out


def print_report(env: dict[str, Any], res: dict[str, Any], targets: list[Target],
                 plan: Plan) -> None:
    """The readable table, the targets and the notes."""
    qjs = env["quickjs_ng"]
    print(f"\nIsoBox benchmark ({env['mode']} run, {env['elapsed']:.0f} s)")
    print(f"quickjs-ng {qjs['version']} ({qjs['build']}; tags: {', '.join(qjs['tags']) or '-'})")
    print(f"Python {env['python']}, {env['cpus']} CPUs, load average at start "
          f"{env['loadavg_start']}, at end {env['loadavg_end']}")
    print(f"other processes kept {env['other_cores_busy']:.2f} of {env['cpus']} cores busy on "
          "average during the run" + ("  << figures are skewed by that load"
                                      if env["other_cores_busy"] > 0.25 else ""))
    rows = build_rows(res, plan)
    width = max(len(r[0]) for r in rows)
    header = ("metric", "IsoBox", "floor", "IsoBox/floor")
    print(f"\n{header[0]:<{width}}  {header[1]:>12}  {header[2]:>12}  {header[3]:>12}")
    print("-" * (width + 42))
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>12}  {row[2]:>12}  {row[3]:>12}")
    print("\ntargets")
    width = max(len(t.name) for t in targets)
    for target in targets:
        print(f"  {target.name:<{width}}  {target.shown:>12}  {target.status}")
    extra = notes(res)
    if extra:
        print("\nnotes")
        for line in extra:
            print(f"  - {line}")


# -- running it --------------------------------------------------------------------------------
def guarded(res: dict[str, Any], name: str, step: Callable[[], dict[str, Any]]) -> None:
    """Run one section; a failure is recorded under ``errors`` and the run goes on."""
    print(f"  {name} ...", file=sys.stderr, flush=True)
    gc.collect()
    try:
        res[name] = step()
    except Exception as exc:  # a report, not a gate: record and continue
        res.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)


def leftovers(seen: set[int]) -> list[int]:
    """Processes this benchmark caused to start that still live (zombies excluded)."""
    seen.update(child.pid for child in psutil.Process().children(recursive=True))
    deadline = time.monotonic() + 3.0
    while True:
        alive = []
        for pid in sorted(seen):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def reap(pids: list[int]) -> None:
    """SIGKILL processes this benchmark started that shutdown left behind."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_all(plan: Plan) -> dict[str, Any]:
    """Every section, in order; returns their figures (plus leftover processes)."""
    res: dict[str, Any] = {}
    seen: set[int] = set()
    box: IsoBox | None = None
    try:
        box = make_box()
        main_box = box
        seen.update(child.pid for child in psutil.Process().children(recursive=True))
        guarded(res, "w1_latency", lambda: bench_w1_latency(main_box, plan))
        guarded(res, "w1_throughput", lambda: bench_w1_throughput(main_box, plan))
        guarded(res, "w2", lambda: bench_w2(main_box, plan))
        guarded(res, "w4", lambda: bench_w4(main_box, plan))
        guarded(res, "idle_memory", lambda: bench_idle_memory(main_box))
        guarded(res, "w3", lambda: bench_w3(main_box, plan))
        guarded(res, "stream", lambda: bench_stream(main_box, plan))
        guarded(res, "session", lambda: bench_session(main_box, plan))
        guarded(res, "session_recovery", lambda: bench_session_recovery(main_box, plan))
        guarded(res, "project", lambda: bench_project(main_box, plan))
        seen.update(child.pid for child in psutil.Process().children(recursive=True))
        seen.update(w.pid for w in main_box.pool_stats().workers)
    except Exception as exc:  # the box itself failed to start: still report
        res.setdefault("errors", {})["setup"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    finally:
        if box is not None:
            box.shutdown()
    guarded(res, "respawn", lambda: bench_respawn(plan, seen))
    guarded(res, "typescript", lambda: bench_typescript(plan))
    guarded(res, "confinement", lambda: bench_confinement(plan))
    guarded(res, "prelude", lambda: bench_prelude(plan))
    guarded(res, "remote", lambda: bench_remote(plan, seen))
    guarded(res, "batch", lambda: bench_batch(plan, seen))
    res["leftover_pids"] = leftovers(seen)
    return res


def busy_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy, and this process with its reaped children."""
    total = psutil.cpu_times()
    busy = sum(total) - total.idle - getattr(total, "iowait", 0.0)
    # guest time is already counted in user time
    busy -= getattr(total, "guest", 0.0) + getattr(total, "guest_nice", 0.0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system + own.children_user + own.children_system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (about 20 s)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    env: dict[str, Any] = {
        "mode": "quick" if args.quick else "full", "plan": asdict(plan),
        "quickjs_ng": quickjs_build(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    started = time.perf_counter()
    machine_before, own_before = busy_cpu_seconds()
    print("running sections:", file=sys.stderr)
    res = run_all(plan)
    env["elapsed"] = time.perf_counter() - started
    machine_after, own_after = busy_cpu_seconds()
    env["other_cores_busy"] = max(0.0, (machine_after - machine_before)
                                  - (own_after - own_before)) / env["elapsed"]
    env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    targets = build_targets(res, plan)
    print_report(env, res, targets, plan)
    if res["leftover_pids"]:
        print(f"\nWARNING: processes left behind after shutdown: {res['leftover_pids']}; "
              "killing them")
        reap(res["leftover_pids"])
    else:
        print("\nno processes left behind")
    if args.json:
        doc = {"env": env, "results": res,
               "targets": [{"name": t.name, "measured": t.measured, "limit": t.limit,
                            "at_least": t.at_least, "status": t.status} for t in targets]}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, default=str)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
