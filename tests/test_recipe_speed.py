"""benchmarks/recipe_speed.py --cpu: the paper recipe at toy sizes and two depths, every figure it prints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "recipe_speed.py"
RECIPE = REPO / "recipes" / "bimedix-mixtral" / "sft_qlora.yaml"


def test_recipe_speed_cpu_prints_every_figure(tmp_path):
    out = tmp_path / "speed.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--recipe", str(RECIPE), "--cpu", "--layers", "1",
                           "2", "--warmup", "1", "--steps", "2", "--profile_steps", "1", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    text = done.stdout
    assert done.returncode == 0, (text + done.stderr)[-3000:]
    for expected in ("non-padding tokens/s", "MFU", "model FLOPs/token", "estimate-memory", "Extrapolation",
                     "steps/epoch", "h on 8 devices", "host-device syncs per step", "dequantization share"):
        assert expected in text, expected
    result = json.loads(out.read_text())
    runs, summary = result["runs"], result["summary"]
    assert [run["depth"] for run in runs] == [1, 2] and summary["full_depth"] == 32
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] and summary["hours_8"] > 0
    # the recipe's optimization semantics: 2 samples per device and step in one padding-free micro-batch
    settings = runs[0]["settings"]
    assert (settings["per_device_train_batch_size"], settings["gradient_accumulation_steps"]) == (2, 1)
    assert settings["padding_free"] and settings["expert_lora"] == "folded"
    assert runs[0]["slots_per_step"] == runs[0]["tokens_per_step"]  # no pad token
    assert settings["learning_rate"] == 2e-4 and settings["lr_scheduler_type"] == "cosine"
    assert settings["quantize_experts"] == "nf4" and settings["load_in_4bit"]
    assert settings["attn_implementation"] == "sdpa"  # the recipe's
    # rows follow the BiMed1.3M histogram, scaled by 1/8 on CPU: mean 482 -> about 60 tokens
    assert 20 < runs[0]["tokens_per_step"] / 2 < 150
    profile = summary["profile"]
    # waits for the device per step, by caller: TRL's metric reads are left, none is bimedix's
    assert profile["top"] and any(source.startswith("trl/") for source in profile["syncs_per_step"])
    assert not any(source.startswith(("bimedix/", "benchmarks/")) for source in profile["syncs_per_step"])
    assert 0 < profile["dequantize_share"] < 1  # NF4 experts and Linear4bit weights dequantize every step
    assert runs[1]["estimate"]["all"] > runs[0]["estimate"]["all"]
    again = subprocess.run([sys.executable, str(SCRIPT), "--recipe", str(RECIPE), "--cpu", "--json",
                            str(out)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr


def _benchmark():
    spec = importlib.util.spec_from_file_location("recipe_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_model_is_built_in_the_recipes_storage_format_with_its_attention_kernel(tmp_path, attention):
    import bitsandbytes as bnb

    from bimedix.training.moe.experts import fused_experts, is_quantized

    bench = _benchmark()
    args = bench.parse_args(["--recipe", str(RECIPE), "--cpu", "--", "--attn_implementation", attention])
    _, _, model_args, _, bimedix = bench.recipe_args(args, str(tmp_path), steps=1)
    model = bench.build_model(bench.recipe_config(args, layers=2), model_args, bimedix, torch.device("cpu"))
    assert model.config._attn_implementation == attention
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not [name for name, tensor in tensors.items() if tensor.is_meta or tensor.device.type != "cpu"]
    base = model.get_base_model()
    assert len(base.model.layers) == 2
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)  # load_in_4bit
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.bnb_quantized
    experts = fused_experts(model)  # quantize_experts: nf4, every layer
    assert len(experts) == 2 and all(is_quantized(module, name) for module in experts.values()
                                     for name in ("gate_up_proj", "down_proj"))
