"""``bimedix push adapter|model|dataset|bench PATH --repo-id ORG/NAME``: publish with a rendered card."""

from __future__ import annotations

import argparse

from . import _options


def register(subparsers) -> None:
    parser = _options.add_command(
        subparsers, "push", run_push,
        help="push an adapter, merged model, dataset or benchmark to the Hugging Face Hub with its card")
    parser.add_argument("kind", choices=["adapter", "model", "dataset", "bench"], help="what PATH holds")
    parser.add_argument("path", help="adapter/model folder, `build-data` output or `build-bench` output")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true",
                        help="create the repository private (new repos only)")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--dry-run", metavar="DIR",
                        help="write the folder that would be uploaded to DIR and stop")
    parser.add_argument("--acknowledge-research-only", action="store_true",
                        help="allow data from sources without a "
                             "redistribution licence (you must have the right)")
    _options.add_include_unreviewed(parser, "dataset: ")
    parser.add_argument("--eval", dest="eval_dir", metavar="DIR",
                        help="`bimedix eval` output for the model card")
    parser.add_argument("--eval-chat", dest="eval_chat_dir", metavar="DIR",
                        help="`bimedix eval-chat` output: its rubric-score table goes in the model card")
    parser.add_argument("--data", dest="data_dir", metavar="DIR",
                        help="training data folder for the model card")
    parser.add_argument("--base-model", help="Hub id of the base model (defaults to the adapter's)")
    parser.add_argument("--license", default="apache-2.0",
                        help="licence of the pushed weights (default: apache-2.0)")


def run_push(args: argparse.Namespace) -> int:
    """Stage PATH with a card rendered from its artefacts and push it; unchanged content makes no commit. The
    token comes from HF_TOKEN or `hf auth login` and is never printed."""
    from ..hub.push import push

    result = push(args.kind, args.path, repo_id=args.repo_id, private=args.private, revision=args.revision,
                  dry_run=args.dry_run, acknowledge_research_only=args.acknowledge_research_only,
                  eval_dir=args.eval_dir, data_dir=args.data_dir, base_model=args.base_model,
                  license=args.license,
                  include_unreviewed=args.include_unreviewed, eval_chat_dir=args.eval_chat_dir)
    for note in result.warnings:
        print(f"licence note: {note}" if "--include-unreviewed" not in note else f"review note: {note}")
    if args.dry_run:
        print(f"dry run: {len(result.files)} files that would be "
              f"pushed to {args.repo_id} are in {result.folder}")
    elif result.commit_url is None:
        print(f"{args.repo_id} is up to date ({len(result.files)} files): no commit made")
    else:
        print(f"pushed {len(result.uploaded)} changed file(s), "
              f"deleted {len(result.deleted)}: {result.commit_url}")
    return 0
