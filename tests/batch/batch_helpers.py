"""Helpers for the batch tests (``box.map``, ``isobox batch``, ``isobox.dask``): real
processes only. The CLI runs as the real console script; the checks that nothing is left
behind look at real process trees (this process adopts orphans while a check is on).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
from helpers import alive, wait_until  # noqa: F401 - used by the tests here

BIN = Path(sys.executable).parent
ISOBOX = str(BIN / "isobox")
FORKSERVER = "isobox.workers.forkserver"  # in the fork server's (and its workers') cmdline
PR_SET_CHILD_SUBREAPER = 36

# Some CPU per item (about a millisecond in QuickJS): long enough to kill workers mid-run.
SLOW = "let s = 0; for (let i = 0; i < 20000; i++) s += i % 7; input * 2 + (s - s)"


def kill(pid: int) -> bool:
    """SIGKILL ``pid``; False if it was already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


# -- process trees --------------------------------------------------------------------------
_subreaper_users = 0


def set_subreaper(on: bool) -> None:
    """Adopt orphaned descendants (a fork server whose owner was SIGKILLed stays findable
    among our descendants); nested uses are counted."""
    global _subreaper_users  # noqa: PLW0603 - one process-wide setting
    _subreaper_users += 1 if on else -1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(_subreaper_users > 0), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def isobox_processes(root: int | None = None) -> dict[tuple[int, float], psutil.Process]:
    """Live fork servers and sandbox workers descending from ``root`` (default: this
    process), keyed by (pid, create time)."""
    found: dict[tuple[int, float], psutil.Process] = {}
    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return found
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(FORKSERVER in part for part in proc.cmdline()):
                found[(proc.pid, proc.create_time())] = proc
    return found


def fork_servers(root: int) -> list[psutil.Process]:
    """The fork servers that are direct children of ``root``."""
    return [p for p in isobox_processes(root).values() if _ppid(p) == root]


def sandbox_workers(root: int) -> list[psutil.Process]:
    """The sandbox workers under ``root``'s fork servers."""
    servers = {p.pid for p in fork_servers(root)}
    return [p for p in isobox_processes(root).values() if _ppid(p) in servers]


def _ppid(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.Error:
        return None


@contextlib.contextmanager
def no_isobox_leftovers(timeout: float = 10.0) -> Iterator[None]:
    """Fail unless every fork server and sandbox worker that appears under this process
    inside the block (orphans included: we adopt them meanwhile) is gone ``timeout`` seconds
    after it."""
    set_subreaper(True)
    before = set(isobox_processes())
    try:
        yield
        fresh: Callable[[], list[psutil.Process]] = (  # noqa: E731
            lambda: [p for k, p in isobox_processes().items() if k not in before])
        wait_until(lambda: not fresh(), timeout, interval=0.1)
        left = fresh()
        described = []
        for proc in left:
            with contextlib.suppress(psutil.Error):
                described.append((proc.pid, proc.ppid(), proc.cmdline()))
                proc.kill()
        assert not left, f"isobox processes left behind: {described}"
    finally:
        set_subreaper(False)


# -- files ----------------------------------------------------------------------------------
def write_jsonl(path: Path, records: Iterable[Any]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(record if isinstance(record, str) else json.dumps(record))
            fh.write("\n")
    return path


def output_lines(path: Path) -> list[bytes]:
    """The complete lines of an output file (a torn last line is left out)."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].split(b"\n")[:-1] if data else []


def jsonl_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output_lines(path)]


def by_index(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Records keyed by index; fails on a duplicate index."""
    found: dict[int, dict[str, Any]] = {}
    for record in records:
        index = record["index"]
        assert index not in found, f"index {index} appears twice"
        found[index] = record
    return found


# -- the CLI --------------------------------------------------------------------------------
def batch_args(script: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return [ISOBOX, "batch", str(script), "--input", str(src), "--output", str(out),
            "--quiet", *extra]


def run_batch_cli(script: Path, src: Path, out: Path, *extra: str,
                  timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``isobox batch`` as a real process, to completion."""
    return subprocess.run(batch_args(script, src, out, *extra), capture_output=True, text=True,
                          timeout=timeout, check=False)


def popen_batch_cli(script: Path, src: Path, out: Path, *extra: str,
                    log: Path | None = None) -> subprocess.Popen[bytes]:
    """``isobox batch`` started in the background; its stderr is appended to ``log``."""
    with (log or out.with_name(out.name + ".stderr")).open("ab") as err:
        return subprocess.Popen(batch_args(script, src, out, *extra),
                                stdout=subprocess.DEVNULL, stderr=err)
