"""Tiny random causal LMs (MoE and dense) built in-process, for tests, demos and benchmarks.

They use the real Mixtral tokenizer (32,000 pieces, see `bimedix.data.tokenizer`) so that masks,
token counts and chat rendering are the real ones; only the weights are random. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..data.tokenizer import load_mixtral_tokenizer
from .template import apply_vicuna_template

_COMMON = dict(
    vocab_size=32000, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(model_type="mixtral", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=32, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=32, moe_intermediate_size=16, num_experts=4,
                      num_experts_per_tok=2, head_dim=4),
    "olmoe": dict(model_type="olmoe", intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "llama": dict(model_type="llama", intermediate_size=32),
}


def tiny_config(arch: str = "mixtral", **overrides) -> PretrainedConfig:
    """Return the config of a tiny random model of architecture ``arch`` (see `TINY_CONFIGS`).

    Args:
        arch (`str`, *optional*, defaults to `"mixtral"`): one of `TINY_CONFIGS`.
        **overrides: config fields to change (e.g. ``num_hidden_layers=4``).
    """
    if arch not in TINY_CONFIGS:
        raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {sorted(TINY_CONFIGS)}.")
    fields = {**_COMMON, **TINY_CONFIGS[arch], **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_tiny_model(arch: str = "mixtral", seed: int = 0, **overrides) -> PreTrainedModel:
    """Build a tiny random causal LM in fp32 with a fixed seed (same seed, same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)


def save_tiny_model(output_dir: str | os.PathLike, arch: str = "mixtral", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model with the Mixtral tokenizer and Vicuna chat template to ``output_dir``.

    Returns:
        `Path`: a folder `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load
        offline.
    """
    output_dir = Path(output_dir)
    model = build_tiny_model(arch, seed, **overrides)
    tokenizer = load_mixtral_tokenizer()
    apply_vicuna_template(tokenizer)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
