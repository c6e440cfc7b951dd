"""The one conversation schema every BiMed1.3M sample converts into, its validator, and the readers of
record files that apply it.

A record is a plain ``dict``::

    {
        "id": "medmcqa-en-7f1c...",          # unique within a dataset
        "source": "medmcqa",                 # converter / source name
        "task": "mcqa",                      # mcqa | qa | chat
        "language": "en",                    # en | ar
        "conversations": [                   # Vicuna style, human first, gpt last, alternating
            {"from": "human", "value": "..."},
            {"from": "gpt", "value": "..."},
        ],
        "system": None,                      # optional system prompt
        "license": "MIT",                    # licence of the source the text came from
        "meta": {...},                       # see `META_FIELDS`
    }

`FEATURES` is the matching `datasets.Features`; `normalize_record` fills every optional field so that
records of all sources share one Arrow schema.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from datasets import Features, List, Value

from ..core import conventions
from ..core.conventions import LANGUAGES
from ..core.io import BLANK, RecordError, decode_jsonl_line, iter_jsonl

ROLES = ("human", "gpt")
TASKS = ("mcqa", "qa", "chat")
REVIEW_STATES = ("unreviewed", "queued", "approved", "edited", "rejected")

TRANSLATION_FEATURES = {
    "model": Value("string"),
    "score": Value("float32"),
    "rounds": Value("int32"),
    "reviewed": Value("bool"),
    "review_state": Value("string"),
    "source_id": Value("string"),
    "cost_usd": Value("float64"),
    "comments": Value("string"),
}
GENERATION_FEATURES = {
    "model": Value("string"),
    "prompt_version": Value("string"),
    "source_id": Value("string"),
    "cost_usd": Value("float64"),
}
META_FEATURES = {
    "original_id": Value("string"),
    "subject": Value("string"),
    "question_type": Value("string"),
    "answer": Value("string"),
    "options": List(Value("string")),
    "translation": TRANSLATION_FEATURES,
    "generation": GENERATION_FEATURES,
}
FEATURES = Features(
    {
        "id": Value("string"),
        "source": Value("string"),
        "task": Value("string"),
        "language": Value("string"),
        "conversations": List({"from": Value("string"), "value": Value("string")}),
        "system": Value("string"),
        "license": Value("string"),
        "meta": META_FEATURES,
    }
)
META_FIELDS = tuple(META_FEATURES)
REQUIRED_FIELDS = ("id", "source", "task", "language", "conversations")
#: The Latin option letters answers are stored as (``meta.answer``), whatever the record language.
OPTION_LETTERS = "".join(conventions.OPTION_LETTERS["en"])


def validate_record(record: Any, *, path: str | None = None, line: int | None = None) -> dict:
    """Check one record against the schema and return it normalised (see `normalize_record`).

    Args:
        record (`Any`): the decoded record.
        path (`str`, *optional*): the file it came from, for the error message.
        line (`int`, *optional*): its line number in that file, for the error message.

    Returns:
        `dict`: the record with every optional field present.

    Raises:
        `RecordError`: naming the file, the record (line or id) and the field at fault.
    """
    where = line if line is not None else (record.get("id") if isinstance(record, Mapping) else None)

    def fail(field: str | None, message: str) -> RecordError:
        return RecordError(message, path=path, record=where, field=field)

    if not isinstance(record, Mapping):
        raise fail(None, f"expected a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record or record[name] in (None, "")]
    if missing:
        raise fail(missing[0], f"missing required field (found: {sorted(record)})")
    for name in ("id", "source"):
        if not isinstance(record[name], str):
            raise fail(name, f"must be a string, got {record[name]!r}")
    if record["task"] not in TASKS:
        raise fail("task", f"unknown task {record['task']!r}; expected one of {list(TASKS)}")
    if record["language"] not in LANGUAGES:
        raise fail("language", f"unknown language {record['language']!r}; expected one of {list(LANGUAGES)}")
    _validate_conversations(record["conversations"], fail)
    for name in ("system", "license"):
        if record.get(name) is not None and not isinstance(record[name], str):
            raise fail(name, f"must be a string or null, got {record[name]!r}")
    meta = record.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise fail("meta", f"must be an object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(META_FIELDS))
    if unknown:
        raise fail(f"meta.{unknown[0]}", f"unknown meta field; expected some of {list(META_FIELDS)}")
    options = meta.get("options")
    if options is not None:
        if not isinstance(options, list) or not options or not all(
                isinstance(o, str) and o.strip() for o in options):
            raise fail("meta.options", f"must be a non-empty list of non-empty strings, got {options!r}")
    answer = meta.get("answer")
    if answer is not None:
        allowed = OPTION_LETTERS[: len(options)] if options else OPTION_LETTERS
        if not isinstance(answer, str) or answer not in allowed:
            raise fail("meta.answer", f"answer letter {answer!r} is not one of {list(allowed)}")
    if record["task"] == "mcqa" and (options is None or answer is None):
        raise fail("meta.options" if options is None else "meta.answer",
                   "an mcqa record needs meta.options and meta.answer")
    for block, features in (("translation", TRANSLATION_FEATURES), ("generation", GENERATION_FEATURES)):
        value = meta.get(block)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise fail(f"meta.{block}", f"must be an object, got {type(value).__name__}")
        extra = sorted(set(value) - set(features))
        if extra:
            raise fail(f"meta.{block}.{extra[0]}", f"unknown field; expected some of {list(features)}")
    translation = meta.get("translation") or {}
    score = translation.get("score")
    if score is not None and not (isinstance(score, (int, float)) and 0 <= score <= 100):
        raise fail("meta.translation.score", f"must be a number in 0..100, got {score!r}")
    state = translation.get("review_state")
    if state is not None and state not in REVIEW_STATES:
        raise fail("meta.translation.review_state",
                   f"unknown state {state!r}; expected one of {list(REVIEW_STATES)}")
    return normalize_record(record)


def normalize_record(record: Mapping) -> dict:
    """Return a copy of ``record`` with every optional field present (``None`` where unset)."""
    meta = dict(record.get("meta") or {})
    out_meta = {name: meta.get(name) for name in META_FIELDS}
    for block, features in (("translation", TRANSLATION_FEATURES), ("generation", GENERATION_FEATURES)):
        if out_meta[block] is not None:
            out_meta[block] = {name: out_meta[block].get(name) for name in features}
    return {
        "id": record["id"],
        "source": record["source"],
        "task": record["task"],
        "language": record["language"],
        "conversations": [{"from": turn["from"], "value": turn["value"]} for turn in record["conversations"]],
        "system": record.get("system"),
        "license": record.get("license"),
        "meta": out_meta,
    }


def make_record(
    *,
    id: str,
    source: str,
    task: str,
    language: str,
    conversations: list[dict],
    license: str | None = None,
    system: str | None = None,
    **meta: Any,
) -> dict:
    """Build a validated record; keyword arguments beyond the top-level fields go into ``meta``."""
    return validate_record(
        {"id": id, "source": source, "task": task, "language": language, "conversations": conversations,
         "system": system, "license": license, "meta": meta}
    )


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Yield validated, normalised schema records from a JSON Lines file."""
    for line_no, obj in iter_jsonl(path):
        yield validate_record(obj, path=str(path), line=line_no)


def read_records_lines(path: str | os.PathLike,
                       lines: list[tuple[int, bytes]]) -> list[tuple[str | None, RecordError | None]]:
    """Validate numbered raw lines of a schema-record JSON Lines file (a chunk, for worker processes).

    Returns:
        `list`: per non-blank line, ``(the record as one JSON line, None)`` or ``(None, the RecordError)``.
    """
    results = []
    for line_no, raw in lines:
        obj, error = decode_jsonl_line(path, line_no, raw)
        if obj is BLANK:
            continue
        if error is None:
            try:
                record = validate_record(obj, path=str(path), line=line_no)
            except RecordError as err:
                error = RecordError(err.reason, path=err.path, record=err.record, field=err.field, raw=obj)
            else:
                results.append((json.dumps(record, ensure_ascii=False) + "\n", None))
                continue
        results.append((None, error))
    return results


def _validate_conversations(conversations: Any, fail) -> None:
    if not isinstance(conversations, list) or not conversations:
        raise fail("conversations", f"must be a non-empty list of turns, got {conversations!r:.80}")
    for index, turn in enumerate(conversations):
        field = f"conversations[{index}]"
        if not isinstance(turn, Mapping):
            raise fail(field, f"must be an object with `from` and `value`, got {turn!r:.80}")
        expected = ROLES[index % 2]
        if turn.get("from") != expected:
            raise fail(f"{field}.from",
                       f"expected {expected!r} (turns alternate, human first), got {turn.get('from')!r}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise fail(f"{field}.value", f"must be a non-empty string, got {value!r:.80}")
    if conversations[-1]["from"] != "gpt":
        raise fail(f"conversations[{len(conversations) - 1}].from",
                   "a conversation must end with a `gpt` turn")

