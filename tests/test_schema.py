"""The conversation schema: valid records round-trip through `datasets`, bad ones name file:record:field."""

from __future__ import annotations

import json
import os

import pytest
from datasets import Dataset

from bimedix.core.io import iter_jsonl, write_jsonl
from bimedix.data.schema import FEATURES, RecordError, make_record, read_records, validate_record


def _record(**overrides):
    record = {
        "id": "medmcqa-en-1",
        "source": "medmcqa",
        "task": "mcqa",
        "language": "en",
        "conversations": [{"from": "human", "value": "Q?\nA. x\nB. y"}, {"from": "gpt", "value": "B. y"}],
        "license": "MIT",
        "meta": {"original_id": "abc", "answer": "B", "options": ["x", "y"]},
    }
    record.update(overrides)
    return record


def test_valid_record_is_normalised_and_loads_into_datasets():
    chat = make_record(
        id="chat-ar-1", source="medqa", task="chat", language="ar",
        conversations=[{"from": "human", "value": "مرحبا"}, {"from": "gpt", "value": "أهلا"}],
        generation={"model": "gpt-3.5", "prompt_version": "v1", "source_id": "medqa-en-1"},
        translation={"model": "gpt-4", "score": 91.5, "rounds": 2, "reviewed": False,
                     "review_state": "queued"},
    )
    records = [validate_record(_record()), chat]
    assert records[0]["meta"]["translation"] is None and records[0]["system"] is None
    assert chat["meta"]["translation"]["source_id"] is None
    dataset = Dataset.from_list(records, features=FEATURES)
    assert dataset.features == FEATURES
    assert dataset[1]["meta"]["translation"]["score"] == pytest.approx(91.5)
    assert dataset[1]["conversations"][1]["value"] == "أهلا"
    assert dataset[0]["meta"]["options"] == ["x", "y"]


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"task": "essay"}, "task", "unknown task"),
        ({"language": "fr"}, "language", "unknown language"),
        ({"conversations": []}, "conversations", "must be a non-empty list"),
        ({"conversations": [{"from": "gpt", "value": "x"}]}, "conversations[0].from", "expected 'human'"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "conversations[0].from", "must end with"),
        ({"conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "y"}]},
         "conversations[0].value", "non-empty string"),
        ({"meta": {"answer": "E", "options": ["x", "y"]}}, "meta.answer", "'E' is not one of"),
        ({"meta": {"answer": "A", "options": []}}, "meta.options", "non-empty list"),
        ({"meta": {"answer": "A"}}, "meta.options", "needs meta.options"),
        ({"meta": {"answer": "A", "options": ["x"], "colour": 1}}, "meta.colour", "unknown meta field"),
        ({"meta": {"answer": "A", "options": ["x"], "translation": {"score": 140}}},
         "meta.translation.score", "0..100"),
    ],
)
def test_invalid_records_name_file_record_and_field(overrides, field, message):
    with pytest.raises(RecordError) as info:
        validate_record(_record(**overrides), path="data/in.jsonl", line=7)
    err = info.value
    assert (err.path, err.record, err.field) == ("data/in.jsonl", 7, field)
    assert str(err).startswith(f"data/in.jsonl:7: field `{field}`: ")
    assert message in str(err)


def test_missing_id_names_the_field_and_located_fills_the_file():
    record = _record()
    del record["id"]
    with pytest.raises(RecordError) as info:
        validate_record(record)
    assert info.value.field == "id"
    assert str(info.value.located(path="x.jsonl", record=3)).startswith("x.jsonl:3: field `id`")


def test_jsonl_reader_handles_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_record()).encode() + b"\r\n\r\n"
                     + json.dumps(_record(id="b")).encode() + b"\r\n")
    assert [r["id"] for r in read_records(path)] == ["medmcqa-en-1", "b"]
    assert [line for line, _ in iter_jsonl(path)] == [1, 3]


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b'{"id": 1,\n', "invalid JSON"), ('{"id": "\u0645"}\n'.encode("cp1256"), "not valid UTF-8")],
)
def test_jsonl_reader_reports_bad_lines(tmp_path, payload, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(_record()).encode() + b"\n" + payload)
    with pytest.raises(RecordError, match=rf"bad.jsonl:2: {message}"):
        list(iter_jsonl(path))


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [_record()])

    def broken():
        yield _record(id="new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, broken())
    assert [r["id"] for r in read_records(path)] == ["medmcqa-en-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # same mode as a plain open(), not mkstemp's 0600
