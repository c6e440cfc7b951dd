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
audit entry (reviewer, UTC time, decision, before, after, score, comment) to ``OUT.audit.jsonl``.

In CSV queues a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (which a
spreadsheet would run as a formula) or with a single quote gets one more single quote in front (the OWASP
rule for CSV injection); importing removes one leading quote from every cell, so texts come back exactly.
Neither the output nor the audit trail may be one of the input files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..data.io import atomic_open, iter_jsonl, read_records, write_jsonl
from ..data.outputs import check_outputs
from ..data.schema import validate_record

COLUMNS = ("id", "field", "score", "review_state", "english", "arabic", "decision", "comment")
REQUIRED_COLUMNS = ("id", "field", "arabic", "decision")
DECISIONS = ("approve", "edit", "reject")
# CSV cells starting with these run as formulas in spreadsheets (OWASP "CSV injection"): exported with a leading
# single quote, as is text that starts with a quote itself, and one leading quote is removed again on import.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


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
    """Write the review queue of ``translated`` to ``queue`` (``.csv`` or ``.jsonl``); return the record count.

    Args:
        translated (`str | os.PathLike`): translated records (the output of ``bimedix translate``).
        queue (`str | os.PathLike`): the file for reviewers; CSV is UTF-8 with a BOM so spreadsheets show Arabic.
        source (`str | os.PathLike`, *optional*): the English input, to show the original next to each text.
        fraction (`float`, *optional*, defaults to `0.05`): share of passing records sampled for review.
        seed (`int`, *optional*, defaults to `0`): sampling seed (use the one given to ``translate``).
        threshold (`float`, *optional*, defaults to `80`): records scoring below it are always queued.

    Raises:
        `bimedix.data.outputs.OutputError`: ``queue`` is ``translated`` or ``source``.
    """
    check_outputs({"--output": queue}, {"--input": translated, "--source": source})
    english = {record["id"]: record for record in read_records(source)} if source else {}
    rows, count = [], 0
    for record in read_records(translated):
        if not needs_review(record, threshold=threshold, fraction=fraction, seed=seed):
            continue
        count += 1
        info = record["meta"].get("translation") or {}
        original = english.get(info.get("source_id") or "")
        for field, arabic in _texts(record):
            rows.append({"id": record["id"], "field": field, "score": info.get("score"),
                         "review_state": info.get("review_state"),
                         "english": _get(original, field) if original else "", "arabic": arabic,
                         "decision": "", "comment": ""})
    _write_rows(Path(queue), rows)
    return count


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
        output (`str | os.PathLike`): where to write every record, reviewed ones updated (a new file: never an input).
        reviewer (`str`): who reviewed, for the audit trail.
        audit (`str | os.PathLike`, *optional*): the audit trail, appended; defaults to ``OUT.audit.jsonl``.

    Raises:
        `ValueError`: ``reviews:row N: column `c`: ...`` for the first bad rows; nothing is written then.
        `bimedix.data.outputs.OutputError`: ``output`` or ``audit`` is an input, or they are the same file.
    """
    if not reviewer.strip():
        raise ValueError("--reviewer must name who reviewed")
    output = Path(output)
    audit_path = Path(audit) if audit else output.with_name(output.name.removesuffix(".jsonl") + ".audit.jsonl")
    check_outputs({"--output": output, "--audit": audit_path}, {"--input": translated, "--reviews": reviews})
    records = list(read_records(translated))
    by_id = {record["id"]: record for record in records}
    rows = _read_rows(Path(reviews))
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
        record = by_id.get(row["id"])
        if record is None or not record["meta"].get("translation"):
            bad("id", f"{row['id']!r} is not a machine-translated record of {translated}")
            continue
        before = _get(record, row["field"])
        if before is None:
            bad("field", f"{row['field']!r} is not a text of record {row['id']!r} (use conversations.N or options.N)")
            continue
        if (row["id"], row["field"]) in seen:
            bad("field", f"{row['field']!r} of {row['id']!r} appears twice")
            continue
        seen.add((row["id"], row["field"]))
        decision = str(row["decision"] or "").strip().lower()
        after = row["arabic"] if isinstance(row["arabic"], str) else ""
        if decision and decision not in DECISIONS:
            bad("decision", f"{row['decision']!r} is not one of {list(DECISIONS)} (or blank to leave for later)")
        elif not after.strip():
            bad("arabic", "is empty; put the corrected text, or decision `reject`")
        elif decision == "approve" and after != before:
            bad("decision", "the text was changed but the decision is `approve`; use `edit`")
        elif not decision:
            undecided.add(row["id"])
        else:
            decided.setdefault(row["id"], []).append((row_no, {**row, "decision": decision, "before": before}))
    if errors:
        shown = "\n".join(errors[:10]) + (f"\n... and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise ValueError(f"{len(errors)} bad row(s) in the review file; nothing was applied:\n{shown}")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    counts = {"approved": 0, "edited": 0, "rejected": 0}
    trail = []
    for record_id, entries in decided.items():
        if record_id in undecided:
            continue
        record = by_id[record_id]
        updated = json.loads(json.dumps(record))
        info = updated["meta"]["translation"] = dict(updated["meta"].get("translation") or {})
        for _, row in entries:
            _set(updated, row["field"], row["arabic"])
            trail.append({"id": record_id, "field": row["field"], "reviewer": reviewer, "time": now,
                          "decision": row["decision"], "before": row["before"], "after": row["arabic"],
                          "score": info.get("score"), "comment": row.get("comment") or ""})
        state = ("rejected" if any(row["decision"] == "reject" for _, row in entries)
                 else "edited" if any(row["arabic"] != row["before"] for _, row in entries) else "approved")
        info.update(reviewed=True, review_state=state)
        try:
            by_id[record_id] = validate_record(updated)
        except ValueError as err:
            raise ValueError(f"{reviews}:row {entries[0][0]}: column `arabic`: the edit breaks the record: {err}; "
                             "nothing was applied") from None
        counts[state] += 1
    previous = audit_path.read_text(encoding="utf-8") if audit_path.exists() else ""
    with atomic_open(audit_path) as handle:
        handle.write(previous + "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in trail))
    write_jsonl(output, (by_id[record["id"]] for record in records))
    undecided_rows = sum(1 for _, row in rows if not str(row.get("decision") or "").strip())
    return ImportSummary(reviewed=sum(counts.values()), undecided_rows=undecided_rows, **counts)


def neutralize_cell(value):
    """Prefix a single quote to text a spreadsheet would run as a formula (or that starts with a quote)."""
    if isinstance(value, str) and value.startswith((*FORMULA_STARTS, "'")):
        return "'" + value
    return value


def restore_cell(value: str) -> str:
    """Undo `neutralize_cell`: drop one leading single quote."""
    return value[1:] if value.startswith("'") else value


def _texts(record: dict) -> list[tuple[str, str]]:
    texts = [(f"conversations.{i}", turn["value"]) for i, turn in enumerate(record["conversations"])]
    return texts + [(f"options.{i}", option) for i, option in enumerate(record["meta"].get("options") or [])]


def _get(record: dict, field: str) -> str | None:
    name, _, index = field.partition(".")
    items = record["conversations"] if name == "conversations" else (record["meta"].get("options") or []) \
        if name == "options" else None
    if items is None or not index.isdigit() or int(index) >= len(items):
        return None
    item = items[int(index)]
    return item["value"] if name == "conversations" else item


def _set(record: dict, field: str, text: str) -> None:
    name, _, index = field.partition(".")
    if name == "conversations":
        record["conversations"][int(index)]["value"] = text
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


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """``(row_number, row)`` pairs: the line number for JSONL, the spreadsheet row (header = 1) for CSV."""
    if path.suffix == ".jsonl":
        rows = []
        for line_no, row in iter_jsonl(path):
            if not isinstance(row, dict):
                raise ValueError(f"{path}:row {line_no}: expected a JSON object with columns {list(COLUMNS)}")
            rows.append((line_no, {k: "" if v is None else v for k, v in row.items()}))
        return rows
    if path.suffix != ".csv":
        raise ValueError(f"{path}: the review file must be a .csv or .jsonl file")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:row 1: column `{missing[0]}` is missing from the header "
                             f"(found: {reader.fieldnames}); nothing was applied")
        rows = []
        for index, row in enumerate(reader, start=2):
            if None in row:
                raise ValueError(f"{path}:row {index}: column `{COLUMNS[-1]}`: the row has more cells than the header "
                                 "(an unquoted comma?); nothing was applied")
            rows.append((index, {k: restore_cell(v or "") for k, v in row.items()}))
        return rows
