"""``bimedix build-data``, ``select-for-translation`` and ``stats``: build a BiMed1.3M-style dataset folder,
pick what to translate, show statistics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import _options


def register(subparsers) -> None:
    """Add ``build-data``, ``select-for-translation`` and ``stats`` to the ``bimedix`` command line."""
    build = _options.add_command(
        subparsers, "build-data", _build_data,
        help="build a BiMed1.3M-style dataset (Parquet + README configs) from a data recipe")
    build.add_argument("--recipe", required=True,
                       help="data recipe YAML, or a shipped recipe name: mini, bimed1.3m (see recipes/data/)")
    _options.add_output(build, "dataset folder to create or resume")
    build.add_argument("--sources", type=Path, default=None,
                       help="folder holding the original source files (overrides the recipe's sources_dir)")
    _options.add_on_error(build, "raise", "OUTPUT/rejects.jsonl")
    _options.add_include_unreviewed(build)
    _options.add_no_progress(build)
    build.add_argument("--num-proc", type=int, default=None, metavar="N",
                       help="processes for the convert and clean stages (default: all cores); the output is "
                            "byte-identical for any N")
    _options.add_overwrite(build, "build-data")

    select = _options.add_command(
        subparsers, "select-for-translation", _select_for_translation,
        help="pick the English records to translate (stratified, seeded, reproducible)")
    select.add_argument("--input", required=True, type=Path,
                        help="a JSON Lines file of bimedix records, or "
                             "a folder of them (*.jsonl, recursively)")
    _options.add_output(select, "where to write the picks (.jsonl; must not exist); "
                       "the table goes to OUTPUT.summary.md")
    select.add_argument("--target", required=True, type=float,
                        help="how many to pick: a count (444995) or a fraction of the English pool (0.51)")
    select.add_argument("--by", default="task,source", help="fields to stratify by: task, source or both "
                                                             "(default: task,source)")
    _options.add_seed(select, 42, "the selection")

    stats = _options.add_command(
        subparsers, "stats", _stats,
        help="print the statistics table (Fig. 3 style) of a built dataset folder")
    stats.add_argument("directory", type=Path, help="a folder made by `bimedix build-data` (or any folder of "
                                                     "bimedix Parquet files)")
    _options.add_json(stats)


def _build_data(args: argparse.Namespace) -> int:
    """Convert the recipe's sources, apply the translation review policy, drop benchmark overlaps and
    duplicates, keep English whole (or sample to the recipe's explicit mix.ar_en_ratio), write Parquet shards,
    statistics, target vs achieved composition and reports. Re-running resumes."""
    from ..data.build import build_data
    from ..data.composition import composition_markdown, has_targets
    from ..data.review_policy import ReviewPolicy
    from ..hub.cards import save_dataset_card

    result = build_data(args.recipe, args.output, sources_dir=args.sources, on_error=args.on_error,
                        progress=not args.no_progress, include_unreviewed=args.include_unreviewed,
                        num_proc=args.num_proc, overwrite=args.overwrite,
                        finish=lambda staging: save_dataset_card(staging, name=args.output))
    print(result.stats.to_markdown())
    if has_targets(result.composition):
        print("Composition (achieved vs the recipe's targets):\n" + composition_markdown(result.composition))
    print("Translation review (rejected: never used; pending / below-threshold: "
          + ("used, --include-unreviewed" if args.include_unreviewed else "left out") + "):\n"
          + ReviewPolicy.from_summary(result.review).table())
    for name, counts in result.sources.items():
        print(f"{name}: {counts.equation()}")
    print(f"\nTotal: {result.counts.equation()}")
    print(f"Shards: {result.shards_written} written, {result.shards_skipped} already finished (skipped)")
    print(f"Dataset: {result.output} (load with "
          f"datasets.load_dataset({str(result.output)!r}, 'all', split='train'))")
    return 0 if result.counts.balanced else 1


def _stats(args: argparse.Namespace) -> int:
    """Print the statistics table (Fig. 3 style) of a dataset folder made by `bimedix build-data`: samples and
    tokens per task and language; --json prints them as JSON."""
    from ..core.io import read_json
    from ..data.stats import DataStats, compute_stats

    path = args.directory / "stats.json"
    if path.is_file():
        summary = read_json(path)
        try:
            stats = DataStats.from_dict(summary)
            equation = _counts_equation(summary)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not the stats.json that `bimedix build-data` writes (cannot read "
                             f"{type(err).__name__}: {err}); rebuild the "
                             "dataset, or move the file away to compute "
                             "the table from the Parquet files") from None
    else:
        files = (sorted(args.directory.glob("data/**/*.parquet"))
                 or sorted(args.directory.glob("**/*.parquet")))
        if not files:
            raise FileNotFoundError(f"{args.directory} has neither stats.json nor Parquet files; "
                                    "build it with `bimedix build-data`")
        from ..core.io import iter_parquet_records

        def rows():
            for file in files:
                yield from iter_parquet_records(file, ["task", "language", "conversations"],
                                                optional=["system"])

        stats = compute_stats(rows())
        summary, equation = stats.to_dict(), None
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
        return 0
    print(stats.to_markdown())
    if equation:
        print(equation)
    return 0


def _select_for_translation(args: argparse.Namespace) -> int:
    """Pick a target number (or fraction) of English records for translation, stratified by task and source in
    proportion to their sizes, by a seeded hash of the record id; write the picks and a summary table. The
    paper translates 444,995 of its ~866.6K English records (--target 444995, or about --target 0.51); English
    itself is never down-sampled."""
    from ..data.selection import select_for_translation, summary_path

    by = [name.strip() for name in args.by.split(",") if name.strip()]
    selection = select_for_translation(args.input, args.output, target=args.target, by=by, seed=args.seed)
    print(selection.table(by))
    print(f"picked {selection.picked:,} of {selection.pool:,} English records (target {selection.target:,}; "
          f"{selection.skipped_non_english:,} non-English records ignored) -> {args.output}")
    print(f"summary: {summary_path(args.output)}")
    return 0


def _counts_equation(summary: dict) -> str | None:
    """``read = written + ...`` from the ``counts`` of a stats.json, if it has them."""
    from ..data.build import Counts

    counts = summary.get("counts")
    return None if counts is None else Counts(**{k: v for k, v in counts.items() if k
                                                 != "balanced"}).equation()
