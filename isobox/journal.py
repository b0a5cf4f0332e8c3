"""The crash-resilient output of ``isobox batch``: result lines plus a SQLite journal.

The output file is the record of what is done; the journal (``OUT.journal``, SQLite in WAL
mode) makes resuming cheap and safe:

- Every line is written whole (one ``write`` of ``...\\n``). Now and then the output is flushed
  and fsynced, and only then does one journal transaction add the indices written since the
  last one and the output's size at that point (the checkpoint).
- On ``--resume``, lines up to the checkpoint are trusted through the journal; the few lines
  after it are read back from the output (they were written, perhaps not journaled) and a torn
  last line is cut off. Every index then appears exactly once, and only the items that were in
  flight when the process died run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["Journal", "JournalMismatch"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS done (idx INTEGER PRIMARY KEY, ok INTEGER NOT NULL DEFAULT 1);
"""


class JournalMismatch(Exception):
    """The journal belongs to another job (another script or input), or is missing."""


def fingerprint(script: str, input_path: str, fmt: str) -> str:
    """What identifies a job: the script's text, the input's content (not its path: an input
    edited in place is another job, a moved one is not) and the output format. Hashing reads
    the input once (about a second per GB here)."""
    digest = hashlib.sha256(script.encode("utf-8", "surrogatepass")).hexdigest()
    content = hashlib.sha256()
    with open(input_path, "rb") as fh:
        while block := fh.read(1 << 20):
            content.update(block)
    return json.dumps({"script": digest, "input": content.hexdigest(), "format": fmt})


class Journal:
    """The journal of one output file."""

    def __init__(self, output: Path, job: str, *, resume: bool) -> None:
        self.path = output.with_name(output.name + ".journal")
        if resume and not self.path.exists():
            raise JournalMismatch(f"--resume: no journal {self.path} (nothing to resume)")
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        found = self._meta("job")
        if resume:
            if found != job:
                raise JournalMismatch("--resume: the journal was written for another script, "
                                      "input or format")
        else:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM done")
            self.db.execute("DELETE FROM meta")
            self.db.execute("INSERT INTO meta VALUES ('job', ?), ('offset', '0')", (job,))
            self.db.execute("COMMIT")
        self.pending: list[tuple[int, bool]] = []
        self.last_commit = time.monotonic()

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    @property
    def offset(self) -> int:
        """Output bytes known to be complete (journaled)."""
        return int(self._meta("offset") or 0)

    def done(self) -> set[int]:
        """Indices journaled as done."""
        return {int(row[0]) for row in self.db.execute("SELECT idx FROM done")}

    def recover(self, out: Path, index_of: Callable[[bytes], tuple[int, bool] | None]
                ) -> tuple[set[int], int]:
        """Indices done (journal plus the lines written after its checkpoint) and how many
        of them failed; cuts a torn last line off the output and journals what it found.
        An output that is missing or shorter than the journal says is a mismatch: resuming
        would lose records."""
        done = self.done()
        offset = self.offset
        size = out.stat().st_size if out.exists() else -1
        if size < offset:
            raise JournalMismatch(f"--resume: {out} is missing or shorter than its journal "
                                  "records; remove the journal to start the job again")
        with out.open("r+b") as fh:
            fh.seek(offset)
            tail = fh.read()
            keep = tail.rfind(b"\n") + 1  # 0 if no complete line follows the checkpoint
            for line in tail[:keep].splitlines():
                found = index_of(line)
                if found is not None:
                    done.add(found[0])
                    self.pending.append(found)
            fh.truncate(offset + keep)
            fh.flush()
            os.fsync(fh.fileno())
        self.commit(offset + keep)
        failed = int(self.db.execute("SELECT COUNT(*) FROM done WHERE ok = 0").fetchone()[0])
        return done, failed

    def add(self, index: int, ok: bool = True) -> None:
        self.pending.append((index, ok))

    def due(self, every: float = 0.5, batch: int = 5000) -> bool:
        """Whether it is time to checkpoint."""
        return len(self.pending) >= batch or (
            bool(self.pending) and time.monotonic() - self.last_commit >= every)

    def checkpoint(self, fh: IO[bytes]) -> None:
        """Flush and fsync the output, then journal what it holds."""
        fh.flush()
        os.fsync(fh.fileno())
        self.commit(fh.tell())

    def commit(self, offset: int) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR IGNORE INTO done VALUES (?, ?)",
                            ((i, int(ok)) for i, ok in self.pending))
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'offset'", (str(offset),))
        self.db.execute("COMMIT")
        self.pending = []
        self.last_commit = time.monotonic()

    def close(self) -> None:
        self.db.close()
