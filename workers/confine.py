"""Basic confinement of a freshly forked worker, applied before the first untrusted byte.

Layers (issue 2 scope; seccomp and namespaces come with the hardening work): a new session so
terminal signals aimed at the caller do not hit workers; ``PR_SET_PDEATHSIG`` so the worker dies
with the fork server; stdio on ``/dev/null``; every fd but the channel closed; an empty
environment; ``chdir("/")``; ``RLIMIT_CORE=0``; ``PR_SET_DUMPABLE=0``.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

__all__ = ["confine"]

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def confine(keep_fd: int) -> None:
    """Confine the current (worker) process; ``keep_fd`` is its channel to the supervisor."""
    os.setsid()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, 65536)
    os.environ.clear()
    os.chdir("/")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(_PR_SET_DUMPABLE, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
