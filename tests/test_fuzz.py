"""Fuzzing as a test: mutated real files through every converter, ``review import`` and the recipe loader.

Each case starts from a real file (the slices bundled in ``bimedix/data/bundled``, the fixtures in
``tests/fixtures/sources``, the shipped data recipes; a small file in the upstream layout for the three
sources nothing redistributable exists for) and applies one to three mutations drawn by hypothesis:
truncation, flipped bytes, another encoding, a dropped or duplicated field or column, a value replaced by a
spreadsheet formula, a path-like id or a value of another type. Every run must end either normally or in one
of the project's own errors naming the input file (never a traceback), leave its inputs byte-identical, and
account for every record: ``read = written + rejected``, checked against the files written (and, where the
format makes it unambiguous, against a count of the input's own records). ``derandomize=True`` makes CI runs
repeatable; the number of cases tried is printed in the test summary (`tests/conftest.py`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bimedix.cli import main
from bimedix.data.converters import CONVERTERS
from bimedix.resources import resource_path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sources"
BUNDLED = resource_path("bimedix", "data", "bundled")
EXAMPLES = int(os.environ.get("BIMEDIX_FUZZ_EXAMPLES", "30"))  # per command; raise it for a deeper local run
#: ``(command, cases)`` tried in this run and how the runs ended, printed by ``pytest_terminal_summary`` in
# conftest.py
TRIED: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()

INJECTIONS = ["=HYPERLINK(\"http://x\",\"y\")", "+1+2", "-2+3", "@SUM(A1:A2)", "\t=1", "\r=1",
              "=cmd|' /C calc'!A0",
              "../../etc/passwd", "/etc/passwd", "..\\..\\x", "C:\\Windows\\x", "a/../../b", "", " ", "\x00",
              "\u202e",
              "سؤال", "\ud800"]
OTHER_TYPES = [None, 0, -1, 1.5, True, [], {}, ["a"], {"a": 1}]
ENCODINGS = ["utf-16", "cp1256", "latin-1", "utf-8-sig", "utf-32"]


# --- seeds: (kind, bytes)
# ------------------------------------------------------------------------------------

def _lines(path: Path, count: int) -> bytes:
    return b"".join(path.read_bytes().splitlines(keepends=True)[:count])


def _pubmedqa() -> bytes:
    data = json.loads((BUNDLED / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    return json.dumps(dict(list(data.items())[:3]), ensure_ascii=False).encode()


def _medarabench() -> bytes:  # MedArabiQ's data may not ship: its header with two invented questions
    rows = [["Question Number", "Question", "Option A", "Option B", "Option C", "Option D", "Option E",
             "Option F",
             "Correct Answer", "Level", "Medical Specialty", "Group", "umbrella_specialty"],
            ["1", "ما هو العضو المسؤول عن ضخ الدم؟", "الكبد", "القلب", "الرئة", "الكلية", "", "", "B", "1",
             "Anatomy",
             "g", "u"],
            ["2", "أي فيتامين يذوب في الدهون؟", "ج", "ب12", "د", "ب1", "", "", "c", "1", "Nutrition", "g",
             "u"]]
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode()


def _liveqa() -> bytes:  # the TREC-2017 test layout; the real file is not redistributable
    return (b'<?xml version="1.0" encoding="UTF-8"?><LiveQA-Med-Test>'
            b'<NLM-QUESTION qid="TQ1"><Original-Question><SUBJECT>anemia</SUBJECT><MESSAGE>What causes '
            b'it?</MESSAGE></Original-Question><Annotations><FOCUS>anemia</FOCUS></Annotations><ReferenceAnswers>'
            b'<ReferenceAnswer aid="1"><ANSWER>Low iron is a common cause.</ANSWER></ReferenceAnswer>'
            b'</ReferenceAnswers></NLM-QUESTION>'
            b'<NLM-QUESTION qid="TQ2"><Original-Question><MESSAGE>Dose of '
            b'aspirin?</MESSAGE></Original-Question><ReferenceAnswers><RefAnswer aid="2"><ANSWER>Ask your '
            b'pharmacist.</ANSWER></RefAnswer></ReferenceAnswers></NLM-QUESTION></LiveQA-Med-Test>')


def _medicationqa() -> bytes:  # the MedicationQA layout; the real workbook has no licence to ship
    from openpyxl import Workbook

    workbook = Workbook()
    for row in (["Question", "Focus (Drug)", "Question Type", "Answer"],
                ["what is metformin for", "metformin", "Usage", "It lowers blood glucose."],
                ["how much ibuprofen", "ibuprofen", "Dose", "Follow the label."]):
        workbook.active.append(row)
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


SEEDS = {
    "pubmedqa": ("json", "ori_pqal.json", _pubmedqa),
    "medmcqa": ("jsonl", "dev.json", lambda: _lines(BUNDLED / "medmcqa" / "dev.json", 4)),
    "medqa": ("jsonl", "test.jsonl", lambda: _lines(BUNDLED / "medqa" / "phrases_no_exclude_test.jsonl", 4)),
    "mmlu": ("csv", "anatomy_dev.csv", lambda: _lines(BUNDLED / "mmlu" / "dev" / "anatomy_dev.csv", 4)),
    "mmlu-ar": ("csv", "anatomy_dev.csv", lambda: _lines(BUNDLED / "mmlu_arabic" / "dev" / "anatomy_dev.csv",
                                                         4)),
    "mentalqa": ("tsv", "Train_Dev.tsv", lambda: _lines(BUNDLED / "mentalqa" / "Train_Dev.tsv", 5)),
    "healthcaremagic": ("json", "HealthCareMagic-100k.json", (FIXTURES
                                                              / "HealthCareMagic-100k.json").read_bytes),
    "icliniq": ("json", "iCliniq.json", (FIXTURES / "iCliniq.json").read_bytes),
    "meadow": ("json", "medical_meadow_flashcards.json", (FIXTURES
                                                          / "medical_meadow_flashcards.json").read_bytes),
    "umls": ("json", "umls_release.json", (FIXTURES / "umls_release.json").read_bytes),
    "medarabench": ("csv", "medarabench.csv", _medarabench),
    "liveqa": ("xml", "live.xml", _liveqa),
    "medicationqa": ("xlsx", "meds.xlsx", _medicationqa),
}


def test_every_converter_is_fuzzed():
    assert set(SEEDS) == set(CONVERTERS)


# --- mutations
# -----------------------------------------------------------------------------------------------

@st.composite
def mutated(draw, seed: bytes, kind: str) -> bytes:
    """``seed`` after one to three mutations (byte-level for every kind, structural where the kind allows)."""
    data = seed
    structural = {"json": _mutate_json, "jsonl": _mutate_jsonl, "csv": _mutate_delimited,
                  "tsv": _mutate_delimited,
                  "xml": _mutate_text, "yaml": _mutate_text}.get(kind)
    operations = ["truncate", "flip", "encoding"] + (["structure"] * 3 if structural else [])
    for operation in draw(st.lists(st.sampled_from(operations), min_size=1, max_size=3)):
        if operation == "truncate":
            data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
        elif operation == "flip":
            for _ in range(draw(st.integers(1, 4))):
                if data:
                    at = draw(st.integers(0, len(data) - 1))
                    data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
        elif operation == "encoding":
            data = data.decode("utf-8", "replace").encode(draw(st.sampled_from(ENCODINGS)), "replace")
        else:
            data = structural(draw, data, kind)
    return data


def _value(draw):
    return draw(st.one_of(st.sampled_from(INJECTIONS), st.sampled_from(OTHER_TYPES)))


def _mutate_record(draw, record):
    """Drop, duplicate (as a raw duplicate key) or replace one field of a JSON object; returns JSON text."""
    if not isinstance(record, dict) or not record:
        return json.dumps(_value(draw), ensure_ascii=False)
    key = draw(st.sampled_from(sorted(record)))
    action = draw(st.sampled_from(["drop", "duplicate", "replace"]))
    if action == "drop":
        return json.dumps({k: v for k, v in record.items() if k != key}, ensure_ascii=False)
    if action == "replace":
        return json.dumps({**record, key: _value(draw)}, ensure_ascii=False)
    text = json.dumps(record, ensure_ascii=False)
    extra = json.dumps({key: _value(draw)}, ensure_ascii=False)[1:-1]
    return text[:-1] + ", " + extra + "}"


def _mutate_json(draw, data: bytes, kind: str) -> bytes:
    try:
        document = json.loads(data)
    except ValueError:
        return _mutate_text(draw, data, kind)
    entries = list(document.items()) if isinstance(document, dict) else list(enumerate(document)) \
        if isinstance(document, list) else []
    if not entries:
        return _mutate_text(draw, data, kind)
    index = draw(st.integers(0, len(entries) - 1))
    action = draw(st.sampled_from(["field", "drop-record", "duplicate-record", "path-like-key"]))
    parts = [json.dumps(value, ensure_ascii=False) for _, value in entries]
    keys = [str(key) for key, _ in entries]
    if action == "field":
        parts[index] = _mutate_record(draw, entries[index][1])
    elif action == "drop-record":
        del parts[index], keys[index]
    elif action == "duplicate-record":
        parts.insert(index, parts[index])
        keys.insert(index, keys[index])
    else:
        keys[index] = draw(st.sampled_from(INJECTIONS[7:12]))
    if isinstance(document, dict):
        body = ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {v}" for k, v in zip(keys, parts))
        return ("{" + body + "}").encode("utf-8", "surrogatepass")
    return ("[" + ", ".join(parts) + "]").encode("utf-8", "surrogatepass")


def _mutate_jsonl(draw, data: bytes, kind: str) -> bytes:
    lines = data.splitlines()
    if not lines:
        return data
    index = draw(st.integers(0, len(lines) - 1))
    try:
        record = json.loads(lines[index])
    except ValueError:
        return _mutate_text(draw, data, kind)
    action = draw(st.sampled_from(["field", "drop-line", "duplicate-line"]))
    if action == "field":
        lines[index] = _mutate_record(draw, record).encode("utf-8", "surrogatepass")
    elif action == "drop-line":
        del lines[index]
    else:
        lines.insert(index, lines[index])
    return b"\n".join(lines) + b"\n"


def _mutate_delimited(draw, data: bytes, kind: str) -> bytes:
    delimiter = "\t" if kind == "tsv" else ","
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), delimiter=delimiter))
    except (UnicodeDecodeError, csv.Error):
        return _mutate_text(draw, data, kind)
    if not rows:
        return data
    row = draw(st.integers(0, len(rows) - 1))
    cells = rows[row]
    action = draw(st.sampled_from(["drop-cell", "duplicate-cell", "replace-cell", "drop-row",
                                   "duplicate-row"]))
    if action == "drop-row":
        del rows[row]
    elif action == "duplicate-row":
        rows.insert(row, list(cells))
    elif cells:
        column = draw(st.integers(0, len(cells) - 1))
        if action == "drop-cell":
            del cells[column]
        elif action == "duplicate-cell":
            cells.insert(column, cells[column])
        else:
            cells[column] = str(draw(st.sampled_from(INJECTIONS)))
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return out.getvalue().encode("utf-8", "surrogatepass")


def _mutate_text(draw, data: bytes, kind: str) -> bytes:
    """Insert an injection string, or delete a span, at a drawn position."""
    if not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    if draw(st.booleans()):
        return data[:at] + str(draw(st.sampled_from(INJECTIONS))).encode("utf-8", "surrogatepass") + data[at:]
    return data[:at] + data[at + draw(st.integers(1, 40)):]


# --- running a case
# ------------------------------------------------------------------------------------------

def _run(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; an exception other than the CLI's own errors escapes and fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]


def _jsonl_count(path: Path) -> int:
    return sum(1 for line in path.read_bytes().splitlines() if line.strip()) if path.exists() else 0


def _expected_read(source: str, kind: str, data: bytes) -> int | None:
    """The input's record count where the format leaves no doubt, else ``None``."""
    if kind == "jsonl":  # records end at b"\n" only (a stray \r inside a record is the record's problem)
        return sum(1 for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
                   if line.decode("utf-8", "replace").strip())
    if kind == "json" and source != "pubmedqa":
        try:
            document = json.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
        except ValueError:
            return None
        if not isinstance(document, list):
            return None
        return sum(1 for item in document if not (source == "umls" and isinstance(item, dict)
                                                   and item.get("source", "umls") != "umls"))
    return None


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("source", sorted(SEEDS))
def test_mutated_inputs_through_convert(source):
    kind, name, make = SEEDS[source]
    seed = make()

    @SETTINGS
    @given(data=mutated(seed, kind))
    def case(data: bytes) -> None:
        TRIED[f"convert {source}"] += 1
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            path, output = folder / name, folder / "out" / "records.jsonl"
            path.write_bytes(data)
            before = _digest(path)
            code, out, err = _run(["convert", source, "--input", str(path), "--output", str(output),
                                   "--on-error", "skip"])
            assert _digest(path) == before, "the input file was modified"
            OUTCOMES["a clear error" if code else "completed"] += 1
            if code != 0:
                assert code == 2 and str(path) in err, err
                assert not output.exists()
                return
            written, rejected = _jsonl_count(output), _jsonl_count(output.with_name("records.rejects.jsonl"))
            match = re.search(r"read (\d+), written (\d+), rejected (\d+)", out)
            assert match and tuple(map(int, match.groups())) == (written + rejected, written, rejected), out
            expected = _expected_read(source, kind, data)
            if expected is not None:
                assert written + rejected == expected, \
                    f"read {expected} != written {written} + rejected {rejected}"

    case()


def test_mutated_review_files_through_review_import(tmp_path):
    from llm_support import mcqa_record, write_jsonl

    from bimedix.data.schema import make_record
    from bimedix.llm.review import export_review_queue
    from bimedix.llm.translation import arabic_id

    english = write_jsonl(tmp_path / "en.jsonl", [mcqa_record(i) for i in range(3)])
    translated = write_jsonl(tmp_path / "ar.jsonl", [make_record(
        id=arabic_id(f"demo-en-{i:03d}"), source="demo", task="mcqa", language="ar", license="MIT",
        conversations=[{"from": "human", "value": f"سؤال {i}\nA. أ\nB. ب"}, {"from": "gpt", "value": "B. ب"}],
        options=["أ", "ب"], answer="B", translation={"model": "m", "score": 50, "rounds": 1,
                                                     "reviewed": False,
                                                       "review_state": "queued",
                                                     "source_id": f"demo-en-{i:03d}"})
        for i in range(3)])
    seeds = {}
    for suffix in ("csv", "jsonl"):
        queue = tmp_path / f"queue.{suffix}"
        export_review_queue(translated, queue, source=english, fraction=1.0, seed=0)
        text = queue.read_text(encoding="utf-8-sig")
        seeds[suffix] = text.replace(",,", ",approve,", 1).encode() if suffix == "csv" else text.encode()
    inputs = sum(1 for line in translated.read_text().splitlines() if line.strip())

    @SETTINGS
    @given(suffix=st.sampled_from(["csv", "jsonl"]), data=st.data())
    def case(suffix: str, data) -> None:
        reviews_bytes = data.draw(mutated(seeds[suffix], "csv" if suffix == "csv" else "jsonl"))
        TRIED["review import"] += 1
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            reviews, output = folder / f"reviews.{suffix}", folder / "reviewed.jsonl"
            reviews.write_bytes(reviews_bytes)
            before = _digest(reviews, translated)
            code, _, err = _run(["review", "import", "--input", str(translated), "--reviews", str(reviews),
                                 "--output", str(output), "--reviewer", "fuzz"])
            assert _digest(reviews, translated) == before, "an input file was modified"
            OUTCOMES["a clear error" if code else "completed"] += 1
            if code != 0:
                assert code == 2 and str(reviews) in err, err
                assert not output.exists()
                return
            assert _jsonl_count(output) == inputs  # every record read is written (reviewed or not)

    case()


@pytest.mark.parametrize("recipe", ["mini", "bimed1.3m"])
def test_mutated_data_recipes_through_the_loader(recipe):
    from bimedix.data.recipe import load_data_recipe

    seed = resource_path("recipes", "data", f"{recipe}.yaml").read_bytes()

    @SETTINGS
    @given(data=mutated(seed, "yaml"))
    def case(data: bytes) -> None:
        TRIED["data recipe loader"] += 1
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "recipe.yaml"
            path.write_bytes(data)
            before = _digest(path)
            try:
                loaded = load_data_recipe(path)
            except (ValueError, OSError) as err:
                OUTCOMES["a clear error"] += 1
                assert str(path) in str(err), err
            else:
                OUTCOMES["completed"] += 1
                assert loaded.sources and loaded.name
            assert _digest(path) == before

    case()
