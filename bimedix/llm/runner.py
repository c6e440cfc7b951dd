"""Run an LLM engine over a file of records, resumably: the shared loop of `translation` and `dialogue`.

Resumption has two layers. The request cache (`bimedix.llm.cache`) records every paid response, so
no finished request is ever sent again. The output JSON Lines file is appended one finished record at
a time (written and flushed, so it survives ``kill -9``; fsync'd every second and at the end) and
rejected records go to ``OUT.rejects.jsonl`` with their reason. On start, a half-written last line is
cut off and every source id already in either file is skipped, so re-running the same command neither
loses nor duplicates a record; records that were finished but not written are rebuilt from the cache
for free. Output order is completion order, not input order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..data.io import read_records
from ..data.schema import validate_record
from .client import BudgetExceeded, Deferred, LLMClient, LLMError

logger = logging.getLogger(__name__)

#: HTTP statuses that condemn one record (its request is bad) rather than the whole run.
RECORD_LEVEL_STATUSES = frozenset({400, 413, 422})


@dataclass
class Accepted:
    """A finished output record."""

    record: dict


@dataclass
class Rejected:
    """A source record the engine gave up on, with why and what it cost."""

    source_id: str
    reason: str
    cost_usd: float = 0.0


@dataclass
class RunSummary:
    """What one run did.

    Attributes:
        total (`int`): input records.
        skipped (`int`): already finished by an earlier run.
        accepted (`int`): written to the output by this run.
        rejected (`int`): written to the rejects file by this run.
        failed (`list[str]`): ``"id: reason"`` of records left unfinished by transient errors (re-run to retry).
        stopped (`str | None`): why the run stopped early (budget), or ``None``.
        cost_usd (`float`): USD this run added to the ledger.
        ledger_usd (`float`): the ledger total after the run.
        sent (`int`): requests sent to the endpoint (retries included).
    """

    total: int = 0
    skipped: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: list[str] = field(default_factory=list)
    stopped: str | None = None
    cost_usd: float = 0.0
    ledger_usd: float = 0.0
    sent: int = 0

    @property
    def complete(self) -> bool:
        """Whether every input record is now in the output or the rejects file."""
        return self.skipped + self.accepted + self.rejected == self.total


def load_input(path: str | os.PathLike) -> list[dict]:
    """Read and validate every input record before any request is sent (JSON Lines, Parquet or a saved dataset).

    Records whose id repeats an earlier one are dropped with a warning.

    Raises:
        `RecordError`: naming file, record and field for the first bad record.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        import datasets

        data = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
        records = [validate_record(row, path=str(path), line=index) for index, row in enumerate(data)]
    else:
        records = list(read_records(path))
    unique: dict[str, dict] = {}
    for record in records:
        if record["id"] in unique:
            logger.warning("%s: duplicate id %r; keeping the first record", path, record["id"])
            continue
        unique[record["id"]] = record
    return list(unique.values())


def rejects_path(output: str | os.PathLike) -> Path:
    """Where the rejects of ``output`` go: ``OUT.rejects.jsonl`` next to it."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".rejects.jsonl")


async def run_records(records: list[dict], process: Callable[[dict], Awaitable[Accepted | Rejected]], *,
                      output: str | os.PathLike, client: LLMClient, source_id_of: Callable[[dict], str],
                      desc: str) -> RunSummary:
    """Apply ``process`` to every record not finished yet, writing results as they finish.

    Args:
        records (`list[dict]`): the validated input records.
        process (`Callable`): the engine for one record; it raises the client's exceptions.
        output (`str | os.PathLike`): the output JSON Lines file (appended; rejects go to `rejects_path`).
        client (`LLMClient`): its concurrency sets the number of workers.
        source_id_of (`Callable[[dict], str]`): reads the source id back from an output record.
        desc (`str`): progress bar label.

    Returns:
        `RunSummary`: counts, failures and costs. A fatal error (401, 403, 404...) is raised after the
        records finished so far are written.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rejected_file = rejects_path(output)
    done = _finished_ids(output, lambda line: source_id_of(json.loads(line)))
    done |= _finished_ids(rejected_file, lambda line: json.loads(line)["source_id"])
    summary = RunSummary(total=len(records), skipped=sum(1 for r in records if r["id"] in done))
    start_ledger, start_sent = client.spent_usd, client.sent
    fatal: list[BaseException] = []
    with open(output, "a", encoding="utf-8") as out, open(rejected_file, "a", encoding="utf-8") as rej:
        writer = _Writer(out, rej)
        try:
            if client.config.batch:
                await client.flush_batch()  # collect batches a killed run left open
            while True:
                todo = [r for r in records if r["id"] not in done]
                deferred = await _one_pass(todo, process, client, writer, done, summary, fatal, desc)
                if fatal or summary.stopped or not deferred:
                    break
                logger.info("%d records wait on the Batch API", deferred)
                if await client.flush_batch() == 0:
                    raise RuntimeError("the Batch API returned no results for the parked requests; see the log "
                                       "and re-run to resubmit them")
        finally:
            writer.close()
    summary.ledger_usd = client.spent_usd
    summary.cost_usd = summary.ledger_usd - start_ledger
    summary.sent = client.sent - start_sent
    if fatal:
        raise fatal[0]
    return summary


async def _one_pass(todo: list[dict], process, client: LLMClient, writer: _Writer, done: set[str],
                    summary: RunSummary, fatal: list[BaseException], desc: str) -> int:
    queue: asyncio.Queue = asyncio.Queue()
    for record in todo:
        queue.put_nowait(record)
    deferred = 0
    bar = client.progress(len(todo), desc)

    async def worker() -> None:
        nonlocal deferred
        while not queue.empty():
            record = queue.get_nowait()
            if fatal or summary.stopped:
                return
            try:
                result = await process(record)
            except Deferred:
                deferred += 1
                continue
            except BudgetExceeded as err:
                summary.stopped = str(err)
                return
            except LLMError as err:
                if err.status in RECORD_LEVEL_STATUSES:
                    result = Rejected(record["id"], str(err))
                elif err.transient:
                    summary.failed.append(f"{record['id']}: {err}")
                    logger.warning("record %r left for the next run: %s", record["id"], err)
                    continue
                else:
                    fatal.append(err)
                    return
            if isinstance(result, Accepted):
                writer.write_output(result.record)
                summary.accepted += 1
            else:
                writer.write_reject(result)
                summary.rejected += 1
            done.add(record["id"])
            bar.update(1)
            client.show_cost(bar)

    try:
        workers = min(client.config.concurrency, max(1, len(todo)))
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        bar.close()
    return deferred


class _Writer:
    """Appends finished records and rejects; flushes every line, fsyncs at most once a second."""

    def __init__(self, out: IO, rej: IO):
        self.out, self.rej = out, rej
        self.last_sync = time.monotonic()

    def write_output(self, record: dict) -> None:
        self._write(self.out, json.dumps(record, ensure_ascii=False))

    def write_reject(self, reject: Rejected) -> None:
        self._write(self.rej, json.dumps({"source_id": reject.source_id, "reason": reject.reason,
                                          "cost_usd": reject.cost_usd}, ensure_ascii=False))

    def _write(self, handle: IO, line: str) -> None:
        handle.write(line + "\n")
        handle.flush()
        if time.monotonic() - self.last_sync > 1.0:
            self._sync()

    def _sync(self) -> None:
        for handle in (self.out, self.rej):
            os.fsync(handle.fileno())
        self.last_sync = time.monotonic()

    def close(self) -> None:
        self.out.flush()
        self.rej.flush()
        self._sync()


def _finished_ids(path: Path, id_of: Callable[[str], str]) -> set[str]:
    """Source ids in a JSON Lines file, after cutting off a half-written last line left by a crash."""
    if not path.exists():
        return set()
    _truncate_partial_line(path)
    ids = set()
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    ids.add(id_of(line))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{line_no}: cannot read the source id of a finished record ({err}); "
                                     "was this file written by another tool?") from None
    return ids


def _truncate_partial_line(path: Path) -> None:
    with open(path, "rb+") as handle:
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            logger.warning("%s: dropping a half-written last line (%d bytes) left by an interrupted run",
                           path, len(data) - keep)
            handle.truncate(keep)

