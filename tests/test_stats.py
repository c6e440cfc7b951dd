"""Fig. 3 statistics on a hand-checked set, and the fast Vicuna encoder against apply_chat_template."""

from __future__ import annotations

import json
import random

import pytest

from bimedix.data.encode import encode_conversations, render_vicuna
from bimedix.data.stats import DataStats, compute_stats
from bimedix.training.template import render, to_messages


def _record(id_, task, language, turns, system=None):
    return {"id": id_, "task": task, "language": language, "system": system,
            "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i,
                              v in enumerate(turns)]}


# Hand-checked Mixtral tokenizations:
#   <s> USER : ▁Hi ▁ASS IST ANT : ▁Hello </s>                                        = 10 tokens
#   <s> Be ▁brief . ▁US ER : ▁م ر ح ب ا ▁ASS IST ANT : ▁ أ ه ل ا </s>                = 22 tokens
#   the first conversation twice (</s>USER : ... </s>)                               = 19 tokens
HAND_SET = [
    _record("a", "qa", "en", ["Hi", "Hello"]),
    _record("b", "qa", "ar", ["مرحبا", "أهلا"], system="Be brief."),
    _record("c", "chat", "en", ["Hi", "Hello", "Hi", "Hello"]),
    _record("d", "qa", "en", ["Hi", "Hello"]),
]


def test_stats_on_hand_checked_set(mixtral_tokenizer):
    stats = compute_stats(HAND_SET, mixtral_tokenizer, batch_size=3)
    assert (stats.cell("qa", "en").samples, stats.cell("qa", "en").turns,
            stats.cell("qa", "en").tokens) == (2, 2, 20)
    assert (stats.cell("qa", "ar").samples, stats.cell("qa", "ar").turns,
            stats.cell("qa", "ar").tokens) == (1, 1, 22)
    assert (stats.cell("chat", "en").samples, stats.cell("chat", "en").turns,
            stats.cell("chat").tokens) == (1, 2, 19)
    total = stats.cell()
    assert (total.samples, total.turns, total.tokens) == (4, 5, 61) and total.avg_turns == 1.25
    table = stats.to_markdown()
    assert "| QA | English | 2 | 1.00 | 20 |" in table and "| CHAT | English | 1 | 2.00 | 19 |" in table
    assert "| Total | All | 4 | 1.25 | 61 |" in table
    assert DataStats.from_dict(json.loads(json.dumps(stats.to_dict()))).to_dict() == stats.to_dict()


def test_stats_merge_and_plot(mixtral_tokenizer, tmp_path):
    first = compute_stats(HAND_SET[:2], mixtral_tokenizer)
    merged = first.merge(compute_stats(HAND_SET[2:], mixtral_tokenizer))
    assert merged.to_dict() == compute_stats(HAND_SET, mixtral_tokenizer).to_dict()
    merged.plot(tmp_path / "stats.png")
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_EN = "the patient has a fever cough and chest pain since two days what dose of paracetamol is safe".split()
_AR = "المريض يعاني من حمى وسعال وألم في الصدر منذ يومين ما هي الجرعة الآمنة من الباراسيتامول ٥٠٠ ملغ".split()
_ODD = ["  leading and trailing spaces  ", "line\nbreaks\n\n", "tabs\tinside", "</s> in text", "<s>",
        "USER: ASSISTANT:",
        "emoji 💊", "mixed عربي and English 5 ٥", "a", "?!"]


def _random_record(rng: random.Random, index: int) -> dict:
    words = _AR if rng.random() < 0.5 else _EN
    turns = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        for _ in range(2):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
            if rng.random() < 0.3:
                text = rng.choice(_ODD) + " " + text if rng.random() < 0.5 else text + rng.choice(_ODD)
            turns.append(text)
    system = rng.choice([None, None, "You are a helpful medical assistant.", "أنت مساعد طبي"])
    return _record(f"r{index}", "qa", "en", turns, system=system)


def test_fast_encoding_equals_apply_chat_template(mixtral_tokenizer):
    rng = random.Random(0)
    records = [_random_record(rng, i) for i in range(300)]
    fast = encode_conversations(mixtral_tokenizer, records)
    for record, got in zip(records, fast):
        expected = mixtral_tokenizer.apply_chat_template(to_messages(record), tokenize=True, return_dict=True,
                                                         return_assistant_tokens_mask=True)
        assert got["input_ids"] == list(expected["input_ids"]), record
        assert got["assistant_masks"] == list(expected["assistant_masks"]), record


@pytest.mark.parametrize("index", range(20))
def test_render_vicuna_matches_template(index):
    record = _random_record(random.Random(index), index)
    text, spans = render_vicuna(record, system="default system")
    assert text == render(to_messages(record, system="default system"))
    answers = [turn["value"].strip() for turn in record["conversations"][1::2]]
    assert [text[start:end] for start, end in spans] == [f" {answer}</s>" for answer in answers]


@pytest.mark.parametrize("conversations, message", [
    (None, "field `conversations` is missing (columns: ['task', 'language', 'system', 'text'])"),
    (['[{"from": "human", "value": "Hi"}]'],
     "field `conversations` is `string`, not a list of {from, value}"),
], ids=["missing", "string"])
def test_stats_on_parquet_without_conversations_is_one_line_naming_file_and_field(tmp_path, capsys,
                                                                                   conversations, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bimedix.cli import main

    columns = {"task": ["qa"], "language": ["en"], "system": [None]}
    columns.update({"text": ["Hi"]} if conversations is None else {"conversations": conversations})
    pq.write_table(pa.table(columns), tmp_path / "part.parquet")
    assert main(["stats", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'part.parquet'}: {message}" in err
