"""NF4 (double-quantized) fused MoE experts: QLoRA that really quantizes the experts.

transformers 5 stores an MoE layer's experts as fused 3-D parameters (`mlp.experts.gate_up_proj` of shape
(E, 2I, H) and `mlp.experts.down_proj` of shape (E, H, I)); `load_in_4bit` only quantizes `nn.Linear`, so
about 97% of Mixtral's weights stay in bf16. `quantize_experts` packs those parameters to NF4 with double
quantization through bitsandbytes' own parametrization (`replace_parameter_4bit`), so that they stay 4-bit
at rest, any experts implementation still reads ``experts.gate_up_proj`` (dequantized on access), and the
state dict carries bitsandbytes' quant-state keys. `experts.grouped_expert_linear` runs the grouped expert
matmul from the packed bytes (dequantizing just in time, and again in backward unless a checkpoint
recomputation already did): the folded expert-LoRA path
in `bimedix.training.moe.expert_lora` uses it, so no dequantized expert stack is kept between forward and
backward.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn
from torch.nn.utils import parametrize

from .experts import (
    EXPERT_PARAMETERS,
    bnb_parametrization,
    flat_dequantize,
    fused_experts,
    is_3d_expert_parameter,
    is_quantized,
)

logger = logging.getLogger(__name__)

MIN_BITSANDBYTES = "0.48.0"
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SUPPORTED_DEVICES = ("cpu", "cuda", "xpu")


def quantize_experts(
    model: nn.Module,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    blocksize: int = 64,
    device: str | torch.device | None = None,
) -> list[str]:
    """Quantize every fused expert parameter of ``model`` to 4 bit in place, one layer at a time.

    Args:
        model (`nn.Module`): a transformers MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...).
        quant_type (`str`, *optional*, defaults to `"nf4"`): `"nf4"` or `"fp4"`.
        compress_statistics (`bool`, *optional*, defaults to `True`): double quantization (8-bit absmax).
        blocksize (`int`, *optional*, defaults to `64`): values per absmax block; must divide one expert's
            size.
        device (`str` or `torch.device`, *optional*): move each experts module there *before* quantizing it,
            so that a model loaded on CPU reaches the accelerator one packed layer at a time.

    Quantize *after* adding LoRA (`peft.get_peft_model` or `PeftModel.from_pretrained` on the bf16 model):
    PEFT then matches and nests the expert adapters exactly as on an unquantized model, so the adapter
    keeps its meaning on any base. PEFT wrappers over the experts become `ExpertLoraWrapper` (PEFT's own
    path, with the fixes it needs on 4-bit parameters); `set_expert_lora_mode` picks the folded path.

    Returns:
        `list[str]`: the names (``model.layers.0.mlp.experts.gate_up_proj``) of the quantized parameters.
    """
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    _check_bitsandbytes()
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quantize_experts: quant_type={quant_type!r} is not supported; use 'nf4' or 'fp4'.")
    experts = fused_experts(model)
    if not experts:
        raise ValueError(
            f"{type(model).__name__} has no fused MoE experts (3-D "
            "`gate_up_proj`/`down_proj` parameters), so there "
            "is nothing for `quantize_experts: nf4` to quantize. Use it with an MoE model such as Mixtral or "
            "Qwen-MoE, or drop the option (dense Linear layers are quantized by `load_in_4bit`)."
        )
    names = []
    for module_name, module in experts.items():
        if device is not None:
            module.to(device)
        for param_name in EXPERT_PARAMETERS:
            if not is_3d_expert_parameter(module, param_name) or is_quantized(module, param_name):
                continue
            full_name = f"{module_name}.{param_name}"
            _check_parameter(full_name, getattr(module, param_name), blocksize)
            replace_parameter_4bit(
                module, param_name, compress_statistics=compress_statistics, quant_type=quant_type,
                blocksize=blocksize
            )
            module.parametrizations[param_name][0].__class__ = _experts_parametrization_class()
            names.append(full_name)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if any(hasattr(module, "base_layer") for module in model.modules()):
        from .expert_lora import adopt_expert_wrappers

        adopt_expert_wrappers(model)
    logger.info("Quantized %d fused expert parameters to %s (double quant: %s).", len(names), quant_type,
                compress_statistics)
    return names


def load_model_with_4bit_experts(
    model_name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    peft_config=None,
    adapter: str | os.PathLike | None = None,
    quant_type: str = "nf4",
    use_kernels: bool = False,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a causal LM on CPU, add LoRA, and bring it to ``device`` with its experts packed to 4 bit layer by
    layer.

    The bf16 expert stack only ever exists in host memory; on the accelerator each experts module is
    quantized right after it arrives, so the accelerator never holds more than one layer of bf16 experts.

    Args:
        model_name_or_path (`str` or `os.PathLike`): a Hub id or local folder.
        device (`str` or `torch.device`, *optional*): target device; defaults to CUDA when available, else
            CPU.
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): dtype of everything not quantized.
        peft_config (`peft.LoraConfig`, *optional*): new LoRA adapters to add before quantizing.
        adapter (`str` or `os.PathLike`, *optional*): a saved adapter to load (trainable) before quantizing.
        quant_type (`str`, *optional*, defaults to `"nf4"`): see `quantize_experts`.
        use_kernels (`bool`, *optional*, defaults to `False`): load with hub kernels (`bimedix.hub_kernels`).
        **from_pretrained_kwargs: passed to `AutoModelForCausalLM.from_pretrained` (not `device_map`).

    Returns:
        `nn.Module`: the model, a `peft.PeftModel` when ``peft_config`` or ``adapter`` is given.
    """
    from transformers import AutoModelForCausalLM

    from ...deprecations import quiet_peft_checkpointing_warning
    from ...hub_kernels import load_pretrained

    _check_bitsandbytes()
    if peft_config is not None and adapter is not None:
        raise ValueError("Give `peft_config` (new adapters) or `adapter` (a saved one), not both.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_pretrained(AutoModelForCausalLM, model_name_or_path, use_kernels=use_kernels, dtype=dtype,
                            device_map="cpu", **from_pretrained_kwargs)
    if peft_config is not None:
        from peft import get_peft_model

        with quiet_peft_checkpointing_warning():
            model = get_peft_model(model, peft_config)
    elif adapter is not None:
        from peft import PeftModel

        with quiet_peft_checkpointing_warning():
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    quantize_experts(model, quant_type=quant_type, device=device)
    return model.to(device)


def dequantize_experts(model: nn.Module) -> list[str]:
    """Replace every 4-bit expert parameter of ``model`` by a dense parameter in its original dtype (in
    place).

    This is the merge path: PEFT's `merge_and_unload` adds ΔW to ``param.data``, which for a parametrized
    4-bit parameter is a temporary; dequantize first, then merge. Returns the names it dequantized.
    """
    names = []
    for module_name, module in fused_experts(model).items():
        for param_name in EXPERT_PARAMETERS:
            if not is_quantized(module, param_name):
                continue
            with torch.no_grad():
                dense = getattr(module, param_name).clone()
            parametrize.remove_parametrizations(module, param_name, leave_parametrized=False)
            setattr(module, param_name, nn.Parameter(dense, requires_grad=False))
            names.append(f"{module_name}.{param_name}")
    return names


def expert_parameter_bytes(model: nn.Module, codebooks: bool = True) -> int:
    """Bytes at rest of the fused expert parameters of ``model``, quantization statistics included.

    Args:
        model (`nn.Module`): a model with fused experts, quantized or not.
        codebooks (`bool`, *optional*, defaults to `True`): count the two constant code books (16 and 256
            values) bitsandbytes keeps with every quantized parameter.
    """
    total = 0
    for module in fused_experts(model).values():
        for param_name in EXPERT_PARAMETERS:
            parametrization = bnb_parametrization(module, param_name)
            if parametrization is not None:
                original = module.parametrizations[param_name].original
                total += (original.numel() * original.element_size()
                          + _quant_state_bytes(parametrization.quant_state, codebooks))
            elif is_3d_expert_parameter(module, param_name):
                param = getattr(module, param_name)
                total += param.numel() * param.element_size()
    return total


@functools.cache
def _experts_parametrization_class() -> type:
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    class ExpertsBnb4bitParametrization(Bnb4bitParametrization):
        """bitsandbytes' 4-bit parametrization, dequantizing through `flat_dequantize` (same state, same
        keys)."""

        @torch.no_grad()
        def forward(self, quantized_param: torch.Tensor) -> torch.Tensor:
            return flat_dequantize(quantized_param, self.quant_state)

    return ExpertsBnb4bitParametrization


def _quant_state_bytes(state, codebooks: bool) -> int:
    tensors = [state.absmax, state.code if codebooks else None]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code if codebooks else None, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_parameter(name: str, param: torch.Tensor, blocksize: int) -> None:
    if param.device.type == "meta":
        raise ValueError(f"{name} is on the meta device; load real weights before `quantize_experts`.")
    if param.device.type not in _SUPPORTED_DEVICES:
        raise ValueError(
            f"{name} is on {param.device.type!r}; 4-bit experts support {', '.join(_SUPPORTED_DEVICES)}. "
            "Move the model to one of them (or pass `device=`) before quantizing."
        )
    if param.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"{name} has dtype {param.dtype}; 4-bit experts quantize bfloat16, float16 or float32 weights. "
            "Load the model with `dtype=torch.bfloat16`."
        )
    per_expert = param[0].numel()
    if per_expert % blocksize or per_expert % 2:
        raise ValueError(
            f"{name}: one expert has {per_expert} values, not a multiple of blocksize={blocksize}; "
            "choose a blocksize that divides it (32, 64, 128, ...)."
        )


def _check_bitsandbytes() -> None:
    try:
        import bitsandbytes
        from bitsandbytes.nn import parametrize as _  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"4-bit experts need bitsandbytes>={MIN_BITSANDBYTES} with `bitsandbytes.nn.parametrize` "
            f"({exc}). Install it with `pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'` "
            "(or `pip install bimedix[train]`)."
        ) from exc
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(MIN_BITSANDBYTES):
        raise RuntimeError(
            f"bitsandbytes {bitsandbytes.__version__} is too old for 4-bit experts; "
            f"run `pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'`."
        )
