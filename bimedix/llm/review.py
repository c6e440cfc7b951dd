"""Human review of machine translations (paper §3.1.2): export a review queue, import the reviewers' edits.

`export_review_queue` writes one row per translated text (each turn, each MCQA option) of every record
that needs a look: all records scoring below the threshold or already ``queued``, plus a seeded random
fraction of the rest (`sampled_for_review`, the same draw the translator uses). Columns::

    id, field, score, review_state, english, arabic, decision, comment

A reviewer edits ``arabic`` where needed and sets ``decision`` to ``approve``, ``edit`` or ``reject``
(blank rows are left for later). `import_reviews` checks the whole file first: any bad row (unknown id
or field, unknown decision, empty text, changed text marked ``approve``, a repeated row) raises a
`ValueError` naming the row and the column, and nothing is applied. Otherwise every record whose rows
all carry a decision is updated: ``meta.translation.reviewed = True`` and ``review_state`` becomes
``rejected`` (any row rejected), ``edited`` (any text changed) or ``approved``; each decided row adds an
audit entry (reviewer, UTC time, decision, before, after, score, comment) to ``OUT.audit.jsonl``. Option
letters in an edited turn are written as Arabic letters (`bimedix.llm.invariants.arabic_option_letters`).

``review serve`` (`bimedix.llm.review_session`) reviews the same queue decision by decision with the same
pieces: `queue_rows`, `row_problem`, `apply_decisions`, `audit_entry` and the fsynced `append_audit`.

In CSV queues a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (which a
spreadsheet would run as a formula) or with a single quote gets one more single quote in front (the OWASP
rule for CSV injection); importing removes one leading quote from every cell, so texts come back exactly.
Neither the output nor the audit trail may be one of the input files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..core.io import atomic_open, csv_reader, iter_jsonl, write_jsonl
from ..core.outputs import check_outputs
from ..data.schema import read_records, validate_record
from .invariants import arabic_option_letters

COLUMNS = ("id", "field", "score", "review_state", "english", "arabic", "decision", "comment")
REQUIRED_COLUMNS = ("id", "field", "arabic", "decision")
DECISIONS = ("approve", "edit", "reject")
# CSV cells starting with these run as formulas in spreadsheets (OWASP "CSV injection"): exported with a
# leading single quote, as is text that starts with a quote itself, and one leading quote is removed again on
# import.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

logger = logging.getLogger(__name__)


def sampled_for_review(record_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether the seeded review sample picks ``record_id``: a hash draw, stable across runs and orderings."""
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "big") / 2 ** 64
    return draw < fraction


def needs_review(record: dict, *, threshold: float, fraction: float, seed: int) -> bool:
    """Whether a translated record belongs in the review queue (never once it has been reviewed)."""
    info = record["meta"].get("translation")
    if not info or info.get("reviewed"):  # not a machine translation, or already reviewed
        return False
    score = info.get("score")
    return (score is None or score < threshold or info.get("review_state") == "queued"
            or sampled_for_review(info.get("source_id") or record["id"], fraction, seed))


def export_review_queue(translated: str | os.PathLike, queue: str | os.PathLike, *,
                        source: str | os.PathLike | None = None, fraction: float = 0.05, seed: int = 0,
                        threshold: float = 80.0) -> int:
    """Write the review queue of ``translated`` to ``queue`` (``.csv`` or ``.jsonl``); return the record
    count.

    Args:
        translated (`str | os.PathLike`): translated records (the output of ``bimedix translate``).
        queue (`str | os.PathLike`): the file for reviewers; CSV is UTF-8 with a BOM so spreadsheets show
            Arabic.
        source (`str | os.PathLike`, *optional*): the English input, to show the original next to each text.
        fraction (`float`, *optional*, defaults to `0.05`): share of passing records sampled for review.
        seed (`int`, *optional*, defaults to `0`): sampling seed (use the one given to ``translate``).
        threshold (`float`, *optional*, defaults to `80`): records scoring below it are always queued.

    Raises:
        `bimedix.core.outputs.OutputError`: ``queue`` is ``translated`` or ``source``.
    """
    check_outputs({"--output": queue}, {"--input": translated, "--source": source})
    rows = queue_rows(read_records(translated), source=source, fraction=fraction, seed=seed,
                      threshold=threshold)
    _write_rows(Path(queue), rows)
    return len({row["id"] for row in rows})


def queue_rows(records: Iterable[dict], *, source: str | os.PathLike | None = None, fraction: float = 0.05,
               seed: int = 0, threshold: float = 80.0) -> list[dict]:
    """The review queue of ``records`` as rows (see `COLUMNS`), undecided; what `export_review_queue`
    writes."""
    english = {record["id"]: record for record in read_records(source)} if source else {}
    rows = []
    for record in records:
        if not needs_review(record, threshold=threshold, fraction=fraction, seed=seed):
            continue
        info = record["meta"].get("translation") or {}
        original = english.get(info.get("source_id") or "")
        for field, arabic in review_texts(record):
            rows.append({"id": record["id"], "field": field, "score": info.get("score"),
                         "review_state": info.get("review_state"),
                         "english": text_of(original, field) if original else "", "arabic": arabic,
                         "decision": "", "comment": ""})
    return rows


@dataclass
class ImportSummary:
    """What `import_reviews` applied."""

    reviewed: int
    approved: int
    edited: int
    rejected: int
    undecided_rows: int


def import_reviews(translated: str | os.PathLike, reviews: str | os.PathLike, output: str | os.PathLike, *,
                   reviewer: str, audit: str | os.PathLike | None = None) -> ImportSummary:
    """Apply a reviewed queue to the translated records and write them all to ``output``.

    Args:
        translated (`str | os.PathLike`): translated records.
        reviews (`str | os.PathLike`): the queue as edited by the reviewer (``.csv`` or ``.jsonl``).
        output (`str | os.PathLike`): where to write every record, reviewed ones updated (a new file: never an
            input).
        reviewer (`str`): who reviewed, for the audit trail.
        audit (`str | os.PathLike`, *optional*): the audit trail, appended; defaults to ``OUT.audit.jsonl``.

    Raises:
        `ValueError`: ``reviews:row N: column `c`: ...`` for the first bad rows; nothing is written then.
        `bimedix.core.outputs.OutputError`: ``output`` or ``audit`` is an input, or they are the same file.
    """
    if not reviewer.strip():
        raise ValueError("--reviewer must name who reviewed")
    output = Path(output)
    audit_path = Path(audit) if audit else output.with_name(output.name.removesuffix(".jsonl")
                                                            + ".audit.jsonl")
    check_outputs({"--output": output, "--audit": audit_path}, {"--input": translated, "--reviews": reviews})
    records = list(read_records(translated))
    by_id = {record["id"]: record for record in records}
    rows = read_review_rows(reviews)
    decided: dict[str, list[tuple[int, dict]]] = {}
    undecided: set[str] = set()
    errors, seen = [], set()
    for row_no, row in rows:
        def bad(column: str, message: str) -> None:
            errors.append(f"{reviews}:row {row_no}: column `{column}`: {message}")

        missing = [column for column in REQUIRED_COLUMNS if column not in row]
        if missing:
            bad(missing[0], f"missing (found columns: {sorted(row)})")
            continue
        not_text = [column for column in REQUIRED_COLUMNS if not isinstance(row[column], str)]
        if not_text:
            bad(not_text[0], f"must be text, got {row[not_text[0]]!r:.80}")
            continue
        problem = row_problem(by_id.get(row["id"]), row, translated)
        if problem:
            bad(*problem)
            continue
        if (row["id"], row["field"]) in seen:
            bad("field", f"{row['field']!r} of {row['id']!r} appears twice")
            continue
        seen.add((row["id"], row["field"]))
        decision = str(row["decision"] or "").strip().lower()
        if not decision:
            undecided.add(row["id"])
        else:
            before = text_of(by_id[row["id"]], row["field"])
            decided.setdefault(row["id"], []).append((row_no, {**row, "decision": decision,
                                                               "before": before}))
    if errors:
        shown = "\n".join(errors[:10]) + (f"\n... and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise ValueError(f"{len(errors)} bad row(s) in the review file; nothing was applied:\n{shown}")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    counts = {"approved": 0, "edited": 0, "rejected": 0}
    trail = []
    for record_id, entries in decided.items():
        if record_id in undecided:
            continue
        try:
            by_id[record_id], state = apply_decisions(by_id[record_id], [row for _, row in entries])
        except ValueError as err:
            raise ValueError(f"{reviews}:row {entries[0][0]}: column "
                             f"`arabic`: the edit breaks the record: {err}; "
                             "nothing was applied") from None
        trail += [audit_entry(by_id[record_id], row, reviewer=reviewer, time=now) for _, row in entries]
        counts[state] += 1
    append_audit(audit_path, trail)
    write_jsonl(output, (by_id[record["id"]] for record in records))
    undecided_rows = sum(1 for _, row in rows if not str(row.get("decision") or "").strip())
    return ImportSummary(reviewed=sum(counts.values()), undecided_rows=undecided_rows, **counts)


def row_problem(record: dict | None, row: dict, translated: str | os.PathLike) -> tuple[str, str] | None:
    """``(column, message)`` saying what is wrong with one review row of ``record``, or ``None`` when it is
    fine.

    ``row`` has ``id``, ``field``, ``arabic`` and ``decision`` (blank: not decided yet).
    """
    if record is None or not record["meta"].get("translation"):
        return "id", f"{row['id']!r} is not a machine-translated record of {translated}"
    before = text_of(record, row["field"])
    if before is None:
        return "field", (f"{row['field']!r} is not a text of record {row['id']!r} "
                         "(use conversations.N or options.N)")
    decision = str(row["decision"] or "").strip().lower()
    after = row["arabic"] if isinstance(row["arabic"], str) else ""
    if decision and decision not in DECISIONS:
        return "decision", (f"{row['decision']!r} is not one of {list(DECISIONS)} "
                            "(or blank to leave for later)")
    if not after.strip():
        return "arabic", "is empty; put the corrected text, or decision `reject`"
    if decision == "approve" and after != before:
        return "decision", "the text was changed but the decision is `approve`; use `edit`"
    return None


def apply_decisions(record: dict, rows: list[dict]) -> tuple[dict, str]:
    """Apply the decided rows (``field``, ``decision``, ``arabic``) of one record; return the new record and
    its state.

    The record becomes ``reviewed`` with ``review_state`` ``rejected`` (any row rejected), ``edited`` (any
    text changed) or ``approved``. Raises `ValueError` when an edit makes the record invalid.
    """
    updated = json.loads(json.dumps(record))
    info = updated["meta"]["translation"] = dict(updated["meta"].get("translation") or {})
    changed = False
    for row in rows:
        changed |= row["arabic"] != text_of(record, row["field"])
        _set(updated, row["field"], row["arabic"])
    state = ("rejected" if any(row["decision"] == "reject" for row in rows)
             else "edited" if changed else "approved")
    info.update(reviewed=True, review_state=state)
    return validate_record(updated), state


def audit_entry(record: dict, row: dict, *, reviewer: str, time: str) -> dict:
    """The audit-trail line of one decided row: reviewer, UTC time, decision, before, after, score,
    comment."""
    return {"id": record["id"], "field": row["field"], "reviewer": reviewer, "time": time,
            "decision": row["decision"], "before": row["before"], "after": row["arabic"],
            "score": (record["meta"].get("translation") or {}).get("score"), "comment": row.get("comment")
            or ""}


def append_audit(path: str | os.PathLike, entries: list[dict]) -> None:
    """Append ``entries`` to the audit trail at ``path`` in one write, flushed to disk before returning.

    A half-written last line left by a crash is closed with a newline first, so it stays a line of its own.
    """
    if not entries:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries).encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_audit(path: str | os.PathLike) -> list[dict]:
    """The entries of an audit trail (none if it does not exist); half-written lines (a crash) are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    for line_no, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s:%d: skipping a half-written audit line (%d bytes)", path, line_no, len(line))
    return entries


def _not_utf8(path: Path, consequence: str) -> str:
    """Where a sheet stops being UTF-8, and how to re-save it."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        where = ""
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        where = f"line {line}: byte {data[err.start]:#04x} at offset {err.start}: "
    return (f"{path}: {where}the file is not UTF-8 text (a spreadsheet saved it in another encoding, such as "
            f"Windows-1256); save it again as \"CSV UTF-8\" and re-run{consequence}")


def neutralize_cell(value):
    """Prefix a single quote to text a spreadsheet would run as a formula (or that starts with a quote)."""
    if isinstance(value, str) and value.startswith((*FORMULA_STARTS, "'")):
        return "'" + value
    return value


def restore_cell(value: str) -> str:
    """Undo `neutralize_cell`: drop one leading single quote."""
    return value[1:] if value.startswith("'") else value


def review_texts(record: dict) -> list[tuple[str, str]]:
    """``(field, text)`` of every reviewable text of ``record``: ``conversations.N`` turns, then
    ``options.N``."""
    texts = [(f"conversations.{i}", turn["value"]) for i, turn in enumerate(record["conversations"])]
    return texts + [(f"options.{i}", option) for i, option in enumerate(record["meta"].get("options") or [])]


def text_of(record: dict, field: str) -> str | None:
    """The text at ``field`` (``conversations.N`` or ``options.N``) of ``record``, or ``None`` if there is
    none."""
    name, _, index = field.partition(".")
    items = record["conversations"] if name == "conversations" else (record["meta"].get("options") or []) \
        if name == "options" else None
    if items is None or not index.isdigit() or int(index) >= len(items):
        return None
    item = items[int(index)]
    return item["value"] if name == "conversations" else item


def _set(record: dict, field: str, text: str) -> None:
    name, _, index = field.partition(".")
    if name == "conversations":  # an edited turn letters its options as the rest of the Arabic data does
        record["conversations"][int(index)]["value"] = arabic_option_letters(text)
    else:
        record["meta"]["options"][int(index)] = text


def _write_rows(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        write_jsonl(path, rows)
        return
    if path.suffix != ".csv":
        raise ValueError(f"{path}: the review queue must be a .csv or .jsonl file")
    with atomic_open(path) as handle:
        handle.write("\ufeff")
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: neutralize_cell(value) for key, value in row.items()} for row in rows)


def read_review_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(row_number, row)`` pairs of a review file: the line number for JSONL, the spreadsheet row (header =
    1) for CSV."""
    return read_sheet_rows(path, columns=COLUMNS, required=REQUIRED_COLUMNS, kind="the review file",
                           consequence="; nothing was applied")


def read_sheet_rows(path: str | os.PathLike, *, columns: Iterable[str], required: Iterable[str], kind: str,
                    consequence: str = "") -> list[tuple[int, dict]]:
    """``(row_number, row)`` pairs of a sheet that people edit in a spreadsheet (review queues, calibration
    sheets): ``.jsonl`` rows by line number, ``.csv`` rows by spreadsheet row (header = 1), with the cells
    `neutralize_cell` protected restored.

    Raises:
        `ValueError`: ``path:row N: ...`` naming the row (and column) at fault, followed by ``consequence``.
    """
    path = Path(path)
    columns = list(columns)
    if path.suffix == ".jsonl":
        rows = []
        for line_no, row in iter_jsonl(path):
            if not isinstance(row, dict):
                raise ValueError(f"{path}:row {line_no}: expected a JSON object with columns {columns}"
                                 f"{consequence}")
            rows.append((line_no, {k: "" if v is None else v for k, v in row.items()}))
        return rows
    if path.suffix != ".csv":
        raise ValueError(f"{path}: {kind} must be a .csv or .jsonl file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv_reader(handle, dict_rows=True)
            try:
                return _csv_rows(path, reader, columns, list(required), consequence)
            except csv.Error as err:  # e.g. a cell over CSV_FIELD_LIMIT characters, a NUL byte
                raise ValueError(f"{path}:line {reader.line_num}: malformed CSV ({err}){consequence}") \
                    from None
    except UnicodeDecodeError:
        raise ValueError(_not_utf8(path, consequence)) from None


def _csv_rows(path: Path, reader, columns: list[str], required: list[str],
              consequence: str) -> list[tuple[int, dict]]:
    missing = [column for column in required if column not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}:row 1: column `{missing[0]}` is missing from the header "
                         f"(found: {reader.fieldnames}){consequence}")
    rows = []
    for index, row in enumerate(reader, start=2):
        if None in row:
            raise ValueError(f"{path}:row {index}: column `{columns[-1]}`: the row has more cells than the "
                             f"header (an unquoted comma?){consequence}")
        rows.append((index, {k: restore_cell(v or "") for k, v in row.items()}))
    return rows
