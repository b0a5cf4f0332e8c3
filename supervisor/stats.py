"""Per-process resource figures, psutil behind one function (:func:`sample`)."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

__all__ = ["ProcSample", "sample"]


@dataclass(frozen=True, slots=True)
class ProcSample:
    """Resident and unique memory in bytes, CPU percent since the previous sample."""

    rss: int
    uss: int
    cpu_percent: float


_procs: dict[int, psutil.Process] = {}


def sample(pid: int) -> ProcSample | None:
    """Measure ``pid``; None if it is gone. CPU percent is relative to the previous call."""
    try:
        proc = _procs.get(pid)
        if proc is None or not proc.is_running():
            proc = _procs[pid] = psutil.Process(pid)
        with proc.oneshot():
            info = proc.memory_full_info()
            cpu = proc.cpu_percent(None)
        return ProcSample(int(info.rss), int(getattr(info, "uss", 0)), float(cpu))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        _procs.pop(pid, None)
        return None


def forget(pid: int) -> None:
    """Drop the cached handle of a process that is gone."""
    _procs.pop(pid, None)
