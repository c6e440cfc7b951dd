"""Hub cards: rendered from real artefacts, metadata parses with huggingface_hub, required fields present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard, ModelCard

from bimedix.hub.cards import (
    hub_license,
    render_bench_card,
    render_dataset_card,
    render_model_card,
    summarize_dataset,
)

DATASET_REQUIRED = ("license", "language", "task_categories", "size_categories", "configs", "source_datasets",
                    "annotations_creators", "language_creators", "multilinguality")


def _records() -> list[dict]:
    from bimedix.data.schema import make_record

    records = []
    for i in range(6):
        records.append(make_record(
            id=f"medmcqa-en-{i}", source="medmcqa", task="mcqa", language="en", license="MIT",
            conversations=[{"from": "human", "value": f"Question {i}? A. x B. y"},
                           {"from": "gpt", "value": "A. x"}],
            options=["x", "y"], answer="A"))
    for i in range(3):  # machine-translated, the first one reviewed
        records.append(make_record(
            id=f"medmcqa-ar-{i}", source="medmcqa", task="mcqa", language="ar", license="MIT",
            conversations=[{"from": "human", "value": f"سؤال {i}؟ A. س B. ص"},
                           {"from": "gpt", "value": "A. س"}],
            options=["س", "ص"], answer="A",
            translation={"model": "gpt-4o", "score": 90.0, "rounds": 1, "reviewed": i == 0,
                         "review_state": "approved" if i == 0 else "unreviewed",
                         "source_id": f"medmcqa-en-{i}"}))
    for i in range(2):
        records.append(make_record(
            id=f"meadow-{i}", source="meadow", task="qa", language="en", license="GPL-3.0",
            conversations=[{"from": "human", "value": "What is anemia?"}, {"from": "gpt",
                                                                           "value": "Low haemoglobin."}]))
    records.append(make_record(
        id="mentalqa-0", source="mentalqa", task="qa", language="ar", license="MIT",
        conversations=[{"from": "human", "value": "ما هو القلق؟"}, {"from": "gpt", "value": "شعور بالخوف."}]))
    return records


def write_dataset_folder(path: Path, records: list[dict]) -> Path:
    """A folder shaped like `bimedix build-data` output: Parquet shards + README with `configs:`."""
    from datasets import Dataset

    from bimedix.data.schema import FEATURES

    for language in ("en", "ar"):
        rows = [r for r in records if r["language"] == language]
        Dataset.from_list(rows, features=FEATURES).to_parquet(str(path / "data" / language
                                                                  / "train-00000.parquet"))
    (path / "README.md").write_text(
        "---\nconfigs:\n- config_name: all\n  default: true\n  data_files:\n  - split: train\n    path: "
        "data/*/*.parquet\n- config_name: en\n  data_files:\n  - split: train\n    path: data/en/*.parquet\n"
        "- config_name: ar\n  data_files:\n  - split: train\n    path: data/ar/*.parquet\n---\n\n# built\n",
        encoding="utf-8")
    (path / "stats.md").write_text("| task | language | samples |\n|---|---|---:|\n| mcqa | en | 6 |\n",
                                   encoding="utf-8")
    counts = {"read": len(records) + 4, "written": len(records), "rejected": 1, "deduplicated_exact": 1,
              "deduplicated_near": 0, "decontaminated": 2, "dropped_weight": 0, "dropped_ratio": 0,
              "balanced": True}
    (path / "stats.json").write_text(json.dumps({"counts": counts}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return write_dataset_folder(tmp_path_factory.mktemp("bimed"), _records())


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    from datasets import Dataset

    from bimedix.eval.bench import make_row, row_features

    path = tmp_path_factory.mktemp("bench")
    for subset, n in (("medqa", 3), ("pubmedqa", 2)):
        rows = [make_row(id=f"{subset}-{i}", language="ar", source=subset, subject="", question="سؤال؟",
                         options=["أ", "ب"], answer="A", license="MIT", engine="gpt-4o", score=80.0,
                         reviewed=i == 0)
                for i in range(n)]
        Dataset.from_list(rows, features=row_features()).to_parquet(str(path / subset / "test.parquet"))
    return path


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval")
    (path / "results_2026.json").write_text(json.dumps({"results": {
        "bimedix_medqa_en": {"alias": "medqa_en", "acc,none": 0.25, "acc_stderr,none": 0.1},
        "bimedix_medqa_ar": {"alias": "medqa_ar", "acc,none": 0.5, "acc_stderr,none": 0.1}}}),
                                            encoding="utf-8")
    (path
     / "table.md").write_text("| Model | MedQA EN | MedQA AR |\n|---|---:|---:|\n| tiny | 25.0 | 50.0 |\n")
    return path


def _lora_parameter_count(adapter_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(adapter_dir / "adapter_model.safetensors")).values())


def test_model_card_from_adapter_artefacts(tmp_path, tiny_adapter_dir, eval_dir, dataset_dir):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    (adapter / "trainer_state.json").write_text(json.dumps(
        {"global_step": 30, "epoch": 1.5, "log_history": [{"loss": 10.25, "step": 5},
                                                          {"loss": 9.5, "step": 30}]}))
    card = render_model_card(adapter, repo_id="me/bimedix-tiny", base_model="mistralai/Mixtral-8x7B-v0.1",
                             eval_dir=eval_dir, data_dir=dataset_dir, dataset_repo="me/bimed-mini")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data.to_dict()
    assert data["base_model"] == "mistralai/Mixtral-8x7B-v0.1"
    assert data["library_name"] == "peft"
    assert data["license"] == "apache-2.0"
    assert data["language"] == ["en", "ar"]
    assert data["datasets"] == ["me/bimed-mini"]
    assert {"medical", "arabic", "lora", "peft"} <= set(data["tags"])
    results = {(r.dataset_name, r.metric_value) for r in loaded.data.eval_results}
    assert results == {("bimedix_medqa_en", 0.25), ("bimedix_medqa_ar", 0.5)}
    text = loaded.text
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert f"r={adapter_config['r']}, alpha={adapter_config['lora_alpha']}" in text
    assert f"{_lora_parameter_count(adapter):,}" in text
    for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight", "q_proj"):
        assert name in text
    assert "| tiny | 25.0 | 50.0 |" in text  # the eval markdown table, verbatim
    assert "10.2500 at the first log, 9.5000 at the last" in text and "**Steps:** 30" in text
    assert "Not medical advice" in text and "## Limitations" in text and "## Intended use" in text
    assert "arXiv 2402.13253" in text or "2402.13253" in text
    assert "1 of them (33.3%) were reviewed" in text  # provenance counted from the training data


def test_model_card_with_local_base_keeps_it_out_of_metadata(tiny_adapter_dir):
    card = render_model_card(tiny_adapter_dir)  # base_model_name_or_path is a local folder
    assert card.data.base_model is None
    assert "a local model, not on the Hub" in card.text
    assert "MixtralForCausalLM, 2 layers" in card.text  # read from the local base model's config.json
    assert "No evaluation results were given" in card.text


def test_model_card_for_merged_model(tmp_path, tiny_model_dir):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    (merged / "merge_report.json").write_text(json.dumps({  # the shape `bimedix merge` writes
        "base": "runs/base-model", "adapter": "runs/adapter/", "dtype": "float32", "prompts": 4,
        "tolerance": 0.001,
        "max_abs_diff_merged_vs_adapter": 1.9e-06}))
    card = render_model_card(merged, base_model="mistralai/Mixtral-8x7B-v0.1", repo_id="me/merged")
    assert card.data.library_name == "transformers"
    assert "merged weights" in card.text and "AutoModelForCausalLM" in card.text
    assert "adapter `adapter` into `base-model` (float32); on 4 prompts" in card.text
    assert "at most 1.9e-06" in card.text


def test_model_card_rejects_a_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        render_model_card(tmp_path)


def test_dataset_card_counts_come_from_the_rows(tmp_path, dataset_dir):
    records = _records()
    card = render_dataset_card(dataset_dir, repo_id="me/bimed-mini")
    card.save(tmp_path / "README.md")
    loaded = DatasetCard.load(tmp_path / "README.md")
    data = loaded.data.to_dict()
    for key in DATASET_REQUIRED:
        assert data.get(key), f"missing {key}"
    assert data["language"] == ["en", "ar"]
    assert sorted(data["license"]) == ["gpl-3.0", "mit"]
    assert data["size_categories"] == ["n<1K"]
    assert "machine-generated" in data["language_creators"]
    assert "expert-generated" in data["language_creators"]
    assert data["translation_review"] == {"machine_translated": 3, "human_reviewed": 1}
    assert [c["config_name"] for c in data["configs"]] == ["all", "en", "ar"]
    assert data["source_datasets"] == ["extended|meadow", "extended|medmcqa", "extended|mentalqa"]
    text = loaded.text
    n_en = sum(r["language"] == "en" for r in records)
    assert f"| **total** | {n_en} | {len(records) - n_en} | {len(records)} |" in text
    assert "| meadow | GPL-3.0 | gpl-3.0 | 2 | 2 | 0 | Medical Meadow" in text
    assert "Copyleft" in text and "unreviewed machine translation" in text
    assert "| mcqa | en | 6 |" in text  # stats.md embedded
    assert f"read {len(records) + 4} source records and wrote {len(records)}: 1 rejected" in text
    assert "2 removed for overlapping an evaluation benchmark" in text


def test_summary_counts(dataset_dir):
    summary = summarize_dataset(dataset_dir)
    assert summary.total == len(_records())
    assert summary.translated == 3 and summary.reviewed == 1
    assert summary.review_states == {"approved": 1, "judge-passed": 2}  # unreviewed, score 90 >= 80
    assert {(s.source, s.license): s.count for s in summary.sources} == {
        ("medmcqa", "MIT"): 9, ("meadow", "GPL-3.0"): 2, ("mentalqa", "MIT"): 1}


def test_bench_card(tmp_path, bench_dir):
    card = render_bench_card(bench_dir, repo_id="me/arabic-bench")
    card.save(tmp_path / "README.md")
    data = DatasetCard.load(tmp_path / "README.md").data.to_dict()
    for key in DATASET_REQUIRED:
        assert data.get(key), f"missing {key}"
    assert data["task_categories"] == ["question-answering"]
    assert data["language"] == ["ar"] and data["multilinguality"] == ["monolingual", "translation"]
    assert data["translation_review"] == {"machine_translated": 5, "human_reviewed": 2}
    assert "| medqa | 3 |" in card.text and "| **total** | 5 |" in card.text


def test_dataset_card_needs_parquet(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        render_dataset_card(tmp_path)


@pytest.mark.parametrize("name, expected", [("MIT", "mit"), ("Apache-2.0", "apache-2.0"),
                                            ("GPL-3.0", "gpl-3.0"),
                                            ("none stated", "other"), (None, "other")])
def test_hub_license(name, expected):
    assert hub_license(name) == expected


def test_training_section_reads_the_newest_checkpoint(tmp_path, tiny_adapter_dir):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    for step in (2, 10):
        (adapter / f"checkpoint-{step}").mkdir()
        (adapter / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "epoch": None, "log_history": [{"loss": 5.0 + step}]}))
    text = render_model_card(adapter).text
    assert "**Steps:** 10" in text and "`adapter/checkpoint-10/trainer_state.json`" in text
