"""``bimedix build-data`` and ``bimedix stats``: build a BiMed1.3M-style dataset folder, show its statistics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    """Add ``build-data`` and ``stats`` to the ``bimedix`` command line."""
    build = subparsers.add_parser(
        "build-data", help="build a BiMed1.3M-style dataset (Parquet + README configs) from a data recipe",
        description="Convert the recipe's sources, drop benchmark overlaps and duplicates, mix Arabic:English, "
                    "write Parquet shards, statistics and reports. Re-running resumes.")
    build.add_argument("--recipe", required=True,
                       help="data recipe YAML, or a shipped recipe name: mini, bimed1.3m (see recipes/data/)")
    build.add_argument("--output", required=True, type=Path, help="dataset folder to create or resume")
    build.add_argument("--sources", type=Path, default=None,
                       help="folder holding the original source files (overrides the recipe's sources_dir)")
    build.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                       help="raise: stop at the first malformed record (file:record:field); "
                            "skip: write it to OUTPUT/rejects.jsonl and go on (default: raise)")
    build.add_argument("--no-progress", action="store_true", help="hide progress bars")
    build.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty OUTPUT that no build made (its other files are kept; inputs are "
                            "never written)")
    build.set_defaults(func=_build_data)

    stats = subparsers.add_parser("stats", help="print the statistics table (Fig. 3 style) of a built dataset folder")
    stats.add_argument("directory", type=Path, help="a folder made by `bimedix build-data` (or any folder of "
                                                     "bimedix Parquet files)")
    stats.add_argument("--json", action="store_true", help="print stats.json instead of the table")
    stats.set_defaults(func=_stats)


def _build_data(args: argparse.Namespace) -> int:
    from ..data.build import build_data

    result = build_data(args.recipe, args.output, sources_dir=args.sources, on_error=args.on_error,
                        progress=not args.no_progress, overwrite=args.overwrite)
    print(result.stats.to_markdown())
    for name, counts in result.sources.items():
        print(f"{name}: {counts.equation()}")
    print(f"\nTotal: {result.counts.equation()}")
    print(f"Shards: {result.shards_written} written, {result.shards_skipped} already finished (skipped)")
    print(f"Dataset: {result.output} (load with datasets.load_dataset({str(result.output)!r}, 'all', split='train'))")
    return 0 if result.counts.balanced else 1


def _stats(args: argparse.Namespace) -> int:
    from ..data.stats import DataStats, compute_stats

    path = args.directory / "stats.json"
    if path.is_file():
        summary = json.loads(path.read_text(encoding="utf-8"))
        stats = DataStats.from_dict(summary)
    else:
        files = sorted(args.directory.glob("data/**/*.parquet")) or sorted(args.directory.glob("**/*.parquet"))
        if not files:
            raise FileNotFoundError(f"{args.directory} has neither stats.json nor Parquet files; "
                                    "build it with `bimedix build-data`")
        import pyarrow.parquet as pq

        def rows():
            for file in files:
                for batch in pq.ParquetFile(file).iter_batches(columns=["task", "language", "system", "conversations"]):
                    yield from batch.to_pylist()

        stats = compute_stats(rows())
        summary = stats.to_dict()
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
        return 0
    print(stats.to_markdown())
    if "counts" in summary:
        from ..data.build import Counts

        counts = summary["counts"]
        print(Counts(**{k: v for k, v in counts.items() if k != "balanced"}).equation())
    return 0
