"""Run an LLM engine over a file of records, resumably: the shared loop of `translation` and `dialogue`.

Resumption has three layers, all in the run's SQLite database (`bimedix.llm.cache`) and output files:

* every paid response is recorded (with its cost) before it is used, so no finished request is sent again;
* every finished record's result line is committed to the database *before* it is appended to the output
  (or to ``OUT.rejects.jsonl``), keyed by the hash of the input line and the engine's ``fingerprint``;
* output lines are written and flushed one record at a time (they survive ``kill -9``; fsync'd every
  second and at the end). On start, a half-written last line is cut off and every source id already in
  the output or rejects file is skipped; results in the database but missing from the files are written
  from the database. Re-running the same command thus neither loses nor duplicates a record nor pays
  twice, and a re-run after deleting the output rebuilds it from the database without the engine.

Output order is completion order, not input order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from ..core.io import raw_lines
from ..core.outputs import check_outputs
from ..data.schema import RecordError, validate_record
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
        failed (`list[str]`): ``"id: reason"`` of records left unfinished by transient errors (re-run to
            retry).
        stopped (`str | None`): why the run stopped early (budget), or ``None``.
        cost_usd (`float`): USD this run added to the ledger.
        ledger_usd (`float`): the ledger total after the run.
        sent (`int`): requests sent to the endpoint (retries included).
        rebuilt (`int`): records written from results kept in the cache database, without the engine.
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
    rebuilt: int = 0

    @property
    def complete(self) -> bool:
        """Whether every input record is now in the output or the rejects file."""
        return self.skipped + self.accepted + self.rejected == self.total


def engine_fingerprint(engine: str, model: str, config, prompts) -> str:
    """A stable string of an engine's name, model, settings dataclass and prompt templates."""
    settings = {name: sorted(value) if isinstance(value, (set, frozenset)) else value
                for name, value in asdict(config).items() if name != "prompts_dir"}
    templates = {prompt.name: [prompt.version, prompt.system, prompt.user] for prompt in prompts}
    return json.dumps({"engine": engine, "model": model, "settings": settings, "prompts": templates},
                      sort_keys=True, ensure_ascii=False)


def rejects_path(output: str | os.PathLike) -> Path:
    """Where the rejects of ``output`` go: ``OUT.rejects.jsonl`` next to it."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".rejects.jsonl")


async def run_records(input_path: str | os.PathLike,
                      process: Callable[[dict], Awaitable[Accepted | Rejected]], *,
                      output: str | os.PathLike, client: LLMClient, fingerprint: str,
                      source_id_of: Callable[[dict], str], desc: str) -> RunSummary:
    """Apply ``process`` to every input record not finished yet, writing results as they finish.

    Every input record is read and validated before the first request. Records whose result is already
    in the cache database (same input line, same ``fingerprint``) are written from there without
    running the engine.

    Args:
        input_path (`str | os.PathLike`): schema records (JSON Lines, Parquet or a saved dataset).
        process (`Callable`): the engine for one record; it raises the client's exceptions.
        output (`str | os.PathLike`): the output JSON Lines file (appended; rejects go to `rejects_path`).
        client (`LLMClient`): its concurrency sets the number of workers; its cache keeps the results.
        fingerprint (`str`): the engine's model, settings and prompts; a change re-runs the engine
            (its requests still come from the cache when unchanged).
        source_id_of (`Callable[[dict], str]`): reads the source id back from an output record.
        desc (`str`): progress bar label.

    Returns:
        `RunSummary`: counts, failures and costs. A fatal error (401, 403, 404...) is raised after the
        records finished so far are written.
    """
    output = Path(output)
    rejected_file = rejects_path(output)
    check_outputs({"output": output, "rejects file": rejected_file}, {"input": input_path})
    output.parent.mkdir(parents=True, exist_ok=True)
    done = _finished_ids(output, lambda line: source_id_of(json.loads(line)))
    done |= _finished_ids(rejected_file, lambda line: json.loads(line)["source_id"])
    summary = RunSummary()
    replay, todo = _plan(Path(input_path), fingerprint, client.cache.record_index(), done, summary)
    start_ledger, start_sent = client.spent_usd, client.sent
    fatal: list[BaseException] = []
    with open(output, "a", encoding="utf-8") as out, open(rejected_file, "a", encoding="utf-8") as rej:
        writer = _Writer(out, rej)
        try:
            _replay(replay, client, writer, summary)
            if client.config.batch:
                await client.flush_batch()  # collect batches a killed run left open
            while True:
                pending = [(key, record) for key, record in todo if record["id"] not in done]
                deferred = await _one_pass(pending, process, client, writer, done, summary, fatal, desc)
                if fatal or summary.stopped or not deferred:
                    break
                logger.info("%d records wait on the Batch API", deferred)
                if await client.flush_batch() == 0:
                    raise RuntimeError("the Batch API returned no results for the parked requests; see the "
                                       "log and re-run to resubmit them")
        finally:
            writer.close()
    summary.ledger_usd = client.spent_usd
    summary.cost_usd = summary.ledger_usd - start_ledger
    summary.sent = client.sent - start_sent
    if fatal:
        raise fatal[0]
    return summary


def _plan(path: Path, fingerprint: str, index: dict[str, tuple[str, str]], done: set[str],
          summary: RunSummary) -> tuple[list[tuple[str, str]], list[tuple[str, dict]]]:
    """Split the input into results to replay from the cache and records to run; validate the latter."""
    base = hashlib.sha256(fingerprint.encode())
    replay, todo, seen = [], [], set()
    for where, raw in _raw_inputs(path):
        digest = base.copy()
        digest.update(raw)
        key = digest.hexdigest()
        if key in index:
            source_id, kind = index[key]
            record = None
        else:
            record = _decode(raw, path, where)
            source_id = record["id"]
        if source_id in seen:
            logger.warning("%s:%s: duplicate id %r; keeping the first record", path, where, source_id)
            continue
        seen.add(source_id)
        summary.total += 1
        if source_id in done:
            summary.skipped += 1
        elif record is None:
            replay.append((key, kind))
        else:
            todo.append((key, record))
    return replay, todo


def _replay(replay: list[tuple[str, str]], client: LLMClient, writer: _Writer, summary: RunSummary) -> None:
    """Write cached results in bulk."""
    for start in range(0, len(replay), 5000):
        chunk = replay[start:start + 5000]
        lines = client.cache.record_lines([key for key, _ in chunk])
        outputs = [lines[key] for key, kind in chunk if kind == "output"]
        rejects = [lines[key] for key, kind in chunk if kind == "reject"]
        writer.write_many(outputs, rejects)
        summary.accepted += len(outputs)
        summary.rejected += len(rejects)
        summary.rebuilt += len(chunk)


def _raw_inputs(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line or row, raw JSON bytes)`` of every input record."""
    if path.is_dir() or path.suffix == ".parquet":
        import datasets

        data = (datasets.load_from_disk(str(path)) if path.is_dir()
                else datasets.Dataset.from_parquet(str(path)))
        for index, row in enumerate(data):
            yield index, json.dumps(row, ensure_ascii=False, sort_keys=True).encode()
        return
    for line_no, raw in raw_lines(path):
        raw = raw.strip()
        if raw:
            yield line_no, raw


def _decode(raw: bytes, path: Path, where: int) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecordError(f"not valid UTF-8 ({err.reason} at byte {err.start})", path=str(path),
                          record=where) from None
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON ({err.msg} at column {err.colno})", path=str(path),
                          record=where) from None
    return validate_record(obj, path=str(path), line=where)


async def _one_pass(todo: list[tuple[str, dict]], process, client: LLMClient, writer: _Writer, done: set[str],
                    summary: RunSummary, fatal: list[BaseException], desc: str) -> int:
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    deferred = 0
    bar = client.progress(len(todo), desc)

    async def worker() -> None:
        nonlocal deferred
        while not queue.empty():
            key, record = queue.get_nowait()
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
                kind, line = "output", json.dumps(result.record, ensure_ascii=False)
                summary.accepted += 1
            else:
                kind, line = "reject", json.dumps({"source_id": result.source_id, "reason": result.reason,
                                                   "cost_usd": result.cost_usd}, ensure_ascii=False)
                summary.rejected += 1
            client.cache.put_record(key, record["id"], kind, line)  # committed before it is written out
            writer.write_many([line] if kind == "output" else [], [line] if kind == "reject" else [])
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

    def write_many(self, outputs: list[str], rejects: list[str]) -> None:
        """Append result lines (each already JSON) and flush; fsync at most once a second."""
        for handle, lines in ((self.out, outputs), (self.rej, rejects)):
            if lines:
                handle.write("\n".join(lines) + "\n")
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
                    raise ValueError(f"{path}:{line_no}: cannot read the "
                                     f"source id of a finished record ({err}); "
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

