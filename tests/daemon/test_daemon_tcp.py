"""TCP transport: the token is required and checked; the command line refuses TCP without one;
bad --listen values are usage errors. The daemon listens on a port picked free by the test."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import (
    SUPERVISOR,
    Daemon,
    StartDaemon,
    base_env,
    free_port,
    no_new_processes,
    wait_until,
)

from isobox import DaemonError, IsoBox
from isobox.protocol import MsgType

pytestmark = pytest.mark.timeout(20)
TOKEN = "s3cret-token-for-tests"
UNIX_TOKEN = "unix-token"


@pytest.fixture(scope="module")
def tcp_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon on 127.0.0.1:<free port> with a token file."""
    folder = tmp_path_factory.mktemp("tcp")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")  # surrounding whitespace is not part of the token
    token_file.chmod(0o600)
    port = free_port()
    daemon = Daemon(folder, ["--listen", f"127.0.0.1:{port}", "--token-file", str(token_file),
                             "--workers", "1", "--grace", "2"],
                    token=TOKEN, tcp=("127.0.0.1", port))
    with no_new_processes(), daemon.serving():
        yield daemon


def test_right_token_works(tcp_daemon: Daemon) -> None:
    """A client with the right token runs code, host functions included."""
    with IsoBox(address=tcp_daemon.address, token=TOKEN) as box:
        assert box.run("6 * 7") == 42
        assert box.run("add(2, 3)", functions={"add": lambda a, b: a + b}) == 5
        assert box.pool_stats().workers


@pytest.mark.parametrize("token", ["wrong", TOKEN + "x", TOKEN[:-1], " " + TOKEN])
def test_wrong_token_is_refused(tcp_daemon: Daemon, token: str) -> None:
    """A wrong token (even a prefix or an extension of the right one) is DaemonError
    'authentication failed' at connection time."""
    with pytest.raises(DaemonError, match="authentication failed"):
        IsoBox(address=tcp_daemon.address, token=token)
    assert tcp_daemon.wait_log("refused: wrong or missing token")


@pytest.mark.parametrize("hello", [{"token": ""}, {}, {"token": None}, {"token": 12345},
                                   {"token": [TOKEN]}])
def test_missing_token_is_refused(tcp_daemon: Daemon, hello: dict[str, object]) -> None:
    """A HELLO without a usable token gets ERROR 'authentication failed' and the connection
    is closed; no RUN is served on it."""
    raw = tcp_daemon.raw()
    try:
        raw.frame(MsgType.HELLO, 0, hello)
        answer = raw.read()
        assert answer is not None and answer.type is MsgType.ERROR
        assert "authentication failed" in answer.body["error"]["message"]
        assert answer.body["error"]["type"] == "DaemonError"
        assert raw.dropped()
    finally:
        raw.close()


def test_client_needs_a_token_for_tcp(tcp_daemon: Daemon) -> None:
    """The client library itself refuses a TCP address without a token (before connecting)."""
    with pytest.raises(ValueError, match="needs a token"):
        IsoBox(address=tcp_daemon.address)


def test_refused_clients_do_not_disturb_others(tcp_daemon: Daemon) -> None:
    """Between refused connections, an authenticated client keeps working."""
    with IsoBox(address=tcp_daemon.address, token=TOKEN) as box:
        for i in range(3):
            with pytest.raises(DaemonError, match="authentication failed"):
                IsoBox(address=tcp_daemon.address, token=f"bad{i}")
            assert box.run(f"{i} + 1") == i + 1


def test_undecodable_token_is_an_ordinary_refusal(tcp_daemon: Daemon) -> None:
    """A token that is not valid UTF-8 (a lone surrogate) is simply a wrong token."""
    raw = tcp_daemon.raw()
    try:
        raw.frame(MsgType.HELLO, 0, {"token": "\ud800" + TOKEN})
        answer = raw.read()
        assert answer is not None and answer.type is MsgType.ERROR
        assert "authentication failed" in answer.body["error"]["message"]
    finally:
        raw.close()
    assert "Unhandled exception" not in tcp_daemon.log()


def test_unix_socket_with_a_token_requires_it(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """--token-file applies on a Unix socket too: without it a client is refused."""
    token_file = tmp_path / "tok"
    token_file.write_text(UNIX_TOKEN)
    daemon = start_daemon("--token-file", str(token_file), "--workers", "1", token=UNIX_TOKEN)
    with pytest.raises(DaemonError, match="authentication failed"):
        IsoBox(address=daemon.address)
    with IsoBox(address=daemon.address, token=UNIX_TOKEN) as box:
        assert box.run("1") == 1


def run_supervisor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run isobox-supervisor to completion (for invocations that must exit at once)."""
    return subprocess.run([SUPERVISOR, *args], capture_output=True, text=True, timeout=15,
                          check=False, env=env or base_env(), stdin=subprocess.DEVNULL)


def test_tcp_without_token_is_a_usage_error() -> None:
    """--listen without --token-file exits 2 with a message about the token, before
    listening."""
    port = free_port()
    with no_new_processes():
        done = run_supervisor("--listen", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert "token" in done.stderr
    assert "listening on" not in done.stderr


def listen_with_token(tmp_path: Path, listen: str, token_text: str
                      ) -> subprocess.CompletedProcess[str]:
    """Run a daemon that should not start, on ``listen``, its token file holding
    ``token_text``."""
    token_file = tmp_path / "tok"
    token_file.write_text(token_text)
    with no_new_processes():
        return run_supervisor("--listen", listen, "--token-file", str(token_file))


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1", "127.0.0.1:http"])
def test_bad_listen_is_a_usage_error(listen: str, tmp_path: Path) -> None:
    """A --listen value that is not HOST:PORT exits 2 quoting it."""
    done = listen_with_token(tmp_path, listen, "t")
    assert done.returncode == 2
    assert "HOST:PORT" in done.stderr


def test_empty_token_file_is_a_usage_error(tmp_path: Path) -> None:
    """An empty token file is refused (exit 2), not taken as 'no token'."""
    done = listen_with_token(tmp_path, f"127.0.0.1:{free_port()}", "\n")
    assert done.returncode == 2
    assert "empty" in done.stderr


def test_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    """A port above 65535 is a usage error (exit 2) without a traceback."""
    done = listen_with_token(tmp_path, "127.0.0.1:99999", "t")
    assert "Traceback" not in done.stderr
    assert done.returncode == 2


def test_port_in_use_is_a_clear_error(tcp_daemon: Daemon, tmp_path: Path) -> None:
    """A second daemon on a TCP port already in use exits 1 with a one-line message."""
    assert tcp_daemon.tcp is not None
    done = listen_with_token(tmp_path, f"127.0.0.1:{tcp_daemon.tcp[1]}", "t")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "isobox-supervisor:" in done.stderr
    assert wait_until(tcp_daemon.alive)
