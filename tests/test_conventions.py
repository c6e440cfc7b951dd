"""One convention from data to evaluation: a translated Arabic MCQA training record, a converted Arabic record
and the Arabic lm-eval prompt of the same item letter the options alike (`bimedix.core.conventions`)."""

from __future__ import annotations

import re

import pytest
from llm_support import (
    make_client,
    read_jsonl,
    run_closing,
    write_jsonl,
)

from bimedix.core.conventions import ANSWER_CUES, OPTION_LETTERS
from bimedix.data.mcqa import MCQAItem, item_to_record
from bimedix.eval.bench import make_row
from bimedix.eval.tasks.utils import doc_to_choice, doc_to_target, doc_to_text
from bimedix.llm.invariants import arabic_option_letters, check_invariants
from bimedix.llm.prompts import load_prompt
from bimedix.llm.translation import TranslationConfig, translate_file

ITEM = MCQAItem(id="medqa-demo-1", source="medqa", language="en",
                question="A 45-year-old man has a fasting glucose of "
                         "7.5 mmol/L. What is the first-line drug?",
                options=["Metformin", "Insulin glargine", "Glibenclamide", "Acarbose"], answer="A",
                original_id="demo-1", license="MIT")
_ALL_LETTERS = "|".join(letter for letters in OPTION_LETTERS.values() for letter in letters)
_OPTION_LINE = re.compile(rf"^\s*({_ALL_LETTERS})\. ", re.MULTILINE)


def _option_letters(text: str) -> list[str]:
    return _OPTION_LINE.findall(text)


def _arabic_task_prompt(record: dict) -> tuple[str, list[str], int]:
    """The Arabic lm-eval prompt, choices and gold index of the item in ``record`` (as `build-bench` stores
    it)."""
    row = make_row(id=record["id"], language="ar", source="medqa", subject="", question=ITEM.question,
                   options=record["meta"]["options"], answer=record["meta"]["answer"])
    return doc_to_text(row), doc_to_choice(row), doc_to_target(row)


def test_translated_training_record_and_arabic_task_use_the_same_letters(api_key, server, tmp_path):
    english = item_to_record(ITEM)
    assert _option_letters(english["conversations"][0]["value"]) == ["A", "B", "C", "D"]
    input_path = write_jsonl(tmp_path / "en.jsonl", [english])
    client = make_client(server.base_url, tmp_path / "llm.sqlite")
    summary = run_closing(client, lambda c: translate_file(input_path, tmp_path / "ar.jsonl", c,
                                                           TranslationConfig(threshold=0)))
    assert summary.accepted == 1
    [arabic] = read_jsonl(tmp_path / "ar.jsonl")
    human, gpt = (turn["value"] for turn in arabic["conversations"])
    prompt, choices, gold = _arabic_task_prompt(arabic)

    trained = _option_letters(human)
    assert trained == _option_letters(prompt) == choices == ["أ", "ب", "ج", "د"]
    assert gpt.startswith(choices[gold] + ". ")  # the trained answer letter is the letter the task scores
    assert prompt.endswith(ANSWER_CUES["ar"]) and arabic["meta"]["answer"] == "A"


def test_converted_arabic_record_uses_the_same_letters_as_the_task():
    record = item_to_record(ITEM, "ar")
    prompt, choices, gold = _arabic_task_prompt(record)
    assert _option_letters(record["conversations"][0]["value"]) == _option_letters(prompt) == choices
    assert record["conversations"][1]["value"].startswith(choices[gold] + ". ")


@pytest.mark.parametrize("text, expected", [
    ("سؤال؟\nA. ميتفورمين\nB. إنسولين", "سؤال؟\nأ. ميتفورمين\nب. إنسولين"),
    ("B. إنسولين\n\nالشرح: ...", "ب. إنسولين\n\nالشرح: ..."),
    ("الإجابة: C، وليس (D)", "الإجابة: ج، وليس (د)"),
    ("فيتامين B12 و HbA1c", "فيتامين B12 و HbA1c"),  # not option markers
    ("أ. ميتفورمين", "أ. ميتفورمين"),
])
def test_arabic_option_letters_rewrites_only_markers(text, expected):
    assert arabic_option_letters(text) == expected
    assert check_invariants({"turns": [text]}, {"turns": [arabic_option_letters(text)]}) == []


@pytest.mark.parametrize("name", ["translate", "refine", "judge"])
def test_translation_prompts_ask_for_the_arabic_letters(name):
    system = load_prompt(name).render({"task": name})[0]["content"]
    assert "A → أ, B → ب, C → ج, D → د" in system and "as Latin letters" not in system
