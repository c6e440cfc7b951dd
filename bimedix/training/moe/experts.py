"""Fused MoE experts: finding them, their 4-bit state, and the grouped expert matmul over them.

transformers 5 stores an MoE layer's experts as fused 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`). `bimedix.training.moe.quantize` packs them to NF4 and
`bimedix.training.moe.expert_lora` folds LoRA into their forward; both use the helpers here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Return the fused experts modules of ``model`` by name (modules holding 3-D `gate_up_proj`/`down_proj`).

    PEFT wrappers are looked through: the returned modules are the transformers experts modules themselves.
    """
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer"):  # a PEFT wrapper
            continue
        held = [p for p in EXPERT_PARAMETERS if is_3d_expert_parameter(module, p)]
        if "down_proj" in held and len(held) >= 2:
            found[name.replace(".base_layer", "")] = module
    return found


def is_quantized(module: nn.Module, param_name: str) -> bool:
    """Whether ``module.<param_name>`` is a bitsandbytes 4-bit parametrized parameter."""
    return bnb_parametrization(module, param_name) is not None


def grouped_expert_linear(experts: nn.Module,
                          param_name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``linear(x, offsets)``: rows of ``x`` sorted by expert, group ``e`` times ``W[e]ᵀ`` (grouped
    GEMM).

    ``offsets`` are the cumulative row counts per expert (int32), as in transformers' `grouped_mm` experts.
    A 4-bit parameter is dequantized for the call and again in backward instead of being kept for it
    (like bitsandbytes' `MatMul4Bit`), so saved activations hold packed bytes, not a bf16 expert stack.
    Experts stored transposed (``experts.is_transposed``, shape (E, in, out)) are handled.
    """
    transposed = getattr(experts, "is_transposed", False)
    parametrization = bnb_parametrization(experts, param_name)
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


class _Dequantize4bitGroupedLinear(torch.autograd.Function):
    """Grouped ``x @ W[e]ᵀ`` from a 4-bit expert stack; saves the packed bytes, not the dequantized weight.

    Inside activation checkpointing (torch's non-reentrant checkpoint) it saves the dequantized weight
    instead: the checkpointed forward keeps no saved tensor, and the recomputation's are held only until this
    layer's backward, which then reuses the recomputation's weight: 2 dequantizations per micro-step, not 3,
    for one layer's dequantized experts at a time.
    """

    @staticmethod
    def forward(ctx, x, offsets, packed, state, transposed):
        weight = flat_dequantize(packed, state).to(x.dtype)
        ctx.dequantized = _inside_checkpoint()
        ctx.save_for_backward(offsets, weight if ctx.dequantized else packed)
        ctx.state, ctx.transposed = state, transposed
        return grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offsets)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        offsets, saved = ctx.saved_tensors
        weight = saved if ctx.dequantized else flat_dequantize(saved, ctx.state).to(grad_output.dtype)
        grad_input = grouped_mm(grad_output, weight.transpose(-2, -1) if ctx.transposed else weight, offsets)
        return grad_input, None, None, None, None


def _inside_checkpoint() -> bool:
    """Whether the saved-tensor hooks in force are torch's non-reentrant activation checkpoint's."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # a torch without this (private) accessor: keep the packed path
        return False
    qualname = getattr(hooks[0], "__qualname__", "") if hooks else ""
    return qualname.startswith(("_checkpoint_hook.", "_recomputation_hook."))


def flat_dequantize(quantized: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit` through a (blocks, blocksize) view, reshaped back to ``state.shape``.

    bitsandbytes 0.50's CPU kernel mis-places the absmax of rows shorter than (or not a multiple of) the
    block size — e.g. a hidden size of 16 — while blocks are laid out linearly; the flat view is exact.
    """
    from bitsandbytes import functional as bnbf

    flat = bnbf.QuantState(absmax=state.absmax, shape=torch.Size((state.shape.numel() // state.blocksize,
                           state.blocksize)), code=state.code, blocksize=state.blocksize,
                           quant_type=state.quant_type,
                           dtype=state.dtype, offset=state.offset, state2=state.state2)
    return bnbf.dequantize_4bit(quantized, quant_state=flat).reshape(state.shape)


def bnb_parametrization(module: nn.Module, param_name: str):
    """The bitsandbytes 4-bit parametrization of ``module.<param_name>``, or ``None``."""
    if not parametrize.is_parametrized(module, param_name):
        return None
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    return next((p for p in module.parametrizations[param_name] if isinstance(p, Bnb4bitParametrization)),
                None)


def is_3d_expert_parameter(module: nn.Module, param_name: str) -> bool:
    """Whether ``module.<param_name>`` is a fused 3-D expert stack (dense or 4-bit parametrized)."""
    if parametrize.is_parametrized(module, param_name):
        return bnb_parametrization(module, param_name) is not None or module.parametrizations[
            param_name].original.dim() == 3
    param = module._parameters.get(param_name)
    return param is not None and param.dim() == 3
