"""The persistent request cache and cost ledger: one SQLite file per run (``OUT.llm.sqlite`` by default).

Every paid response is one row of ``responses``, keyed by the hash of the exact request body (model,
messages and sampling parameters, never the API key). The row *is* the ledger entry: the cache and the
ledger are written in one transaction, so a process killed at any moment has either recorded a response
and its cost or neither, and a resumed run never pays twice for a response it has recorded.
Requests parked for the Batch API live in ``pending`` until their batch's output is collected.
``records`` keeps the finished result (output or reject line) of each input record, keyed by the hash
of the input line and the engine's settings, so a re-run rebuilds its output without re-running the engine.

The database runs in WAL mode with ``synchronous=NORMAL``: a committed row survives the process being
killed (``kill -9``); only an operating-system crash can lose the last commits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    mode TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    source_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    key TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    batch_id TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    input_file_id TEXT NOT NULL,
    created REAL NOT NULL
);
"""


def request_key(body: dict) -> str:
    """The cache key of a request body: SHA-256 of its canonical JSON (sorted keys, UTF-8)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CacheError(OSError):
    """The cache file cannot be used (not a SQLite database, disk full, locked, read-only); the message says
    why."""


@dataclass(frozen=True)
class CachedResponse:
    """One recorded response and what it cost."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class RequestCache:
    """SQLite request cache and cost ledger.

    Args:
        path (`str | os.PathLike`): the database file; created (with its folder) if missing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   factory=_Connection)
        self._db.cache_path = self.path
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def get(self, key: str) -> CachedResponse | None:
        """The recorded response for ``key``, or ``None``."""
        row = self._db.execute(
            "SELECT text, finish_reason, prompt_tokens, "
            "completion_tokens, cost_usd FROM responses WHERE key = ?",
            (key,)).fetchone()
        return CachedResponse(*row) if row else None

    def put(self, key: str, model: str, response: CachedResponse, *, mode: str = "online") -> None:
        """Record a paid response and its cost in one transaction (and drop it from ``pending``)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, model, response.text, response.finish_reason, response.prompt_tokens,
                 response.completion_tokens, response.cost_usd, mode, time.time()))
            self._db.execute("DELETE FROM pending WHERE key = ?", (key,))

    def total_cost(self) -> float:
        """The ledger total in USD."""
        return self._db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM responses").fetchone()[0]

    def usage(self) -> tuple[int, int]:
        """``(prompt_tokens, completion_tokens)`` summed over the ledger."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0) FROM responses").fetchone()
        return int(row[0]), int(row[1])

    def keys(self) -> set[str]:
        """Every recorded request key."""
        return {row[0] for row in self._db.execute("SELECT key FROM responses")}

    def put_record(self, key: str, source_id: str, kind: str, line: str) -> None:
        """Record the finished result of one input record (``kind`` is ``"output"`` or ``"reject"``)."""
        self._db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)", (key, source_id, kind, line))

    def record_index(self) -> dict[str, tuple[str, str]]:
        """``{key: (source_id, kind)}`` of every finished record result."""
        return {key: (source_id, kind) for key, source_id, kind in
                self._db.execute("SELECT key, source_id, kind FROM records")}

    def record_lines(self, keys: list[str]) -> dict[str, str]:
        """The stored result lines of ``keys``."""
        lines = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            lines.update(self._db.execute(f"SELECT key, line FROM records WHERE key IN ({marks})", chunk))
        return lines

    def add_pending(self, key: str, body: dict) -> None:
        """Park a request for the Batch API (a no-op if it is already parked)."""
        self._db.execute("INSERT OR IGNORE INTO pending (key, body) VALUES (?, ?)",
                         (key, json.dumps(body, ensure_ascii=False)))

    def unsubmitted(self) -> list[tuple[str, dict]]:
        """Parked requests not yet part of a batch."""
        rows = self._db.execute("SELECT key, body FROM pending WHERE "
                                "batch_id IS NULL ORDER BY rowid").fetchall()
        return [(key, json.loads(body)) for key, body in rows]

    def record_batch(self, batch_id: str, input_file_id: str, keys: list[str]) -> None:
        """Remember a submitted batch and which parked requests it carries, in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO batches VALUES (?, ?, ?)", (batch_id, input_file_id, time.time()))
            self._db.executemany("UPDATE pending SET batch_id = ? WHERE key = ?",
                                 [(batch_id, k) for k in keys])

    def open_batches(self) -> list[str]:
        """Submitted batches whose output has not been collected."""
        return [row[0] for row in self._db.execute("SELECT batch_id FROM batches ORDER BY created")]

    def close_batch(self, batch_id: str) -> None:
        """Forget a collected batch; requests it did not answer go back to the unsubmitted pool."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            self._db.execute("UPDATE pending SET batch_id = NULL WHERE batch_id = ?", (batch_id,))

    def close(self) -> None:
        self._db.close()


class _Connection(sqlite3.Connection):
    """A connection whose SQLite failures become `CacheError` naming the cache file and the fix."""

    cache_path: Path

    def execute(self, *args):
        with self._explained():
            return super().execute(*args)

    def executemany(self, *args):
        with self._explained():
            return super().executemany(*args)

    def executescript(self, *args):
        with self._explained():
            return super().executescript(*args)

    def __exit__(self, *exc):  # the commit of `with self._db:`, where a full disk shows up
        with self._explained():
            return super().__exit__(*exc)

    @contextlib.contextmanager
    def _explained(self):
        try:
            yield
        except sqlite3.DatabaseError as err:
            text = str(err)
            if "not a database" in text or "malformed" in text:
                fix = ("it is not a bimedix request cache (a SQLite database): point --cache at a new file, "
                       "or at the .llm.sqlite file of an earlier run")
            elif "full" in text:
                fix = ("the disk is full: free some space and re-run the same command (recorded responses "
                       "are kept and not paid again)")
            elif "locked" in text or "busy" in text:
                fix = "another process holds the database: wait for it to finish, or use another --cache"
            elif "readonly" in text or "read-only" in text or "unable to open" in text:
                fix = "it cannot be opened for writing: check the file's permissions or use another --cache"
            else:
                fix = "see the SQLite message; use another --cache if the file is damaged"
            raise CacheError(f"{self.cache_path}: {text}; {fix}") from None
