"""Fixtures of the batch tests: a shared box for the map tests that leave it as they found it,
and a check that no fork server or sandbox worker outlives a test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from batch_helpers import no_isobox_leftovers

from isobox import IsoBox


@pytest.fixture(scope="module")
def box() -> Iterator[IsoBox]:
    """One box with 2 workers for a module's tests that do not kill its workers."""
    with IsoBox(timeout=10.0, pool={"min": 2, "max": 2}) as b:
        b.warmup_pool()
        yield b


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fail the test if a fork server or sandbox worker that appeared during it (under this
    process, orphans included) is still running 10 s after it."""
    with no_isobox_leftovers():
        yield


@pytest.fixture(autouse=True, scope="module")
def _leave_no_children() -> Iterator[None]:
    """After a module: reap the zombies of the subprocesses its tests killed, and stop the
    multiprocessing resource tracker that Dask's spawned workers start. Both would otherwise
    stay children of the test process and trip the tests (in other folders) that check the
    caller's children are only the fork server."""
    yield
    import os
    from multiprocessing import resource_tracker

    import psutil

    tracker: Any = resource_tracker._resource_tracker  # _pid, _stop: private, not in typeshed
    if tracker._pid is not None:
        tracker._stop()
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, 0)
        except (psutil.Error, ChildProcessError):
            pass
