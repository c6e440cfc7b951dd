"""MCQA-grounded doctor–patient dialogue generation (paper §3.1.1).

From an MCQA record (question, lettered options, correct answer and, in the gpt turn, the explanation)
the ``dialogue`` prompt (version ``dialogue-v2``) asks for a doctor-patient dialogue grounded on the item,
both parties written by the LLM: the patient (``human``) describes the item's situation, the doctor
(``gpt``) asks follow-up questions, and the dialogue continues until a logical conclusion is reached (the
correct answer stated in words, why the alternatives are less likely, next steps). The prompt version
is part of the engine fingerprint, so a new version never reuses generations cached under the old one. Each
result is checked by `validate_dialogue`: roles alternate (human first, gpt last), ``min_turns`` to
``max_turns`` exchanges (the paper's chats average 4.72), every turn within length bounds, the correct answer
stated in words, no wrong option endorsed, no option letters leaked ("option B"). An invalid result is
regenerated with a new seed up to ``max_attempts`` times, then the record is rejected with every reason.

Output records are ``task="chat"`` in the source language, id ``<source id>-chat``, with
``meta.generation = {model, prompt_version, source_id, cost_usd}``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ..core.conventions import OPTION_LETTERS as LETTERS
from ..data.arabic import normalize_for_match
from ..data.schema import OPTION_LETTERS, make_record
from .client import Completion, LLMClient
from .engine import EngineConfig, RecordEngine
from .runner import Accepted, Rejected, RunSummary
from .translation import parse_json_object

logger = logging.getLogger(__name__)

_ROLES = {"human": "human", "user": "human", "patient": "human", "gpt": "gpt", "assistant": "gpt",
          "doctor": "gpt"}
# "option B", "choice (C)", "(D)", "the answer is B" -- but not "the answer is A defect in ..." (an article)
_LEAK = re.compile(r"\b(?i:option|choice)s?\s*\(?[A-J]\b(?![-.'’]\w)|\(\s*[A-J]\s*\)"
                   r"|\b(?i:answer)\s*(?i:is\s*)?:?\s*(?:[B-J]|A(?!\s+[a-z]))\b(?![-.'’]\w)"
                   rf"|(?:الخيار|خيار)\s*\(?\s*(?:{'|'.join(LETTERS['ar'])})(?!\w)")
_ENDORSE = re.compile(r"\b(?:answer is|correct answer|correct option|right answer|most likely|best answer|"
                      r"diagnosis is|treatment of choice|is correct|is the cause)\b", re.IGNORECASE)
_NEGATE = re.compile(r"\b(?:not|unlikely|less likely|rule out|ruled out|incorrect|wrong|rather than|instead "
                     r"of|excluded?)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?؟])\s+|\n+")


@dataclass(kw_only=True)
class DialogueConfig(EngineConfig):
    """Dialogue generation settings, with the request settings of `EngineConfig` (attempt k uses seed
    ``seed + k``).

    Args:
        min_turns (`int`, *optional*, defaults to `4`): fewest human/gpt exchanges accepted.
        max_turns (`int`, *optional*, defaults to `8`): most exchanges accepted.
        max_attempts (`int`, *optional*, defaults to `3`): generations per record before it is rejected.
        min_turn_chars (`int`, *optional*, defaults to `2`): shortest accepted turn.
        max_turn_chars (`int`, *optional*, defaults to `3000`): longest accepted turn.
        max_total_chars (`int`, *optional*, defaults to `16000`): longest accepted conversation.
        temperature (`float`, *optional*, defaults to `0.7`): sampling temperature.
    """

    min_turns: int = 4
    max_turns: int = 8
    max_attempts: int = 3
    min_turn_chars: int = 2
    max_turn_chars: int = 3000
    max_total_chars: int = 16000
    temperature: float = 0.7

    def __post_init__(self):
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError(f"need 1 <= min_turns <= max_turns, got {self.min_turns} and {self.max_turns}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


def validate_dialogue(conversation: object, options: list[str], answer: str,
                      config: DialogueConfig) -> list[str]:
    """Return every problem of a generated conversation (empty when it is acceptable).

    Args:
        conversation (`object`): the ``conversation`` value the model returned.
        options (`list[str]`): the MCQA option texts in letter order.
        answer (`str`): the correct option's Latin letter.
        config (`DialogueConfig`): turn and length bounds.
    """
    if not isinstance(conversation, list) or not conversation:
        return ["`conversation` is not a non-empty list"]
    problems = []
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return [f"turn {index} is not an object with a string `value`"]
        role = _ROLES.get(str(turn.get("from") or turn.get("role")).lower())
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            problems.append(f"turn {index} is from "
                            f"{turn.get('from') or turn.get('role')!r}, expected {expected!r}")
        size = len(turn["value"].strip())
        if not config.min_turn_chars <= size <= config.max_turn_chars:
            problems.append(f"turn {index} has {size} characters (allowed {config.min_turn_chars}.."
                            f"{config.max_turn_chars})")
        if _LEAK.search(turn["value"]):
            problems.append(f"turn {index} refers to an option by letter: "
                            f"{_LEAK.search(turn['value']).group(0)!r}")
    if len(conversation) % 2:
        problems.append("the conversation does not end with a gpt turn")
    exchanges = len(conversation) // 2
    if not config.min_turns <= exchanges <= config.max_turns:
        problems.append(f"{exchanges} exchanges (allowed {config.min_turns}..{config.max_turns})")
    total = sum(len(turn["value"]) for turn in conversation)
    if total > config.max_total_chars:
        problems.append(f"{total} characters in all (allowed {config.max_total_chars})")
    assistant = [turn["value"] for index, turn in enumerate(conversation) if index % 2 == 1]
    correct = options[OPTION_LETTERS.index(answer)]
    said = f' {normalize_for_match(" ".join(assistant))} '
    if f" {normalize_for_match(correct)} " not in said:
        problems.append(f"the correct answer {correct!r} is never stated")
    problems += _endorsed_wrong_options(assistant, options, correct)
    return problems


class DialogueGenerator(RecordEngine):
    """Generate one chat from one MCQA record (an awaitable callable for `run_records`).

    Args:
        client (`LLMClient`): the endpoint.
        config (`DialogueConfig`): generation settings.
    """

    name = "generate-chats"
    prompt_names = ("dialogue",)
    meta_field = "generation"

    async def __call__(self, record: dict) -> Accepted | Rejected:
        meta, config = record["meta"], self.config
        if not meta.get("options") or not meta.get("answer"):
            return Rejected(record["id"], "not an MCQA record: meta.options and meta.answer are needed")
        options, answer = meta["options"], meta["answer"]
        payload = {"task": "dialogue", "question": record["conversations"][0]["value"],
                   "options": dict(zip(OPTION_LETTERS, options)), "answer": answer,
                   "answer_text": options[OPTION_LETTERS.index(answer)],
                   "explanation": record["conversations"][-1]["value"],
                   "min_turns": config.min_turns, "max_turns": config.max_turns,
                   "language": record["language"]}
        generated = await self.ask(self.prompts["dialogue"].render(payload),
                                   lambda completion: self._parse(completion, options, answer),
                                   attempts=config.max_attempts, max_tokens=config.max_tokens, resample=False)
        if generated.value is not None:
            return Accepted(self._output(record, generated.value, generated.cost_usd))
        reasons = [f"attempt {number}: {reason}" for number, reason in enumerate(generated.reasons, start=1)]
        return Rejected(record["id"], " | ".join(reasons), generated.cost_usd)

    def _parse(self, completion: Completion, options: list[str], answer: str) -> list[dict] | str:
        """The generated conversation, or why it is refused."""
        if completion.finish_reason == "length":
            return "cut off at max_tokens (finish_reason=length)"
        data = parse_json_object(completion.text)
        if data is None:
            return "not a JSON object"
        problems = validate_dialogue(data.get("conversation"), options, answer, self.config)
        return "; ".join(problems) if problems else data["conversation"]

    def _output(self, record: dict, conversation: list[dict], cost: float) -> dict:
        turns = [{"from": "human" if index % 2 == 0 else "gpt", "value": turn["value"].strip()}
                 for index, turn in enumerate(conversation)]
        meta = record["meta"]
        return make_record(id=f"{record['id']}-chat", source=record["source"], task="chat",
                           language=record["language"], conversations=turns, license=record["license"],
                           original_id=meta.get("original_id"), subject=meta.get("subject"),
                           generation={"model": self.client.config.model,
                                       "prompt_version": self.prompts["dialogue"].version,
                                       "source_id": record["id"], "cost_usd": cost})


async def generate_chats_file(input_path: str | os.PathLike, output_path: str | os.PathLike,
                              client: LLMClient, config: DialogueConfig) -> RunSummary:
    """`DialogueGenerator.run_file`: a chat for every MCQA record of ``input_path`` (JSON Lines, Parquet or a
    saved dataset) into ``output_path`` (JSON Lines; rejects in ``OUT.rejects.jsonl``), resuming a run."""
    return await DialogueGenerator(client, config).run_file(input_path, output_path)


def _endorsed_wrong_options(assistant: list[str], options: list[str], correct: str) -> list[str]:
    correct_norm = normalize_for_match(correct)
    problems = []
    for letter, option in zip(OPTION_LETTERS, options):
        wrong = normalize_for_match(option)
        if option == correct or len(wrong) < 4 or wrong in correct_norm or correct_norm in wrong:
            continue
        for text in assistant:
            for sentence in _SENTENCE.split(text):
                norm = normalize_for_match(sentence)
                if f" {wrong} " in f" {norm} " and _ENDORSE.search(sentence) and not _NEGATE.search(sentence):
                    problems.append(f"a wrong option ({option!r}) is endorsed: {sentence.strip()[:120]!r}")
    return problems
