"""Clinician review of a machine-translated Arabic rubric set (``eval-chat``'s ``data_ar.jsonl``).

``bimedix eval-chat`` lists the Arabic examples the review policy queues in ``data_ar.review.csv``, one row
per text (``prompt.N`` turns, ``rubrics.N`` criteria) with the columns of ``bimedix review export``. A
clinician edits ``arabic`` where needed and sets ``decision`` to ``approve``, ``edit`` or ``reject`` (blank:
later). `apply_arabic_review` checks the whole file first (an unknown id or field, an unknown decision, an
empty text, a changed text marked ``approve`` or a repeated row raises one `ValueError` listing the bad rows,
and nothing is applied), then writes the reviewed set: every example whose rows are all decided becomes
``translation.reviewed = true`` with ``review_state`` ``approved`` or ``edited``, examples with a rejected
text are left out, the rest are copied unchanged. Each decided row is appended to the audit trail (reviewer,
UTC time, decision, before, after, comment). Pass the result to ``bimedix eval-chat --data-ar``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from ..core.io import write_jsonl
from ..core.outputs import check_outputs
from ..data.rubric import Criterion, RubricExample, read_rubric_examples
from ..llm.review import DECISIONS, append_audit, read_review_rows


@dataclass
class ArabicReviewSummary:
    """What `apply_arabic_review` did: examples approved, edited, rejected (left out) and still undecided."""

    approved: int = 0
    edited: int = 0
    rejected: int = 0
    undecided: int = 0
    written: int = 0


def apply_arabic_review(
    data_ar: str | os.PathLike,
    reviews: str | os.PathLike,
    output: str | os.PathLike,
    *,
    reviewer: str,
    audit: str | os.PathLike | None = None,
) -> ArabicReviewSummary:
    """Apply a reviewed queue to the Arabic set ``data_ar`` and write the reviewed set to ``output``.

    Args:
        data_ar (`str | os.PathLike`): the machine-translated set (``data_ar.jsonl``).
        reviews (`str | os.PathLike`): the queue as edited by the clinician (``.csv`` or ``.jsonl``).
        output (`str | os.PathLike`): the reviewed set (a new file, never an input).
        reviewer (`str`): who reviewed, for the audit trail.
        audit (`str | os.PathLike`, *optional*): the audit trail, appended; defaults to ``OUT.audit.jsonl``.

    Raises:
        `ValueError`: ``reviews:row N: column `c`: ...`` for the bad rows; nothing is written then.
    """
    if not reviewer.strip():
        raise ValueError("--reviewer must name who reviewed")
    output = Path(output)
    audit_path = (
        Path(audit) if audit else output.with_name(output.name.removesuffix(".jsonl") + ".audit.jsonl")
    )
    check_outputs({"--output": output, "--audit": audit_path}, {"--data-ar": data_ar, "--reviews": reviews})
    examples = read_rubric_examples(data_ar, language="ar")
    by_id = {example.prompt_id: example for example in examples}
    decided: dict[str, list[dict]] = {}
    undecided: set[str] = set()
    errors, seen = [], set()
    for row_no, row in read_review_rows(reviews):
        problem = _row_problem(by_id.get(str(row.get("id", ""))), row)
        if problem is None and (row["id"], row["field"]) in seen:
            problem = ("field", f"{row['field']!r} of {row['id']!r} appears twice")
        if problem is not None:
            errors.append(f"{reviews}:row {row_no}: column `{problem[0]}`: {problem[1]}")
            continue
        seen.add((row["id"], row["field"]))
        decision = str(row["decision"] or "").strip().lower()
        if decision:
            decided.setdefault(row["id"], []).append({**row, "decision": decision})
        else:
            undecided.add(row["id"])
    if errors:
        shown = "\n".join(errors[:10]) + (f"\n... and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise ValueError(f"{len(errors)} bad row(s) in the review file; nothing was applied:\n{shown}")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary, trail, reviewed = ArabicReviewSummary(), [], {}
    for prompt_id, rows in decided.items():
        if prompt_id in undecided:
            continue
        example = by_id[prompt_id]
        changed = any(row["arabic"] != _text(example, row["field"]) for row in rows)
        state = (
            "rejected"
            if any(row["decision"] == "reject" for row in rows)
            else "edited"
            if changed
            else "approved"
        )
        setattr(summary, state, getattr(summary, state) + 1)
        trail += [
            {
                "id": prompt_id,
                "field": row["field"],
                "reviewer": reviewer,
                "time": now,
                "decision": row["decision"],
                "before": _text(example, row["field"]),
                "after": row["arabic"],
                "comment": row.get("comment") or "",
            }
            for row in rows
        ]
        reviewed[prompt_id] = None if state == "rejected" else _apply(example, rows, state, reviewer)
    summary.undecided = len(undecided)
    kept = [reviewed.get(e.prompt_id, e) for e in examples if reviewed.get(e.prompt_id, e) is not None]
    append_audit(audit_path, trail)
    summary.written = write_jsonl(output, (example.to_dict() for example in kept))
    return summary


def _row_problem(example: RubricExample | None, row: dict) -> tuple[str, str] | None:
    for column in ("id", "field", "arabic", "decision"):
        if column not in row:
            return column, f"missing (found columns: {sorted(row)})"
    if example is None:
        return "id", f"{row['id']!r} is not a prompt_id of the Arabic set"
    if _text(example, row["field"]) is None:
        return "field", f"{row['field']!r} is not a text of {row['id']!r} (use prompt.N or rubrics.N)"
    decision = str(row["decision"] or "").strip().lower()
    if decision and decision not in DECISIONS:
        return (
            "decision",
            f"{row['decision']!r} is not one of {list(DECISIONS)} (or blank to leave for later)",
        )
    if not str(row["arabic"]).strip():
        return "arabic", "is empty; put the corrected text, or decision `reject`"
    if decision == "approve" and row["arabic"] != _text(example, row["field"]):
        return "decision", "the text was changed but the decision is `approve`; use `edit`"
    return None


def _text(example: RubricExample, field: str) -> str | None:
    name, _, index = field.partition(".")
    items = {
        "prompt": [m["content"] for m in example.prompt],
        "rubrics": [c.criterion for c in example.rubrics],
    }.get(name)
    if items is None or not index.isdigit() or int(index) >= len(items):
        return None
    return items[int(index)]


def _apply(example: RubricExample, rows: list[dict], state: str, reviewer: str) -> RubricExample:
    edits = {row["field"]: row["arabic"] for row in rows}
    prompt = tuple(
        {**m, "content": edits.get(f"prompt.{i}", m["content"])} for i, m in enumerate(example.prompt)
    )
    rubrics = tuple(
        Criterion(edits.get(f"rubrics.{i}", c.criterion), c.points, c.tags)
        for i, c in enumerate(example.rubrics)
    )
    info = {
        **example.extra.get("translation", {}),
        "reviewed": True,
        "review_state": state,
        "reviewer": reviewer,
    }
    return replace(example, prompt=prompt, rubrics=rubrics, extra={**example.extra, "translation": info})
