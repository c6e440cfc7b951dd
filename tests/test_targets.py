"""LoRA target resolution: presets per architecture, explicit lists, errors, the real Mixtral-8x7B count."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from bimedix.training.moe.targets import (
    build_lora_config,
    describe_targets,
    find_targets,
    lora_table,
    meta_model,
)
from bimedix.training.tiny import build_tiny_model

ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
MOE_ALL = ATTN | {"router", "experts"}
CASES = [
    ("mixtral", "paper", {"q_proj", "k_proj", "v_proj", "router", "experts"}),
    ("mixtral", "attention", ATTN),
    ("mixtral", "experts", {"experts"}),
    ("mixtral", "all", MOE_ALL),
    ("qwen2_moe", "paper", {"q_proj", "k_proj", "v_proj", "router", "experts"}),
    ("qwen2_moe", "all", MOE_ALL | {"shared_experts"}),
    ("qwen3_moe", "paper", {"q_proj", "k_proj", "v_proj", "router", "experts"}),
    ("qwen3_moe", "experts", {"experts"}),
    ("olmoe", "paper", {"q_proj", "k_proj", "v_proj", "router", "experts"}),
    ("olmoe", "all", MOE_ALL),
    ("llama", "attention", ATTN),
    ("llama", "all", ATTN | {"mlp"}),
]


@pytest.mark.parametrize(("arch", "preset", "groups"), CASES)
def test_preset_adapts_exactly_its_groups(arch, preset, groups):
    model = build_tiny_model(arch)
    config = build_lora_config(model, preset, r=4, alpha=8)
    rows, trainable, total = lora_table(model, config)
    assert {row["group"] for row in rows} == groups
    assert trainable == sum(row["lora_params"] for row in rows) and 0 < trainable < total
    # every weight of the chosen groups is adapted, in every layer
    expected = {t.name for t in find_targets(build_tiny_model(arch)) if t.group in groups}
    assert {row["name"] for row in rows} == expected
    if {"router", "experts"} & groups:
        assert config.lora_dropout == 0.0 and config.target_parameters


def test_fused_experts_and_router_are_parameters_with_their_shapes():
    targets = {t.name: t for t in find_targets(build_tiny_model("mixtral"))}
    gate_up = targets["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gate_up.kind, gate_up.group, gate_up.shape) == ("parameter", "experts", (4, 64, 16))
    assert targets["model.layers.1.mlp.gate.weight"].group == "router"
    assert targets["model.layers.0.self_attn.k_proj"].kind == "module"


def test_per_expert_linear_layout_and_shared_expert_gate():
    """Older layouts: `block_sparse_moe.experts.N.w1/w2/w3` Linears and a Linear router `gate`."""
    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 2, bias=False)
            self.experts = nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(8, 4), "w2": nn.Linear(4, 8)})
                                         for _ in range(2))
            self.shared_expert_gate = nn.Linear(8, 1)

    layer = nn.ModuleDict({"self_attn": nn.ModuleDict({"q_proj": nn.Linear(8, 8)}),
                           "block_sparse_moe": Moe()})
    model = nn.ModuleDict({"layers": nn.ModuleList([layer])})
    groups = {t.name: (t.kind, t.group) for t in find_targets(model)}
    assert groups == {
        "layers.0.self_attn.q_proj": ("module", "q_proj"),
        "layers.0.block_sparse_moe.gate": ("module", "router"),
        "layers.0.block_sparse_moe.experts.0.w1": ("module", "experts"),
        "layers.0.block_sparse_moe.experts.0.w2": ("module", "experts"),
        "layers.0.block_sparse_moe.experts.1.w1": ("module", "experts"),
        "layers.0.block_sparse_moe.experts.1.w2": ("module", "experts"),
        "layers.0.block_sparse_moe.shared_expert_gate": ("module", "shared_experts"),
    }
    config = build_lora_config(model, ["experts", "router"], r=2)
    assert sorted(config.target_modules) == ["gate", "w1", "w2"]


@pytest.mark.parametrize("preset", ["paper", "experts"])
def test_dense_model_has_no_experts_error_says_what_it_has(preset):
    with pytest.raises(ValueError,
                       match=r"has none \(it has: \['q_proj', 'k_proj', 'v_proj', 'o_proj', 'mlp'\]\)"):
        build_lora_config(build_tiny_model("llama"), preset)


def test_unknown_preset_and_explicit_lists(caplog):
    model = build_tiny_model("mixtral")
    with pytest.raises(ValueError, match="Unknown LoRA preset 'nope'"):
        build_lora_config(model, "nope")
    with caplog.at_level(logging.WARNING):
        config = build_lora_config(model, None, target_modules=["o_proj"],
                                   target_parameters=["mlp.gate.weight"],
                                   dropout=0.1)
    assert set(config.target_modules) == {"o_proj"} and config.target_parameters == ["mlp.gate.weight"]
    assert config.lora_dropout == 0.0 and "not supported on target_parameters" in caplog.text
    rows, _, _ = lora_table(model, config)
    assert {row["group"] for row in rows} == {"o_proj", "router"}


def test_real_mixtral_8x7b_shape_trainable_count_at_r128():
    model = meta_model("mistralai/Mixtral-8x7B-v0.1")  # shipped config, meta device
    assert next(model.parameters()).device == torch.device("meta")
    rows, trainable, total = lora_table(model, build_lora_config(model, "all", r=128, alpha=64))
    per_group = describe_targets(rows)
    paper = trainable - per_group["o_proj"]
    attention = sum(per_group[g] for g in ATTN)
    print(f"\nMixtral-8x7B r=128: attention+router+experts (incl. o_proj) {trainable:,} "
          f"({100 * trainable / total:.2f}%); paper "
          f"q,k,v+router+experts {paper:,}; attention only {attention:,}")
    assert trainable == 1_803_583_488  # STACK-NOTES: 1.804 B
    assert paper == 1_770_029_056  # ~3.7% of 48.5 B: the paper's "approximately 4%"
    assert attention == 109_051_904  # STACK-NOTES: 0.109 B
    assert per_group["experts"] == 32 * (8 * 128 * (4096 + 2 * 14336) + 8 * 128 * (14336 + 4096))


def test_cli_targets_json(capsys):
    from bimedix.cli import main

    assert main(["targets", "qwen2_moe", "--preset", "all", "--r", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "experts.gate_up_proj" in out["target_parameters"]
    assert "shared_expert_gate" in out["target_modules"]
    assert main(["targets", "llama", "--preset", "experts"]) == 2
    assert "has none" in capsys.readouterr().err
