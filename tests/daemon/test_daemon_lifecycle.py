"""Faults and lifecycle with real signals: a worker killed during a remote run, SIGTERM and
SIGINT draining in-flight runs, SIGKILL of the daemon (nothing of it may survive, clients get
DaemonError), and observability: /metrics, /healthz, `isobox status`, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from typing import Any

import psutil
import pytest
from daemon_helpers import (
    ISOBOX_CLI,
    READY,
    Background,
    Daemon,
    Gate,
    StartDaemon,
    free_port,
    gone,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from isobox import (
    DaemonError,
    IsoBox,
    MemoryLimitError,
    ScriptError,
    WorkerCrashedError,
)
from isobox import TimeoutError as BoxTimeoutError

pytestmark = pytest.mark.timeout(20)


def busy_worker(daemon: Daemon) -> int:
    """The pid of the one busy worker, once there is one."""
    assert wait_until(lambda: len(daemon.busy_workers()) == 1, 10), "no run reached a worker"
    (pid,) = daemon.busy_workers()
    return pid


# -- worker faults ---------------------------------------------------------------------------
def test_killed_worker_is_worker_crashed_error(daemon: Daemon) -> None:
    """kill -9 of the worker running a remote client's script: the client gets
    WorkerCrashedError with the worker's pid and signal 9; the daemon replaces the worker and
    serves the next run."""
    box = daemon.box()
    restarts = daemon.stats()["restarts"]
    call = Background(lambda: box.run("while (true) {}", timeout=15))
    pid = busy_worker(daemon)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError) as info:
        call.result(10)
    assert info.value.pid == pid
    assert info.value.signal == signal.SIGKILL
    assert box.run("1 + 1") == 2
    assert pid not in {w.pid for w in box.pool_stats().workers}
    assert daemon.stats()["restarts"] > restarts
    assert daemon.wait_log(f"worker {pid} crashed")


# -- SIGTERM / SIGINT ------------------------------------------------------------------------
def test_sigterm_drains_in_flight_runs(start_daemon: StartDaemon) -> None:
    """SIGTERM: the socket goes at once (new connections are refused); a connected client's
    new request is refused; /healthz says 503 draining; a run that ends within --grace
    finishes normally; a run longer than the grace is cancelled and its client gets
    DaemonError, not a hang; exit 0."""
    port = free_port()
    daemon = start_daemon("--workers", "2", "--grace", "4", "--metrics-port", str(port))
    assert daemon.socket_path is not None
    assert scrape(port, "/healthz")[0] == 200
    short_box, long_box, idle_box = daemon.box(), daemon.box(), daemon.box()
    gate = Gate()
    short = Background(lambda: short_box.run("gate(); 'finished'", functions={"gate": gate}))
    assert gate.entered.wait(10)
    long = Background(lambda: long_box.run("while (true) {}", timeout=30))
    assert wait_until(lambda: len(daemon.busy_workers()) == 2, 10)
    daemon.signal(signal.SIGTERM)

    assert wait_until(lambda: not os.path.exists(str(daemon.socket_path)), 5)
    with pytest.raises(DaemonError, match="cannot reach the daemon"):
        IsoBox(address=daemon.address)
    with pytest.raises(DaemonError, match="shutting down"):
        idle_box.run("1")
    status, text = scrape(port, "/healthz")
    assert (status, text.strip()) == (503, "draining")
    gate.open()  # well within the grace period
    assert short.result(10) == "finished"
    with pytest.raises(DaemonError):
        long.result(15)
    assert daemon.wait_exit(15) == 0
    assert daemon.wait_log("draining 2 in-flight requests")
    assert not os.path.exists(str(daemon.socket_path))


def test_sigint_with_idle_clients_exits_cleanly(start_daemon: StartDaemon) -> None:
    """SIGINT drains like SIGTERM: with nothing in flight the daemon exits 0 and removes its
    socket; a connected client's next request is DaemonError (the daemon is gone)."""
    daemon = start_daemon()
    box = daemon.box()
    assert box.run("1") == 1
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit(15) == 0
    assert not os.path.exists(str(daemon.socket_path))
    with pytest.raises(DaemonError):
        box.run("2")


# -- SIGKILL of the daemon -------------------------------------------------------------------
def test_sigkill_leaves_nothing_behind(start_daemon: StartDaemon) -> None:
    """SIGKILL of the daemon with a run in flight: its fork server and every worker are gone
    within a few seconds, the client gets DaemonError (connection lost) instead of hanging;
    a new daemon starts over the stale socket and the client's next request reconnects."""
    daemon = start_daemon("--workers", "2", "--min-workers", "2")
    box = daemon.box()
    call = Background(lambda: box.run("while (true) {}", timeout=30))
    busy_worker(daemon)
    procs = daemon.track()
    assert len(procs) >= 3  # fork server and two workers
    daemon.proc.kill()  # type: ignore[union-attr]
    daemon.wait_exit(5)
    with pytest.raises(DaemonError, match="lost"):
        call.result(10)
    assert wait_until(lambda: all(gone(p) for p in procs), 5), \
        [p.pid for p in procs if not gone(p)]
    fresh = start_daemon()  # the socket file it left is stale now
    assert "removed the stale socket" in fresh.log()
    assert box.run("'back'") == "back"  # the old box's next request reconnects
    assert box.pool_stats().workers[0].pid in {p.pid for p in fresh.track()}
    box.shutdown()


# -- observability ---------------------------------------------------------------------------
def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(page: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def total(page: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _labels), v in page.items() if n == name)


def test_metrics_and_healthz(start_daemon: StartDaemon) -> None:
    """/healthz is 200 'ok'; /metrics counters move with runs: ok, timeout (cpu), memory,
    error, rejected; durations are observed; gauges show workers and clients."""
    port = free_port()
    daemon = start_daemon("--metrics-port", str(port))
    status, text = scrape(port, "/healthz")
    assert (status, text.strip()) == (200, "ok")
    assert scrape(port, "/elsewhere")[0] == 404
    before = samples(scrape(port)[1])

    box = daemon.box()
    assert box.run("1") == 1
    assert box.run("2") == 2
    with pytest.raises(BoxTimeoutError):
        box.run("while (true) {}", timeout=5, cpu_timeout=0.3)
    with pytest.raises(MemoryLimitError):
        box.run("const a = []; while (true) a.push('x'.repeat(1000) + a.length)",
                memory_limit=8 * 2**20)
    with pytest.raises(ScriptError):
        box.run("throw new Error('x')")
    with pytest.raises(DaemonError):
        box.run("1", memory_limit=4 * 2**30)

    after = samples(scrape(port)[1])
    moved = {outcome: value(after, "isobox_executions_total", outcome=outcome)
             - value(before, "isobox_executions_total", outcome=outcome)
             for outcome in ("ok", "timeout", "memory", "error", "rejected", "crashed")}
    assert moved == {"ok": 2, "timeout": 1, "memory": 1, "error": 1, "rejected": 1,
                     "crashed": 0}
    assert value(after, "isobox_timeouts_total", kind="cpu") \
        - value(before, "isobox_timeouts_total", kind="cpu") == 1
    assert value(after, "isobox_memory_limit_hits_total") \
        - value(before, "isobox_memory_limit_hits_total") == 1
    assert value(after, "isobox_execution_duration_seconds_count") \
        - value(before, "isobox_execution_duration_seconds_count") == 6
    assert total(after, "isobox_worker_restarts_total") >= 1  # timeouts retire workers
    assert value(after, "isobox_clients") >= 1
    assert value(after, "isobox_workers", state="idle") >= 1
    assert value(after, "isobox_queue_depth") == 0


def test_status_command(daemon: Daemon) -> None:
    """`isobox status --address` prints the daemon's pid, address and workers; --json gives
    the same figures as one object; a dead address exits 7 with a message."""
    with IsoBox(address=daemon.address) as box:
        assert box.run("1") == 1
    text = subprocess.run([ISOBOX_CLI, "status", "--address", daemon.address],
                          capture_output=True, text=True, timeout=15, check=True).stdout
    assert f"daemon {daemon.pid} at {daemon.address}" in text
    workers = {int(w["pid"]) for w in daemon.stats()["workers"]}
    assert any(f"worker {pid}:" in text for pid in workers)
    out = subprocess.run([ISOBOX_CLI, "status", "--address", daemon.address, "--json"],
                         capture_output=True, text=True, timeout=15, check=True).stdout
    figures: dict[str, Any] = json.loads(out)
    assert figures["pid"] == daemon.pid
    assert figures["runs"] >= 1
    assert figures["address"] == daemon.address
    assert {w["pid"] for w in figures["workers"]} <= {p.pid for p in daemon.track()}
    dead = subprocess.run([ISOBOX_CLI, "status", "--address",
                           f"unix://{daemon.workdir}/nobody.sock"],
                          capture_output=True, text=True, timeout=15, check=False)
    assert dead.returncode == 7
    assert "cannot reach the daemon" in dead.stderr


def test_json_logs(start_daemon: StartDaemon) -> None:
    """--log-format json: every log line on stderr is a JSON object with ts, level, logger,
    message and pid (the one plain line is the documented readiness line)."""
    daemon = start_daemon("--log-format", "json", "--log-level", "debug")
    with IsoBox(address=daemon.address) as box:
        assert box.run("1") == 1
        with pytest.raises(BoxTimeoutError):
            box.run("while (true) {}", timeout=0.3)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(15) == 0
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines if not line.startswith(READY)]
    assert len(entries) == len(lines) - 1
    for entry in entries:
        assert {"ts", "level", "logger", "message", "pid"} <= set(entry)
        assert entry["pid"] == daemon.pid
    messages = " | ".join(e["message"] for e in entries)
    assert "listening on" in messages
    assert "connected" in messages
    assert "recycled" in messages or "crashed" in messages
    assert "stopped" in messages
    assert {e["level"] for e in entries} <= {"DEBUG", "INFO", "WARNING", "ERROR"}


def test_worker_processes_belong_to_the_daemon(daemon: Daemon) -> None:
    """Every worker pid the daemon reports is one of its own descendant processes, confined
    (no new privileges, seccomp) as in embedded mode."""
    with IsoBox(address=daemon.address) as box:
        box.run("1")
        stats = box.pool_stats()
    mine = {p.pid for p in daemon.track()}
    assert {w.pid for w in stats.workers} <= mine
    for worker in stats.workers:
        assert "seccomp" in worker.confinement
        assert psutil.Process(worker.pid).ppid() in mine  # forked by the daemon's fork server
