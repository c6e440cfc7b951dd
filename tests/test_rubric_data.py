"""HealthBench-format rubric files: bad lines get one clear error or are skipped."""

from __future__ import annotations

import json

import pytest

from bimedix.data.rejects import RejectLog
from bimedix.data.rubric import Criterion, read_rubric_examples
from bimedix.data.schema import RecordError
from bimedix.resources import resource_path

EXAMPLES = resource_path("bimedix", "eval", "rubric_examples")


def good(prompt_id: str = "p1") -> dict:
    return {
        "prompt_id": prompt_id,
        "prompt": [{"role": "user", "content": "Hi, I have a cough."}],
        "rubrics": [
            {"criterion": "Asks how long", "points": 5, "tags": ["axis:context_awareness"]},
            {"criterion": "Prescribes antibiotics", "points": -4, "tags": ["axis:accuracy"]},
        ],
        "example_tags": ["theme:context_seeking"],
    }


def write(path, lines) -> object:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


def test_bundled_examples_are_paired_bilingual_sets():
    english = read_rubric_examples(EXAMPLES / "examples_en.jsonl")
    arabic = read_rubric_examples(EXAMPLES / "examples_ar.jsonl", language="ar")
    assert len(english) == len(arabic) == 8
    assert sum(len(e.rubrics) for e in english) == 30
    for en, ar in zip(english, arabic):
        assert en.prompt_id == ar.prompt_id and en.example_tags == ar.example_tags
        assert [c.points for c in en.rubrics] == [c.points for c in ar.rubrics]
        assert [m["role"] for m in en.prompt] == [m["role"] for m in ar.prompt]
        assert ar.extra["translation"]["reviewed"] is False
    assert str(Criterion("Says X", 7)) == "[7] Says X"  # HealthBench's grader-prompt rendering


@pytest.mark.parametrize(
    "mutate, field, message",
    [
        (lambda r: r["rubrics"][0].update(points=0), "rubrics[0].points", "is 0"),
        (lambda r: r["rubrics"].pop(0), "rubrics", "no criterion with positive points"),
        (
            lambda r: r["prompt"].append({"role": "assistant", "content": "ok"}),
            "prompt[1].role",
            "end with a user turn",
        ),
        (lambda r: r["rubrics"][1].update(tags=["axis:bedside_manner"]), "rubrics[1].tags", "unknown tag"),
        (lambda r: r.update(example_tags=["topic:cough"]), "example_tags", "unknown tag"),
        (lambda r: r["rubrics"][0].update(points="5"), "rubrics[0].points", "must be a number"),
        (lambda r: r.pop("prompt_id"), "prompt_id", "non-empty string"),
        (lambda r: r["prompt"][0].update(content=""), "prompt[0].content", "non-empty string"),
    ],
)
def test_bad_example_names_line_and_field(tmp_path, mutate, field, message):
    bad = good("p2")
    mutate(bad)
    path = write(tmp_path / "hb.jsonl", [good(), bad])
    with pytest.raises(RecordError) as err:
        read_rubric_examples(path)
    assert f"{path}:2: field `{field}`" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_truncated_and_non_utf8_files(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(good()) + "\n" + json.dumps(good("p2"))[:40], encoding="utf-8")
    with pytest.raises(RecordError, match=r"cut.jsonl:2: invalid JSON .* looks truncated"):
        read_rubric_examples(path)
    latin = tmp_path / "latin.jsonl"
    second = json.dumps(good("p2")).encode().replace(b"cough", b"caf\xe9")
    latin.write_bytes(json.dumps(good()).encode() + b"\n" + second + b"\n")
    with pytest.raises(RecordError, match=r"latin.jsonl:2: not valid UTF-8"):
        read_rubric_examples(latin)


def test_skip_policy_counts_bad_lines(tmp_path):
    zero = good("p3")
    zero["rubrics"][0]["points"] = 0
    path = write(tmp_path / "hb.jsonl", [good(), "{not json", zero, good("p1"), good("p4")])
    with RejectLog(tmp_path / "rejects.jsonl") as rejects:
        examples = read_rubric_examples(path, on_error=rejects)
    assert [e.prompt_id for e in examples] == ["p1", "p4"]
    assert rejects.count == 3
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert any("already used on line 1" in reason for reason in reasons)


def test_language_mismatch(tmp_path):
    path = write(tmp_path / "ar.jsonl", [{**good(), "language": "en"}])
    with pytest.raises(RecordError, match="field `language`: is 'en' but this file is read as 'ar'"):
        read_rubric_examples(path, language="ar")
