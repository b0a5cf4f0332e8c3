"""Worker confinement, layer by layer, on real processes: what /proc says about a live worker,
and what a confined process may no longer do."""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import resource
import socket
import termios
import threading
from collections.abc import Callable, Iterator

import pytest

from isobox import IsoBox
from isobox.workers import confine as confine_module
from isobox.workers.confine import confine

LAYERS = ["session", "pdeathsig", "stdio", "fds", "environment", "chdir", "rlimits",
          "not-dumpable", "no-new-privs", "namespaces", "seccomp"]


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[IsoBox, int]]:
    with IsoBox(pool={"min": 1, "max": 1}, typescript="lazy") as box:
        box.warmup_pool()
        assert box.run("1") == 1
        yield box, box.pool_stats().workers[0].pid


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_every_layer_is_reported(worker: tuple[IsoBox, int]) -> None:
    """pool_stats() lists the layers each worker applied; none is missing here."""
    box, _pid = worker
    assert box.pool_stats().workers[0].confinement == LAYERS
    assert box.pool_stats().confinement_error == ""


def test_seccomp_and_no_new_privs_are_on(worker: tuple[IsoBox, int]) -> None:
    """The kernel reports a seccomp filter and no_new_privs on the worker."""
    _box, pid = worker
    status = _status(pid)
    assert status["Seccomp"].strip() == "2"  # SECCOMP_MODE_FILTER
    assert status["NoNewPrivs"].strip() == "1"


def test_rlimits(worker: tuple[IsoBox, int]) -> None:
    """No core files, no file writes, few fds, an address-space ceiling, a CPU backstop."""
    _box, pid = worker
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        limits = f.read()

    def soft(name: str) -> str:
        line = next(x for x in limits.splitlines() if x.startswith(name))
        return line[len(name):].split()[0]

    assert soft("Max core file size") == "0"
    assert soft("Max file size") == "0"
    assert soft("Max open files") == str(confine_module.NOFILE)
    assert soft("Max address space") == str(confine_module.ADDRESS_SPACE)
    assert soft("Max cpu time") == str(confine_module.CPU_SECONDS)


def test_namespaces_differ_from_ours(worker: tuple[IsoBox, int]) -> None:
    """The worker has its own network, IPC, UTS and mount namespaces."""
    _box, pid = worker
    for ns in ("net", "ipc", "uts", "mnt"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns


def test_fds_environment_and_cwd(worker: tuple[IsoBox, int]) -> None:
    """Only stdio (on /dev/null) and the channel are open; the environment is empty; cwd /."""
    _box, pid = worker
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert [fds[i] for i in (0, 1, 2)] == ["/dev/null"] * 3
    others = [target for fd, target in fds.items() if fd > 2]
    assert len(others) == 1 and others[0].startswith("socket:")
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert _status(pid)["PPid"].strip() != str(os.getpid())  # forked by the fork server
    with open(f"/proc/{pid}/environ", "rb") as f:
        assert b"PATH=" not in f.read()


def _in_confined_child(attempts: Callable[[], dict[str, str]], *, strict: bool = True
                       ) -> dict[str, str]:
    """Fork, confine the child, run ``attempts`` there, return what it reported (with the
    layers it missed under ``missing``)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: confine, try, report, exit (never back into pytest)
        try:
            os.close(read)
            report = confine(write, strict=strict)
            out = json.dumps({**attempts(), "missing": sorted(report.missing)}).encode()
        except BaseException as exc:
            out = json.dumps({"error": repr(exc)}).encode()
        os.write(write, out)
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return dict(json.loads(b"".join(chunks)))


def _outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return os.strerror(exc.errno or 0)
    return "allowed"


def test_seccomp_refuses_what_a_worker_never_needs() -> None:
    """A confined process may not open files, make sockets, fork, exec, map executable
    memory or trace others; it may still compute and talk over the channel it has."""
    libc = ctypes.CDLL(None, use_errno=True)

    def ptrace() -> None:
        if libc.ptrace(16, 1, 0, 0) != 0:  # PTRACE_ATTACH to pid 1
            raise OSError(ctypes.get_errno(), "ptrace")

    def exec_map() -> None:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)

    def attempts() -> dict[str, str]:
        return {
            "open": _outcome(lambda: os.open("/etc/hostname", os.O_RDONLY)),
            "create": _outcome(lambda: os.open("/tmp/isobox-x", os.O_WRONLY | os.O_CREAT)),
            "socket": _outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            "fork": _outcome(os.fork),
            "exec": _outcome(lambda: os.execv("/bin/true", ["true"])),  # noqa: S606 - the point
            "exec-mapping": _outcome(exec_map),
            "ptrace": _outcome(ptrace),
            "compute": str(sum(range(1000))),
        }

    got = _in_confined_child(attempts)
    denied = os.strerror(1)  # EPERM
    assert got == {"open": denied, "create": denied, "socket": denied, "fork": denied,
                   "exec": denied, "exec-mapping": denied, "ptrace": denied,
                   "compute": "499500", "missing": []}, got


def test_the_allowlist_refuses_signals_prctl_ioctl_and_limits() -> None:
    """The filter is an allowlist: what is not on it (signalling another process, undoing
    not-dumpable, ioctl, setting a limit) fails with EPERM; threads and reading limits work."""
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def call(result: int) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), "refused")

    def thread() -> None:
        done: list[int] = []
        worker = threading.Thread(target=lambda: done.append(1))
        worker.start()
        worker.join()
        if done != [1]:
            raise OSError(0, "thread did not run")

    def lower_limit() -> None:
        try:  # even lowering one needs prlimit64 with a new limit, which is refused
            resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))
        except ValueError as exc:  # CPython's word for EPERM here
            raise OSError(1, str(exc)) from exc

    def attempts() -> dict[str, str]:
        return {
            "kill": _outcome(lambda: os.kill(parent, 0)),
            "dumpable": _outcome(lambda: call(libc.prctl(4, 1, 0, 0, 0))),
            "ioctl": _outcome(lambda: fcntl.ioctl(0, termios.FIONREAD, b"\0" * 4)),
            "set-limit": _outcome(lower_limit),
            "read-limit": str(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
            "thread": _outcome(thread),
        }

    got = _in_confined_child(attempts)
    denied = os.strerror(1)
    assert got == {"kill": denied, "dumpable": denied, "ioctl": denied,
                   "set-limit": denied, "read-limit": str(confine_module.NOFILE),
                   "thread": "allowed", "missing": []}, got


def test_no_call_named_as_denied_is_on_the_allowlist() -> None:
    allowed = set(confine_module._ALLOWED_SYSCALLS) | {"clone", "mmap", "mprotect",
                                                        "prlimit64"}
    assert not allowed & set(confine_module._DENIED_SYSCALLS)


def test_strict_mode_refuses_when_a_required_layer_fails(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A worker that cannot apply a required layer refuses to start in strict mode, and says
    why; best-effort mode starts and reports the missing layer."""
    def broken() -> None:
        raise OSError(38, "seccomp not available")

    monkeypatch.setattr(confine_module, "_seccomp", broken)

    def can_open() -> dict[str, str]:
        return {"open": _outcome(lambda: os.close(os.open("/etc/hostname", os.O_RDONLY)))}

    refused = _in_confined_child(can_open)
    assert "ConfinementRefused" in refused["error"] and "seccomp" in refused["error"]
    lenient = _in_confined_child(can_open, strict=False)
    assert lenient == {"open": "allowed", "missing": ["seccomp"]}


def test_best_effort_box_serves_and_reports() -> None:
    """confinement='best-effort' is accepted; bad values are refused at once."""
    with IsoBox(pool={"min": 1, "max": 1}, confinement="best-effort", typescript="lazy") as box:
        assert box.run("2 + 2") == 4
        assert "seccomp" in box.pool_stats().workers[0].confinement
    with pytest.raises(ValueError, match="confinement"):
        IsoBox(mode="inprocess", confinement="none")
