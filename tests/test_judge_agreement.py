"""Judge calibration sheets: blind export, several clinicians (CSV and JSON Lines), macro F1 per language."""

from __future__ import annotations

import csv
import json

import pytest

from bimedix.eval.judge_agreement import export_calibration_sheet, judge_agreement, read_sheet


def example(language: str, prompt_id: str, verdicts: list[bool | None]) -> dict:
    return {"language": language, "prompt_id": prompt_id, "prompt": [{"role": "user", "content": "=1+1?"}],
            "reply": "It is 2.", "criteria": [{"criterion": f"-c{i}", "points": 1, "criteria_met": v}
                                               for i, v in enumerate(verdicts)]}


EXAMPLES = [example("en", "p1", [True, False, None]), example("en", "p2", [True, True]),
            example("ar", "p1", [False, False])]


def test_export_is_blind_seeded_and_skips_failed_verdicts(tmp_path):
    assert export_calibration_sheet(EXAMPLES, tmp_path / "a.csv", per_language=10, seed=1) == 6
    rows = [row for _, row in read_sheet(tmp_path / "a.csv")]
    assert {row["pair_id"] for row in rows} == {"en:p1:0", "en:p1:1", "en:p2:0", "en:p2:1", "ar:p1:0",
                                                "ar:p1:1"}  # not en:p1:2, whose verdict failed
    assert all(row["clinician_met"] == "" and "criteria_met" not in row for row in rows)
    assert rows[0]["conversation"] == "user: =1+1?\n\nassistant: It is 2."
    assert "'-c0" in (tmp_path / "a.csv").read_text(encoding="utf-8-sig")  # a formula-like cell is quoted
    assert {row["criterion"] for row in rows} == {"-c0", "-c1"}  # and restored on reading
    export_calibration_sheet(EXAMPLES, tmp_path / "b.jsonl", per_language=2, seed=1)
    export_calibration_sheet(EXAMPLES, tmp_path / "c.jsonl", per_language=2, seed=1)
    sample = [row for _, row in read_sheet(tmp_path / "b.jsonl")]
    assert len(sample) == 4 and sample == [row for _, row in read_sheet(tmp_path / "c.jsonl")]
    with pytest.raises(ValueError, match="must be a .csv or .jsonl"):
        export_calibration_sheet(EXAMPLES, tmp_path / "d.txt", per_language=1)


def test_two_clinicians_give_pairwise_macro_f1(tmp_path):
    with open(tmp_path / "a.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["pair_id", "clinician_met", "clinician"])
        writer.writeheader()
        writer.writerows([{"pair_id": "en:p1:0", "clinician_met": "yes", "clinician": "a"},
                          {"pair_id": "en:p1:1", "clinician_met": "yes", "clinician": "a"},
                          {"pair_id": "en:p2:0", "clinician_met": "", "clinician": "a"},  # not graded yet
                          {"pair_id": "ar:p1:0", "clinician_met": "لا", "clinician": "a"}])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in [
        {"pair_id": "en:p1:0", "clinician_met": "TRUE", "clinician": "b"},
        {"pair_id": "en:p2:1", "clinician_met": "no", "clinician": "b"},
        {"pair_id": "ar:p1:1", "clinician_met": "0", "clinician": "b"}]) + "\n", encoding="utf-8")
    report = judge_agreement(EXAMPLES, [tmp_path / "a.csv", tmp_path / "b.jsonl"])
    en = report["en"]  # judge/clinician: (T,T) (F,T) (T,T) (T,F): tp 2, fn 1, fp 1, tn 0
    assert en["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 0} and en["clinicians"] == 2
    assert en["f1_met"] == pytest.approx(2 / 3) and en["f1_not_met"] == 0.0
    assert en["macro_f1"] == pytest.approx(1 / 3) and en["agreement"] == 0.5
    ar = report["ar"]  # both not met, both agree: F1 of "met" is undefined
    assert ar["confusion"]["tn"] == 2 and ar["f1_met"] is None and ar["macro_f1"] is None


def test_unknown_pair_is_reported_with_its_row(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"pair_id": "en:p9:0", "clinician_met": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"s.jsonl:row 1: column `pair_id`: 'en:p9:0' is not a graded pair"):
        judge_agreement(EXAMPLES, [tmp_path / "s.jsonl"])


def test_a_sheet_saved_in_another_encoding_or_with_a_missing_column_is_named(tmp_path):
    (tmp_path / "cp.csv").write_bytes("pair_id,clinician_met\nar:p1:0,لا\n".encode("cp1256"))
    with pytest.raises(ValueError, match=r"cp\.csv: line 2: byte 0x.* is not UTF-8 text"):
        read_sheet(tmp_path / "cp.csv")
    (tmp_path / "short.csv").write_text("pair_id,clinician\nen:p1:0,a\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"short\.csv:row 1: column `clinician_met` is missing"):
        read_sheet(tmp_path / "short.csv")
