"""Fixtures of the daemon tests: real ``isobox-supervisor`` processes, always stopped, and a
check that none of their processes (fork server, workers) outlives them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import Daemon, StartDaemon, base_env, no_new_processes


def _short_dir(path: Path) -> Path:
    """A 0700 folder for sockets (a Unix socket path must stay under ~108 bytes)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    assert len(str(path)) < 80, f"socket folder path too long: {path}"
    return path


def _factory(workdir: Path, made: list[Daemon]) -> StartDaemon:
    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True,
              socket_name: str = "d.sock", token: str | None = None,
              tcp: tuple[str, int] | None = None, defaults: bool = True,
              at: str | None = None, **env_extra: str) -> Daemon:
        """Start ``isobox-supervisor ARGS`` on a socket in this test's folder (unless ARGS
        name --listen or --socket, or ``at`` names where it listens by default);
        ``defaults`` adds --workers 2 --grace 2 unless ARGS set them."""
        argv = list(args)
        path = at
        if at is None and tcp is None and "--socket" not in argv and "--listen" not in argv:
            path = str(workdir / socket_name)
            argv = ["--socket", path, *argv]
        elif "--socket" in argv:
            path = argv[argv.index("--socket") + 1]
        if defaults:
            if "--workers" not in argv:
                argv += ["--workers", "2"]
            if "--grace" not in argv:
                argv += ["--grace", "2"]
        daemon = Daemon(workdir, argv, env=env if env is not None else base_env(**env_extra),
                        socket_path=path, token=token, tcp=tcp)
        made.append(daemon)
        return daemon.start(ready=ready)

    return start


def _stop_all(made: list[Daemon]) -> None:
    problems = [p for d in made for p in d.stop()]
    assert not problems, "\n".join(problems)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Start daemons for this test; all are stopped after it, and none of their processes may
    outlive them (checked by pid and create time, orphans included)."""
    made: list[Daemon] = []
    with no_new_processes():
        try:
            yield _factory(_short_dir(tmp_path / "s"), made)
        finally:
            _stop_all(made)


@pytest.fixture
def daemon(start_daemon: StartDaemon) -> Daemon:
    """One daemon on a Unix socket with 2 workers."""
    return start_daemon()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for a whole module of tests that leave it as they found it."""
    made: list[Daemon] = []
    folder = _short_dir(tmp_path_factory.mktemp("shared") / "s")
    with no_new_processes():
        try:
            yield _factory(folder, made)("--min-workers", "2")
        finally:
            _stop_all(made)
