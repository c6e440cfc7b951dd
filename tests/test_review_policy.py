"""The one review policy: statuses, and that build-data and push honour it (build-bench:
test_eval_bench.py)."""

from __future__ import annotations

import json

import pytest

from bimedix.data.build import build_data
from bimedix.data.review_policy import ReviewPolicy
from bimedix.data.schema import RecordError
from bimedix.hub.cards import save_dataset_card

# review_state, judge score → status, used by default, used with include_unreviewed
CASES = [
    (None, None, "original", True, True),
    ("approved", 40.0, "approved", True, True),
    ("edited", 55.0, "edited", True, True),
    ("unreviewed", 86.0, "judge-passed", True, True),
    ("unreviewed", 62.0, "below-threshold", False, True),
    ("unreviewed", None, "below-threshold", False, True),
    ("queued", 91.0, "pending", False, True),
    ("rejected", 97.0, "rejected", False, False),
]


def _record(i: int, state: str | None, score: float | None, language: str = "ar") -> dict:
    meta = {}
    if state is not None:
        meta["translation"] = {"model": "m", "score": score, "rounds": 1, "review_state": state,
                               "reviewed": state in ("approved", "edited", "rejected"),
                               "source_id": f"en-{i}"}
    words = " ".join(f"كلمة{i}{j}" for j in range(12))
    return {"id": f"{language}-{i}", "source": "translated", "task": "qa", "language": language,
            "conversations": [{"from": "human", "value": f"سؤال {words}"}, {"from": "gpt",
                                                                            "value": f"جواب {words}"}],
            "meta": meta}


@pytest.mark.parametrize(("state", "score", "status", "default", "included"), CASES)
def test_status_and_decision(state, score, status, default, included):
    record = _record(0, state, score)
    assert ReviewPolicy().status(record) == status
    assert ReviewPolicy().admits(record) is default
    assert ReviewPolicy(include_unreviewed=True).admits(record) is included


def test_translation_without_review_state_names_file_record_and_field():
    record = _record(3, "unreviewed", 90.0)
    del record["meta"]["translation"]["review_state"]
    with pytest.raises(RecordError,
                       match=r"tr\.jsonl: record 'ar-3': field `meta\.translation\.review_state`"):
        ReviewPolicy().admits(record, path="tr.jsonl")


@pytest.fixture(scope="module")
def translated_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    english = [{"id": f"en-{i}", "source": "english", "task": "qa", "language": "en", "conversations": [
        {"from": "human", "value": f"question {i} " + " ".join(f"w{i}x{j}" for j in range(12))},
        {"from": "gpt", "value": f"answer {i} " + " ".join(f"v{i}y{j}" for j in range(12))}]}
               for i in range(6)]
    (root / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in english))
    arabic = [_record(i, state, score) for i, (state, score, *_) in enumerate(CASES) if state is not None]
    (root / "ar.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in arabic))
    recipe = root / "recipe.yaml"
    recipe.write_text("name: reviewed\nsources:\n  - {name: en, converter: records, path: en.jsonl}\n"
                      "  - {name: translated-ar, converter: records, path: ar.jsonl}\n"
                      "mix:\n  targets: {all: {en: 6, ar: 4}}\n")
    return recipe


def _ids(out) -> set[str]:
    import pyarrow.parquet as pq

    return {row for path in out.glob("data/**/*.parquet")
            for row in pq.read_table(path, columns=["id"])["id"].to_pylist()}


def test_build_data_leaves_out_rejected_and_unreviewed(translated_recipe, tmp_path, mixtral_tokenizer):
    result = build_data(translated_recipe, tmp_path / "out", tokenizer=mixtral_tokenizer, progress=False)
    used = {f"ar-{i}" for i, case in enumerate(CASES) if case[0] is not None and case[3]}
    assert _ids(tmp_path / "out") == {f"en-{i}" for i in range(6)} | used  # English whole, 3 Arabic
    assert result.counts.balanced and result.sources["translated-ar"].excluded_review == 4
    summary = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert summary["review"]["states"]["rejected"] == {"seen": 1, "used": 0, "excluded": 1}
    assert summary["review"]["states"]["below-threshold"] == {"seen": 2, "used": 0, "excluded": 2}
    rows = {(r["task"], r["language"]): r for r in summary["composition"]["rows"]}
    assert rows["all", "ar"] == {"task": "all", "language": "ar", "target": 4, "achieved": 3}
    assert rows["all", "en"]["achieved"] == rows["all", "en"]["target"] == 6
    readme = save_dataset_card(tmp_path / "out").read_text()  # what `bimedix build-data` adds to the README
    assert "| rejected | 1 | 0 | 1 |" in readme and "| all | ar | 3 | 4 | 75.0% |" in readme


def test_build_data_include_unreviewed_still_never_uses_rejected(translated_recipe, tmp_path,
                                                                 mixtral_tokenizer,
                                                                 capsys):
    from bimedix.cli import main

    assert main(["build-data", "--recipe", str(translated_recipe), "--output", str(tmp_path / "out"),
                 "--include-unreviewed", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| pending | 1 | 1 | 0 |" in printed and "| rejected | 1 | 0 | 1 |" in printed
    assert "excluded by the review policy 1" in printed
    rejected = next(f"ar-{i}" for i, case in enumerate(CASES) if case[2] == "rejected")
    assert rejected not in _ids(tmp_path / "out") and len(_ids(tmp_path / "out")) == 6 + 6


def test_push_refuses_rejected_and_unacknowledged_unreviewed(translated_recipe, tmp_path, mixtral_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bimedix.data.schema import FEATURES, normalize_record
    from bimedix.hub.cards import summarize_dataset
    from bimedix.hub.push import ReviewError, check_review

    build_data(translated_recipe, tmp_path / "strict", tokenizer=mixtral_tokenizer, progress=False)
    assert check_review(summarize_dataset(tmp_path / "strict")) == []
    build_data(translated_recipe, tmp_path / "loose", tokenizer=mixtral_tokenizer, progress=False,
               include_unreviewed=True)
    with pytest.raises(ReviewError, match=r"nobody approved: \{'pending': 1, 'below-threshold': 2\}"):
        check_review(summarize_dataset(tmp_path / "loose"))
    assert check_review(summarize_dataset(tmp_path / "loose"), include_unreviewed=True) == [
        "1 pending translation(s) pushed because of --include-unreviewed",
        "2 below-threshold translation(s) pushed because of --include-unreviewed"]
    folder = tmp_path / "tampered" / "data" / "ar" / "qa"
    folder.mkdir(parents=True)
    rejected = normalize_record(_record(9, "rejected", 99.0))
    pq.write_table(pa.Table.from_pylist([rejected], schema=FEATURES.arrow_schema), folder
                   / "train-00000.parquet")
    with pytest.raises(ReviewError, match="1 reviewer-rejected"):
        check_review(summarize_dataset(tmp_path / "tampered"), include_unreviewed=True)


def test_dataset_card_counts_review_statuses_and_targets(translated_recipe, tmp_path, mixtral_tokenizer):
    from bimedix.hub.cards import render_dataset_card

    build_data(translated_recipe, tmp_path / "out", tokenizer=mixtral_tokenizer, progress=False)
    text = str(render_dataset_card(tmp_path / "out", repo_id="me/reviewed"))
    assert "| judge-passed | 1 |" in text and "| approved | 1 |" in text
    assert "rejected" not in text.split("| review")[1]
    assert "4 translations left out by the review policy" in text
    assert "| all | ar | 3 | 4 | 75.0% |" in text
