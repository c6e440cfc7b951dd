"""Memory estimates from a recipe's model config (meta device): parts, dtypes, sharding, GPU fit,
suggestions."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from bimedix.resources import resource_path
from bimedix.training.memory import (
    CUDA_RESERVE,
    GIB,
    NF4_BYTES,
    STRATEGIES,
    Settings,
    activation_bytes,
    checkpointed_layers,
    estimate,
    estimate_memory,
    faster_checkpointing,
    fewer_micro_batches,
    format_report,
    gpu_memory,
    model_facts,
    read_accelerate_config,
    suggest,
)
from bimedix.training.moe.targets import build_lora_config, meta_model

PAPER = resource_path("recipes", "bimedix-mixtral", "sft_qlora.yaml")
TINY = resource_path("recipes", "tiny", "sft.yaml")
CONFIGS = resource_path("recipes", "accelerate_configs")
FULL_QLORA = ["--load_in_4bit", "true", "--quantize_experts", "nf4"]  # bitsandbytes Linears + bimedix experts
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper_report(tmp_path_factory):
    """The paper recipe with `load_in_4bit` alone (no `quantize_experts`): what bitsandbytes leaves in
    bf16."""
    recipe = tmp_path_factory.mktemp("recipe") / "sft_qlora_bnb_only.yaml"
    lines = PAPER.read_text(encoding="utf-8").splitlines()
    recipe.write_text("\n".join(line for line in lines if not line.startswith("quantize_experts:")),
                      encoding="utf-8")
    return estimate_memory(recipe)  # Mixtral-8x7B config shipped with bimedix: works offline


@pytest.fixture(scope="module")
def mixtral_facts():
    model = meta_model("mistralai/Mixtral-8x7B-v0.1")
    return model_facts(model, peft_config=build_lora_config(model, "paper", r=128, alpha=64))


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
    assert trainable["weights"] == trainable["parameters"] * 2  # QLoRA adapters in bf16 (TRL casts them)
    assert trainable["optimizer"] == 2 * trainable["weights"]
    acts = paper_report["activations"]
    assert acts["checkpointed"] < acts["full"] and paper_report["settings"]["checkpointing"]
    totals = paper_report["totals"]
    assert totals["all"] == sum(v for k, v in totals.items() if k != "all")


def test_4bit_linears_and_4bit_experts_together_leave_only_router_and_embeddings_bf16():
    report = estimate_memory(PAPER, FULL_QLORA)
    by_part, counts = report["parameters"]["by_part"], report["parameters"]["counts"]
    assert by_part["experts"] == pytest.approx(counts["experts"] * NF4_BYTES)
    assert by_part["attention"] == pytest.approx(counts["attention"] * NF4_BYTES)
    assert by_part["router"] == counts["router"] * 2 and by_part["embeddings"] == counts["embeddings"] * 2
    assert not any("stay in the compute dtype" in note for note in report["notes"])


def test_paper_recipe_with_4bit_experts_fits_80gb_on_8_gpus_with_room():
    """The issue's done-when: the paper's recipe on the paper's hardware (8 x 80 GB, ZeRO-2)."""
    report = estimate_memory(PAPER, FULL_QLORA, num_processes=8, accelerate_config=CONFIGS
                             / "deepspeed_zero2.yaml",
                             gpu=80)
    assert report["settings"]["num_processes"] == 8
    assert report["settings"]["sharding"]["name"] == "DeepSpeed ZeRO-2"
    assert report["stated_gpu"]["fits"] and report["totals"]["all"] < 45 * GIB
    eighty = next(row for row in report["gpus"] if row["gpu"] == "80 GB")
    assert eighty["fits"] and eighty["room"] > 30 * GIB
    # and even plain DDP (nothing sharded) fits
    assert estimate_memory(PAPER, FULL_QLORA, num_processes=8, gpu=80)["stated_gpu"]["fits"]


def test_sharding_divides_what_each_strategy_shards(mixtral_facts):
    base = Settings(quantization="4bit", quantize_experts=True, max_length=2048, num_processes=8)
    ddp = estimate(mixtral_facts, replace(base, sharding=STRATEGIES["ddp"]))
    zero2 = estimate(mixtral_facts, replace(base, sharding=STRATEGIES["zero2"]))
    zero3 = estimate(mixtral_facts, replace(base, sharding=STRATEGIES["zero3"]))
    fsdp = estimate(mixtral_facts, replace(base, sharding=STRATEGIES["fsdp"]))
    n = mixtral_facts["trainable"]
    # DDP: nothing sharded, plus the all-reduce bucket copy of the gradients
    assert ddp["trainable"]["gradients"] == ddp["trainable"]["ddp_buckets"] == n * 2
    assert ddp["totals"]["parameters"] == ddp["parameters"]["total"]
    # ZeRO-2: bf16 weights kept whole, bf16 gradients and fp32 master + fp32 grads + 2 AdamW states over 8
    assert zero2["trainable"]["weights"] == n * 2 and zero2["trainable"]["gradients"] == n * 2 / 8
    assert zero2["trainable"]["optimizer"] == pytest.approx(n * 16 / 8)
    assert zero2["totals"]["parameters"] == ddp["totals"]["parameters"]
    # ZeRO-3 / FSDP: parameters too, with two gathered layers in flight
    for sharded in (zero3, fsdp):
        assert sharded["totals"]["parameters"] == pytest.approx(ddp["parameters"]["total"] / 8)
        assert sharded["transients"]["gathered_layers"] > 0
    assert ddp["totals"]["all"] > zero2["totals"]["all"] > zero3["totals"]["all"]


def test_shipped_accelerate_configs_are_read():
    expected = {"ddp.yaml": ("DDP", False, False), "deepspeed_zero2.yaml": ("DeepSpeed ZeRO-2", False, True),
                "deepspeed_zero3.yaml": ("DeepSpeed ZeRO-3", True, True),
                "fsdp.yaml": ("FSDP FULL_SHARD", True, True)}
    for name, (label, params, grads) in expected.items():
        sharding, processes = read_accelerate_config(CONFIGS / name)
        assert (sharding.name, sharding.parameters, sharding.gradients,
                processes) == (label, params, grads, 8), name
    assert read_accelerate_config(CONFIGS / "fsdp.yaml", 2)[1] == 2  # --num-processes wins over the file
    assert read_accelerate_config(None,
                                  4)[0].name == "DDP" and read_accelerate_config(None)[0].kind == "single"


def test_bad_accelerate_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no such file and not one of"):
        read_accelerate_config(tmp_path / "missing.yaml")
    bad = tmp_path / "tpu.yaml"
    bad.write_text("distributed_type: XLA\nnum_processes: 8\n")
    with pytest.raises(ValueError, match=r"tpu.yaml: distributed_type='XLA' is not handled"):
        read_accelerate_config(bad)


def test_a_run_that_does_not_fit_gets_the_nearest_setting_that_does(mixtral_facts):
    """The paper recipe as it was (bf16 experts under load_in_4bit), DDP on 8 x 80 GB: too big."""
    settings = Settings(quantization="4bit", max_length=2048, num_processes=8, sharding=STRATEGIES["ddp"])
    report = estimate(mixtral_facts, settings)
    assert report["totals"]["all"] + CUDA_RESERVE > gpu_memory(80)
    found = suggest(mixtral_facts, settings, gpu_memory(80))
    assert found is not None and len(found["changes"]) == 1
    assert found["total"] + CUDA_RESERVE <= gpu_memory(80)
    assert estimate(mixtral_facts, found["settings"])["totals"]["all"] == found["total"]
    # nothing that keeps the model on one 16 GB GPU
    assert suggest(mixtral_facts, replace(settings, num_processes=1, sharding=STRATEGIES["single"]),
                   gpu_memory(16)) is None


def test_fold_and_quantize_change_the_expert_transient(mixtral_facts):
    largest = mixtral_facts["largest_expert_parameter"]
    assert largest == 8 * 2 * 14336 * 4096  # gate_up_proj of one layer
    peft_bf16 = estimate(mixtral_facts, Settings())["transients"]["expert_weights"]
    folded_nf4 = estimate(mixtral_facts, Settings(quantize_experts=True, expert_lora="folded"))
    folded_bf16 = estimate(mixtral_facts, Settings(expert_lora="folded"))
    peft_nf4 = estimate(mixtral_facts, Settings(quantize_experts=True))["transients"]["expert_weights"]
    assert peft_bf16 == 2 * largest * 2 and peft_nf4 == 3 * largest * 2  # ΔW, W + ΔW (and the dequantized W)
    # with checkpointing (the default) the recomputation keeps the layer's dequantized experts for backward
    assert folded_nf4["transients"]["expert_weights"] == 3 * 14336 * 4096 * 8 * 2
    unchecked = estimate(mixtral_facts, Settings(quantize_experts=True, expert_lora="folded",
                                                 checkpointing=False))
    assert unchecked["transients"]["expert_weights"] == largest * 2
    assert "expert_weights" not in folded_bf16["transients"]


def test_every_n_layers_keeps_the_other_layers_whole_and_offload_moves_inputs_to_the_host(mixtral_facts):
    import torch

    dims = mixtral_facts["dims"]
    tokens, size = 2 * 2048, 2
    layer_input = tokens * dims["hidden"] * size
    every = {n: activation_bytes(dims, 2, 2048, torch.bfloat16, every=n)["checkpointed"] for n in (1, 2, 32)}
    base = activation_bytes(dims, 2, 2048, torch.bfloat16)
    layer, logits = base["per_layer"], base["logits"]
    assert every[1] == base["checkpointed"] == 32 * layer_input + layer + logits
    assert every[2] == 16 * layer_input + 16 * layer + layer + logits  # layers 0, 2, 4... checkpointed
    assert every[32] == layer_input + 31 * layer + layer + logits  # layer 0 only
    offloaded = activation_bytes(dims, 2, 2048, torch.bfloat16, every=2, offload=True)["checkpointed"]
    assert offloaded == every[2] - 16 * layer_input


def test_paper_recipe_on_80gb_is_told_the_fewest_recomputed_layers_leaving_10_percent(mixtral_facts, capsys):
    report = estimate_memory(PAPER, num_processes=8, accelerate_config=CONFIGS / "deepspeed_zero2.yaml",
                             gpu=80)
    assert report["recomputed_layers"] == 32  # the recipe checkpoints every layer
    faster = report["stated_gpu"]["faster"]
    assert faster["recomputed"] < 32 and "every_n_layers" in faster["change"]
    assert faster["total"] + CUDA_RESERVE <= 0.9 * gpu_memory(80)
    # the next setting with fewer recomputed layers would not leave 10% free
    settings = Settings(**{**report["settings"], "sharding": STRATEGIES["zero2"]})
    found = faster_checkpointing(mixtral_facts, settings, gpu_memory(80))
    assert found["total"] == faster["total"]
    fewer = [replace(settings, checkpointing=False)] + [
        replace(settings, checkpoint_every=every) for every in range(2, 33)
        if checkpointed_layers(32, every) < faster["recomputed"]]
    for setting in fewer:
        assert estimate(mixtral_facts, setting)["totals"]["all"] + CUDA_RESERVE > 0.9 * gpu_memory(80)
    # the recipe key is read: half the layers checkpointed needs more memory than all
    every_2 = estimate_memory(PAPER, ["--activation_checkpointing_kwargs", '{"every_n_layers": 2}'],
                              num_processes=8, accelerate_config="zero2")
    assert every_2["recomputed_layers"] == 16
    assert every_2["totals"]["activations"] > report["totals"]["activations"]
    # a 48 GB GPU has no room to keep any layer whole
    on_48gb = estimate_memory(PAPER, num_processes=8, accelerate_config="zero2", gpu=48)
    assert on_48gb["stated_gpu"]["fits"] and on_48gb["stated_gpu"]["faster"] is None
    from bimedix.cli import main

    assert main(["estimate-memory", "--recipe", str(PAPER), "--num-processes", "8", "--accelerate-config",
                 "zero2", "--gpu", "80"]) == 0
    assert "Faster and still 10% of the GPU free: every_n_layers" in capsys.readouterr().out


@pytest.mark.parametrize("recipe, gb, samples", [("qwen3-30b-a3b", 80, 16), ("qwen3-30b-a3b", 24, 2),
                                                 ("olmoe-1b-7b", 16, 8)])
def test_the_largest_padding_free_micro_batch_that_leaves_10_percent_is_named(recipe, gb, samples, capsys):
    """The recipes' 16 samples per step in as few micro-batches as fit (a divisor of 16, each sample counted
    at max_length), so every NF4 expert is dequantized fewer times per step; the training is the same."""
    path = resource_path("recipes", recipe, "sft_qlora.yaml")
    report = estimate_memory(path, gpu=gb)
    assert report["micro_batches"] == 16 and report["settings"]["batch_size"] == 1
    fewer = report["stated_gpu"]["fewer_micro_batches"]
    assert fewer["samples"] == samples and fewer["micro_batches"] == 16 // samples
    assert fewer["change"] == (f"--per_device_train_batch_size {samples} --gradient_accumulation_steps "
                               f"{16 // samples} --padding_free true")
    assert fewer["total"] + CUDA_RESERVE <= 0.9 * gpu_memory(gb)
    # what the change gives, estimated from the recipe with those flags: the same bytes
    changed = estimate_memory(path, fewer["change"].split(), gpu=gb)
    assert changed["totals"]["all"] == fewer["total"] and changed["settings"]["padding_free"]
    assert changed["stated_gpu"]["fewer_micro_batches"] is None or samples < 16  # nothing larger fits
    if samples < 16:  # the next divisor of 16 does not leave 10% free
        larger = estimate_memory(path, ["--per_device_train_batch_size", str(2 * samples),
                                        "--gradient_accumulation_steps", str(8 // samples), "--padding_free",
                                        "true"])
        assert larger["totals"]["all"] + CUDA_RESERVE > 0.9 * gpu_memory(gb)
    from bimedix.cli import main

    assert main(["estimate-memory", "--recipe", str(path), "--gpu", str(gb)]) == 0
    out = capsys.readouterr().out
    assert (f"Fewer micro-batches, still 10% of the GPU free: {fewer['change']} ({16 // samples} per "
            "optimizer step instead of 16, the same samples;") in out


def test_fewer_micro_batches_is_silent_with_one_micro_batch_and_keeps_packing(mixtral_facts):
    # the paper recipe trains its 2 samples per step and GPU in one micro-batch already
    assert estimate_memory(PAPER, num_processes=8, accelerate_config="zero2",
                           gpu=80)["stated_gpu"]["fewer_micro_batches"] is None
    settings = Settings(batch_size=1, max_length=512, quantize_experts=True, quantization="4bit",
                        expert_lora="folded")
    packed = fewer_micro_batches(mixtral_facts, settings, gpu_memory(80), 4, packing=True)
    assert packed["change"] == "--per_device_train_batch_size 4 --gradient_accumulation_steps 1"
    assert packed["settings"].batch_size == 4 and not packed["settings"].padding_free
    # TRL's bfd packing flattens a micro-batch's rows into one padding-free row: masked like one
    report = estimate_memory(TINY, ["--packing", "true", "--per_device_train_batch_size", "4"])
    assert report["settings"]["padding_free"]


def test_tiny_recipe_full_precision_adapter_states():
    report = estimate_memory(TINY)
    assert report["settings"]["quantization"] is None
    assert report["parameters"]["by_storage"].keys() == {"float32"}
    trainable = report["trainable"]
    assert trainable["weights"] == 4 * trainable["parameters"] and trainable["expert_lora"] > 0
    assert not report["notes"][1:]  # no bitsandbytes caveat without quantization
    text = format_report(report)
    assert "Per GPU:" in text and "141 GB" in text and "H200" in text


def test_activation_estimate_scales_with_tokens_and_the_lm_head_never_holds_the_logits(mixtral_facts):
    import torch

    dims = mixtral_facts["dims"]
    one = activation_bytes(dims, 1, 128, torch.bfloat16)
    four = activation_bytes(dims, 4, 128, torch.bfloat16)
    assert four["per_layer"] == 4 * one["per_layer"]
    # TRL's fused LM head: per token the kept hidden state, its fp32 gradient and bf16 cast, fp32 statistics;
    # plus one logits tile of at most 4096 tokens x 32768 pieces (Mixtral: 32000), never the whole logits
    per_token = 4096 * (2 + 4 + 2) + 32
    assert one["logits"] == 128 * per_token + 128 * 32000 * 2
    long = activation_bytes(dims, 4, 2048, torch.bfloat16)
    assert long["logits"] == 8192 * per_token + 4096 * 32000 * 2
    assert long["logits"] < 8192 * 32000 * 10 / 4  # bf16 logits, the loss's fp32 copy and its gradient
    # padding-free: the 4 samples share one row of 8192 tokens, masked by a boolean row x row mask, which sdpa
    # copies as an additive bf16 mask while it attends
    packed = activation_bytes(dims, 4, 2048, torch.bfloat16, packed=True)
    assert packed["mask"] == 8192 * 8192 * 3 and long["mask"] == 0
    assert packed["checkpointed"] - long["checkpointed"] == packed["mask"] == packed["full"] - long["full"]
    assert activation_bytes(dims, 1, 2048, torch.bfloat16, packed=True)["mask"] == 0  # one sample: causal


def test_cli_estimate_memory(capsys, tmp_path):
    from bimedix.cli import main

    assert main(["estimate-memory", "--recipe", str(TINY), "--json", "--", "--max_length", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "tiny:mixtral" and report["settings"]["max_length"] == 64
    # the paper recipe (full QLoRA) fits an 80 GB GPU on the paper's 8 GPUs, with room
    assert main(["estimate-memory", "--recipe", str(PAPER), "--num-processes", "8", "--gpu", "80"]) == 0
    out = capsys.readouterr().out
    assert "8 process(es), DDP" in out and "does NOT fit" not in out
    row = next(line.split() for line in out.splitlines() if line.startswith("  80 GB"))
    assert row[-3] == "yes" and float(row[-2]) > 20
    # `load_in_4bit` alone leaves the experts bf16: it does not fit, and the nearest fitting setting is named
    bnb_only = tmp_path / "sft_qlora_bnb_only.yaml"
    lines = PAPER.read_text(encoding="utf-8").splitlines()
    bnb_only.write_text("\n".join(line for line in lines if not line.startswith("quantize_experts:")),
                        encoding="utf-8")
    assert main(["estimate-memory", "--recipe", str(bnb_only), "--num-processes", "8", "--gpu", "80"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "Nearest setting that fits" in out and "quantize_experts" in out


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--experts", "nf4", "--hidden", "1024", "--intermediate", "3584"]],
                         ids=["real-size-bf16-experts", "quarter-size-nf4-experts"])
def test_estimate_within_15_percent_of_measured_peak_for_real_mixtral_dimensions(flags):
    """2 Mixtral layers, measured RSS vs estimate: real size (~9 GB of RAM, a few minutes) and, with 4-bit
    experts, a quarter of the width (packing a real-size layer on CPU needs ~11 GB). See
    benchmarks/memory_estimate.py."""
    spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "benchmarks"
                                                  / "memory_estimate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--steps", "1", *flags])
    assert 0.85 <= result["ratio"] <= 1.15, result


def test_mixtral_8x22b_recipe_fits_8x80gb_under_fsdp_and_not_under_ddp():
    recipe = resource_path("recipes", "mixtral-8x22b", "sft_qlora.yaml")
    fsdp = estimate_memory(recipe, accelerate_config=CONFIGS / "fsdp.yaml", gpu=80)
    assert fsdp["settings"]["num_processes"] == 8 and fsdp["settings"]["sharding"]["kind"] == "fsdp"
    assert fsdp["settings"]["quantize_experts"] and fsdp["parameters"]["total"] > 65 * GIB  # > one 80 GB
    assert fsdp["totals"]["parameters"] == pytest.approx(fsdp["parameters"]["total"] / 8)
    assert fsdp["stated_gpu"]["fits"] and fsdp["transients"]["gathered_layers"] > 0
    ddp = estimate_memory(recipe, accelerate_config=CONFIGS / "ddp.yaml", gpu=80)
    assert not ddp["stated_gpu"]["fits"]
    assert any("fsdp.yaml" in change for change in ddp["stated_gpu"]["suggestion"]["changes"])


def test_a_recipe_with_fsdp_is_estimated_sharded_without_an_accelerate_config(tmp_path):
    recipe = tmp_path / "fsdp.yaml"
    shipped = resource_path("recipes", "mixtral-8x22b", "sft_qlora.yaml")
    recipe.write_text(shipped.read_text() + "fsdp: true\n")
    report = estimate_memory(recipe, num_processes=8, gpu=80)
    assert report["settings"]["sharding"]["kind"] == "fsdp" and report["stated_gpu"]["fits"]
    assert estimate_memory(recipe, gpu=80)["settings"]["sharding"]["kind"] == "single"  # one process


def test_recipe_meta_model_builds_the_tiny_config_with_its_overrides_or_names_the_missing_model():
    from bimedix.training.sft import BimedixArguments

    recipe = BimedixArguments(tiny_model="mixtral", tiny_model_config={"num_local_experts": 8})
    model = recipe.meta_model(None)
    assert model.config.num_local_experts == 8
    assert next(model.parameters()).device.type == "meta"
    with pytest.raises(ValueError, match="neither `model_name_or_path` nor `tiny_model`"):
        BimedixArguments().meta_model(None)
