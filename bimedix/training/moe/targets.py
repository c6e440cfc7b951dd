"""Which weights of a causal LM get LoRA adapters: attention, router, experts, shared experts.

In transformers 5, Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE keep their experts as fused 3-D parameters
(``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I)) and the router as
``mlp.gate``, a ``*TopKRouter`` with a 2-D ``weight``. PEFT reaches those through ``target_parameters``
(which needs ``lora_dropout=0``); ``nn.Linear`` layers (attention, shared experts, per-expert Linears of
older layouts) go through ``target_modules``. `find_targets` walks the model once and sorts every
adaptable weight into a group; `build_lora_config` turns a preset or explicit lists into a `LoraConfig`.

Example:
    >>> from bimedix.training.moe.targets import build_lora_config, meta_model
    >>> model = meta_model("mixtral")
    >>> build_lora_config(model, preset="paper", r=128, alpha=64).target_parameters
    ['experts.down_proj', 'experts.gate_up_proj', 'gate.weight']
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...deprecations import PEFT_CHECKPOINTING_WARNING
from ...resources import resource_path

logger = logging.getLogger(__name__)

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
GROUPS = ("q_proj", "k_proj", "v_proj", "o_proj", "router", "experts", "shared_experts", "mlp")
PRESETS: dict[str, tuple[str, ...]] = {
    "paper": ("q_proj", "k_proj", "v_proj", "router", "experts"),
    "attention": ATTENTION_NAMES,
    "experts": ("experts",),
    "all": GROUPS,
}
_EXPERT_INDEX = re.compile(r"(^|\.)experts\.\d+\.")


@dataclass(frozen=True)
class Target:
    """One adaptable weight.

    Args:
        name (`str`): full module name (``kind="module"``) or parameter name (``kind="parameter"``).
        kind (`str`): ``"module"`` for an ``nn.Linear``, ``"parameter"`` for a raw (e.g. fused 3-D) parameter.
        group (`str`): one of `GROUPS`.
        shape (`tuple[int, ...]`): the weight's shape.
    """

    name: str
    kind: str
    group: str
    shape: tuple[int, ...]


def find_targets(model: nn.Module) -> list[Target]:
    """List every weight LoRA can adapt, sorted into `GROUPS`; embeddings and ``lm_head`` are left out.

    Args:
        model (`nn.Module`): a causal LM (real, meta-device or tiny).

    Returns:
        `list[Target]`: in module order.
    """
    modules = dict(model.named_modules())
    targets = []
    for name, module in modules.items():
        if isinstance(module, nn.Linear):
            group = _linear_group(name, modules)
            if group is not None:
                targets.append(Target(name, "module", group, tuple(module.weight.shape)))
            continue
        for param_name, param in module.named_parameters(recurse=False):
            group = _parameter_group(name, param_name, param, modules)
            if group is not None:
                targets.append(Target(f"{name}.{param_name}", "parameter", group, tuple(param.shape)))
    return targets


def select_targets(model: nn.Module, preset: str | Sequence[str]) -> list[Target]:
    """Return the targets of ``preset`` (a `PRESETS` name or a list of `GROUPS`).

    Raises:
        `ValueError`: if the preset is unknown or a group it asks for is absent from the model; the message
            lists the groups the model has.
    """
    groups = _preset_groups(preset)
    targets = find_targets(model)
    present = sorted({t.group for t in targets}, key=GROUPS.index)
    required = ATTENTION_NAMES if preset == "all" else [g for g in groups if g != "mlp"]
    missing = [g for g in required if g not in present]
    if missing:
        raise ValueError(
            f"LoRA preset {preset!r} needs {missing} but {type(model).__name__} has none "
            f"(it has: {present or 'no adaptable layers'}). "
            + ("A dense model has no router or experts: use `--lora_preset attention` or `all`. "
               if "experts" in missing or "router" in missing else "")
            + "Or pass explicit `--lora_target_modules` / `--lora_target_parameters`."
        )
    if preset == "all" and "experts" in present:
        groups = tuple(g for g in groups if g != "mlp")  # an MoE's dense MLPs are its experts already
    return [t for t in targets if t.group in groups]


def build_lora_config(
    model: nn.Module,
    preset: str | Sequence[str] | None = "paper",
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    target_parameters: Sequence[str] | None = None,
    full_names: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    **lora_kwargs,
):
    """Build a PEFT `LoraConfig` for ``model`` from a preset, or from explicit lists.

    Args:
        model (`nn.Module`): the model the adapter is for (meta-device models work).
        preset (`str | Sequence[str]`, *optional*, defaults to `"paper"`): a `PRESETS` name or list of
            `GROUPS`; ignored when ``target_modules`` or ``target_parameters`` is given.
        r (`int`, *optional*, defaults to `16`): LoRA rank.
        alpha (`int`, *optional*, defaults to `32`): LoRA alpha.
        dropout (`float`, *optional*, defaults to `0.0`): LoRA dropout; forced to 0 (with a warning) when
            parameters are targeted, because PEFT refuses dropout there.
        target_modules, target_parameters (`Sequence[str]`, *optional*): explicit PEFT name lists.
        full_names (`bool`, *optional*, defaults to `False`): emit full names instead of the shortest
            unambiguous suffixes (needed for parametrized, e.g. 4-bit, expert parameters).
        rank_pattern, alpha_pattern (`dict[str, int]`, *optional*): PEFT's per-weight ranks and alphas, keyed
        by
            a name or regex matched against the end of full module / parameter names (recipe keys
            ``lora_rank_pattern`` / ``lora_alpha_pattern``).
        **lora_kwargs: passed to `LoraConfig` (e.g. ``use_rslora``, ``modules_to_save``).

    Raises:
        `ValueError`: a rank or alpha pattern key that matches none of the adapted weights (names the key).

    Returns:
        `peft.LoraConfig` with ``task_type="CAUSAL_LM"``.
    """
    from peft import LoraConfig

    if target_modules or target_parameters:
        modules, parameters = list(target_modules or []), list(target_parameters or [])
    elif preset is None:
        raise ValueError("Give a LoRA preset or explicit target_modules / target_parameters.")
    else:
        targets = select_targets(model, preset)
        modules = _names(model, [t.name for t in targets if t.kind == "module"], "module", full_names)
        parameters = _names(model, [t.name for t in targets if t.kind == "parameter"], "parameter",
                            full_names)
    if parameters and dropout:
        logger.warning("lora_dropout=%s is not supported on "
                       "target_parameters (router/fused experts); using 0.",
                       dropout)
        dropout = 0.0
    for recipe_key, pattern in (("lora_rank_pattern", rank_pattern), ("lora_alpha_pattern", alpha_pattern)):
        check_pattern(model, pattern or {}, modules, parameters, recipe_key)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules or None,
                      target_parameters=parameters or None, rank_pattern=dict(rank_pattern or {}),
                      alpha_pattern=dict(alpha_pattern or {}), **lora_kwargs)


def check_pattern(model: nn.Module, pattern: dict[str, int], target_modules: Sequence[str],
                  target_parameters: Sequence[str], key_name: str = "rank_pattern") -> None:
    """Refuse a PEFT ``rank_pattern``/``alpha_pattern`` key that matches none of the weights LoRA adapts.

    PEFT matches a key as the regex ``(.*\\.)?KEY$`` against the full name of each adapted module (or, for
    ``target_parameters``, the full parameter name) and silently ignores keys that match nothing.

    Raises:
        `ValueError`: naming ``key_name``, the key and a few adapted names.
    """
    adapted = [n for n, _ in model.named_modules() if _matches_suffix(n, target_modules)]
    adapted += [n for n, _ in model.named_parameters() if _matches_suffix(n, target_parameters)]
    for key in pattern:
        try:
            matched = any(re.match(rf"(.*\.)?({key})$", name) for name in adapted)
        except re.error as err:
            raise ValueError(f"{key_name} key {key!r} is not a valid regular expression ({err}).") from None
        if not matched:
            examples = sorted({re.sub(r"\.\d+\.", ".N.", name) for name in adapted})[:8]
            raise ValueError(
                f"{key_name} key {key!r} matches none of the {len(adapted)} weights LoRA adapts here; keys "
                f"match the end of full names such as {examples}. Use e.g. "
                "'experts.gate_up_proj', 'experts.down_proj', 'gate.weight' or 'q_proj'.")


def lora_table(model: nn.Module, lora_config) -> tuple[list[dict], int, int]:
    """Apply ``lora_config`` to ``model`` (use a meta-device model: nothing is allocated) and count.

    Returns:
        `tuple[list[dict], int, int]`: one row per adapted weight (``name``, ``kind``, ``group``, ``shape``,
        ``r``, ``lora_params``), the trainable parameter count and the total parameter count (base +
        adapters).
    """
    from peft import get_peft_model

    by_name = {t.name: t for t in find_targets(model)}
    on_meta = next(model.parameters()).device.type == "meta"
    with torch.device("meta") if on_meta else contextlib.nullcontext(), warnings.catch_warnings():
        # PEFT 0.21 checks rank/alpha pattern keys against target_modules only and warns wrongly for parameter
        # keys
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_WARNING, category=FutureWarning)
        peft_model = get_peft_model(model, lora_config)  # adapters of a meta model: no memory
    rows = []
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        name = re.sub(r"\.base_layer", "", module_name.removeprefix("base_model.model."))
        if getattr(module, "parameter_name", None):
            name = f"{name}.{module.parameter_name}"
        count = sum(p.numel() for part in (module.lora_A, module.lora_B) for p in part.parameters())
        target = by_name.get(name)
        rows.append({"name": name, "kind": target.kind if target else "module",
                     "group": target.group if target else "other",
                     "shape": list(target.shape) if target else [], "r": max(module.r.values(), default=0),
                     "lora_params": count})
    rows.sort(key=lambda row: list(by_name).index(row["name"]) if row["name"] in by_name else len(by_name))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return rows, trainable, total


def describe_targets(rows: Iterable[dict]) -> dict[str, int]:
    """Sum LoRA parameters per group (for the ``bimedix targets`` summary)."""
    totals: dict[str, int] = {}
    for row in rows:
        totals[row["group"]] = totals.get(row["group"], 0) + row["lora_params"]
    return totals


def meta_model(model: str, **config_overrides) -> nn.Module:
    """Build a causal LM on the meta device (no weights, no download) from a tiny arch name or a config.

    Args:
        model (`str`): a `bimedix.training.tiny.TINY_CONFIGS` name, a local model folder, a Hub id whose
            config is cached (or shipped with bimedix, see `load_model_config`).
    """
    from transformers import AutoModelForCausalLM

    config = load_model_config(model, **config_overrides)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None)
                                                or torch.bfloat16)


def load_model_config(model: str, **overrides):
    """Load a model config offline: tiny arch name, local folder, bimedix-shipped config, or Hub cache.

    Raises:
        `OSError`: naming the places looked in when none has it.
    """
    from transformers import AutoConfig

    from ..tiny import TINY_CONFIGS, tiny_config

    if model in TINY_CONFIGS:
        return tiny_config(model, **overrides)
    shipped = resource_path("bimedix", "training", "model_configs")
    shipped_file = shipped / (model.replace("/", "--") + ".json")
    if os.path.isdir(model) or not shipped_file.is_file():
        try:
            return AutoConfig.from_pretrained(model, local_files_only=True, **overrides)
        except OSError as err:
            raise OSError(
                f"Cannot load the config of {model!r} offline: not a tiny arch ({sorted(TINY_CONFIGS)}), not "
                f"a local folder, not shipped in {shipped} and not in the Hugging Face cache ({err})."
            ) from err
    return AutoConfig.from_pretrained(shipped_file, **overrides)


# --- helpers -------------------------------------------------------------------------------------------


def _preset_groups(preset: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"Unknown LoRA preset {preset!r}; choose one "
                             f"of {sorted(PRESETS)} or a list of {GROUPS}.")
        return PRESETS[preset]
    unknown = [g for g in preset if g not in GROUPS]
    if unknown:
        raise ValueError(f"Unknown LoRA target group(s) {unknown}; choose from {list(GROUPS)}.")
    return tuple(preset)


def _matches_suffix(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _has_experts_sibling(name: str, modules: dict[str, nn.Module]) -> bool:
    parent = _parent(name)
    return f"{parent}.experts" in modules if parent else "experts" in modules


def _linear_group(name: str, modules: dict[str, nn.Module]) -> str | None:
    leaf = name.rpartition(".")[2]
    if _EXPERT_INDEX.search(name):
        return "experts"
    if "shared_expert" in name:
        return "shared_experts"
    if leaf in ATTENTION_NAMES:
        return leaf
    if leaf in ("gate", "router") and _has_experts_sibling(name, modules):
        return "router"
    if ".mlp." in f".{name}" or ".feed_forward." in f".{name}":
        return "mlp"
    return None


def _parameter_group(module_name: str, param_name: str, param: torch.Tensor,
                     modules: dict[str, nn.Module]) -> str | None:
    leaf = module_name.rpartition(".")[2]
    if leaf == "experts" and param.dim() == 3:
        return "experts"
    if leaf in ("gate", "router") and param_name == "weight" and param.dim() == 2 \
            and _has_experts_sibling(module_name, modules):
        return "router"
    return None


def _names(model: nn.Module, selected: list[str], kind: str, full_names: bool) -> list[str]:
    """The shortest dotted suffixes that match exactly ``selected`` among the model's module/parameter
    names."""
    if full_names or not selected:
        return sorted(selected)
    named = model.named_modules() if kind == "module" else model.named_parameters()
    pool = [n for n, _ in named]
    # suffix -> names it matches (PEFT: equal or ends with .suffix)
    matching: dict[str, set[str]] = defaultdict(set)
    for name in pool:
        parts = name.split(".")
        for i in range(len(parts)):
            matching[".".join(parts[i:])].add(name)
    chosen = set(selected)
    suffixes: set[str] = set()
    for name in selected:
        if any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        parts = name.split(".")
        for i in range(len(parts) - (1 if kind == "module" else 2), -1, -1):
            suffix = ".".join(parts[i:])
            if matching[suffix] <= chosen:
                suffixes.add(suffix)
                break
    return sorted(suffixes)
