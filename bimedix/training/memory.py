"""How much GPU memory a recipe needs per process, from its model config alone (meta device: no weights).

`estimate_memory` reads a recipe, builds its model on the meta device once (`model_facts`: parameter counts by
part, which of them are ``nn.Linear`` weights, the adapter size), and `estimate` turns those counts and the
run's settings (`Settings`: quantization, micro-batch, processes, sharding) into bytes per process:

- **frozen parameters** by part and by storage, as bitsandbytes and bimedix store them: ``load_in_4bit``
  quantizes ``nn.Linear`` layers only (attention, dense/shared MLPs), so a transformers-5 MoE's router and
  fused 3-D experts stay in the compute dtype unless bimedix packs the experts (``quantize_experts: nf4``);
  both together give 4-bit Linears, 4-bit experts and a bf16 router;
- **trainable states**: adapter (or full model) weights, gradients and AdamW states, in the precision each
  launcher keeps them (PEFT: fp32 adapters, bf16 under bitsandbytes where TRL casts them; DeepSpeed: bf16
  weights and gradients with an fp32 master copy in the optimizer), sharded as the accelerate config says
  (`Sharding`: DDP none; ZeRO-1 optimizer; ZeRO-2 gradients + optimizer; ZeRO-3 / FSDP parameters too);
- **activations** of one micro-batch (`activation_bytes`) and the **transients** of one step: the expert
  weight PEFT's fused-expert LoRA materialises (W + ΔW), the 4-bit expert dequantized just in time, the
  layer ZeRO-3/FSDP gathers, AdamW's ``foreach`` temporaries.

`fits` compares the total, plus a fixed CUDA context reserve, with common GPUs, and `suggest` searches the
smallest change of settings that fits a GPU that is too small. docs/training.md ("Memory") and the
validation in ``benchmarks/memory_estimate.py`` say what was measured.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .moe.targets import ATTENTION_NAMES, find_targets, lora_table

PARTS = ("attention", "router", "experts", "shared_experts", "mlp", "embeddings", "other")
GIB = 1024**3
# 4-bit codes + 8-bit block absmax (block 64) + double-quant fp32 stats
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1 + 4 / 4096  # int8 codes + row-wise fp32 scales (rough)
# CUDA context, cuBLAS/NCCL workspaces and allocator slack, added before comparing to a GPU
CUDA_RESERVE = 1.0 * GIB
#: Share of a GPU a faster checkpointing setting must leave free (the estimate's measured error is within 5%).
HEADROOM = 0.10
#: Common GPUs by nominal size: (label, examples, memory nvidia-smi reports in MiB).
GPUS = (
    ("16 GB", "V100-16GB, RTX 4080", 16384),
    ("24 GB", "RTX 3090/4090, A10", 24564),
    ("48 GB", "L40S, A40, RTX 6000 Ada", 46068),
    ("80 GB", "A100-80GB, H100", 81559),
    ("141 GB", "H200", 143771),
)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, always on in `SFTTrainer`'s loss) projects
#: tiles of at most this many tokens x vocabulary pieces (`trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE`,
#: `trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`) and never holds the micro-batch's logits.
LM_HEAD_TILE = (4096, 32768)


@dataclass(frozen=True)
class Sharding:
    """What the launcher divides across processes (and what it keeps in CPU memory instead of the GPU).

    Args:
        name (`str`): label, e.g. ``"DeepSpeed ZeRO-2"``.
        kind (`str`): ``"single"``, ``"ddp"``, ``"deepspeed"`` or ``"fsdp"``.
        parameters, gradients, optimizer (`bool`): sharded across the processes.
        offload_parameters, offload_optimizer (`bool`): kept in CPU memory.
    """

    name: str
    kind: str
    parameters: bool = False
    gradients: bool = False
    optimizer: bool = False
    offload_parameters: bool = False
    offload_optimizer: bool = False


STRATEGIES = {
    "single": Sharding("one process", "single"),
    "ddp": Sharding("DDP", "ddp"),
    "zero1": Sharding("DeepSpeed ZeRO-1", "deepspeed", optimizer=True),
    "zero2": Sharding("DeepSpeed ZeRO-2", "deepspeed", gradients=True, optimizer=True),
    "zero3": Sharding("DeepSpeed ZeRO-3", "deepspeed", parameters=True, gradients=True, optimizer=True),
    "fsdp": Sharding("FSDP FULL_SHARD", "fsdp", parameters=True, gradients=True, optimizer=True),
}


@dataclass(frozen=True)
class Settings:
    """The run settings the memory depends on (read from a recipe by `settings_from_recipe`)."""

    compute_dtype: str = "bfloat16"
    quantization: str | None = None  # bitsandbytes on nn.Linear: "4bit" | "8bit"
    quantize_experts: bool = False  # bimedix NF4 fused experts
    expert_lora: str = "peft"  # "peft" | "folded"
    batch_size: int = 1
    max_length: int = 1024
    padding_free: bool = False  # a micro-batch's samples in one row: sdpa then builds a row x row mask
    checkpointing: bool = True
    checkpoint_every: int = 1  # transformers' `every_n_layers`: layers 0, n, 2n... are checkpointed
    checkpoint_offload: bool = False  # transformers' `offload`: checkpointed layers' inputs in host memory
    optim: str = "adamw_torch"
    num_processes: int = 1
    sharding: Sharding = STRATEGIES["single"]


def estimate_memory(recipe: str | os.PathLike, overrides: list[str] | None = None, *, num_processes: int
                    | None = None,
                    accelerate_config: str | os.PathLike | None = None, gpu: float | None = None) -> dict:
    """Estimate the per-process training memory of a recipe.

    Args:
        recipe (`str | os.PathLike`): a YAML recipe for ``recipes/sft.py``.
        overrides (`list[str]`, *optional*): extra ``--key value`` recipe flags, as on the command line.
        num_processes (`int`, *optional*): processes (GPUs); default: the accelerate config's, else 1.
        accelerate_config (`str | os.PathLike`, *optional*): an accelerate YAML (its path), or a `STRATEGIES`
            name; default: FSDP when the recipe sets ``fsdp``, else DDP, when ``num_processes`` > 1; else one
            process.
        gpu (`float`, *optional*): the GPU the run is meant for, in GB (see `gpu_memory`).

    Returns:
        `dict`: see `estimate`, plus ``model``, ``recipe`` and, with ``gpu``, ``stated_gpu``: ``gb``,
        ``memory``, ``fits``, ``suggestion`` (see `suggest`; None when it fits or nothing tried fits) and
        ``faster`` (see `faster_checkpointing`; None when it does not fit or nothing faster fits) and
        ``fewer_micro_batches`` (see `fewer_micro_batches`; None likewise).
    """
    from .sft import load_recipe

    _, training, model_args, _, bimedix = load_recipe(recipe, overrides or (), use_cpu=True)
    model = bimedix.meta_model(model_args.model_name_or_path)
    facts = model_facts(model, model_args, bimedix)
    sharding, config_processes = read_accelerate_config(accelerate_config, num_processes)
    if accelerate_config is None and training.fsdp and (num_processes or 1) > 1:  # `fsdp: true` in the recipe
        resharded = str((training.fsdp_config or {}).get("reshard_after_forward", True)).lower() == "true"
        sharding = STRATEGIES["fsdp"] if resharded else Sharding("FSDP SHARD_GRAD_OP", "fsdp", gradients=True,
                                                                  optimizer=True)
    settings = settings_from_recipe(training, model_args, bimedix, sharding=sharding,
                                    num_processes=num_processes or config_processes)
    report = estimate(facts, settings)
    report["model"] = model_args.model_name_or_path or f"tiny:{bimedix.tiny_model}"
    report["recipe"] = str(recipe)
    if gpu is not None:
        memory = gpu_memory(gpu)
        fit = report["totals"]["all"] + CUDA_RESERVE <= memory
        found = None if fit else suggest(facts, settings, memory)
        faster = faster_checkpointing(facts, settings, memory) if fit else None
        samples = training.per_device_train_batch_size * training.gradient_accumulation_steps
        batching = fewer_micro_batches(facts, settings, memory, samples,
                                       packing=bool(training.packing)) if fit else None
        report["stated_gpu"] = {
            "gb": gpu, "memory": memory, "fits": fit,
            "suggestion": found and {"changes": found["changes"], "total": found["total"]},
            "faster": faster and {key: faster[key] for key in ("change", "recomputed", "total")},
            "fewer_micro_batches": batching and {key: batching[key] for key in ("change", "micro_batches",
                                                                                 "samples", "total")}}
    report["micro_batches"] = training.gradient_accumulation_steps
    return report


def settings_from_recipe(training, model_args, bimedix, *, num_processes: int = 1,
                         sharding: Sharding = STRATEGIES["single"], batch_size: int | None = None,
                         max_length: int | None = None) -> Settings:
    """The `Settings` of a recipe's `SFTConfig`, `ModelConfig` and `BimedixArguments`; ``batch_size`` and
    ``max_length`` replace the recipe's micro-batch (e.g. 1 x the longest row actually drawn)."""
    checkpoint_kwargs = training.activation_checkpointing_kwargs or {}
    return Settings(
        compute_dtype=model_args.dtype or "bfloat16",
        quantization="4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None,
        quantize_experts=bool(bimedix.quantize_experts), expert_lora=bimedix.expert_lora,
        batch_size=batch_size or training.per_device_train_batch_size,
        max_length=max_length or training.max_length or 1024,
        padding_free=bool(training.padding_free or (training.packing and getattr(  # TRL's own for bfd packing
            training, "packing_strategy", "bfd") in ("bfd", "bfd_split"))),
        checkpointing=bool(training.activation_checkpointing),
        checkpoint_every=int(checkpoint_kwargs.get("every_n_layers", 1)),
        checkpoint_offload=bool(checkpoint_kwargs.get("offload", False)),
        optim=str(getattr(training.optim, "value", training.optim)), num_processes=num_processes,
        sharding=sharding)


def model_facts(model: torch.nn.Module, model_args=None, bimedix=None, peft_config=None) -> dict:
    """Everything `estimate` needs from the model: counts by part, Linear weights, adapter size, dimensions.

    Args:
        model (`torch.nn.Module`): the model (meta device is enough).
        model_args, bimedix: the recipe's `ModelConfig` and `BimedixArguments` (for the LoRA config), or
        peft_config (`peft.LoraConfig`, *optional*): the adapter; neither: full fine-tuning.
    """

    parts = parameter_parts(model)
    linear_weights = {f"{n}.weight" for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.startswith("lm_head")}
    counts: dict[str, int] = defaultdict(int)
    linear_counts: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        counts[parts[name]] += param.numel()
        if name in linear_weights:
            linear_counts[parts[name]] += param.numel()
    largest_expert = max((p.numel() for n, p in model.named_parameters() if parts[n] == "experts"), default=0)
    if peft_config is None and model_args is not None and model_args.use_peft:
        from .sft import make_peft_config

        peft_config = make_peft_config(model, model_args, bimedix)
    if peft_config is not None:
        rows, trainable, _ = lora_table(model, peft_config)  # wraps `model` in place: counted above
        expert_lora = sum(row["lora_params"] for row in rows if row["group"] == "experts")
    else:
        trainable, expert_lora = sum(counts.values()), 0
    config = model.config.get_text_config()
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "model_type": model.config.model_type,
        "counts": {p: counts[p] for p in PARTS if p in counts},
        "linear_counts": {p: linear_counts[p] for p in PARTS if p in linear_counts},
        "peft": peft_config is not None, "trainable": trainable, "expert_lora": expert_lora,
        "largest_expert_parameter": largest_expert,
        "layer_parameters": sum(counts.values()) / config.num_hidden_layers,
        "dims": {"hidden": config.hidden_size, "layers": config.num_hidden_layers, "vocab": config.vocab_size,
                 "q": heads * head_dim, "kv": (getattr(config, "num_key_value_heads", None)
                                               or heads) * head_dim,
                 "experts": experts, "top_k": (getattr(config, "num_experts_per_tok", 1) or 1) if experts
                 else 0,
                 "intermediate": getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
                 "lora_r": getattr(peft_config, "r", 0) if peft_config is not None else 0},
    }


def estimate(facts: dict, settings: Settings) -> dict:
    """Bytes per process of a run (see the module docstring); pure arithmetic on `model_facts`.

    Returns:
        `dict`: ``settings``, ``parameters`` (``by_part``, ``by_storage``, ``counts``, ``total``),
        ``trainable``, ``activations``, ``transients``, ``totals`` (``parameters``, ``trainable_states``,
        ``activations``, ``transients``, ``all``), ``gpus`` (see `fits`), ``notes``, ``layers`` and
        ``recomputed_layers`` (checkpointed ones, whose forward runs again in backward).
    """
    dtype = _DTYPES.get(settings.compute_dtype, torch.bfloat16)
    n, shard = max(settings.num_processes, 1), settings.sharding
    params = parameter_bytes(facts, dtype, settings.quantization, settings.quantize_experts)
    trainable = trainable_bytes(facts, settings, dtype)
    activations = activation_bytes(facts["dims"], settings.batch_size, settings.max_length, dtype,
                                   adapter_bytes=trainable["bytes_per_weight"] if facts["peft"] else 0,
                                   every=settings.checkpoint_every, offload=settings.checkpoint_offload,
                                   packed=settings.padding_free)
    transients = transient_bytes(facts, settings, dtype, params, trainable)
    param_total = 0 if shard.offload_parameters else params["total"] / (n if shard.parameters else 1)
    act_total = activations["checkpointed" if settings.checkpointing else "full"]
    # forward/backward transients come on top of the activations (a 4-bit expert is dequantized from the layer
    # ZeRO-3 / FSDP gathered: both at once); the optimizer step comes after backward freed them, so the step's
    # peak is the larger of the two phases
    during_backward = act_total + transients.get("expert_weights", 0) + transients.get("gathered_layers", 0)
    step_peak = max(during_backward, transients.get("optimizer_step", 0))
    totals = {"parameters": param_total, "trainable_states": trainable["total"], "activations": act_total,
              "transients": step_peak - act_total}
    totals["all"] = sum(totals.values())
    return {"model_type": facts["model_type"], "settings": {**asdict(settings), "sharding": asdict(shard)},
            "parameters": params, "trainable": trainable, "activations": activations,
            "transients": transients,
            "totals": totals, "gpus": fits(totals["all"]), "notes": _notes(params, settings),
            "layers": facts["dims"]["layers"], "recomputed_layers": checkpointed_layers(
                facts["dims"]["layers"], settings.checkpoint_every) if settings.checkpointing else 0}


def parameter_parts(model: torch.nn.Module) -> dict[str, str]:
    """Map every parameter name to one of `PARTS`."""

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


def parameter_bytes(facts: dict, dtype: torch.dtype, quantization: str | None,
                    quantize_experts: bool = False) -> dict:
    """Bytes of the frozen model by part and by storage, as bitsandbytes (and bimedix) store it.

    bitsandbytes packs the ``nn.Linear`` weights of each part; bimedix packs the fused 3-D experts; the rest
    (router, embeddings, norms, biases) stays in the compute dtype.
    """
    by_part: dict[str, float] = defaultdict(float)
    by_storage: dict[str, float] = defaultdict(float)
    plain = str(dtype).removeprefix("torch.")
    for part, count in facts["counts"].items():
        linear = facts["linear_counts"].get(part, 0) if quantization else 0
        if quantize_experts and part == "experts":
            # fused experts are not Linears; bimedix packs them (per-expert Linears: bitsandbytes)
            linear = count
        nf4 = quantization == "4bit" or (part == "experts" and quantize_experts)
        packed, per = ("nf4", NF4_BYTES) if nf4 else ("int8", INT8_BYTES)
        for storage, number, size in ((packed, linear, per), (plain, count - linear, dtype.itemsize)):
            if number:
                by_part[part] += number * size
                by_storage[storage] += number * size
    return {"by_part": {p: by_part[p] for p in PARTS if p in by_part}, "by_storage": dict(by_storage),
            "counts": dict(facts["counts"]), "total": sum(by_part.values())}


def trainable_bytes(facts: dict, settings: Settings, dtype: torch.dtype) -> dict:
    """Adapter (or full model) weights, gradients and optimizer states per process, after sharding.

    PEFT keeps adapters in fp32; TRL casts them to bf16 when the model is bitsandbytes-quantized (QLoRA).
    Full fine-tuning keeps the weights in the compute dtype. DeepSpeed (bf16) holds the trainable weights and
    their gradients in bf16 plus an fp32 master copy and fp32 gradient partition in the optimizer. AdamW keeps
    two states in the weights' precision (torch; fp32 for DeepSpeed); 8-bit optimizers one byte each.
    DDP also keeps one gradient copy in its all-reduce buckets.
    """
    count = facts["trainable"]
    n, shard = max(settings.num_processes, 1), settings.sharding
    per = dtype.itemsize if not facts["peft"] else 2 if settings.quantization else 4
    deepspeed = shard.kind == "deepspeed"
    if deepspeed:
        per = min(per, 2)
    states_per = 1 if "8bit" in settings.optim else 4 if deepspeed or per == 4 else per
    weights = count * per / (n if shard.parameters else 1)
    gradients = count * per / (n if shard.gradients else 1)
    optimizer = count * 2 * states_per + (count * (4 + 4) if deepspeed else 0)  # + fp32 master and fp32 grads
    optimizer = 0 if shard.offload_optimizer else optimizer / (n if shard.optimizer else 1)
    buckets = count * per if shard.kind == "ddp" and n > 1 else 0
    return {"parameters": count, "bytes_per_weight": per, "expert_lora": facts["expert_lora"],
            "weights": weights,
            "gradients": gradients, "optimizer": optimizer, "ddp_buckets": buckets,
            "total": weights + gradients + optimizer + buckets}


def activation_bytes(dims: dict, batch_size: int, seq_len: int, dtype: torch.dtype,
                     adapter_bytes: int = 0, every: int = 1, offload: bool = False,
                     packed: bool = False) -> dict:
    """Activation memory of one micro-batch kept for backward (SDPA attention: no stored attention matrix).

    Per token and layer, in the compute dtype unless said: attention keeps its input, the normed input, q, k,
    v, the attention output and the o_proj output (``5H + q + 2kv``); an adapted q/k/v Linear with fp32
    adapters keeps its input cast to fp32 and its rank-r product (``3 (4H + 4r)`` bytes); an MoE layer keeps
    its input and normed input (``2H``), fp32 router logits and probabilities (``8E`` bytes), and per routed
    copy the gathered input, the gate and up projections, the activation, the gated product and the down
    projection (``k (2H + 4I)``); a dense MLP ``2H + 4I``. With checkpointing each checkpointed layer keeps
    its input (none on the device with ``offload``), the others everything (``every``: transformers'
    ``every_n_layers``, layers 0, n, 2n... are checkpointed), and one layer is recomputed at a time. The LM
    head (``logits``: TRL's fused, chunked log-probabilities, `LM_HEAD_TILE`) keeps the trained positions'
    hidden states and fp32 per-token statistics, and in backward holds one logits tile plus the hidden states'
    fp32 gradient and its cast (``H (2 size + 4) + 32`` bytes per token, plus the tile). With ``packed``
    (padding-free) the micro-batch's samples share one row, for which transformers builds a boolean row x row
    mask (``mask``), and sdpa an additive copy of it in the compute dtype while it attends.
    """
    hidden, vocab, layers = dims["hidden"], dims["vocab"], dims["layers"]
    inter, experts, top_k = dims["intermediate"], dims["experts"], dims["top_k"]
    tokens, size = batch_size * seq_len, dtype.itemsize
    attention = (5 * hidden + dims["q"] + 2 * dims["kv"]) * size
    if adapter_bytes == 4 and dtype.itemsize < 4:
        attention += 3 * (4 * hidden + 4 * dims["lora_r"])
    if experts:
        mlp = 8 * experts + (2 * hidden + top_k * (2 * hidden + 4 * inter)) * size
    else:
        mlp = (2 * hidden + 4 * inter) * size
    layer = tokens * (attention + mlp)
    tile = min(tokens, LM_HEAD_TILE[0]) * min(vocab, LM_HEAD_TILE[1]) * size
    logits = tokens * (hidden * (2 * size + 4) + 32) + tile
    # kept as long as the activations (the recomputed layers read it), plus sdpa's copy while it attends
    mask = tokens * tokens * (1 + size) if packed and batch_size > 1 else 0
    checkpointed = checkpointed_layers(layers, every)
    kept_input = 0 if offload else tokens * hidden * size
    return {
        "per_layer": layer, "logits": logits, "mask": mask,
        "full": layers * layer + logits + mask,
        "checkpointed": checkpointed * kept_input + (layers - checkpointed) * layer + layer + logits + mask,
    }


def checkpointed_layers(layers: int, every: int = 1) -> int:
    """How many of ``layers`` decoder layers transformers checkpoints with ``every_n_layers=every``."""
    return math.ceil(layers / max(every, 1))


def transient_bytes(facts: dict, settings: Settings, dtype: torch.dtype, params: dict,
                    trainable: dict) -> dict:
    """Short-lived memory of one step; `estimate` adds the largest of them that overlaps the activations, or
    the optimizer step's when that is larger (it comes after backward has freed the activations).

    - PEFT's LoRA on fused experts builds ΔW and ``W + ΔW`` for a whole expert parameter on every forward and
      recompute: two expert parameters in the compute dtype, three when W is 4-bit and dequantized first.
    - bimedix's folded path builds nothing for bf16 experts; 4-bit experts are dequantized one parameter at a
      time, just in time: one expert parameter in the compute dtype, or, with activation checkpointing, every
      expert parameter of one layer (the recomputation keeps them for that layer's backward).
    - ZeRO-3 / FSDP gather a layer's parameters before use and prefetch the next: two layers (frozen weights
      and adapter), plus the computing layer's unsharded trainable gradients twice (autograd's and the
      reduce-scatter's input).
    - torch's AdamW ``foreach`` step (``adamw_torch`` on CUDA) allocates temporaries the size of the trainable
      weights (the fused and 8-bit optimizers update in place).
    """
    size, n = dtype.itemsize, max(settings.num_processes, 1)
    out = {}
    if facts["expert_lora"] and settings.expert_lora != "folded":
        copies = 3 if settings.quantize_experts else 2  # (dequantized W), ΔW, W + ΔW
        out["expert_weights"] = copies * facts["largest_expert_parameter"] * size
    elif settings.quantize_experts and settings.checkpointing:
        out["expert_weights"] = facts["counts"].get("experts", 0) / max(facts["dims"]["layers"], 1) * size
    elif settings.quantize_experts:
        out["expert_weights"] = facts["largest_expert_parameter"] * size
    if settings.sharding.parameters and n > 1:
        # the layer computing and the one prefetched are gathered whole, frozen weights and adapter alike; in
        # backward the computing layer's trainable gradients exist unsharded, and again as the
        # reduce-scatter's input
        frozen_layer = facts["layer_parameters"] * params["total"] / max(sum(params["counts"].values()), 1)
        trainable_layer = trainable["parameters"] * trainable["bytes_per_weight"] / facts["dims"]["layers"]
        out["gathered_layers"] = (2 * (frozen_layer + trainable_layer) + 2 * trainable_layer if facts["peft"]
                                  else 4 * frozen_layer)
    if settings.optim == "adamw_torch" and not settings.sharding.offload_optimizer:
        out["optimizer_step"] = trainable["weights"]
    return {k: v for k, v in out.items() if v}


def fits(total: float, reserve: float = CUDA_RESERVE) -> list[dict]:
    """Which `GPUS` hold ``total`` bytes plus ``reserve``, and the room left on each."""
    return [{"gpu": label, "examples": examples, "memory": mib * 2**20, "fits": total + reserve <= mib
             * 2**20,
             "room": mib * 2**20 - total - reserve} for label, examples, mib in GPUS]


def gpu_memory(gb: float) -> float:
    """Bytes of a GPU given by its nominal size in GB (a `GPUS` size, else taken as GiB)."""
    for label, _, mib in GPUS:
        if float(label.split()[0]) == gb:
            return mib * 2**20
    return gb * GIB


def suggest(facts: dict, settings: Settings, memory: float, reserve: float = CUDA_RESERVE) -> dict | None:
    """The smallest change of ``settings`` whose estimate fits ``memory`` bytes, or None if none does.

    Changes are tried one at a time, then in pairs and triples, in order of how little they change the run:
    activation checkpointing, 4-bit experts, 4-bit Linears, a sharding strategy with the same processes, an
    8-bit optimizer, micro-batch 1 (with more accumulation), half the sequence length.

    Returns:
        `dict`: ``changes`` (descriptions with the recipe flags), ``settings`` and ``total`` bytes.
    """
    changes = _changes(facts, settings)
    for size in range(1, 4):
        for combo in itertools.combinations(changes, size):
            new = settings
            for _, update in combo:
                new = replace(new, **update)
            total = estimate(facts, new)["totals"]["all"]
            if total + reserve <= memory:
                return {"changes": [label for label, _ in combo], "settings": new, "total": total}
    return None


def faster_checkpointing(facts: dict, settings: Settings, memory: float, reserve: float = CUDA_RESERVE,
                         headroom: float = HEADROOM) -> dict | None:
    """The activation checkpointing that recomputes the fewest layers and still leaves ``headroom`` of
    ``memory`` free: off, else transformers' ``every_n_layers`` as large as fits. Recomputing a layer repeats
    its forward in backward (with a frozen base, forward + input gradients + recomputation: 3 passes for 2).

    Returns:
        `dict`: ``change`` (what to set), ``recomputed`` layers, ``total`` bytes and ``settings``; None when
        no setting recomputes fewer layers than ``settings`` and fits.
    """
    if not settings.checkpointing:
        return None
    layers = facts["dims"]["layers"]
    now = checkpointed_layers(layers, settings.checkpoint_every)
    candidates = [(0, "activation_checkpointing: false", replace(settings, checkpointing=False))]
    for every in range(layers, 1, -1):  # fewest checkpointed layers first
        count = checkpointed_layers(layers, every)
        if count != candidates[-1][0]:
            candidates.append((count, f"every_n_layers: {every} in activation_checkpointing_kwargs",
                               replace(settings, checkpoint_every=every)))
    for recomputed, change, new in candidates:
        if recomputed >= now:
            break
        total = estimate(facts, new)["totals"]["all"]
        if total + reserve <= (1 - headroom) * memory:
            return {"change": change, "recomputed": recomputed, "total": total, "settings": new}
    return None


def fewer_micro_batches(facts: dict, settings: Settings, memory: float, samples: int, *,
                        packing: bool = False, reserve: float = CUDA_RESERVE,
                        headroom: float = HEADROOM) -> dict | None:
    """The fewest micro-batches per optimizer step that still leave ``headroom`` of ``memory`` free: the
    ``samples`` a process trains per step (micro-batch x accumulation steps) in padding-free micro-batches of
    as many samples as fit (a divisor of ``samples``, estimated at ``max_length`` tokens each). Costs paid
    per micro-batch (every NF4 expert dequantized, FSDP's layer gathers, kernel launches) then come fewer
    times per step. The training is the same: TRL averages the loss over the step's tokens and the
    load-balancing loss over its micro-batches (``tests/test_fast_paths.py``).

    Returns:
        `dict`: ``change`` (the recipe flags), ``micro_batches`` per step, ``samples`` per micro-batch,
        ``total`` bytes and ``settings``; None when no larger micro-batch fits.
    """
    sizes = [size for size in range(samples, settings.batch_size, -1) if samples % size == 0]
    for size in sizes:
        new = replace(settings, batch_size=size, padding_free=settings.padding_free or not packing)
        total = estimate(facts, new)["totals"]["all"]
        if total + reserve <= (1 - headroom) * memory:
            change = (f"--per_device_train_batch_size {size} --gradient_accumulation_steps {samples // size}"
                      + ("" if packing else " --padding_free true"))
            return {"change": change, "micro_batches": samples // size, "samples": size, "total": total,
                    "settings": new}
    return None


def read_accelerate_config(config: str | os.PathLike | None, num_processes: int
                           | None = None) -> tuple[Sharding, int]:
    """The `Sharding` and process count of an accelerate config file (or a `STRATEGIES` name).

    Raises:
        `ValueError`: an unknown strategy name, or a config whose ``distributed_type`` is not handled.
    """
    if config is None:
        return STRATEGIES["ddp" if (num_processes or 1) > 1 else "single"], num_processes or 1
    if str(config) in STRATEGIES:
        return STRATEGIES[str(config)], num_processes or 1
    import yaml

    path = Path(config)
    if not path.is_file():
        raise ValueError(f"accelerate config {config!r}: no such file and not one of {sorted(STRATEGIES)}.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    processes = int(data.get("num_processes") or 1)
    kind = data.get("distributed_type", "NO")
    if kind in ("NO", "MULTI_CPU", "MULTI_GPU"):
        sharding = STRATEGIES["ddp" if processes > 1 else "single"]
    elif kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        stage = int(ds.get("zero_stage", 2))
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"{path}: deepspeed_config.zero_stage={stage!r} is not 0-3.")
        sharding = replace(STRATEGIES[f"zero{stage}"] if stage else Sharding("DeepSpeed ZeRO-0", "deepspeed"),
                           offload_optimizer=ds.get("offload_optimizer_device", "none") not in ("none", None),
                           offload_parameters=ds.get("offload_param_device", "none") not in ("none", None))
    elif kind == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        if "fsdp_reshard_after_forward" in fsdp:  # FSDP2's form of FULL_SHARD / SHARD_GRAD_OP
            resharded = str(fsdp["fsdp_reshard_after_forward"]).lower() == "true"
            strategy = "FULL_SHARD" if resharded else "SHARD_GRAD_OP"
        shard_params = strategy in ("FULL_SHARD", "1", "HYBRID_SHARD", "4")
        shard_rest = shard_params or strategy in ("SHARD_GRAD_OP", "2", "_HYBRID_SHARD_ZERO2", "5")
        offload = bool(fsdp.get("fsdp_offload_params", False))
        sharding = Sharding(f"FSDP {strategy}", "fsdp", parameters=shard_params, gradients=shard_rest,
                            optimizer=shard_rest, offload_parameters=offload, offload_optimizer=offload)
    else:
        raise ValueError(f"{path}: distributed_type={kind!r} is not handled (MULTI_GPU, DEEPSPEED or FSDP).")
    return sharding, num_processes or processes


def format_report(report: dict) -> str:
    """A plain-text report of `estimate_memory`'s result (GiB), with the GPU table and any suggestion."""
    p, t, a, s = report["parameters"], report["trainable"], report["activations"], report["settings"]
    shard = s["sharding"]
    lines = [f"Model: {report.get('model', '?')} ({report['model_type']}), compute dtype "
             f"{s['compute_dtype']}, bitsandbytes {s['quantization'] or 'off'}"
             + (", bimedix 4-bit experts" if s["quantize_experts"] else "")
             + f", expert LoRA {s['expert_lora']}",
             f"Launch: {s['num_processes']} process(es), {shard['name']}"
             + (" (sharded: " + ", ".join(k for k in ("parameters", "gradients", "optimizer") if shard[k])
                + ")"
                if any(shard[k] for k in ("parameters", "gradients", "optimizer")) else "")
             + (", optimizer offloaded to CPU" if shard["offload_optimizer"] else "")
             + (", parameters offloaded to CPU" if shard["offload_parameters"] else ""),
             "", "Frozen parameters by part (whole model):"]
    for part, size in p["by_part"].items():
        lines.append(f"  {part:<15} {_count(p['counts'][part])} params {_gib(size)}")
    lines.append("  by storage: " + ", ".join(f"{k} {_gib(v).strip()}" for k, v in p["by_storage"].items()))
    lines += ["", f"Trainable: {_count(t['parameters']).strip()} params, per process after sharding:",
              f"  weights {_gib(t['weights'])}  gradients "
              f"{_gib(t['gradients'])}  optimizer {_gib(t['optimizer'])}"
              + (f"  DDP buckets {_gib(t['ddp_buckets'])}" if t["ddp_buckets"] else ""),
              "", f"Activations per micro-batch ({s['batch_size']} x {s['max_length']} tokens):",
              f"  one layer {_gib(a['per_layer'])}  LM head {_gib(a['logits'])}"
              + (f"  packed-row mask {_gib(a['mask'])}" if a["mask"] else ""),
              (f"  all layers kept {_gib(a['full'])}  with activation checkpointing {_gib(a['checkpointed'])}"
               + (f" (every_n_layers {s['checkpoint_every']})" if s["checkpoint_every"] > 1 else "")
               + (" (inputs in host memory)" if s["checkpoint_offload"] else "")
               + f"  (recipe: {'on' if s['checkpointing'] else 'off'})"),
              "Step transients: " + (", ".join(f"{k.replace('_', ' ')} {_gib(v).strip()}"
                                               for k, v in report["transients"].items()) or "none")]
    totals = report["totals"]
    labels = {"parameters": "parameters", "trainable_states": "trainable states",
              "activations": "activations",
              "transients": "step transients beyond them"}
    lines += ["", "Per GPU: " + " + ".join(f"{label} {_gib(totals[k]).strip()}" for k,
                                           label in labels.items())
              + f" = {_gib(totals['all']).strip()} (+ {_gib(CUDA_RESERVE).strip()} CUDA context reserve)", ""]
    lines.append(f"  {'GPU':<8} {'e.g.':<24} {'memory':>12}  fits  {'room':>12}")
    for row in report["gpus"]:
        lines.append(f"  {row['gpu']:<8} {row['examples']:<24} {_gib(row['memory'])}  "
                     f"{'yes ' if row['fits'] else 'no  '}  {_gib(row['room'])}")
    stated = report.get("stated_gpu")
    if stated:
        room = stated["memory"] - totals["all"] - CUDA_RESERVE
        lines += ["", f"Stated GPU ({stated['gb']:g} GB = {_gib(stated['memory']).strip()}): "
                  + (f"fits, {_gib(room).strip()} to spare." if room >= 0
                     else f"does NOT fit ({_gib(-room).strip()} short).")]
        if room >= 0 and stated["faster"]:
            faster = stated["faster"]
            lines.append(f"  Faster and still {HEADROOM:.0%} of the GPU free: {faster['change']} "
                         f"({faster['recomputed']} of {report['layers']} layers recomputed instead of "
                         f"{report['recomputed_layers']}, {_gib(faster['total']).strip()} per GPU)")
        if room >= 0 and stated.get("fewer_micro_batches"):
            fewer = stated["fewer_micro_batches"]
            lines.append(f"  Fewer micro-batches, still {HEADROOM:.0%} of the GPU free: {fewer['change']} "
                         f"({fewer['micro_batches']} per optimizer step instead of "
                         f"{report['micro_batches']}, the same samples; "
                         f"{_gib(fewer['total']).strip()} per GPU"
                         + ("; alone, not with the checkpointing above)" if stated["faster"] else ")"))
        if room < 0 and stated["suggestion"]:
            lines.append("  Nearest setting that fits "
                         f"({_gib(stated['suggestion']['total']).strip()} per GPU): "
                         + "; ".join(stated["suggestion"]["changes"]))
        elif room < 0:
            lines.append("  None of the tried changes fits: use more GPUs with ZeRO-3/FSDP, or lower LoRA "
                         "ranks (`lora_r`, `lora_rank_pattern`).")
    lines += [""] + [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines)


# --- helpers -------------------------------------------------------------------------------------------


def _changes(facts: dict, settings: Settings) -> list[tuple[str, dict]]:
    changes = []
    if not settings.checkpointing:
        changes.append(("--activation_checkpointing true", {"checkpointing": True}))
    elif settings.checkpoint_every > 1:
        changes.append(("every_n_layers: 1 in activation_checkpointing_kwargs (every layer)",
                        {"checkpoint_every": 1}))
    if facts["counts"].get("experts") and not settings.quantize_experts:
        changes.append(("--quantize_experts nf4 (bimedix 4-bit experts)", {"quantize_experts": True}))
    if settings.quantization != "4bit":
        changes.append(("--load_in_4bit true (bitsandbytes 4-bit Linears)", {"quantization": "4bit"}))
    if settings.num_processes > 1:
        # ZeRO-3 cannot shard bimedix's 4-bit experts; FSDP can
        for key in ("zero2", "fsdp" if settings.quantize_experts else "zero3"):
            if not (settings.sharding.parameters or (key == "zero2" and settings.sharding.gradients)):
                file = "fsdp.yaml" if key == "fsdp" else f"deepspeed_{key}.yaml"
                label = f"accelerate config recipes/accelerate_configs/{file} ({STRATEGIES[key].name})"
                changes.append((label, {"sharding": STRATEGIES[key]}))
    if "8bit" not in settings.optim:
        changes.append(("--optim adamw_bnb_8bit (8-bit AdamW states)", {"optim": "adamw_bnb_8bit"}))
    if settings.batch_size > 1:
        changes.append(("--per_device_train_batch_size 1 "
                        f"--gradient_accumulation_steps x{settings.batch_size}",
                        {"batch_size": 1}))
    if settings.max_length > 256:
        changes.append((f"--max_length {settings.max_length // 2}", {"max_length": settings.max_length // 2}))
    return changes


def _notes(params: dict, settings: Settings) -> list[str]:
    notes = [("CUDA context, NCCL buffers and allocator fragmentation are not in the totals; a fixed "
              f"{_gib(CUDA_RESERVE).strip()} reserve is added before comparing with a GPU.")]
    unquantized = params["by_part"].get("experts", 0)
    if settings.quantization and not settings.quantize_experts and unquantized:
        notes.append(
            f"bitsandbytes load_in_{settings.quantization} quantizes "
            "nn.Linear layers only: the router and the fused "
            "3-D experts stay in the compute dtype "
            f"({_gib(unquantized).strip()} of experts here), and peft's "
            "prepare_model_for_kbit_training would upcast them to fp32 (twice that). bimedix's 4-bit experts "
            "(`quantize_experts: nf4`) store them in nf4.")
    if settings.quantize_experts and settings.sharding.kind == "deepspeed" and settings.sharding.parameters:
        notes.append("ZeRO-3 would partition the packed 4-bit experts without their quantization state; "
                     "bimedix shards 4-bit experts under FSDP (recipes/accelerate_configs/fsdp.yaml).")
    if settings.quantize_experts and settings.sharding.kind == "fsdp" and settings.num_processes > 1:
        notes.append("FSDP: each process holds 1/world of the packed experts and their statistics; a "
                     "layer is gathered for its forward and backward (two in flight with prefetch). With "
                     "load_in_4bit set `bnb_4bit_quant_storage: bfloat16` so the 4-bit Linears shard too "
                     "(counted sharded).")
    return notes


def _gib(size: float) -> str:
    return f"{size / GIB:9.3f} GiB" if abs(size) >= GIB / 10 or size == 0 else f"{size / 1024**2:9.3f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:9.3f} B" if n >= 1e8 else f"{n / 1e6:9.3f} M"

