"""Memory estimates from a recipe's model config (meta device): parts, dtypes, the bitsandbytes caveat."""

from __future__ import annotations

import json

import pytest
import torch

from bimedix.resources import resource_path
from bimedix.training.memory import NF4_BYTES, activation_bytes, estimate_memory, format_report
from bimedix.training.tiny import tiny_config

PAPER = resource_path("recipes", "bimedix-mixtral", "sft_qlora.yaml")
TINY = resource_path("recipes", "tiny", "sft.yaml")


@pytest.fixture(scope="module")
def paper_report(tmp_path_factory):
    """The paper recipe with `load_in_4bit` alone (no `quantize_experts`): what bitsandbytes leaves in bf16."""
    recipe = tmp_path_factory.mktemp("recipe") / "sft_qlora_bnb_only.yaml"
    lines = PAPER.read_text(encoding="utf-8").splitlines()
    recipe.write_text("\n".join(line for line in lines if not line.startswith("quantize_experts:")), encoding="utf-8")
    return estimate_memory(recipe)  # Mixtral-8x7B config shipped with bimedix: works offline


def test_paper_recipe_quantizes_experts_and_attention():
    report = estimate_memory(PAPER)
    counts, by_part = report["parameters"]["counts"], report["parameters"]["by_part"]
    assert by_part["experts"] == pytest.approx(counts["experts"] * NF4_BYTES)
    assert by_part["attention"] == pytest.approx(counts["attention"] * NF4_BYTES)
    assert report["totals"]["all"] < 48 * 2**30  # fits an 80 GB A100 with room, one process, no sharding


def test_bnb_only_paper_recipe_counts_mixtral_parts_and_keeps_experts_bf16(paper_report):
    params = paper_report["parameters"]
    counts = params["counts"]
    assert counts["experts"] == 32 * 8 * 3 * 4096 * 14336
    assert counts["router"] == 32 * 8 * 4096
    assert counts["attention"] == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096)
    assert counts["embeddings"] == 2 * 32000 * 4096
    # bitsandbytes quantizes the attention Linears only; experts and router stay bf16
    assert params["by_part"]["experts"] == counts["experts"] * 2
    assert params["by_part"]["attention"] == pytest.approx(counts["attention"] * NF4_BYTES)
    assert params["by_storage"]["nf4"] == pytest.approx(counts["attention"] * NF4_BYTES)
    assert any("stay in the compute dtype" in note for note in paper_report["notes"])
    trainable = paper_report["trainable"]
    assert trainable["parameters"] == 1_770_029_056
    assert trainable["weights"] == trainable["parameters"] * 2  # QLoRA adapters in bf16
    assert trainable["optimizer"] == 2 * trainable["weights"]
    acts = paper_report["activations"]
    assert acts["checkpointed"] < acts["full"] and paper_report["micro_batch"]["activation_checkpointing"]
    assert paper_report["totals"]["all"] == sum(v for k, v in paper_report["totals"].items() if k != "all")


def test_bimedix_4bit_experts_change_the_storage(paper_report):
    from bimedix.training.memory import parameter_bytes, parameter_parts
    from bimedix.training.targets import meta_model

    model = meta_model("mixtral")
    parts = parameter_parts(model)
    plain = parameter_bytes(model, parts, torch.bfloat16, "4bit")
    folded = parameter_bytes(model, parts, torch.bfloat16, "4bit", quantize_experts=True)
    assert folded["by_part"]["experts"] == pytest.approx(plain["by_part"]["experts"] / 2 * NF4_BYTES)
    assert folded["by_part"]["router"] == plain["by_part"]["router"]


def test_tiny_recipe_full_precision_adapter_states():
    report = estimate_memory(TINY)
    assert report["quantization"] is None and report["parameters"]["by_storage"].keys() == {"float32"}
    trainable = report["trainable"]
    assert trainable["weights"] == 4 * trainable["parameters"] and trainable["expert_lora"] > 0
    assert not report["notes"][1:]  # no bitsandbytes caveat without quantization
    assert "Total per process" in format_report(report)


def test_activation_estimate_scales_with_tokens():
    config = tiny_config("mixtral")
    one = activation_bytes(config, 1, 128, torch.bfloat16)
    four = activation_bytes(config, 4, 128, torch.bfloat16)
    assert four["per_layer"] == 4 * one["per_layer"] and four["logits"] == 4 * 128 * 32000 * 8


def test_cli_estimate_memory(capsys):
    from bimedix.cli import main

    assert main(["estimate-memory", "--recipe", str(TINY), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "tiny:mixtral"
