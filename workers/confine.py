"""Confinement of a freshly forked worker, applied before the first untrusted byte.

Layers, in order: a new session (terminal signals aimed at the caller do not hit workers);
``PR_SET_PDEATHSIG`` (the worker dies with the fork server); stdio on ``/dev/null``; every fd
but the channel closed; an empty environment; ``chdir("/")``; rlimits (no core files, no file
writes, few fds, an address-space ceiling, a CPU backstop behind the watchdog);
``PR_SET_DUMPABLE=0``; ``PR_SET_NO_NEW_PRIVS``; new network, IPC, UTS and mount namespaces
where the kernel allows (best effort); and a seccomp filter (libseccomp, through pyseccomp)
that refuses new processes and programs, sockets, opening files, tracing other processes and
executable memory. Everything the worker needs was imported or read before, in the fork server.

``strict`` confinement (the default) refuses to start a worker when a required layer (all but
the namespaces) could not be applied; ``best-effort`` starts it anyway. Either way the worker
reports what it applied, and what not and why, in its READY frame (``pool_stats()`` shows it).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import resource
import signal
from dataclasses import dataclass, field

__all__ = ["Confinement", "ConfinementRefused", "confine", "prepare"]

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNS, _CLONE_NEWUTS = 0x20000, 0x4000000
_CLONE_NEWIPC, _CLONE_NEWNET = 0x8000000, 0x40000000
_CLONE_THREAD = 0x10000
_PROT_EXEC = 0x4
NOFILE = 16  # the channel, stdio, and room for the engine; no file is ever opened
ADDRESS_SPACE = 16 * 2**30  # a ceiling against runaway native allocation, far above any heap
CPU_SECONDS = 3600  # a backstop behind the watchdog: a worker that spent an hour of CPU goes
# The seccomp allowlist: what a worker needs once it is confined (found by tracing the whole
# test suite's workers, plus their benign relatives). Anything else fails with EPERM.
_ALLOWED_SYSCALLS = (
    # memory (mmap and mprotect only without PROT_EXEC, below)
    "brk", "munmap", "mremap", "madvise",
    # time
    "clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep",
    # the channel to the supervisor and the fds the worker already holds
    "read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg", "poll",
    "ppoll", "select", "pselect6", "shutdown", "getsockname", "getpeername", "getsockopt",
    "close", "fstat", "lseek", "fcntl", "dup", "dup3",
    # signals (delivery and masks; sending one to another process is not allowed)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    # threads and synchronisation (clone only for threads, below)
    "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "gettid",
    "sched_yield", "sched_getaffinity", "exit", "exit_group",
    # read-only facts about itself
    "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
    "getrusage", "times", "getrlimit", "uname", "getrandom", "sysinfo", "getcwd",
)
# Named for the record (and tested): the calls an escape would need. The allowlist already
# refuses them; they are listed so the intent survives a future widening of the allowlist.
_DENIED_SYSCALLS = (
    "execve", "execveat", "fork", "vfork", "socket", "socketpair", "connect", "bind", "listen",
    "accept", "accept4", "open", "openat", "openat2", "creat", "ptrace", "process_vm_readv",
    "process_vm_writev", "memfd_create", "mount", "umount2", "pivot_root", "chroot", "unshare",
    "setns", "init_module", "finit_module", "delete_module", "bpf", "perf_event_open", "keyctl",
    "add_key", "request_key", "userfaultfd", "kexec_load", "reboot", "swapon", "swapoff",
    "kill", "tkill", "tgkill", "prctl", "setrlimit", "ioctl",
)


class ConfinementRefused(Exception):
    """A required confinement layer could not be applied (strict mode)."""


@dataclass
class Confinement:
    """What confinement a worker got: the layers applied, and the missing ones with reasons."""

    applied: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, object]:
        return {"applied": self.applied, "missing": self.missing}


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc().prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def _layer(report: Confinement, name: str, apply: object) -> None:
    try:
        apply()  # type: ignore[operator]
    except Exception as exc:  # each layer reports its own failure; strict mode decides
        report.missing[name] = f"{type(exc).__name__}: {exc}"[:200]
    else:
        report.applied.append(name)


def _rlimits() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 60))


def _namespaces() -> None:
    flags = _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS | _CLONE_NEWNS
    if _libc().unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare failed")


_prepared: object | None = None


def prepare() -> None:
    """Build the seccomp filter once, in the fork server: each worker then only loads it
    (a respawn does not pay for compiling the rules)."""
    global _prepared  # noqa: PLW0603 - one filter per fork server, by design
    _prepared = _build_filter()
    _libc()  # loaded once too


def _seccomp() -> None:
    f = _prepared if _prepared is not None else _build_filter()
    f.load()  # type: ignore[attr-defined]


def _build_filter() -> object:
    import pyseccomp as sc  # noqa: PLC0415 - imported by the fork server already

    deny = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(deny)
    for name in _ALLOWED_SYSCALLS:
        try:
            f.add_rule(sc.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            continue  # a syscall this architecture does not have
    # Threads only: clone with CLONE_THREAD. clone3 cannot be inspected, so glibc is told it
    # does not exist and falls back to clone.
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # No executable mappings; prlimit64 only to read a limit (a NULL new limit).
    for name in ("mmap", "mprotect"):
        f.add_rule(sc.ALLOW, name, sc.Arg(2, sc.MASKED_EQ, _PROT_EXEC, 0))
    f.add_rule(sc.ALLOW, "prlimit64", sc.Arg(2, sc.EQ, 0))
    return f


def confine(keep_fd: int, *, strict: bool = True) -> Confinement:
    """Confine the current (worker) process; ``keep_fd`` is its channel to the supervisor.
    Raises :class:`ConfinementRefused` in strict mode when a required layer failed."""
    report = Confinement()
    os.setsid()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, 65536)
    os.environ.clear()
    os.chdir("/")
    report.applied += ["session", "pdeathsig", "stdio", "fds", "environment", "chdir"]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _layer(report, "rlimits", _rlimits)
    _layer(report, "not-dumpable", lambda: _prctl(_PR_SET_DUMPABLE, 0))
    _layer(report, "no-new-privs", lambda: _prctl(_PR_SET_NO_NEW_PRIVS, 1))
    _layer(report, "namespaces", _namespaces)
    _layer(report, "seccomp", _seccomp)
    required = {k: v for k, v in report.missing.items() if k != "namespaces"}
    if strict and required:
        raise ConfinementRefused("; ".join(f"{k}: {v}" for k, v in required.items()))
    return report
