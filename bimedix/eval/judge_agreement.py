"""Judge calibration: clinicians grade a sample of (reply, criterion) pairs; the judge is scored against them.

`export_calibration_sheet` draws, per language, a seeded sample of graded pairs from ``examples.jsonl`` and
writes them as a review sheet (CSV, UTF-8 with a BOM so spreadsheets show Arabic, formula-like cells quoted as
``bimedix review export`` does; or JSON Lines). The judge's verdict is **not** in the sheet, so the clinician
grades blind: they fill ``clinician_met`` with ``yes``/``no`` (also ``true``/``false``, ``1``/``0``,
``نعم``/``لا``)
and their name in ``clinician``; blank rows are skipped. Several clinicians may fill copies of the sheet.

`judge_agreement` reads the filled sheets back and compares each clinician label with the judge's verdict
from ``examples.jsonl``, per language, as HealthBench's meta-evaluation does: the F1 of "met" and the F1 of
"not met", and their mean, the **macro F1** (1: the judge always agrees; a judge answering at random on
balanced data gets about 0.5).
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

from ..core.io import atomic_open, iter_jsonl, write_jsonl
from ..llm.grading import grader_conversation
from ..llm.review import neutralize_cell, read_sheet_rows

SHEET_COLUMNS = (
    "pair_id",
    "language",
    "prompt_id",
    "criterion_index",
    "conversation",
    "reply",
    "criterion",
    "points",
    "clinician_met",
    "clinician",
    "comment",
)
YES = ("yes", "y", "true", "1", "met", "نعم")
NO = ("no", "n", "false", "0", "unmet", "not met", "لا")


def export_calibration_sheet(
    examples: list[dict], path: str | os.PathLike, *, per_language: int, seed: int = 0
) -> int:
    """Write a blind review sheet of ``per_language`` graded (reply, criterion) pairs per language.

    Args:
        examples (`list[dict]`): lines of ``examples.jsonl``.
        path (`str | os.PathLike`): ``.csv`` or ``.jsonl``.
        per_language (`int`): pairs drawn per language (all of them if fewer).
        seed (`int`, *optional*, defaults to `0`): sampling seed.

    Returns:
        `int`: rows written.
    """
    path = Path(path)
    if path.suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{path}: the calibration sheet must be a .csv or .jsonl file")
    rows = []
    for language in sorted({e["language"] for e in examples}):
        pairs = [
            (e, i)
            for e in examples
            if e["language"] == language
            for i, c in enumerate(e["criteria"])
            if c["criteria_met"] is not None
        ]
        for example, index in sorted(
            random.Random(f"{seed}:{language}").sample(pairs, min(per_language, len(pairs))),
            key=lambda pair: (pair[0]["prompt_id"], pair[1]),
        ):
            criterion = example["criteria"][index]
            rows.append(
                {
                    "pair_id": pair_id(language, example["prompt_id"], index),
                    "language": language,
                    "prompt_id": example["prompt_id"],
                    "criterion_index": index,
                    "conversation": grader_conversation(example["prompt"], example["reply"]),
                    "reply": example["reply"],
                    "criterion": criterion["criterion"],
                    "points": criterion["points"],
                    "clinician_met": "",
                    "clinician": "",
                    "comment": "",
                }
            )
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    with atomic_open(path) as handle:
        handle.write("\ufeff")
        writer = csv.DictWriter(handle, fieldnames=SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows({key: neutralize_cell(value) for key, value in row.items()} for row in rows)
    return len(rows)


def pair_id(language: str, prompt_id: str, index: int) -> str:
    """The id of one graded pair: ``language:prompt_id:criterion_index``."""
    return f"{language}:{prompt_id}:{index}"


def read_sheet(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(row_number, row)`` of a filled sheet (``.csv``: spreadsheet rows, header = 1; ``.jsonl``: lines),
    every cell a string."""
    rows = read_sheet_rows(path, columns=SHEET_COLUMNS, required=("pair_id", "clinician_met"),
                           kind="a calibration sheet")
    return [(row_no, {key: str(value) for key, value in row.items()}) for row_no, row in rows]


def judge_agreement(examples: list[dict], sheets: list[str | os.PathLike]) -> dict:
    """Judge-vs-clinician agreement per language from filled sheets and ``examples.jsonl`` lines.

    Returns:
        ``{language: {"pairs", "clinicians", "agreement", "f1_met", "f1_not_met", "macro_f1", "confusion":
        {"tp", "fp", "fn", "tn"}}}`` (judge "met" is the positive class; F1 values are ``None`` when a class
        never occurs in either rater).

    Raises:
        `ValueError`: ``sheet:row N: column `c`: ...`` for an unknown pair or a label that is not yes/no.
    """
    verdicts = {
        pair_id(e["language"], e["prompt_id"], i): c["criteria_met"]
        for e in examples
        for i, c in enumerate(e["criteria"])
    }
    counts: dict[str, dict] = {}
    for sheet in sheets:
        for row_no, row in read_sheet(sheet):
            label = row.get("clinician_met", "").strip().lower()
            if not label:
                continue
            if label not in YES + NO:
                raise ValueError(
                    f"{sheet}:row {row_no}: column `clinician_met`: {row['clinician_met']!r} is not "
                    "yes or no (or leave it blank)"
                )
            judge = verdicts.get(row.get("pair_id", ""))
            if judge is None:
                raise ValueError(
                    f"{sheet}:row {row_no}: column `pair_id`: {row.get('pair_id')!r} is not a "
                    "graded pair of this run's examples.jsonl (a sheet from another run?)"
                )
            language = row["pair_id"].split(":", 1)[0]
            entry = counts.setdefault(language, {"tp": 0, "fp": 0, "fn": 0, "tn": 0, "clinicians": set()})
            clinician = label in YES
            entry["tp" if judge and clinician else "fp" if judge else "fn" if clinician else "tn"] += 1
            entry["clinicians"].add(row.get("clinician", "").strip() or f"{Path(sheet).name}")
    return {language: _f1_report(entry) for language, entry in sorted(counts.items())}


def read_examples(path: str | os.PathLike) -> list[dict]:
    """The lines of an ``examples.jsonl``."""
    return [line for _, line in iter_jsonl(path)]


def _f1_report(entry: dict) -> dict:
    tp, fp, fn, tn = entry["tp"], entry["fp"], entry["fn"], entry["tn"]
    f1_met = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
    f1_not = 2 * tn / (2 * tn + fn + fp) if 2 * tn + fn + fp else None
    macro = (f1_met + f1_not) / 2 if f1_met is not None and f1_not is not None else None
    pairs = tp + fp + fn + tn
    return {
        "pairs": pairs,
        "clinicians": len(entry["clinicians"]),
        "agreement": (tp + tn) / pairs,
        "f1_met": f1_met,
        "f1_not_met": f1_not,
        "macro_f1": macro,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def format_agreement(report: dict) -> str:
    """A short text table of `judge_agreement`'s report."""
    lines = [
        "Judge vs clinicians (HealthBench meta-evaluation: macro F1 of met / not met)",
        f"{'language':<9}{'pairs':>7}{'clinicians':>12}{'agree %':>9}{'F1 met':>8}{'F1 not':>8}"
        f"{'macro F1':>10}",
    ]
    for language, r in report.items():
        cells = ["–" if v is None else f"{v:.3f}" for v in (r["f1_met"], r["f1_not_met"], r["macro_f1"])]
        lines.append(
            f"{language:<9}{r['pairs']:>7}{r['clinicians']:>12}{100 * r['agreement']:>9.1f}"
            f"{cells[0]:>8}{cells[1]:>8}{cells[2]:>10}"
        )
    return "\n".join(lines)
