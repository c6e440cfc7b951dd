"""MCQA-grounded dialogue generation: validation rules, regeneration, rejection, provenance."""

from __future__ import annotations

import json

import pytest
from llm_support import (
    MODEL,
    make_client,
    mcqa_record,
    read_jsonl,
    run_closing,
    write_jsonl,
)

from bimedix.data.schema import validate_record
from bimedix.llm.dialogue import DialogueConfig, generate_chats_file, validate_dialogue
from bimedix.llm.fake_server import FakeOpenAIServer, Reply, default_responder

OPTIONS = ["Iron deficiency anaemia", "Vitamin B12 deficiency", "Thalassaemia trait", "Lead poisoning"]
CONFIG = DialogueConfig(min_turns=2, max_turns=4)


def _chat(*assistant: str) -> list[dict]:
    turns = []
    for index, text in enumerate(assistant):
        turns += [{"from": "human", "value": f"Patient message {index}: I feel tired and pale."},
                  {"from": "gpt", "value": text}]
    return turns


GOOD = _chat("How long have you felt tired? Any change in diet?",
             "Given the low MCV and low ferritin, the most likely diagnosis is iron deficiency anaemia. "
             "Thalassaemia trait is less likely with a low ferritin.")


def test_good_dialogue_passes():
    assert validate_dialogue(GOOD, OPTIONS, "A", CONFIG) == []


@pytest.mark.parametrize("conversation, expected", [
    ([{"from": "gpt", "value": "Hello there."}] + GOOD[1:], "turn 0 is from 'gpt', expected 'human'"),
    (GOOD[:3], "does not end with a gpt turn"),
    (GOOD[:2], "1 exchanges (allowed 2..4)"),
    (_chat("Let us see.", "It is iron deficiency anaemia, so option A is right."),
     "refers to an option by letter"),
    (_chat("Let us see.", "The answer is (A): iron deficiency anaemia."), "refers to an option by letter"),
    (_chat("Let us see.", "Most likely this is a blood problem."),
     "the correct answer 'Iron deficiency anaemia' is never"),
    (_chat("Iron deficiency anaemia is possible.", "The most likely diagnosis is lead poisoning."),
     "a wrong option ('Lead poisoning') is endorsed"),
    (_chat("Fine.", "x" * 5000 + " iron deficiency anaemia"), "characters (allowed 2..3000)"),
    ("not a list", "`conversation` is not a non-empty list"),
], ids=["roles", "odd", "too-few", "option-letter", "paren-letter", "no-answer", "wrong-endorsed", "too-long",
        "not-list"])
def test_invalid_dialogues_are_caught(conversation, expected):
    problems = validate_dialogue(conversation, OPTIONS, "A", CONFIG)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("text, leaks", [
    ("The answer is B.", True), ("Option A is right.", True), ("choice (C) fits", True), ("see (D)", True),
    ("The answer is A defect in iron absorption.", False), ("Vitamin B12 is low.", False),
    ("An answer: C-reactive protein is raised.", False), ("الخيار ب هو الصحيح", True),
    ("خيارات العلاج", False),
])
def test_letter_leak_detection(text, leaks):
    chat = _chat("Let us see. " + text, "The most likely diagnosis is iron deficiency anaemia.")
    problems = validate_dialogue(chat, OPTIONS, "A", CONFIG)
    assert any("refers to an option by letter" in p for p in problems) == leaks, problems


def test_negated_wrong_option_is_fine():
    chat = _chat("Thalassaemia trait is not the most likely diagnosis here.",
                 "The most likely diagnosis is iron deficiency anaemia.")
    assert validate_dialogue(chat, OPTIONS, "A", CONFIG) == []


def _generate(server, tmp_path, records, **config):
    input_path = write_jsonl(tmp_path / "mcqa.jsonl", records)
    client = make_client(server.base_url, tmp_path / "chats.llm.sqlite")
    return run_closing(client, lambda c: generate_chats_file(input_path, tmp_path / "chats.jsonl", c,
                                                             DialogueConfig(**config)))


def test_generates_grounded_chats_with_provenance(server, api_key, tmp_path):
    summary = _generate(server, tmp_path, [mcqa_record(i) for i in range(3)], min_turns=4)
    assert summary.complete and summary.accepted == 3 and summary.sent == 3
    for record in read_jsonl(tmp_path / "chats.jsonl"):
        record = validate_record(record)
        assert record["task"] == "chat" and record["language"] == "en" and record["id"].endswith("-chat")
        assert len(record["conversations"]) == 8
        assert "Insulin glargine" in record["conversations"][-1]["value"]  # the correct answer (B)
        generation = record["meta"]["generation"]
        assert generation["model"] == MODEL and generation["prompt_version"] == "dialogue-v2"
        assert generation["source_id"] == record["id"].removesuffix("-chat") and generation["cost_usd"] > 0


def test_invalid_output_is_regenerated_then_accepted(api_key, tmp_path):
    calls = []

    def respond(body):
        calls.append(body["seed"])
        if len(calls) == 1:
            return Reply(json.dumps({"conversation": [{"from": "human", "value": "Hi"},
                                                       {"from": "gpt", "value": "Option B, clearly."}]}))
        return default_responder(body)

    with FakeOpenAIServer(respond) as fake:
        summary = _generate(fake, tmp_path, [mcqa_record(0)])
    assert summary.accepted == 1 and calls == [0, 1]  # a new seed per attempt


def test_always_invalid_is_rejected_with_reasons(api_key, tmp_path):
    bad = iter([Reply("no json here"), Reply('{"conversation": []}', ),
                Reply('{"conversation": [', "length")])
    with FakeOpenAIServer(lambda body: next(bad)) as fake:
        summary = _generate(fake, tmp_path, [mcqa_record(0)], max_attempts=3)
        assert fake.count() == 3
    assert summary.rejected == 1 and summary.accepted == 0
    reason = read_jsonl(tmp_path / "chats.rejects.jsonl")[0]["reason"]
    assert "attempt 1: not a JSON object" in reason
    assert "attempt 2: `conversation` is not a non-empty list" in reason
    assert "attempt 3: cut off at max_tokens" in reason


def test_non_mcqa_record_is_rejected_without_requests(server, api_key, tmp_path):
    record = dict(mcqa_record(0), task="qa")
    record["meta"] = dict(record["meta"], options=None, answer=None)
    summary = _generate(server, tmp_path, [record])
    assert summary.rejected == 1 and server.count() == 0


def test_config_is_checked():
    with pytest.raises(ValueError, match="min_turns <= max_turns"):
        DialogueConfig(min_turns=5, max_turns=3)


def test_cli_with_overridden_prompt(server, api_key, tmp_path, capsys):
    from bimedix.cli import main
    from bimedix.resources import resource_path

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    shipped = resource_path("bimedix", "llm", "prompts", "dialogue.yaml").read_text(encoding="utf-8")
    (prompts / "dialogue.yaml").write_text(shipped.replace("version: dialogue-v2",
                                                           "version: dialogue-clinic-v3"))
    write_jsonl(tmp_path / "mcqa.jsonl", [mcqa_record(i) for i in range(2)])
    code = main(["generate-chats", "--input", str(tmp_path / "mcqa.jsonl"), "--output",
                 str(tmp_path / "chats.jsonl"),
                 "--base-url", server.base_url, "--model", MODEL, "--prompts", str(prompts), "--min-turns",
                 "3"])
    assert code == 0 and "2 written" in capsys.readouterr().out
    records = read_jsonl(tmp_path / "chats.jsonl")
    assert {r["meta"]["generation"]["prompt_version"] for r in records} == {"dialogue-clinic-v3"}
    assert all(len(r["conversations"]) == 6 for r in records)


def test_prompt_without_payload_is_refused(tmp_path):
    from bimedix.llm.prompts import load_prompt

    (tmp_path / "dialogue.yaml").write_text("version: x\nsystem: s\nuser: no payload here\n")
    with pytest.raises(ValueError, match="dialogue.yaml: field `user` must include"):
        load_prompt("dialogue", tmp_path)


def test_shipped_prompt_is_the_papers_doctor_patient_dialogue_to_a_conclusion():
    from dataclasses import replace

    from bimedix.llm.prompts import load_prompt
    from bimedix.llm.runner import engine_fingerprint

    prompt = load_prompt("dialogue")
    system = prompt.render({"language": "en", "min_turns": 4, "max_turns": 8, "payload": "{}"})[0]["content"]
    assert prompt.version == "dialogue-v2"
    assert "between a patient and a doctor" in system and "until it reaches a logical conclusion" in system
    assert "medical student" not in system
    older = replace(prompt, version="dialogue-v1")  # a cached generation under another version is not reused
    config = DialogueConfig()
    assert engine_fingerprint("generate-chats", MODEL, config, [prompt]) != engine_fingerprint(
        "generate-chats", MODEL, config, [older])
