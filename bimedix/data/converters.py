"""One converter per BiMed1.3M source: original public file → stream of schema records.

Every converter has the signature ``convert_x(path, *, language=None, on_error=None, **options)`` and is
registered in `CONVERTERS` under its source name; `SOURCE_INFO` holds what callers need to know about
each source (task, language, licence, whether its text may be redistributed). `convert` dispatches.

Multiple-choice sources go through the readers of `bimedix.data.mcqa` and are rendered with its prompts.
Open-QA sources become one human turn and one gpt turn:

- ChatDoctor **HealthCareMagic-100k**, **Medical Meadow** (every subset) and **UMLS** (PMC-LLaMA MedC-I):
  ``{instruction, input, output}`` records. The human turn is ``input``, preceded by ``instruction``
  unless that instruction is one of the sources' fixed boilerplate lines (`GENERIC_INSTRUCTIONS`).
  UMLS files that mix sources (a ``source`` field) keep only ``source == "umls"``.
- ChatDoctor **iCliniq**: ``{input, answer_icliniq, answer_chatgpt, answer_chatdoctor}``; the doctor's
  ``answer_icliniq`` is kept, the two model answers are not.
- **LiveQA** TREC-2017 XML, ``SUBJECT`` and ``MESSAGE`` as the question. Training files
  (``NLM-QUESTION > SUB-QUESTIONS > SUB-QUESTION > ANNOTATIONS + ANSWERS > ANSWER*``): one record per
  question-answer pair (per ``<ANSWER>``), FOCUS in ``meta.subject``, TYPE in ``meta.question_type``. Test
  files: one record per question with its *first* reference answer (``<ReferenceAnswer>`` or
  ``<RefAnswer>``), since those answers come from different pages and do not read as one reply.
- **MedicationQA** xlsx: ``Question`` → ``Answer``, the focus drug in ``meta.subject``.
- **MentalQA** ``Train_Dev.tsv``: ``question`` → ``answer`` (Arabic).

Ids are ``<source>-<original id>`` where the source has one and a content hash otherwise (see
`bimedix.data.mcqa.stable_id`).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..core.io import OnError, iter_jsonl, read_delimited, read_json
from ..resources import resource_path
from .mcqa import (
    LICENSES,
    item_to_record,
    read_medarabench,
    read_medmcqa,
    read_medqa,
    read_mmlu,
    read_pubmedqa,
    stable_id,
)
from .rejects import failer, flat_map_records, map_records, object_failer, row_cells
from .schema import RecordError, make_record

logger = logging.getLogger(__name__)

Converter = Callable[..., Iterator[dict]]

#: Instructions that carry no information beyond "answer this"; the human turn is then just the input.
GENERIC_INSTRUCTIONS = frozenset({
    "Answer this question truthfully",
    "If you are a doctor, please answer the medical questions based on the patient's description.",
})

#: MentalQA question types (``final_QT``), from the dataset's README.
MENTALQA_TYPES = {"A": "diagnosis", "B": "treatment", "C": "anatomy and physiology", "D": "epidemiology",
                  "E": "healthy lifestyle", "F": "provider choices", "Z": "other"}


@dataclass(frozen=True)
class SourceInfo:
    """What bimedix knows about a source.

    Args:
        name (`str`): the converter name.
        task (`str`): ``"mcqa"`` or ``"qa"``.
        language (`str`): the language of the original text.
        license (`str`): the licence the source repository states (``"none stated"`` → research use only).
        redistributable (`bool`): whether its text may be published (e.g. pushed to the Hub) at all.
        permissive (`bool`): whether it may ship inside this Apache-2.0 package (no copyleft, no
            restrictions).
        description (`str`): the source and its original files.
    """

    name: str
    task: str
    language: str
    license: str
    redistributable: bool
    permissive: bool
    description: str


_RESEARCH_ONLY = "none stated (research use only)"
SOURCE_INFO: dict[str, SourceInfo] = {info.name: info for info in (
    SourceInfo("pubmedqa", "mcqa", "en", LICENSES["pubmedqa"], True, True,
               "PubMedQA (pubmedqa/pubmedqa): data/ori_pqal.json + test_ground_truth.json; ori_pqaa.json"),
    SourceInfo("medmcqa", "mcqa", "en", LICENSES["medmcqa"], True, True,
               "MedMCQA (medmcqa/medmcqa): train.json / dev.json JSON Lines, cop 1-based"),
    SourceInfo("medqa", "mcqa", "en", LICENSES["medqa"], True, True,
               "MedQA-USMLE (jind11/MedQA): data_clean/questions/US/*.jsonl, 4 or 5 options"),
    SourceInfo("mmlu", "mcqa", "en", LICENSES["mmlu"], True, True,
               "MMLU (hendrycks/test): data/{dev,test}/<subject>_<split>.csv, medical subjects"),
    SourceInfo("mmlu-ar", "mcqa", "ar", LICENSES["mmlu-ar"], True, True,
               "AceGPT MMLUArabic (FreedomIntelligence/AceGPT): "
               "machine translation of MMLU, same CSV layout"),
    SourceInfo("medarabench", "mcqa", "ar", LICENSES["medarabench"], False, False,
               "MedAraBench (nyuad-cai/MedAraBench): medarabench-test_split.csv, options A-F"),
    SourceInfo("healthcaremagic", "qa", "en", "none stated (ChatDoctor; HealthCareMagic.com content)",
               False, False,
               "ChatDoctor HealthCareMagic-100k: JSON list of {instruction, input, output}"),
    SourceInfo("icliniq", "qa", "en", "none stated (ChatDoctor; iCliniq.com content)", False, False,
               "ChatDoctor iCliniq: JSON list of {input, answer_icliniq, answer_chatgpt, answer_chatdoctor}"),
    SourceInfo("meadow", "qa", "en", "GPL-3.0", True, False,
               "Medical Meadow (kbressem/medAlpaca): JSON lists "
               "of {instruction, input, output}, all subsets"),
    SourceInfo("umls", "qa", "en", "UMLS Metathesaurus licence (via PMC-LLaMA MedC-I)", False, False,
               "UMLS QA of PMC-LLaMA's MedC-I: JSON list or JSON "
               "Lines of {instruction, input, output[, source]}"),
    SourceInfo("liveqa", "qa", "en", _RESEARCH_ONLY, False, False,
               "LiveQA TREC-2017 medical (abachaa/LiveQA_MedicalTask_TREC2017): TrainingDatasets/*.xml "
               "(in the repository's history) and TestDataset/*.xml"),
    SourceInfo("medicationqa", "qa", "en", _RESEARCH_ONLY, False, False,
               "MedicationQA (abachaa/Medication_QA_MedInfo2019): MedInfo2019-QA-Medications.xlsx"),
    SourceInfo("mentalqa", "qa", "ar", "MIT", True, True,
               "MentalQA (hasanhuz/MentalQA): Train_Dev.tsv "
               "with header question, answer, final_QT, final_AS"),
)}


#: Where each bundled source file lives under `bundled_path()` (see ``bimedix/data/bundled/README.md``).
BUNDLED = {
    "pubmedqa": "pubmedqa/ori_pqal.json",
    "medmcqa": "medmcqa/dev.json",
    "medqa": "medqa/phrases_no_exclude_test.jsonl",
    "mmlu": "mmlu/dev",
    "mmlu-ar": "mmlu_arabic/dev",
    "mentalqa": "mentalqa/Train_Dev.tsv",
}


def bundled_path(*parts: str) -> Path:
    """Return the path of the bundled data folder, or of a file in it.

    Examples:

    ```python
    >>> records = list(convert("medmcqa", bundled_path(BUNDLED["medmcqa"])))
    >>> len(records)
    100

    ```
    """
    return resource_path("bimedix", "data", "bundled", *parts)


def convert(source: str, path: str | os.PathLike, *, language: str | None = None, on_error: OnError = None,
            **options: Any) -> Iterator[dict]:
    """Stream schema records from an original source file.

    Args:
        source (`str`): a key of `CONVERTERS`, e.g. ``"medmcqa"``.
        path (`str | os.PathLike`): the original file (a folder for ``mmlu``/``mmlu-ar``).
        language (`str`, *optional*): the records' language (and MCQA prompt language); defaults to the
            source's.
        on_error (`OnError`, *optional*): ``None`` raises on a bad record; a callable (e.g. a
            `bimedix.data.rejects.RejectLog`) receives it and conversion continues.
        **options: source-specific options: ``ground_truth``/``split`` (pubmedqa), ``cop_base`` (medmcqa),
            ``subject`` (mmlu, mmlu-ar).

    Examples:

    ```python
    >>> records = list(convert("medmcqa", bundled_path(BUNDLED["medmcqa"])))
    >>> records[0]["meta"]["answer"]
    'A'

    ```
    """
    if source not in CONVERTERS:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(CONVERTERS)}")
    if not Path(path).exists():
        raise FileNotFoundError(f"{source}: input {path} does not exist")
    try:
        return CONVERTERS[source](path, language=language, on_error=on_error, **options)
    except TypeError as err:
        raise ValueError(f"{source}: unsupported option(s) {sorted(options)} ({err})") from None


def convert_pubmedqa(path: str | os.PathLike, *, language: str | None = None, on_error: OnError = None,
                     ground_truth: str | os.PathLike | None = None, split: str = "all") -> Iterator[dict]:
    """PubMedQA → mcqa records (see `bimedix.data.mcqa.read_pubmedqa`)."""
    return _mcqa(read_pubmedqa(path, ground_truth, split=split, on_error=on_error), language, on_error)


def convert_medmcqa(path: str | os.PathLike, *, language: str | None = None, on_error: OnError = None,
                    cop_base: int = 1) -> Iterator[dict]:
    """MedMCQA → mcqa records with the explanation after the answer (see `bimedix.data.mcqa.read_medmcqa`)."""
    return _mcqa(read_medmcqa(path, cop_base=int(cop_base), on_error=on_error), language, on_error)


def convert_medqa(path: str | os.PathLike, *, language: str | None = None,
                  on_error: OnError = None) -> Iterator[dict]:
    """MedQA-USMLE → mcqa records (see `bimedix.data.mcqa.read_medqa`)."""
    return _mcqa(read_medqa(path, on_error=on_error), language, on_error)


def convert_mmlu(path: str | os.PathLike, *, language: str | None = None, on_error: OnError = None,
                 subject: str | None = None, source_language: str = "en") -> Iterator[dict]:
    """MMLU CSVs (English, or AceGPT's Arabic with ``source_language="ar"``) → mcqa records."""
    return _mcqa(read_mmlu(path, language=source_language, subject=subject, on_error=on_error), language,
                 on_error)


def convert_medarabench(path: str | os.PathLike, *, language: str | None = None,
                        on_error: OnError = None) -> Iterator[dict]:
    """MedAraBench → Arabic mcqa records (see `bimedix.data.mcqa.read_medarabench`)."""
    return _mcqa(read_medarabench(path, on_error=on_error), language, on_error)


def convert_instructions(path: str | os.PathLike, *, source: str, language: str | None = None,
                         on_error: OnError = None) -> Iterator[dict]:
    """``{instruction, input, output}`` records (HealthCareMagic, Medical Meadow, UMLS) → qa records."""

    def fields(obj: dict, fail) -> tuple[str, str, str | None] | None:
        if source == "umls" and obj.get("source", "umls") != "umls":
            return None
        instruction = _optional(obj, "instruction", fail)
        question = _optional(obj, "input", fail)
        if instruction and instruction not in GENERIC_INSTRUCTIONS:
            question = f"{instruction}\n\n{question}" if question else instruction
        if not question:
            raise fail("input", "no question: `input` is empty and `instruction` is boilerplate "
                                f"{instruction!r}")
        answer = _required(obj, "output", fail)
        sample_id = obj.get("sample_id")
        return question, answer, str(sample_id) if sample_id is not None else None

    return _json_qa(path, source, language, on_error, fields)


def convert_icliniq(path: str | os.PathLike, *, language: str | None = None,
                    on_error: OnError = None) -> Iterator[dict]:
    """ChatDoctor iCliniq (``input`` → ``answer_icliniq``; ``{instruction, input, output}`` also accepted)."""

    def fields(obj: dict, fail) -> tuple[str, str, None]:
        question = _required(obj, "input", fail)
        return question, _required(obj, "answer_icliniq" if "output" not in obj else "output", fail), None

    return _json_qa(path, "icliniq", language, on_error, fields)


def convert_liveqa(path: str | os.PathLike, *, language: str | None = None,
                   on_error: OnError = None) -> Iterator[dict]:
    """LiveQA TREC-2017 medical XML (training or test layout) → qa records.

    Training layout (``TrainingDatasets/*.xml``): one record per question-answer pair, i.e. per ``<ANSWER>``
    of each ``<SUB-QUESTION>`` (the dataset's own unit: 388 + 246 = 634 pairs), with that sub-question's
    FOCUS in ``meta.subject`` and TYPE in ``meta.question_type``. Test layout (``TestDataset/*.xml``): one
    record per question with its first ``<ReferenceAnswer>``/``<RefAnswer>``. A question in neither
    layout is an error naming the file, the question id and the missing element.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise RecordError(f"not well-formed XML ({err})", path=str(path)) from None

    def parse(numbered: tuple[int, ET.Element]) -> Iterator[dict]:
        index, question = numbered
        qid = question.get("qid") or question.get("questionid") or str(index)
        fail = failer(path, qid, ET.tostring(question, encoding="unicode")[:2000])
        subject = _xml_text(question.find(".//SUBJECT"))
        message = _xml_text(question.find(".//MESSAGE"))
        if not message and not subject:
            raise fail("MESSAGE", "the question has neither SUBJECT nor MESSAGE text")
        text = f"{subject}\n\n{message}" if subject and message else subject or message
        if question.find("SUB-QUESTIONS") is not None:
            yield from _liveqa_pairs(path, qid, question, text, language, fail)
            return
        answers = [_xml_text(node.find("ANSWER")) for node in question.iter()
                   if node.tag in ("ReferenceAnswer", "RefAnswer")]
        answers = [answer for answer in answers if answer]
        if not answers:
            raise fail("ReferenceAnswers", "neither a training <SUB-QUESTIONS> block nor a test "
                       "<ReferenceAnswer>/<RefAnswer> with a non-empty <ANSWER>")
        focus = _xml_text(question.find(".//FOCUS")) or None
        yield _record("liveqa", f"liveqa-{qid}", path, qid, text, answers[0], language, original_id=qid,
                      subject=focus)

    yield from flat_map_records(parse, enumerate(root.iter("NLM-QUESTION"), start=1), on_error=on_error)


def _liveqa_pairs(path, qid: str, question: ET.Element, text: str, language: str | None,
                  fail) -> Iterator[dict]:
    """The training layout's question-answer pairs of one ``<NLM-QUESTION>`` (all checked before any is
    yielded)."""
    records = []
    for sub_no, sub in enumerate(question.iter("SUB-QUESTION"), start=1):
        # not `subqid`: two questions of Train-1 ("181", "182") disagree with theirs
        sub_id = f"{qid}-S{sub_no}"
        focus = "; ".join(_xml_text(node) for node in sub.findall("ANNOTATIONS/FOCUS")
                          if _xml_text(node)) or None
        kind = "; ".join(_xml_text(node) for node in sub.findall("ANNOTATIONS/TYPE")
                         if _xml_text(node)) or None
        nodes = sub.findall("ANSWERS/ANSWER")
        if not any(_xml_text(node) for node in nodes):
            raise fail(f"SUB-QUESTION[{sub_no}].ANSWERS.ANSWER",
                       f"sub-question {sub_id!r} has no non-empty <ANSWER>")
        for answer_no, node in enumerate(nodes, start=1):
            if _xml_text(node):
                pair = f"{sub_id}-A{answer_no}"
                records.append(_record("liveqa", f"liveqa-{pair}", path, qid, text, _xml_text(node), language,
                                       original_id=node.get("answerid") or pair, subject=focus,
                                       question_type=kind))
    if not records:
        raise fail("SUB-QUESTIONS.SUB-QUESTION", "the <SUB-QUESTIONS> block holds no <SUB-QUESTION>")
    yield from records


def convert_medicationqa(path: str | os.PathLike, *, language: str | None = None,
                         on_error: OnError = None) -> Iterator[dict]:
    """MedicationQA xlsx → qa records (``Question`` → ``Answer``, ``Focus (Drug)`` as subject)."""
    rows = _xlsx_rows(path)
    header = [str(cell).strip() if cell is not None else "" for cell in next(rows, ())]
    missing = [name for name in ("Question", "Answer") if name not in header]
    if missing:
        rows.close()
        raise RecordError(f"header lacks column(s) {missing} (found: {header})", path=str(path), record=1)
    seen: Counter[str] = Counter()

    def parse(numbered: tuple[int, tuple]) -> Iterator[dict]:
        row_no, row = numbered
        if all(cell is None or not str(cell).strip() for cell in row):
            return
        cell = dict(zip(header, row))
        fail = failer(path, row_no, {k: v for k, v in cell.items() if k})
        question = _required(cell, "Question", fail)
        answer = _required(cell, "Answer", fail)
        subject = _optional(cell, "Focus (Drug)", fail) or None
        yield _qa_record("medicationqa", path, row_no, question, answer, language, seen=seen,
                         original_id=f"{Path(path).name}:{row_no}", subject=subject)

    yield from flat_map_records(parse, enumerate(rows, start=2), on_error=on_error)


def convert_mentalqa(path: str | os.PathLike, *, language: str | None = None,
                     on_error: OnError = None) -> Iterator[dict]:
    """MentalQA ``Train_Dev.tsv`` → Arabic qa records (``question`` → ``answer``).

    The question-type labels (``final_QT``, a Python-list string such as ``"['A', 'D']"``) become
    ``meta.subject`` as names, e.g. ``"diagnosis, epidemiology"``; an unreadable label is a bad record.
    """
    rows = read_delimited(path, delimiter="\t", on_error=on_error)
    header_line, header = next(rows, (1, []))
    header = [name.strip() for name in header]
    if "question" not in header or "answer" not in header:
        raise RecordError(f"header must name `question` and `answer` columns (found: {header[:4]!r:.120}); "
                          "the headerless test files carry no answers", path=str(path), record=header_line)
    seen: Counter[str] = Counter()

    def parse(line_row: tuple[int, list[str]]) -> Iterator[dict]:
        line, row = line_row
        cell, fail = row_cells(path, header, line, row, kind="tab-separated ")
        question = _required(cell, "question", fail)
        answer = _required(cell, "answer", fail)
        types = _mentalqa_types(cell["final_QT"], fail) if "final_QT" in cell else None
        yield _qa_record("mentalqa", path, line, question, answer, language, seen=seen,
                         original_id=f"{Path(path).name}:{line}", subject=types)

    yield from flat_map_records(parse, rows, on_error=on_error)


CONVERTERS: dict[str, Converter] = {
    "pubmedqa": convert_pubmedqa,
    "medmcqa": convert_medmcqa,
    "medqa": convert_medqa,
    "mmlu": convert_mmlu,
    "mmlu-ar": partial(convert_mmlu, source_language="ar"),
    "medarabench": convert_medarabench,
    "healthcaremagic": partial(convert_instructions, source="healthcaremagic"),
    "icliniq": convert_icliniq,
    "meadow": partial(convert_instructions, source="meadow"),
    "umls": partial(convert_instructions, source="umls"),
    "liveqa": convert_liveqa,
    "medicationqa": convert_medicationqa,
    "mentalqa": convert_mentalqa,
}


def _mcqa(items: Iterable, language: str | None, on_error: OnError) -> Iterator[dict]:
    return map_records(partial(item_to_record, language=language), items, on_error=on_error)


def _json_records(path, on_error: OnError) -> Iterator[tuple[str | int, Any]]:
    """Records of a JSON list (located as ``[index]``) or of a JSON Lines file (located by line).

    The layout is told by the first character, not the extension: some ``.json`` files are JSON Lines.
    """
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"{"):
        yield from iter_jsonl(path, on_error=on_error)
        return
    data = read_json(path)
    if not isinstance(data, list):
        raise RecordError(f"expected a JSON list of records, got {type(data).__name__}", path=str(path))
    for index, obj in enumerate(data):
        yield f"[{index}]", obj


def _json_qa(path, source: str, language: str | None, on_error: OnError,
             fields: Callable[[dict, Callable], tuple[str, str, str | None] | None]) -> Iterator[dict]:
    """QA records from the JSON objects of ``path`` (see `_json_records`).

    ``fields(obj, fail)`` returns ``(question, answer, original_id)``, or ``None`` to skip the object; an
    ``original_id`` of ``None`` becomes ``"<file name>:<location>"``.
    """
    seen: Counter[str] = Counter()

    def parse(where_obj: tuple[str | int, Any]) -> Iterator[dict]:
        where, obj = where_obj
        fail = object_failer(path, where, obj)
        found = fields(obj, fail)
        if found is None:
            return
        question, answer, original_id = found
        yield _qa_record(source, path, where, question, answer, language, seen=seen,
                         original_id=original_id if original_id is not None else f"{Path(path).name}:{where}")

    yield from flat_map_records(parse, _json_records(path, on_error), on_error=on_error)


def _qa_record(source: str, path, where, question: str, answer: str, language: str | None, *,
               seen: Counter[str], original_id: str, subject: str | None = None) -> dict:
    return _record(source, stable_id(source, question, answer, seen=seen), path, where, question, answer,
                   language,
                   original_id=original_id, subject=subject)


def _record(source: str, record_id: str, path, where, question: str, answer: str, language: str | None, *,
            original_id: str, subject: str | None = None, question_type: str | None = None) -> dict:
    info = SOURCE_INFO[source]
    try:
        return make_record(id=record_id, source=source, task="qa", language=language or info.language,
                           conversations=[{"from": "human", "value": question},
                                          {"from": "gpt", "value": answer}],
                           license=info.license, original_id=original_id, subject=subject,
                           **({"question_type": question_type} if question_type else {}))
    except RecordError as err:
        raise err.located(path=str(path), record=where) from None


def _optional(obj: dict, field: str, fail) -> str:
    value = obj.get(field)
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise fail(field, f"must be text, got {type(value).__name__}")
    return str(value).strip()


def _required(obj: dict, field: str, fail) -> str:
    if field not in obj:
        raise fail(field, f"missing (found fields: {sorted(k for k in obj if k)})")
    value = _optional(obj, field, fail)
    if not value:
        raise fail(field, "is empty")
    return value


def _mentalqa_types(value: str, fail) -> str | None:
    """``"['A', 'D']"`` (or ``"A, D"``) → ``"diagnosis, epidemiology"``."""
    text = value.strip()
    try:
        letters = (ast.literal_eval(text) if text.startswith("[")
                   else [p for p in text.split(",") if p.strip()])
    except (ValueError, SyntaxError):
        raise fail("final_QT", f"not a list of labels: {value!r:.80}") from None
    if not isinstance(letters, list) or not all(isinstance(x, str) and x.strip() in MENTALQA_TYPES
                                                for x in letters):
        raise fail("final_QT", f"labels {value!r:.80} are not among {sorted(MENTALQA_TYPES)}")
    return ", ".join(MENTALQA_TYPES[x.strip()] for x in letters) or None


def _xlsx_rows(path) -> Iterator[tuple]:
    """The rows of a workbook's first sheet as value tuples; a damaged workbook (bad zip, deflate stream or
    XML inside) raises `RecordError` naming the file, wherever openpyxl's lazy reading notices it."""
    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    damaged = (InvalidFileException, zipfile.BadZipFile, zlib.error, KeyError, IndexError, ValueError,
               TypeError,
               EOFError, SyntaxError)  # SyntaxError: the XML parsers' errors (ElementTree and lxml)

    def fail(err: BaseException) -> RecordError:
        return RecordError(f"cannot read as .xlsx ({type(err).__name__}: "
                           f"{str(err)[:200]}); re-save it from a "
                           "spreadsheet program or download it again", path=str(path))

    try:
        workbook = load_workbook(path, read_only=True, data_only=True)
    except damaged as err:
        raise fail(err) from None
    try:
        rows = iter(workbook.worksheets[0].iter_rows(values_only=True))
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except damaged as err:
                raise fail(err) from None
            yield row
    finally:
        workbook.close()


def _xml_text(node: ET.Element | None) -> str:
    """The element's text with the XML's line wrapping and indentation collapsed."""
    if node is None:
        return ""
    return re.sub(r"\s*\n\s*", " ", "".join(node.itertext())).strip()
