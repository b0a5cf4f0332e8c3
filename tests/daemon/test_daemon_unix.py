"""A real daemon on a Unix socket and real remote clients: results, console, every error type
with its attributes, host functions, validate_code, run_project, pool figures; the socket's
mode, a second daemon on a live socket, a stale socket, unsafe paths."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import ISOBOX_CLI, Daemon, StartDaemon, base_env, wait_until

from isobox import (
    ClosedError,
    CompileError,
    DaemonError,
    IsoBox,
    MemoryLimitError,
    ScriptError,
    SerializationError,
)
from isobox import TimeoutError as BoxTimeoutError

pytestmark = pytest.mark.timeout(20)
MIB = 2**20


@pytest.fixture(scope="module")
def box(shared_daemon: Daemon) -> IsoBox:
    """One remote box on the module's daemon (closed with it)."""
    return shared_daemon.box(timeout=10)


def daemon_pids(daemon: Daemon) -> set[int]:
    """Pids of the daemon's processes seen so far (fork server and workers)."""
    daemon.track()
    return {pid for pid, _created in daemon.seen}


# -- results and console ---------------------------------------------------------------------
def test_run_returns_values(box: IsoBox) -> None:
    """Completion values cross as in embedded mode, sandbox globals included."""
    assert box.run("1+2") == 3
    assert box.run("({a: [1, 'two', null, true, 2.5], s: 'é😀'})") == {
        "a": [1, "two", None, True, 2.5], "s": "é😀"}
    assert box.run("n * 2 + xs.length", sandbox={"n": 20, "xs": [1, 2]}) == 42
    assert box.run("await Promise.resolve(7)") == 7


def test_execute_reports_the_worker_and_the_console(box: IsoBox,
                                                    shared_daemon: Daemon) -> None:
    """execute() gives the value, type, console lines and the pid of a daemon worker."""
    result = box.execute("console.log('a', 1); console.warn('w'); console.error('e'); [1]")
    assert result.value == [1]
    assert result.type == "array"
    assert result.console == [("log", "a 1"), ("warn", "w"), ("error", "e")]
    assert result.worker_pid in daemon_pids(shared_daemon)
    assert result.duration > 0


def test_on_output_gets_each_line_once(box: IsoBox) -> None:
    """on_output(kind, message) is called once per line, in order."""
    seen: list[tuple[str, str]] = []
    result = box.execute("for (let i = 0; i < 5; i++) console.log('line ' + i); 'done'",
                         on_output=lambda kind, message: seen.append((kind, message)))
    assert result.value == "done"
    assert seen == [("log", f"line {i}") for i in range(5)]
    assert result.console == seen


def test_output_arrives_while_the_run_goes_on(box: IsoBox) -> None:
    """Console lines reach the client during the run: a host function called after the line
    (and a stretch of promise jobs, during which the worker flushes its console) finds it
    already delivered."""
    seen: list[tuple[str, str]] = []

    def arrived() -> bool:
        return wait_until(lambda: bool(seen), 5.0)

    value = box.run("console.log('early'); for (let i = 0; i < 200000; i++) await 0; "
                    "arrived()", functions={"arrived": arrived},
                    on_output=lambda kind, message: seen.append((kind, message)))
    assert value is True
    assert seen == [("log", "early")]


def test_console_off_and_inherit(box: IsoBox, capsys: pytest.CaptureFixture[str]) -> None:
    """console='off' drops lines; 'inherit' prints them in the client (log to stdout, error to
    stderr)."""
    quiet = box.execute("console.log('hidden'); 1", console="off")
    assert quiet.value == 1 and quiet.console == []
    box.run("console.log('to stdout'); console.error('to stderr')", console="inherit")
    out, err = capsys.readouterr()
    assert "to stdout" in out and "to stderr" in err
    assert "hidden" not in out + err


# -- errors ----------------------------------------------------------------------------------
def test_cpu_timeout_crosses(box: IsoBox) -> None:
    """A busy loop past cpu_timeout is TimeoutError(kind='cpu', limit) in the client (also a
    builtin TimeoutError)."""
    with pytest.raises(BoxTimeoutError) as info:
        box.run("while (true) {}", timeout=8, cpu_timeout=0.5)
    assert info.value.kind == "cpu"
    assert info.value.limit == 0.5
    assert isinstance(info.value, TimeoutError)
    assert box.run("1") == 1


def test_wall_timeout_crosses(box: IsoBox) -> None:
    """Waiting on a timer past the wall timeout is TimeoutError(kind='wall')."""
    with pytest.raises(BoxTimeoutError) as info:
        box.run("await new Promise(r => setTimeout(r, 20000))", timeout=0.5)
    assert info.value.kind == "wall"
    assert info.value.limit == 0.5
    assert box.run("2") == 2


def test_memory_limit_crosses(box: IsoBox, shared_daemon: Daemon) -> None:
    """Allocating past memory_limit is MemoryLimitError with .limit and the worker's pid."""
    with pytest.raises(MemoryLimitError) as info:
        box.run("const a = []; while (true) a.push('x'.repeat(1000) + a.length)",
                memory_limit=8 * MIB)
    assert info.value.limit == 8 * MIB
    assert info.value.worker_pid in daemon_pids(shared_daemon)
    assert box.run("3") == 3


def test_script_error_crosses(box: IsoBox) -> None:
    """A thrown error is ScriptError with the JS name, message and a sandbox-only stack."""
    with pytest.raises(ScriptError) as info:
        box.run("function f() { throw new TypeError('boom') }\nf()")
    err = info.value
    assert type(err) is ScriptError
    assert (err.name, err.message) == ("TypeError", "boom")
    assert "<input>" in err.stack and "/work" not in err.stack
    assert err.worker_pid is not None


def test_compile_error_crosses(box: IsoBox) -> None:
    """A syntax error is CompileError with the user's line and column."""
    with pytest.raises(CompileError) as info:
        box.run("let a = 1;\nlet b = ;")
    assert (info.value.line, info.value.column) == (2, 9)
    assert info.value.name == "SyntaxError"


@pytest.mark.parametrize(("code", "path"), [("({f() {}})", "result.f"),
                                            ("[1, Symbol('s')]", "result[1]")])
def test_serialization_error_crosses(box: IsoBox, code: str, path: str) -> None:
    """A value that cannot cross is SerializationError naming its path."""
    with pytest.raises(SerializationError) as info:
        box.run(code)
    assert info.value.path == path


def test_result_over_max_result_size_is_serialization_error(shared_daemon: Daemon) -> None:
    """A result over max_result_size (sent as max_result) is refused in the worker."""
    shared_daemon.settled()  # no worker starting while we connect (see test_daemon_clients)
    with IsoBox(address=shared_daemon.address, max_result_size=1000) as small:
        with pytest.raises(SerializationError, match="exceeds the cap of 1000"):
            small.run("'x'.repeat(5000)")
        assert small.run("'ok'") == "ok"


def test_daemon_ceilings_refuse_requests(box: IsoBox) -> None:
    """memory_limit above --max-memory and timeouts above --max-timeout are a DaemonError
    naming the ceiling; no worker is involved."""
    with pytest.raises(DaemonError, match="ceiling of 1073741824 bytes") as info:
        box.run("1", memory_limit=2 * 2**30)
    assert info.value.worker_pid is None
    with pytest.raises(DaemonError, match="timeouts up to 300"):
        box.run("1", timeout=301)
    assert box.run("1") == 1


# -- host functions, validation, projects ----------------------------------------------------
def test_host_functions_run_in_the_calling_thread(box: IsoBox) -> None:
    """Host functions are called back in the client, in the thread that made the run, with
    JS values converted both ways."""
    threads: list[int] = []

    def add(a: int, b: int) -> int:
        threads.append(threading.get_ident())
        return a + b

    def echo(value: Any) -> Any:
        return {"got": value}

    value = box.run("[add(1, 2), add(add(3, 4), 5), echo({x: [1, 'a', null]})]",
                    functions={"add": add, "echo": echo})
    assert value == [3, 12, {"got": {"x": [1, "a", None]}}]
    assert threads == [threading.get_ident()] * 3


def test_async_and_failing_host_functions(box: IsoBox) -> None:
    """An async def host function is awaited in the client; one that raises becomes a JS
    error the script can catch (and a ScriptError if it does not)."""

    async def double(x: int) -> int:
        return x * 2

    def boom() -> None:
        raise ValueError("nope")

    assert box.run("await double(21)", functions={"double": double}) == 42
    caught = box.run("try { boom() } catch (e) { 'caught: ' + e.message }",
                     functions={"boom": boom})
    assert caught.startswith("caught: ") and "nope" in caught
    with pytest.raises(ScriptError, match="nope"):
        box.run("boom()", functions={"boom": boom})


def test_many_host_calls_in_one_run(box: IsoBox) -> None:
    """Hundreds of round trips to the client in one run all arrive, in order."""
    seen: list[int] = []

    def note(i: int) -> int:
        seen.append(i)
        return i

    total = box.run("let s = 0; for (let i = 0; i < 300; i++) s += note(i); s",
                    functions={"note": note})
    assert total == sum(range(300))
    assert seen == list(range(300))


def test_validate_code(box: IsoBox) -> None:
    """validate_code parses in a worker: valid code, or CompileError with line and column."""
    ok = box.validate_code("const a = 1; a + 1")
    assert ok.valid and ok.error is None
    bad = box.validate_code("1 +\n(")
    assert not bad.valid
    assert isinstance(bad.error, CompileError)
    assert bad.error.line == 2


def test_run_project(box: IsoBox) -> None:
    """A multi-file CommonJS project runs from its entrypoint; errors in a module cross."""
    files = {"/main.js": "const lib = require('./lib'); lib.twice(require('./data.json').n)",
             "/lib.js": "exports.twice = (x) => x * 2",
             "/data.json": '{"n": 21}'}
    assert box.run_project(files, "/main.js") == 42
    with pytest.raises(ScriptError, match="bad module"):
        box.run_project({"/main.js": "require('./b')", "/b.js": "throw new Error('bad module')"},
                        "/main.js")


def test_typescript_runs(box: IsoBox) -> None:
    """language='typescript' snippets are transpiled in the daemon's workers."""
    assert box.run("const x: number = 21; x * 2", language="typescript") == 42


# -- pool figures and lifecycle of a connection ----------------------------------------------
def test_pool_stats_and_warmup(box: IsoBox, shared_daemon: Daemon) -> None:
    """pool_stats() shows the daemon's workers (its own processes); warmup_pool() how many."""
    stats = box.pool_stats()
    pids = daemon_pids(shared_daemon)
    assert stats.workers
    assert {w.pid for w in stats.workers} <= pids
    assert all(w.state in ("idle", "busy", "starting", "stopping") for w in stats.workers)
    assert stats.restarts >= 0 and stats.queued == 0
    assert box.warmup_pool() >= 1


def test_shutdown_closes_only_the_connection(shared_daemon: Daemon, box: IsoBox) -> None:
    """shutdown() of a remote box closes its connection (later runs: ClosedError); the daemon
    and its other clients go on."""
    shared_daemon.settled()
    other = IsoBox(address=shared_daemon.address)
    assert other.run("5") == 5
    before = shared_daemon.stats()["clients"]
    other.shutdown()
    with pytest.raises(ClosedError):
        other.run("5")
    assert wait_until(lambda: shared_daemon.stats()["clients"] < before)
    assert box.run("6") == 6
    assert shared_daemon.alive()


def test_box_context_manager_and_bad_address(shared_daemon: Daemon, tmp_path: Path) -> None:
    """A remote box works as a context manager; an address nobody listens on is DaemonError
    at construction, naming it."""
    shared_daemon.settled()
    with IsoBox(address=shared_daemon.address) as temporary:
        assert temporary.run("'hi'") == "hi"
    missing = f"unix://{tmp_path}/nobody.sock"
    with pytest.raises(DaemonError, match="cannot reach the daemon"):
        IsoBox(address=missing)


# -- the socket ------------------------------------------------------------------------------
def test_socket_is_private(daemon: Daemon) -> None:
    """The socket is created mode 0600 in a folder only its owner can write; the daemon
    reports its address."""
    assert daemon.socket_path is not None
    mode = os.stat(daemon.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert os.stat(daemon.socket_path).st_uid == os.getuid()
    assert daemon.stats()["address"] == daemon.address


def test_second_daemon_on_a_live_socket_refuses(start_daemon: StartDaemon) -> None:
    """A second daemon on the path of a live one exits 1 with a message; the first keeps its
    socket and goes on serving. (The fixture checks the second left no process behind.)"""
    first = start_daemon()
    second = start_daemon("--socket", str(first.socket_path), ready=False)
    assert second.wait_exit(15) == 1
    assert "another daemon is already listening" in second.log()
    assert os.path.exists(str(first.socket_path))
    with IsoBox(address=first.address) as box:
        assert box.run("1+1") == 2


def test_stale_socket_is_removed(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A socket file nobody listens on (its daemon died without unlinking) is removed and the
    daemon starts on that path."""
    folder = tmp_path / "s"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "d.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays: a stale socket
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    daemon = start_daemon()
    assert "removed the stale socket" in daemon.log()
    with IsoBox(address=daemon.address) as box:
        assert box.run("40 + 2") == 42


def test_regular_file_at_the_socket_path_is_kept(start_daemon: StartDaemon,
                                                 tmp_path: Path) -> None:
    """A file that is not a socket at the path is neither replaced nor removed: exit 1."""
    folder = tmp_path / "s"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "d.sock"
    path.write_text("precious")
    daemon = start_daemon(ready=False)
    assert daemon.wait_exit(15) == 1
    assert "is not a socket" in daemon.log()
    assert path.read_text() == "precious"


def test_shared_folder_is_refused(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A socket folder others may write to is refused (exit 1, message): they could swap the
    socket for their own."""
    shared = tmp_path / "pub"
    shared.mkdir()
    os.chmod(shared, 0o777)  # noqa: S103 - the point of the test
    daemon = start_daemon("--socket", str(shared / "d.sock"), ready=False)
    assert daemon.wait_exit(15) == 1
    assert "not a private folder" in daemon.log()
    assert not (shared / "d.sock").exists()


def test_default_socket_path_and_status(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Without --socket the daemon listens on $XDG_RUNTIME_DIR/isobox/supervisor.sock (folder
    created 0700), where `isobox status` finds it without --address; SIGTERM removes it."""
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    env = base_env(XDG_RUNTIME_DIR=str(runtime))
    path = runtime / "isobox" / "supervisor.sock"
    daemon = start_daemon(env=env, at=str(path))
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    out = subprocess.run([ISOBOX_CLI, "status", "--json"], env=env, capture_output=True,
                         text=True, timeout=15, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pid"] == daemon.pid
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(10) == 0
    assert not path.exists()
