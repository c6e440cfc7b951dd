"""build-bench: the evaluation folder and the Arabic benchmark from original files, translations and BiMediX's
sets."""

from __future__ import annotations

import csv
import itertools
import json
import re

import pytest
from datasets import load_dataset as _load_dataset

from bimedix.cli import main
from bimedix.data.mcqa import item_to_record, read_medqa
from bimedix.eval.arabic_bench import ArabicBench, import_bimedix_arabic, rows_from_records
from bimedix.eval.bench import (
    PAPER_SUBSETS,
    SOURCE_PATHS,
    available_configs,
    build_bench,
    bundled_data_dir,
    read_bench,
    subset_path,
)


def load_dataset(folder: str, config: str, split: str):
    """`datasets.load_dataset` with a fresh cache: its cache key ignores the files' content, so a folder name
    reused by another test run would otherwise return that run's rows."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        return _load_dataset(folder, config, split=split, cache_dir=cache, keep_in_memory=True)


@pytest.fixture(scope="module")
def built(shared_data, fixtures_dir, tmp_path_factory):
    """build-bench on the real files (10 per subset) plus BiMediX-layout Arabic fixtures, through the CLI."""
    output = tmp_path_factory.mktemp("bench")
    code = main(["build-bench", "--sources", str(shared_data), "--output", str(output), "--limit", "10",
                 "--bimedix-arabic", str(fixtures_dir / "bimedix_arabic")])
    assert code == 0
    return output


def test_build_bench_writes_every_subset_present_and_loads_with_datasets(built, shared_data):
    configs = set(available_configs(built))
    assert {f"{s}_en" for s in PAPER_SUBSETS} <= configs
    assert {"medqa_ar", "medmcqa_ar", "pubmedqa_ar", "mmlu_anatomy_ar", "medarabench_ar"} <= configs
    medqa = load_dataset(str(built), "medqa_en", split="test")
    assert len(medqa) == 10  # --limit 10, although only 3 have an Arabic twin (those come first)
    first = json.loads((shared_data / SOURCE_PATHS["medqa"]).read_text(encoding="utf-8").splitlines()[0])
    assert medqa[0]["question"] == first["question"] and medqa[0]["answer"] == first["answer_idx"]
    assert medqa[0]["options"] == [first["options"][k]
                                   for k in "ABCD"] and medqa[0]["provenance"] == "original"
    pubmedqa = load_dataset(str(built), "pubmedqa_en", split="test")
    assert set(pubmedqa["answer"]) <= {"A", "B", "C"} and all(pubmedqa["context"])
    assert json.loads((built / "rejects.jsonl").read_text(encoding="utf-8").splitlines()[0])["path"].endswith(
        "medarabench-test_split.csv")


def test_arabic_bench_is_hub_ready_with_one_config_per_subset_and_all(built):
    folder = built / "arabic-bench"
    medqa = load_dataset(str(folder), "medqa", split="test")
    assert medqa["id"] == ["medqa-1", "medqa-2", "medqa-3"] and medqa["answer"] == ["D", "B", "D"]
    assert set(medqa["provenance"]) == {"machine-translated, reviewed"}
    anatomy = load_dataset(str(folder), "mmlu_anatomy", split="test")
    # the BiMediX import replaces AceGPT's row with the same id; the others stay AceGPT (unreviewed)
    by_id = dict(zip(anatomy["id"], anatomy["translation_engine"]))
    assert "BiMediX" in by_id["mmlu_anatomy-1"] and "AceGPT" in by_id["mmlu_anatomy-2"]
    everything = load_dataset(str(folder), "all", split="test")
    assert "medarabench" not in set(everything["source"])
    assert len(everything) == sum(len(load_dataset(str(folder), s, split="test")) for s in PAPER_SUBSETS
                                  if (folder / s).is_dir())
    assert set(load_dataset(str(folder), "medarabench", split="test")["source"]) == {"medarabench"}
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "config_name: all" in card and "research use" in card


def test_english_and_arabic_rows_pair_by_id_and_corrupted_acegpt_rows_are_dropped(built, shared_data):
    tables = read_bench(built)
    english = [row["id"] for row in tables["mmlu_professional_medicine", "en"]]
    arabic = [row["id"] for row in tables["mmlu_professional_medicine", "ar"]]
    assert english == arabic  # --limit keeps questions present in both languages, in the same order
    path = shared_data / SOURCE_PATHS["mmlu_ar"].format(subject="professional_medicine")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    corrupted = {f"mmlu_professional_medicine-{i}" for i, row in enumerate(rows, 1)
                 if re.search(r"\bIP\b", row[0])}
    assert corrupted and not corrupted & set(arabic)


def test_import_keeps_published_answer_letters_and_option_counts(fixtures_dir):
    rows = {row["id"]: row for row in import_bimedix_arabic(fixtures_dir / "bimedix_arabic")}
    medmcqa = rows["medmcqa-b64a9cd7-d076-4c55-8be1-f9c44fece6cc"]
    assert medmcqa["answer"] == "C" and len(medmcqa["options"]) == 4  # cop 2, 0-based on the Hub
    pubmedqa = rows["pubmedqa-17208539"]
    assert pubmedqa["answer"] == "B" and pubmedqa["options"] == ["نعم", "لا", "ربما"] and pubmedqa["context"]
    assert rows["mmlu_anatomy-1"]["answer"] == "B" and rows["medqa-1"]["subject"] == "step1"


def test_import_rejects_a_folder_in_another_layout(tmp_path):
    (tmp_path / "medqa-test_arabic").mkdir()
    (tmp_path / "medqa-test_arabic" / "test.jsonl").write_text('{"q": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="medqa-test_arabic.*row 0.*column layout"):
        list(import_bimedix_arabic(tmp_path))
    with pytest.raises(FileNotFoundError, match="none of BiMediX's Arabic sets"):
        list(import_bimedix_arabic(tmp_path / "medqa-test_arabic"))


def test_translated_records_become_labelled_arabic_rows(shared_data):
    item = next(read_medqa(shared_data / SOURCE_PATHS["medqa"]))
    # Arabic prompt around the (untranslated) text: plumbing only
    record = item_to_record(item, language="ar")
    record["meta"]["translation"] = {"model": "gpt-4o-mini", "score": 91.0, "reviewed": False,
                                     "review_state": "unreviewed"}
    (row,) = rows_from_records([record, item_to_record(item, language="en")])
    assert row["id"] == "medqa-1" and row["question"] == item.question and row["options"] == item.options
    assert row["provenance"] == "machine-translated, unreviewed"
    assert row["translation_score"] == pytest.approx(91.0)


# review_state, score → in the bench by default, with include_unreviewed
REVIEW_CASES = [("approved", 50.0, True, True), ("edited", 40.0, True, True),
                ("unreviewed", 85.0, True, True),
                ("queued", 90.0, False, True), ("unreviewed", 60.0, False, True),
                ("rejected", 95.0, False, False)]


def test_review_policy_decides_which_translations_enter_the_bench(shared_data, tmp_path):
    from bimedix.data.review_policy import ReviewPolicy
    from bimedix.data.schema import RecordError
    from bimedix.eval.arabic_bench import collect_arabic_rows

    items = list(itertools.islice(read_medqa(shared_data / SOURCE_PATHS["medqa"]), len(REVIEW_CASES)))
    records = []
    for item, (state, score, _, _) in zip(items, REVIEW_CASES, strict=True):
        record = item_to_record(item, language="ar")
        record["meta"]["translation"] = {"model": "m", "score": score,
                                         "reviewed": state in ("approved", "edited", "rejected"),
                                         "review_state": state}
        records.append(record)
    path = tmp_path / "translated.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    for include, column in ((False, 2), (True, 3)):
        review = ReviewPolicy(include_unreviewed=include)
        scores = {row["translation_score"] for row in collect_arabic_rows(translations=path, review=review)}
        assert scores == {case[1] for case in REVIEW_CASES
                          if case[column]} and len(scores) == (5 if include else 3)
        assert review.seen["rejected"] == 1 and review.used["rejected"] == 0
    del records[0]["meta"]["translation"]["review_state"]
    path.write_text(json.dumps(records[0], ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(RecordError,
                       match=r"translated\.jsonl: record '.+': field `meta\.translation\.review_state`"):
        list(collect_arabic_rows(translations=path))


def test_datasets_builder_yields_the_build_bench_rows(fixtures_dir, tmp_path):
    builder = ArabicBench(config_name="medqa", bimedix_arabic=str(fixtures_dir / "bimedix_arabic"),
                          cache_dir=str(tmp_path))
    builder.download_and_prepare()
    test = builder.as_dataset(split="test")
    assert test["id"] == ["medqa-1", "medqa-2", "medqa-3"] and test["answer"] == ["D", "B", "D"]


def test_missing_subset_and_empty_sources_are_plain_errors(tmp_path):
    with pytest.raises(ValueError, match="no Arabic subset 'medqa'.*--translations"):
        subset_path("medqa", "ar", bundled_data_dir())
    with pytest.raises(ValueError, match="no benchmark file found"):
        build_bench(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown subset"):
        build_bench(tmp_path, tmp_path / "out", subsets=["mmlu_astrology"])


def test_rebuilding_a_folder_drops_subsets_of_the_earlier_build(shared_data, tmp_path):
    build_bench(shared_data, tmp_path, limit=2, subsets=["medqa", "pubmedqa", "mmlu_anatomy"])
    assert {"pubmedqa_en", "mmlu_anatomy_ar"} <= set(available_configs(tmp_path))
    build_bench(shared_data, tmp_path, limit=2, subsets=["medqa"])
    assert available_configs(tmp_path) == ["medqa_en"]
    assert not (tmp_path / "arabic-bench" / "README.md").exists()
    assert "medqa_en" in (tmp_path / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("columns, message", [
    ({"id": ["q1"], "language": ["en"], "source": ["medqa"], "question": ["Q?"], "context": [""],
      "options": ["A, B"], "answer": ["A"]}, "column `options` holds string, expected a list of strings"),
    ({"id": ["q1"], "language": ["en"], "source": ["medqa"], "question": ["Q?"], "context": [""],
      "options": [["yes", "no"]], "answer": ["D"]},
     "row 0 (id 'q1'): answer 'D' names none of its 2 options"),
    ({"id": ["q1"], "question": ["Q?"]}, "no column `language`"),
])
def test_subset_table_of_another_shape_is_refused_naming_file_and_field(tmp_path, columns, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bimedix.eval.bench import read_subset_table

    path = tmp_path / "test.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        read_subset_table(path)
    path.write_text("not parquet")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable Parquet file")):
        read_subset_table(path)
