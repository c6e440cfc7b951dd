"""Rubric grading as HealthBench grades: one judge call per criterion, a strict JSON verdict.

The judge gets HealthBench's grader prompt (``prompts/grader.yaml``): the conversation with the reply as the
last ``assistant`` turn (``role: content`` blocks joined by blank lines) and the criterion as ``[points]
criterion``. It must answer one JSON object ``{"explanation": str, "criteria_met": bool}`` (a ```json fence
around it is allowed, as in HealthBench). An answer that is not JSON, lacks ``criteria_met``, or holds
anything but ``true``/``false`` there (``"true"``, ``1``) is asked again with another seed, up to
``judge_attempts`` times; then the criterion is a *failed* `Verdict` with every reason, never met or unmet.
Every request goes through `LLMClient` (cache, retries, budget, ledger): a retried or resumed grading pays
only for answers not recorded yet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..data.rubric import Criterion
from .client import Completion
from .engine import Engine, EngineConfig
from .prompts import PromptTemplate

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass(kw_only=True)
class GradingConfig(EngineConfig):
    """Judge settings, with the request settings of `EngineConfig` (``temperature`` is the first attempt's;
    re-asks use at least 0.7).

    Args:
        judge_attempts (`int`, *optional*, defaults to `3`): tries to get a well-formed verdict per criterion.
        max_tokens (`int`, *optional*, defaults to `2048`): completion limit (HealthBench's grader uses 2048).
        json_mode (`bool`, *optional*, defaults to `False`): send ``response_format={"type": "json_object"}``
            (HealthBench does not).
    """

    judge_attempts: int = 3
    max_tokens: int = 2048
    json_mode: bool = False

    def __post_init__(self):
        if self.judge_attempts < 1:
            raise ValueError(f"judge_attempts must be >= 1, got {self.judge_attempts}")


@dataclass(frozen=True)
class Verdict:
    """The judge's decision on one criterion: ``met`` is ``None`` when every attempt was malformed
    (``failure`` says why)."""

    met: bool | None
    explanation: str
    failure: str | None
    attempts: int
    cost_usd: float


def grader_conversation(prompt: list[dict], reply: str) -> str:
    """The conversation block of the grader prompt: ``role: content`` for every turn and the reply."""
    turns = [*prompt, {"role": "assistant", "content": reply}]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)


def parse_verdict(completion: Completion) -> tuple[bool, str] | str:
    """``(criteria_met, explanation)`` from a judge answer, or the reason it is malformed."""
    if completion.finish_reason == "length":
        return "verdict cut off at max_tokens (finish_reason=length)"
    try:
        data = json.loads(_FENCE.sub("", completion.text.strip()))
    except json.JSONDecodeError as err:
        return f"verdict is not JSON ({err.msg}; starts {completion.text[:60]!r})"
    if not isinstance(data, dict):
        return f"verdict is JSON but not an object ({type(data).__name__})"
    if "criteria_met" not in data:
        return f"verdict has no `criteria_met` (keys: {sorted(data)})"
    met = data["criteria_met"]
    if not isinstance(met, bool):
        return f"`criteria_met` is {met!r:.40}, not true or false"
    explanation = data.get("explanation")
    return met, explanation if isinstance(explanation, str) else json.dumps(explanation, ensure_ascii=False)


class RubricGrader(Engine):
    """Grade replies criterion by criterion with an LLM judge.

    Args:
        client (`LLMClient`): the judge endpoint.
        config (`GradingConfig`): judge settings.
    """

    name = "grade"
    prompt_names = ("grader",)

    @property
    def prompt(self) -> PromptTemplate:
        """The grader prompt (``grader.yaml``)."""
        return self.prompts["grader"]

    async def grade(self, prompt: list[dict], reply: str, criterion: Criterion) -> Verdict:
        """Ask the judge whether ``reply`` (the answer to ``prompt``) meets ``criterion``.

        Raises:
            The client's exceptions (`LLMError`, `BudgetExceeded`, `Deferred`); malformed answers do not.
        """
        messages = self.prompt.render(
            {"conversation": grader_conversation(prompt, reply), "rubric_item": str(criterion)}
        )
        answer = await self.ask(messages, parse_verdict, attempts=self.config.judge_attempts,
                                max_tokens=self.config.max_tokens, resample=True)
        if answer.value is not None:
            return Verdict(answer.value[0], answer.value[1], None, answer.attempts, answer.cost_usd)
        reasons = [f"attempt {number}: {reason}" for number, reason in enumerate(answer.reasons, start=1)]
        return Verdict(None, "", "; ".join(reasons), answer.attempts, answer.cost_usd)
