"""Defects a review of streams, sessions, host functions and timers found, each pinned by a
test with real worker processes: a host reply after the run ended, a session stream that hit
its memory limit, host calls of an async stream, oversized host results, torn replies.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from isobox import AsyncIsoBox, IsoBox, MemoryLimitError

BIG = 100 * 2**20  # a host result larger than the 96 MiB channel frame


async def _slow_async() -> int:
    await asyncio.sleep(0.2)
    return 1


def test_async_host_call_outliving_its_run_does_not_kill_the_worker() -> None:
    crashed: list[dict[str, Any]] = []
    with IsoBox(pool={"min": 1, "max": 1}, timeout=10) as box:
        box.on("worker:crashed", crashed.append)
        session = box.create_session("s", functions={"slow": _slow_async})
        session.run("function keep() { return 42 }")
        # The call leaves on the timer's turn of the loop; the run ends before its reply.
        assert session.run("slow(); await new Promise(r => setTimeout(r, 5)); 1") == 1
        time.sleep(0.5)
        assert crashed == []
        assert session.run("keep()") == 42


BOMB = "yield 1; let a = []; for (;;) a.push(new Array(100000).fill('xxxxxxxx'))"


@pytest.mark.parametrize("mode", ["process", "inprocess"])
def test_session_stream_memory_limit_then_restores_checkpoint(mode: str) -> None:
    with IsoBox(mode=mode, pool={"min": 1, "max": 1}, timeout=10,
                memory_limit=32 * 2**20) as box:
        session = box.create_session("s")
        session.run("let keep = 5")
        with pytest.raises(MemoryLimitError):
            for _ in session.run_stream(BOMB):
                pass
        assert session.run("typeof keep === 'undefined' ? 'LOST' : keep") == 5


def _sleepy(x: int) -> int:
    time.sleep(0.5)
    return x


def test_async_stream_host_call_does_not_block_the_event_loop() -> None:
    async def main() -> float:
        async with AsyncIsoBox(pool={"min": 1, "max": 1}, timeout=10) as box:
            await box.warmup_pool()
            ticks: list[float] = []

            async def ticker() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0.05)
            out = [v async for v in box.run_stream("yield sleepy(1); yield sleepy(2)",
                                                   functions={"sleepy": _sleepy})]
            task.cancel()
            assert out == [1, 2]
            return max(b - a for a, b in itertools.pairwise(ticks))

    assert asyncio.run(main()) < 0.3


def _big() -> str:
    return "x" * BIG


async def _abig() -> str:
    return "x" * BIG


CATCH = "try { String(%s).length } catch (e) { 'caught' }"


def test_oversized_host_result_is_a_js_error_sync_box() -> None:
    with IsoBox(pool={"min": 1, "max": 1}, timeout=20) as box:
        assert box.run(CATCH % "big()", functions={"big": _big}) == "caught"


def test_oversized_async_host_result_is_a_js_error_async_box() -> None:
    async def main() -> Any:
        async with AsyncIsoBox(pool={"min": 1, "max": 1}, timeout=10) as box:
            # Top-level await keeps only a last expression statement: end with one.
            code = "let r; try { r = String(await big()).length } catch (e) { r = 'caught' }\nr"
            return await box.run(code, functions={"big": _abig})

    assert asyncio.run(main()) == "caught"


_PAYLOAD = "x" * (50 * 2**20)


async def _big_payload() -> str:
    return _PAYLOAD


def test_async_reply_cut_short_does_not_poison_the_next_run() -> None:
    async def main() -> Any:
        async with AsyncIsoBox(pool={"min": 1, "max": 1}, timeout=3) as box:
            await box.warmup_pool()
            first = await box.run("big(); await new Promise(r => setTimeout(r, 5)); 1",
                                  functions={"big": _big_payload})
            assert first == 1
            return await box.run("1 + 1")

    assert asyncio.run(main()) == 2
