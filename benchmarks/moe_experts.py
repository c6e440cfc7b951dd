"""Peak memory and LoRA training-step time of a stack of Mixtral MoE layers: bf16 vs 4-bit (NF4) experts,
PEFT's default expert LoRA vs bimedix's folded path, and transformers' `experts_implementation` options.

Each configuration runs in its own process (so that peak memory is its own): random weights with Mixtral's
real dimensions by default (hidden 4096, intermediate 14336, 8 experts, top-2), router + expert LoRA,
forward + backward of ``--tokens`` tokens through ``--layers`` residual MoE layers.

    python benchmarks/moe_experts.py                                      # GPU, Mixtral dims
    python benchmarks/moe_experts.py --layers 1 --hidden 1024 --intermediate 3584 --tokens 256   # CPU

Peak memory is `torch.cuda.max_memory_allocated` during the timed steps on CUDA; on CPU it is the peak
resident set size during the timed steps (sampled; glibc told to return freed tensors) minus the size after
imports, so it counts weights at rest plus the step's transients. Targets: experts memory >= 3x lower in
4-bit; folded LoRA
>= 1.5x faster than PEFT's default path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
from torch import nn

CONFIGS = {  # name: (experts, expert LoRA path, transformers experts_implementation)
    "bf16 experts, PEFT LoRA, eager": ("bf16", "peft", "eager"),
    "bf16 experts, PEFT LoRA, batched_mm": ("bf16", "peft", "batched_mm"),
    "bf16 experts, PEFT LoRA, grouped_mm": ("bf16", "peft", "grouped_mm"),
    "bf16 experts, folded LoRA": ("bf16", "folded", "grouped_mm"),
    "nf4 experts, PEFT LoRA, grouped_mm": ("nf4", "peft", "grouped_mm"),
    "nf4 experts, folded LoRA": ("nf4", "folded", "grouped_mm"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="MoE layers in the stack")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (Mixtral-8x7B: 4096)")
    parser.add_argument("--intermediate", type=int, default=14336,
                        help="expert intermediate size (Mixtral: 14336)")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer (Mixtral: 8)")
    parser.add_argument("--top_k", type=int, default=2, help="experts per token (Mixtral: 2)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch x sequence)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    parser.add_argument("--max_gather_gib", type=float, default=4.0,
                        help="skip batched_mm when its per-token weight gather would exceed this")
    parser.add_argument("--only", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                        help="which configurations to run")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.only:
        print(json.dumps(run_config(args, *CONFIGS[args.only])))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores visible)"
    print(f"{args.layers} MoE layer(s): hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.experts} experts, top-{args.top_k}; {args.tokens} tokens/step; LoRA r={args.rank} on "
          f"router + experts; checkpointing {'on' if args.checkpointing else 'off'}; "
          f"{card}; torch {torch.__version__}")
    results = {}
    for name in args.configs:
        # batched_mm: W[e] per token
        gathered = args.tokens * args.top_k * 3 * args.hidden * args.intermediate * 2
        if CONFIGS[name][2] == "batched_mm" and gathered > args.max_gather_gib * 2**30:
            print(f"{name:40s} skipped: it gathers {gathered / 2**30:.1f} GiB of expert weights per layer "
                  f"(> --max_gather_gib {args.max_gather_gib})")
            continue
        command = [sys.executable, __file__, "--only", name] + _forwarded(argv if argv is not None
                                                                          else sys.argv[1:])
        # a fixed mmap threshold makes glibc return freed tensors to the OS, so the CPU resident size follows
        # them
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        if done.returncode:
            print(f"{name:40s} FAILED: "
                  f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:40s} experts at rest {r['experts_bytes'] / 2**20:9.1f} MiB | peak "
              f"{r['peak_bytes'] / 2**20:9.1f} MiB | step {r['step_s']:8.3f} "
              f"s | {args.tokens / r['step_s']:9.0f} tokens/s")
    _print_ratios(results)


def run_config(args: argparse.Namespace, experts: str, lora: str, implementation: str) -> dict:
    """Build the stack, add LoRA, (quantize), time ``args.steps`` training steps; return the figures."""
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from bimedix.training.moe.expert_lora import set_expert_lora_mode
    from bimedix.training.moe.quantize import expert_parameter_bytes, quantize_experts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baseline = current_rss()
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                           num_hidden_layers=args.layers, router_jitter_noise=0.0)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    stack = MoEStack([], args.checkpointing)
    for _ in range(args.layers):  # layer by layer, so that 4-bit never holds the bf16 stack
        block = _bf16_block(MixtralSparseMoeBlock, config, device)
        if experts == "nf4":
            quantize_experts(block)
        stack.blocks.append(block)
    names = [f"blocks.{i}.{p}" for i in range(args.layers) for p in ("experts.gate_up_proj",
                                                                     "experts.down_proj")]
    lora_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                             target_parameters=["gate.weight", *names])
    model = get_peft_model(stack, lora_config)
    set_expert_lora_mode(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    hidden = torch.randn(1, args.tokens, args.hidden, device=device, dtype=torch.bfloat16)

    def step():
        out = model(hidden)
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = RssSampler() if device.type == "cpu" else None
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if sampler is None else sampler.stop() - baseline
    return {"experts_bytes": expert_parameter_bytes(stack), "peak_bytes": peak,
            "step_s": statistics.median(times),
            "trainable": sum(p.numel() for p in trainable)}


class MoEStack(nn.Module):
    """Residual stack of MoE blocks (``x + block(x)``), optionally checkpointed per block."""

    def __init__(self, blocks: list[nn.Module], checkpointing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.checkpointing = checkpointing

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            out = checkpoint(block, hidden, use_reentrant=False) if self.checkpointing else block(hidden)
            hidden = hidden + out
        return hidden


class RssSampler:
    """Peak resident set size of this process while it runs (sampled every millisecond in a thread)."""

    def __init__(self):
        self.peak, self._running = current_rss(), True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            self.peak = max(self.peak, current_rss())
            time.sleep(0.001)

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        return self.peak


def _bf16_block(block_class: type, config, device: torch.device) -> nn.Module:
    """A randomly initialised block allocated directly in bf16 (no fp32 copy of the experts)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            block = block_class(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(std=0.02)
    return block


def _print_ratios(results: dict) -> None:
    rows = [
        ("experts at rest, bf16 / nf4 (target >= 3)", "experts_bytes",
         "bf16 experts, folded LoRA", "nf4 experts, folded LoRA"),
        ("peak step memory, bf16 PEFT / nf4 folded", "peak_bytes",
         "bf16 experts, PEFT LoRA, grouped_mm", "nf4 experts, folded LoRA"),
        ("peak step memory, bf16: PEFT / folded", "peak_bytes",
         "bf16 experts, PEFT LoRA, grouped_mm", "bf16 experts, folded LoRA"),
        ("peak step memory, nf4: PEFT / folded", "peak_bytes",
         "nf4 experts, PEFT LoRA, grouped_mm", "nf4 experts, folded LoRA"),
        ("step time, bf16: PEFT (grouped_mm) / folded (target >= 1.5)", "step_s",
         "bf16 experts, PEFT LoRA, grouped_mm", "bf16 experts, folded LoRA"),
        ("step time, bf16: PEFT (eager) / folded", "step_s",
         "bf16 experts, PEFT LoRA, eager", "bf16 experts, folded LoRA"),
        ("step time, nf4: PEFT / folded (target >= 1.5)", "step_s",
         "nf4 experts, PEFT LoRA, grouped_mm", "nf4 experts, folded LoRA"),
        ("step time, PEFT LoRA: eager / grouped_mm", "step_s",
         "bf16 experts, PEFT LoRA, eager", "bf16 experts, PEFT LoRA, grouped_mm"),
        ("step time, PEFT LoRA: batched_mm / grouped_mm", "step_s",
         "bf16 experts, PEFT LoRA, batched_mm", "bf16 experts, PEFT LoRA, grouped_mm"),
    ]
    print("Ratios:")
    for label, field, numerator, denominator in rows:
        if numerator in results and denominator in results:
            print(f"  {label:62s} {results[numerator][field] / results[denominator][field]:6.2f}x")


def _forwarded(argv: list[str]) -> list[str]:
    """The command-line flags to pass on to a one-configuration run (all but --configs)."""
    out, skip = [], False
    for arg in argv:
        if arg == "--configs":
            skip = True
            continue
        if skip and not arg.startswith("--"):
            continue
        skip = False
        out.append(arg)
    return out


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    main()
