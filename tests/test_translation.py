"""Translation loop: invariants, judge parsing, refinement, provenance, end to end over the fake server."""

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
from bimedix.llm.cache import RequestCache
from bimedix.llm.fake_server import FakeOpenAIServer, Reply, default_responder
from bimedix.llm.invariants import check_invariants, protected_terms
from bimedix.llm.translation import TranslationConfig, arabic_id, translate_file

SOURCE = {"turns": ["Question: a 45-year-old has 7.5 mmol/L glucose.\nA. Metformin 500 mg\nB. Insulin",
                    "B. Insulin\n\nExplanation: HbA1c above 9%."],
          "options": ["Metformin 500 mg", "Insulin"]}
KEEP = protected_terms(SOURCE["turns"] + SOURCE["options"], {"metformin"})
GOOD = {"turns": ["سؤال: مريض عمره ٤٥ عاماً، سكر 7٫5 mmol/L.\nA. Metformin 500 mg\nB. إنسولين",
                  "ب. إنسولين\n\nالشرح: HbA1c أعلى من ٩٪."],
        "options": ["Metformin 500 mg", "إنسولين"]}


def _broken(field: str, index: int, value: str) -> dict:
    out = json.loads(json.dumps(GOOD))
    out[field][index] = value
    return out


def test_protected_terms_cover_drugs_units_and_codes():
    assert {"Metformin", "mg", "mmol/L", "HbA1c"} <= set(KEEP)


def test_protected_terms_are_whole_tokens():
    text = "ST-segment elevation, IL-6 and COVID-19; BP 120/80 mm Hg; pelvic inflammatory disease (PID)"
    keep = protected_terms([text])
    assert keep == ["BP", "COVID-19", "IL-6", "PID", "ST", "mm"]
    arabic = "ارتفاع مقطع ST، و IL-6 و COVID-19؛ ضغط BP ١٢٠/٨٠ mm زئبق؛ مرض التهاب الحوض (PID)"
    assert check_invariants({"turns": [text]}, {"turns": [arabic]}, keep) == []


def test_good_translation_keeps_invariants():
    assert check_invariants(SOURCE, GOOD, KEEP) == []


@pytest.mark.parametrize("translation, expected", [
    (_broken("turns", 1, "ج. إنسولين\n\nالشرح: HbA1c أعلى من ٩٪."),
     "turn 1: option letters changed from [B] to [C]"),
    (_broken("turns", 0, "سؤال: مريض عمره ٤٥ عاماً، سكر 7٫5 mmol/L.\nA. Metformin 500 mg"),
     "turn 0: option letters changed from [A, B] to [A]"),
    ({"turns": GOOD["turns"], "options": GOOD["options"][:1]},
     "2 options in the source but 1 in the translation"),
    (_broken("turns", 0, GOOD["turns"][0].replace("٤٥", "٥٤")), "turn 0: numbers missing or changed: ['45']"),
    (_broken("options", 0, "ميتفورمين 500 mg"), "option 0: protected terms not kept verbatim: ['Metformin']"),
    (_broken("turns", 0, GOOD["turns"][0].replace("mmol/L", "ملمول/لتر")),
     "protected terms not kept verbatim"),
], ids=["answer-letter", "dropped-option-line", "dropped-option", "number", "drug-name", "unit"])
def test_invariant_violations_are_caught(translation, expected):
    problems = check_invariants(SOURCE, translation, KEEP)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("english, arabic", [
    ("medqa-en-0001", "medqa-ar-0001"), ("mmlu-en", "mmlu-ar"), ("medqa-4ac4432d", "medqa-4ac4432d-ar"),
    ("x-enzyme-1", "x-enzyme-1-ar"),
])
def test_arabic_id(english, arabic):
    assert arabic_id(english) == arabic


def _translate(server, tmp_path, records, **config):
    input_path = write_jsonl(tmp_path / "en.jsonl", records)
    client = make_client(server.base_url, tmp_path / "out.llm.sqlite")
    return run_closing(client, lambda c: translate_file(input_path, tmp_path / "out.jsonl", c,
                                                        TranslationConfig(**config)))


def _scripted(translate=None, judge=None):
    """Default responder with the translate/refine or judge answers replaced by callables of (payload, n)."""
    calls = {"translate": 0, "judge": 0}

    def respond(body):
        payload = json.loads(body["messages"][-1]["content"].split("\n", 1)[1])
        kind = "judge" if payload["task"] == "judge" else "translate"
        calls[kind] += 1
        override = judge if kind == "judge" else translate
        if override is not None:
            answer = override(payload, calls[kind])
            if answer is not None:
                return answer
        return default_responder(body)

    return respond


def test_end_to_end_provenance_and_review_state(api_key, tmp_path):
    with FakeOpenAIServer(_scripted(judge=lambda payload,
                                    n: Reply('{"score": 91, "comments": "ok"}'))) as server:
        summary = _translate(server, tmp_path, [mcqa_record(i) for i in range(4)], review_fraction=0.0)
    assert summary.complete and summary.accepted == 4 and summary.sent == 8  # translate + judge per record
    for record in read_jsonl(tmp_path / "out.jsonl"):
        record = validate_record(record)
        info = record["meta"]["translation"]
        assert record["language"] == "ar" and record["id"] == info["source_id"].replace("-en-", "-ar-")
        assert info["model"] == MODEL and info["score"] == 91 and info["rounds"] == 1
        assert info["reviewed"] is False and info["review_state"] == "unreviewed" and info["cost_usd"] > 0
        assert record["meta"]["answer"] == "B" and len(record["meta"]["options"]) == 4


def _fake_translation(payload: dict) -> dict:
    return json.loads(default_responder({"messages": [{"content": json.dumps(payload)}]}).text)


def _numbered(payload: dict, n: int) -> Reply:
    """A fresh (still invariant-preserving) translation on every call, as a real model would give."""
    out = _fake_translation(payload)
    out["turns"][0] += " !" * n
    return Reply(json.dumps(out, ensure_ascii=False))


def test_low_score_refines_up_to_max_rounds_keeps_best_and_queues(api_key, tmp_path):
    scores = iter([55, 70, 62])
    with FakeOpenAIServer(_scripted(translate=_numbered, judge=lambda p, n: Reply(json.dumps(
            {"score": next(scores), "comments": "fix terms"})))) as server:
        summary = _translate(server, tmp_path, [mcqa_record(0)], max_rounds=3)
    assert summary.accepted == 1 and summary.sent == 6
    info = read_jsonl(tmp_path / "out.jsonl")[0]["meta"]["translation"]
    assert info["score"] == 70 and info["rounds"] == 3 and info["review_state"] == "queued"


def test_invariant_violation_fails_the_round_and_refinement_fixes_it(api_key, tmp_path):
    def translate(payload, n):
        if n == 1:  # first round changes the answer letter of the gpt turn
            out = _fake_translation(payload)
            out["turns"][1] = out["turns"][1].replace("B.", "C.", 1)
            return Reply(json.dumps(out, ensure_ascii=False))
        assert payload["task"] == "refine" and "option letters changed from [B] to [C]" in payload["comments"]
        return None

    with FakeOpenAIServer(_scripted(translate=translate,
                                    judge=lambda p, n: Reply('{"score": 88, "comments": ""}'))) as server:
        summary = _translate(server, tmp_path, [mcqa_record(0)])
    assert summary.accepted == 1 and summary.sent == 3  # bad translate (not judged), refine, judge
    info = read_jsonl(tmp_path / "out.jsonl")[0]["meta"]["translation"]
    assert info["rounds"] == 2 and info["score"] == 88


@pytest.mark.parametrize("bad", ["not json at all", '{"comments": "no score"}', '{"score": 140}',
                                 '{"score": "high"}'])
def test_malformed_judgement_is_retried_then_recorded_as_failure(api_key, tmp_path, bad):
    with FakeOpenAIServer(_scripted(judge=lambda p, n: Reply(bad))) as server:
        summary = _translate(server, tmp_path, [mcqa_record(0)], max_rounds=2, judge_attempts=2)
    assert summary.accepted == 0 and summary.rejected == 1
    assert summary.sent == 2 * (1 + 2)  # per round: one translation, two judge attempts
    reject = read_jsonl(tmp_path / "out.rejects.jsonl")[0]
    assert reject["source_id"] == "demo-en-000" and "judge output malformed 2 times" in reject["reason"]
    assert read_jsonl(tmp_path / "out.jsonl") == []


def test_judge_recovers_on_second_attempt(api_key, tmp_path):
    with FakeOpenAIServer(_scripted(judge=lambda p, n: Reply("oops" if n == 1
                                                             else '{"score": 95}'))) as server:
        summary = _translate(server, tmp_path, [mcqa_record(0)])
    assert summary.accepted == 1 and summary.sent == 3
    assert read_jsonl(tmp_path / "out.jsonl")[0]["meta"]["translation"]["score"] == 95


def test_truncated_translation_is_a_failed_round(api_key, tmp_path):
    with FakeOpenAIServer(_scripted(translate=lambda p, n: Reply('{"turns": ["نص', "length") if n == 1
                                    else None,
                                    judge=lambda p, n: Reply('{"score": 90}'))) as server:
        summary = _translate(server, tmp_path, [mcqa_record(0)])
    assert summary.accepted == 1
    assert read_jsonl(tmp_path / "out.jsonl")[0]["meta"]["translation"]["rounds"] == 2


def test_non_english_records_are_rejected_not_sent(server, api_key, tmp_path):
    record = dict(mcqa_record(0), language="ar")
    summary = _translate(server, tmp_path, [record])
    assert summary.rejected == 1 and server.count() == 0


def test_cached_rerun_pays_nothing(server, api_key, tmp_path):
    records = [mcqa_record(i) for i in range(3)]
    _translate(server, tmp_path, records)
    sent, first = server.count(), (tmp_path / "out.jsonl").read_text()
    (tmp_path / "out.jsonl").unlink()
    (tmp_path / "out.rejects.jsonl").unlink()
    summary = _translate(server, tmp_path, records)
    assert server.count() == sent and summary.sent == 0 and summary.cost_usd == 0
    assert sorted(first.splitlines()) == sorted((tmp_path / "out.jsonl").read_text().splitlines())


def test_batch_api_translation(api_key, tmp_path):
    with FakeOpenAIServer(_scripted(judge=lambda p, n: Reply('{"score": 90}'))) as server:
        input_path = write_jsonl(tmp_path / "en.jsonl", [mcqa_record(i) for i in range(3)])
        client = make_client(server.base_url, tmp_path / "out.llm.sqlite", batch=True,
                             batch_poll_interval=0.01)
        summary = run_closing(client, lambda c: translate_file(input_path, tmp_path / "out.jsonl", c,
                                                               TranslationConfig()))
        assert summary.accepted == 3 and server.count() == 0
        assert server.count("/v1/batches") == 2 and server.count("batch") == 6  # translate round, judge round



def test_budget_stops_cleanly_then_cli_rerun_finishes(server, api_key, tmp_path, capsys):
    from bimedix.cli import main

    write_jsonl(tmp_path / "en.jsonl", [mcqa_record(i) for i in range(6)])
    (tmp_path / "prices.json").write_text(json.dumps({MODEL: {"input": 1.0, "output": 2.0}}))
    (tmp_path / "drugs.txt").write_text("# one per line\nglargine\n")
    command = ["translate", "--input", str(tmp_path / "en.jsonl"), "--output", str(tmp_path / "ar.jsonl"),
               "--base-url", server.base_url, "--model", MODEL, "--prices", str(tmp_path / "prices.json"),
               "--drug-names", str(tmp_path / "drugs.txt"), "--concurrency", "2", "--max-tokens", "1000"]
    # each request may cost up to $0.002 (1000 output tokens at $2/1M): a $0.006 budget stops early
    assert main(command + ["--budget-usd", "0.006"]) == 3
    out = capsys.readouterr().out
    assert "stopped early: budget of $0.0060 reached" in out
    ledger = RequestCache(tmp_path / "ar.llm.sqlite").total_cost()
    assert 0 < ledger <= 0.006
    partial = len(read_jsonl(tmp_path / "ar.jsonl"))
    assert partial < 6
    assert main(command + ["--budget-usd", "1"]) == 0
    records = read_jsonl(tmp_path / "ar.jsonl")
    assert sorted(r["meta"]["translation"]["source_id"]
                  for r in records) == [f"demo-en-{i:03d}" for i in range(6)]
    assert all("glargine" in r["meta"]["options"][1] for r in records)  # a protected drug name kept verbatim


def test_saved_dataset_input(server, api_key, tmp_path):
    from datasets import Dataset

    from bimedix.data.schema import FEATURES

    Dataset.from_list([mcqa_record(i) for i in range(2)],
                      features=FEATURES).save_to_disk(str(tmp_path / "en_ds"))
    client = make_client(server.base_url, tmp_path / "out.llm.sqlite")
    summary = run_closing(client, lambda c: translate_file(tmp_path / "en_ds", tmp_path / "out.jsonl", c,
                                                           TranslationConfig()))
    assert summary.total == 2 and summary.complete and summary.sent > 0
    written = {r["meta"]["translation"]["source_id"] for r in read_jsonl(tmp_path / "out.jsonl")}
    assert written | {r["source_id"] for r in read_jsonl(tmp_path / "out.rejects.jsonl")} == {"demo-en-000",
                                                                                              "demo-en-001"}


def test_record_level_400_is_rejected_transient_left_for_rerun_and_401_stops(server, api_key, tmp_path):
    from bimedix.llm.client import LLMError
    from bimedix.llm.fake_server import Fault

    records = [mcqa_record(0)]
    server.inject(Fault("status", 400))
    (tmp_path / "a").mkdir()
    summary = _translate(server, tmp_path / "a", records)
    assert summary.rejected == 1 and "HTTP 400" in read_jsonl(tmp_path / "a"
                                                              / "out.rejects.jsonl")[0]["reason"]

    (tmp_path / "b").mkdir()
    server.inject(*[Fault("status", 503)] * 4)  # make_client allows 3 retries: 4 failures exhaust them
    summary = _translate(server, tmp_path / "b", records)
    assert not summary.complete and summary.failed and "gave up after 4 attempts" in summary.failed[0]
    assert _translate(server, tmp_path / "b", records).complete  # the re-run finishes it

    (tmp_path / "c").mkdir()
    server.inject(Fault("status", 401))
    with pytest.raises(LLMError, match="HTTP 401"):
        _translate(server, tmp_path / "c", [mcqa_record(i) for i in range(3)])
