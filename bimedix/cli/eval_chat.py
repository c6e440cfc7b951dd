"""``bimedix eval-chat``: grade a chat model's open-ended replies against HealthBench-format rubrics, in
English and Arabic; ``--agreement`` scores the judge against clinicians.

Exit status 0 means every reply and verdict is in; 3 means the run stopped early (budget, or work left by
transient errors) and re-running the same command continues it, paying only for what is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
from pathlib import Path

from ..core.conventions import LANGUAGES
from . import INCOMPLETE, _options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval-chat``."""
    parser = _options.add_command(
        subparsers, "eval-chat", run,
        help="grade open-ended replies against rubrics with an LLM judge (HealthBench format, EN+AR)")
    parser.add_argument(
        "--data", type=Path, help="HealthBench-format JSON Lines (prompt, rubrics, example_tags)"
    )
    _options.add_output(parser, "folder for results.json, examples.jsonl, table.md (re-run to resume)")
    parser.add_argument("--languages", default="en", help="comma-separated: en, ar or en,ar (default en)")
    parser.add_argument(
        "--data-ar",
        type=Path,
        help="an already reviewed Arabic set (same prompt_ids and criteria as --data) instead of "
        "machine translation",
    )
    _options.add_on_error(parser, "raise", "OUTPUT/rejects.jsonl")
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="evaluate a seeded random sample of N examples (as HealthBench's num_examples; --seed), in file "
        "order: a cheap first look before the full run",
    )
    _options.add_overwrite(parser, "eval-chat")
    model = parser.add_argument_group("model under test")
    _options.add_model(model, required=False, served=True, max_new_tokens=1024)
    _options.add_endpoint(model, model=False)  # vLLM, transformers serve, ... serving --model
    judge = parser.add_argument_group("judge (the grader)")
    _options.add_endpoint(judge, "judge-")
    judge.add_argument(
        "--judge-attempts",
        type=int,
        default=3,
        help="tries to get a valid JSON verdict per criterion before counting it failed (default 3)",
    )
    judge.add_argument(
        "--judge-max-tokens", type=int, default=2048, help="verdict length limit (default 2048)"
    )
    judge.add_argument(
        "--judge-json-mode",
        action="store_true",
        help="send response_format=json_object to the judge (HealthBench does not)",
    )
    translate = parser.add_argument_group("Arabic translation (--languages with ar, no --data-ar)")
    _options.add_endpoint(translate, "translate-", fallback="the judge's")
    _options.add_translation_options(translate)
    engine = parser.add_argument_group(
        "engine", "requests to the judge and the translator (the model under test is asked directly)"
    )
    _options.add_engine(engine, "OUTPUT/eval-chat.llm.sqlite")
    _options.add_seed(engine, 0, "the requests, the sampling and the bootstrap")
    engine.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)"
    )
    review = parser.add_argument_group("clinician review of the machine-translated Arabic set")
    review.add_argument(
        "--apply-review",
        type=Path,
        metavar="QUEUE",
        help="the reviewed OUTPUT/data_ar.review.csv (or .jsonl): write "
        "OUTPUT/data_ar.reviewed.jsonl (+ .audit.jsonl) to pass with --data-ar",
    )
    review.add_argument("--reviewer", help="with --apply-review: who reviewed (recorded in the audit trail)")
    calibration = parser.add_argument_group("judge calibration")
    calibration.add_argument(
        "--calibration-sample",
        type=int,
        default=0,
        metavar="N",
        help="also write OUTPUT/calibration.csv: N graded (reply, criterion) pairs per "
        "language for clinicians to grade blind (never overwritten once written)",
    )
    calibration.add_argument(
        "--agreement",
        nargs="+",
        type=Path,
        metavar="SHEET",
        help="filled calibration sheets (.csv/.jsonl): report judge-vs-clinician macro F1 "
        "per language for the run in --output, and write OUTPUT/agreement.json",
    )


def run(args: argparse.Namespace) -> int:
    """Generate a reply to each conversation of a HealthBench-format file with the model under test (a local
    model, or --base-url), grade it criterion by criterion with an LLM judge (HealthBench's grader prompt),
    and report the rubric score with bootstrap 95% CIs, per theme and per axis, in English and Arabic side by
    side. Resumable: a re-run pays nothing. With --agreement, report judge-vs-clinician agreement from filled
    calibration sheets."""
    if args.agreement:
        return _agreement(args)
    if args.apply_review:
        return _apply_review(args)
    from ..core.outputs import OutputFolder, check_outputs
    from ..data.rejects import RejectLog, on_error_for
    from ..data.rubric import read_rubric_examples
    from ..eval.chat_eval import CACHE_NAME
    from ..llm.cache import RequestCache

    missing = [
        flag
        for flag, value in (
            ("--data", args.data),
            ("--model", args.model),
            ("--judge-base-url", args.judge_base_url),
            ("--judge-model", args.judge_model),
        )
        if not value
    ]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --agreement SHEET to score the judge)")
    languages = [part.strip() for part in args.languages.split(",") if part.strip()]
    unknown = [language for language in languages if language not in LANGUAGES]
    if unknown or not languages:
        raise ValueError(f"--languages {args.languages!r}: use en, ar or en,ar")
    if args.peft and args.base_url:
        raise ValueError("--peft applies to a local --model; an endpoint (--base-url) serves its own adapter")
    if not args.base_url:  # before any request: a local model that cannot load fails now, not after paying
        from ..resources import check_model_folder

        check_model_folder(args.model)
        if args.peft:
            check_model_folder(args.peft, "--peft")
    inputs = {
        "--data": args.data,
        "--data-ar": args.data_ar,
        "--prices": args.prices,
        "--prompts": args.prompts,
        "--model": None if args.base_url else args.model,
        "--peft": args.peft,
    }
    folder = OutputFolder(args.output, "eval-chat", inputs=inputs, overwrite=args.overwrite)
    cache_path = args.cache or folder.path(CACHE_NAME)
    check_outputs({"--cache": cache_path}, inputs)
    skip = args.on_error == "skip"
    with RejectLog(folder.path("rejects.jsonl") if skip else None) as rejects:
        policy = on_error_for(args.on_error, rejects)
        english = read_rubric_examples(args.data, on_error=policy)
        reviewed = (
            read_rubric_examples(args.data_ar, language="ar", on_error=policy)
            if args.data_ar and "ar" in languages
            else None
        )
    if rejects.count:
        print(f"skipped {rejects.count} bad input line(s) (see {folder.path('rejects.jsonl')})")
    if reviewed is not None:
        _check_arabic(english, reviewed, args.data_ar)
    if args.limit is not None and args.limit < len(english):
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        keep = set(random.Random(args.seed).sample(range(len(english)), args.limit))
        english = [example for index, example in enumerate(english) if index in keep]
    cache = RequestCache(cache_path)
    try:
        return _evaluate(args, languages, english, reviewed, folder, cache)
    finally:
        cache.close()


def _evaluate(args, languages, english, reviewed, folder, cache) -> int:
    from ..eval.chat_eval import (
        ChatEvalRun,
        EndpointReplies,
        LocalReplies,
        generate_replies,
        grade_replies,
        translate_examples,
        write_arabic_set,
        write_results,
    )
    from ..eval.chat_tables import format_chat_table
    from ..eval.judge_agreement import export_calibration_sheet
    from ..llm.grading import GradingConfig, RubricGrader
    from ..llm.translation import TranslationConfig, Translator

    run_state = ChatEvalRun()
    start_ledger = cache.total_cost()
    info = {
        "model": args.model + (f" + {args.peft}" if args.peft else ""),
        "judge": args.judge_model,
        "data": str(args.data),
        "languages": languages,
    }
    queue = None

    async def main() -> None:
        nonlocal queue
        if "en" in languages:
            run_state.examples["en"] = english
        if "ar" in languages and reviewed is not None:
            run_state.examples["ar"] = _pair(english, reviewed, args.data_ar, run_state)
            paired = run_state.examples["ar"]
            marked = sum(bool((e.extra.get("translation") or {}).get("reviewed")) for e in paired)
            info["arabic_source"] = (
                f"{args.data_ar} (given with --data-ar; {marked} of {len(paired)} examples marked reviewed)"
            )
        elif "ar" in languages:
            client = _client(
                args,
                args.translate_base_url or args.judge_base_url,
                args.translate_model or args.judge_model,
                args.translate_api_key_env or args.judge_api_key_env,
                cache,
                batch=args.batch_api,
            )
            config = TranslationConfig(
                threshold=args.threshold,
                max_rounds=args.max_rounds,
                review_fraction=args.review_fraction,
                seed=args.seed,
                prompts_dir=args.prompts,
            )
            try:
                arabic = await translate_examples(english, Translator(client, config), run_state)
            finally:
                await client.aclose()
            run_state.examples["ar"] = arabic
            queue = write_arabic_set(folder, arabic, english)
            info["arabic_source"] = (
                f"machine translation by {client.config.model}, not reviewed "
                f"(data_ar.jsonl; review queue data_ar.review.csv)"
            )
        if run_state.stopped:
            return
        if args.base_url:
            client = _client(args, args.base_url, args.model, args.api_key_env, cache)
            source = EndpointReplies(
                client, max_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
            )
            try:
                await generate_replies(source, run_state, cost=lambda: client.spent_usd)
            finally:
                await client.aclose()
        else:
            source = LocalReplies(_local_generator(args), cache, fingerprint=_local_fingerprint(args))
            await generate_replies(source, run_state, cost=cache.total_cost)
        client = _client(
            args, args.judge_base_url, args.judge_model, args.judge_api_key_env, cache, batch=args.batch_api
        )
        grader = RubricGrader(
            client,
            GradingConfig(
                judge_attempts=args.judge_attempts,
                max_tokens=args.judge_max_tokens,
                seed=args.seed,
                json_mode=args.judge_json_mode,
                prompts_dir=args.prompts,
            ),
        )
        info["grader_prompt"] = grader.prompt.version
        try:
            await grade_replies(grader, run_state)
        finally:
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        info["ledger_usd"] = cache.total_cost()
        info["cost_this_run_usd"] = info["ledger_usd"] - start_ledger
    results = write_results(folder, run_state, info=info, seed=args.seed, resamples=args.bootstrap)
    print(format_chat_table(results))
    print(
        f"eval-chat: {len(run_state.verdicts)} verdicts; cost this run ${info['cost_this_run_usd']:.4f}, "
        f"ledger ${info['ledger_usd']:.4f} -> {args.output}/results.json, examples.jsonl, table.md"
    )
    if queue is not None:
        print(
            f"Arabic: machine-translated set {folder.path('data_ar.jsonl')}; {queue[1]} example(s) queued "
            f"for clinician review in {queue[0]} (apply it with --apply-review QUEUE --reviewer NAME)"
        )
    for item in run_state.untranslated[:5]:
        print(f"not in Arabic: {item['prompt_id']}: {item['reason'][:200]}")
    for item in run_state.unanswered[:5]:
        print(f"not answered ({item['language']}): {item['prompt_id']}: {item['reason']}")
    if args.calibration_sample:
        sheet = folder.path("calibration.csv")
        if sheet.exists():
            print(f"{sheet} exists (clinicians may be filling it in): not rewritten")
        else:
            from ..eval.judge_agreement import read_examples

            count = export_calibration_sheet(
                read_examples(folder.path("examples.jsonl")),
                sheet,
                per_language=args.calibration_sample,
                seed=args.seed,
            )
            print(f"calibration sheet: {count} (reply, criterion) pairs for clinicians -> {sheet}")
    if not run_state.complete:
        if run_state.stopped:
            print(f"stopped early: {run_state.stopped}; re-run with a higher --budget-usd to continue")
        for failure in run_state.failed[:5]:
            print(f"left for the next run: {failure}")
        return INCOMPLETE
    return 0


def _check_arabic(english, arabic, path) -> None:
    """Refuse an Arabic set with an example that is not in the English file or whose points differ."""
    by_id = {e.prompt_id: e for e in english}
    for example in arabic:
        source = by_id.get(example.prompt_id)
        if source is None:
            raise ValueError(f"{path}: prompt_id {example.prompt_id!r} is not in --data")
        if [c.points for c in example.rubrics] != [c.points for c in source.rubrics]:
            raise ValueError(
                f"{path}: prompt_id {example.prompt_id!r}: field `rubrics`: the criteria's points "
                f"{[c.points for c in example.rubrics]} differ from the English "
                f"{[c.points for c in source.rubrics]} (same criteria, same order expected)"
            )


def _pair(english, arabic, path, run_state):
    """The Arabic examples of the English ones, in English order; English ones without a pair are listed."""
    given = {e.prompt_id: e for e in arabic}
    run_state.untranslated += [
        {"prompt_id": e.prompt_id, "reason": f"not in {path}"} for e in english if e.prompt_id not in given
    ]
    return [given[e.prompt_id] for e in english if e.prompt_id in given]


def _client(args, base_url: str, model: str, api_key_env: str, cache, *, batch: bool = False):
    from ..llm.client import ClientConfig, LLMClient, load_prices

    config = ClientConfig(
        base_url=base_url,
        model=model,
        api_key_env=api_key_env,
        concurrency=args.concurrency,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        timeout=args.timeout,
        max_retries=args.max_retries,
        budget_usd=args.budget_usd,
        prices=load_prices(args.prices) if args.prices else {},
        max_tokens_field=args.max_tokens_field,
        batch=batch,
        batch_poll_interval=args.batch_poll_interval,
    )
    return LLMClient(config, cache)


def _local_generator(args):
    """``messages -> reply`` of the local model, loaded on first use (a cached re-run never loads it)."""
    session = None

    def generate(messages: list[dict]) -> str:
        nonlocal session
        if session is None:
            from ..chat import ChatSession

            session = ChatSession.from_pretrained(
                args.model,
                args.peft,
                device=args.device,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
            )
        return session.reply_to(messages)

    return generate


def _local_fingerprint(args) -> str:
    """Model, adapter (their files' names, sizes, times) and decoding settings: what a local reply depends
    on."""
    files = []
    for folder in filter(None, (args.model, args.peft)):
        if os.path.isdir(folder):
            files += [
                (str(p), p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(Path(folder).rglob("*"))
                if p.is_file()
            ]
    settings = {
        "model": args.model,
        "peft": args.peft,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "files": files,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _agreement(args: argparse.Namespace) -> int:
    from ..core.io import write_json
    from ..core.outputs import OutputFolder, check_outputs
    from ..eval.judge_agreement import format_agreement, judge_agreement, read_examples

    examples_path = args.output / "examples.jsonl"
    if not examples_path.is_file():
        raise FileNotFoundError(
            f"{examples_path}: not found; --output must be the folder of an eval-chat run"
        )
    sheets = {f"SHEET {i + 1}": sheet for i, sheet in enumerate(args.agreement)}
    target = OutputFolder(args.output, "eval-chat", overwrite=args.overwrite).path("agreement.json")
    check_outputs({"agreement file": target}, sheets)
    report = judge_agreement(read_examples(examples_path), [str(sheet) for sheet in args.agreement])
    if not report:
        print("eval-chat --agreement: no graded row in the sheets yet (fill `clinician_met` with yes or no)")
        return 0
    write_json(target, report)
    print(format_agreement(report))
    print(f"-> {target}")
    return 0


def _apply_review(args: argparse.Namespace) -> int:
    from ..core.outputs import OutputFolder
    from ..eval.rubric_review import apply_arabic_review

    data_ar = args.output / "data_ar.jsonl"
    if not data_ar.is_file():
        raise FileNotFoundError(
            f"{data_ar}: not found; --output must be the folder of an eval-chat run with ar"
        )
    folder = OutputFolder(args.output, "eval-chat", overwrite=args.overwrite)
    output = folder.path("data_ar.reviewed.jsonl")
    summary = apply_arabic_review(
        data_ar,
        args.apply_review,
        output,
        reviewer=args.reviewer or "",
        audit=folder.path("data_ar.reviewed.audit.jsonl"),
    )
    print(
        f"eval-chat --apply-review: {summary.approved} approved, {summary.edited} edited, {summary.rejected} "
        f"rejected (left out), {summary.undecided} still undecided; {summary.written} examples -> {output}"
    )
    print(f"evaluate on it with: --languages en,ar --data-ar {output}")
    return 0
