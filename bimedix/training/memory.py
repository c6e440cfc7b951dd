"""How much memory a recipe needs, from its model config alone (meta device: no weights, no download).

`estimate_memory` reads a recipe, builds its model on the meta device, and adds up:

- parameter bytes by part (attention, router, experts, shared experts, dense MLP, embeddings, other) and
  by storage dtype, following what bitsandbytes really does: ``load_in_4bit``/``load_in_8bit`` quantize
  ``nn.Linear`` layers only, so a transformers-5 MoE's router and fused 3-D experts stay in the compute
  dtype (bf16), which is most of the model. bimedix's own 4-bit experts (``quantize_experts``) change that;
- the adapter (or full model) being trained, its gradients and AdamW states;
- activations per micro-batch (``per_device_train_batch_size`` x ``max_length``), with and without
  activation checkpointing, plus the fp32 logits and the transient full expert weight PEFT builds when it
  adapts fused experts.

The figures are estimates for one process without sharding (ZeRO-3/FSDP divide parameters, gradients
and optimizer states by the number of processes); CUDA context and allocator slack are not included.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

PARTS = ("attention", "router", "experts", "shared_experts", "mlp", "embeddings", "other")
GIB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit block absmax (block 64) + double-quant fp32 stats
INT8_BYTES = 1 + 4 / 4096  # int8 codes + row-wise fp32 scales (rough)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def estimate_memory(recipe: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Estimate the training memory of a recipe (see the module docstring for what is counted).

    Args:
        recipe (`str | os.PathLike`): a YAML recipe for ``recipes/sft.py``.
        overrides (`list[str]`, *optional*): extra ``--key value`` flags, as on the command line.

    Returns:
        `dict`: ``model``, ``parameters`` (bytes by part and by storage), ``trainable``, ``activations``,
        ``totals`` and ``notes``.
    """
    from .sft import parse_args

    # `use_cpu` lets a bf16 GPU recipe parse on a machine without the GPU; nothing runs here
    _, training, model_args, _, bimedix = parse_args(["--config", str(recipe), "--use_cpu", "true", *(overrides or [])])
    model = _meta_model(model_args, bimedix)
    dtype = _compute_dtype(model_args.dtype)
    quantization = "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None
    quantize_experts = bool(getattr(bimedix, "quantize_experts", False))
    parts = parameter_parts(model)
    params = parameter_bytes(model, parts, dtype, quantization, quantize_experts)
    trainable = trainable_bytes(model, model_args, bimedix, quantization, training.optim)
    # the folded expert LoRA builds no W + ΔW; on 4-bit experts one layer is still dequantized just in time
    folded = getattr(bimedix, "expert_lora", "peft") == "folded" and not quantize_experts
    activations = activation_bytes(model.config, training.per_device_train_batch_size, training.max_length or 1024,
                                   dtype, 0 if folded else trainable["expert_lora"])
    checkpointing = bool(training.activation_checkpointing)
    act_total = activations["checkpointed" if checkpointing else "full"]
    totals = {
        "parameters": params["total"],
        "trainable_states": trainable["total"],
        "activations": act_total,
        "all": params["total"] + trainable["total"] + act_total,
    }
    return {
        "model": model_args.model_name_or_path or f"tiny:{bimedix.tiny_model}",
        "model_type": model.config.model_type, "compute_dtype": str(dtype).removeprefix("torch."),
        "quantization": quantization, "quantize_experts": quantize_experts,
        "micro_batch": {"per_device_train_batch_size": training.per_device_train_batch_size,
                        "max_length": training.max_length, "activation_checkpointing": checkpointing},
        "parameters": params, "trainable": trainable, "activations": activations, "totals": totals,
        "notes": _notes(params, quantization, quantize_experts),
    }


def parameter_parts(model: torch.nn.Module) -> dict[str, str]:
    """Map every parameter name to one of `PARTS`."""
    from .targets import ATTENTION_NAMES, find_targets

    by_name = {}
    for target in find_targets(model):
        group = "attention" if target.group in ATTENTION_NAMES else target.group
        if target.kind == "parameter":
            by_name[target.name] = group
        else:
            by_name[f"{target.name}.weight"] = by_name[f"{target.name}.bias"] = group
    parts = {}
    for name, _ in model.named_parameters():
        if name in by_name:
            parts[name] = by_name[name]
        elif "embed" in name or name.startswith("lm_head"):
            parts[name] = "embeddings"
        else:
            parts[name] = "other"
    return parts


def parameter_bytes(model: torch.nn.Module, parts: dict[str, str], dtype: torch.dtype, quantization: str | None,
                    quantize_experts: bool = False) -> dict:
    """Bytes of the frozen model by part and by storage, as bitsandbytes (and bimedix) would store it."""
    linear_weights = {f"{n}.weight" for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.startswith("lm_head")}
    by_part: dict[str, float] = defaultdict(float)
    by_storage: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        part = parts[name]
        if quantization and name in linear_weights:
            storage, per = ("nf4", NF4_BYTES) if quantization == "4bit" else ("int8", INT8_BYTES)
        elif quantize_experts and part == "experts":
            storage, per = "nf4", NF4_BYTES
        else:
            storage, per = str(dtype).removeprefix("torch."), dtype.itemsize
        by_part[part] += param.numel() * per
        by_storage[storage] += param.numel() * per
        counts[part] += param.numel()
    return {"by_part": {p: by_part[p] for p in PARTS if p in by_part},
            "by_storage": dict(by_storage), "counts": {p: counts[p] for p in PARTS if p in counts},
            "total": sum(by_part.values())}


def trainable_bytes(model: torch.nn.Module, model_args, bimedix, quantization: str | None, optim: str) -> dict:
    """Adapter (or full model) weights, gradients and AdamW states."""
    from .sft import make_peft_config
    from .targets import lora_table

    states = 2
    if model_args.use_peft:
        rows, n_trainable, _ = lora_table(model, make_peft_config(model, model_args, bimedix))
        per = 2 if quantization else 4  # TRL casts QLoRA adapters to bf16; PEFT keeps others in fp32
        state_per = 1 if "8bit" in str(optim) else per
        expert_lora = sum(row["lora_params"] for row in rows if row["group"] == "experts")
    else:
        n_trainable = sum(p.numel() for p in model.parameters())
        per, state_per, expert_lora = _compute_dtype(model_args.dtype).itemsize, 4, 0
    weights, grads, optimizer = n_trainable * per, n_trainable * per, n_trainable * state_per * states
    return {"parameters": n_trainable, "weights": weights, "gradients": grads, "optimizer": optimizer,
            "expert_lora": expert_lora, "total": weights + grads + optimizer}


def activation_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype, expert_lora: int = 0) -> dict:
    """Rough activation memory of one micro-batch (SDPA attention: no stored attention matrix).

    Per token and layer: attention keeps about ``6H + 2*kv`` values, an MoE layer ``E`` fp32 router logits and
    ``k*(2H + 3I)`` expert values (a dense MLP: ``2H + 3I``). Checkpointing keeps each layer's input and one
    layer's full activations. Logits: fp32 ``V`` values twice (logits and their gradient).
    """
    config = config.get_text_config()
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", 1) or 1
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    tokens, size = batch_size * seq_len, dtype.itemsize
    attention = (6 * hidden + 2 * kv) * size
    mlp = (experts * 4 + top_k * (2 * hidden + 3 * inter) * size) if experts else (2 * hidden + 3 * inter) * size
    layer = tokens * (attention + mlp)
    logits = tokens * vocab * 4 * 2
    expert_transient = experts * 3 * hidden * inter * size if experts and expert_lora else 0
    return {
        "per_layer": layer, "logits": logits, "expert_lora_transient": expert_transient,
        "full": layers * layer + logits + expert_transient,
        "checkpointed": layers * tokens * hidden * size + layer + logits + expert_transient,
    }


def format_report(report: dict) -> str:
    """A plain-text table of `estimate_memory`'s report (GiB)."""
    p, t, a = report["parameters"], report["trainable"], report["activations"]
    mb = report["micro_batch"]
    lines = [f"Model: {report['model']} ({report['model_type']}), compute dtype {report['compute_dtype']}, "
             f"quantization {report['quantization'] or 'none'}"
             + (", bimedix 4-bit experts" if report["quantize_experts"] else ""),
             "", "Frozen parameters by part:"]
    for part, size in p["by_part"].items():
        lines.append(f"  {part:<15} {_count(p['counts'][part])} params {_gib(size)}")
    lines.append("  by storage: " + ", ".join(f"{k} {_gib(v).strip()}" for k, v in p["by_storage"].items()))
    lines += ["", f"Trainable: {_count(t['parameters']).strip()} params",
              f"  weights {_gib(t['weights'])}  gradients {_gib(t['gradients'])}  AdamW states {_gib(t['optimizer'])}",
              "", f"Activations per micro-batch ({mb['per_device_train_batch_size']} x {mb['max_length']} tokens):",
              f"  one layer {_gib(a['per_layer'])}  logits {_gib(a['logits'])}"
              f"  PEFT fused-expert transient {_gib(a['expert_lora_transient'])}",
              f"  all layers kept {_gib(a['full'])}  with activation checkpointing {_gib(a['checkpointed'])}"
              f"  (recipe: {'on' if mb['activation_checkpointing'] else 'off'})",
              "", f"Total per process: {_gib(report['totals']['all']).strip()}", ""]
    lines += [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def _notes(params: dict, quantization: str | None, quantize_experts: bool) -> list[str]:
    notes = ["Estimates for one process without sharding; ZeRO-3/FSDP divide parameters, gradients and optimizer "
             "states by the number of processes. CUDA context and allocator slack are not included."]
    unquantized = params["by_part"].get("experts", 0) + params["by_part"].get("router", 0)
    if quantization and not quantize_experts and unquantized:
        notes.append(
            f"bitsandbytes load_in_{quantization} quantizes nn.Linear layers only: the router and the fused 3-D "
            f"experts stay in the compute dtype ({_gib(unquantized).strip()} here), and peft's "
            "prepare_model_for_kbit_training would upcast them to fp32 (twice that). bimedix's 4-bit experts "
            "(`quantize_experts`) store them in nf4.")
    return notes


def _gib(size: float) -> str:
    return f"{size / GIB:9.3f} GiB" if size >= GIB / 10 or size == 0 else f"{size / 1024**2:9.3f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:9.3f} B" if n >= 1e8 else f"{n / 1e6:9.3f} M"


def _compute_dtype(name: str | None) -> torch.dtype:
    return _DTYPES.get(name or "bfloat16", torch.bfloat16)


def _meta_model(model_args, bimedix) -> torch.nn.Module:
    from .targets import meta_model

    name = bimedix.tiny_model or model_args.model_name_or_path
    if not name:
        raise ValueError("The recipe sets neither `model_name_or_path` nor `tiny_model`.")
    return meta_model(name)
