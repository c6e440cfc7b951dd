"""``bimedix eval-chat``: open-ended replies graded against rubrics in English and Arabic (HealthBench's way).

Three phases over the run's one SQLite request cache (``DIR/eval-chat.llm.sqlite``, `bimedix.llm.cache`):

1. **Arabic** (``ar`` in the languages, no ``--data-ar``): every English example is translated, conversation
   and criteria together (criteria go in as the translator's ``options``), with `Translator.translate`:
   invariants, judge score, refinement. The Arabic set is written to ``DIR/data_ar.jsonl``, each line
   marked ``translation.machine_translated`` with its score and review state, and the examples the review
   policy queues (below the threshold, or sampled) go to ``DIR/data_ar.review.csv`` for clinicians
   (`bimedix.eval.rubric_review` applies their decisions).
2. **Replies** of the model under test, one per example and language: from an OpenAI-compatible endpoint
   (`EndpointReplies`) or a local model (`LocalReplies`, kept in the cache's ``records`` table).
3. **Grading**: one `RubricGrader` call per criterion, the Arabic reply against the Arabic criterion.

Every paid response is recorded before it is used, so a second run over the same ``DIR`` pays nothing and a
killed run resumes where it stopped; `ChatEvalRun.complete` is false when a budget stop or transient
failures left work for the next run. `write_results` then writes ``examples.jsonl`` (one line per example
and language), ``results.json`` (scores, CIs, themes, axes, EN↔AR agreement) and ``table.md``.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..core.io import atomic_open, write_json, write_jsonl
from ..core.outputs import OutputFolder
from ..data.rubric import Criterion, RubricExample
from ..llm.cache import RequestCache
from ..llm.client import LLMClient
from ..llm.errors import BudgetExceeded, Deferred, LLMError
from ..llm.grading import RubricGrader, Verdict
from ..llm.review import COLUMNS, neutralize_cell, sampled_for_review
from ..llm.runner import RECORD_LEVEL_STATUSES
from ..llm.translation import Translator
from .chat_tables import format_chat_table
from .rubric_scores import RESAMPLES, axis_scores, example_score, language_agreement, summarize

logger = logging.getLogger(__name__)

CACHE_NAME = "eval-chat.llm.sqlite"


class EndpointReplies:
    """Replies of a model behind an OpenAI-compatible endpoint (vLLM, ``transformers serve``, ...).

    Args:
        client (`LLMClient`): the endpoint of the model under test.
        max_tokens (`int`): reply length limit.
        temperature (`float`, *optional*, defaults to `0`): sampling temperature.
        seed (`int`, *optional*, defaults to `0`): request seed.
    """

    def __init__(self, client: LLMClient, *, max_tokens: int, temperature: float = 0.0, seed: int = 0):
        self.client = client
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.concurrency = client.config.concurrency

    async def reply(self, prompt: list[dict]) -> str:
        completion = await self.client.complete(
            list(prompt), max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed
        )
        return completion.text.strip()


class LocalReplies:
    """Replies of a local model, one at a time, kept in the run's cache so a re-run does not generate again.

    Args:
        generate (`Callable[[list[dict]], str]`): the reply to a conversation (`ChatSession.reply_to`).
        cache (`RequestCache`): the run's cache (replies go in its ``records`` table).
        fingerprint (`str`): model, adapter, template and decoding settings: a change generates anew.
    """

    concurrency = 1

    def __init__(self, generate: Callable[[list[dict]], str], cache: RequestCache, *, fingerprint: str):
        self.generate, self.cache, self.fingerprint = generate, cache, fingerprint
        self._lock = asyncio.Lock()

    async def reply(self, prompt: list[dict]) -> str:
        key = hashlib.sha256(
            json.dumps([self.fingerprint, list(prompt)], ensure_ascii=False, sort_keys=True).encode()
        ).hexdigest()
        stored = self.cache.record_lines([key]).get(key)
        if stored is not None:
            return json.loads(stored)["reply"]
        async with self._lock:
            text = await asyncio.to_thread(self.generate, list(prompt))
        self.cache.put_record(key, "local-reply", "reply", json.dumps({"reply": text}, ensure_ascii=False))
        return text


@dataclass
class ChatEvalRun:
    """What a run produced and what it left for the next one.

    Attributes:
        examples (`dict`): language → the English or Arabic examples evaluated.
        replies (`dict`): ``(language, prompt_id)`` → reply.
        verdicts (`dict`): ``(language, prompt_id, criterion index)`` → `Verdict`.
        untranslated (`list`): ``{"prompt_id", "reason"}`` of English examples with no valid translation.
        unanswered (`list`): ``{"language", "prompt_id", "reason"}`` of examples the local model cannot answer
            (the conversation does not fit its context); they are left out of the scores.
        failed (`list[str]`): work left by transient errors (re-run to retry).
        stopped (`str | None`): why the run stopped early (budget).
    """

    examples: dict[str, list[RubricExample]] = field(default_factory=dict)
    replies: dict[tuple, str] = field(default_factory=dict)
    verdicts: dict[tuple, Verdict] = field(default_factory=dict)
    untranslated: list[dict] = field(default_factory=list)
    unanswered: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: str | None = None

    @property
    def complete(self) -> bool:
        """Whether every reply and verdict is in (malformed verdicts count: they are final)."""
        wanted = sum(
            len(e.rubrics)
            for language, examples in self.examples.items()
            for e in examples
            if (language, e.prompt_id) in self.replies
        )
        return self.stopped is None and not self.failed and len(self.verdicts) == wanted


async def translate_examples(
    english: list[RubricExample], translator: Translator, run: ChatEvalRun
) -> list[RubricExample]:
    """Arabic versions of ``english`` by ``translator`` (criteria as its ``options``), in input order."""
    results: dict[str, RubricExample] = {}

    async def work(example: RubricExample) -> None:
        source = {
            "turns": [m["content"] for m in example.prompt],
            "options": [c.criterion for c in example.rubrics],
        }
        result = await translator.translate(source)
        if result.translation is None:
            run.untranslated.append({"prompt_id": example.prompt_id, "reason": "; ".join(result.failures)})
            return
        config = translator.config
        queued = result.score < config.threshold or sampled_for_review(
            example.prompt_id, config.review_fraction, config.seed
        )
        info = {
            "machine_translated": True,
            "model": translator.client.config.model,
            "score": result.score,
            "rounds": result.rounds,
            "reviewed": False,
            "review_state": "queued" if queued else "unreviewed",
            "source_id": example.prompt_id,
            "cost_usd": result.cost_usd,
            "comments": result.comments,
        }
        results[example.prompt_id] = RubricExample(
            prompt_id=example.prompt_id,
            language="ar",
            example_tags=example.example_tags,
            prompt=tuple(
                {"role": m["role"], "content": text}
                for m, text in zip(example.prompt, result.translation["turns"], strict=True)
            ),
            rubrics=tuple(
                Criterion(text, c.points, c.tags)
                for c, text in zip(example.rubrics, result.translation["options"], strict=True)
            ),
            extra={"translation": info},
        )

    await _pool(
        [(example.prompt_id, lambda e=example: work(e)) for example in english],
        concurrency=translator.client.config.concurrency,
        run=run,
        desc="translate",
        cost=lambda: translator.client.spent_usd,
        batch=translator.client,
    )
    return [results[e.prompt_id] for e in english if e.prompt_id in results]


async def generate_replies(
    source: EndpointReplies | LocalReplies, run: ChatEvalRun, *, cost: Callable[[], float]
) -> None:
    """Fill ``run.replies`` for every example of every language not answered yet."""
    todo = [
        (language, example)
        for language, examples in run.examples.items()
        for example in examples
        if (language, example.prompt_id) not in run.replies
    ]

    async def work(language: str, example: RubricExample) -> None:
        try:
            run.replies[language, example.prompt_id] = await source.reply(list(example.prompt))
        except ValueError as err:  # a local model's context is too short for this conversation
            run.unanswered.append({"language": language, "prompt_id": example.prompt_id, "reason": str(err)})

    await _pool(
        [(f"{lang}:{e.prompt_id}", lambda lang=lang, e=e: work(lang, e)) for lang, e in todo],
        concurrency=source.concurrency,
        run=run,
        desc="replies",
        cost=cost,
    )


async def grade_replies(grader: RubricGrader, run: ChatEvalRun) -> None:
    """Fill ``run.verdicts``: one judge call per criterion of every answered example."""
    todo = [
        (language, example, index)
        for language, examples in run.examples.items()
        for example in examples
        if (language, example.prompt_id) in run.replies
        for index in range(len(example.rubrics))
        if (language, example.prompt_id, index) not in run.verdicts
    ]

    async def work(language: str, example: RubricExample, index: int) -> None:
        reply = run.replies[language, example.prompt_id]
        try:
            verdict = await grader.grade(list(example.prompt), reply, example.rubrics[index])
        except LLMError as err:
            if err.status not in RECORD_LEVEL_STATUSES:
                raise
            verdict = Verdict(None, "", f"the judge endpoint refused the request: {err}", 1, 0.0)
        run.verdicts[language, example.prompt_id, index] = verdict

    await _pool(
        [(f"{lang}:{e.prompt_id}:{i}", lambda lang=lang, e=e, i=i: work(lang, e, i)) for lang, e, i in todo],
        concurrency=grader.client.config.concurrency,
        run=run,
        desc="grade",
        cost=lambda: grader.client.spent_usd,
        batch=grader.client,
    )


def graded_examples(run: ChatEvalRun, language: str) -> list[dict]:
    """The ``examples.jsonl`` lines of one language: every example whose reply and verdicts are all in."""
    lines = []
    for example in run.examples.get(language, []):
        verdicts = [run.verdicts.get((language, example.prompt_id, i)) for i in range(len(example.rubrics))]
        if (language, example.prompt_id) not in run.replies or None in verdicts:
            continue
        failed = [v for v in verdicts if v.met is None]
        met = [bool(v.met) for v in verdicts]
        lines.append(
            {
                "prompt_id": example.prompt_id,
                "language": language,
                "themes": example.themes,
                "example_tags": list(example.example_tags),
                "prompt": list(example.prompt),
                "reply": run.replies[language, example.prompt_id],
                "score": None if failed else example_score(example.rubrics, met),
                "axis_scores": {} if failed else axis_scores(example.rubrics, met),
                "criteria": [
                    {**c.to_dict(), "criteria_met": v.met, "explanation": v.explanation, "failure": v.failure}
                    for c, v in zip(example.rubrics, verdicts, strict=True)
                ],
                **({"translation": example.extra["translation"]} if "translation" in example.extra else {}),
            }
        )
    return lines


def write_results(
    folder: OutputFolder, run: ChatEvalRun, *, info: dict[str, Any], seed: int = 0, resamples: int = RESAMPLES
) -> dict:
    """Write ``examples.jsonl``, ``results.json`` and ``table.md`` into ``folder``; return the results."""
    lines = {language: graded_examples(run, language) for language in run.examples}
    results: dict[str, Any] = {
        language: summarize(lines[language], seed=seed, resamples=resamples) for language in run.examples
    }
    if "en" in lines and "ar" in lines:
        results["en_ar_agreement"] = language_agreement(lines["en"], lines["ar"])
    results["run"] = {
        **info,
        "complete": run.complete,
        "stopped": run.stopped,
        "failed": run.failed[:20],
        "untranslated": run.untranslated,
        "unanswered": run.unanswered,
        "seed": seed,
        "resamples": resamples,
    }
    write_jsonl(
        folder.path("examples.jsonl"), [line for language in run.examples for line in lines[language]]
    )
    write_json(folder.path("results.json"), results)
    with atomic_open(folder.path("table.md")) as handle:
        handle.write(format_chat_table(results, markdown=True) + "\n")
    return results


def write_arabic_set(
    folder: OutputFolder, arabic: list[RubricExample], english: list[RubricExample]
) -> tuple[str, int]:
    """Write the machine-translated set (``data_ar.jsonl``) and its review queue (``data_ar.review.csv``, one
    row per text of each queued example with its English original, the columns of ``bimedix review export``);
    return the queue path and its example count."""
    write_jsonl(folder.path("data_ar.jsonl"), [example.to_dict() for example in arabic])
    originals = {example.prompt_id: example for example in english}
    rows = []
    for example in arabic:
        info = example.extra["translation"]
        if info["review_state"] != "queued":
            continue
        source = originals[example.prompt_id]
        texts = [
            (f"prompt.{i}", m["content"], s["content"])
            for i, (m, s) in enumerate(zip(example.prompt, source.prompt, strict=True))
        ]
        texts += [
            (f"rubrics.{i}", c.criterion, s.criterion)
            for i, (c, s) in enumerate(zip(example.rubrics, source.rubrics, strict=True))
        ]
        rows += [
            {
                "id": example.prompt_id,
                "field": name,
                "score": info["score"],
                "review_state": "queued",
                "english": original,
                "arabic": text,
                "decision": "",
                "comment": "",
            }
            for name, text, original in texts
        ]
    queue = folder.path("data_ar.review.csv")
    with atomic_open(queue) as handle:
        handle.write("\ufeff")
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: neutralize_cell(value) for key, value in row.items()} for row in rows)
    return str(queue), len({row["id"] for row in rows})


async def _pool(
    jobs: list[tuple[str, Callable[[], Awaitable[None]]]],
    *,
    concurrency: int,
    run: ChatEvalRun,
    desc: str,
    cost: Callable[[], float],
    batch: LLMClient | None = None,
) -> None:
    """Run ``jobs`` with ``concurrency`` workers and a progress bar with the ledger so far.

    A budget stop ends the phase (``run.stopped``); a transient failure leaves its job for the next run
    (``run.failed``); any other error is raised once the jobs in flight have finished. When ``batch`` is a
    client in Batch API mode, jobs whose requests it parked (`Deferred`) run again after each
    `LLMClient.flush_batch` (their answers then come from the cache) until none is parked; batches a killed
    run left open are collected first.
    """
    if not jobs or run.stopped:
        return
    batch = batch if batch is not None and batch.config.batch else None
    if batch is not None:
        await batch.flush_batch()
    bar = tqdm(
        total=len(jobs),
        desc=desc,
        unit="call" if desc == "grade" else "ex",
        dynamic_ncols=True,
        mininterval=0.5,
    )
    try:
        while True:
            parked = await _one_pass(jobs, concurrency, run, desc, cost, bar)
            if not parked or run.stopped:
                return
            logger.info("%s: %d jobs wait on the Batch API", desc, len(parked))
            if await batch.flush_batch() == 0:
                raise RuntimeError(
                    "the Batch API returned no results for the parked requests; see the log "
                    "and re-run to resubmit them"
                )
            jobs = parked
    finally:
        bar.close()


async def _one_pass(
    jobs, concurrency: int, run: ChatEvalRun, desc: str, cost: Callable[[], float], bar: tqdm
) -> list:
    """One pass of the workers over ``jobs``; returns the jobs whose requests were parked for a batch."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    fatal: list[BaseException] = []
    parked = []

    async def worker() -> None:
        while not queue.empty() and not fatal and not run.stopped:
            name, job = queue.get_nowait()
            try:
                await job()
            except Deferred:
                parked.append((name, job))
                continue
            except BudgetExceeded as err:
                run.stopped = str(err)
                return
            except LLMError as err:
                if not err.transient:
                    fatal.append(err)
                    return
                run.failed.append(f"{desc} {name}: {err}")
                logger.warning("%s %s left for the next run: %s", desc, name, err)
            bar.update(1)
            bar.set_postfix_str(f"${cost():.4f}", refresh=False)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
    if fatal:
        raise fatal[0]
    return parked
