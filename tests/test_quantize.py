"""4-bit (NF4, double-quantized) fused experts: accuracy against bitsandbytes' Linear4bit, memory at rest,
LoRA training on top, adapters that load on an unquantized base, the merge path, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from lora_support import updated_lora_groups  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from bimedix.training.moe.expert_lora import set_expert_lora_mode  # noqa: E402
from bimedix.training.moe.quantize import (  # noqa: E402
    dequantize_experts,
    expert_parameter_bytes,
    fused_experts,
    is_quantized,
    load_model_with_4bit_experts,
    quantize_experts,
)
from bimedix.training.tiny import build_tiny_model  # noqa: E402

TARGET_MODULES = ["q_proj", "k_proj", "v_proj"]
TARGET_PARAMETERS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# rows of at least one 64-value block, so that bitsandbytes' Linear4bit is itself exact on CPU
WIDE = {"mixtral": dict(hidden_size=64, intermediate_size=64),
        "qwen2_moe": dict(hidden_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=64)}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _linear4bit_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes' own `Linear4bit` (NF4, double quant) computes with ``weight``: its forward on I."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    layer = layer.to("cpu")
    with torch.no_grad():
        return layer(torch.eye(weight.shape[1])).T


def _lora_model(model, quantize: bool, **lora_kwargs):
    """LoRA on attention, router and experts; then (as `quantize_experts` asks) the experts go 4-bit."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, target_parameters=TARGET_PARAMETERS,
                        lora_dropout=0.0, **lora_kwargs)
    model = get_peft_model(model, config)
    if quantize:
        quantize_experts(model)
    return model


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_logit_error_is_that_of_linear4bit(arch):
    reference = build_tiny_model(arch, seed=0, **WIDE[arch])
    ids = _ids()
    expected = _logits(reference, ids)

    linear4bit = copy.deepcopy(reference)
    with torch.no_grad():
        for experts in fused_experts(linear4bit).values():
            for name in ("gate_up_proj", "down_proj"):
                stack = getattr(experts, name)
                stack.copy_(torch.stack([_linear4bit_roundtrip(w) for w in stack]))
    quantized = copy.deepcopy(reference)
    names = quantize_experts(quantized)

    assert len(names) == 2 * reference.config.num_hidden_layers
    error_linear4bit = (_logits(linear4bit, ids) - expected).abs()
    error_quantized = (_logits(quantized, ids) - expected).abs()
    assert error_quantized.max() > 0
    assert error_quantized.max() <= 1.25 * error_linear4bit.max()
    assert error_quantized.mean() <= 1.25 * error_linear4bit.mean()


def test_expert_bytes_at_rest_are_4x_lower_than_bf16():
    model = build_tiny_model("mixtral").to(torch.bfloat16)
    dense = expert_parameter_bytes(model)
    quantize_experts(model)
    # packed 4-bit values + per-block absmax (8-bit, double quantized): 2 / (0.5 + 1/64 + ...) ≈ 3.9x
    assert dense / expert_parameter_bytes(model, codebooks=False) > 3.5
    # bitsandbytes also keeps two constant code books (16 + 256 values) per parameter; on 64-wide layers
    # they are already small
    wide = build_tiny_model("mixtral", **WIDE["mixtral"]).to(torch.bfloat16)
    dense = expert_parameter_bytes(wide)
    quantize_experts(wide)
    assert dense / expert_parameter_bytes(wide) > 3.5
    assert all(p.dtype != torch.float32 for p in wide.parameters() if p.is_floating_point())


@pytest.mark.parametrize("mode", ["peft", "folded"])
def test_lora_on_4bit_experts_trains_every_group(mode):
    model = _lora_model(build_tiny_model("mixtral", seed=0), quantize=True)
    packed = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert len(packed) == 2 * model.config.num_hidden_layers
    assert set_expert_lora_mode(model, mode) == 2 * model.config.num_hidden_layers
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    groups = {"q_proj", "k_proj", "v_proj", "mlp.gate.", "mlp.experts.lora", "mlp.experts.base_layer.lora"}
    assert {g for g in groups if any(g in n for n in before)} == groups
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    for step in range(2):
        ids = _ids(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not update"
        elif name in packed:
            assert torch.equal(param, packed[name])


def test_adapter_has_unquantized_keys_and_reloads_on_unquantized_base(tmp_path):
    ids = _ids(1)
    dense_base = build_tiny_model("mixtral", seed=0)
    quantized_base = copy.deepcopy(dense_base)
    quantize_experts(quantized_base)
    base_error = (_logits(quantized_base, ids) - _logits(dense_base, ids)).abs().mean()

    torch.manual_seed(0)
    trained = _lora_model(copy.deepcopy(dense_base), quantize=True)
    set_expert_lora_mode(trained, "folded")
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        trained(input_ids=_ids(step), labels=_ids(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    reference = _lora_model(copy.deepcopy(dense_base), quantize=False)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(trained).items()}
    assert shapes == {k: v.shape for k, v in get_peft_model_state_dict(reference).items()}

    trained.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(dense_base), tmp_path / "adapter")
    quantized_logits = _logits(trained, ids)
    dense_logits = _logits(reloaded, ids)
    assert (dense_logits - _logits(dense_base, ids)).abs().mean() > 5 * base_error  # the adapter matters
    # the trained adapter carries the base's quantization error over, about unchanged (mean: a flipped route
    # is not noise); the exact check below is the proof that the adapter means the same on both bases
    assert (dense_logits - quantized_logits).abs().mean() <= 3 * base_error
    # same adapter, same meaning: quantizing the reloaded model gives the trained one
    quantize_experts(reloaded)
    torch.testing.assert_close(_logits(reloaded, ids), quantized_logits, atol=1e-5, rtol=1e-5)


def test_merge_path_dequantizes_experts():
    ids = _ids(2)
    torch.manual_seed(0)
    model = _lora_model(build_tiny_model("qwen2_moe", seed=0), quantize=True, init_lora_weights=False)
    set_expert_lora_mode(model, "folded")
    expected = _logits(model, ids)

    names = dequantize_experts(model)
    merged = model.merge_and_unload()

    assert len(names) == 2 * merged.config.num_hidden_layers
    assert not any(is_quantized(e, n) for e in fused_experts(merged).values()
                   for n in ("gate_up_proj", "down_proj"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-4, rtol=1e-4)


def test_load_model_with_4bit_experts(tiny_model_dir):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, target_parameters=TARGET_PARAMETERS,
                        lora_dropout=0.0)
    model = load_model_with_4bit_experts(tiny_model_dir, device="cpu", dtype=torch.bfloat16,
                                         peft_config=config)
    experts = fused_experts(model)
    assert experts and all(is_quantized(e, "gate_up_proj") and is_quantized(e, "down_proj")
                           for e in experts.values())
    assert sum("experts" in n and "lora_A" in n for n, _ in model.named_parameters()) == 2 * len(experts)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n
               and p.is_floating_point())
    assert torch.isfinite(_logits(model, _ids())).all()


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="no fused MoE experts"):
        quantize_experts(build_tiny_model("llama"))
    with pytest.raises(ValueError, match="dtype torch.float64"):
        quantize_experts(build_tiny_model("mixtral").to(torch.float64))
    with torch.device("meta"):
        meta = build_tiny_model("mixtral")
    with pytest.raises(ValueError, match="meta device"):
        quantize_experts(meta)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_experts(build_tiny_model("mixtral"), quant_type="int4")
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.45.0")
    with pytest.raises(RuntimeError, match="pip install -U 'bitsandbytes>="):
        quantize_experts(build_tiny_model("mixtral"))


def test_tiny_recipe_with_4bit_experts_trains_every_group(tmp_path):
    from bimedix.resources import resource_path
    from bimedix.training.memory import estimate_memory
    from bimedix.training.moe.expert_lora import ExpertLoraWrapper
    from bimedix.training.sft import main, parse_args

    recipe = str(resource_path("recipes", "tiny", "sft_4bit_experts.yaml"))
    trainer = main(*parse_args(["--config", recipe, "--output_dir", str(tmp_path), "--max_steps", "2",
                                "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                                "--max_length", "96", "--save_strategy", "no", "--router_report", "false"]))
    model = trainer.model
    experts = fused_experts(model)
    assert len(experts) == 2 and all(is_quantized(e, "gate_up_proj") and is_quantized(e, "down_proj")
                                     for e in experts.values())
    wrappers = [m for m in model.modules() if isinstance(m, ExpertLoraWrapper)]
    assert len(wrappers) == 4 and {m.expert_lora_mode for m in wrappers} == {"folded"}
    assert updated_lora_groups(model) == {"q_proj": True, "k_proj": True, "v_proj": True, "router": True,
                                          "experts": True}
    # loads on the bf16 base
    adapter = PeftModel.from_pretrained(build_tiny_model("mixtral", seed=42), tmp_path)
    # q, k, v, router, gate_up, down
    assert sum("lora_A" in n for n, _ in adapter.named_parameters()) == 2 * 6

    report = estimate_memory(recipe)
    assert report["settings"]["quantize_experts"] and report["parameters"]["by_storage"].get("nf4", 0) > 0

    from bimedix.training.merge import merge_adapter

    # not inside the adapter folder, an input of the merge
    output = tmp_path.with_name(f"{tmp_path.name}-merged")
    merged = merge_adapter("tiny:mixtral:42", tmp_path, output, quantize_experts="nf4")
    assert merged["max_abs_diff_merged_vs_adapter"] <= 1e-3 < merged["max_abs_diff_adapter_vs_base"]
    assert merged["provenance"] == "fingerprint"  # sft recorded the base before quantizing its experts
    assert (output / "model.safetensors").is_file()
