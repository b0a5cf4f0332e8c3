"""``isobox batch`` as a real process: JSONL and CSV jobs end to end, malformed input, exit
codes, usage errors, and what --resume does with a finished or tampered job.

Each record of the output is checked by index: exactly one per input, with its value or its
typed error.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from batch_helpers import (
    by_index,
    jsonl_records,
    output_lines,
    run_batch_cli,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("no_leftovers")

SCRIPT = """
if (input.kind === 'throw') throw new RangeError('bad ' + input.x);
if (input.kind === 'spin') { while (true) {} }
if (input.kind === 'bomb') { const a = []; for (;;) a.push('x'.repeat(1000) + a.length); }
({x2: input.x * 2, tag: input.tag ?? null})
"""


def script(tmp_path: Path, code: str = SCRIPT, name: str = "job.js") -> Path:
    path = tmp_path / name
    path.write_text(code, encoding="utf-8")
    return path


def run_on(tmp_path: Path, suffix: str, content: bytes, code: str = SCRIPT
           ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``isobox batch`` over an input of ``content`` (``in.jsonl`` or ``in.csv``); the run and
    its output file."""
    src = tmp_path / f"in.{suffix}"
    src.write_bytes(content)
    out = tmp_path / f"out.{suffix}"
    return run_batch_cli(script(tmp_path, code), src, out), out


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


# -- JSONL -----------------------------------------------------------------------------------
def test_jsonl_job_end_to_end(tmp_path: Path) -> None:
    """Values for good records; a malformed line is an InputError item; a throw, a timeout
    and a memory bomb are their items' typed errors; exit 8 because some failed."""
    lines: list[Any] = [{"x": i, "tag": f"t{i}"} for i in range(300)]
    lines[10] = '{"x": 10, broken'
    lines[20] = {"kind": "throw", "x": 20}
    lines[30] = {"kind": "spin", "x": 30}
    lines[40] = {"kind": "bomb", "x": 40}
    lines[50] = ""  # an empty line is not JSON either
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    done = run_batch_cli(script(tmp_path), src, out, "--timeout", "0.5",
                         "--memory", str(32 * 2**20))
    assert done.returncode == 8, done.stderr
    records = by_index(jsonl_records(out))
    assert sorted(records) == list(range(300))
    errors = {i: r["error"]["type"] for i, r in records.items() if not r["ok"]}
    assert errors == {10: "InputError", 20: "ScriptError", 30: "TimeoutError",
                      40: "MemoryLimitError", 50: "InputError"}
    assert "line 11" in records[10]["error"]["message"]
    assert records[20]["error"]["message"] == "RangeError: bad 20"
    for i, record in records.items():
        assert set(record) == ({"index", "ok", "value"} if record["ok"]
                               else {"index", "ok", "error"})
        if record["ok"]:
            assert record["value"] == {"x2": 2 * i, "tag": f"t{i}"}
    assert (tmp_path / "out.jsonl.journal").exists()


def test_all_ok_exits_0(tmp_path: Path) -> None:
    """A job where every item succeeds exits 0; the summary goes to stderr unless --quiet."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": i} for i in range(1000)])
    out = tmp_path / "out.jsonl"
    done = run_batch_cli(script(tmp_path, "input.x + 1"), src, out, "--chunk-size", "7")
    assert done.returncode == 0, done.stderr
    records = by_index(jsonl_records(out))
    assert [records[i]["value"] for i in range(1000)] == [i + 1 for i in range(1000)]
    assert done.stdout == ""


def test_values_of_every_kind_are_written(tmp_path: Path) -> None:
    """Strings with newlines and unicode separators, big ints, bytes, dates, nested values:
    each output record stays one line and reads back."""
    code = ("[input.s, 2n ** 70n, new Uint8Array([1, 255]), new Date(0), {a: [null, true]},"
            " 'line1\\nline2\\r\\u2028\\u0085end'][input.i]")
    src = write_jsonl(tmp_path / "in.jsonl", [{"i": i, "s": "é\u2028x"} for i in range(6)])
    out = tmp_path / "out.jsonl"
    done = run_batch_cli(script(tmp_path, code), src, out)
    assert done.returncode == 0, done.stderr
    assert len(output_lines(out)) == 6
    records = by_index(jsonl_records(out))
    assert [records[i]["value"] for i in range(6)] == [
        "é\u2028x", 2**70, "01ff", "1970-01-01T00:00:00+00:00", {"a": [None, True]},
        "line1\nline2\r\u2028\u0085end"]


def test_every_output_line_is_strict_json(tmp_path: Path) -> None:
    """NaN, Infinity and lone surrogates still give lines that are strict JSON in UTF-8."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"i": i} for i in range(3)])
    out = tmp_path / "out.jsonl"
    done = run_batch_cli(script(tmp_path, "[0 / 0, -Infinity, '\\ud800'][input.i]"), src, out)
    assert done.returncode == 0, done.stderr

    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    for line in output_lines(out):
        json.loads(line.decode("utf-8"), parse_constant=refuse)


def test_empty_jsonl_input(tmp_path: Path) -> None:
    """No input lines: exit 0 and an empty output."""
    done, out = run_on(tmp_path, "jsonl", b"")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b""


def test_all_lines_malformed(tmp_path: Path) -> None:
    """Only malformed lines: one InputError each, exit 8 (nothing runs)."""
    done, out = run_on(tmp_path, "jsonl", b"{\nnope\n\xff\xfe\n[1,\n")
    assert done.returncode == 8, done.stderr
    records = by_index(jsonl_records(out))
    assert sorted(records) == [0, 1, 2, 3]
    assert {r["error"]["type"] for r in records.values()} == {"InputError"}


def test_invalid_script_fails_every_item(tmp_path: Path) -> None:
    """A script that does not parse: every item is a CompileError, exit 8."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": i} for i in range(20)])
    out = tmp_path / "out.jsonl"
    done = run_batch_cli(script(tmp_path, "input.x +"), src, out)
    assert done.returncode == 8, done.stderr
    records = by_index(jsonl_records(out))
    assert sorted(records) == list(range(20))
    assert {r["error"]["type"] for r in records.values()} == {"CompileError"}


# -- CSV -------------------------------------------------------------------------------------
def test_csv_in_and_out(tmp_path: Path) -> None:
    """CSV in (a dict per row, values as strings) and CSV out (index, ok, value as JSON,
    error type and message, one line per record); a row with too many fields is an
    InputError; quoted fields with commas and newlines are read whole."""
    src = tmp_path / "in.csv"
    rows = [["name", "qty"]] + [[f"n{i}", str(i)] for i in range(100)]
    rows[5] = ["has,comma", "4"]
    rows[6] = ["two\nlines", "5"]
    rows[7] = ["x", "6", "extra"]
    rows[8] = ["thrower", "7"]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    src.write_text(buf.getvalue(), encoding="utf-8")
    code = ("if (input.name === 'thrower') throw new Error('multi\\nline message');"
            " ({name: input.name, qty: Number(input.qty) * 2})")
    out = tmp_path / "out.csv"
    done = run_batch_cli(script(tmp_path, code), src, out)
    assert done.returncode == 8, done.stderr
    assert output_lines(out)[0] == b"index,ok,value,error_type,error_message"
    assert len(output_lines(out)) == 101  # header + one line per record
    records = read_csv(out)
    assert sorted(int(r["index"]) for r in records) == list(range(100))
    got = {int(r["index"]): r for r in records}
    assert json.loads(got[4]["value"]) == {"name": "has,comma", "qty": 8}
    assert json.loads(got[5]["value"]) == {"name": "two\nlines", "qty": 10}
    assert (got[6]["ok"], got[6]["error_type"], got[6]["value"]) == ("false", "InputError", "")
    assert (got[7]["ok"], got[7]["error_type"]) == ("false", "ScriptError")
    assert got[7]["error_message"] == "Error: multi line message"
    for i in [*range(4), *range(8, 100)]:
        assert got[i]["ok"] == "true"
        assert json.loads(got[i]["value"]) == {"name": f"n{i}", "qty": 2 * i}
        assert (got[i]["error_type"], got[i]["error_message"]) == ("", "")


def test_csv_all_ok_and_format_option(tmp_path: Path) -> None:
    """--format csv on a file without the .csv extension; all ok exits 0."""
    src = tmp_path / "rows.txt"
    src.write_text("a,b\n1,2\n3,4\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    done = run_batch_cli(script(tmp_path, "Number(input.a) + Number(input.b)"), src, out,
                         "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert [(r["index"], r["value"]) for r in read_csv(out)] == [("0", "3"), ("1", "7")]


@pytest.mark.parametrize("content", [b"", b"a,b\n"], ids=["empty-file", "header-only"])
def test_empty_csv_input(tmp_path: Path, content: bytes) -> None:
    """No rows: exit 0, and the output is the header alone."""
    done, out = run_on(tmp_path, "csv", content)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"index,ok,value,error_type,error_message\n"


def test_csv_row_with_invalid_utf8_fails_only_that_row(tmp_path: Path) -> None:
    """A CSV row that is not UTF-8 is that row's InputError; the rows after it are read."""
    done, out = run_on(tmp_path, "csv", b"x,y\n1,a\n2,b\n\xff\xfe,c\n4,d\n5,e\n",
                       "Number(input.x) * 2")
    assert done.returncode == 8, done.stderr
    got = {int(r["index"]): r for r in read_csv(out)}
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert got[2]["error_type"] == "InputError"
    assert [json.loads(got[i]["value"]) for i in (0, 1, 3, 4)] == [2, 4, 8, 10]


def test_csv_oversized_field_fails_at_most_that_row(tmp_path: Path) -> None:
    """A field over csv's default field_size_limit (128 KiB): that row is read whole or fails
    alone (InputError); the rows after it are read all the same."""
    done, out = run_on(tmp_path, "csv", b"x,y\n1,a\n2," + b"z" * 200_000 + b"\n4,d\n5,e\n",
                       "Number(input.x) * 2")
    got = {int(r["index"]): r for r in read_csv(out)}
    assert sorted(got) == [0, 1, 2, 3]
    assert [json.loads(got[i]["value"]) for i in (0, 2, 3)] == [2, 8, 10]
    if got[1]["ok"] == "true":
        assert json.loads(got[1]["value"]) == 4
        assert done.returncode == 0, done.stderr
    else:
        assert got[1]["error_type"] == "InputError"
        assert done.returncode == 8, done.stderr


# -- usage errors ----------------------------------------------------------------------------
def test_existing_output_without_resume_is_a_usage_error(tmp_path: Path) -> None:
    """An output that exists is never overwritten without --resume: exit 2, file untouched."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": 1}])
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"precious\n")
    done = run_batch_cli(script(tmp_path), src, out)
    assert done.returncode == 2
    assert "--resume" in done.stderr
    assert out.read_bytes() == b"precious\n"


def test_resume_without_journal_is_a_usage_error(tmp_path: Path) -> None:
    """--resume with no journal (nothing to resume): exit 2."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": 1}])
    out = tmp_path / "out.jsonl"
    done = run_batch_cli(script(tmp_path), src, out, "--resume")
    assert done.returncode == 2
    assert "journal" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("change", ["script", "input", "edited input", "format"])
def test_resume_of_another_job_is_a_usage_error(tmp_path: Path, change: str) -> None:
    """--resume with another script, input (another file, or the same file edited in place)
    or format than the journal's: exit 2, and the output and journal are left as they
    were."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": i} for i in range(5)])
    job = script(tmp_path, "input.x")
    out = tmp_path / "out.jsonl"
    assert run_batch_cli(job, src, out).returncode == 0
    before = out.read_bytes()
    extra: list[str] = []
    if change == "script":
        job = script(tmp_path, "input.x + 1", name="other.js")
    elif change == "input":
        src = write_jsonl(tmp_path / "other.jsonl", [{"x": i} for i in range(1, 6)])
    elif change == "edited input":
        src = write_jsonl(src, [{"x": i} for i in range(4)] + [{"x": 40}])
    else:
        extra = ["--format", "csv"]
    done = run_batch_cli(job, src, out, "--resume", *extra)
    assert done.returncode == 2, done.stderr
    assert "another" in done.stderr
    assert out.read_bytes() == before


def test_a_pipe_as_input_is_a_usage_error(tmp_path: Path) -> None:
    """The input is read twice (its content identifies the job): a FIFO is refused with exit
    2 at once, without blocking on it."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    done = run_batch_cli(script(tmp_path), fifo, tmp_path / "out.jsonl")
    assert done.returncode == 2, done.stderr
    assert "regular file" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_resume_with_the_input_moved_goes_on(tmp_path: Path) -> None:
    """The job is the input's content, not its path: --resume with the same input at another
    path finishes the job (here: nothing is left to run, nothing is written twice)."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": i} for i in range(5)])
    job = script(tmp_path, "input.x")
    out = tmp_path / "out.jsonl"
    assert run_batch_cli(job, src, out).returncode == 0
    before = out.read_bytes()
    moved = src.rename(tmp_path / "moved.jsonl")
    done = run_batch_cli(job, moved, out, "--resume")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == before


BAD_NUMBERS = [["--workers", "0"], ["--timeout", "-1"], ["--chunk-size", "0"],
               ["--retries", "-1"]]


@pytest.mark.parametrize("args", BAD_NUMBERS, ids=lambda a: a[0])
def test_bad_numbers_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    """Out-of-range numbers: exit 2, not a traceback."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": 1}])
    done = run_batch_cli(script(tmp_path), src, tmp_path / "out.jsonl", *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", BAD_NUMBERS, ids=lambda a: a[0])
def test_a_usage_error_leaves_no_output_behind(tmp_path: Path, args: list[str]) -> None:
    """After a usage error, the same command with the number fixed just runs."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": 1}])
    out = tmp_path / "out.jsonl"
    assert run_batch_cli(script(tmp_path), src, out, *args).returncode == 2
    assert not out.exists()
    done = run_batch_cli(script(tmp_path), src, out)
    assert done.returncode == 0, done.stderr


# -- resume of a job that had finished -------------------------------------------------------
def test_resume_of_a_finished_job_writes_nothing_twice(tmp_path: Path) -> None:
    """--resume after a job finished runs nothing and leaves the output as it was."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": i} for i in range(500)])
    out = tmp_path / "out.jsonl"
    job = script(tmp_path, "input.x")
    assert run_batch_cli(job, src, out).returncode == 0
    before = out.read_bytes()
    done = run_batch_cli(job, src, out, "--resume")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == before
    db = sqlite3.connect(tmp_path / "out.jsonl.journal")
    try:
        assert db.execute("SELECT COUNT(*) FROM done").fetchone()[0] == 500
    finally:
        db.close()


def test_resume_keeps_exit_8_for_earlier_failures(tmp_path: Path) -> None:
    """--resume of a job whose output holds failed records still exits 8."""
    src = write_jsonl(tmp_path / "in.jsonl", ["not json", *({"x": i} for i in range(50))])
    out = tmp_path / "out.jsonl"
    job = script(tmp_path, "input.x")
    assert run_batch_cli(job, src, out).returncode == 8
    assert run_batch_cli(job, src, out, "--resume").returncode == 8


def test_resume_with_the_output_removed_loses_nothing(tmp_path: Path) -> None:
    """--resume with the output gone (its journal still there) refuses (exit 2) or redoes the
    job; it never reports success over an output that lost records."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": i} for i in range(20)])
    out = tmp_path / "out.jsonl"
    job = script(tmp_path, "input.x")
    assert run_batch_cli(job, src, out).returncode == 0
    out.unlink()
    done = run_batch_cli(job, src, out, "--resume")
    if done.returncode != 2:
        assert sorted(by_index(jsonl_records(out))) == list(range(20))
