"""Folded LoRA for fused MoE experts: ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` instead of materialising ``W + ΔW``.

PEFT adapts fused expert parameters (`target_parameters=["mlp.experts.gate_up_proj", ...]`) with
`lora.ParamWrapper`, which parametrizes the parameter: for bf16/fp16 and 4-bit experts every forward
(and every checkpoint recompute) builds ``W + scaling·B·A`` for the whole expert stack, and PEFT 0.21
folds into one `baddbmm` only for a single adapter on fp32 weights — still writing a full-size tensor.
`ExpertLoraWrapper` is a `ParamWrapper` with the same parameters and state-dict keys whose forward, in
``"folded"`` mode, runs each routed expert on its own tokens with the low-rank factors applied to the
activations (grouped GEMMs; 4-bit experts are dequantized just in time, `experts.grouped_expert_linear`).
``"peft"`` mode keeps PEFT's own path (plus the fix it needs on 4-bit experts). Adapters trained in
either mode are identical PEFT adapters.

Examples:

```python
model = get_peft_model(model, LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"],
                                         lora_dropout=0.0, r=8))
set_expert_lora_mode(model, "folded")
```
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import ParamWrapper, _LoraFactorsProxy
from torch import nn
from torch.nn.utils import parametrize

from .experts import grouped_expert_linear, grouped_mm, is_3d_expert_parameter

logger = logging.getLogger(__name__)

EXPERT_LORA_MODES = ("peft", "folded")


def set_expert_lora_mode(model: nn.Module, mode: str = "folded") -> int:
    """Make every PEFT wrapper over a fused expert parameter of ``model`` an `ExpertLoraWrapper` in ``mode``.

    Args:
        model (`nn.Module`): a model after `peft.get_peft_model` or `PeftModel.from_pretrained`.
        mode (`str`, *optional*, defaults to `"folded"`): `"folded"` (x·A·B per routed expert) or `"peft"`
            (PEFT's parametrization path, W + ΔW for the whole stack).

    Returns:
        `int`: how many expert wrappers were switched (0 when the experts carry no LoRA).
    """
    if mode not in EXPERT_LORA_MODES:
        raise ValueError(f"expert_lora_mode={mode!r} is not supported; choose one of {EXPERT_LORA_MODES}.")
    switched = _switch_expert_wrappers(model, mode, plain_only=False)
    if not switched:
        logger.warning("set_expert_lora_mode(%r): no LoRA on fused experts found; nothing changed.", mode)
    return switched


def adopt_expert_wrappers(model: nn.Module) -> int:
    """Turn PEFT's plain wrappers over fused experts into `ExpertLoraWrapper` in ``"peft"`` mode (same path).

    `quantize_experts` calls this: on 4-bit experts, PEFT's own wrapper needs the fixes of
    `ExpertLoraWrapper`.
    """
    return _switch_expert_wrappers(model, "peft", plain_only=True)


def _switch_expert_wrappers(model: nn.Module, mode: str, plain_only: bool) -> int:
    switched = 0
    for module in model.modules():
        if not isinstance(module, ParamWrapper) or (plain_only and type(module) is not ParamWrapper):
            continue
        if is_3d_expert_parameter(module.get_base_layer(), module.parameter_name):
            module.__class__ = ExpertLoraWrapper
            module.expert_lora_mode = mode
            switched += 1
    return switched


class ExpertLoraWrapper(ParamWrapper):
    """`lora.ParamWrapper` for fused experts with a folded forward; same parameters and state-dict keys.

    Only the outermost wrapper of an experts module runs: it gathers the factors of every wrapper below
    it (one per targeted parameter) and calls `folded_experts_forward` on the experts module.
    """

    expert_lora_mode: str = "peft"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        chain = self._wrapper_chain()
        experts = chain[-1].get_base_layer()
        if self.expert_lora_mode != "folded" or any(layer.merged
                                                    for layer in chain) or kwargs.get("adapter_names"):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        lora = {} if self.disable_adapters else {layer.parameter_name: layer._expert_factors()
                                                 for layer in chain}
        return folded_experts_forward(experts, x, *args, lora=lora, **kwargs)

    def _wrapper_chain(self) -> list[ParamWrapper]:
        chain, layer = [], self
        while isinstance(layer, ParamWrapper):
            chain.append(layer)
            layer = layer.base_layer
        return chain

    def _expert_factors(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """Per active adapter, ``(A, B, scaling)`` with A (E, r, in) and B (E, out, r): ΔW[e] =
        s·B[e]·A[e]."""
        factors = []
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            # the same reshapes as `ParamWrapper.get_delta_factors` (PEFT's layout of expert factors)
            weight_a = self.lora_A[name].weight.reshape(self.num_experts, -1,
                                                        self.lora_A[name].weight.shape[-1])
            weight_b = self.lora_B[name].weight
            weight_b = weight_b.reshape(weight_b.shape[0], -1, self.num_experts).permute(2, 0, 1)
            factors.append((weight_a, weight_b, self.scaling[name]))
        return factors

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]):
        with super()._activate_lora(active_adapters):
            # On a 4-bit (already parametrized) parameter, PEFT 0.21.2 reads it (`get_param`) before
            # registering its LoRA proxy; inside an outer wrapper's `parametrize.cached()` that read caches
            # the value without LoRA, and the experts then never see this adapter (its gradients stay None).
            # Drop the stale entry (a no-op where PEFT does not read it first).
            parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    def _remove_parametrizations(self) -> None:
        # PEFT 0.21.2 removes only `_LoraParameterProxy` when a parameter has other parametrizations (here:
        # bitsandbytes' 4-bit dequantization), so the `_LoraFactorsProxy` it uses for fp32/bf16 stays behind:
        # the next forward adds ΔW twice and then fails in `requires_grad_` on the uint8 original. Remove it
        # (never reached where PEFT removes it itself).
        param_list = self.get_base_layer().parametrizations[self.parameter_name]
        if len(param_list) > 1 and isinstance(param_list[-1], _LoraFactorsProxy):
            del param_list[-1]
            return
        super()._remove_parametrizations()


def folded_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    lora: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] | None = None,
) -> torch.Tensor:
    """transformers' `grouped_mm` experts forward with LoRA folded into the activations.

    Token-expert pairs are sorted by expert; each projection is one grouped GEMM with the (dense or
    just-in-time dequantized 4-bit) expert stack plus, per adapter, two thin grouped GEMMs ``(x·Aᵀ)·Bᵀ``.

    Args:
        experts (`nn.Module`): a fused experts module (dense, or 4-bit from `quantize_experts`).
        hidden_states (`torch.Tensor`): (tokens, hidden).
        top_k_index (`torch.Tensor`): (tokens, k) routed expert ids.
        top_k_weights (`torch.Tensor`): (tokens, k) routing weights.
        lora (`dict`, *optional*): parameter name → ``[(A, B, scaling), ...]`` (see `ExpertLoraWrapper`).
    """
    lora = lora or {}
    num_tokens, hidden_dim = hidden_states.shape
    num_top_k = top_k_index.size(-1)
    has_gate = getattr(experts, "has_gate", True)
    up_name = "gate_up_proj" if has_gate else "up_proj"

    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    # rows up to each expert's last: a search of the sorted ids, not `bincount`, whose GPU kernel copies
    # the ids' min and max to the host, so each MoE layer waited for the device (`training.device_waits`)
    upper = torch.arange(1, experts.num_experts + 1, device=expert_ids.device, dtype=expert_ids.dtype)
    offsets = torch.searchsorted(expert_ids, upper, out_int32=True)
    current = hidden_states[perm // num_top_k]

    current = _lora_grouped_linear(experts, up_name, lora.get(up_name, []), current, offsets, expert_ids)
    current = experts._apply_gate(current) if has_gate else experts.act_fn(current)
    current = _lora_grouped_linear(experts, "down_proj", lora.get("down_proj", []), current, offsets,
                                   expert_ids)
    current = current * top_k_weights.reshape(-1)[perm].unsqueeze(-1)

    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return current[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _lora_grouped_linear(experts: nn.Module, param_name: str, factors: list, x: torch.Tensor,
                         offsets: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    out = grouped_expert_linear(experts, param_name)(x, offsets)
    if getattr(experts, "has_bias", False):
        out = out + getattr(experts, f"{param_name}_bias")[expert_ids]
    for weight_a, weight_b, scaling in factors:
        # grouped GEMMs need 16-byte aligned strides: pad the rank to a multiple of 8 with zeros (exact); a
        # rank that is one already (the recipes' 128, 64, 16) is used as it is, without a copy
        pad = -weight_a.shape[1] % 8
        if pad:
            weight_a = nn.functional.pad(weight_a, (0, 0, 0, pad))
            weight_b = nn.functional.pad(weight_b, (0, pad))
        weight_a = weight_a.to(out.dtype).contiguous()  # (E, r, in)
        weight_b = weight_b.to(out.dtype).contiguous()  # (E, out, r)
        low_rank = _down_to_rank(x.to(out.dtype), weight_a, offsets, expert_ids, out.shape[-1])
        out = out + grouped_mm(low_rank, weight_b.transpose(-2, -1), offsets) * scaling
    return out


def _down_to_rank(x: torch.Tensor, weight_a: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor,
                  out_features: int) -> torch.Tensor:
    """``x[rows of e] @ A[e]ᵀ``: (S, in) → (S, r).

    A grouped GEMM with r output columns is slow (about 2x the base GEMM on CPU, forward + backward); when
    all experts' factors together are small next to the projection (E·r ≤ out/4: Mixtral's 8 experts), one
    dense GEMM against every expert's A and a gather of each row's own r columns costs far less.
    """
    num_experts, rank, in_features = weight_a.shape
    if 4 * num_experts * rank > out_features:
        return grouped_mm(x, weight_a.transpose(-2, -1), offsets)
    every_expert = x @ weight_a.reshape(num_experts * rank, in_features).T  # (S, E·r)
    return every_expert.view(-1, num_experts, rank)[torch.arange(x.shape[0], device=x.device), expert_ids]
