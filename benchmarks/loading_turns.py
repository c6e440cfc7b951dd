"""Host memory of N processes that load a model and pack its experts to 4 bit: at once, or in turns.

`bimedix sft` with ``quantize_experts`` reads the bf16 checkpoint into host memory to pack the experts, and on
several processes per node the processes take turns (`bimedix.training.sharding.load_in_turns`). This saves
a random Mixtral (Mixtral-8x7B's config cut to ``--layers`` layers of ``--hidden``/``--intermediate``) in
bf16, launches ``--processes`` CPU processes (`torch.distributed.run`, gloo) that each load it with
`from_pretrained` and pack its experts (`quantize_experts`), all at once and then in turns, and samples the
summed resident size of the processes every millisecond (glibc told to return freed memory, as in
``benchmarks/moe_experts.py``). It prints the peak of that sum above the processes' size after imports.

On CPU the packed experts stay in host memory after each turn; on a GPU they leave it, so a node's peak in
turns is one process's bf16 copy (about 90 GB for Mixtral-8x7B) instead of one per process.

    python benchmarks/loading_turns.py --processes 2 --hidden 1024 --intermediate 3584 --layers 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_experts import RssSampler, current_rss  # noqa: E402  (the sibling benchmark's sampler)

MODEL = "mistralai/Mixtral-8x7B-v0.1"
GIB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="processes on this node")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Mixtral-8x7B: 32)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (Mixtral-8x7B: 4096)")
    parser.add_argument("--intermediate", type=int, default=3584, help="expert intermediate size (14336)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Save the model, load it on ``--processes`` processes at once and in turns; print and return the
    peaks."""
    args = parse_args(argv)
    if args.child:
        return load(args)
    from transformers import AutoModelForCausalLM

    from bimedix.training.moe.targets import load_model_config

    config = load_model_config(MODEL, num_hidden_layers=args.layers, hidden_size=args.hidden,
                               intermediate_size=args.intermediate)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bimedix-turns-") as folder:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        for mode in ("at-once", "turns"):
            results[mode] = _run(args, folder, mode)
    per = results["turns"]["processes"][0]
    print(f"Mixtral, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers: "
          f"{size / GIB:.3f} GiB in bf16; {args.processes} CPU processes, torch {torch.__version__}")
    print(f"one process: peak while loading and packing {per['peak'] / GIB:.3f} GiB, "
          f"{per['after'] / GIB:.3f} GiB kept after (the packed model stays on CPU here)")
    for mode, result in results.items():
        print(f"{mode:<8} peak of the processes' summed resident size: {result['peak'] / GIB:.3f} GiB")
    print(f"in turns / at once = {results['turns']['peak'] / results['at-once']['peak']:.2f}")
    return results


def load(args: argparse.Namespace) -> dict:
    """In a launched process: load and pack, at once or in turns; print this process's figures as JSON."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from bimedix.hub_kernels import load_pretrained
    from bimedix.training.moe.quantize import quantize_experts
    from bimedix.training.sharding import load_in_turns

    folder, mode = args.child.split("|")
    dist.init_process_group("gloo")
    baseline = current_rss()
    sampler = RssSampler()
    with load_in_turns() if mode == "turns" else contextlib.nullcontext():
        model = load_pretrained(AutoModelForCausalLM, folder, dtype=torch.bfloat16, device_map="cpu")
        quantize_experts(model)
    dist.barrier()
    figures = {"baseline": baseline, "peak": sampler.stop() - baseline, "after": current_rss() - baseline}
    print(json.dumps(figures), flush=True)
    dist.barrier()
    del model
    return figures


def _run(args: argparse.Namespace, folder: str, mode: str) -> dict:
    import psutil

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.processes), __file__, "--child", f"{folder}|{mode}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    launcher, peak = psutil.Process(process.pid), 0
    while process.poll() is None:  # the workers' summed resident size, every millisecond
        total = 0
        for child in launcher.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += child.memory_info().rss
        peak = max(peak, total)
        time.sleep(0.001)
    out, err = process.communicate()
    if process.returncode:
        raise RuntimeError(f"{mode} run failed:\n{err[-3000:]}")
    processes = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"peak": peak - sum(p["baseline"] for p in processes), "processes": processes}


if __name__ == "__main__":
    main()
