"""Fused training kernels: Liger's Triton RMSNorm and rotary embeddings where they apply, else transformers'.

``fused_kernels: auto`` (the default) swaps them in when the `liger-kernel` package is importable
(``pip install 'bimedix[liger]'``), the run trains on CUDA, Liger supports the model type (Mixtral,
Qwen3-MoE and others, not OLMoE) and its kernels pass a self-test on the run's device and dtype (they compile
and give transformers' results on small tensors, forward and backward: a Triton that does not fit the
installed Liger is caught here, not mid-run); otherwise the run goes on with transformers' own layers and
the log says why.
``fused_kernels: liger`` requires them and stops, before training, with the reason; ``off`` never uses them.
The results are the same up to rounding (``tests/test_fused_kernels.py`` compares losses and gradients on
CUDA); the gain is fewer kernel launches per layer.

What bimedix leaves out of Liger, and why:

- ``swiglu``: Liger replaces the MoE experts' module, which bimedix's expert paths own (PEFT's LoRA on the
  fused experts, the folded LoRA of `bimedix.training.moe.expert_lora`, NF4 experts);
- ``fused_linear_cross_entropy`` / ``cross_entropy``: TRL's `SFTTrainer` already computes the loss through
  its own fused, chunked LM head (no full logits), and Liger's would replace the model's ``forward`` that TRL
  patches.

transformers' ``use_liger_kernel: true`` is read as ``fused_kernels: liger`` and applied here, not by the
`Trainer` (whose defaults would swap the experts too); ``liger_kernel_config`` may switch ``rope`` or
``rms_norm`` off. Liger patches the model type's module too (its rotary function and RMSNorm class): models
of that type built later in the same process use them as well.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: The values of the ``fused_kernels`` recipe key.
MODES = ("auto", "liger", "off")
#: The Liger kernels bimedix uses, by the name of their switch in Liger's ``apply_liger_kernel_to_*``.
KERNELS = ("rms_norm", "rope")
INSTALL = "pip install 'bimedix[liger]'"


@dataclass(frozen=True)
class FusedKernels:
    """Which Liger kernels a run uses (none when it falls back), and why."""

    kernels: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"liger {', '.join(self.kernels)} ({self.reason})" if self.kernels else f"none ({self.reason})"


def requested_kernels(training_args, bimedix_args) -> tuple[str, tuple[str, ...]]:
    """The mode and kernels a recipe asks for: ``fused_kernels``, or ``liger`` with transformers'
    ``use_liger_kernel: true`` (``liger_kernel_config`` may turn ``rope``/``rms_norm`` off)."""
    if not getattr(training_args, "use_liger_kernel", False):
        return bimedix_args.fused_kernels, KERNELS
    config = getattr(training_args, "liger_kernel_config", None) or {}
    return "liger", tuple(kernel for kernel in KERNELS if config.get(kernel, True))


def recipe_request(training_args, bimedix_args) -> dict:
    """The keyword arguments of `plan_fused_kernels` / `apply_fused_kernels` for a recipe's run: its mode and
    kernels (`requested_kernels`), its training device and whether hub kernels are on."""
    mode, kernels = requested_kernels(training_args, bimedix_args)
    return {"mode": mode, "device": training_args.device, "kernels": kernels,
            "hub_kernels": _hub_kernels_on(training_args, bimedix_args)}


def _hub_kernels_on(training_args, bimedix_args) -> bool:
    """Whether the recipe loads the model with transformers' hub kernels (``use_kernels``, in bimedix's keys
    or in ``model_init_kwargs``)."""
    return bool(bimedix_args.use_kernels or (training_args.model_init_kwargs or {}).get("use_kernels"))


def check_fused_kernels(training_args, bimedix_args) -> None:
    """Refuse fused-kernel settings that contradict each other, before anything is loaded.

    Raises:
        `ValueError`: naming the recipe keys and what to do.
    """
    if getattr(training_args, "use_liger_kernel", False):
        if bimedix_args.fused_kernels == "off":
            raise ValueError("`use_liger_kernel: true` asks for Liger's kernels and `fused_kernels: off` "
                             "forbids them: drop one of the two.")
        config = getattr(training_args, "liger_kernel_config", None) or {}
        unsupported = sorted(key for key, value in config.items() if key not in KERNELS and value)
        if unsupported:
            raise ValueError(
                f"`liger_kernel_config` turns on {', '.join(map(repr, unsupported))}: bimedix uses Liger's "
                f"{' and '.join(KERNELS)} kernels only (its expert paths own the MoE experts, which Liger's "
                "swiglu would replace, and TRL computes the loss through its own fused LM head). Remove "
                "those keys.")
    mode, kernels = requested_kernels(training_args, bimedix_args)
    if mode != "liger":
        return
    if _hub_kernels_on(training_args, bimedix_args):
        raise ValueError("`use_kernels: true` (transformers' hub kernels) and Liger's kernels "
                         "(`fused_kernels: liger` or `use_liger_kernel: true`) replace the same RMSNorm and "
                         "rotary layers: keep one of the two.")
    problem = _setting_problem(training_args.device, kernels, hub_kernels=False)
    if problem:
        raise ValueError(_required_message(problem))


def plan_fused_kernels(model, mode: str, device: torch.device | str, kernels: tuple[str, ...] = KERNELS,
                       *, hub_kernels: bool = False) -> FusedKernels:
    """What `apply_fused_kernels` would do to ``model`` (a `PreTrainedModel` or a PEFT model around one)
    trained on ``device``; nothing is changed.

    Raises:
        `ValueError`: ``mode`` is ``liger`` and the kernels cannot be used here (the reason and the fix).
    """
    if mode not in MODES:
        raise ValueError(f"fused_kernels={mode!r} is not one of {list(MODES)}")
    if mode == "off":
        return FusedKernels((), "fused_kernels: off")
    device, base = torch.device(device), _base_model(model)
    problem = _setting_problem(device, kernels, hub_kernels)
    usable = ()
    if problem is None:
        problem, usable = _model_problem(base, kernels)
    if problem is None:
        problem = _self_test(usable, str(device), _compute_dtype(base))
    if problem is None:
        return FusedKernels(usable, f"liger-kernel {_distribution_version('liger-kernel')}, self-test passed")
    if mode == "liger":
        raise ValueError(_required_message(problem))
    return FusedKernels((), f"auto: {problem}")


def apply_fused_kernels(model, mode: str, device: torch.device | str, kernels: tuple[str, ...] = KERNELS,
                        *, hub_kernels: bool = False) -> FusedKernels:
    """Swap Liger's ``kernels`` into ``model`` where `plan_fused_kernels` says they apply; log and return
    what was done."""
    chosen = plan_fused_kernels(model, mode, device, kernels, hub_kernels=hub_kernels)
    if chosen.kernels:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        base = _base_model(model)
        apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN[base.config.model_type]
        switches = {name: name in chosen.kernels for name, parameter in
                    inspect.signature(apply_fn).parameters.items() if isinstance(parameter.default, bool)}
        apply_fn(model=base, **switches)
    logger.info("Fused kernels: %s", chosen)
    return chosen


def _setting_problem(device: torch.device, kernels: tuple[str, ...], hub_kernels: bool) -> str | None:
    """Why Liger's kernels cannot be used by a run on ``device``, whatever the model (None when they can)."""
    if not kernels:
        return "`liger_kernel_config` turns every kernel off"
    if hub_kernels:
        return "hub kernels are on (`use_kernels: true`) and already replace these layers"
    if device.type != "cuda":
        return f"the run trains on {device.type}, and Liger's Triton kernels run on CUDA"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN  # noqa: F401
    except ImportError as err:
        return f"liger-kernel is not importable ({err}); `{INSTALL}` installs it"
    return None


def _model_problem(model, kernels: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """Why Liger has none of ``kernels`` for ``model``'s type (None when it has), and those it has."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply_fn is None:
        return f"Liger has no kernels for model type {model_type!r}", ()
    usable = tuple(kernel for kernel in kernels if kernel in inspect.signature(apply_fn).parameters)
    if not usable:
        return f"Liger has no {' or '.join(kernels)} kernel for model type {model_type!r}", ()
    return None, usable


@functools.cache
def _self_test(kernels: tuple[str, ...], device: str, dtype: torch.dtype) -> str | None:
    """Why Liger's ``kernels`` cannot be trusted on ``device`` in ``dtype`` (None when they can): each runs
    forward and backward on small random tensors and must give transformers' results (relative to the largest
    value: 1e-4 in fp32, 5e-2 in half precision) without raising."""
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)

    def rms_norm(liger: bool, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if liger:  # as Liger patches a model's norms: llama casting, gradient computed in place
            from liger_kernel.transformers.rms_norm import LigerRMSNorm

            norm = LigerRMSNorm(x.shape[-1], eps=1e-6, casting_mode="llama", in_place=True)
            return torch.func.functional_call(norm, {"weight": weight}, (x,))
        hidden = x.float()
        return weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    def rope(liger: bool, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if liger:
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            return liger_rotary_pos_emb(q, k, cos, sin)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    angles = torch.arange(16, dtype=torch.float32)[:, None] * torch.rand(32, generator=generator)[None]
    angles = torch.cat((angles, angles), dim=-1)[None]  # (1, positions, head_dim)
    cases = {"rms_norm": (rms_norm, lambda: (tensor(2, 16, 256), tensor(256))),
             "rope": (rope, lambda: (tensor(1, 4, 16, 64), tensor(1, 2, 16, 64),
                                     angles.cos().to(device, dtype), angles.sin().to(device, dtype)))}
    for name in kernels:
        function, make_inputs = cases[name]
        try:
            results, shared = [], make_inputs()
            for liger in (False, True):
                inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in shared]
                outputs = function(liger, *inputs)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])
                results.append([out.detach().float() for out in outputs]
                               + [x.grad.float() for x in inputs if x.grad is not None])
            if len(results[1]) != len(results[0]):
                return f"Liger's {name} kernel failed its self-test on {device} in {dtype}: gradients missing"
            for reference, fused in zip(*results):
                error = ((fused - reference).abs().max() / reference.abs().max().clamp_min(1e-6)).item()
                if not error <= tolerance:
                    return (f"Liger's {name} kernel failed its self-test on {device} in {dtype}: results "
                            f"differ from transformers' by {error:.2g} (tolerance {tolerance:g})")
        except Exception as err:  # noqa: BLE001 - any failure of the kernel means: do not use it
            return (f"Liger's {name} kernel failed its self-test on {device} in {dtype} "
                    f"({type(err).__name__}: {err})")
    return None


def _compute_dtype(model) -> torch.dtype:
    """The floating dtype the model computes in (bf16 for a model whose first weights are packed 4-bit)."""
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if dtype.is_floating_point else torch.bfloat16


def _required_message(problem: str) -> str:
    return (f"`fused_kernels: liger` (or `use_liger_kernel: true`) cannot be used here: {problem}. Fix that, "
            "or set `fused_kernels: auto` to train with transformers' layers where Liger's do not apply.")


def _base_model(model):
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _distribution_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "(version unknown)"
