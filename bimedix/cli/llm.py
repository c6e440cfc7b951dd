"""``bimedix translate``, ``generate-chats``, ``review export|import|serve|stats`` and ``fake-openai-server``:
the LLM data engines.

Re-running ``translate`` or ``generate-chats`` with the same ``--output`` resumes: finished records are
skipped and recorded requests come from the cache (``OUT.llm.sqlite``) for free. Exit status 0 means
every record is in the output or the rejects file; 3 means the run stopped early (budget reached, or
records left by transient errors) and a re-run continues it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.outputs import check_outputs
from ..llm.review_stats import VERDICTS, review_agreement
from . import INCOMPLETE, _options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``translate``, ``generate-chats``, ``review`` and ``fake-openai-server`` sub-commands."""
    translate = _options.add_command(
        subparsers, "translate", _translate,
        help="translate English records into Arabic with an LLM (score, refine, queue for review)")
    _endpoint_arguments(translate)
    _options.add_translation_options(translate)
    translate.add_argument("--judge-attempts", type=int, default=3,
                           help="tries to get a well-formed judgement per round (default 3)")
    translate.add_argument("--drug-names", type=Path,
                           help="text file, one drug name per line, that must survive verbatim")

    chats = _options.add_command(
        subparsers, "generate-chats", _generate_chats,
        help="generate MCQA-grounded doctor-patient chats with an LLM")
    _endpoint_arguments(chats)
    chats.add_argument("--min-turns", type=int, default=4, help="fewest human/gpt exchanges (default 4)")
    chats.add_argument("--max-turns", type=int, default=8, help="most human/gpt exchanges (default 8)")
    chats.add_argument("--max-attempts", type=int, default=3,
                       help="generations per record before rejecting (default 3)")

    review = subparsers.add_parser("review", help="export translations for human review, import the reviews")
    actions = review.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = _options.add_command(
        actions, "export", _review_export,
        help="write the review queue (CSV or JSONL)")
    export.add_argument("--input", required=True, type=Path, help="translated records (.jsonl)")
    _options.add_output(export, "the queue, .csv or .jsonl")
    export.add_argument("--source", type=Path,
                        help="the English input, to show originals next to translations")
    _options.add_review_sampling(export)
    apply = _options.add_command(
        actions, "import", _review_import,
        help="apply a reviewed queue, with an audit trail")
    apply.add_argument("--input", required=True, type=Path, help="translated records (.jsonl)")
    apply.add_argument("--reviews", required=True, type=Path, help="the reviewed queue, .csv or .jsonl")
    _options.add_output(apply, "all records with reviews applied (.jsonl)")
    apply.add_argument("--reviewer", required=True, help="who reviewed (recorded in the audit trail)")
    apply.add_argument("--audit", type=Path,
                       help="audit trail to append to (default: OUTPUT with .audit.jsonl)")
    serve = _options.add_command(
        actions, "serve", _review_serve,
        help="review the queue in the browser (same queue, audit trail and result as export/import)")
    serve.add_argument("--input", required=True, type=Path, help="translated records (.jsonl)")
    serve.add_argument("--source", type=Path, help="the English input, shown next to each translation")
    serve.add_argument("--queue", type=Path,
                       help="a queue from `review export` (default: draw it as export does)")
    _options.add_output(serve, "all records with the decisions applied (default: INPUT.reviewed.jsonl)",
                        required=False)
    serve.add_argument("--audit", type=Path,
                       help="audit trail, the decision store (default: OUTPUT with .audit.jsonl); never an "
                            "input or the output")
    serve.add_argument("--reviewer", default="",
                       help="your name, pre-filled in the page (recorded with each decision)")
    _options.add_review_sampling(serve)
    _options.add_server(serve, "BIMEDIX_REVIEW_TOKEN")
    stats = _options.add_command(
        actions, "stats", _review_stats,
        help="how well the LLM judge's scores agree with the reviewers")
    stats.add_argument("--input", required=True, type=Path, help="reviewed records (.jsonl)")
    _options.add_json(stats)

    server = _options.add_command(
        subparsers, "fake-openai-server", _fake_server,
        help="run a scripted local OpenAI-compatible server (dry runs, no real model)")
    server.add_argument("--port", type=int, default=8000,
                        help="port on 127.0.0.1, 0 for a free one (default 8000)")
    server.add_argument("--latency", type=float, default=0.0,
                        help="seconds each completion waits (default 0)")


def _endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path,
                        help="input records (.jsonl, .parquet or a saved dataset)")
    _options.add_output(parser, "output records (.jsonl); re-run to resume")
    _options.add_endpoint(parser, required=True)
    _options.add_engine(parser, "OUTPUT with .llm.sqlite")
    _options.add_seed(parser, 0, "the requests and the sampling")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="completion limit per request (default 4096)")
    parser.add_argument("--no-json-mode", action="store_true",
                        help="do not send response_format=json_object (for servers without it)")


def _client(args: argparse.Namespace):
    from ..llm.cache import RequestCache
    from ..llm.client import ClientConfig, LLMClient, load_prices
    from ..llm.runner import rejects_path

    cache_path = args.cache or args.output.with_name(args.output.name.removesuffix(".jsonl") + ".llm.sqlite")
    check_outputs({"--output": args.output, "rejects file": rejects_path(args.output), "--cache": cache_path},
                  {"--input": args.input, "--prices": args.prices, "--prompts": args.prompts,
                   "--drug-names": getattr(args, "drug_names", None)})

    config = ClientConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                          concurrency=args.concurrency, requests_per_minute=args.rpm,
                          tokens_per_minute=args.tpm,
                          timeout=args.timeout, max_retries=args.max_retries, budget_usd=args.budget_usd,
                          prices=load_prices(args.prices) if args.prices else {}, batch=args.batch_api,
                          batch_poll_interval=args.batch_poll_interval,
                          max_tokens_field=args.max_tokens_field)
    return LLMClient(config, RequestCache(cache_path))


def _run(args: argparse.Namespace, engine) -> int:
    import asyncio

    from ..llm.runner import rejects_path

    client = _client(args)

    async def main():
        try:
            return await engine(client)
        finally:
            await client.aclose()
            client.cache.close()

    summary = asyncio.run(main())
    print(f"{args.command}: {summary.total} records: {summary.skipped} already done, {summary.accepted} "
          f"written, {summary.rejected} rejected ({summary.rebuilt} of them from finished results in the "
          f"cache) -> {args.output}")
    print(f"requests sent {summary.sent}; cost this run "
          f"${summary.cost_usd:.4f}; ledger ${summary.ledger_usd:.4f}")
    if summary.rejected:
        print(f"rejects: {rejects_path(args.output)}")
    if summary.stopped:
        print(f"stopped early: {summary.stopped}; re-run with a higher --budget-usd to continue")
    for failure in summary.failed[:5]:
        print(f"left for the next run: {failure}")
    return 0 if summary.complete else INCOMPLETE


def _translate(args: argparse.Namespace) -> int:
    """English->Arabic translation over any OpenAI-compatible endpoint: translate each whole conversation,
    check invariants (option letters, numbers, units, drug names), score 0-100 with an LLM judge, refine below
    --threshold for up to --max-rounds. Resumable; outputs are machine translations marked in
    meta.translation."""
    from ..llm.translation import TranslationConfig, translate_file

    drugs = frozenset()
    if args.drug_names:
        drugs = frozenset(line.strip() for line in args.drug_names.read_text(encoding="utf-8").splitlines()
                          if line.strip() and not line.startswith("#"))
    config = TranslationConfig(threshold=args.threshold, max_rounds=args.max_rounds,
                               judge_attempts=args.judge_attempts,
                               review_fraction=args.review_fraction, seed=args.seed, drug_names=drugs,
                               max_tokens=args.max_tokens, json_mode=not args.no_json_mode,
                               prompts_dir=args.prompts)
    return _run(args, lambda client: translate_file(args.input, args.output, client, config))


def _generate_chats(args: argparse.Namespace) -> int:
    """For every MCQA record, generate a multi-turn chat grounded in the question, options, answer and
    explanation (paper §3.1.1), until a logical conclusion; validate it and regenerate up to --max-attempts
    times. Resumable."""
    from ..llm.dialogue import DialogueConfig, generate_chats_file

    config = DialogueConfig(min_turns=args.min_turns, max_turns=args.max_turns,
                            max_attempts=args.max_attempts,
                            seed=args.seed, max_tokens=args.max_tokens, json_mode=not args.no_json_mode,
                            prompts_dir=args.prompts)
    return _run(args, lambda client: generate_chats_file(args.input, args.output, client, config))


def _review_export(args: argparse.Namespace) -> int:
    """Queue every translation below --threshold plus a seeded --fraction of the rest, one row per turn and
    option."""
    from ..llm.review import export_review_queue

    count = export_review_queue(args.input, args.output, source=args.source, fraction=args.fraction,
                                seed=args.seed,
                                threshold=args.threshold)
    print(f"review export: {count} records queued -> {args.output}")
    return 0


def _review_import(args: argparse.Namespace) -> int:
    """Check the whole review file (nothing is applied if any row is bad), apply edits and decisions, mark
    records reviewed, append the audit trail."""
    from ..llm.review import import_reviews

    summary = import_reviews(args.input, args.reviews, args.output, reviewer=args.reviewer, audit=args.audit)
    print(f"review import: {summary.reviewed} records reviewed ({summary.approved} approved, "
          f"{summary.edited} edited, {summary.rejected} rejected); "
          f"{summary.undecided_rows} rows left undecided -> {args.output}")
    return 0


def _review_serve(args: argparse.Namespace) -> int:
    """A local web app: one record at a time, English next to the editable Arabic, judge score, comments and
    invariant warnings; approve / edit / reject with keyboard shortcuts. Every decision is appended to the
    audit trail at once (a killed server loses nothing) and the reviewed records are written to --output as
    `review import` would write them. Needs `pip install 'bimedix[web]'`."""
    from ..llm.review_session import ReviewSession
    from ..web.server import WebServer, check_exposure, require_web

    require_web()
    from ..web.review_app import TOKEN_ENV, create_review_app

    check_exposure(args.host, args.token, app="the review app", token_env=TOKEN_ENV)
    output = args.output or args.input.with_name(args.input.name.removesuffix(".jsonl") + ".reviewed.jsonl")
    session = ReviewSession(args.input, output, source=args.source, queue=args.queue, audit=args.audit,
                            fraction=args.fraction, seed=args.seed, threshold=args.threshold)
    server = WebServer(create_review_app(session, reviewer=args.reviewer, token=args.token, host=args.host),
                       args.host, args.port)
    for warning in session.warnings:
        print(f"warning: {warning}")
    progress = session.progress()
    print(f"review serve: {progress['total']} records queued, {progress['done']} decided, {progress['left']} "
          f"left; decisions -> {session.audit}, reviewed records -> {session.output}")
    if not progress["left"]:
        print("every queued record is already decided; open the page to see or overrule decisions")
    print(f"open {server.url}{'?token=...' if args.token else ''} (Ctrl-C to stop)", flush=True)
    server.run()
    return 0


def _review_stats(args: argparse.Namespace) -> int:
    """Per score bucket, the share of reviewed translations approved / edited / rejected, and the ROC AUC of
    the score separating approved from edited-or-rejected."""
    from ..data.schema import read_records

    stats = review_agreement(read_records(args.input))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    if not stats["reviewed"]:
        print(f"review stats: no reviewed translation in {args.input} "
              "(run `review import` or `review serve` first)")
        return 0
    print(f"review stats: {stats['reviewed']} reviewed translations in {args.input}"
          + (f" ({stats['unscored']} without a score)" if stats["unscored"] else ""))
    print(f"{'score':>8} {'count':>6} " + " ".join(f"{state:>9}" for state in VERDICTS))
    for bucket in stats["buckets"]:
        shares = " ".join(f"{'-' if bucket[s] is None else f'{100 * bucket[s]:.0f}%':>9}" for s in VERDICTS)
        print(f"{bucket['range']:>8} {bucket['count']:>6} {shares}")
    auc = stats["roc_auc"]
    print("ROC AUC (score: approved vs edited-or-rejected): "
          + ("n/a (needs both approved and corrected records)" if auc is None else f"{auc:.3f}"))
    return 0


def _fake_server(args: argparse.Namespace) -> int:
    """Serve deterministic fake translations, judgements and dialogues on 127.0.0.1 for dry runs of translate
    / generate-chats. Not a model: its Arabic is letter-substituted English."""
    from ..llm.fake_server import FakeOpenAIServer

    server = FakeOpenAIServer(latency=args.latency, port=args.port)
    print(f"fake OpenAI-compatible server on {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
