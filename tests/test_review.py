"""Human review round trip: export the queue, import edits with an audit trail, reject malformed files
whole."""

from __future__ import annotations

import csv
import json

import pytest
from llm_support import mcqa_record, read_jsonl, write_jsonl

from bimedix.cli import main
from bimedix.data.schema import make_record, validate_record
from bimedix.llm.review import export_review_queue, import_reviews, sampled_for_review
from bimedix.llm.translation import arabic_id

SCORES = [55, 92, 79, 95, 88, 99, 85, 81, 90, 97]


def _translated(index: int, score: float) -> dict:
    english = mcqa_record(index)
    return make_record(
        id=arabic_id(english["id"]), source="demo", task="mcqa", language="ar",
        conversations=[{"from": "human", "value": f"سؤال رقم {index}\nA. خيار\nB. خيار\nC. خيار\nD. خيار"},
                       {"from": "gpt", "value": "B. خيار"}],
        license="MIT", options=["خيار أ", "خيار ب", "خيار ج", "خيار د"], answer="B",
        translation={"model": "m", "score": score, "rounds": 1, "reviewed": False,
                     "review_state": "queued" if score < 80 else "unreviewed", "source_id": english["id"],
                     "cost_usd": 0.001})


@pytest.fixture
def files(tmp_path):
    english = write_jsonl(tmp_path / "en.jsonl", [mcqa_record(i) for i in range(len(SCORES))])
    translated = write_jsonl(tmp_path / "ar.jsonl", [_translated(i, s) for i, s in enumerate(SCORES)])
    return english, translated


def test_sampling_is_seeded_and_about_the_fraction():
    ids = [f"id-{i}" for i in range(4000)]
    picked = [i for i in ids if sampled_for_review(i, 0.05, seed=0)]
    assert 150 < len(picked) < 250
    assert picked == [i for i in ids if sampled_for_review(i, 0.05, seed=0)]
    assert picked != [i for i in ids if sampled_for_review(i, 0.05, seed=1)]


def _expected_queue(fraction: float, seed: int) -> list[str]:
    return [arabic_id(mcqa_record(i)["id"]) for i, score in enumerate(SCORES)
            if score < 80 or sampled_for_review(mcqa_record(i)["id"], fraction, seed)]


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_export_queues_low_scores_and_a_seeded_sample(files, tmp_path, suffix):
    english, translated = files
    queue = tmp_path / f"queue.{suffix}"
    count = export_review_queue(translated, queue, source=english, fraction=0.3, seed=0)
    if suffix == "csv":
        rows = list(csv.DictReader(queue.open(encoding="utf-8-sig")))
    else:
        rows = read_jsonl(queue)
    ids = sorted({row["id"] for row in rows})
    assert ids == sorted(_expected_queue(0.3, 0)) and count == len(ids)
    assert "demo-ar-000" in ids and "demo-ar-002" in ids  # both below 80
    assert len(rows) == count * 6  # 2 turns + 4 options per record
    first = next(row for row in rows if row["id"] == "demo-ar-000" and row["field"] == "conversations.0")
    assert first["english"].startswith("Answer the following") and first["arabic"].startswith("سؤال رقم 0")


def _review(queue_rows: list[dict], path, edits: dict) -> None:
    for row in queue_rows:
        row["decision"] = "approve"
        if (row["id"], row["field"]) in edits:
            row["decision"], row["arabic"] = edits[(row["id"], row["field"])]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(queue_rows[0]))
        writer.writeheader()
        writer.writerows(queue_rows)


def test_import_round_trip_with_audit_trail(files, tmp_path):
    english, translated = files
    queue = tmp_path / "queue.csv"
    export_review_queue(translated, queue, source=english, fraction=0.0)  # only demo-ar-000 and demo-ar-002
    rows = list(csv.DictReader(queue.open(encoding="utf-8-sig")))
    _review(rows, tmp_path / "reviewed.csv", {("demo-ar-000", "options.1"): ("edit", "خيار ب المصحح"),
                                              ("demo-ar-002", "conversations.1"): ("reject", "B. خيار")})
    out = tmp_path / "reviewed.jsonl"
    assert main(["review", "import", "--input", str(translated), "--reviews", str(tmp_path / "reviewed.csv"),
                 "--output", str(out), "--reviewer", "Dr. Amal"]) == 0
    records = {r["id"]: validate_record(r) for r in read_jsonl(out)}
    assert len(records) == len(SCORES)
    edited, rejected = records["demo-ar-000"]["meta"], records["demo-ar-002"]["meta"]
    assert edited["options"][1] == "خيار ب المصحح"
    assert edited["translation"]["reviewed"] and edited["translation"]["review_state"] == "edited"
    assert rejected["translation"]["reviewed"] and rejected["translation"]["review_state"] == "rejected"
    assert not records["demo-ar-001"]["meta"]["translation"]["reviewed"]
    audit = read_jsonl(tmp_path / "reviewed.audit.jsonl")
    assert len(audit) == 12  # every decided row of the two records
    change = next(entry for entry in audit if entry["field"] == "options.1" and entry["id"] == "demo-ar-000")
    assert change["before"] == "خيار ب" and change["after"] == "خيار ب المصحح"
    assert change["reviewer"] == "Dr. Amal"
    assert change["score"] == 55 and change["decision"] == "edit" and change["time"].endswith("+00:00")
    # the reviewed records leave the queue
    assert export_review_queue(out, tmp_path / "again.csv", fraction=0.0) == 0


def test_undecided_rows_leave_the_record_unreviewed(files, tmp_path):
    _, translated = files
    queue = tmp_path / "queue.jsonl"
    export_review_queue(translated, queue, fraction=0.0)
    rows = read_jsonl(queue)
    for row in rows:
        row["decision"] = "" if row["id"] == "demo-ar-000" and row["field"] == "options.3" else "approve"
    write_jsonl(tmp_path / "reviewed.jsonl", rows)
    summary = import_reviews(translated, tmp_path / "reviewed.jsonl", tmp_path / "out.jsonl", reviewer="r")
    assert summary.reviewed == 1 and summary.approved == 1 and summary.undecided_rows == 1
    states = {r["id"]: r["meta"]["translation"]["review_state"] for r in read_jsonl(tmp_path / "out.jsonl")}
    assert states["demo-ar-000"] == "queued" and states["demo-ar-002"] == "approved"


@pytest.mark.parametrize("breakage, expected", [
    (lambda rows: rows[1].update(decision="maybe"), "row 3: column `decision`: 'maybe' is not one of"),
    (lambda rows: rows[2].update(id="demo-ar-999"),
     "row 4: column `id`: 'demo-ar-999' is not a machine-translated"),
    (lambda rows: rows[0].update(field="options.9"), "row 2: column `field`: 'options.9' is not a text"),
    (lambda rows: rows[3].update(arabic=" "), "row 5: column `arabic`: is empty"),
    (lambda rows: rows[1].update(arabic="تغيير"), "row 3: column `decision`: the text was changed but"),
    (lambda rows: rows.append(dict(rows[0])),
     "row 14: column `field`: 'conversations.0' of 'demo-ar-000' appears twice"),
], ids=["decision", "id", "field", "empty", "approve-changed", "duplicate"])
def test_malformed_review_file_names_row_and_column_and_applies_nothing(files, tmp_path, breakage, expected):
    _, translated = files
    queue = tmp_path / "queue.csv"
    export_review_queue(translated, queue, fraction=0.0)
    rows = list(csv.DictReader(queue.open(encoding="utf-8-sig")))
    for row in rows:
        row["decision"] = "approve"
    rows[5].update(decision="edit", arabic="نص جديد")  # a valid edit that must not be applied either
    breakage(rows)
    with open(tmp_path / "bad.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="nothing was applied") as info:
        import_reviews(translated, tmp_path / "bad.csv", out, reviewer="r")
    assert expected in str(info.value) and "bad.csv:" in str(info.value)
    assert not out.exists() and not (tmp_path / "out.audit.jsonl").exists()


def test_missing_column_and_cli_error(files, tmp_path, capsys):
    _, translated = files
    (tmp_path / "bad.csv").write_text("id,field,arabic\ndemo-ar-000,conversations.0,x\n", encoding="utf-8")
    code = main(["review", "import", "--input", str(translated), "--reviews", str(tmp_path / "bad.csv"),
                 "--output", str(tmp_path / "out.jsonl"), "--reviewer", "r"])
    assert code == 2
    err = capsys.readouterr().err
    assert "row 1: column `decision` is missing" in err and not (tmp_path / "out.jsonl").exists()


def test_review_csv_saved_as_windows_1256_is_named_with_its_line(files, tmp_path, capsys):
    english, translated = files
    queue = tmp_path / "queue.csv"
    export_review_queue(translated, queue, source=english, fraction=1.0, seed=0)
    with open(queue, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    _review(rows, queue, {})
    queue.write_bytes(queue.read_text(encoding="utf-8").encode("cp1256"))  # what a spreadsheet may save
    code = main(["review", "import", "--input", str(translated), "--reviews", str(queue),
                 "--output", str(tmp_path / "out.jsonl"), "--reviewer", "r"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    first_arabic = queue.read_bytes().split(b"\n").index(next(line for line in queue.read_bytes().split(b"\n")
                                                              if not line.isascii())) + 1
    assert f"{queue}: line {first_arabic}: byte 0x" in err and "is not UTF-8 text" in err
    assert 'save it again as "CSV UTF-8"' in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", ["import", "serve"])
def test_review_csv_with_a_cell_over_131072_characters_is_read(files, tmp_path, monkeypatch, capsys, command):
    """Python's csv module stops at 131,072 characters a cell by default (`_csv.Error` and a traceback)."""
    import bimedix.llm.review_session

    english, translated = files
    queue = tmp_path / "queue.csv"
    export_review_queue(translated, queue, source=english, fraction=1.0, seed=0)
    with open(queue, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    long_answer = "نص طويل " * 20_000  # 160,000 characters: a long edited answer
    _review(rows, queue, {(rows[0]["id"], rows[0]["field"]): ("edit", long_answer)})
    if command == "import":
        code = main(["review", "import", "--input", str(translated), "--reviews", str(queue),
                     "--output", str(tmp_path / "out.jsonl"), "--reviewer", "r"])
        assert code == 0, capsys.readouterr().err
        assert max(map(len, (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines())) > 160_000
    else:
        session = bimedix.llm.review_session.ReviewSession(translated, tmp_path / "reviewed.jsonl",
                                                           source=english, queue=queue)
        assert session.progress()["total"] == len({row["id"] for row in rows})


def test_cli_export(files, tmp_path, capsys):
    english, translated = files
    assert main(["review", "export", "--input", str(translated), "--output", str(tmp_path / "q.jsonl"),
                 "--source", str(english), "--fraction", "0", "--threshold", "90"]) == 0
    assert "5 records queued" in capsys.readouterr().out
    assert {json.loads(line)["id"] for line in (tmp_path / "q.jsonl").open()} == {
        arabic_id(mcqa_record(i)["id"]) for i, s in enumerate(SCORES) if s < 90}


def test_records_without_translation_provenance_are_not_queued(tmp_path):
    original = dict(_translated(0, 10), id="native-ar-1")
    original["meta"] = dict(original["meta"], translation=None)
    path = write_jsonl(tmp_path / "mixed.jsonl", [original, _translated(1, 10)])
    assert export_review_queue(path, tmp_path / "q.jsonl", fraction=1.0) == 1
    assert {row["id"] for row in read_jsonl(tmp_path / "q.jsonl")} == {"demo-ar-001"}


FORMULAS = ["=HYPERLINK(\"http://x\",\"click\")", "+1+1", "-2+3", "@SUM(A1)", "\tتبويب", "\rسطر", "'اقتباس",
            "''مزدوج", "نص عادي"]


def test_csv_cells_that_spreadsheets_would_run_are_neutralized_and_restored(tmp_path):
    record = _translated(0, 10)
    record["conversations"][0]["value"] = FORMULAS[0]
    record["meta"]["options"] = FORMULAS[1:5]
    second = dict(_translated(1, 10), meta=dict(_translated(1, 10)["meta"], options=FORMULAS[5:]))
    translated = write_jsonl(tmp_path / "ar.jsonl", [record, second])
    texts = {(r["id"], f"options.{i}"): text for r in read_jsonl(translated) for i, text in
             enumerate(r["meta"]["options"])}
    export_review_queue(translated, tmp_path / "queue.csv", fraction=0.0)
    rows = list(csv.DictReader((tmp_path / "queue.csv").open(encoding="utf-8-sig", newline="")))
    cells = [value for row in rows for value in row.values() if value]
    assert not [cell for cell in cells if cell.startswith(("=", "+", "-", "@", "\t", "\r"))]
    assert "'=HYPERLINK(\"http://x\",\"click\")" in cells and "''اقتباس" in cells and "نص عادي" in cells
    for row in rows:
        row["decision"] = "approve"
    with open(tmp_path / "reviewed.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = import_reviews(translated, tmp_path / "reviewed.csv", tmp_path / "out.jsonl", reviewer="r")
    assert summary.approved == 2 and summary.edited == 0  # every text came back unchanged
    out = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert out[record["id"]]["conversations"][0]["value"] == FORMULAS[0]
    assert {(rid, f"options.{i}"): t for rid, r in out.items() for i,
            t in enumerate(r["meta"]["options"])} == texts


@pytest.mark.parametrize("target", ["--input", "--source"])
def test_review_export_never_overwrites_its_inputs(files, tmp_path, capsys, target):
    english, translated = files
    before = {english: english.read_bytes(), translated: translated.read_bytes()}
    output = translated if target == "--input" else english
    assert main(["review", "export", "--input", str(translated), "--source", str(english),
                 "--output", str(output)]) == 2
    assert f"would overwrite the input {target}" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in before} == before


@pytest.mark.parametrize("flag", ["--audit", "--output"])
def test_review_import_never_writes_into_the_translations(files, tmp_path, capsys, flag):
    _, translated = files
    export_review_queue(translated, tmp_path / "queue.jsonl", fraction=0.0)
    before = translated.read_bytes()
    args = {"--input": str(translated), "--reviews": str(tmp_path / "queue.jsonl"),
            "--output": str(tmp_path / "out.jsonl"), "--reviewer": "r", flag: str(translated)}
    assert main(["review", "import", *[part for item in args.items() for part in item]]) == 2
    assert f"{flag} {translated} would overwrite the input --input" in capsys.readouterr().err
    assert translated.read_bytes() == before
