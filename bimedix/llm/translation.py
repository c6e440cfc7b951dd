"""English→Arabic iterative translation with an LLM judge (paper §3.1.2, Fig. 5).

For each English record: translate the whole conversation (and MCQA options) in one request with all
of it as context; check the invariants of `bimedix.llm.invariants` (a violation fails the round); score
the translation 0–100 with a JSON judgement; while the score is below ``threshold``, refine with the
judge's comments (or the violations) for up to ``max_rounds`` rounds, keeping the best-scoring valid
version. A judge answer that is not JSON, has no score or a score outside 0–100 is re-asked up to
``judge_attempts`` times and then recorded as a failed round, never accepted. A record with no valid,
judged round is rejected with the reasons of every round.

Output records are ``language="ar"`` with id `arabic_id` of the English id and
``meta.translation = {model, score, rounds, reviewed: False, review_state, source_id, cost_usd, comments}``;
Option letters in the output turns are Arabic (``أ. ...``, ``الإجابة: ب``:
`bimedix.llm.invariants.arabic_option_letters`), as in the Arabic evaluation tasks; ``meta.answer`` stays
Latin. ``review_state`` is ``"queued"`` below the threshold or when the seeded review sample picks the record
(`bimedix.llm.review.sampled_for_review`), else ``"unreviewed"``. Every such record is machine-translated.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

from ..data.schema import make_record
from .client import Completion, LLMClient
from .engine import EngineConfig, RecordEngine
from .invariants import arabic_option_letters, check_invariants, protected_terms
from .review import sampled_for_review
from .runner import Accepted, Rejected, RunSummary

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TranslationConfig(EngineConfig):
    """Translation loop settings, with the request settings of `EngineConfig` (``seed`` also seeds the review
    sample; ``max_tokens`` is the limit of translation requests; judge re-asks use a temperature of at least
    0.7).

    Args:
        threshold (`float`, *optional*, defaults to `80`): judge score (0–100) a translation must reach.
        max_rounds (`int`, *optional*, defaults to `3`): translation + refinement rounds per record.
        judge_attempts (`int`, *optional*, defaults to `3`): tries to get a well-formed judgement per round.
        review_fraction (`float`, *optional*, defaults to `0.05`): share of passing records queued for review.
        drug_names (`frozenset[str]`, *optional*): names that must survive verbatim.
        judge_max_tokens (`int`, *optional*, defaults to `512`): completion limit of judge requests.
    """

    threshold: float = 80.0
    max_rounds: int = 3
    judge_attempts: int = 3
    review_fraction: float = 0.05
    drug_names: frozenset[str] = frozenset()
    judge_max_tokens: int = 512

    def __post_init__(self):
        if not 0 <= self.threshold <= 100:
            raise ValueError(f"threshold must be in 0..100, got {self.threshold}")
        if self.max_rounds < 1 or self.judge_attempts < 1:
            raise ValueError("max_rounds and judge_attempts must be >= 1")
        if not 0 <= self.review_fraction <= 1:
            raise ValueError(f"review_fraction must be in 0..1, got {self.review_fraction}")


@dataclass(frozen=True)
class TranslationResult:
    """What `Translator.translate` made of one source: the kept translation (``None`` if none passed), its
    judge score and comments, rounds run, cost, and the reason of every failed round."""

    translation: dict | None
    score: float | None
    comments: str
    rounds: int
    cost_usd: float
    failures: list[str]


def arabic_id(english_id: str) -> str:
    """The id of the Arabic translation of ``english_id``: an ``-en`` part becomes ``-ar``, else ``-ar`` is
    added."""
    replaced = re.sub(r"-en(?=-|$)", "-ar", english_id, count=1)
    return replaced if replaced != english_id else f"{english_id}-ar"


class Translator(RecordEngine):
    """Translate one English record (an awaitable callable for `run_records`).

    Args:
        client (`LLMClient`): the endpoint.
        config (`TranslationConfig`): loop settings.
    """

    name = "translate"
    prompt_names = ("translate", "refine", "judge")
    meta_field = "translation"

    async def __call__(self, record: dict) -> Accepted | Rejected:
        if record["language"] != "en":
            return Rejected(record["id"],
                            f"language is {record['language']!r}, only English records are translated")
        source = {"turns": [turn["value"] for turn in record["conversations"]]}
        if record["meta"].get("options"):
            source["options"] = list(record["meta"]["options"])
        result = await self.translate(source)
        if result.translation is None:
            return Rejected(record["id"], "; ".join(result.failures), result.cost_usd)
        return Accepted(self._output(record, result.translation, result.score, result.comments, result.rounds,
                                     result.cost_usd))

    async def translate(self, source: dict) -> TranslationResult:
        """Translate ``{"turns": [...], "options": [...]}`` (options optional) with the judge-and-refine loop.

        Returns:
            `TranslationResult`: the best-scoring valid translation (``None`` if no round gave one), its score
            and comments, the rounds run, the cost and every failed round's reason.
        """
        config = self.config
        keep = protected_terms(source["turns"] + source.get("options", []), config.drug_names)
        cost, failures, best, rounds = 0.0, [], None, 0
        current, feedback, score = None, None, None
        for round_no in range(1, config.max_rounds + 1):
            rounds = round_no
            if round_no == 1:
                payload = {"task": "translate", **source, "keep": keep}
                prompt = self.prompts["translate"]
            else:
                payload = {"task": "refine", **source, "keep": keep, "translation": current, "score": score,
                           "comments": feedback or "The previous attempt failed; translate again."}
                prompt = self.prompts["refine"]
            completion = await self.complete(prompt.render(payload), config.max_tokens,
                                             seed=config.seed + round_no - 1)
            cost += completion.cost_usd
            candidate, problem = _parse_translation(completion, source)
            if problem is None:
                violations = check_invariants(source, candidate, keep)
                problem = "invariants broken: " + "; ".join(violations) if violations else None
            if problem is not None:
                failures.append(f"round {round_no}: {problem}")
                current = candidate if candidate is not None else current
                feedback, score = problem, None
                continue
            current = candidate
            judged, judge_cost = await self._judge(source, candidate)
            cost += judge_cost
            if isinstance(judged, str):
                failures.append(f"round {round_no}: {judged}")
                feedback = "No reliable quality judgement was available; re-check the whole translation."
                score = None
                continue
            score, feedback = judged
            if best is None or score > best[1]:
                best = (candidate, score, feedback)
            if score >= config.threshold:
                break
        if best is None:
            return TranslationResult(None, None, "", rounds, cost, failures)
        return TranslationResult(best[0], float(best[1]), best[2], rounds, cost, failures)

    async def _judge(self, source: dict, candidate: dict) -> tuple[tuple[float, str] | str, float]:
        """Return ``((score, comments), cost)``, or ``(reason, cost)`` if every attempt was malformed."""
        messages = self.prompts["judge"].render({"task": "judge", "source": source, "translation": candidate})
        answer = await self.ask(messages, _parse_judgement, attempts=self.config.judge_attempts,
                                max_tokens=self.config.judge_max_tokens, resample=True)
        if answer.value is not None:
            return answer.value, answer.cost_usd
        return (f"judge output malformed {answer.attempts} times ({'; '.join(answer.reasons)})",
                answer.cost_usd)

    def _output(self, record: dict, translation: dict, score: float, comments: str, rounds: int,
                cost: float) -> dict:
        config = self.config
        queued = score < config.threshold or sampled_for_review(record["id"], config.review_fraction,
                                                                config.seed)
        meta = dict(record["meta"])
        if translation.get("options"):
            meta["options"] = translation["options"]
        meta["translation"] = {"model": self.client.config.model, "score": float(score), "rounds": rounds,
                               "reviewed": False, "review_state": "queued" if queued else "unreviewed",
                               "source_id": record["id"], "cost_usd": cost,
                               "comments": comments}
        conversations = [{"from": turn["from"], "value": arabic_option_letters(text)}
                         for turn, text in zip(record["conversations"], translation["turns"])]
        return make_record(id=arabic_id(record["id"]), source=record["source"], task=record["task"],
                           language="ar",
                           conversations=conversations, system=record["system"], license=record["license"],
                           **meta)


async def translate_file(input_path: str | os.PathLike, output_path: str | os.PathLike, client: LLMClient,
                         config: TranslationConfig) -> RunSummary:
    """`Translator.run_file`: every English record of ``input_path`` (JSON Lines, Parquet or a saved dataset)
    into Arabic in ``output_path`` (JSON Lines; rejects in ``OUT.rejects.jsonl``), resuming a previous run."""
    return await Translator(client, config).run_file(input_path, output_path)


def parse_json_object(text: str) -> dict | None:
    """The JSON object in a model answer (tolerating code fences and text around it), or ``None``."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _parse_translation(completion: Completion, source: dict) -> tuple[dict | None, str | None]:
    if completion.finish_reason == "length":
        return None, "translation cut off at max_tokens (finish_reason=length)"
    data = parse_json_object(completion.text)
    if data is None:
        return None, "translation is not a JSON object"
    candidate = {}
    for field in source:
        value = data.get(field)
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            return None, f"translation field `{field}` is not a list of non-empty strings"
        candidate[field] = value
    return candidate, None


def _parse_judgement(completion: Completion) -> tuple[float, str] | str:
    if completion.finish_reason == "length":
        return "judgement cut off (finish_reason=length)"
    data = parse_json_object(completion.text)
    if data is None:
        return "judgement is not a JSON object"
    score = data.get("score")
    if isinstance(score, str):
        try:
            score = float(score)
        except ValueError:
            return f"score {data.get('score')!r} is not a number"
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return "judgement has no numeric `score`"
    if not 0 <= score <= 100:
        return f"score {score} is outside 0..100"
    comments = data.get("comments")
    return float(score), comments if isinstance(comments, str) else ""
