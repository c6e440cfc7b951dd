"""``bimedix targets | show-mask | sft | merge | estimate-memory``: fine-tuning commands."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from bimedix.training.masking import assistant_token_mask, mask_summary, render_mask

from . import _options


def register(subparsers) -> None:
    """Add the training sub-commands."""
    p = _options.add_command(
        subparsers, "targets", _targets,
        help="show which weights a LoRA preset adapts and the trainable share")
    p.add_argument("model", nargs="?",
                   help="tiny arch name (mixtral, qwen2_moe, ...), "
                        "local model folder, or cached/shipped Hub id")
    p.add_argument("--recipe", help="an SFT recipe YAML: its model, preset, r, alpha and rank/alpha patterns "
                                    "(instead of MODEL and the flags below)")
    p.add_argument("--preset", default="paper", help="paper | attention | experts | all (default: paper)")
    p.add_argument("--r", type=int, default=128, help="LoRA rank (default: 128, the paper's)")
    p.add_argument("--alpha", type=int, default=64, help="LoRA alpha (default: 64)")
    _options.add_json(p)

    p = _options.add_command(
        subparsers, "show-mask", _show_mask,
        help="print a training sample with its trained tokens highlighted")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe",
                        help="an SFT recipe YAML: its data, template, system prompt and max_length")
    source.add_argument("--data", help="a schema-record JSONL file (or anything `datasets` loads)")
    p.add_argument("--index", type=int, default=0, help="row to show (default: 0)")
    p.add_argument("--model", help="tokenizer to use with --data (default: the Mixtral tokenizer)")
    flag = p.add_argument("--max-length", type=int, help="truncate like SFTConfig.max_length")
    _options.add_hidden_alias(p, flag, "--max_length")
    p.add_argument("--plain", action="store_true", help="mark trained spans with [[ ]] instead of colour")

    # '-' is not an option prefix here, so every flag reaches TrlParser untouched (it owns --help too)
    p = _options.add_command(
        subparsers, "sft", _sft,
        help="fine-tune an MoE model (same flags as recipes/sft.py)",
        add_help=False, prefix_chars="+")
    p.add_argument("args", nargs=argparse.REMAINDER, help="--config FILE and --key value flags")

    p = _options.add_command(
        subparsers, "merge", _merge,
        help="merge a LoRA adapter into its base model after a logit check")
    p.add_argument("--base",
                   help="base model (folder, Hub id, or tiny:<arch>:<seed>); default: the adapter's")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    _options.add_output(p, "output folder for the merged safetensors model", path=False)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |merged - adapter| logit difference")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    flag = p.add_argument("--quantize-experts", choices=["nf4", "fp4"],
                          help="the adapter was trained on 4-bit experts: merge into those (dequantized) "
                               "experts")
    _options.add_hidden_alias(p, flag, "--quantize_experts")
    p.add_argument("--force", action="store_true",
                   help="merge even if the adapter was trained on "
                        "another base or is already merged into --base")
    _options.add_overwrite(p, "merge")
    _options.add_use_kernels(p, "the base")

    p = _options.add_command(
        subparsers, "estimate-memory", _estimate_memory,
        help="GPU memory a recipe needs per process, from the model config only")
    p.add_argument("--recipe", required=True, help="an SFT recipe YAML")
    flag = p.add_argument("--num-processes", type=int,
                          help="processes (GPUs); default: the accelerate config's, else 1")
    _options.add_hidden_alias(p, flag, "--num_processes")
    flag = p.add_argument("--accelerate-config",
                          help="accelerate config YAML (e.g. recipes/accelerate_configs/deepspeed_zero2.yaml)"
                               " or one of single, ddp, zero1, zero2, zero3, fsdp; default: DDP when "
                               "--num-processes > 1")
    _options.add_hidden_alias(p, flag, "--accelerate_config")
    p.add_argument("--gpu", type=float,
                   help="GPU memory in GB (16, 24, 48, 80, 141 or any size): say whether the run "
                                             "fits and, when not, the nearest setting that does")
    _options.add_json(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="-- then recipe flags, e.g. -- --max_length 4096")


def _targets(args) -> int:
    """Show which weights a LoRA preset adapts on a model (attention, router gate, expert projections) and the
    trainable share, from the model's config alone (nothing is downloaded or loaded)."""
    from bimedix.training.moe.targets import build_lora_config, describe_targets, lora_table, meta_model

    if args.recipe:
        from bimedix.training.sft import load_recipe, make_peft_config

        if args.model:
            raise ValueError("Give MODEL or --recipe, not both.")
        _, _, model_args, _, bimedix = load_recipe(args.recipe, use_cpu=True)
        if not model_args.use_peft:
            raise ValueError(f"{args.recipe}: use_peft is false, so the recipe trains no adapter.")
        model = bimedix.meta_model(model_args.model_name_or_path)
        config = make_peft_config(model, model_args, bimedix)
    elif args.model:
        model = meta_model(args.model)
        config = build_lora_config(model, args.preset, r=args.r, alpha=args.alpha)
    else:
        raise ValueError("Give a MODEL or --recipe.")
    rows, trainable, total = lora_table(model, config)
    if args.json:
        print(json.dumps({"rows": rows, "trainable": trainable, "total": total,
                          "target_modules": sorted(config.target_modules or []),
                          "target_parameters": sorted(config.target_parameters or [])}, indent=1))
        return 0
    print(f"{'name':<52} {'kind':<9} {'group':<14} {'shape':<18} {'r':>4} {'LoRA params':>12}")
    for row in rows:
        print(f"{row['name']:<52} {row['kind']:<9} {row['group']:<14} {'x'.join(map(str, row['shape'])):<18} "
              f"{row['r']:>4} {row['lora_params']:>12,}")
    print()
    for group, count in describe_targets(rows).items():
        print(f"{group:<14} {count:>15,}")
    print(f"target_modules={sorted(config.target_modules or [])} target_parameters="
          f"{sorted(config.target_parameters or [])} r={config.r} alpha={config.lora_alpha}"
          + (f" rank_pattern={config.rank_pattern} alpha_pattern={config.alpha_pattern}"
             if config.rank_pattern or config.alpha_pattern else ""))
    print(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")
    return 0


def _show_mask(args) -> int:
    """Print a training sample as TRL will see it, with the tokens that carry loss (the assistant turns)
    highlighted."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments
    from trl.scripts.utils import DatasetConfig

    from bimedix.training.sft import BimedixArguments, load_recipe, load_sft_dataset, load_tokenizer

    if args.recipe:
        script, training, model_args, mixture, bimedix = load_recipe(args.recipe, use_cpu=True)
        max_length = args.max_length or training.max_length
    else:
        script, model_args = ScriptArguments(), ModelConfig(model_name_or_path=args.model)
        mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path=args.data)])
        bimedix = BimedixArguments(tiny_model=None if args.model else "mixtral")
        max_length = args.max_length
    tokenizer = load_tokenizer(model_args, bimedix)
    dataset = load_sft_dataset(script, mixture,
                               system_prompt=bimedix.system_prompt)[script.dataset_train_split]
    if not 0 <= args.index < len(dataset):
        raise ValueError(f"--index {args.index} is out of range: the data has {len(dataset)} rows.")
    ids, mask = assistant_token_mask(tokenizer, dataset[args.index]["messages"], max_length=max_length)
    print(render_mask(tokenizer, ids, mask, plain=args.plain))
    print(f"\n[row {args.index}: {mask_summary(mask)}]")
    return 0


def _sft(args) -> int:
    """Run `bimedix sft --config RECIPE.yaml [--key value ...]`; `bimedix sft --help` lists every key."""
    from bimedix.hub.cards import save_model_card
    from bimedix.training.sft import main, parse_args

    # start-up lines a user checks before a long run (how the model is placed, what was quantized)
    logging.getLogger("bimedix").setLevel(logging.INFO)
    trainer = main(*parse_args(args.args, prog="bimedix sft"), finish=save_model_card)
    if trainer.accelerator.is_main_process:
        print(f"model card: {Path(trainer.args.output_dir) / 'README.md'}")
    return 0


def _merge(args) -> int:
    """Merge a LoRA adapter (expert LoRA included) into its base model after a logit check, and write the
    merged model with a merge report; optionally store the merged experts in 4 bits."""
    from bimedix.training.merge import adapter_base_name, merge_adapter

    base = args.base or adapter_base_name(args.adapter)
    if not base:
        raise ValueError(f"{args.adapter}/adapter_config.json names no base model: pass --base.")
    report = merge_adapter(base, args.adapter, args.output, tolerance=args.tolerance, dtype=args.dtype,
                           quantize_experts=args.quantize_experts, force=args.force, overwrite=args.overwrite,
                           use_kernels=args.use_kernels)
    print(f"merged {args.adapter} into {base} -> {args.output}")
    print(f"max |merged - adapter| logit difference: {report['max_abs_diff_merged_vs_adapter']:.3g} "
          f"(tolerance {args.tolerance:g}); max |merged - base|: {report['max_abs_diff_merged_vs_base']:.3g}")
    return 0


def _estimate_memory(args) -> int:
    """Per-GPU memory of a recipe: frozen weights, adapter states, activations and step transients, after the
    sharding of the accelerate config. Recipe keys can be overridden after `--`, e.g. `-- --quantize_experts
    nf4`."""
    from bimedix.training.memory import estimate_memory, format_report

    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    report = estimate_memory(args.recipe, overrides, num_processes=args.num_processes,
                             accelerate_config=args.accelerate_config, gpu=args.gpu)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
