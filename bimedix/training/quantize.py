"""NF4 (double-quantized) fused MoE experts: QLoRA that really quantizes the experts.

transformers 5 stores an MoE layer's experts as fused 3-D parameters (`mlp.experts.gate_up_proj` of shape
(E, 2I, H) and `mlp.experts.down_proj` of shape (E, H, I)); `load_in_4bit` only quantizes `nn.Linear`, so
about 97% of Mixtral's weights stay in bf16. `quantize_experts` packs those parameters to NF4 with double
quantization through bitsandbytes' own parametrization (`replace_parameter_4bit`), so that they stay 4-bit
at rest, any experts implementation still reads ``experts.gate_up_proj`` (dequantized on access), and the
state dict carries bitsandbytes' quant-state keys. `grouped_expert_linear` runs the grouped expert matmul
from the packed bytes (dequantizing just in time, and again in backward): the folded expert-LoRA path in
`bimedix.training.expert_lora` uses it, so no dequantized expert stack is kept between forward and backward.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

logger = logging.getLogger(__name__)

EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
MIN_BITSANDBYTES = "0.48.0"
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SUPPORTED_DEVICES = ("cpu", "cuda", "xpu")


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Return the fused experts modules of ``model`` by name (modules holding 3-D `gate_up_proj`/`down_proj`).

    PEFT wrappers are looked through: the returned modules are the transformers experts modules themselves.
    """
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer"):  # a PEFT wrapper
            continue
        held = [p for p in EXPERT_PARAMETERS if _is_3d_expert_parameter(module, p)]
        if "down_proj" in held and len(held) >= 2:
            found[name.replace(".base_layer", "")] = module
    return found


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
        blocksize (`int`, *optional*, defaults to `64`): values per absmax block; must divide one expert's size.
        device (`str` or `torch.device`, *optional*): move each experts module there *before* quantizing it, so
            that a model loaded on CPU reaches the accelerator one packed layer at a time.

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
            f"{type(model).__name__} has no fused MoE experts (3-D `gate_up_proj`/`down_proj` parameters), so there "
            "is nothing for `quantize_experts: nf4` to quantize. Use it with an MoE model such as Mixtral or "
            "Qwen-MoE, or drop the option (dense Linear layers are quantized by `load_in_4bit`)."
        )
    names = []
    for module_name, module in experts.items():
        if device is not None:
            module.to(device)
        for param_name in EXPERT_PARAMETERS:
            if not _is_3d_expert_parameter(module, param_name) or is_quantized(module, param_name):
                continue
            full_name = f"{module_name}.{param_name}"
            _check_parameter(full_name, getattr(module, param_name), blocksize)
            replace_parameter_4bit(
                module, param_name, compress_statistics=compress_statistics, quant_type=quant_type, blocksize=blocksize
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
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a causal LM on CPU, add LoRA, and bring it to ``device`` with its experts packed to 4 bit layer by layer.

    The bf16 expert stack only ever exists in host memory; on the accelerator each experts module is
    quantized right after it arrives, so the accelerator never holds more than one layer of bf16 experts.

    Args:
        model_name_or_path (`str` or `os.PathLike`): a Hub id or local folder.
        device (`str` or `torch.device`, *optional*): target device; defaults to CUDA when available, else CPU.
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): dtype of everything not quantized.
        peft_config (`peft.LoraConfig`, *optional*): new LoRA adapters to add before quantizing.
        adapter (`str` or `os.PathLike`, *optional*): a saved adapter to load (trainable) before quantizing.
        quant_type (`str`, *optional*, defaults to `"nf4"`): see `quantize_experts`.
        **from_pretrained_kwargs: passed to `AutoModelForCausalLM.from_pretrained` (not `device_map`).

    Returns:
        `nn.Module`: the model, a `peft.PeftModel` when ``peft_config`` or ``adapter`` is given.
    """
    from transformers import AutoModelForCausalLM

    _check_bitsandbytes()
    if peft_config is not None and adapter is not None:
        raise ValueError("Give `peft_config` (new adapters) or `adapter` (a saved one), not both.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype, device_map="cpu",
                                                 **from_pretrained_kwargs)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    elif adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    quantize_experts(model, quant_type=quant_type, device=device)
    return model.to(device)


def is_quantized(module: nn.Module, param_name: str) -> bool:
    """Whether ``module.<param_name>`` is a bitsandbytes 4-bit parametrized parameter."""
    return _bnb_parametrization(module, param_name) is not None


def grouped_expert_linear(experts: nn.Module, param_name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``linear(x, offsets)``: rows of ``x`` sorted by expert, group ``e`` times ``W[e]ᵀ`` (grouped GEMM).

    ``offsets`` are the cumulative row counts per expert (int32), as in transformers' `grouped_mm` experts.
    A 4-bit parameter is dequantized for the call and again in backward instead of being kept for it
    (like bitsandbytes' `MatMul4Bit`), so saved activations hold packed bytes, not a bf16 expert stack.
    Experts stored transposed (``experts.is_transposed``, shape (E, in, out)) are handled.
    """
    transposed = getattr(experts, "is_transposed", False)
    parametrization = _bnb_parametrization(experts, param_name)
    if parametrization is None:
        weight = getattr(experts, param_name)
        return lambda x, offsets: grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offsets)
    packed = experts.parametrizations[param_name].original
    state = parametrization.quant_state
    return lambda x, offsets: _Dequantize4bitGroupedLinear.apply(x, offsets, packed, state, transposed)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[rows of e] @ weight[e]`` for every expert ``e`` (weight (E, in, out)), in ``weight``'s dtype."""
    # transformers' dispatcher: torch's grouped GEMM where the device/dtype/version allows it, else a loop.
    from transformers.integrations.moe import _grouped_mm

    return _grouped_mm(x, weight, offsets)


def dequantize_experts(model: nn.Module) -> list[str]:
    """Replace every 4-bit expert parameter of ``model`` by a dense parameter in its original dtype (in place).

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
            parametrization = _bnb_parametrization(module, param_name)
            if parametrization is not None:
                original = module.parametrizations[param_name].original
                total += original.numel() * original.element_size() + _quant_state_bytes(parametrization.quant_state,
                                                                                          codebooks)
            elif _is_3d_expert_parameter(module, param_name):
                param = getattr(module, param_name)
                total += param.numel() * param.element_size()
    return total


@functools.cache
def _experts_parametrization_class() -> type:
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    class ExpertsBnb4bitParametrization(Bnb4bitParametrization):
        """bitsandbytes' 4-bit parametrization, dequantizing through `_flat_dequantize` (same state, same keys)."""

        @torch.no_grad()
        def forward(self, quantized_param: torch.Tensor) -> torch.Tensor:
            return _flat_dequantize(quantized_param, self.quant_state)

    return ExpertsBnb4bitParametrization


class _Dequantize4bitGroupedLinear(torch.autograd.Function):
    """Grouped ``x @ W[e]ᵀ`` from a 4-bit expert stack; saves the packed bytes, not the dequantized weight."""

    @staticmethod
    def forward(ctx, x, offsets, packed, state, transposed):
        ctx.save_for_backward(offsets, packed)
        ctx.state, ctx.transposed = state, transposed
        weight = _flat_dequantize(packed, state).to(x.dtype)
        return grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offsets)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        offsets, packed = ctx.saved_tensors
        weight = _flat_dequantize(packed, ctx.state).to(grad_output.dtype)
        grad_input = grouped_mm(grad_output, weight.transpose(-2, -1) if ctx.transposed else weight, offsets)
        return grad_input, None, None, None, None


def _flat_dequantize(quantized: torch.Tensor, state) -> torch.Tensor:
    """`dequantize_4bit` through a (blocks, blocksize) view, reshaped back to ``state.shape``.

    bitsandbytes 0.50's CPU kernel mis-places the absmax of rows shorter than (or not a multiple of) the
    block size — e.g. a hidden size of 16 — while blocks are laid out linearly; the flat view is exact.
    """
    from bitsandbytes import functional as bnbf

    flat = bnbf.QuantState(absmax=state.absmax, shape=torch.Size((state.shape.numel() // state.blocksize,
                           state.blocksize)), code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
                           dtype=state.dtype, offset=state.offset, state2=state.state2)
    return bnbf.dequantize_4bit(quantized, quant_state=flat).reshape(state.shape)


def _quant_state_bytes(state, codebooks: bool) -> int:
    tensors = [state.absmax, state.code if codebooks else None]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code if codebooks else None, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _bnb_parametrization(module: nn.Module, param_name: str):
    if not parametrize.is_parametrized(module, param_name):
        return None
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    return next((p for p in module.parametrizations[param_name] if isinstance(p, Bnb4bitParametrization)), None)


def _is_3d_expert_parameter(module: nn.Module, param_name: str) -> bool:
    if parametrize.is_parametrized(module, param_name):
        return _bnb_parametrization(module, param_name) is not None or module.parametrizations[
            param_name].original.dim() == 3
    param = module._parameters.get(param_name)
    return param is not None and param.dim() == 3


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
            f"4-bit experts need bitsandbytes>={MIN_BITSANDBYTES} with `bitsandbytes.nn.parametrize` ({exc}). "
            f"Install it with `pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'` (or `pip install bimedix[train]`)."
        ) from exc
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(MIN_BITSANDBYTES):
        raise RuntimeError(
            f"bitsandbytes {bitsandbytes.__version__} is too old for 4-bit experts; "
            f"run `pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'`."
        )
