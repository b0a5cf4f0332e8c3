"""Queue and per-client limits, and where settings come from: the command line, ISOBOX_*
environment variables, a TOML file, and SIGHUP re-reading that file.

Runs are held in flight with a host function that blocks until the test opens its gate, so
"in flight" and "queued" are states the test sees (in the daemon's figures), not timings."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path

import pytest
from daemon_helpers import Background, Daemon, Gate, StartDaemon, wait_until

from isobox import DaemonError, IsoBox
from isobox import TimeoutError as BoxTimeoutError

pytestmark = pytest.mark.timeout(20)


def hold(box: IsoBox, gate: Gate, value: str = "held") -> Background:
    """Start a run that waits at ``gate``; returns once it is in flight in a worker."""
    call = Background(lambda: box.run(f"gate(); '{value}'", functions={"gate": gate}))
    assert gate.entered.wait(10), "the held run never reached its worker"
    return call


def queued(daemon: Daemon, n: int) -> bool:
    """Wait until the daemon reports ``n`` requests waiting for a worker."""
    return wait_until(lambda: daemon.stats()["queued"] == n, 5)


def test_queue_full_refuses_the_excess(start_daemon: StartDaemon) -> None:
    """--workers 1 --max-queue 2: one run in flight and two waiting fill the daemon; more
    concurrent runs get DaemonError 'queue is full' at once; the others all succeed."""
    daemon = start_daemon("--workers", "1", "--max-queue", "2")
    box = daemon.box()
    gate = Gate()
    running = hold(box, gate)
    waiting = [Background(partial(box.run, f"{i} * 10")) for i in range(2)]
    assert queued(daemon, 2)
    other = daemon.box()  # the bound is for all clients together
    for code in ("1", "2"):
        with pytest.raises(DaemonError, match="queue is full"):
            box.run(code)
        with pytest.raises(DaemonError, match="queue is full"):
            other.run(code)
    gate.open()
    assert running.result() == "held"
    assert sorted(w.result() for w in waiting) == [0, 10]
    assert box.run("'room again'") == "room again"


def test_per_client_queue_bound(start_daemon: StartDaemon) -> None:
    """--max-client-queue 1: a client's second waiting request is refused, naming the
    client's share; another client may still queue."""
    daemon = start_daemon("--workers", "1", "--max-client-queue", "1")
    box, other = daemon.box(), daemon.box()
    gate = Gate()
    running = hold(box, gate)
    first = Background(lambda: box.run("'first'"))
    assert queued(daemon, 1)
    with pytest.raises(DaemonError, match="this client already has 1 waiting"):
        box.run("'second'")
    third = Background(lambda: other.run("'other'"))
    assert queued(daemon, 2)
    gate.open()
    assert (running.result(), first.result(), third.result()) == ("held", "first", "other")


def test_queued_run_times_out_if_no_worker_frees(start_daemon: StartDaemon) -> None:
    """A run that waits in the queue past its own timeout is TimeoutError(kind='wall'); it
    leaves the queue."""
    daemon = start_daemon("--workers", "1")
    box = daemon.box()
    gate = Gate()
    running = hold(box, gate)
    with pytest.raises(BoxTimeoutError) as info:
        box.run("1", timeout=0.5)
    assert info.value.kind == "wall"
    assert queued(daemon, 0)
    gate.open()
    assert running.result() == "held"


def test_max_client_runs(start_daemon: StartDaemon) -> None:
    """--max-client-runs 1: a client's second concurrent request is DaemonError naming the
    limit; other clients are not affected; after the first ends the client may run again."""
    daemon = start_daemon("--max-client-runs", "1")
    box = daemon.box()
    gate = Gate()
    running = hold(box, gate)
    with pytest.raises(DaemonError, match="already has 1 requests in flight"):
        box.run("2")
    other = daemon.box()
    assert other.run("'other client'") == "other client"
    gate.open()
    assert running.result() == "held"
    assert box.run("3") == 3


def test_env_var_sets_the_worker_count(start_daemon: StartDaemon) -> None:
    """ISOBOX_WORKERS=1 (no --workers): one run at a time, the next waits in the queue, and
    the pool never has more than one worker."""
    daemon = start_daemon(defaults=False, ISOBOX_WORKERS="1", ISOBOX_GRACE="2")
    check_single_worker(daemon)


def test_toml_sets_the_worker_count(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """`workers = 1` in the --config TOML file is honoured like --workers 1 (also inside a
    [supervisor] table)."""
    config = tmp_path / "isobox.toml"
    config.write_text("[supervisor]\nworkers = 1\ngrace = 2\n")
    daemon = start_daemon("--config", str(config), defaults=False)
    check_single_worker(daemon)


def check_single_worker(daemon: Daemon) -> None:
    box = daemon.box()
    gate = Gate()
    running = hold(box, gate)
    waiting = Background(lambda: box.run("'second'"))
    assert queued(daemon, 1)  # with two workers it would be running already
    assert len(box.pool_stats().workers) <= 1
    gate.open()
    assert (running.result(), waiting.result()) == ("held", "second")
    results = [Background(partial(box.run, f"{i}")) for i in range(4)]
    assert [r.result() for r in results] == [0, 1, 2, 3]
    assert len(box.pool_stats().workers) <= 1


def test_command_line_beats_env_beats_file(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """The command line wins over the environment, which wins over the TOML file."""
    config = tmp_path / "isobox.toml"
    config.write_text("workers = 1\nmax_client_runs = 1\nmax_queue = 1\n")
    daemon = start_daemon("--config", str(config), "--max-queue", "50",
                          ISOBOX_MAX_CLIENT_RUNS="5")
    log = daemon.log()
    assert "(2 workers)" in log  # --workers 2 from the fixture beats the file's 1
    box = daemon.box()
    gate = Gate()
    running = [hold(box, gate, "a")]
    gate.entered.clear()
    running.append(hold(box, gate, "b"))  # max_client_runs 5 (env) beats 1 (file)
    waiting = [Background(partial(box.run, f"{i}")) for i in range(2)]
    assert queued(daemon, 2)  # max_queue 50 (command line) beats 1 (file)
    gate.open()
    assert [r.result() for r in running] == ["a", "b"]
    assert [w.result() for w in waiting] == [0, 1]


def test_bad_config_is_a_usage_error(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """An unknown key in the TOML file, or a non-number in an ISOBOX_ variable, exits 2
    naming it."""
    config = tmp_path / "isobox.toml"
    config.write_text("workers = 1\nwrokers = 2\n")
    daemon = start_daemon("--config", str(config), ready=False)
    assert daemon.wait_exit(15) == 2
    assert "wrokers" in daemon.log()
    daemon = start_daemon(ready=False, ISOBOX_MAX_QUEUE="many")
    assert daemon.wait_exit(15) == 2
    assert "many" in daemon.log()


def test_sighup_reloads_limits_without_dropping_runs(start_daemon: StartDaemon,
                                                    tmp_path: Path) -> None:
    """max_client_runs = 1 in the TOML file limits a client to one request; after editing it
    to 3 and SIGHUP, the same client (same connection) may run more at once, and the run in
    flight across the reload finishes normally."""
    config = tmp_path / "isobox.toml"
    config.write_text("max_client_runs = 1\n")
    daemon = start_daemon("--config", str(config))
    box = daemon.box()
    gate = Gate()
    running = hold(box, gate)
    with pytest.raises(DaemonError, match="already has 1 requests in flight"):
        box.run("2")
    config.write_text("max_client_runs = 3\n")
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_log("SIGHUP: configuration reloaded")
    assert box.run("2") == 2  # a second request while the first is still in flight
    assert not running.done()
    gate.open()
    assert running.result() == "held"
    assert daemon.alive()


def test_sighup_with_a_broken_file_keeps_the_old_config(start_daemon: StartDaemon,
                                                       tmp_path: Path) -> None:
    """A SIGHUP while the TOML file is broken logs a warning and keeps the running
    configuration; the daemon goes on serving."""
    config = tmp_path / "isobox.toml"
    config.write_text("max_client_runs = 1\n")
    daemon = start_daemon("--config", str(config))
    config.write_text("max_client_runs = [\n")
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_log("could not be reloaded")
    box = daemon.box()
    gate = Gate()
    running = hold(box, gate)
    with pytest.raises(DaemonError, match="already has 1 requests in flight"):
        box.run("2")
    gate.open()
    assert running.result() == "held"
    assert daemon.alive()


def test_sighup_keeps_settings_that_need_a_restart(start_daemon: StartDaemon,
                                                  tmp_path: Path) -> None:
    """A SIGHUP after changing `workers` in the file logs that it needs a restart and keeps
    the running worker count; limits in the same file change at once."""
    config = tmp_path / "isobox.toml"
    config.write_text("workers = 1\nmax_client_runs = 1\n")
    daemon = start_daemon("--config", str(config), defaults=False)
    config.write_text("workers = 3\nmax_client_runs = 2\n")
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_log("change only with a restart")
    assert daemon.wait_log("SIGHUP: configuration reloaded")
    box = daemon.box()
    gate = Gate()
    running = hold(box, gate)
    waiting = Background(lambda: box.run("'second'"))  # allowed now (2 in flight) ...
    assert queued(daemon, 1)  # ... but it waits: still one worker
    with pytest.raises(DaemonError, match="already has 2 requests in flight"):
        box.run("3")
    gate.open()
    assert (running.result(), waiting.result()) == ("held", "second")


def test_ceilings_from_the_command_line(start_daemon: StartDaemon) -> None:
    """--max-timeout and --max-memory bound every request: at the ceiling a run goes, above
    it the request is DaemonError naming the ceiling (a box's default 30s timeout included)."""
    daemon = start_daemon("--max-timeout", "2", "--max-memory", str(64 * 2**20))
    box = daemon.box(timeout=2)
    assert box.run("1", memory_limit=64 * 2**20) == 1
    with pytest.raises(DaemonError, match=r"timeouts up to 2\.0s"):
        box.run("1", timeout=2.5)
    with pytest.raises(DaemonError, match=r"timeouts up to 2\.0s"):
        box.run("1", cpu_timeout=3)
    with pytest.raises(DaemonError, match=f"ceiling of {64 * 2**20} bytes"):
        box.run("1", memory_limit=64 * 2**20 + 1)
    with pytest.raises(DaemonError, match=r"timeouts up to 2\.0s"):
        daemon.box().run("1")  # IsoBox's default timeout is 30s
