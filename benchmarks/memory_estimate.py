"""Hold `bimedix estimate-memory` against a measured peak: a real-dimension Mixtral of a few layers on CPU.

The model is `MixtralForCausalLM` with Mixtral-8x7B's shipped config (hidden 4096, intermediate 14336, 8
experts, top-2, vocabulary 32,000) cut to ``--layers`` layers, random bf16 weights allocated a layer at a
time, the paper's LoRA (r=128, alpha=64 on q, k, v + router + experts, built by
`bimedix.training.moe.targets.build_lora_config` as the recipes do), by default bf16 experts (``--experts
nf4``: bimedix's 4-bit experts; packing one real-size layer on CPU takes about 11 GB, so use it at reduced
``--hidden``/``--intermediate``) with the folded expert LoRA, activation checkpointing and torch AdamW with
``foreach=True`` (what CUDA runs by default). It runs ``--steps`` training steps on ``--tokens`` tokens in a
child process and samples its resident set size every millisecond (glibc told to return freed memory, as in
``benchmarks/moe_experts.py``); the measured peak is that maximum minus the size after imports.

The estimate is `bimedix.training.memory.estimate` for the same model (meta device) and settings, on one
process without sharding and without the CUDA reserve (a CPU process has no CUDA context). It prints the
estimate and the measurement by component and their ratio; the target is within ±15%.

``--processes N`` runs the same model under FSDP2 on N CPU processes (gloo, `torch.distributed.run`): each
layer is allocated, packed (``--experts nf4``) and sharded in turn as `bimedix sft` does under FSDP
(`bimedix.training.sharding.shard_model`), every process measures its own resident size, and the largest is
compared with the estimate for N processes under FSDP ``FULL_SHARD``.

    python benchmarks/memory_estimate.py            # 2 layers, 128 tokens: ~9 GB of RAM, a few minutes
    python benchmarks/memory_estimate.py --experts nf4 --hidden 1024 --intermediate 3584     # 4-bit, 1/4 size
    python benchmarks/memory_estimate.py --experts nf4 --hidden 1024 --intermediate 3584 --layers 4 \
        --processes 2                                   # the same, 4 layers sharded over 2 processes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_experts import RssSampler, current_rss  # noqa: E402  (the sibling benchmark's sampler)

MODEL = "mistralai/Mixtral-8x7B-v0.1"
GIB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Mixtral-8x7B: 32)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (Mixtral-8x7B: 4096)")
    parser.add_argument("--intermediate", type=int, default=14336,
                        help="expert intermediate size (Mixtral: 14336)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per step (one sequence)")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (paper: 128)")
    parser.add_argument("--alpha", type=int, default=64, help="LoRA alpha (paper: 64)")
    parser.add_argument("--experts", choices=["bf16", "nf4"], default="bf16", help="expert storage")
    parser.add_argument("--expert_lora", choices=["folded", "peft"], default="folded",
                        help="expert LoRA path")
    parser.add_argument("--no_checkpointing", action="store_true", help="keep every layer's activations")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up step)")
    parser.add_argument("--processes", type=int, default=1,
                        help="CPU processes under FSDP2 (gloo); 1: no sharding")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the measurement in a child process, print estimate, measurement and ratio; return them."""
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return {}
    command = [sys.executable, __file__, "--child", *(argv if argv is not None else sys.argv[1:])]
    if args.processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(args.processes)]
    # a fixed mmap threshold makes glibc return freed tensors to the OS, so the resident size follows them
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if done.returncode:
        raise RuntimeError(f"measurement failed:\n{done.stderr[-3000:]}")
    # one line per process: compare the process that peaked highest
    measured = max((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
                   key=lambda figures: figures["peak"])
    report = estimate(args)
    totals = report["totals"]
    trainable = report["trainable"]
    rows = [
        ("weights at rest (frozen + adapter)", totals["parameters"] + trainable["weights"],
         measured["at_rest"]),
        ("AdamW states", trainable["optimizer"], measured["optimizer"]),
        ("step: grads, activations, transients",
         trainable["gradients"] + totals["activations"] + totals["transients"], measured["step"]),
        ("peak (total)", totals["all"], measured["peak"]),
    ]
    print(f"Mixtral, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          + (f"FSDP2 over {args.processes} processes (the largest process), " if args.processes > 1 else "")
          + f"{args.experts} experts, {args.expert_lora} expert LoRA, LoRA r={args.rank} alpha={args.alpha} "
          f"on q,k,v + router + experts ({report['trainable']['parameters'] / 1e6:.1f} M trainable), "
          f"{args.tokens} tokens, checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}, CPU, torch {torch.__version__}")
    print(f"{'component':<34} {'estimate':>12} {'measured':>12} {'ratio':>7}")
    for label, est, got in rows:
        print(f"{label:<34} {est / GIB:9.3f} GiB {got / GIB:9.3f} "
              f"GiB {got / est if est else float('nan'):7.3f}")
    ratio = measured["peak"] / totals["all"]
    print(f"measured / estimate = {ratio:.3f} ({'within' if abs(ratio - 1) <= 0.15 else 'OUTSIDE'} the ±15% "
          f"target); step {measured['step_s']:.1f} s")
    return {"estimate": totals["all"], "measured": measured["peak"], "ratio": ratio, "components": rows}


def estimate(args: argparse.Namespace) -> dict:
    """`bimedix.training.memory.estimate` for the benchmark's model and settings."""
    from bimedix.training.memory import STRATEGIES, Settings, model_facts
    from bimedix.training.memory import estimate as estimate_bytes
    from bimedix.training.moe.targets import build_lora_config, meta_model

    model = meta_model(MODEL, **_dims(args))
    peft_config = build_lora_config(model, "paper", r=args.rank, alpha=args.alpha)
    settings = Settings(compute_dtype="bfloat16", quantize_experts=args.experts == "nf4",
                        expert_lora=args.expert_lora,
                        batch_size=1, max_length=args.tokens, checkpointing=not args.no_checkpointing,
                        num_processes=args.processes,
                        sharding=STRATEGIES["fsdp" if args.processes > 1 else "single"])
    return estimate_bytes(model_facts(model, peft_config=peft_config), settings)


def measure(args: argparse.Namespace) -> dict:
    """Build, adapt (and quantize) the model, train ``args.steps`` steps; return resident-size figures
    (bytes)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from bimedix.deprecations import quiet_peft_checkpointing_warning
    from bimedix.training.moe.expert_lora import set_expert_lora_mode
    from bimedix.training.moe.quantize import quantize_experts
    from bimedix.training.moe.targets import build_lora_config, load_model_config
    from bimedix.training.sharding import make_experts_shardable, shard_model

    baseline = current_rss()
    config = load_model_config(MODEL, **_dims(args))
    torch.manual_seed(0)
    # LoRA first, then pack, as `bimedix sft` does; allocated a layer at a time below
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with quiet_peft_checkpointing_warning():
            model = get_peft_model(model, build_lora_config(model, "paper", r=args.rank, alpha=args.alpha))
    decoder = model.get_base_model().model
    decoder.rotary_emb = type(decoder.rotary_emb)(config)  # its buffers are computed, not random

    def prepare(layer):  # so that 4-bit experts never hold more than one layer in bf16
        _materialize(layer)
        if args.experts == "nf4":
            quantize_experts(layer)
            if args.processes > 1:
                make_experts_shardable(layer)

    if args.processes > 1:
        from accelerate import FullyShardedDataParallelPlugin

        torch.distributed.init_process_group("gloo")
        for part in (decoder.embed_tokens, decoder.norm, model.get_base_model().lm_head):
            _materialize(part)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["MixtralDecoderLayer"])
        shard_model(model, plugin, prepare=prepare)
    else:
        for layer in decoder.layers:
            prepare(layer)
        _materialize(model)
    set_expert_lora_mode(model, args.expert_lora)
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    at_rest = current_rss() - baseline
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    ids = torch.randint(3, config.vocab_size, (1, args.tokens))

    def step():
        # transformers' loss (whole logits), not TRL's fused LM head, whose CPU fallback makes fp32
        # temporaries per logits tile that its CUDA kernels do not (the estimate counts the CUDA path:
        # `activation_bytes`); at 128 tokens the two differ by a few MiB
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocates AdamW's states; the gradients are freed again by zero_grad
    warm = current_rss() - baseline
    sampler = RssSampler()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_s = (time.perf_counter() - start) / args.steps
    peak = sampler.stop() - baseline
    return {"at_rest": at_rest, "optimizer": warm - at_rest, "step": peak - warm, "peak": peak,
            "step_s": step_s}


def _dims(args: argparse.Namespace) -> dict:
    return {"num_hidden_layers": args.layers, "hidden_size": args.hidden,
            "intermediate_size": args.intermediate}


def _materialize(module: torch.nn.Module, std: float = 0.02) -> None:
    """Allocate the meta-device parameters of ``module`` on the CPU with random values (same dtype and grad
    flag)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_meta:
                values = torch.empty_like(param, device="cpu").normal_(std=std)
                sub._parameters[name] = torch.nn.Parameter(values, requires_grad=param.requires_grad)


if __name__ == "__main__":
    main()
