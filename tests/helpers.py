"""Helpers shared by the tests that watch real worker processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil

from isobox import IsoBox


def alive(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie counts as gone: it runs nothing)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; returns whether it was."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def serving_pids(box: IsoBox) -> set[int]:
    """Pids of the workers that are up (idle or busy), not starting or stopping."""
    return {w.pid for w in box.pool_stats().workers if w.state in ("idle", "busy")}
