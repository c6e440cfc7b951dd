"""Multiple-choice questions: readers for the original benchmark files, and their rendering as conversations.

Readers stream `MCQAItem`s straight from the files the benchmark authors published (no Hub copies):

============================  ==========================================================================
`read_pubmedqa`               PubMedQA ``ori_pqal.json`` (+ ``test_ground_truth.json``), ``ori_pqaa.json``,
                              ``ori_pqau.json`` (unlabelled items are skipped: they have no answer)
`read_medmcqa`                MedMCQA JSON Lines (``cop`` 1-based; ``cop_base=0`` for the Hugging Face export)
`read_medqa`                  MedQA-USMLE JSON Lines, 4 or 5 options
`read_mmlu`                   MMLU header-less 6-column CSVs, English or AceGPT's Arabic translation
`read_medarabench`            MedAraBench CSV (options A–F, unused ones empty; messy answer letters)
============================  ==========================================================================

A record the reader cannot turn into an item raises `RecordError` naming ``file:record: field``, or,
with ``on_error`` set, is handed to it and skipped (see `bimedix.data.rejects`).

`render_mcqa` turns an item into Vicuna turns with the prompts in `PROMPTS` (English and Arabic; Arabic
prompts letter the options أ ب ج د هـ و, `bimedix.core.conventions.OPTION_LETTERS`, while
``meta.answer`` stays a Latin letter), and `item_to_record` into a schema record.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.conventions import LANGUAGES, PUBMEDQA_ANSWERS
from ..core.conventions import OPTION_LETTERS as LETTERS
from ..core.io import OnError, iter_jsonl, read_delimited, read_json
from .rejects import failer, flat_map_records, object_failer, row_cells
from .schema import OPTION_LETTERS, RecordError, make_record

logger = logging.getLogger(__name__)


#: Every prompt string the MCQA rendering uses. ``question`` items list lettered options;
#: ``context`` items (PubMedQA) give an abstract and expect yes / no / maybe.
PROMPTS = {
    "en": {
        "question": "Answer the following multiple-choice question by choosing the correct option.\n\n"
                    "Question: {question}\n\nOptions:\n{options}",
        "context": "Read the abstract and answer the question with yes, no or maybe.\n\n"
                   "Context: {context}\n\nQuestion: {question}",
        "option": "{letter}. {text}",
        "explanation": "{answer}\n\nExplanation: {explanation}",
        "yes_no_maybe": {word: word.capitalize() for word in PUBMEDQA_ANSWERS["en"]},
    },
    "ar": {
        "question": "أجب عن سؤال الاختيار من متعدد التالي باختيار الإجابة الصحيحة.\n\n"
                    "السؤال: {question}\n\nالخيارات:\n{options}",
        "context": "اقرأ الملخص وأجب عن السؤال بنعم أو لا أو ربما.\n\n"
                   "السياق: {context}\n\nالسؤال: {question}",
        "option": "{letter}. {text}",
        "explanation": "{answer}\n\nالشرح: {explanation}",
        "yes_no_maybe": dict(zip(PUBMEDQA_ANSWERS["en"], PUBMEDQA_ANSWERS["ar"])),
    },
}

PUBMEDQA_OPTIONS = list(PUBMEDQA_ANSWERS["en"])
#: Default licence strings of the MCQA sources (what the source repository states).
LICENSES = {"pubmedqa": "MIT", "medmcqa": "MIT", "medqa": "MIT", "mmlu": "MIT", "mmlu-ar": "Apache-2.0",
            "medarabench": "none stated (research use only)"}
#: AceGPT's MMLU-Arabic rows where the translator substituted an "IP spoofing" computer-security item
#: (see the data's KNOWN_ISSUES.md): the question names IP and an option mentions one of these.
_IP_SPOOFING_QUESTION = re.compile(r"\bIP\b")
_IP_SPOOFING_OPTION_WORDS = ("IDS", "الاختراق", "TTL", "TCP")


@dataclass(kw_only=True)
class MCQAItem:
    """One multiple-choice question as read from its source.

    Args:
        id (`str`): stable unique id, ``"<source>-<original id>"`` or ``"<source>-<content hash>"``.
        source (`str`): converter name, e.g. ``"medmcqa"``.
        language (`str`): ``"en"`` or ``"ar"``.
        question (`str`): the question text.
        options (`list[str]`): option texts in letter order (unused trailing options dropped).
        answer (`str`): the correct option as a Latin letter, ``"A"``...
        subject (`str`, *optional*): subject or specialty.
        explanation (`str`, *optional*): the source's explanation / long answer.
        context (`str`, *optional*): the abstract, for PubMedQA.
        original_id (`str`): the id in the source (or ``"<file name>:<row>"`` where it has none).
        license (`str`): the source's licence.
        line (`int`, *optional*): line where the record starts in its file, for error messages.
    """

    id: str
    source: str
    language: str
    question: str
    options: list[str]
    answer: str
    subject: str | None = None
    explanation: str | None = None
    context: str | None = None
    original_id: str = ""
    license: str = ""
    line: int | None = None

    @property
    def answer_text(self) -> str:
        """The text of the correct option."""
        return self.options[OPTION_LETTERS.index(self.answer)]


def read_pubmedqa(path: str | os.PathLike, ground_truth: str | os.PathLike | None = None, *,
                  split: str = "all",
                  on_error: OnError = None) -> Iterator[MCQAItem]:
    """Stream PubMedQA items from ``ori_pqal.json`` (PQA-L) or the PQA-A / PQA-U files of the same layout.

    Args:
        path (`str | os.PathLike`): a JSON object keyed by PMID (``QUESTION``, ``CONTEXTS``,
            ``final_decision``, ``LONG_ANSWER``, ...).
        ground_truth (`str | os.PathLike`, *optional*): ``test_ground_truth.json`` (PMID → yes/no/maybe); its
            labels win over ``final_decision`` and its PMIDs define the test split.
        split (`str`, *optional*, defaults to `"all"`): ``"all"``, ``"test"`` (PMIDs in the ground truth) or
            ``"train"`` (the others).
        on_error (`OnError`, *optional*): ``None`` raises on a bad record; a callable receives it instead.

    Items without a decision (PQA-U, or ``"unlabeled"``) cannot be multiple-choice items and are skipped
    (logged). The context is the abstract's sections joined by newlines; the explanation is ``LONG_ANSWER``.
    """
    if split not in ("all", "test", "train"):
        raise ValueError(f"unknown PubMedQA split {split!r}; choose 'all', 'test' or 'train'")
    if split != "all" and ground_truth is None:
        raise ValueError(f"split={split!r} needs ground_truth= "
                         "(test_ground_truth.json) to know the test PMIDs")
    data = read_json(path)
    if not isinstance(data, dict):
        raise RecordError(f"expected a JSON object keyed by PMID, got {type(data).__name__}", path=str(path))
    labels = read_json(ground_truth) if ground_truth is not None else {}
    if not isinstance(labels, dict):
        raise RecordError(f"expected a JSON object PMID -> label, got {type(labels).__name__}",
                          path=str(ground_truth))
    unlabeled = 0

    def parse(pmid_entry: tuple[str, Any]) -> Iterator[MCQAItem]:
        nonlocal unlabeled
        pmid, entry = pmid_entry
        fail = object_failer(path, pmid, entry)
        question = _text(entry, "QUESTION", fail)
        contexts = entry.get("CONTEXTS")
        if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts) or not contexts:
            raise fail("CONTEXTS", f"must be a non-empty list of strings, got {contexts!r:.80}")
        field = "test_ground_truth" if pmid in labels else "final_decision"
        decision = labels.get(pmid, entry.get("final_decision"))
        if decision is None or decision == "unlabeled":
            unlabeled += 1
            return
        if not isinstance(decision, str) or decision.strip().lower() not in PUBMEDQA_OPTIONS:
            raise fail(field, f"decision {decision!r} is not one of {PUBMEDQA_OPTIONS}")
        yield MCQAItem(id=f"pubmedqa-{pmid}", source="pubmedqa", language="en", question=question,
                       options=list(PUBMEDQA_OPTIONS),
                       answer=OPTION_LETTERS[PUBMEDQA_OPTIONS.index(decision.strip().lower())],
                       explanation=_optional_text(entry.get("LONG_ANSWER")),
                       context="\n".join(c.strip() for c in contexts), original_id=str(pmid),
                       license=LICENSES["pubmedqa"])

    in_split = ((pmid, entry) for pmid, entry in data.items()
                if not (split == "test" and pmid not in labels or split == "train" and pmid in labels))
    yield from flat_map_records(parse, in_split, on_error=on_error)
    if unlabeled:
        log = logger.warning if unlabeled == len(data) else logger.info
        log("%s: skipped %d items without a yes/no/maybe decision (PQA-U layout)", path, unlabeled)


def read_medmcqa(path: str | os.PathLike, *, cop_base: int = 1,
                 on_error: OnError = None) -> Iterator[MCQAItem]:
    """Stream MedMCQA items from its JSON Lines files (``train.json``, ``dev.json``, despite the extension).

    Args:
        path (`str | os.PathLike`): the file; fields ``id``, ``question``, ``opa``..``opd``, ``cop``, ``exp``,
            ``subject_name``.
        cop_base (`int`, *optional*, defaults to `1`): ``1`` for the original files (``cop`` 1..4 → A..D),
            ``0`` for the Hugging Face export (0..3). Pass it explicitly: the two cannot be told apart.
        on_error (`OnError`, *optional*): ``None`` raises on a bad record; a callable receives it instead.
    """
    if cop_base not in (0, 1):
        raise ValueError(f"cop_base must be 1 (original MedMCQA files) or 0 (Hugging Face export), "
                         f"got {cop_base!r}")

    def parse(line_obj: tuple[int, Any]) -> Iterator[MCQAItem]:
        line, obj = line_obj
        fail = object_failer(path, line, obj)
        original_id = _text(obj, "id", fail)
        options = _options([(name, obj.get(name)) for name in ("opa", "opb", "opc", "opd")], fail)
        cop = obj.get("cop")
        if isinstance(cop, str) and cop.strip().lstrip("-").isdigit():
            cop = int(cop)
        if not isinstance(cop, int) or isinstance(cop, bool) or not cop_base <= cop < cop_base + len(options):
            raise fail("cop", f"answer index {cop!r} is not in {cop_base}..{cop_base + len(options) - 1} "
                              f"(cop_base={cop_base}; the original files "
                              "are 1-based, the Hub export 0-based)")
        yield MCQAItem(id=f"medmcqa-{original_id}", source="medmcqa", language="en",
                       question=_text(obj, "question", fail), options=options,
                       answer=OPTION_LETTERS[cop - cop_base], subject=_optional_text(obj.get("subject_name")),
                       explanation=_optional_text(obj.get("exp")),
                       original_id=original_id, license=LICENSES["medmcqa"], line=line)

    yield from flat_map_records(parse, iter_jsonl(path, on_error=on_error), on_error=on_error)


def read_medqa(path: str | os.PathLike, *, on_error: OnError = None) -> Iterator[MCQAItem]:
    """Stream MedQA-USMLE items from its JSON Lines files (4-option or 5-option).

    Fields: ``question``, ``options`` (``{"A": ..., ...}``), ``answer_idx`` (letter), ``answer`` (text,
    checked against the option), ``meta_info`` (``step1`` / ``step2&3``, kept as the subject). The files carry
    no ids: the id is a hash of question and options, ``original_id`` is ``"<file name>:<line>"``.
    """
    seen: Counter[str] = Counter()

    def parse(line_obj: tuple[int, Any]) -> Iterator[MCQAItem]:
        line, obj = line_obj
        fail = object_failer(path, line, obj)
        question = _text(obj, "question", fail)
        raw_options = obj.get("options")
        if not isinstance(raw_options, dict) or not raw_options:
            raise fail("options", f"must be a non-empty object of letter -> text, got {raw_options!r:.80}")
        letters = sorted(raw_options)
        if letters != list(OPTION_LETTERS[: len(letters)]):
            raise fail("options", f"option letters {letters} are not A.. in sequence")
        options = _options([(f"options.{k}", raw_options[k]) for k in letters], fail)
        answer = _letter(obj.get("answer_idx"), options, "answer_idx", fail)
        text = obj.get("answer")
        if text is not None and str(text).strip() != options[OPTION_LETTERS.index(answer)]:
            raise fail("answer", f"answer text {text!r:.80} differs from option {answer} "
                                 f"({options[OPTION_LETTERS.index(answer)]!r:.80})")
        yield MCQAItem(id=stable_id("medqa", question, *options, seen=seen), source="medqa", language="en",
                       question=question, options=options, answer=answer,
                       subject=_optional_text(obj.get("meta_info")), original_id=f"{Path(path).name}:{line}",
                       license=LICENSES["medqa"], line=line)

    yield from flat_map_records(parse, iter_jsonl(path, on_error=on_error), on_error=on_error)


def read_mmlu(path: str | os.PathLike, *, language: str = "en", subject: str | None = None,
              on_error: OnError = None) -> Iterator[MCQAItem]:
    """Stream MMLU items from its header-less CSVs (question, A, B, C, D, answer letter).

    Args:
        path (`str | os.PathLike`): a ``<subject>_<split>.csv`` file, or a folder searched recursively for
            them.
        language (`str`, *optional*, defaults to `"en"`): ``"en"`` (hendrycks/test; source ``"mmlu"``) or
            ``"ar"`` (AceGPT's MMLUArabic, same layout and rows; source ``"mmlu-ar"``).
        subject (`str`, *optional*): the subject; defaults to the file name without
            ``_test``/``_dev``/``_val``.
        on_error (`OnError`, *optional*): ``None`` raises on a bad record; a callable receives it instead.

    In the Arabic files, rows where the translator replaced question and options by an "IP spoofing"
    computer-security item (about 18%; see the data's KNOWN_ISSUES.md) are bad records (field ``question``):
    their gold letter no longer matches anything. Use ``on_error`` to skip them.
    """
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; expected one of {list(LANGUAGES)}")
    source = "mmlu" if language == "en" else "mmlu-ar"
    root = Path(path)
    files = sorted(root.rglob("*.csv")) if root.is_dir() else [root]
    if not files:
        raise FileNotFoundError(f"no MMLU .csv files under {root}")
    seen: Counter[str] = Counter()

    def rows() -> Iterator[tuple[Path, str, int, int, list[str]]]:
        for file in files:
            file_subject = subject or re.sub(r"_(test|dev|val)$", "", file.stem)
            for row_no, (line, row) in enumerate(read_delimited(file, on_error=on_error), start=1):
                yield file, file_subject, row_no, line, row

    def parse(entry: tuple[Path, str, int, int, list[str]]) -> Iterator[MCQAItem]:
        file, file_subject, row_no, line, row = entry
        fail = failer(file, line, row)
        if len(row) != 6:
            raise fail(None, f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        question = row[0].strip()
        if not question:
            raise fail("question", "is empty")
        options = _options(list(zip("ABCD", row[1:5])), fail)
        answer = _letter(row[5], options, "answer", fail)
        if language == "ar" and _is_ip_spoofing(question, options):
            raise fail("question", "corrupted upstream translation: question and options were replaced "
                                   "by an 'IP spoofing' computer-security item, so the gold letter is "
                                   "meaningless")
        yield MCQAItem(id=stable_id(source, question, *options, seen=seen), source=source,
                       language=language,
                       question=question, options=options, answer=answer, subject=file_subject,
                       original_id=f"{file.name}:{row_no}", license=LICENSES[source], line=line)

    yield from flat_map_records(parse, rows(), on_error=on_error)


def read_medarabench(path: str | os.PathLike, *, on_error: OnError = None) -> Iterator[MCQAItem]:
    """Stream MedAraBench items (Arabic) from its CSV.

    Columns: ``Question Number, Question, Option A..F, Correct Answer, Level, Medical Specialty, Group,
    umbrella_specialty``. Unused options E/F are empty and dropped; lowercase answer letters are accepted;
    free-text or combined answers (``"A+B"``) and letters that name an empty option are bad records.
    """
    rows = read_delimited(path, on_error=on_error)
    header_line, header = next(rows, (1, []))
    required = ["Question Number", "Question", *(f"Option {k}" for k in "ABCDEF"), "Correct Answer"]
    missing = [name for name in required if name not in header]
    if missing:
        raise RecordError(f"header lacks column(s) {missing} (found: {header})", path=str(path),
                          record=header_line)
    column = {name: index for index, name in enumerate(header)}

    def parse(line_row: tuple[int, list[str]]) -> Iterator[MCQAItem]:
        line, row = line_row
        cell, fail = row_cells(path, header, line, row)
        number = cell["Question Number"].strip()
        if not number:
            raise fail("Question Number", "is empty")
        question = cell["Question"].strip()
        if not question:
            raise fail("Question", "is empty")
        options = _options([(f"Option {k}", row[column[f"Option {k}"]]) for k in "ABCDEF"], fail)
        answer = _letter(cell["Correct Answer"].strip().upper(), options, "Correct Answer", fail,
                         shown=cell["Correct Answer"])
        yield MCQAItem(id=f"medarabench-{number}", source="medarabench", language="ar", question=question,
                       options=options, answer=answer, subject=_optional_text(cell.get("Medical Specialty")),
                       original_id=number, license=LICENSES["medarabench"], line=line)

    yield from flat_map_records(parse, rows, on_error=on_error)


def render_mcqa(item: MCQAItem, language: str | None = None) -> list[dict]:
    """Render an item as Vicuna turns: one human prompt and one gpt answer.

    Args:
        item (`MCQAItem`): the question.
        language (`str`, *optional*): prompt language, ``"en"`` or ``"ar"``; defaults to ``item.language``.

    Returns:
        `list[dict]`: ``[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]``. Items with a
        ``context`` (PubMedQA) get the abstract and a yes/no/maybe answer; the others get lettered options
        and the answer ``"<letter>. <option text>"``. The explanation, where present, follows the answer.

    Examples:

    ```python
    >>> item = MCQAItem(id="x", source="demo", language="en", question="2 + 2 = ?", options=["3", "4"],
    ...                answer="B")
    >>> render_mcqa(item)[1]["value"]
    'B. 4'
    >>> render_mcqa(item, "ar")[1]["value"]
    'ب. 4'

    ```
    """
    language = language or item.language
    if language not in PROMPTS:
        raise ValueError(f"no MCQA prompts for language {language!r}; expected one of {sorted(PROMPTS)}")
    prompts, letters = PROMPTS[language], LETTERS[language]
    if len(item.options) > len(letters):
        raise ValueError(f"item {item.id!r} has {len(item.options)} options; at most {len(letters)} "
                         "can be lettered")
    if item.context is not None:
        human = prompts["context"].format(context=item.context, question=item.question)
        text = item.answer_text
        answer = prompts["yes_no_maybe"].get(text.lower(), text)
    else:
        options = "\n".join(prompts["option"].format(letter=letter, text=text)
                            for letter, text in zip(letters, item.options))
        human = prompts["question"].format(question=item.question, options=options)
        answer = prompts["option"].format(letter=letters[OPTION_LETTERS.index(item.answer)],
                                          text=item.answer_text)
    if item.explanation:
        answer = prompts["explanation"].format(answer=answer, explanation=item.explanation)
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]


def item_to_record(item: MCQAItem, language: str | None = None) -> dict:
    """Turn an item into a validated schema record (task ``"mcqa"``).

    Args:
        item (`MCQAItem`): the question.
        language (`str`, *optional*): record and prompt language; defaults to ``item.language``. A language
            other than the item's adds ``-<language>`` to the id.

    Returns:
        `dict`: the record, with ``meta.answer`` (Latin letter), ``meta.options``, ``meta.original_id`` and
        ``meta.subject``.
    """
    language = language or item.language
    try:
        return make_record(id=item.id if language == item.language else f"{item.id}-{language}",
                           source=item.source, task="mcqa", language=language,
                           conversations=render_mcqa(item, language), license=item.license or None,
                           original_id=item.original_id or None, subject=item.subject, answer=item.answer,
                           options=list(item.options))
    except RecordError as err:
        raise err.located(record=item.line if item.line is not None else item.id) from None


def stable_id(source: str, *parts: str, seen: Counter[str] | None = None) -> str:
    """Return ``"<source>-<16 hex digits>"`` hashed from ``parts``, for sources without ids.

    Args:
        source (`str`): the id prefix.
        *parts (`str`): the texts that identify the record (e.g. question and options).
        seen (`collections.Counter`, *optional*): hashes met so far in this file; a repeat gets ``-2``,
            ``-3``... so ids stay unique even for verbatim duplicates.
    """
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]
    if seen is None:
        return f"{source}-{digest}"
    seen[digest] += 1
    return f"{source}-{digest}" if seen[digest] == 1 else f"{source}-{digest}-{seen[digest]}"


def _text(obj: dict, field: str, fail) -> str:
    value = obj.get(field)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise fail(field, f"missing or empty (found fields: {sorted(obj)})" if field not in obj
                   else f"must be a non-empty string, got {value!r:.80}")
    return value.strip()


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _options(cells: list[tuple[str, Any]], fail) -> list[str]:
    """Option texts in order; trailing empty options are dropped, an empty one before a filled one is an
    error."""
    texts = ["" if value is None else str(value).strip() for _, value in cells]
    while texts and not texts[-1]:
        texts.pop()
    if not texts:
        raise fail(cells[0][0] if cells else "options", "all options are empty")
    for (field, _), text in zip(cells, texts):
        if not text:
            raise fail(field, "option is empty but a later option is not; the letters would shift")
    return texts


def _letter(value: Any, options: list[str], field: str, fail, *, shown: Any = None) -> str:
    letter = value.strip() if isinstance(value, str) else value
    allowed = OPTION_LETTERS[: len(options)]
    if not isinstance(letter, str) or len(letter) != 1 or letter not in allowed:
        raise fail(field,
                   f"answer {value if shown is None else shown!r:.80} is not one of the option letters "
                          f"{list(allowed)}")
    return letter


def _is_ip_spoofing(question: str, options: list[str]) -> bool:
    return bool(_IP_SPOOFING_QUESTION.search(question)) and any(
        word in option for option in options for word in _IP_SPOOFING_OPTION_WORDS)
