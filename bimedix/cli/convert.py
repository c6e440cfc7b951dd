"""``bimedix convert``: turn one original source file into schema records (JSON Lines)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.conventions import LANGUAGES
from ..core.outputs import check_outputs
from . import _options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    parser = _options.add_command(
        subparsers, "convert", run,
        help="convert an original source file into BiMed records (JSON Lines)")
    parser.add_argument("source", metavar="SOURCE",
                        help="source name: pubmedqa, medmcqa, medqa, mmlu, mmlu-ar, medarabench, "
                             "healthcaremagic, icliniq, meadow, umls, liveqa, medicationqa, mentalqa")
    parser.add_argument("--input", required=True, type=Path,
                        help="the original file (a folder for mmlu / mmlu-ar)")
    _options.add_output(parser, "where to write the records (.jsonl)")
    parser.add_argument("--language", choices=LANGUAGES, help="record language (default: the source's)")
    _options.add_on_error(parser, "raise", "the --rejects file")
    parser.add_argument("--rejects", type=Path,
                        help="rejects file for --on-error skip (default: OUTPUT with .rejects.jsonl)")
    parser.add_argument("--ground-truth", type=Path,
                        help="pubmedqa: test_ground_truth.json (labels, test PMIDs)")
    parser.add_argument("--split", choices=["all", "train", "test"], help="pubmedqa: which PMIDs to keep "
                        "(test = those in --ground-truth)")
    parser.add_argument("--cop-base", type=int, choices=[0, 1],
                        help="medmcqa: 1 for the original files (default), 0 for the Hugging Face export")


def run(args: argparse.Namespace) -> int:
    """Stream an original public source file (PubMedQA, MedMCQA, MedQA, MMLU, LiveQA, ...) into the bimedix
    conversation schema. Bad records stop the run (naming file:record: field) unless --on-error skip, which
    writes each of them with its reason to the rejects file."""
    from tqdm.auto import tqdm

    from ..core.io import write_jsonl
    from ..data.converters import convert
    from ..data.rejects import RejectLog, on_error_for
    from ..data.schema import RecordError

    options = {name: value for name, value in (("ground_truth", args.ground_truth), ("split", args.split),
                                                ("cop_base", args.cop_base)) if value is not None}
    rejects_path = None
    if args.on_error == "skip":
        default = args.output.with_name(args.output.name.removesuffix(".jsonl") + ".rejects.jsonl")
        rejects_path = args.rejects or default
    elif args.rejects is not None:
        raise ValueError("--rejects only applies with --on-error skip")
    check_outputs({"--output": args.output, "--rejects": rejects_path},
                  {"--input": args.input, "--ground-truth": args.ground_truth})
    with RejectLog(rejects_path) as rejects:
        records = convert(args.source, args.input, language=args.language,
                          on_error=on_error_for(args.on_error, rejects), **options)
        try:
            written = write_jsonl(args.output, tqdm(records, desc=f"convert {args.source}", unit=" records"))
        except RecordError as err:
            hint = ("rerun with --on-error skip to set bad records aside" if args.on_error == "raise" else
                    "this error concerns the whole file, so "
                    "--on-error skip cannot set it aside: fix the file")
            raise RecordError(f"{err.reason} ({hint})", path=err.path, record=err.record,
                              field=err.field) from None
    print(f"{args.source}: read {written + rejects.count}, written {written}, rejected {rejects.count} "
          f"-> {args.output}")
    if rejects_path is not None:
        print(f"rejects: {rejects_path}")
        for reason, count in rejects.reasons.most_common(5):
            print(f"  {count:6d}  {reason}")
    return 0
