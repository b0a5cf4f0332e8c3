"""Helpers for the daemon tests: a real ``isobox-supervisor`` process, raw protocol clients,
gates that hold a run in flight, and the bookkeeping that proves nothing is left behind.

Nothing here stands in for the daemon: every helper drives the real console script over a
real socket. Waits poll with generous bounds; no helper asserts how fast anything is.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psutil
from helpers import wait_until

from isobox import IsoBox
from isobox.protocol import Frame, FrameDecoder, MsgType, encode_frame

BIN = Path(sys.executable).parent
SUPERVISOR = str(BIN / "isobox-supervisor")
ISOBOX_CLI = str(BIN / "isobox")
READY = "isobox-supervisor listening on "
PR_SET_CHILD_SUBREAPER = 36
StartDaemon = Callable[..., "Daemon"]  # the start_daemon fixture


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gone(proc: psutil.Process) -> bool:
    """True once ``proc`` runs nothing (exited, reaped, or a zombie)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


_subreaper_users = 0
_numbers = itertools.count(1)


def set_subreaper(on: bool) -> None:
    """Make this process adopt its orphaned descendants (so a fork server whose daemon died is
    still found among our descendants, not lost to init); nested uses are counted."""
    global _subreaper_users  # noqa: PLW0603 - one process-wide setting
    _subreaper_users += 1 if on else -1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(_subreaper_users > 0), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def descendants() -> dict[tuple[int, float], psutil.Process]:
    """Every live descendant of this process, keyed by (pid, create time)."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            found[(proc.pid, proc.create_time())] = proc
    return found


def reap_zombies(procs: list[psutil.Process]) -> None:
    """Reap adopted orphans among ``procs`` that died (we are their subreaper)."""
    me = os.getpid()
    for proc in procs:
        with contextlib.suppress(psutil.Error, ChildProcessError, OSError):
            if proc.ppid() == me and proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any ISOBOX_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOBOX_")}
    env.update(extra)
    return env


class Daemon:
    """One ``isobox-supervisor`` process started by a test."""

    def __init__(self, workdir: Path, args: list[str], *, env: dict[str, str] | None = None,
                 socket_path: str | None = None, token: str | None = None,
                 tcp: tuple[str, int] | None = None) -> None:
        self.workdir = workdir
        self.args = args
        self.env = env if env is not None else base_env()
        self.socket_path = socket_path
        self.token = token
        self.tcp = tcp
        self.log_path = workdir / f"daemon-{next(_numbers)}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self.boxes: list[Any] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, *, ready: bool = True, timeout: float = 15.0) -> Daemon:
        """Start the process; with ``ready``, wait for its "listening on" line and for its
        pool's first workers (so tests connect to a settled daemon)."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([SUPERVISOR, *self.args], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, env=self.env,
                                         cwd=self.workdir)
        if ready:
            ok = wait_until(lambda: READY in self.log()  # self.proc: started just above
                            or cast("subprocess.Popen[bytes]", self.proc).poll() is not None,
                            timeout)
            if not ok or READY not in self.log():
                raise AssertionError(f"the daemon did not start (exit {self.proc.poll()}):\n"
                                     f"{self.log()}")
            self.settled()
            self.track()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        if self.tcp is not None:
            return f"tcp://{self.tcp[0]}:{self.tcp[1]}"
        return f"unix://{self.socket_path}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """Everything the daemon wrote on stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 5.0) -> bool:
        """Wait until ``text`` appears in the daemon's stderr."""
        return wait_until(lambda: text in self.log(), timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.track()
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the process exits within ``timeout`` (else AssertionError)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not exit within {timeout}s:\n{self.log()}")\
                from None

    # -- processes ---------------------------------------------------------------------------
    def track(self) -> list[psutil.Process]:
        """The daemon's descendants now (fork server, workers); remembered for the teardown."""
        if not self.alive():
            return []
        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for proc in found:
            with contextlib.suppress(psutil.Error):
                self.seen[(proc.pid, proc.create_time())] = proc
        return found

    def leftovers(self, timeout: float = 5.0) -> list[psutil.Process]:
        """Processes of this daemon seen at some point that are still running after
        ``timeout`` seconds."""
        procs = list(self.seen.values())
        wait_until(lambda: all(gone(p) for p in procs), timeout, interval=0.05)
        reap_zombies(procs)
        return [p for p in procs if not gone(p)]

    @contextlib.contextmanager
    def serving(self) -> Iterator[Daemon]:
        """Start it; on the way out stop it, and fail if any of its processes outlived it."""
        try:
            self.start()
            yield self
        finally:
            problems = self.stop()
            assert not problems, problems

    def stop(self, grace: float = 10.0) -> list[str]:
        """Close the test's boxes, then SIGTERM (SIGKILL if it lingers) the daemon, and
        report every process of it that outlived it (they are killed)."""
        problems: list[str] = []
        for box in self.boxes:
            with contextlib.suppress(Exception):
                box.shutdown()
        self.track()
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                problems.append(f"daemon {self.pid} ignored SIGTERM for {grace}s")
                self.proc.kill()
                self.proc.wait(5)
        for proc in self.leftovers():
            with contextlib.suppress(psutil.Error):
                problems.append(f"process {proc.pid} {proc.cmdline()} outlived daemon "
                                f"{self.pid}")
                proc.kill()
        return problems

    # -- clients -----------------------------------------------------------------------------
    def box(self, **options: Any) -> IsoBox:
        """A remote IsoBox on this daemon, closed by the teardown."""
        box = IsoBox(address=self.address, token=self.token, **options)
        self.boxes.append(box)
        return box

    def stats(self) -> dict[str, Any]:
        """The daemon's figures, over a raw connection of its own (STATS, as `isobox status`
        sends it; a raw reader, so worker events around the handshake cannot upset it)."""
        raw = self.raw()
        try:
            welcome = raw.hello(self.token or "")
            assert welcome.type is MsgType.WELCOME, welcome
            raw.frame(MsgType.STATS, 1, {})
            answer = raw.answer(1)
            assert answer.type is MsgType.RESULT, answer
            stats: dict[str, Any] = answer.body["stats"]
            return stats
        finally:
            raw.close()

    def settled(self, workers: int | None = None, timeout: float = 10.0) -> None:
        """Wait until the pool has ``workers`` (default: --min-workers, else 1) serving
        workers, so no worker is starting while a test connects."""
        if workers is None:
            workers = int(self.args[self.args.index("--min-workers") + 1]) \
                if "--min-workers" in self.args else 1
        ok = wait_until(lambda: sum(w["state"] in ("idle", "busy")
                                    for w in self.stats()["workers"]) >= workers, timeout)
        assert ok, f"the pool did not reach {workers} workers: {self.stats()['workers']}"

    def busy_workers(self) -> list[int]:
        """Pids of the workers running something now."""
        return [int(w["pid"]) for w in self.stats()["workers"] if w["state"] == "busy"]

    def raw(self, timeout: float = 5.0) -> Raw:
        """A raw protocol connection (nothing sent yet)."""
        if self.tcp is not None:
            sock = socket.create_connection(self.tcp, timeout=timeout)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            assert self.socket_path is not None
            sock.connect(self.socket_path)
        return Raw(sock)


class Raw:
    """A hand-driven connection: send any bytes, read frames, notice being dropped."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, msg: MsgType, rid: int, body: dict[str, Any]) -> None:
        self.send(encode_frame(msg, rid, body))

    def hello(self, token: str = "") -> Frame:
        """Say HELLO; return the daemon's answer (WELCOME or ERROR; worker events skipped)."""
        self.frame(MsgType.HELLO, 0, {"token": token})
        while True:
            frame = self.read()
            assert frame is not None, "the daemon closed the connection instead of answering"
            if frame.type is not MsgType.EVENT:
                return frame

    def answer(self, rid: int, *kinds: MsgType, timeout: float = 10.0) -> Frame:
        """The next frame of ``kinds`` (default RESULT or ERROR) for request ``rid``, skipping
        worker events and frames of other requests."""
        wanted = kinds or (MsgType.RESULT, MsgType.ERROR)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            frame = self.read(max(0.1, end - time.monotonic()))
            assert frame is not None, "the daemon dropped a connection it should have kept"
            if frame.request_id == rid and frame.type in wanted:
                return frame
        raise AssertionError(f"no answer to request {rid} within {timeout}s")

    def read(self, timeout: float = 10.0) -> Frame | None:
        """The next frame, or None when the daemon closed the connection."""
        end = time.monotonic() + timeout
        while not self.frames:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def dropped(self, timeout: float = 5.0) -> bool:
        """True once the daemon closes this connection within ``timeout`` (frames it sends
        first are skipped); False if it is still open then."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
            if not data:
                return True
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Gate:
    """A host function that holds a run in flight until the test lets it go.

    ``box.run("gate()", functions={"gate": gate})`` blocks inside the worker (waiting for the
    host reply) until :meth:`open`; :attr:`entered` is set once the run reached the call."""

    def __init__(self, hold: float = 15.0) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.hold = hold
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        self.entered.set()
        return self.released.wait(self.hold)

    def open(self) -> None:
        self.released.set()


class Background:
    """Run ``fn`` in a thread; :meth:`result` returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, args=(fn,), daemon=True)
        self.thread.start()

    def _main(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # handed to the test thread by result()
            self.error = exc

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = 15.0) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the background call did not finish within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value


@contextlib.contextmanager
def no_new_processes(timeout: float = 5.0) -> Iterator[None]:
    """Fail unless every process descending from this one that appears inside the block is
    gone ``timeout`` seconds after it (this process adopts orphans meanwhile)."""
    set_subreaper(True)
    before = set(descendants())
    try:
        yield
    finally:
        try:
            def fresh() -> list[psutil.Process]:
                # New processes whose ancestry is new too: a worker a long-lived daemon (one
                # started before the block) replaced during the block is that daemon's own.
                left = []
                for key, proc in descendants().items():
                    if key in before or gone(proc):
                        continue
                    with contextlib.suppress(psutil.Error):
                        parents = {(p.pid, p.create_time()) for p in proc.parents()}
                        if not parents & before:
                            left.append(proc)
                return left

            # Only processes that were not our own children can be orphans we adopted; our
            # own children belong to their Popen objects, which reap them.
            me = os.getpid()
            grandchildren = []
            for proc in descendants().values():
                with contextlib.suppress(psutil.Error):
                    if proc.ppid() != me:
                        grandchildren.append(proc)
            wait_until(lambda: not fresh(), timeout, interval=0.05)
            reap_zombies(grandchildren)
            left = fresh()
            names = []
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    names.append((proc.pid, proc.cmdline()))
                    proc.kill()
            assert not left, f"processes left behind: {names}"
        finally:
            set_subreaper(False)
