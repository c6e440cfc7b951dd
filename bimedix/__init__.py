"""bimedix: bilingual English/Arabic medical chat models on Mixture-of-Experts LLMs (BiMediX, arXiv
2402.13253).

Public objects are imported lazily, so ``import bimedix`` stays fast and optional dependencies
(openai, lm_eval, bitsandbytes) load only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FEATURES": "bimedix.data.schema",
    "RecordError": "bimedix.core.io",
    "make_record": "bimedix.data.schema",
    "validate_record": "bimedix.data.schema",
    "read_records": "bimedix.data.schema",
    "write_jsonl": "bimedix.core.io",
    "OutputFolder": "bimedix.core.outputs",
    "check_outputs": "bimedix.core.outputs",
    "load_mixtral_tokenizer": "bimedix.data.tokenizer",
    "VICUNA_TEMPLATE": "bimedix.training.template",
    "to_messages": "bimedix.training.template",
    "build_tiny_model": "bimedix.training.tiny",
    "save_tiny_model": "bimedix.training.tiny",
    "build_lora_config": "bimedix.training.moe.targets",
    "find_targets": "bimedix.training.moe.targets",
    "RouterLoadCallback": "bimedix.training.router_stats",
    "merge_adapter": "bimedix.training.merge",
    "estimate_memory": "bimedix.training.memory",
    "quantize_experts": "bimedix.training.moe.quantize",
    "dequantize_experts": "bimedix.training.moe.quantize",
    "load_model_with_4bit_experts": "bimedix.training.moe.quantize",
    "set_expert_lora_mode": "bimedix.training.moe.expert_lora",
    "resource_path": "bimedix.resources",
    "build_data": "bimedix.data.build",
    "load_data_recipe": "bimedix.data.recipe",
    "select_for_translation": "bimedix.data.selection",
    "ReviewPolicy": "bimedix.data.review_policy",
    "compute_stats": "bimedix.data.stats",
    "encode_conversations": "bimedix.data.encode",
    "normalize_arabic": "bimedix.data.arabic",
    "normalize_for_match": "bimedix.data.arabic",
    "evaluate": "bimedix.eval.run",
    "format_tables": "bimedix.eval.tables",
    "build_bench": "bimedix.eval.bench",
    "bilingual_consistency": "bimedix.eval.consistency",
    "CONVERTERS": "bimedix.data.converters",
    "SOURCE_INFO": "bimedix.data.converters",
    "MCQAItem": "bimedix.data.mcqa",
    "render_mcqa": "bimedix.data.mcqa",
    "item_to_record": "bimedix.data.mcqa",
    "RejectLog": "bimedix.data.rejects",
    "ChatSession": "bimedix.chat",
    "push": "bimedix.hub.push",
    "render_model_card": "bimedix.hub.cards",
    "render_dataset_card": "bimedix.hub.cards",
    "render_bench_card": "bimedix.hub.cards",
    "ClientConfig": "bimedix.llm.client",
    "LLMClient": "bimedix.llm.client",
    "RequestCache": "bimedix.llm.cache",
    "TranslationConfig": "bimedix.llm.translation",
    "translate_file": "bimedix.llm.translation",
    "DialogueConfig": "bimedix.llm.dialogue",
    "generate_chats_file": "bimedix.llm.dialogue",
    "export_review_queue": "bimedix.llm.review",
    "import_reviews": "bimedix.llm.review",
    "FakeOpenAIServer": "bimedix.llm.fake_server",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bimedix' has no attribute {name!r}")
