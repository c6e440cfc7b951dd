"""Rubric-graded conversations in HealthBench's JSON Lines format (Arora et al., 2025; MIT licence).

One example per line::

    {"prompt_id": "...",
     "prompt": [{"role": "user", "content": "..."}, ...],          # ends with a user turn
     "rubrics": [{"criterion": "...", "points": 7, "tags": ["level:example", "axis:accuracy"]}, ...],
     "example_tags": ["theme:emergency_referrals"]}

Points are positive for what a reply should do and negative for what it must not do; every example needs
at least one positive criterion (its score is divided by their sum). Other fields (``ideal_completions_data``,
``canary``) are carried along untouched in `RubricExample.extra`. An Arabic set (``bimedix eval-chat
--data-ar``) has the same schema, the same ``prompt_id`` values as the English one, and optionally
``"language": "ar"`` and a ``"translation"`` object saying how it was made.

`read_rubric_examples` checks every line and raises (or, with an ``on_error`` callable, sets aside) a
`RecordError` naming ``file:line`` and the field: a criterion with 0 points, an example without positive
points, a prompt that does not end with a user turn, an unknown tag, a truncated last line, bytes that are not
UTF-8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.io import OnError, iter_jsonl, raw_lines, report
from .schema import RecordError

#: Tag families HealthBench uses on examples and on criteria, and the values of the two that are reported.
EXAMPLE_TAG_PREFIXES = ("theme", "physician_agreed_category")
CRITERION_TAG_PREFIXES = ("axis", "level", "cluster")
THEMES = (
    "emergency_referrals",
    "context_seeking",
    "global_health",
    "health_data_tasks",
    "communication",
    "hedging",
    "complex_responses",
)
AXES = ("accuracy", "completeness", "communication_quality", "context_awareness", "instruction_following")
ROLES = ("system", "user", "assistant", "developer")
_KNOWN_VALUES = {"theme": THEMES, "axis": AXES}


@dataclass(frozen=True)
class Criterion:
    """One rubric item: what a reply should (``points > 0``) or must not (``points < 0``) do."""

    criterion: str
    points: int | float
    tags: tuple[str, ...] = ()

    def __str__(self) -> str:
        """HealthBench's rendering in the grader prompt: ``[points] criterion``."""
        return f"[{self.points}] {self.criterion}"

    @property
    def axis(self) -> str | None:
        """The value of the ``axis:`` tag, if any."""
        return next((tag.split(":", 1)[1] for tag in self.tags if tag.startswith("axis:")), None)

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "points": self.points, "tags": list(self.tags)}


@dataclass(frozen=True)
class RubricExample:
    """One conversation to answer and the rubric its reply is graded against."""

    prompt_id: str
    prompt: tuple[dict, ...]
    rubrics: tuple[Criterion, ...]
    example_tags: tuple[str, ...] = ()
    language: str = "en"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def themes(self) -> list[str]:
        """The values of the ``theme:`` tags."""
        return [tag.split(":", 1)[1] for tag in self.example_tags if tag.startswith("theme:")]

    def to_dict(self) -> dict:
        """The example as a HealthBench JSON line (with ``language`` and any extra fields)."""
        return {
            "prompt_id": self.prompt_id,
            "prompt": [dict(m) for m in self.prompt],
            "rubrics": [c.to_dict() for c in self.rubrics],
            "example_tags": list(self.example_tags),
            "language": self.language,
            **self.extra,
        }


def read_rubric_examples(
    path: str | os.PathLike, *, language: str = "en", on_error: OnError = None
) -> list[RubricExample]:
    """Read and check a HealthBench-format JSON Lines file.

    Args:
        path (`str | os.PathLike`): the file.
        language (`str`, *optional*, defaults to `"en"`): the language of the examples; a line whose own
            ``language`` field says otherwise is an error.
        on_error (`OnError`, *optional*): receives each bad line and reading goes on (``--on-error skip``); by
            default the first bad line raises.

    Raises:
        `RecordError`: ``file:line: field `x`: what is wrong``; also for a repeated ``prompt_id``.
    """
    path = Path(path)
    truncated_line = _truncated_last_line(path)
    examples, seen = [], {}
    for line_no, obj in iter_jsonl(path, on_error=_explain_truncation(on_error, truncated_line)):
        try:
            example = parse_rubric_example(obj, path=path, line=line_no, language=language)
            if example.prompt_id in seen:
                raise RecordError(
                    f"prompt_id {example.prompt_id!r} already used on line {seen[example.prompt_id]}",
                    path=str(path),
                    record=line_no,
                    field="prompt_id",
                    raw=obj,
                )
        except RecordError as err:
            report(err, on_error)
            continue
        seen[example.prompt_id] = line_no
        examples.append(example)
    return examples


def parse_rubric_example(
    obj: Any, *, path: str | os.PathLike = "<input>", line: int | None = None, language: str = "en"
) -> RubricExample:
    """Check one decoded line and return it as a `RubricExample` (see the module docstring for the rules)."""

    def fail(field_name: str | None, message: str) -> RecordError:
        return RecordError(message, path=str(path), record=line, field=field_name, raw=obj)

    if not isinstance(obj, dict):
        raise fail(None, f"expected a JSON object with prompt_id, prompt and rubrics, got {obj!r:.80}")
    prompt_id = obj.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id.strip():
        raise fail("prompt_id", f"must be a non-empty string, got {prompt_id!r:.80}")
    if obj.get("language", language) != language:
        raise fail("language", f"is {obj.get('language')!r} but this file is read as {language!r}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise fail("prompt", f"must be a non-empty list of {{role, content}} messages, got {prompt!r:.80}")
    for index, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise fail(
                f"prompt[{index}].role",
                f"must be one of {list(ROLES)}, got "
                f"{message.get('role') if isinstance(message, dict) else message!r:.80}",
            )
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise fail(
                f"prompt[{index}].content", f"must be a non-empty string, got {message.get('content')!r:.80}"
            )
    if prompt[-1]["role"] != "user":
        raise fail(
            f"prompt[{len(prompt) - 1}].role",
            f"the conversation must end with a user turn (the reply is graded), got {prompt[-1]['role']!r}",
        )
    rubrics = obj.get("rubrics")
    if not isinstance(rubrics, list) or not rubrics:
        raise fail("rubrics", f"must be a non-empty list of criteria, got {rubrics!r:.80}")
    criteria = [_criterion(item, f"rubrics[{index}]", fail) for index, item in enumerate(rubrics)]
    if not any(c.points > 0 for c in criteria):
        raise fail(
            "rubrics",
            "has no criterion with positive points, so no score can be computed "
            "(the score divides by the sum of positive points)",
        )
    example_tags = _tags(obj.get("example_tags", []), "example_tags", EXAMPLE_TAG_PREFIXES, fail)
    known = {"prompt_id", "prompt", "rubrics", "example_tags", "language"}
    return RubricExample(
        prompt_id=prompt_id,
        prompt=tuple({"role": m["role"], "content": m["content"]} for m in prompt),
        rubrics=tuple(criteria),
        example_tags=tuple(example_tags),
        language=language,
        extra={k: v for k, v in obj.items() if k not in known},
    )


def _criterion(item: Any, where: str, fail) -> Criterion:
    if not isinstance(item, dict):
        raise fail(where, f"must be an object with criterion, points and tags, got {item!r:.80}")
    text = item.get("criterion")
    if not isinstance(text, str) or not text.strip():
        raise fail(f"{where}.criterion", f"must be a non-empty string, got {text!r:.80}")
    points = item.get("points")
    if isinstance(points, bool) or not isinstance(points, (int, float)):
        raise fail(f"{where}.points", f"must be a number, got {points!r:.80}")
    if points == 0:
        raise fail(
            f"{where}.points",
            "is 0: a criterion must be worth positive points (should do) or negative points (must not do)",
        )
    return Criterion(
        text, points, tuple(_tags(item.get("tags", []), f"{where}.tags", CRITERION_TAG_PREFIXES, fail))
    )


def _tags(tags: Any, where: str, prefixes: tuple[str, ...], fail) -> list[str]:
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise fail(where, f"must be a list of strings, got {tags!r:.80}")
    for tag in tags:
        prefix, _, value = tag.partition(":")
        if prefix not in prefixes or not value:
            raise fail(where, f"unknown tag {tag!r}; expected {' / '.join(p + ':...' for p in prefixes)}")
        if prefix in _KNOWN_VALUES and value not in _KNOWN_VALUES[prefix]:
            raise fail(where, f"unknown tag {tag!r}; known {prefix}s: {', '.join(_KNOWN_VALUES[prefix])}")
    if len(set(tags)) != len(tags):
        raise fail(where, f"repeats a tag: {tags}")
    return tags


def _truncated_last_line(path: Path) -> int | None:
    """The number of the last line when the file does not end with a newline (maybe cut off), else None."""
    size = path.stat().st_size
    if not size:
        return None
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return None
    return sum(1 for _ in raw_lines(path))


def _explain_truncation(on_error: OnError, truncated_line: int | None) -> OnError:
    """Add "the file looks truncated" to a JSON error on an unterminated last line."""

    def handle(error: RecordError) -> None:
        if error.record == truncated_line and error.reason.startswith("invalid JSON"):
            error = RecordError(
                error.reason + "; the last line has no newline: the file looks truncated (download it again)",
                path=error.path,
                record=error.record,
                raw=error.raw,
            )
        report(error, on_error)

    return handle
