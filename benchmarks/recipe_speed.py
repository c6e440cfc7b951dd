"""Training speed of a shipped recipe on one accelerator at its model's real dimensions, BiMed1.3M-like rows.

    python benchmarks/recipe_speed.py --recipe recipes/bimedix-mixtral/sft_qlora.yaml --layers 1 3
    python benchmarks/recipe_speed.py --recipe recipes/olmoe-1b-7b/sft_qlora.yaml -- --expert_lora peft
    python benchmarks/recipe_speed.py --recipe recipes/bimedix-mixtral/sft_qlora.yaml --cpu   # toy sizes

For each depth (decoder layers; default: the model's own) a fresh process builds the recipe's model with
random weights layer by layer, directly in the recipe's storage format: a meta-device model (with the recipe's
`attn_implementation`) gets the recipe's LoRA (and bitsandbytes `Linear4bit` layers with `load_in_4bit`), then
every layer is materialized on the device and packed at once (NF4 `Linear4bit` weights, `quantize_experts` for
the fused experts), so a 32-layer Mixtral-8x7B needs no checkpoint and never holds more than one bf16 layer.
The trainer is the one ``bimedix sft`` builds (`bimedix.training.sft.make_trainer`: TRL's `SFTTrainer`, the
recipe's batch, accumulation, optimizer, LR schedule, checkpointing, expert LoRA path, fused kernels and
router report).
Rows are random tokens whose lengths are drawn from BiMed1.3M's length histogram
(``benchmarks/data/bimed1.3m_lengths.json``, see ``length_histogram.py``), each with its first third masked
as the prompt (assistant-only loss).

It prints non-padding tokens/s, MFU (formula printed), peak allocated / reserved memory against
`bimedix.training.memory.estimate` for the same depth and the longest micro-batch of the run, a
`torch.profiler` summary (top kernels, dequantization share), the ops that make the host wait for the device
per step by caller (`bimedix.training.device_waits`) and the projected wall-clock of BiMed1.3M x 2 epochs.
With two depths the step time and memory are extrapolated linearly to the full depth.

``--cpu`` runs the same code on CPU at toy sizes (hidden 64, rows 1/8 as long): figures are for the test
suite, not for planning. Recipe flags after ``--`` override the recipe (e.g. ``-- --expert_lora peft``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from bimedix.training.device_waits import StepWaits
from bimedix.training.memory import checkpointed_layers, settings_from_recipe

HISTOGRAM = Path(__file__).parent / "data" / "bimed1.3m_lengths.json"
BIMED_SAMPLES, BIMED_TOKENS, EPOCHS = 1_311_600, 632_300_000, 2  # the paper's Fig. 3 and §4.1
PROJECTED_GPUS = 8
#: Dense bf16 peak of accelerators in TFLOP/s (datasheets, no sparsity); the first key found in the device
#: name wins (so the PCIe and NVL H100s come before the SXM one).
NOMINAL_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H800": 989.4,
                  "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2,
                  "B200": 2250.0}
#: Toy dimensions of ``--cpu`` runs (the recipe's expert count, top-k, LoRA and training settings stay).
TOY = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 32000}
TOY_LENGTH_SCALE = 8
CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True,
                        help="a YAML recipe, e.g. recipes/bimedix-mixtral/sft_qlora.yaml")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="decoder layers: one depth, or two to extrapolate (default: the model's; 1 2 "
                             "with --cpu)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps after the warm-up (default 8; 2 "
                                                  "with --cpu)")
    parser.add_argument("--warmup", type=int, help="optimizer steps before timing (default 2; 1 with --cpu)")
    parser.add_argument("--profile_steps", type=int,
                        help="optimizer steps under torch.profiler after the timed ones (default 2; 1 with "
                             "--cpu)")
    parser.add_argument("--cpu", action="store_true", help="toy sizes on CPU (tests, dry runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file (must not exist)")
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)  # one depth, in this process
    args = parser.parse_args(argv)
    args.overrides = overrides
    for key, gpu, cpu in (("steps", 8, 2), ("warmup", 2, 1), ("profile_steps", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, cpu if args.cpu else gpu)
    if args.cpu and not args.layers and args.depth is None:
        args.layers = [1, 2]
    if args.layers and len(args.layers) > 2:
        parser.error("--layers takes one depth or two (to extrapolate)")
    if not args.cpu and args.depth is None and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --cpu for a toy-size run on CPU")
    if args.json and Path(args.json).exists():
        parser.error(f"--json {args.json} exists; choose a new file")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.depth is not None:
        result = run_depth(args, args.depth)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    full_depth = recipe_config(args, layers=None).num_hidden_layers
    depths = args.layers or [full_depth]
    runs = [_run_in_subprocess(args, depth) for depth in depths]
    summary = summarize(args, runs, full_depth)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")
    return summary


# --- one depth ---------------------------------------------------------------------------------------------


def run_depth(args: argparse.Namespace, depth: int) -> dict:
    """Build the model with ``depth`` layers, train warm-up + timed + profiled steps, return the figures."""
    from datasets import Dataset

    from bimedix.data.tokenizer import load_mixtral_tokenizer
    from bimedix.training.fused_kernels import plan_fused_kernels, recipe_request
    from bimedix.training.sft import make_trainer
    from bimedix.training.template import apply_vicuna_template

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="recipe-speed-") as output_dir:
        total_steps = args.warmup + args.steps + args.profile_steps
        _, training, model_args, _, bimedix = recipe_args(args, output_dir, total_steps)
        config = recipe_config(args, layers=depth)
        device = torch.device("cpu" if args.cpu else "cuda")
        start = time.perf_counter()
        model = build_model(config, model_args, bimedix, device)
        build_s = time.perf_counter() - start
        rows_per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps
        rows = draw_rows(rows_per_step * total_steps, training.max_length, config.vocab_size, args.seed,
                         TOY_LENGTH_SCALE if args.cpu else 1)
        tokenizer = load_mixtral_tokenizer()
        if bimedix.chat_template == "vicuna":
            apply_vicuna_template(tokenizer)
        clock = StepClock(args.warmup, args.steps, device)
        waits = StepWaits(first_step=args.warmup + args.steps)  # the profiled steps
        training.assistant_only_loss = False  # the rows carry their labels (see `draw_rows`)
        fused = plan_fused_kernels(model, **recipe_request(training, bimedix))  # what make_trainer applies
        trainer = make_trainer(training, model_args, bimedix, model, tokenizer, Dataset.from_dict(rows),
                               callbacks=[waits, clock])
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        if device.type == "cuda":
            peak = {"allocated": torch.cuda.max_memory_allocated(),
                    "reserved": torch.cuda.max_memory_reserved()}
        else:
            peak = {"cpu_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    accumulation = training.gradient_accumulation_steps
    timed = range(args.warmup, args.warmup + args.steps)  # 0-based optimizer steps
    tokens = [sum(counter.tokens[s * accumulation:(s + 1) * accumulation]) for s in timed]
    slots = [sum(counter.slots[s * accumulation:(s + 1) * accumulation]) for s in timed]
    longest = max(counter.micro_batch_tokens)
    return {
        "depth": depth, "device": _device_name(device), "build_s": round(build_s, 1),
        "step_s": clock.step_times, "median_step_s": statistics.median(clock.step_times),
        "tokens_per_step": statistics.mean(tokens), "slots_per_step": statistics.mean(slots),
        "context_per_token": counter.context_per_token(), "longest_micro_batch": longest, "peak": peak,
        "estimate": estimate_bytes(config, training, model_args, bimedix, longest),
        "estimate_max_length": estimate_bytes(config, training, model_args, bimedix, None),
        "profile": {**clock.profile, "syncs_per_step": waits.by_source()} if clock.profile else {},
        "losses": [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry],
        "settings": {"per_device_train_batch_size": training.per_device_train_batch_size,
                     "gradient_accumulation_steps": accumulation, "learning_rate": training.learning_rate,
                     "lr_scheduler_type": str(getattr(training.lr_scheduler_type, "value",
                                                      training.lr_scheduler_type)),
                     "warmup_steps": training.warmup_steps, "max_length": training.max_length,
                     "expert_lora": bimedix.expert_lora, "padding_free": bool(training.padding_free),
                     "activation_checkpointing": bool(training.activation_checkpointing),
                     "every_n_layers": settings_from_recipe(training, model_args, bimedix).checkpoint_every,
                     "quantize_experts": bimedix.quantize_experts, "load_in_4bit": model_args.load_in_4bit,
                     "attn_implementation": model.config._attn_implementation, "fused_kernels": str(fused)},
    }


def recipe_args(args: argparse.Namespace, output_dir: str, steps: int):
    """The recipe's parsed arguments for a benchmark run: no saving, no logging backends, ``steps`` steps."""
    from bimedix.training.sft import load_recipe

    flags = ["--output_dir", output_dir, "--max_steps", str(steps), "--save_strategy", "no", "--report_to",
             "none", "--seed", str(args.seed), "--dataloader_num_workers", "0"]
    if args.cpu:
        flags += ["--bf16", "false"]
    parsed = load_recipe(args.recipe, flags + list(args.overrides), use_cpu=args.cpu)
    training = parsed.training
    if args.cpu and "paged" in str(getattr(training.optim, "value", training.optim)):
        training.optim = "adamw_torch"  # bitsandbytes' paged optimizers need CUDA
    return parsed


def recipe_config(args: argparse.Namespace, layers: int | None):
    """The recipe model's config (shipped with bimedix: offline) with ``layers`` layers, toy sizes on CPU."""
    from bimedix.training.moe.targets import load_model_config
    from bimedix.training.sft import load_recipe

    _, _, model_args, _, bimedix = load_recipe(args.recipe, args.overrides, use_cpu=True)
    name = bimedix.tiny_model or model_args.model_name_or_path
    overrides = dict(bimedix.tiny_model_config or {}) if bimedix.tiny_model else {}
    config = load_model_config(name, **overrides)
    if args.cpu:
        for key, value in TOY.items():
            if hasattr(config, key) or key == "head_dim":
                setattr(config, key, value)
    if layers is not None:
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
            config.layer_types = config.layer_types[:layers]
    config.use_cache = False
    return config


def build_model(config, model_args, bimedix, device: torch.device):
    """The recipe's PEFT model with random weights, built on ``meta`` and materialized layer by layer on
    ``device`` directly in the recipe's storage format (NF4 Linear4bit weights, NF4 fused experts, bf16
    elsewhere)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from bimedix.deprecations import quiet_peft_checkpointing_warning
    from bimedix.training.moe.quantize import quantize_experts
    from bimedix.training.sft import make_peft_config

    dtype = getattr(torch, model_args.dtype or "bfloat16")
    with torch.device("meta"):  # the recipe's attention kernel (None: transformers' default, sdpa)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=model_args.attn_implementation)
    if model_args.load_in_4bit:
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        quantization = BitsAndBytesConfig(load_in_4bit=True,
                                          bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                                          bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
                                          bnb_4bit_compute_dtype=dtype)
        replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quantization)
        model.is_loaded_in_4bit = True  # what `from_pretrained` sets; TRL reads it
    peft_config = make_peft_config(model, model_args, bimedix)
    if peft_config is not None:
        with quiet_peft_checkpointing_warning():
            model = get_peft_model(model, peft_config)
    base = model.get_base_model() if peft_config is not None else model
    for name, sub in list(base.named_modules()):
        if getattr(sub, "inv_freq", None) is not None and sub.inv_freq.is_meta:  # rotary tables: rebuild
            with torch.device(device):
                base.set_submodule(name, type(sub)(sub.config))
    layers = base.get_decoder().layers
    for part in [module for module in base.children()] + list(base.get_decoder().children()):
        if part is base.get_decoder() or part is layers:
            continue
        _materialize(part, device, dtype)
    for layer in layers:
        _materialize(layer, device, dtype)
        if bimedix.quantize_experts:
            quantize_experts(layer, quant_type=bimedix.quantize_experts)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.hf_device_map = base.hf_device_map = {"": str(device)}
    return model


def _materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Random weights on ``device`` for every meta tensor of ``module``: norms 1, LoRA B 0 (PEFT's init), the
    rest N(0, 0.02); bitsandbytes 4-bit Linear weights quantized on arrival."""
    import bitsandbytes as bnb

    for sub_name, sub in module.named_modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            if isinstance(param, bnb.nn.Params4bit):
                weight = torch.empty(param.shape, dtype=dtype, device=device).normal_(std=0.02)
                sub.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=param.quant_type,
                                               compress_statistics=param.compress_statistics,
                                               blocksize=param.blocksize, module=sub).to(device)
                continue
            value = torch.empty(param.shape, dtype=param.dtype, device=device)
            if "lora_B" in sub_name:
                value.zero_()
            elif "norm" in name or "norm" in sub_name.rpartition(".")[2]:
                value.fill_(1.0)
            elif "lora_A" in sub_name:
                value.normal_(std=1 / math.sqrt(param.shape[-1]))
            else:
                value.normal_(std=0.02)
            sub._parameters[name] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer.is_meta:
                sub._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)


def draw_rows(count: int, max_length: int | None, vocab_size: int, seed: int, scale: int = 1) -> dict:
    """``count`` pre-tokenized rows (``input_ids``, ``labels``) with BiMed1.3M's token lengths.

    Lengths come from the histogram (uniform within a bin), divided by ``scale``, clipped to ``max_length``;
    the first third of each row (at least its first token) is the prompt (label -100), the rest is trained:
    the labels TRL builds from an assistant mask (``assistant_only_loss`` itself needs conversational rows).
    """
    histogram = json.loads(HISTOGRAM.read_text(encoding="utf-8"))
    width = histogram["bin_tokens"]
    centres = [int(key) for key in histogram["fractions"]]
    rng = random.Random(seed)
    lengths = [max(2, (rng.choices(centres, weights=list(histogram["fractions"].values()))[0]
                       + rng.randint(-width // 2, width // 2 - 1)) // scale) for _ in range(count)]
    if max_length:
        lengths = [min(length, max_length) for length in lengths]
    top = min(vocab_size, 32000)
    ids = [[1] + [rng.randrange(3, top) for _ in range(length - 1)] for length in lengths]
    labels = [[-100] * max(1, len(row) // 3) + row[max(1, len(row) // 3):] for row in ids]
    return {"input_ids": ids, "labels": labels}


class TokenCounter:
    """Wrap the trainer's collator: count non-padding tokens and token slots per micro-batch (on the host)."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens: list[int] = []
        self.slots: list[int] = []
        self.micro_batch_tokens: list[int] = []
        self._context = [0.0, 0]  # sum over tokens of their attention context, tokens

    def __call__(self, examples):
        batch = self.collator(examples)
        lengths = [len(example["input_ids"]) for example in examples]
        self.tokens.append(sum(lengths))
        self.slots.append(batch["input_ids"].numel())
        self.micro_batch_tokens.append(batch["input_ids"].numel())
        self._context[0] += sum(n * (n + 1) / 2 for n in lengths)
        self._context[1] += sum(lengths)
        return batch

    def context_per_token(self) -> float:
        """Mean number of keys a token attends to (causal, within its own sample)."""
        return self._context[0] / max(self._context[1], 1)


class StepClock(TrainerCallback):
    """Trainer callback: time optimizer steps ``warmup`` .. ``warmup + steps`` (synchronizing the device at
    step ends only), then profile every later step with `torch.profiler`; its summary is ``self.profile``."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.step_times: list[float] = []
        self.profile: dict = {}
        self._last = None
        self._profiler = None
        self._profiled = 0

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup + self.steps and self._profiler is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities)
            self._sync()
            self._profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step  # 1-based, after this step
        if self._profiler is not None:
            self._profiled += 1
            if step == state.max_steps:
                self._sync()
                self._profiler.__exit__(None, None, None)
                self.profile = summarize_profile(self._profiler, self._profiled, self.device)
            return
        if step == self.warmup:
            self._last = self._sync()
        elif self.warmup < step <= self.warmup + self.steps:
            now = self._sync()
            self.step_times.append(now - self._last)
            self._last = now


def summarize_profile(profiler, steps: int, device: torch.device, top: int = 8) -> dict:
    """Top kernels (CUDA) or ops (CPU) by self time, CUDA runtime synchronizations per step, dequantization
    share of the time. The Python dispatch mode that counts waits for the device (`StepWaits`) is left out."""
    averages = profiler.key_averages()

    def device_time(event) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)

    if device.type == "cuda":
        timed = [(event.key, device_time(event), event.count) for event in averages if device_time(event) > 0]
    else:
        timed = [(event.key, event.self_cpu_time_total, event.count) for event in averages
                 if event.self_cpu_time_total > 0 and event.key != "PythonDispatchMode"]
    total = sum(t for _, t, _ in timed) or 1
    timed.sort(key=lambda item: -item[1])
    dequantize = sum(t for key, t, _ in timed if "dequant" in key.lower())
    dequantize_calls = sum(count for key, _, count in timed if "dequant" in key.lower())
    cuda_syncs = {event.key: event.count / steps for event in averages if event.key in CUDA_SYNCS}
    return {
        "steps": steps, "time_basis": "device kernels" if device.type == "cuda" else "CPU ops (self time)",
        "total_ms_per_step": round(total / 1000 / steps, 2),
        "top": [{"name": key[:90], "share": round(t / total, 4), "calls_per_step": count / steps}
                for key, t, count in timed[:top]],
        "cuda_syncs_per_step": cuda_syncs, "dequantize_share": round(dequantize / total, 4),
        "dequantize_calls_per_step": dequantize_calls / steps,
    }


def estimate_bytes(config, training, model_args, bimedix, longest: int | None) -> dict:
    """`bimedix.training.memory.estimate` for this depth, one process, a micro-batch of ``longest`` tokens in
    the recipe's samples per micro-batch (so a padding-free row's mask counts; ``None``: the recipe's batch x
    max_length, what ``bimedix estimate-memory`` assumes)."""
    from transformers import AutoModelForCausalLM

    from bimedix.training.memory import estimate, model_facts

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    facts = model_facts(meta, model_args, bimedix)
    length = longest and math.ceil(longest / training.per_device_train_batch_size)
    settings = settings_from_recipe(training, model_args, bimedix, max_length=length)
    return {key: int(value) for key, value in estimate(facts, settings)["totals"].items()}


# --- across depths -----------------------------------------------------------------------------------------


def summarize(args: argparse.Namespace, runs: list[dict], full_depth: int) -> dict:
    """Print the per-depth figures, the extrapolation to ``full_depth``, MFU, memory and projected hours."""
    config = recipe_config(args, layers=None)
    settings = runs[0]["settings"]
    gib = 2**30
    print(f"Recipe {args.recipe} ({'CPU toy sizes' if args.cpu else 'real dimensions'}), "
          f"{runs[0]['device']}, "
          f"torch {torch.__version__}, {_versions()}")
    print(f"Settings: {json.dumps(settings)}")
    for run in runs:
        memory = (f"peak allocated {run['peak']['allocated'] / gib:.2f} GiB, reserved "
                  f"{run['peak']['reserved'] / gib:.2f} GiB" if "allocated" in run["peak"]
                  else f"peak RSS {run['peak']['cpu_max_rss'] / gib:.2f} GiB (CPU, whole process)")
        print(f"  {run['depth']:>3} layer(s): median step {run['median_step_s']:.3f} s "
              f"(steps {', '.join(f'{t:.3f}' for t in run['step_s'])}), {run['tokens_per_step']:.0f} non-pad "
              f"tokens/step ({100 * run['tokens_per_step'] / run['slots_per_step']:.1f}% of slots), "
              f"{run['tokens_per_step'] / run['median_step_s']:.0f} tokens/s; {memory}; estimate "
              f"{run['estimate']['all'] / gib:.2f} GiB at its longest micro-batch "
              f"({run['longest_micro_batch']} "
              f"tokens), {run['estimate_max_length']['all'] / gib:.2f} GiB at max_length; build "
              f"{run['build_s']} s")
    step, peak, estimate = _extrapolate(runs, full_depth)
    tokens = statistics.mean(run["tokens_per_step"] for run in runs)
    tokens_per_s = tokens / step
    if len(runs) == 2:
        (a, ta), (b, tb) = [(run["depth"], run["median_step_s"]) for run in runs]
        per_layer = max((tb - ta) / (b - a), 0.0)
        print(f"Extrapolation: step(L) = {ta - per_layer * a:.4f} s + L x {per_layer:.4f} s "
              f"(from {a} and {b} layers) -> {step:.3f} s at {full_depth} layers")
    recomputed = checkpointed_layers(full_depth, settings["every_n_layers"]) / full_depth \
        if settings["activation_checkpointing"] else 0.0
    flops = flops_per_token(config, full_depth, statistics.mean(run["context_per_token"] for run in runs),
                            recomputed)
    peak_flops, basis = peak_tflops(runs[0]["device"], args.cpu)
    mfu = flops["model"] * tokens_per_s / (peak_flops * 1e12)
    print(f"Throughput at {full_depth} layers: {tokens_per_s:,.0f} non-padding tokens/s per device")
    print(f"MFU {100 * mfu:.1f}% = model FLOPs/token x tokens/s / peak; model FLOPs/token = 4 x N_active "
          f"({flops['active_parameters'] / 1e9:.3f} B: frozen base, forward 2N + input gradients 2N) "
          f"+ 12 x layers x "
          f"q_dim x context ({flops['context']:.0f} keys/token) = {flops['model'] / 1e9:.2f} GFLOP; with "
          f"recomputation {flops['hardware'] / 1e9:.2f} GFLOP executed; "
          f"peak {peak_flops:.3g} TFLOP/s ({basis})")
    if peak is not None:
        print(f"Memory at {full_depth} layers: peak allocated {peak['allocated'] / gib:.2f} GiB, reserved "
              f"{peak['reserved'] / gib:.2f} GiB vs estimate-memory {estimate / gib:.2f} GiB "
              f"({100 * (peak['allocated'] / estimate - 1):+.1f}%)")
    else:
        print(f"Memory at {full_depth} layers: estimate-memory {estimate / gib:.2f} GiB; "
              "the CPU peak RSS above "
              "counts the whole process (Python, torch, data) and is not comparable")
    hours = EPOCHS * BIMED_TOKENS / tokens_per_s / 3600
    samples_per_step = settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"]
    print(f"Optimization: {samples_per_step} sample(s) per optimizer step per device; "
          f"BiMed1.3M x {EPOCHS} epochs "
          f"at an effective batch of 16 samples = {math.ceil(BIMED_SAMPLES / 16):,} steps/epoch, LR "
          f"{settings['learning_rate']} {settings['lr_scheduler_type']} "
          f"with {settings['warmup_steps']} warm-up steps")
    print(f"Projected: BiMed1.3M x {EPOCHS} epochs ({EPOCHS * BIMED_TOKENS / 1e9:.2f} B tokens) = "
          f"{hours / PROJECTED_GPUS:.1f} h on {PROJECTED_GPUS} devices, {hours:.1f} h on one")
    profile = runs[-1]["profile"]
    if profile:
        print(f"Profile ({runs[-1]['depth']} layer(s), {profile['steps']} steps, {profile['time_basis']}, "
              f"{profile['total_ms_per_step']} ms/step):")
        for item in profile["top"]:
            print(f"    {100 * item['share']:5.1f}%  {item['calls_per_step']:8.1f} calls/step  "
                  f"{item['name']}")
        print(f"  host-device syncs per step (ops that wait for the device, by caller): "
              f"{json.dumps(profile['syncs_per_step'])}")
        if profile["time_basis"] == "device kernels":
            print(f"  CUDA runtime synchronizations per step: {json.dumps(profile['cuda_syncs_per_step'])}")
        print(f"  dequantization share: {100 * profile['dequantize_share']:.1f}% "
              f"({profile.get('dequantize_calls_per_step', 0):.0f} dequantize ops or kernels per step; "
              "double quantization runs 2 per dequantized weight)")
    return {"full_depth": full_depth, "step_s": step, "tokens_per_s": tokens_per_s, "mfu": mfu,
            "flops": flops, "peak_tflops": peak_flops, "peak": peak, "estimate": estimate,
            "hours_8": hours / PROJECTED_GPUS, "hours_1": hours, "profile": profile}


def _extrapolate(runs: list[dict], full_depth: int):
    """Step time, peak memory and estimate at ``full_depth`` (linear in the depth from two runs)."""
    def at_full(values: list[float]) -> float:
        (a, va), (b, vb) = zip([run["depth"] for run in runs], values) if len(runs) == 2 else [(0, 0)] * 2
        if len(runs) == 1 or vb <= va:  # one depth, or noise larger than a layer's cost: scale the deeper run
            return values[-1] * full_depth / runs[-1]["depth"]
        return va + (vb - va) / (b - a) * (full_depth - a)

    if len(runs) == 2 and runs[1]["median_step_s"] <= runs[0]["median_step_s"]:
        print("  !! the deeper run was not slower (timing noise): its step time is scaled by depth instead")

    if len(runs) == 1 and runs[0]["depth"] != full_depth:
        print(f"  (one depth only: step time scaled by {full_depth}/{runs[0]['depth']}; pass two depths to "
              "extrapolate)")
    step = at_full([run["median_step_s"] for run in runs])
    estimate = at_full([run["estimate"]["all"] for run in runs])
    if "allocated" not in runs[0]["peak"]:
        return step, None, estimate
    peak = {key: at_full([run["peak"][key] for run in runs]) for key in ("allocated", "reserved")}
    return step, peak, estimate


def flops_per_token(config, layers: int, context: float, recomputed: float) -> dict:
    """Matmul FLOPs per trained token: active parameters (experts x top-k / E; embeddings excluded) and
    causal attention over ``context`` keys; ``hardware`` adds the forward of the ``recomputed`` share of the
    layers (activation checkpointing)."""
    from transformers import AutoModelForCausalLM

    full = type(config).from_dict(config.to_dict())
    full.num_hidden_layers = layers
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(full)
    experts = getattr(full, "num_local_experts", None) or getattr(full, "num_experts", None) or 1
    top_k = getattr(full, "num_experts_per_tok", 1) or 1
    active = 0.0
    for name, param in meta.named_parameters():
        if "embed_tokens" in name:
            continue
        active += param.numel() * (top_k / experts if param.dim() == 3 else 1)
    head_dim = getattr(full, "head_dim", None) or full.hidden_size // full.num_attention_heads
    attention = 4 * layers * full.num_attention_heads * head_dim * context  # forward: scores + values
    model = 4 * active + 3 * attention
    return {"active_parameters": active, "context": context, "model": model,
            "hardware": model + recomputed * (2 * active + attention)}


def peak_tflops(device_name: str, cpu: bool) -> tuple[float, str]:
    """The device's dense bf16 peak from `NOMINAL_TFLOPS`, else a measured matmul rate."""
    for key, value in NOMINAL_TFLOPS.items():
        if key in device_name:
            return value, f"{key} datasheet, dense bf16"
    device = "cpu" if cpu else "cuda"
    size = 512 if cpu else 8192
    dtype = torch.float32 if cpu else torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    repeats = 20
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return 2 * size**3 * repeats / seconds / 1e12, f"measured {dtype} {size}x{size} matmul here"


def _run_in_subprocess(args: argparse.Namespace, depth: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--recipe", args.recipe, "--depth", str(depth),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--profile_steps", str(args.profile_steps),
               "--seed", str(args.seed), *(["--cpu"] if args.cpu else []), "--", *args.overrides]
    # the run's own log (progress, warnings, errors) goes straight to this process's stderr
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"the {depth}-layer run failed (exit {done.returncode}); its log is above:\n"
                         f"{done.stdout[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores visible)"


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("transformers", "peft", "trl", "bitsandbytes"))


if __name__ == "__main__":
    main()
