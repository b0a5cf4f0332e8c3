"""The fork server: a clean, single-threaded, preloaded process that forks workers.

::

    caller process (supervisor)                 fork server (this module, python -m)
      ZygoteClient ── SEQPACKET control ──▶  loop: SPAWN+fd ─▶ fork() ─▶ child: worker_main(fd)
                   ◀── SPAWNED+pidfd ───────         SIGCHLD ─▶ waitpid ─▶ EXITED{pid,status}

It imports the engine and warms one context before forking anything, then freezes the GC so
children share the preloaded heap copy-on-write: a respawn costs a fork, not an interpreter
start. It is never forked from the caller's (possibly threaded) process. When the control
socket reaches EOF (the supervisor exited or died) it SIGKILLs every worker, reaps them and
exits; workers also die with it through ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import selectors
import signal
import socket
import sys

from isobox.protocol import FrameDecoder, MsgType, ProtocolError, encode_frame
from isobox.workers.engine import Engine, RunSpec
from isobox.workers.worker import worker_main

__all__ = ["main"]

_STRICT = True  # workers refuse to start without full confinement (--best-effort: they start)


def _send(
    ctl: socket.socket, msg_type: MsgType, body: dict[str, int], fds: list[int], rid: int = 0
) -> None:
    socket.send_fds(ctl, [encode_frame(msg_type, rid, body)], fds)


def _reap(ctl: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        with contextlib.suppress(OSError):
            _send(ctl, MsgType.EXITED, {"pid": pid, "status": status}, [])


def _spawn(
    ctl: socket.socket, wakeup: tuple[int, int], fd: int, children: set[int], rid: int
) -> None:
    pid = os.fork()
    if pid == 0:  # the child becomes a worker and never returns
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctl.close()
        os.close(wakeup[0])
        os.close(wakeup[1])
        worker_main(fd, strict=_STRICT)
    os.close(fd)
    children.add(pid)
    pidfd = os.pidfd_open(pid)
    try:
        _send(ctl, MsgType.SPAWNED, {"pid": pid}, [pidfd], rid)
    finally:
        os.close(pidfd)


def _kill_all(children: set[int]) -> None:
    for pid in list(children):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in list(children):
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)


def serve(ctl: socket.socket) -> None:
    """The fork server's main loop (documented exception to the 40-line rule: one loop)."""
    wakeup = os.pipe()
    os.set_blocking(wakeup[0], False)
    os.set_blocking(wakeup[1], False)
    signal.set_wakeup_fd(wakeup[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    decoder = FrameDecoder(max_frame=4096)
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ, "ctl")
    sel.register(wakeup[0], selectors.EVENT_READ, "sig")
    _send(ctl, MsgType.READY, {"pid": os.getpid()}, [])
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "sig":
                    with contextlib.suppress(BlockingIOError):
                        os.read(wakeup[0], 512)
                    _reap(ctl, children)
                    continue
                msg, fds, _flags, _addr = socket.recv_fds(ctl, 4096, 1)
                if not msg:
                    return
                try:
                    frames = decoder.feed(msg)
                except ProtocolError:
                    return
                for frame in frames:
                    if frame.type is MsgType.SPAWN and len(fds) == 1:
                        _spawn(ctl, wakeup, fds.pop(), children, frame.request_id)
                for fd in fds:
                    os.close(fd)
    finally:
        _kill_all(children)


def main(argv: list[str] | None = None) -> None:
    """``python -m isobox.workers.forkserver FD``: serve the control socket FD."""
    args = sys.argv[1:] if argv is None else argv
    ctl = socket.socket(fileno=int(args[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Engine().run(RunSpec(code="1"))  # warm the engine and the allocator before forking
    # Confined workers may not open files: what they could need later is loaded here.
    from isobox.workers import confine, typescript  # noqa: PLC0415

    with contextlib.suppress(Exception):  # a worker that cannot load it reports that itself
        confine.prepare()
    typescript.read_source()
    if "--typescript" in args[1:]:
        typescript.preload()  # every worker then shares the compiler (64 MB) copy-on-write
    global _STRICT  # noqa: PLW0603 - set once, before any fork
    _STRICT = "--best-effort" not in args[1:]
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, KeyboardInterrupt):
        serve(ctl)


if __name__ == "__main__":
    main()
