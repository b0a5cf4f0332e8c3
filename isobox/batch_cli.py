"""``isobox batch``: a script over every line of a JSONL or CSV file, resumable after a crash.

One output record per input record, ``{"index", "ok", "value" | "error": {"type",
"message"}}`` (CSV: columns ``index, ok, value, error_type, error_message``, the value as
JSON). A line that is not valid JSON is a failed item (``InputError``), not a crash. The
output and its journal (:mod:`isobox.journal`) make ``--resume`` finish a killed job with
every index exactly once. Exit codes: 0 all items succeeded, 8 some failed, 2 usage, 7 other.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import click

from isobox.batch import BatchItem
from isobox.errors import IsoBoxError
from isobox.journal import Journal, JournalMismatch, fingerprint

__all__ = ["EXIT_FAILED_ITEMS", "batch_command"]

EXIT_FAILED_ITEMS = 8
_CSV_COLUMNS = ["index", "ok", "value", "error_type", "error_message"]


def _json_default(obj: object) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _finite(value: Any) -> Any:
    """``value`` with NaN and the infinities as None, as JSON.stringify writes them: strict
    JSON has no token for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _strict_json(value: Any) -> str:
    """Strict JSON, ASCII (a lone surrogate becomes an escape, not invalid UTF-8)."""
    try:
        return json.dumps(value, default=_json_default, allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere: the slow path, only then
        return json.dumps(_finite(value), default=_json_default, allow_nan=False)



class _Failed:
    """An input record that could not be read: a failed item that never runs."""

    def __init__(self, message: str) -> None:
        self.message = message


def _read_jsonl(path: Path) -> Iterator[Any]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                yield json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                yield _Failed(f"line {number} is not valid JSON: {exc}")


_BAD_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape made of bytes not UTF-8


def _read_csv(path: Path) -> Iterator[Any]:
    """Rows as dicts; a row that cannot be read is a failed item and the next rows go on."""
    csv.field_size_limit(64 * 2**20)  # beyond that a field fails its row (not the file)
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield _Failed(f"row {reader.line_num} cannot be read: {exc}")
                continue
            if None in row:  # more fields than the header names
                yield _Failed(f"row {reader.line_num} has more fields than the header")
            elif any(_BAD_BYTES.search(str(v)) for v in row.values()):
                yield _Failed(f"row {reader.line_num} is not valid UTF-8")
            else:
                yield dict(row)


class _Writer:
    """Encodes records for the output format; one record is always one line."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt

    def header(self) -> bytes:
        if self.fmt != "csv":
            return b""
        return self._csv_line(_CSV_COLUMNS)

    def record(self, index: int, ok: bool, value: Any = None, error: tuple[str, str] | None = None
               ) -> bytes:
        if self.fmt == "csv":
            err_type, err_msg = error or ("", "")
            return self._csv_line([str(index), "true" if ok else "false",
                                   _strict_json(value) if ok else "", err_type,
                                   " ".join(err_msg.split())])  # one line per record
        entry: dict[str, Any] = {"index": index, "ok": ok}
        if ok:
            entry["value"] = value
        else:
            err_type, err_msg = error or ("IsoBoxError", "")
            entry["error"] = {"type": err_type, "message": err_msg}
        return (_strict_json(entry) + "\n").encode("ascii")

    @staticmethod
    def _csv_line(fields: list[str]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(fields)
        return buf.getvalue().encode("utf-8", "backslashreplace")  # lone surrogates escaped

    def index_of(self, line: bytes) -> tuple[int, bool] | None:
        """The index of a complete output line and whether it was a success (None for the
        CSV header or a line that is not a record)."""
        try:
            if self.fmt == "csv":
                parts = line.split(b",", 2)
                if len(parts) < 2 or not parts[0].isdigit():
                    return None
                return int(parts[0]), parts[1] == b"true"
            found = json.loads(line)
            index = found.get("index")
        except (ValueError, AttributeError):
            return None
        return (index, found.get("ok") is True) if isinstance(index, int) else None


def _format(path: Path, given: str | None) -> str:
    if given:
        return given
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


def _count_records(path: Path, fmt: str) -> int:
    with path.open("rb") as fh:
        lines = sum(1 for _ in fh)
    return max(0, lines - 1) if fmt == "csv" else lines


@click.command("batch")
@click.argument("script", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--input", "input_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON lines (one item per line) or CSV (one item per row, as a dict).")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Where the result records go (the journal is OUTPUT.journal).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None,
              help="Input and output format [by the input's extension: .csv is CSV].")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True,
              help="Wall-clock seconds per item (the CPU budget is the same).")
@click.option("--memory", type=click.IntRange(min=1), default=128 * 2**20, show_default=True,
              help="JS heap limit in bytes, per item.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Runs again an item whose worker crashed, this many times.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Items per run (1: a fresh context for every item).")
@click.option("--address", envvar="ISOBOX_ADDRESS", default=None,
              help="Run on an isobox-supervisor daemon (unix:///path or tcp://host:port) "
              "instead of workers of its own; --workers is then the daemon's business.")
@click.option("--token-file", envvar="ISOBOX_TOKEN_FILE", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The daemon's token (TCP).")
@click.option("--resume", is_flag=True, help="Finish a job that was interrupted.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary.")
def batch_command(  # noqa: PLR0917 - click passes one argument per option
        script: Path, input_path: Path, output_path: Path, fmt: str | None, workers: int,
        timeout: float, memory: int, retries: int, chunk_size: int, address: str | None,
        token_file: Path | None, resume: bool, quiet: bool) -> None:
    """Run SCRIPT once per input record (the record is the global `input`); write one result
    record per input. Killed at any moment, run again with --resume: every index ends up in
    the output exactly once."""
    fmt = _format(input_path, fmt)
    if not input_path.is_file():  # a pipe could not be read twice (to identify the job, to run)
        raise click.UsageError(f"--input {input_path} must be a regular file")
    code = script.read_text(encoding="utf-8")
    if output_path.exists() and not resume:
        raise click.UsageError(f"{output_path} exists: pass --resume to finish that job, or "
                               "remove it")
    try:
        journal = Journal(output_path, fingerprint(code, str(input_path), fmt), resume=resume)
    except JournalMismatch as exc:
        raise click.UsageError(str(exc)) from None
    writer = _Writer(fmt)
    try:
        done, failed_before = (journal.recover(output_path, writer.index_of) if resume
                               else (set(), 0))
    except JournalMismatch as exc:
        journal.close()
        raise click.UsageError(str(exc)) from None
    from isobox.api import IsoBox  # noqa: PLC0415 - keep `isobox --help` light

    try:
        box = IsoBox(timeout=timeout, memory_limit=memory,
                     **_where(workers, address, token_file))
    except (TypeError, ValueError) as exc:
        journal.close()
        raise click.UsageError(str(exc)) from None
    except IsoBoxError as exc:
        journal.close()
        click.echo(f"isobox: {type(exc).__name__}: {exc}", err=True)
        sys.exit(7)
    stats = {"ok": 0, "failed": 0, "skipped": len(done), "failed_before": failed_before}
    started = time.monotonic()
    try:
        with output_path.open("ab") as out:
            if out.tell() == 0:
                out.write(writer.header())
            job = _Job(input_path, fmt, done, out, journal, writer, stats)
            _run(box, job, code, retries=retries, chunk_size=chunk_size, quiet=quiet)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    except IsoBoxError as exc:
        click.echo(f"isobox: {type(exc).__name__}: {exc}", err=True)
        sys.exit(7)
    finally:
        box.shutdown()
        journal.close()
    if not quiet:
        rate = (stats["ok"] + stats["failed"]) / max(1e-9, time.monotonic() - started)
        click.echo(f"isobox batch: {stats['ok']} ok, {stats['failed']} failed, "
                   f"{stats['skipped']} already done; {rate:,.0f} items/s; "
                   f"output {output_path}", err=True)
    sys.exit(EXIT_FAILED_ITEMS if stats["failed"] or stats["failed_before"] else 0)


def _where(workers: int, address: str | None, token_file: Path | None) -> dict[str, Any]:
    """The box's options for where items run: its own workers, or a daemon's."""
    if address is None:
        return {"pool": {"min": workers, "max": workers}, "typescript": "lazy"}
    token = token_file.read_text(encoding="utf-8").strip() if token_file else None
    return {"address": address, "token": token}


@dataclass
class _Job:
    """One batch run's input, output and bookkeeping."""

    input_path: Path
    fmt: str
    done: set[int]
    out: IO[bytes]
    journal: Journal
    writer: _Writer
    stats: dict[str, int]


def _run(box: Any, job: _Job, code: str, *, retries: int, chunk_size: int,
         quiet: bool) -> None:
    done, out, journal, writer, stats = job.done, job.out, job.journal, job.writer, job.stats
    records = _read_csv(job.input_path) if job.fmt == "csv" else _read_jsonl(job.input_path)
    position: dict[int, int] = {}  # map's index -> input index (only those in flight)

    def emit(index: int, data: bytes, ok: bool) -> None:
        out.write(data)
        journal.add(index, ok)
        stats["ok" if ok else "failed"] += 1
        if journal.due():
            journal.checkpoint(out)

    def pending() -> Iterator[Any]:
        # map pulls this on the thread that writes: a record that cannot be read is written
        # as a failed item right here (never buffered, however many there are).
        fed = 0
        for index, record in enumerate(records):
            if index in done:
                continue
            if isinstance(record, _Failed):
                emit(index, writer.record(index, False, error=("InputError", record.message)),
                     False)
                continue
            position[fed] = index
            fed += 1
            yield record

    progress = _progress(job.input_path, job.fmt, len(done), quiet)
    try:
        item: BatchItem
        for item in box.map(code, pending(), retries=retries, ordered=False,
                            chunk_size=chunk_size):
            index = position.pop(item.index)
            if item.ok:
                data = writer.record(index, True, item.value)
            else:
                error = item.error
                data = writer.record(index, False, error=(type(error).__name__, str(error)))
            emit(index, data, item.ok)
            if progress is not None:
                progress.advance()
    finally:
        journal.checkpoint(out)
        if progress is not None:
            progress.stop()


class _Bar:
    """A rich progress bar with rate and ETA (only on a terminal)."""

    def __init__(self, total: int, already: int) -> None:
        from rich.progress import (  # noqa: PLC0415 - only on a terminal
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            Task,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text  # noqa: PLC0415

        class Rate(ProgressColumn):
            def render(self, task: Task) -> Text:
                speed = task.speed
                return Text(f"{speed:,.0f} items/s" if speed else "")

        self.progress = Progress(TextColumn("isobox batch"), BarColumn(), MofNCompleteColumn(),
                                 Rate(), TimeRemainingColumn())
        self.task = self.progress.add_task("items", total=total, completed=already)
        self.progress.start()

    def advance(self) -> None:
        self.progress.advance(self.task)

    def stop(self) -> None:
        self.progress.stop()


def _progress(path: Path, fmt: str, already: int, quiet: bool) -> _Bar | None:
    if quiet or not sys.stderr.isatty():
        return None
    return _Bar(_count_records(path, fmt), already)
