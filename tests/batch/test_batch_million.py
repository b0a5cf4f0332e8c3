"""``isobox batch`` keeps its own memory bounded (inputs are read lazily, results written as
they come): over a 1,000,000-line JSONL file (slow), and over a long run of malformed lines
(which 0d91bdf buffered whole). The CLI's RSS is sampled all along with psutil."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from batch_helpers import popen_batch_cli

pytestmark = pytest.mark.usefixtures("no_leftovers")

LINES = 1_000_000
RSS_BOUND = 300 * 2**20  # bytes; the CLI process alone (its sandbox workers are separate)


def peak_rss_of(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, int]:
    """Sample ``proc``'s RSS until it exits; returns (peak, exit code)."""
    watched = psutil.Process(proc.pid)
    peak = 0
    end = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > end:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            with contextlib.suppress(psutil.Error):
                peak = max(peak, watched.memory_info().rss)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return peak, proc.returncode


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_million_lines_in_bounded_memory(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        for i in range(LINES):
            fh.write(f'{{"x": {i}, "s": "item-{i}"}}\n')
    job = tmp_path / "job.js"
    job.write_text("({y: input.x + 1, s: input.s.toUpperCase()})", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    peak, code = peak_rss_of(popen_batch_cli(job, src, out), 280)
    stderr = out.with_name(out.name + ".stderr").read_text()
    assert code == 0, stderr
    assert 0 < peak < RSS_BOUND, f"peak RSS {peak / 2**20:.0f} MiB"
    seen = bytearray(LINES)
    count = 0
    with out.open("rb") as fh:
        for line in fh:
            count += 1
            record = json.loads(line)
            index = record["index"]
            assert not seen[index], f"index {index} twice"
            seen[index] = 1
            assert record["ok"] and record["value"] == {"y": index + 1, "s": f"ITEM-{index}"}
    assert count == LINES
    assert all(seen)


@pytest.mark.timeout(120)
def test_a_long_run_of_malformed_lines_in_bounded_memory(tmp_path: Path) -> None:
    """250,000 malformed lines then a few good ones: the CLI's memory stays near what a good
    input of any length needs (about 40 MB), not proportional to the malformed run."""
    bad = 250_000
    src = tmp_path / "in.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        for i in range(bad):
            fh.write(f"{{not json {i}\n")
        for i in range(10):
            fh.write(f'{{"x": {i}}}\n')
    job = tmp_path / "job.js"
    job.write_text("input.x", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    peak, code = peak_rss_of(popen_batch_cli(job, src, out), 280)
    assert code == 8
    assert sum(1 for _ in out.open("rb")) == bad + 10
    assert peak < 70 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB"
