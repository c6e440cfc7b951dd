"""Folded expert LoRA (x·A·B per routed expert) is numerically PEFT's default path: forward and gradients,
on fp32, bf16 and 4-bit experts, for Mixtral and Qwen2-MoE, with PEFT's parameters and keys."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import ParamWrapper

from bimedix.training.moe.expert_lora import ExpertLoraWrapper, set_expert_lora_mode
from bimedix.training.tiny import build_tiny_model

TARGET_PARAMETERS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _peft_model(arch: str, dtype: torch.dtype = torch.float32, quantize: bool = False, rank: int = 4,
                **overrides):
    """Tiny model with LoRA (random A and B, so that ΔW ≠ 0) on attention, router and experts."""
    model = build_tiny_model(arch, seed=0, **overrides).to(dtype)
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                        target_parameters=TARGET_PARAMETERS,
                        lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(model, config)
    if quantize:
        from bimedix.training.moe.quantize import quantize_experts

        quantize_experts(model)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    output = model(input_ids=ids, labels=ids)
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return output.logits.detach(), grads


def _experts_module(model, layer: int = 0):
    return model.base_model.model.model.layers[layer].mlp.experts


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("arch, overrides, rank", [
    ("mixtral", {}, 4),
    ("mixtral", {}, 8),  # a rank the grouped GEMMs take as it is (4 is padded to 8)
    ("qwen2_moe", {}, 4),
    # gate_up_proj wide enough (E·r ≤ out/4) for the dense down-to-rank GEMM; down_proj stays grouped
    ("mixtral", {"hidden_size": 64, "intermediate_size": 256}, 4),
], ids=["mixtral", "mixtral-rank8", "qwen2_moe", "mixtral-wide"])
def test_folded_equals_peft_path_fp32(arch, overrides, rank, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    ids = torch.randint(3, 32000, (2, 10), generator=torch.Generator().manual_seed(0))
    peft_model = _peft_model(arch, quantize=quantize, rank=rank, **overrides)
    # no deepcopy: copies of parametrized modules share a cache
    folded = _peft_model(arch, quantize=quantize, rank=rank, **overrides)
    set_expert_lora_mode(folded, "folded")

    logits, grads = _loss_and_grads(peft_model, ids)
    folded_logits, folded_grads = _loss_and_grads(folded, ids)

    torch.testing.assert_close(folded_logits, logits, atol=1e-5, rtol=1e-5)
    assert folded_grads.keys() == grads.keys() and any("experts.lora_B" in n for n in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(folded_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_folded_matches_peft_path_in_low_precision(dtype, quantize):
    """Same routing, one experts layer: both paths are as close to the fp32 result as each other."""
    if quantize:
        pytest.importorskip("bitsandbytes")
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(24, 16, generator=generator)
    top_k_index = torch.randint(0, 4, (24, 2), generator=generator)
    top_k_weights = torch.rand(24, 2, generator=generator)

    def run(mode: str, run_dtype: torch.dtype):
        module = _experts_module(_peft_model("mixtral", dtype=dtype, quantize=quantize))
        if run_dtype == torch.float32:  # the reference: the same (rounded) weights, in fp32
            module.float()
        set_expert_lora_mode(module, mode)
        x = hidden.to(run_dtype).detach().clone().requires_grad_()
        out = module(x, top_k_index, top_k_weights.to(run_dtype))
        out.float().pow(2).sum().backward()
        grads = [x.grad] + [p.grad for n, p in sorted(module.named_parameters()) if "lora_" in n]
        return [out.float()] + [g.float() for g in grads]

    reference = run("peft", torch.float32) if not quantize else None
    peft_result, folded_result = run("peft", dtype), run("folded", dtype)
    for i, (expected, got) in enumerate(zip(peft_result, folded_result)):
        scale = expected.abs().max()
        assert scale > 0
        if reference is None:  # 4-bit: no fp32 copy of the packed weights; compare the two paths directly
            assert (got - expected).abs().max() <= 3e-2 * scale, i
        else:
            peft_error = (expected - reference[i]).abs().max()
            assert (got - reference[i]).abs().max() <= 2 * peft_error + 1e-2 * scale, i


def test_mode_switch_keeps_parameters_and_state_dict():
    model = _peft_model("qwen2_moe")
    keys = list(model.state_dict())
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper) and m.parameter_name != "weight"]

    assert set_expert_lora_mode(model, "folded") == len(wrappers) == 2 * model.config.num_hidden_layers
    assert all(isinstance(m, ExpertLoraWrapper) and m.expert_lora_mode == "folded" for m in wrappers)
    assert list(model.state_dict()) == keys
    ids = torch.randint(3, 32000, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        folded = model(input_ids=ids).logits
        set_expert_lora_mode(model, "peft")
        torch.testing.assert_close(model(input_ids=ids).logits, folded, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            set_expert_lora_mode(model, "folded")
            base = model(input_ids=ids).logits
        plain = build_tiny_model("qwen2_moe", seed=0)
        torch.testing.assert_close(base, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expert_lora_mode='fast'"):
        set_expert_lora_mode(model, "fast")
