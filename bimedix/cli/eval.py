"""``bimedix eval`` (lm-eval on the bimedix tasks, paper-shaped tables) and ``bimedix build-bench``."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bimedix.core.outputs import OutputFolder, staged_folder

from . import _options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``build-bench``."""
    run = _options.add_command(
        subparsers, "eval", _eval,
        help="evaluate a model on the English / Arabic / bilingual medical benchmarks (lm-eval)")
    _options.add_model(run)
    run.add_argument("--tasks", default="auto",
                     help="comma-separated tasks/groups: bimedix_bilingual, bimedix_en, bimedix_ar, "
                          "bimedix_table2|3|4, bimedix_<subset>_<en|ar>, or lm-eval tasks such as "
                          "arabic_leaderboard_arabic_mmlu_anatomy; "
                          "'auto' (default): every subset the data has")
    run.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    run.add_argument("--limit", type=float, default=None, help="questions per task (a fraction if < 1)")
    run.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    run.add_argument("--data-dir", default=None,
                     help="folder written by `bimedix build-bench` "
                          "(or its Hub id); default: the bundled slice")
    run.add_argument("--batch-size", default="1", help="lm-eval batch size, or 'auto'")
    _options.add_output(run, "folder for results.json, samples, consistency.json, tables.md", path=False)
    run.add_argument("--cache", default=None, metavar="PATH",
                     help="lm-eval request cache (SQLite path prefix): rerun the same command to resume")
    _options.add_overwrite(run, "eval")
    _options.add_use_kernels(run, when="hf backend: ")

    build = _options.add_command(
        subparsers, "build-bench", _build_bench,
        help="build the evaluation data (English + the Arabic benchmark) from original files")
    build.add_argument("--sources", required=True, help="folder holding the original benchmark files")
    _options.add_output(build, "evaluation data folder to write", path=False)
    build.add_argument("--translations", default=None,
                       help="JSON Lines of translated Arabic MCQA records (from the translation pipeline)")
    build.add_argument("--bimedix-arabic", default=None,
                       help="folder with local copies of BiMediX's "
                            "Arabic eval sets (medqa-test_arabic/, ...)")
    build.add_argument("--subsets", default=None,
                       help="comma-separated subsets to build (default: all found)")
    build.add_argument("--limit", type=int, default=None, help="keep the first N questions per subset")
    _options.add_on_error(build, "skip", "OUTPUT/rejects.jsonl")
    _options.add_include_unreviewed(build, "--translations: ")
    _options.add_overwrite(build, "build-bench")


def _eval(args: argparse.Namespace) -> int:
    """Run the packaged lm-eval tasks, write lm-eval's JSON, print tables shaped like the paper's Tables 2-4
    next to its reported rows, and write them as markdown (tables.md)."""
    from bimedix.eval.run import check_adapter, evaluate, expert_lora_targets
    from bimedix.eval.tables import format_tables

    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    kwargs = dict(tasks=args.tasks, backend=args.backend, data_dir=args.data_dir, limit=limit,
                  num_fewshot=args.num_fewshot, batch_size=batch_size, device=args.device,
                  output_dir=args.output,
                  cache=args.cache, overwrite=args.overwrite, use_kernels=args.use_kernels)
    if args.backend == "vllm" and args.peft and expert_lora_targets(check_adapter(args.model, args.peft)):
        results = _evaluate_merged(args.model, args.peft, args.output, kwargs)
    else:
        results = evaluate(args.model, peft=args.peft, **kwargs)
    name = args.peft or args.model
    print(format_tables(results, model_name=name.rstrip("/").rsplit("/", 1)[-1]))
    print(f"wrote {args.output}/results.json, samples_*.jsonl, consistency.json, tables.md")
    return 0


def _evaluate_merged(model: str, adapter: str, output: str, kwargs: dict) -> dict:
    """Merge an adapter with expert LoRA into a folder of its own under ``output`` (with `bimedix merge`'s
    logit check), evaluate the merged model and delete that folder: vLLM may drop the expert deltas of a LoRA
    adapter."""

    from bimedix.eval.run import evaluate
    from bimedix.training.merge import merge_adapter

    folder = OutputFolder(output, "eval", inputs={"--model": model, "--peft": adapter},
                          overwrite=kwargs["overwrite"])
    merged = folder.folder("merged-model")  # recorded as this command's own, and removed below
    print(f"{adapter} adapts fused MoE experts, which vLLM may not apply as LoRA: merging it into {model} "
          f"first (logit-checked, as `bimedix merge`), in {merged} (removed afterwards)")
    try:
        report = merge_adapter(model, adapter, merged, use_kernels=kwargs["use_kernels"])
        print("merged: max |merged - adapter| logit difference "
              f"{report['max_abs_diff_merged_vs_adapter']:.3g}")
        return evaluate(str(merged), **kwargs)
    finally:
        shutil.rmtree(merged, ignore_errors=True)


def _build_bench(args: argparse.Namespace) -> int:
    """Read the original benchmark files under their original relative paths (the layout of ../shared/data)
    and write a Hub-ready evaluation folder; its arabic-bench/ sub-folder is the Arabic benchmark (Parquet +
    README configs, one per subset plus 'all')."""
    from bimedix.core.io import write_json
    from bimedix.data.rejects import RejectLog, on_error_for
    from bimedix.data.review_policy import ReviewPolicy
    from bimedix.eval.arabic_bench import collect_arabic_rows
    from bimedix.eval.bench import build_bench, source_inputs
    from bimedix.hub.cards import save_bench_cards

    output = Path(args.output)
    folder = OutputFolder(output, "build-bench", overwrite=args.overwrite, inputs={
        **source_inputs(args.sources), "--translations": args.translations,
        "--bimedix-arabic": args.bimedix_arabic})
    arabic = []
    review = ReviewPolicy(include_unreviewed=args.include_unreviewed)
    if args.translations or args.bimedix_arabic:
        arabic = list(collect_arabic_rows(translations=args.translations, bimedix_arabic=args.bimedix_arabic,
                                          review=review))
    subsets = args.subsets.split(",") if args.subsets else None
    with staged_folder(folder) as staging:  # written whole beside OUTPUT, then swapped in
        with RejectLog(staging.path("rejects.jsonl") if args.on_error == "skip" else None) as rejects:
            counts = build_bench(args.sources, staging, limit=args.limit, subsets=subsets, arabic_rows=arabic,
                                 on_error=on_error_for(args.on_error, rejects))
        if args.translations:
            write_json(staging.path("review.json"), review.summary())
        save_bench_cards(staging.root, name=output)
    for config, n in sorted(counts.items()):
        print(f"{config:32s} {n:6d}")
    if args.translations:
        print(f"translations by review status (written to {output / 'review.json'}):\n{review.table()}")
    if rejects.count:
        print(f"skipped {rejects.count} bad source records (see {output / 'rejects.jsonl'})")
    arabic = output / "arabic-bench"
    print(f"wrote {output}" + (f" (Arabic benchmark: {arabic})" if (arabic / "README.md").exists() else ""))
    return 0
