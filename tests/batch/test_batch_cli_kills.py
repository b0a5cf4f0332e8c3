"""``isobox batch`` killed with SIGKILL at random moments, then ``--resume``d until it
finishes: every index exactly once, nothing already written is redone (the output written
before each kill is kept byte for byte); and sandbox workers SIGKILLed under a running job:
nothing lost. No fork server or worker may outlive the CLI.
"""

from __future__ import annotations

import csv
import io
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from batch_helpers import (
    SLOW,
    by_index,
    jsonl_records,
    kill,
    output_lines,
    popen_batch_cli,
    run_batch_cli,
    sandbox_workers,
    wait_until,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("no_leftovers")


def complete_prefix(path: Path) -> bytes:
    """The output up to its last newline: what a resume must keep."""
    if not path.exists():
        return b""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def kill_at_random_moments(job: Path, src: Path, out: Path, rng: random.Random, kills: int,
                           *extra: str) -> list[bytes]:
    """Start the job (then --resume it) and SIGKILL it ``kills`` times: half the time after a
    random delay (startup and recovery included), half after its output grew by a random
    number of bytes (mid-write). Returns the output's complete prefix after each kill.

    A kill before the output file exists (during startup) leaves nothing to resume: --resume
    would be refused (exit 2, no journal), so the job is started again as new, as a user
    would (the output is created only after the journal is ready)."""
    prefixes: list[bytes] = []
    for k in range(kills):
        size = out.stat().st_size if out.exists() else 0
        proc = popen_batch_cli(job, src, out, *extra, *resume_flag(out))
        try:
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.05, 1.5))
            else:
                target = size + rng.randint(1, 600_000)

                def grown(proc: subprocess.Popen[bytes] = proc, target: int = target) -> bool:
                    return proc.poll() is not None or (out.exists()
                                                       and out.stat().st_size >= target)

                wait_until(grown, 15.0, interval=0.005)
        finally:
            finished = proc.poll() is not None
            proc.kill()
            proc.wait(10)
        assert not finished or proc.returncode == 0, (k, proc.returncode)
        prefixes.append(complete_prefix(out))
    return prefixes


def resume_flag(out: Path) -> list[str]:
    return ["--resume"] if out.exists() else []


def resume_until_done(job: Path, src: Path, out: Path, *extra: str) -> None:
    for _ in range(3):
        done = run_batch_cli(job, src, out, *extra, *resume_flag(out))
        if done.returncode == 0:
            return
        assert done.returncode == 8, done.stderr  # failed items: the caller's checks tell
    raise AssertionError("--resume never finished with exit 0")


@pytest.mark.timeout(180)  # real processes: slow on a loaded machine
def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    """200,000 lines, 5 SIGKILLs at random moments, then --resume until exit 0: the output
    has every index exactly once with its value; the lines written before each kill are kept
    as they were (only what was in flight runs again)."""
    total = 200_000
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    src = write_jsonl(tmp_path / "in.jsonl", ({"x": i} for i in range(total)))
    job = tmp_path / "job.js"
    job.write_text("input.x * 3", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    prefixes = kill_at_random_moments(job, src, out, rng, 5)
    resume_until_done(job, src, out)
    final = out.read_bytes()
    for k, prefix in enumerate(prefixes):
        assert final.startswith(prefix), f"seed {seed}: lines written before kill {k} changed"
    lines = output_lines(out)
    assert len(lines) == total, f"seed {seed}"
    records = by_index(jsonl_records(out))  # fails on a duplicate
    assert sorted(records) == list(range(total)), f"seed {seed}"
    assert all(r["ok"] and r["value"] == 3 * i for i, r in records.items()), f"seed {seed}"
    assert len(prefixes[-1]) > 0, f"seed {seed}: no kill happened after any output"


@pytest.mark.timeout(180)  # real processes: slow on a loaded machine
def test_sigkill_then_resume_csv(tmp_path: Path) -> None:
    """The same with CSV: the header once, every row's index exactly once."""
    total = 40_000
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    src = tmp_path / "in.csv"
    src.write_text("n,s\n" + "".join(f"{i},s{i}\n" for i in range(total)), encoding="utf-8")
    job = tmp_path / "job.js"
    job.write_text("input.s + ':' + (Number(input.n) + 1)", encoding="utf-8")
    out = tmp_path / "out.csv"
    prefixes = kill_at_random_moments(job, src, out, rng, 3)
    resume_until_done(job, src, out)
    final = out.read_bytes()
    assert all(final.startswith(p) for p in prefixes), f"seed {seed}"
    rows = list(csv.reader(io.StringIO(final.decode("utf-8"), newline="")))
    assert rows[0] == ["index", "ok", "value", "error_type", "error_message"]
    assert len(rows) == total + 1, f"seed {seed}"
    got = {}
    for row in rows[1:]:
        assert int(row[0]) not in got, f"seed {seed}: index {row[0]} twice"
        got[int(row[0])] = row
    assert sorted(got) == list(range(total))
    assert all(got[i][1:3] == ["true", f'"s{i}:{i + 1}"'] for i in range(total)), f"seed {seed}"


@pytest.mark.timeout(180)  # real processes: slow on a loaded machine
def test_sandbox_workers_killed_during_a_job(tmp_path: Path) -> None:
    """Sandbox workers (children of the CLI's fork server) SIGKILLed while a job runs: the
    crashed items run again, every index is written once, and only the malformed line fails
    (exit 8)."""
    total = 6000
    lines: list[object] = [{"x": i} for i in range(total)]
    lines[1234] = "{oops"
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    job = tmp_path / "job.js"
    job.write_text(SLOW.replace("input * 2", "input.x * 2"), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    proc = popen_batch_cli(job, src, out)
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        # At most 5 deaths, 0.4 s apart: below the pool's crash-loop breaker (10 in 10 s).
        while not stop.wait(0.4) and len(killed) < 5 and proc.poll() is None:
            workers = sandbox_workers(proc.pid)
            if workers:
                pid = random.choice(workers).pid
                if kill(pid):
                    killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        code = proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        stop.set()
        thread.join()
    stderr = out.with_name(out.name + ".stderr").read_text()
    assert code == 8, stderr
    assert len(killed) >= 2, "the job ended before its workers could be killed"
    records = by_index(jsonl_records(out))
    assert sorted(records) == list(range(total))
    failed = {i: r["error"]["type"] for i, r in records.items() if not r["ok"]}
    assert failed == {1234: "InputError"}
    assert all(r["value"] == 2 * i for i, r in records.items() if r["ok"])
