"""MCQA readers on the real benchmark files, their bad-record handling, and the rendered prompts."""

from __future__ import annotations

import json
import logging

import pytest

from bimedix.data.mcqa import (
    PROMPTS,
    MCQAItem,
    item_to_record,
    read_medarabench,
    read_medmcqa,
    read_medqa,
    read_mmlu,
    read_pubmedqa,
    render_mcqa,
)
from bimedix.data.schema import RecordError

PUBMEDQA = "pubmedqa/data/ori_pqal.json"
PUBMEDQA_GT = "pubmedqa/data/test_ground_truth.json"
MEDQA = "medqa_usmle/data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl"


def _errors(reader, *args, **kwargs) -> tuple[list, list[RecordError]]:
    errors: list[RecordError] = []
    return list(reader(*args, on_error=errors.append, **kwargs)), errors


# --- real files: exact counts and a known item per source
# -------------------------------------------------------

def test_pubmedqa_splits_and_content(shared_data):
    path, truth = shared_data / PUBMEDQA, shared_data / PUBMEDQA_GT
    items = list(read_pubmedqa(path, truth))
    test = list(read_pubmedqa(path, truth, split="test"))
    train = list(read_pubmedqa(path, truth, split="train"))
    assert (len(items), len(test), len(train)) == (900, 400, 500)
    assert {i.id for i in test} | {i.id for i in train} == {i.id for i in items}
    first = next(i for i in test if i.original_id == "26163474")
    assert first.question == "Is there a connection between sublingual varices and hypertension?"
    assert (first.answer, first.options, first.answer_text) == ("A", ["yes", "no", "maybe"], "yes")
    assert first.context and first.explanation and first.id == "pubmedqa-26163474"
    with pytest.raises(ValueError, match="needs ground_truth"):
        next(read_pubmedqa(path, split="test"))


@pytest.mark.parametrize("layout, decisions, count", [
    ("ori_pqaa.json", ["yes", "no"], 2),          # PQA-A: generated yes/no labels
    ("ori_pqau.json", [None, None], 0),           # PQA-U: no final_decision at all
    ("ori_pqau.json", ["unlabeled", "yes"], 1),
])
def test_pubmedqa_artificial_and_unlabeled_layouts(tmp_path, caplog, layout, decisions, count):
    entry = {"QUESTION": "Does X help?", "CONTEXTS": ["Background.", "Results."], "LABELS": ["B", "R"],
             "MESHES": [], "LONG_ANSWER": "X helps."}
    data = {str(pmid): {**entry, **({"final_decision": d} if d else {})} for pmid,
            d in zip((11, 12), decisions)}
    path = tmp_path / layout
    path.write_text(json.dumps(data))
    caplog.set_level(logging.INFO, logger="bimedix.data.mcqa")
    items = list(read_pubmedqa(path))
    assert len(items) == count
    assert all(i.context == "Background.\nResults." and i.explanation == "X helps." for i in items)
    if count < len(decisions):
        assert "without a yes/no/maybe decision" in caplog.text


def test_pubmedqa_bad_decision_names_pmid(tmp_path):
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps({"123": {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "perhaps"}}))
    with pytest.raises(RecordError,
                       match=r"ori_pqal\.json: record '123': field `final_decision`: decision 'perhaps'"):
        list(read_pubmedqa(path))


def test_medmcqa_real(shared_data):
    items = list(read_medmcqa(shared_data / "medmcqa/data/dev.json"))
    assert len(items) == 3346 and len({i.id for i in items}) == 3346
    second = items[1]
    assert second.id == "medmcqa-b944ada9-d776-4c2a-9180-3ae5f393f72d"
    assert second.answer == "A" and second.subject == "Physiology"
    assert second.explanation.startswith("Ans-a. The oncotic pressure")
    assert sum(i.explanation is None for i in items) == 1583


def test_medqa_real(shared_data):
    items = list(read_medqa(shared_data / MEDQA))
    assert len(items) == 1018 and len({i.id for i in items}) == 1018
    assert items[1].question.startswith("Two weeks after undergoing an emergency cardiac catherization")
    assert (items[1].answer, items[1].answer_text) == ("B", "Cholesterol embolization")
    assert items[1].original_id == "phrases_no_exclude_test.jsonl:2"
    assert items[1].subject in ("step1", "step2&3")


def test_mmlu_english_real(shared_data):
    items = list(read_mmlu(shared_data / "mmlu_medical/data/test"))
    assert len(items) == 871 and len({i.id for i in items}) == 871
    by_subject = {s: sum(i.subject == s for i in items) for s in {i.subject for i in items}}
    assert by_subject == {"anatomy": 108, "clinical_knowledge": 212, "college_biology": 115,
                          "college_medicine": 138, "medical_genetics": 80, "professional_medicine": 218}
    ck = next(i for i in items if i.original_id == "clinical_knowledge_test.csv:2")  # a CRLF file
    assert ck.question == "Which of the following is the commonest cause of dementia in the UK?"
    assert (ck.answer, ck.answer_text) == ("A", "Alzheimer's disease.")
    assert not any("\r" in i.question or any("\r" in o for o in i.options) for i in items)
    assert len(list(read_mmlu(shared_data / "mmlu_medical/data/dev"))) == 30


def test_mmlu_arabic_rejects_ip_spoofing_rows(shared_data):
    items, errors = _errors(read_mmlu, shared_data / "mmlu_medical_arabic_acegpt/MMLUArabic/test",
                            language="ar")
    assert (len(items), len(errors)) == (715, 156)  # KNOWN_ISSUES.md: 9 + 3 + 7 + 20 + 0 + 117 corrupted rows
    assert {e.field for e in errors} == {"question"} and all("IP spoofing" in e.reason for e in errors)
    assert sum("professional_medicine" in e.path for e in errors) == 117
    ck = next(i for i in items if i.original_id == "clinical_knowledge_test.csv:2")
    assert ck.source == "mmlu-ar" and ck.language == "ar" and ck.answer == "A"
    assert ck.question == "ما هي السبب الأكثر شيوعًا للخرف في المملكة المتحدة؟"
    with pytest.raises(RecordError, match=r"professional_medicine_dev\.csv:\d+: field `question`: corrupted"):
        list(read_mmlu(shared_data
                       / "mmlu_medical_arabic_acegpt/MMLUArabic/dev/professional_medicine_dev.csv",
                       language="ar"))


def test_medarabench_real(shared_data):
    items, errors = _errors(read_medarabench, shared_data / "medarabench/medarabench-test_split.csv")
    # 4959 rows: 21 free-text/odd answers, 10 letters naming an empty option, 1 empty question.
    assert (len(items), len(errors)) == (4927, 32)
    assert sum("'E' is not" in e.reason for e in errors) == 10
    assert sum(e.field == "Question" for e in errors) == 1
    assert {e.field for e in errors} == {"Correct Answer", "Question"}
    first = items[0]
    assert (first.id, first.answer, first.subject, len(first.options)) == ("medarabench-1", "C", "Anatomy", 4)
    assert first.question == "عضلات الكم المدوره للكتف"
    assert max(len(i.options) for i in items) == 6
    lower = [e for e in errors if e.raw and e.raw.get("Correct Answer", "").islower()]
    # single lowercase letters are accepted
    assert not [e for e in lower if len(e.raw["Correct Answer"]) == 1]


# --- bad records
# -------------------------------------------------------------------------------------------------

MEDMCQA_OK = {"id": "q1", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2,
              "exp": None,
              "subject_name": "Anatomy"}


@pytest.mark.parametrize("change, field, message", [
    ({"cop": 5}, "cop", "not in 1..4"),
    ({"cop": 0}, "cop", "not in 1..4"),
    ({"cop": None}, "cop", "not in"),
    ({"question": ""}, "question", "non-empty"),
    ({"opb": ""}, "opb", "later option is not"),
    ({"opa": "", "opb": "", "opc": "", "opd": ""}, "opa", "all options are empty"),
    ({"id": None}, "id", "non-empty"),
])
def test_medmcqa_bad_records(tmp_path, change, field, message):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(MEDMCQA_OK) + "\n" + json.dumps({**MEDMCQA_OK, "id": "q2", **change}) + "\n")
    with pytest.raises(RecordError, match=message) as caught:
        list(read_medmcqa(path))
    assert (caught.value.path, caught.value.record, caught.value.field) == (str(path), 2, field)
    assert str(caught.value).startswith(f"{path}:2: field `{field}`")
    items, errors = _errors(read_medmcqa, path)
    assert [i.id for i in items] == ["medmcqa-q1"] and len(errors) == 1
    assert errors[0].raw["question"] == ({**MEDMCQA_OK, **change})["question"]


def test_medmcqa_cop_base_is_explicit(tmp_path):
    path = tmp_path / "hf.jsonl"
    path.write_text(json.dumps({**MEDMCQA_OK, "cop": 0}) + "\n")
    assert next(read_medmcqa(path, cop_base=0)).answer == "A"
    with pytest.raises(RecordError, match="cop_base=1"):
        next(read_medmcqa(path))
    with pytest.raises(ValueError, match="cop_base"):
        next(read_medmcqa(path, cop_base=2))


@pytest.mark.parametrize("record, field", [
    ({"question": "Q", "options": {"A": "x", "B": "y"}, "answer_idx": "C", "answer": "z"}, "answer_idx"),
    ({"question": "Q", "options": {"A": "x", "B": "y"}, "answer_idx": "A", "answer": "y"}, "answer"),
    ({"question": "Q", "options": {"A": "x", "C": "y"}, "answer_idx": "A"}, "options"),
    ({"question": "Q", "options": {}, "answer_idx": "A"}, "options"),
    ({"options": {"A": "x"}, "answer_idx": "A"}, "question"),
])
def test_medqa_bad_records(tmp_path, record, field):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(RecordError) as caught:
        list(read_medqa(path))
    assert caught.value.field == field and caught.value.record == 1


def test_medqa_five_options(tmp_path):
    path = tmp_path / "US.jsonl"
    options = {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}
    path.write_text(json.dumps({"question": "Q", "options": options, "answer_idx": "E", "answer": "e"})
                    + "\n")
    item = next(read_medqa(path))
    assert item.options == list("abcde") and item.answer == "E"


@pytest.mark.parametrize("row, field", [
    ('"Q",a,b,c,d,E', "answer"),
    ('"Q",a,b,c,d,b', "answer"),
    ('"Q",a,,c,d,A', "B"),
    ('"",a,b,c,d,A', "question"),
    ('"Q",a,b,c,A', None),
])
def test_mmlu_bad_rows(tmp_path, row, field):
    path = tmp_path / "anatomy_test.csv"
    path.write_text('"Multi\nline question?",one,two,three,four,C\r\n' + row)
    items, errors = _errors(read_mmlu, path)
    assert [i.question for i in items] == ["Multi\nline question?"] and items[0].subject == "anatomy"
    assert len(errors) == 1 and errors[0].field == field and errors[0].record == 3  # the row starts on line 3


# --- rendering
# ---------------------------------------------------------------------------------------------------

ITEM = MCQAItem(id="demo-1", source="demo", language="en", question="Which vitamin deficiency causes scurvy?",
                options=["Vitamin A", "Vitamin C", "Vitamin D"], answer="B",
                explanation="Collagen synthesis.",
                original_id="1", license="MIT")


@pytest.mark.parametrize("language, human_has, gpt", [
    ("en", "Options:\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D",
     "B. Vitamin C\n\nExplanation: Collagen synthesis."),
    ("ar", "الخيارات:\nأ. Vitamin A\nب. Vitamin C\nج. Vitamin D",
     "ب. Vitamin C\n\nالشرح: Collagen synthesis."),
])
def test_render_mcqa(language, human_has, gpt):
    human, answer = render_mcqa(ITEM, language)
    assert (human["from"], answer["from"]) == ("human", "gpt")
    assert human_has in human["value"] and ITEM.question in human["value"]
    assert answer["value"] == gpt
    assert render_mcqa(ITEM, language) == render_mcqa(ITEM, language)  # deterministic


@pytest.mark.parametrize("language, answer", [("en", "Maybe"), ("ar", "ربما")])
def test_render_pubmedqa_style(language, answer):
    item = MCQAItem(id="p", source="pubmedqa", language="en", question="Does X cause Y?",
                    options=["yes", "no", "maybe"],
                    answer="C", context="We studied X.")
    human, gpt = render_mcqa(item, language)
    assert "We studied X." in human["value"] and "Does X cause Y?" in human["value"]
    assert gpt["value"] == answer
    assert human["value"].startswith(PROMPTS[language]["context"].split("{")[0])


def test_item_to_record_keeps_latin_answer_and_validates():
    record = item_to_record(ITEM, "ar")
    assert record["id"] == "demo-1-ar" and record["language"] == "ar" and record["task"] == "mcqa"
    assert record["meta"]["answer"] == "B" and record["meta"]["options"] == ITEM.options
    assert record["meta"]["original_id"] == "1" and record["license"] == "MIT"
    assert item_to_record(ITEM)["id"] == "demo-1"
