"""Recipes for today's MoE bases (Qwen3-30B-A3B, OLMoE-1B-7B): parse, count and estimate offline; their tiny
CPU twins (same recipe, tiny random model of the same architecture, bundled data) go train -> merge -> eval ->
chat."""

from __future__ import annotations

import builtins
import json

import pytest
import yaml

from bimedix.cli import main
from bimedix.resources import resource_path
from bimedix.training.memory import estimate_memory

RECIPES = {  # recipe folder: (tiny twin architecture, GPU it must fit at 2048 tokens, in GB)
    "qwen3-30b-a3b": ("qwen3_moe", 24),
    "olmoe-1b-7b": ("olmoe", 16),
}


def _recipe(name: str):
    return resource_path("recipes", name, "sft_qlora.yaml")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_counts_offline_with_lower_expert_ranks_and_1_to_4_percent_trainable(name, capsys):
    assert main(["targets", "--recipe", str(_recipe(name)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    share = report["trainable"] / report["total"]
    assert 0.01 <= share <= 0.04, share
    ranks = {row["group"]: row["r"] for row in report["rows"]}
    assert ranks["experts"] < ranks["q_proj"] == ranks["k_proj"] == ranks["v_proj"] == ranks["router"]
    assert set(report["target_parameters"]) == {"experts.down_proj", "experts.gate_up_proj", "gate.weight"}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_fits_its_single_gpu_at_2048_tokens(name):
    _, gpu = RECIPES[name]
    report = estimate_memory(_recipe(name), gpu=gpu)
    settings = report["settings"]
    assert settings["max_length"] == 2048 and settings["num_processes"] == 1
    assert settings["quantization"] == "4bit" and settings["quantize_experts"]
    assert report["stated_gpu"]["fits"], report["totals"]


def test_bad_rank_patterns_are_refused_at_start_up_naming_the_key(tmp_path, capsys):
    twin = str(_twin(tmp_path, "qwen3-30b-a3b"))
    assert main(["sft", "--config", twin, "--lora_rank_pattern", '{"shared_expert": 4}']) == 2
    err = capsys.readouterr().err
    assert "lora_rank_pattern key 'shared_expert' matches none of the" in err
    assert "Formatting" not in err and not (tmp_path / "out").exists()  # before data, model or training
    assert main(["sft", "--config", twin, "--lora_alpha_pattern", '{"q_proj": 0}']) == 2
    assert "lora_alpha_pattern={'q_proj': 0}: give a mapping" in capsys.readouterr().err
    assert main(["sft", "--config", twin, "--lora_rank_pattern", "{q_proj: 4}"]) == 2
    assert "lora_rank_pattern='{q_proj: 4}' is not a JSON object" in capsys.readouterr().err
    assert main(["sft", "--config", twin, "--tiny_model_config", "{layers: 2}"]) == 2
    assert "tiny_model_config='{layers: 2}' is not a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("name", RECIPES)
def test_tiny_twin_trains_merges_evaluates_and_chats(name, tmp_path, eval_bench_dir, monkeypatch, capsys):
    arch, _ = RECIPES[name]
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(["sft", "--config", str(_twin(tmp_path, name)), "--output_dir", str(adapter)]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"tiny:{arch}:42"
    # the recipe's per-target ranks reach the adapter
    assert config["rank_pattern"] and config["alpha_pattern"]

    assert main(["merge", "--adapter", str(adapter), "--output", str(merged), "--quantize_experts",
                 "nf4"]) == 0
    assert json.loads((merged / "config.json").read_text())["model_type"] == arch

    assert main(["eval", "--model", str(merged), "--tasks", "bimedix_medqa_en", "--limit", "2", "--data-dir",
                 str(eval_bench_dir), "--device", "cpu", "--output", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["n-samples"]["bimedix_medqa_en"]["effective"] == 2

    questions = iter(["What is anemia?"])

    def fake_input(prompt):
        try:
            return next(questions)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    capsys.readouterr()
    assert main(["chat", "--model", str(merged), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "bimedix> " in capsys.readouterr().out


def _twin(tmp_path, name: str):
    """The recipe with a tiny random model of its architecture, the bundled records and a 2-step CPU
    schedule."""
    arch, _ = RECIPES[name]
    recipe = yaml.safe_load(_recipe(name).read_text(encoding="utf-8"))
    recipe.pop("model_name_or_path")
    recipe.update(
        tiny_model=arch, dtype="float32", bf16=False, use_cpu=True,
        datasets=[{"path": "bimedix:recipes/tiny/data/train.jsonl"}], max_length=256, max_steps=2,
        per_device_train_batch_size=2, gradient_accumulation_steps=1, optim="adamw_torch", learning_rate=1e-2,
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        output_dir=str(tmp_path / "out"))
    path = tmp_path / f"{name}-tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path
