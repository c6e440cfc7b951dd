"""Merge a LoRA adapter into its base model, with proof that the merge kept every delta.

MoE merges have silently dropped expert deltas in other tools. `merge_adapter` computes logits on
sample prompts three times, with the base model, with the adapter on top, and with the merged model,
and refuses to write anything when merged and adapter logits differ by more than ``tolerance``
(1e-3 in fp32). The report (``merge_report.json`` next to the weights) records both distances, so a
reader sees that the merge changed the model and matches the adapter.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..core.io import give_default_mode, write_json
from ..core.outputs import OutputFolder, staged_folder
from ..deprecations import quiet_peft_checkpointing_warning
from .provenance import MERGE_REPORT, check_merge
from .template import load_chat_settings, save_chat_settings

logger = logging.getLogger(__name__)

SAMPLE_PROMPTS = (
    "USER: What are the early symptoms of type 2 diabetes? ASSISTANT:",
    "USER: ما هي أعراض ارتفاع ضغط الدم؟ ASSISTANT:",
    "USER: A 45-year-old man has crushing chest pain radiating "
    "to the left arm. What is the next step? ASSISTANT:",
    "USER: هل يمكن تناول الإيبوبروفين مع الباراسيتامول؟ ASSISTANT:",
)


def merge_adapter(base: str, adapter_dir: str | os.PathLike, output_dir: str | os.PathLike | None, *,
                  tolerance: float = 1e-3, dtype: str = "float32", prompts: tuple[str, ...] = SAMPLE_PROMPTS,
                  quantize_experts: str | None = None, force: bool = False, overwrite: bool = False,
                  use_kernels: bool = False) -> dict:
    """Merge ``adapter_dir`` into ``base``, check the logits, and save the merged model with safetensors.

    Args:
        base (`str`): the base model: a local folder, a Hub id in the cache, or ``tiny:<arch>[:<seed>]`` for a
            `bimedix.training.tiny` model (what the tiny recipe trains; its adapter records this name).
        adapter_dir (`str | os.PathLike`): a PEFT adapter folder (``adapter_config.json`` + weights).
        output_dir (`str | os.PathLike`, *optional*): where to write; ``None`` checks without writing.
        tolerance (`float`, *optional*, defaults to `1e-3`): largest allowed |merged - adapter| logit
            difference.
        dtype (`str`, *optional*, defaults to `"float32"`): dtype to load and merge in (the tolerance is for
            fp32).
        prompts (`tuple[str, ...]`, *optional*): the texts whose logits are compared.
        quantize_experts (`str`, *optional*): ``"nf4"``/``"fp4"`` for an adapter trained on 4-bit experts
            (``quantize_experts`` in the recipe): merge into the dequantized 4-bit experts it was trained
            against (`bimedix.training.moe.quantize.dequantize_experts`) instead of the original weights.
        force (`bool`, *optional*, defaults to `False`): merge even when
            `bimedix.training.provenance.check_merge` finds the adapter was trained on another base or is
            merged into ``base`` already (with a warning).
        overwrite (`bool`, *optional*, defaults to `False`): allow a non-empty ``output_dir`` no merge made.
        use_kernels (`bool`, *optional*, defaults to `False`): load the base with hub kernels
            (`bimedix.hub_kernels`).

    Returns:
        `dict`: the report (``max_abs_diff_merged_vs_adapter``, ``max_abs_diff_merged_vs_base``,
        ``merged_adapters``, the fingerprints, ...), also written as ``merge_report.json``: the record that
        the output is a merged model.

    Raises:
        `RuntimeError`: when the merged model does not reproduce the adapter model; nothing is written.
        `bimedix.training.provenance.ProvenanceError`: the adapter does not belong on ``base`` (see
        ``force``). `bimedix.core.outputs.OutputError`: ``output_dir`` is the base or adapter folder (or
        inside one).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    _adapter_config(adapter_dir)
    inputs = {"--adapter": adapter_dir, **({"--base": Path(base)} if Path(base).exists() else {})}
    folder = OutputFolder(output_dir, "merge", inputs=inputs,
                          overwrite=overwrite) if output_dir is not None else None
    model = load_base_model(base, getattr(torch, dtype), use_kernels=use_kernels)
    provenance = check_merge(base, model, adapter_dir, force=force)
    tokenizer = _load_tokenizer(adapter_dir, base)
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = _logits(model, batch)
        with quiet_peft_checkpointing_warning():
            peft_model = PeftModel.from_pretrained(model, adapter_dir)
        if quantize_experts:
            from .moe import quantize

            quantize.quantize_experts(peft_model, quant_type=quantize_experts)
        adapter_logits = _logits(peft_model, batch)
        if quantize_experts:
            # PEFT merges into `param.data`: a temporary on 4-bit experts
            quantize.dequantize_experts(peft_model)
        merged = peft_model.merge_and_unload()
        merged_logits = _logits(merged, batch)
    report = {
        "base": base, "adapter": str(adapter_dir), "dtype": dtype, "prompts": len(prompts),
        "tolerance": tolerance,
        "quantize_experts": quantize_experts,
        "max_abs_diff_merged_vs_adapter": float((merged_logits - adapter_logits).abs().max()),
        "max_abs_diff_merged_vs_base": float((merged_logits - base_logits).abs().max()),
        "max_abs_diff_adapter_vs_base": float((adapter_logits - base_logits).abs().max()),
        "merged": True, **provenance,
    }
    if not report["max_abs_diff_merged_vs_adapter"] <= tolerance:
        raise RuntimeError(
            f"Refusing to write the merged model: its logits differ from the adapter model's by "
            f"{report['max_abs_diff_merged_vs_adapter']:.3g} (> "
            f"tolerance {tolerance:g}) on {len(prompts)} prompts, "
            "so some adapter deltas (often the experts' or the router's) were not merged. "
            f"Merged vs base differ by {report['max_abs_diff_merged_vs_base']:.3g}."
        )
    if report["max_abs_diff_adapter_vs_base"] == 0:
        logger.warning("The adapter in %s does not change the base model's logits (untrained adapter?).",
                       adapter_dir)
    if folder is not None:
        report["output_dir"] = str(folder.root)
        # written whole beside the output, then swapped in: weights and report always belong together
        with staged_folder(folder) as staging:
            merged.save_pretrained(staging.root)
            tokenizer.save_pretrained(staging.root)
            settings = load_chat_settings(adapter_dir)
            if settings is not None:
                save_chat_settings(staging.root, **settings)
            write_json(staging.path(MERGE_REPORT), report)
            # record what the merge wrote; safetensors writes its file with mode 0600
            for path in staging.root.iterdir():
                if path.is_file() and path.name != staging.manifest.name:
                    give_default_mode(staging.path(path.name))
        logger.info("Merged model written to %s", folder.root)
    return report


def load_base_model(base: str, dtype: torch.dtype = torch.float32, *, use_kernels: bool = False):
    """Load a base model by name: ``tiny:<arch>[:<seed>]``, a local folder or a cached Hub id (hub kernels
    only with ``use_kernels``, see `bimedix.hub_kernels`)."""
    from transformers import AutoModelForCausalLM

    from ..hub_kernels import apply_kernels, load_pretrained
    from .tiny import build_tiny_model

    if base.startswith("tiny:"):
        arch, _, seed = base.removeprefix("tiny:").partition(":")
        model = build_tiny_model(arch, seed=int(seed or 0)).to(dtype)
        if use_kernels:
            apply_kernels(model)
        return model
    return load_pretrained(AutoModelForCausalLM, base, use_kernels=use_kernels, dtype=dtype)


def _load_tokenizer(adapter_dir: Path, base: str):
    from transformers import AutoTokenizer

    from ..data.tokenizer import load_mixtral_tokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    elif base.startswith("tiny:"):
        tokenizer = load_mixtral_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def _logits(model, batch) -> torch.Tensor:
    logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]


def adapter_base_name(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter was trained on, as recorded in its ``adapter_config.json``."""
    return _adapter_config(Path(adapter_dir)).get("base_model_name_or_path")


def _adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter folder.")
    return json.loads(path.read_text())
