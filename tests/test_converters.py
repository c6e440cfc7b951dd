"""Every source converter on real files (exact counts, known content), the fixtures, bad input, and the
CLI."""

from __future__ import annotations

import json

import pytest

from bimedix.cli import main
from bimedix.data.converters import BUNDLED, CONVERTERS, SOURCE_INFO, bundled_path, convert
from bimedix.data.rejects import RejectLog
from bimedix.data.schema import RecordError, read_records, validate_record

LIVEQA = "liveqa_medical_trec2017/TestDataset/TREC-2017-LiveQA-Medical-Test.xml"
MEDQA = "medqa_usmle/data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl"

# source, path under shared data, options, records written, records rejected
REAL = {
    "pubmedqa": ("pubmedqa/data/ori_pqal.json", {}, 900, 0),
    "medmcqa": ("medmcqa/data/dev.json", {}, 3346, 0),
    "medqa": (MEDQA, {}, 1018, 0),
    "mmlu": ("mmlu_medical/data/test", {}, 871, 0),
    "mmlu-ar": ("mmlu_medical_arabic_acegpt/MMLUArabic/test", {}, 715, 156),
    "medarabench": ("medarabench/medarabench-test_split.csv", {}, 4927, 32),
    "meadow": ("medical_meadow_wikidoc_patient_info/medical_meadow_small.json", {}, 5942, 0),
    "liveqa": (LIVEQA, {}, 104, 0),
    "medicationqa": ("medicationqa/MedInfo2019-QA-Medications.xlsx", {}, 690, 0),
    "mentalqa": ("mentalqa/Train_Dev.tsv", {}, 350, 0),
}

# source, record id (or index), text in the human turn, start of the gpt turn, meta subject
SPOT = [
    ("pubmedqa", "pubmedqa-26163474", "Is there a connection between sublingual varices and hypertension?",
     "Yes", None),
    ("medmcqa", "medmcqa-b944ada9-d776-4c2a-9180-3ae5f393f72d", "glomerular capillaries",
     "A. The oncotic pressure of the fluid leaving the capillaries", "Physiology"),
    ("medqa", 1, "Two weeks after undergoing an emergency cardiac catherization",
     "B. Cholesterol embolization", None),
    ("mmlu", 0, 'A "dished face" profile is often associated with',
     "B. a recessive maxilla due to failure of elongation of the cranial base.", "anatomy"),
    ("mmlu-ar", 0, "الوجه المحدب", "ب. عظمة فكية مهجورة", "anatomy"),
    ("medarabench", "medarabench-1", "عضلات الكم المدوره للكتف", "ج. وحدة منها ترتكز على الحديبية الصغرى",
     "Anatomy"),
    ("meadow", 0, "What are the symptoms of Allergy?", "Allergy symptoms vary, but may include:", None),
    ("liveqa", "liveqa-TQ1",
     "Noonan syndrome\n\nWhat are the references with noonan syndrome and polycystic renal disease",
     "Noonan's syndrome is an eponymic designation", "noonan syndrome"),
    ("liveqa", "liveqa-TQ2", "Zolmitriptan tabkets 5mg", "Zolmitriptan tablets are available as 2.5 mg",
     None),
    ("medicationqa", 0, "how does rivatigmine and otc sleep medicine interact",
     "tell your doctor and pharmacist what prescription", "rivastigmine"),
    ("mentalqa", 0, "هل يعتبر الخوف من عدم الإنجاب", "سد تى نعم ان هناك العديد من القلق",
     "diagnosis, epidemiology"),
]


@pytest.fixture(scope="module")
def converted(shared_data):
    """Each real source converted once (skip mode), as ``{source: (records, rejects)}``."""
    out = {}
    for source, (path, options, _, _) in REAL.items():
        with RejectLog() as rejects:
            records = list(convert(source, shared_data / path, on_error=rejects, **options))
        out[source] = (records, rejects)
    return out


def test_registry_names_are_the_contract():
    assert set(CONVERTERS) == {"pubmedqa", "medmcqa", "medqa", "healthcaremagic", "icliniq", "meadow", "umls",
                               "liveqa", "medicationqa", "mentalqa", "medarabench", "mmlu-ar", "mmlu"}
    assert set(SOURCE_INFO) == set(CONVERTERS)
    assert {name for name, info in SOURCE_INFO.items() if info.permissive} == {
        "pubmedqa", "medmcqa", "medqa", "mmlu", "mmlu-ar", "mentalqa"}
    assert not any(SOURCE_INFO[name].redistributable for name in ("liveqa", "medicationqa", "medarabench"))


@pytest.mark.parametrize("source", sorted(REAL))
def test_real_counts_and_schema(converted, source):
    records, rejects = converted[source]
    _, _, written, rejected = REAL[source]
    info = SOURCE_INFO[source]
    assert (len(records), rejects.count) == (written, rejected)
    assert len({r["id"] for r in records}) == len(records)
    assert all(r["source"] == source and r["task"] == info.task and r["language"] == info.language
               and r["license"] == info.license for r in records)
    assert validate_record(records[-1]) == records[-1]


@pytest.mark.parametrize("source, key, human, gpt, subject", SPOT)
def test_real_content(converted, source, key, human, gpt, subject):
    records = converted[source][0]
    record = records[key] if isinstance(key, int) else next(r for r in records if r["id"] == key)
    turns = record["conversations"]
    assert human in turns[0]["value"] and turns[1]["value"].startswith(gpt)
    assert record["meta"]["subject"] == subject or subject is None


def test_pubmedqa_with_ground_truth_split(shared_data):
    path = shared_data / REAL["pubmedqa"][0]
    truth = shared_data / "pubmedqa/data/test_ground_truth.json"
    assert sum(1 for _ in convert("pubmedqa", path, ground_truth=truth, split="test")) == 400
    with pytest.raises(ValueError, match="unsupported option"):
        convert("pubmedqa", path, cop_base=0)


def test_liveqa_summaries_file_and_both_answer_tags(shared_data):
    other = (shared_data / "liveqa_medical_trec2017/TestDataset"
             / "TREC-2017-LiveQA-Medical-Test-Questions-w-summaries.xml")
    records = list(convert("liveqa", other))
    assert len(records) == 104 and records[0]["id"] == "liveqa-TQ1"
    assert records[0]["conversations"][1]["value"].startswith("Noonan's syndrome")  # a <RefAnswer>
    assert "\t" not in records[0]["conversations"][1]["value"]


# The LiveQA training files were deleted upstream and state no licence, so they are not in shared data; point
# BIMEDIX_LIVEQA_TRAIN at a folder holding them (docs/data-pipeline.md shows the `git show` that recovers
# them).
LIVEQA_TRAIN = {"TREC-2017-LiveQA-Medical-Train-1.xml": (200, 254, 388),
                "TREC-2017-LiveQA-Medical-Train-2.xml": (246, 246, 246)}


def _liveqa_answers(path) -> dict[str, set[str]]:
    """Each question id of a training file → the texts of all its <ANSWER> elements (read independently)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    return {q.get("questionid") or q.get("qid"): {" ".join("".join(a.itertext()).split())
                                                  for a in q.iter("ANSWER")}
            for q in root.iter("NLM-QUESTION")}


def _check_liveqa_training_file(path, questions: int, pairs: int) -> list[dict]:
    records = list(convert("liveqa", path))
    answers = _liveqa_answers(path)
    assert len(answers) == questions and len(records) == pairs == len({r["id"] for r in records})
    by_question: dict[str, list[dict]] = {}
    for record in records:
        qid = record["id"].removeprefix("liveqa-").rsplit("-S", 1)[0]
        by_question.setdefault(qid, []).append(record)
        assert " ".join(record["conversations"][1]["value"].split()) in answers[qid]
        assert record["meta"]["subject"] and record["meta"]["question_type"]
    assert set(by_question) == set(answers)  # every question yields records
    return records


@pytest.mark.parametrize(("name", "questions", "pairs"), [("TREC-2017-LiveQA-Medical-Train-1.xml", 2, 4),
                                                          ("TREC-2017-LiveQA-Medical-Train-2.xml", 2, 2)])
def test_liveqa_training_layout(fixtures_dir, name, questions, pairs):
    records = _check_liveqa_training_file(fixtures_dir / "sources" / name, questions, pairs)
    first = records[0]
    if name.endswith("1.xml"):
        assert [r["id"] for r in records] == ["liveqa-Q1-S1-A1", "liveqa-Q1-S1-A2", "liveqa-Q1-S2-A1",
                                              "liveqa-Q2-S1-A1"]
        assert first["conversations"][0]["value"].startswith("Information on kidney stones.  My brother had")
        assert (first["meta"]["subject"], first["meta"]["question_type"]) == ("kidney stones", "cause")
        assert records[3]["meta"]["subject"] == "aspirin; ibuprofen"
        assert records[3]["conversations"][0]["value"].startswith("aspirin and ibuprofen\n\nCan I take")
    else:
        assert [r["id"] for r in records] == ["liveqa-1.0-S1-A1", "liveqa-3.0-S1-A1"]
        assert (first["meta"]["subject"],
                first["meta"]["question_type"]) == ("Shingles vaccine", "Indication")


@pytest.mark.parametrize("name", sorted(LIVEQA_TRAIN))
def test_liveqa_real_training_files(name):
    import os
    from pathlib import Path

    folder = os.environ.get("BIMEDIX_LIVEQA_TRAIN")
    if not folder or not (Path(folder) / name).is_file():
        pytest.skip("set BIMEDIX_LIVEQA_TRAIN to a folder holding "
                    "the LiveQA training files (docs/data-pipeline.md)")
    questions, _, pairs = LIVEQA_TRAIN[name]
    _check_liveqa_training_file(Path(folder) / name, questions, pairs)


def test_liveqa_unknown_layout_names_file_question_and_element(fixtures_dir, tmp_path):
    text = (fixtures_dir / "sources/TREC-2017-LiveQA-Medical-Train-1.xml").read_text(encoding="utf-8")
    path = tmp_path / "train.xml"
    path.write_text(text.replace('<ANSWER answerid="Q1-S2-A1" pairid="3">Small stones', '<ANSWR>Small stones')
                    .replace("lithotripsy.</ANSWER>", "lithotripsy.</ANSWR>"), encoding="utf-8")
    with pytest.raises(RecordError,
                       match=r"train\.xml: record 'Q1': field `SUB-QUESTION\[2\]\.ANSWERS\.ANSWER`"):
        list(convert("liveqa", path))
    errors: list[RecordError] = []
    records = list(convert("liveqa", path, on_error=errors.append))
    # Q1 set aside whole, Q2 kept
    assert [r["id"] for r in records] == ["liveqa-Q2-S1-A1"] and len(errors) == 1
    path.write_text('<NLM-QUESTIONS><NLM-QUESTION qid="7"><SUBJECT>x</SUBJECT><MESSAGE>y?</MESSAGE><Answers/>'
                    '</NLM-QUESTION></NLM-QUESTIONS>', encoding="utf-8")
    with pytest.raises(RecordError,
                       match=r"record '7': field `ReferenceAnswers`: neither a training <SUB-QUESTIONS>"):
        list(convert("liveqa", path))


# --- fixtures for sources not in shared data (see tests/fixtures/sources/README.md)
# -----------------------------

@pytest.mark.parametrize("source, name, count, human_start, gpt_start", [
    ("healthcaremagic", "HealthCareMagic-100k.json", 3, "Hi doctor, I am 34",
     "Hello, thanks for your query."),
    ("icliniq", "iCliniq.json", 2, "Hello doctor, my 5-year-old son", "Hello, welcome to icliniq.com."),
    ("meadow", "medical_meadow_flashcards.json", 2, "What is the mechanism of action of metformin?",
     "Metformin lowers"),
    ("meadow", "medical_meadow_health_advice.json", 1,
     "Please answer with one of the option in the bracket\n\nQ: Does regular walking", "A: yes"),
    ("umls", "umls_release.json", 2,
     "Answer the question about the medical concept.\n\nWhat is the definition",
     "Bradycardia is"),
])
def test_fixture_sources(fixtures_dir, source, name, count, human_start, gpt_start):
    records = list(convert(source, fixtures_dir / "sources" / name))
    assert len(records) == count and len({r["id"] for r in records}) == count
    assert records[0]["conversations"][0]["value"].startswith(human_start)
    assert records[0]["conversations"][1]["value"].startswith(gpt_start)
    assert all(r["task"] == "qa" and r["language"] == "en" and r["id"].startswith(f"{source}-")
               for r in records)
    assert records == list(convert(source, fixtures_dir / "sources" / name))  # stable ids
    if source == "umls":
        assert [r["meta"]["original_id"] for r in records] == ["101", "102"]  # the medqa row is not umls
    if source == "icliniq":
        assert "answer_chatgpt" not in json.dumps(records)
        assert "probably a viral fever" not in json.dumps(records)


def test_language_override(fixtures_dir):
    record = next(convert("healthcaremagic", fixtures_dir / "sources" / "HealthCareMagic-100k.json",
                          language="ar"))
    assert record["language"] == "ar"


# --- bad input: raise names file:record:field, skip sets it aside and keeps the rest
# -----------------------------

GOOD_MEDMCQA = {"id": "a", "question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 1}
GOOD_QA = {"instruction": "Answer this question truthfully", "input": "What is X?", "output": "X is Y."}


def _jsonl(*lines: str | bytes) -> bytes:
    return b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)


CORRUPT = [
    # source, file name, bytes, bad record position, field, message, records that still come through
    ("medmcqa", "dev.json", _jsonl(json.dumps(GOOD_MEDMCQA), '{"id": "b", "question": ',
                                   json.dumps({**GOOD_MEDMCQA, "id": "c"})),
     2, None, "invalid JSON", 2),
    ("medmcqa", "dev.json", _jsonl(json.dumps({k: v for k, v in GOOD_MEDMCQA.items() if k != "question"}),
                                   json.dumps({**GOOD_MEDMCQA, "id": "c"})), 1, "question", "missing", 1),
    ("medmcqa", "dev.json", _jsonl(json.dumps({**GOOD_MEDMCQA, "cop": 7}),
                                   json.dumps({**GOOD_MEDMCQA, "id": "c"})),
     1, "cop", "not in 1..4", 1),
    ("medmcqa", "dev.json", _jsonl(json.dumps({**GOOD_MEDMCQA, "opa": "", "opb": "", "opc": "", "opd": ""}),
                                   json.dumps({**GOOD_MEDMCQA, "id": "c"})), 1, "opa",
     "all options are empty", 1),
    ("medmcqa", "dev.json", _jsonl(json.dumps({**GOOD_MEDMCQA, "question": "سؤال"},
                                              ensure_ascii=False).encode("cp1256"),
                                   json.dumps({**GOOD_MEDMCQA, "id": "c"})), 1, None, "not valid UTF-8", 1),
    ("mmlu", "anatomy_test.csv", b"Q1,a,b,c,d,A\r\n" + "سؤال,a,b,c,d,B\r\n".encode("cp1256")
     + b"Q3,a,b,c,d,C",
     2, None, "not valid UTF-8", 2),
    ("mmlu", "anatomy_test.csv", b"Q1,a,b,c,d,A\r\nQ2,a,b,c,d,F\r\nQ3,a,b,c,d,C", 2, "answer",
     "not one of the option", 2),
    ("mentalqa", "Train_Dev.tsv",
     "question\tanswer\tfinal_QT\tfinal_AS\nسؤال\t\t['A']\t['1']\nس\tج\t['A']\t['1']\n".encode(),
     2, "answer", "is empty", 1),
    ("mentalqa", "Train_Dev.tsv",
     "question\tanswer\tfinal_QT\tfinal_AS\nس\tج\t['Q']\t['1']\nس\tج\t['A']\t['1']\n".encode(),
     2, "final_QT", "are not among", 1),
    ("meadow", "meadow.json", json.dumps([GOOD_QA, {"instruction": "Answer this question truthfully",
                                                    "input": "Q"},
                                          GOOD_QA]).encode(), "[1]", "output", "missing", 2),
]


@pytest.mark.parametrize("source, name, data, where, field, message, kept", CORRUPT)
def test_bad_records_raise_or_skip(tmp_path, source, name, data, where, field, message, kept):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(RecordError, match=message) as caught:
        list(convert(source, path))
    assert (caught.value.path, caught.value.record) == (str(path), where)
    if field is not None:
        assert caught.value.field == field
    expected = f"{path}:{where}" if isinstance(where, int) else f"{path}: record {where!r}"
    assert str(caught.value).startswith(expected)
    with RejectLog(tmp_path / "rejects.jsonl") as rejects:
        records = list(convert(source, path, on_error=rejects))
    assert len(records) == kept and rejects.count == 1
    [entry] = [json.loads(line) for line in (tmp_path
                                             / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert entry["path"] == str(path) and entry["record"] == where and message in entry["reason"]
    assert entry["raw"] is not None


@pytest.mark.parametrize("source, name, data", [
    ("medmcqa", "dev.json", b"\xef\xbb\xbf" + _jsonl(json.dumps(GOOD_MEDMCQA)).replace(b"\n", b"\r\n")),
    ("mmlu", "anatomy_test.csv", b"\xef\xbb\xbfQ1,a,b,c,d,A\r\n\"Q\r\n2\",a,b,c,d,B"),
    ("mentalqa", "Train_Dev.tsv",
     b"\xef\xbb\xbfquestion\tanswer\tfinal_QT\tfinal_AS\r\nQ\tA\t['A']\t['1']\r\n"),
    ("meadow", "meadow.json", b"\xef\xbb\xbf" + json.dumps([GOOD_QA]).encode()),
])
def test_bom_and_crlf_are_accepted(tmp_path, source, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    records = list(convert(source, path))
    assert records and not any("\r" in turn["value"] or "\ufeff" in turn["value"]
                               for record in records for turn in record["conversations"])


# --- CLI -----------------------------------------------------------------------------------------------

def test_cli_convert_raise_and_skip(tmp_path, capsys):
    source = tmp_path / "dev.json"
    source.write_bytes(_jsonl(json.dumps(GOOD_MEDMCQA), "{oops",
                              json.dumps({**GOOD_MEDMCQA, "id": "c", "cop": 4})))
    out = tmp_path / "out" / "medmcqa.jsonl"
    assert main(["convert", "medmcqa", "--input", str(source), "--output", str(out)]) == 2
    assert f"{source}:2: invalid JSON" in capsys.readouterr().err and not out.exists()
    assert main(["convert", "medmcqa", "--input", str(source), "--output", str(out), "--on-error",
                 "skip"]) == 0
    assert "read 3, written 2, rejected 1" in capsys.readouterr().out
    records = list(read_records(out))
    assert [r["meta"]["answer"] for r in records] == ["A", "D"]
    rejects = [json.loads(line) for line in (tmp_path / "out"
                                             / "medmcqa.rejects.jsonl").read_text().splitlines()]
    assert [(r["record"], r["raw"]) for r in rejects] == [(2, "{oops")]


def test_cli_convert_file_level_error_under_skip_does_not_suggest_skip(tmp_path, capsys):
    source = tmp_path / "ori_pqal.json"
    source.write_text('[{"QUESTION": "a list, not an object keyed by PMID"}]')
    out = tmp_path / "pubmedqa.jsonl"
    assert main(["convert", "pubmedqa", "--input", str(source), "--output", str(out), "--on-error",
                 "skip"]) == 2
    err = capsys.readouterr().err
    assert f"{source}: expected a JSON object keyed by PMID, got list" in err
    assert "rerun with --on-error skip" not in err and "concerns the whole file" in err
    assert main(["convert", "pubmedqa", "--input", str(source), "--output", str(out)]) == 2
    assert "rerun with --on-error skip" in capsys.readouterr().err


def test_cli_convert_unknown_source(tmp_path, capsys):
    assert main(["convert", "nope", "--input", str(tmp_path / "in.json"), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "unknown source 'nope'" in capsys.readouterr().err


# --- bundled data
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, written, rejected", [
    ("pubmedqa", 35, 0), ("medmcqa", 100, 0), ("medqa", 40, 0), ("mmlu", 30, 0), ("mmlu-ar", 27, 3),
    ("mentalqa", 60, 0),
])
def test_bundled_sources_convert(source, written, rejected):
    assert set(BUNDLED) <= {name for name, info in SOURCE_INFO.items() if info.permissive}
    with RejectLog() as rejects:
        records = list(convert(source, bundled_path(BUNDLED[source]), on_error=rejects))
    assert (len(records), rejects.count) == (written, rejected)


def test_bundled_folders_carry_licence_and_attribution():
    root = bundled_path()
    readme = (root / "README.md").read_text(encoding="utf-8")
    for path in BUNDLED.values():
        folder = root / path.split("/")[0]
        assert (folder / "ATTRIBUTION.md").is_file() and any(folder.glob("LICENSE*")), folder
        assert f"`{path.split('/')[0]}/" in readme
    assert not (root / "medarabench").exists() and "MedArabiQ" in readme


def test_liveqa_bad_question_and_bad_xml(tmp_path):
    path = tmp_path / "live.xml"
    path.write_text('<Set><NLM-QUESTION qid="Q1"><Original-Question><SUBJECT>flu</SUBJECT><MESSAGE>Is it '
                    'bad?</MESSAGE></Original-Question><ReferenceAnswers/></NLM-QUESTION>'
                    '<NLM-QUESTION qid="Q2"><Original-Question><MESSAGE>Dose?</MESSAGE></Original-Question>'
                    '<ReferenceAnswers><RefAnswer aid="Q2A1"><ANSWER>Ask '
                    'your\n\t\tpharmacist.</ANSWER></RefAnswer></ReferenceAnswers></NLM-QUESTION></Set>')
    with pytest.raises(RecordError, match=r"live\.xml: record 'Q1': field `ReferenceAnswers`"):
        list(convert("liveqa", path))
    errors: list[RecordError] = []
    [record] = convert("liveqa", path, on_error=errors.append)
    assert record["conversations"][0]["value"] == "Dose?"
    assert record["conversations"][1]["value"] == "Ask your pharmacist." and len(errors) == 1
    path.write_text("<Set><NLM-QUESTION>")
    with pytest.raises(RecordError, match="not well-formed XML"):
        list(convert("liveqa", path, on_error=errors.append))


def test_medicationqa_bad_rows(tmp_path):
    from openpyxl import Workbook

    workbook = Workbook()
    sheet = workbook.active
    for row in (["Question", "Focus (Drug)", "Question Type", "Answer"], ["what is it for", "aspirin",
                                                                          "Usage", "Pain."],
                ["how much", "ibuprofen", "Dose", None], [None, None, None, None]):
        sheet.append(row)
    path = tmp_path / "meds.xlsx"
    workbook.save(path)
    with pytest.raises(RecordError, match=r"meds\.xlsx:3: field `Answer`: is empty"):
        list(convert("medicationqa", path))
    with RejectLog() as rejects:
        records = list(convert("medicationqa", path, on_error=rejects))
    assert [r["meta"]["subject"] for r in records] == ["aspirin"] and rejects.count == 1
    path.write_text("not a workbook")
    with pytest.raises(RecordError, match="cannot read as .xlsx"):
        list(convert("medicationqa", path))


def test_instruction_sources_accept_json_lines(tmp_path):
    path = tmp_path / "release.json"  # JSON Lines despite the extension
    path.write_text(json.dumps({**GOOD_QA, "source": "umls", "sample_id": 5}) + "\n{broken\n")
    errors: list[RecordError] = []
    [record] = convert("umls", path, on_error=errors.append)
    assert record["meta"]["original_id"] == "5" and [e.record for e in errors] == [2]
