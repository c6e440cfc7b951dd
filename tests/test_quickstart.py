"""`bimedix quickstart`, shortened: every stage runs end to end on CPU and leaves its artefacts under
--output."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import DatasetCard, ModelCard

from bimedix.cli import main


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    output = tmp_path_factory.mktemp("quickstart")
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    try:
        code = main(["quickstart", "--output", str(output), "--max-steps", "4", "--limit", "2",
                     "--no-progress",
                     "--tasks", "bimedix_mmlu_anatomy_bilingual,bimedix_medqa_en", "--repo-id",
                     "me/bimedix-tiny"])
    finally:
        capture.undo()
    return code, output, "\n".join(lines)


def test_quickstart_runs_every_stage(quickstart):
    code, output, out = quickstart
    assert code == 0
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    # statistics and count balance
    assert "| Total | All |" in out and "read " in out and " = written " in out
    # one masked sample (plain markers when not a tty)
    assert "[[" in out and "]]" in out and "trained (" in out
    assert "Table 2: Bilingual benchmark" in out  # the EN/AR table
    for path in ("data/README.md", "data/stats.md", "base-model/config.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/trainer_state.json", "eval/results.json",
                 "eval/tables.md", "hub/adapter/README.md", "hub/dataset/README.md"):
        assert (output / path).is_file(), path


def test_quickstart_training_loss_falls_and_adapter_targets_router_and_experts(quickstart):
    _, output, out = quickstart
    state = json.loads((output / "adapter" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 4 and len(losses) == 4
    assert losses[-1] < losses[0]
    assert f"training loss: {losses[0]:.4f} (first step) -> {losses[-1]:.4f} (last step)" in out
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert {"q_proj", "k_proj", "v_proj"} <= set(config["target_modules"])
    for suffix in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):  # router and fused experts
        assert any(name.endswith(suffix)
                   for name in config["target_parameters"]), (suffix, config["target_parameters"])


def test_quickstart_evaluates_both_languages(quickstart):
    _, output, _ = quickstart
    results = json.loads((output / "eval" / "results.json").read_text())["results"]
    assert {"bimedix_mmlu_anatomy_en", "bimedix_mmlu_anatomy_ar", "bimedix_medqa_en"} <= set(results)


def test_quickstart_cards_and_dry_run_push(quickstart):
    _, output, _ = quickstart
    card = ModelCard.load(output / "hub" / "adapter" / "README.md")
    assert card.data.library_name == "peft" and card.data.language == ["en", "ar"]
    assert {r.dataset_name for r in card.data.eval_results} >= {"bimedix_mmlu_anatomy_en",
                                                                "bimedix_mmlu_anatomy_ar"}
    assert "**Steps:** 4" in card.text and "Not medical advice" in card.text
    assert "**Trained in full and saved with the adapter:** lm_head" in card.text  # the quickstart's extra
    assert (output / "eval" / "tables.md").read_text().strip() in card.text
    pushed = sorted(p.name for p in (output / "hub" / "adapter").iterdir())
    assert pushed == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors",
                             "bimedix_base.json",
                             "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"])
    dataset_card = DatasetCard.load(output / "hub" / "dataset" / "README.md")
    assert dataset_card.data.to_dict()["configs"][0]["config_name"] == "all"
    counts = json.loads((output / "data" / "stats.json").read_text())["counts"]
    assert f"read {counts['read']:,} source records and wrote {counts['written']:,}" in dataset_card.text
    assert not (output / "hub" / "dataset" / "decontamination.jsonl").exists()  # it quotes benchmark items
    assert sorted(p.relative_to(output / "hub" / "dataset").as_posix()
                  for p in (output / "hub" / "dataset").rglob("*.parquet")) == sorted(
        p.relative_to(output / "data").as_posix() for p in (output / "data").rglob("*.parquet")
        if ".work" not in p.parts)
