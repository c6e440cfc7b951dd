"""Arabic normalisation, exact/near-duplicate removal and benchmark decontamination."""

from __future__ import annotations

import json
import random

import pytest

from bimedix.data.arabic import normalize_arabic, normalize_for_match
from bimedix.data.decontam import BenchmarkIndex, BenchmarkItem, report_entry
from bimedix.data.dedup import Deduplicator, jaccard, optimal_bands, record_text


@pytest.mark.parametrize("text, expected", [
    ("مُسْتَشْفَى", "مستشفي"),                       # tashkeel stripped, alef maqsura → yaa
    ("أحمد إبراهيم آمنة ٱلله", "احمد ابراهيم امنة الله"),  # alef forms unified
    ("الـــدم", "الدم"),                              # tatweel
    ("عمره ٦٥ سنة، ۱۲ شهرا", "عمره 65 سنة، 12 شهرا"),   # Arabic-Indic and Persian digits
    ("Aspirin 5 mg", "Aspirin 5 mg"),                  # Latin text unchanged
])
def test_normalize_arabic(text, expected):
    assert normalize_arabic(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("What is the DOSE of  Aspirin? (5 mg)", "what is the dose of aspirin 5 mg"),
    ("ما هو العِلاجُ؟ الجرعة: ٥ ملغ", "ما هو العلاج الجرعة 5 ملغ"),
    ("snake_case\tand\nlines", "snake case and lines"),
])
def test_normalize_for_match(text, expected):
    assert normalize_for_match(text) == expected


def _record(id_: str, question: str, answer: str) -> dict:
    return {"id": id_, "conversations": [{"from": "human", "value": question},
                                         {"from": "gpt", "value": answer}]}


def _words(rng: random.Random, n: int) -> str:
    vocabulary = [f"term{i}" for i in range(500)]
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def test_dedup_removes_exact_and_near_duplicates_but_not_distinct_items():
    rng = random.Random(1)
    dedup = Deduplicator(num_perm=64, threshold=0.8, shingle=3)
    originals = [_record(f"r{i}", _words(rng, 20) + "?", _words(rng, 120)) for i in range(30)]
    assert all(dedup.check(record) is None for record in originals)  # distinct items are all kept
    exact = _record("copy", originals[3]["conversations"][0]["value"].upper() + " !",
                    originals[3]["conversations"][1]["value"])
    found = dedup.check(exact)
    assert found.kind == "exact" and found.kept_id == "r3"
    words = originals[7]["conversations"][1]["value"].split()
    words[50] = "changed"
    near = _record("near", originals[7]["conversations"][0]["value"], " ".join(words))
    found = dedup.check(near)
    assert found.kind == "near" and found.kept_id == "r7"
    assert dedup.check(_record("new", _words(rng, 20), _words(rng, 120))) is None


def test_dedup_arabic_variants_are_exact_duplicates():
    dedup = Deduplicator()
    assert dedup.check(_record("a", "ما هو علاج ارتفاع ضغط الدم عند مريض عمره 65 سنة؟",
                               "مثبطات الانزيم")) is None
    found = dedup.check(_record("b", "مَا هُوَ عِلاجُ ارتفاع ضغط الـدم عند مريض عمره ٦٥ سنة؟",
                                "مثبطات الإنزيم"))
    assert found is not None and found.kind == "exact" and found.kept_id == "a"


def test_optimal_bands_fit_threshold():
    bands, rows = optimal_bands(0.8, 64)
    assert bands * rows <= 64
    assert 0.7 < (1 / bands) ** (1 / rows) < 0.9  # the S-curve's midpoint sits near the threshold


QUESTION = ("A 30-year-old woman has fatigue, weight gain and cold intolerance for six months. Her TSH is "
            "elevated and free T4 is low. What is the most appropriate treatment?")
AR_QUESTION = "ما هو العلاج الأول لارتفاع ضغط الدم عند مريض عمره 65 سنة مصاب بالسكري والفشل الكلوي المزمن؟"


@pytest.fixture(scope="module")
def index() -> BenchmarkIndex:
    items = [BenchmarkItem("medqa-test", "medqa-1", "en", QUESTION, ("Levothyroxine", "Methimazole")),
             BenchmarkItem("mmlu-ar-test", "mmlu-ar-7", "ar", AR_QUESTION, ("حاصرات بيتا", "مدرات البول")),
             BenchmarkItem("medqa-test", "medqa-2", "en",
                           "Which of the following is the most likely diagnosis?",
                           ("Flu", "Cold"))]
    items += [BenchmarkItem("medqa-test", f"boiler-{i}", "en",
                            f"Which of the following is the most likely diagnosis? Case {i} of a sick child",
                            ()) for i in range(12)]
    return BenchmarkIndex(items, ngram=8, threshold=0.5, max_item_frequency=10)


def test_decontam_matches_english_question_and_keeps_a_clean_one(index):
    found = index.match(f"USER: I saw this on a forum: {QUESTION} A. "
                        "Levothyroxine B. Methimazole ASSISTANT: A")
    assert found is not None and found.item.id == "medqa-1" and found.overlap == 1.0
    clean = ("A 30-year-old woman asks how to take her thyroid tablets with breakfast and coffee every "
             "morning before work.")
    assert index.match(clean) is None


def test_decontam_matches_arabic_with_diacritics_and_indic_digits(index):
    pasted = "مَا هُوَ العِلاجُ الأوَّل لارتفاع ضغط الـدم عند مريض عمره ٦٥ سنة مصاب بالسكري والفشل الكلوي المزمن؟"
    found = index.match(pasted)
    assert found is not None and found.item.id == "mmlu-ar-7"
    assert index.match("ما هو العلاج الأول لالتهاب الحلق عند طفل عمره 5 سنوات مصاب بالحمى والسعال؟") is None


def test_decontam_ignores_boilerplate_ngrams(index):
    assert index.match("Which of the following is the most likely diagnosis? A. Migraine B. Stroke") is None


def test_report_entry_names_both_sides(index):
    record = {"id": "train-9", "source": "medqa", "task": "mcqa", "language": "en",
              "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt",
                                                                       "value": "Levothyroxine"}]}
    entry = report_entry(record, index.match(QUESTION), index.ngram)
    assert entry["id"] == "train-9" and entry["benchmark"] == "medqa-test"
    assert entry["benchmark_id"] == "medqa-1"
    assert entry["text"].startswith("A 30-year-old") and entry["benchmark_text"].startswith("A 30-year-old")
    assert "Levothyroxine" in entry["benchmark_text"] and 0.9 < entry["overlap"] < 1  # one option is missing
    json.dumps(entry)  # one JSON line


def test_build_report_names_both_sides(tmp_path, mixtral_tokenizer):
    from bimed_sources import AR_BENCH_QUESTION, BENCH_QUESTION, write_sources

    from bimedix.data.build import build_data

    recipe = write_sources(tmp_path / "sources")
    build_data(recipe, tmp_path / "out", on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    entries = {e["id"]: e for e in map(json.loads, (tmp_path / "out"
                                                    / "decontamination.jsonl").read_text().splitlines())}
    assert set(entries) == {"en-qa-leaked", "ar-qa-leaked"}
    assert entries["en-qa-leaked"]["benchmark"] == "medqa-test"
    assert entries["en-qa-leaked"]["benchmark_text"].startswith(BENCH_QUESTION[:40])
    assert entries["ar-qa-leaked"]["benchmark"] == "mmlu-ar-test"
    assert entries["ar-qa-leaked"]["benchmark_text"].startswith(AR_BENCH_QUESTION[:30])
    assert "٦٥" in entries["ar-qa-leaked"]["text"]


def test_decontam_short_question_needs_its_options():
    index = BenchmarkIndex([BenchmarkItem("medmcqa-dev", "m1", "en", "Metronidazole:",
                                          ("Has no side-effects", "Is used in management of ANUG",
                                           "Is mainly concentrated in saliva",
                                           "Is active against gram-positive aerobes"))])
    assert index.match("Metronidazole is an antibiotic; take it with food and avoid alcohol.") is None
    leaked = ("Metronidazole: A. Has no side-effects B. Is used in management of ANUG C. Is mainly "
              "concentrated in saliva D. Is active against gram-positive aerobes")
    assert index.match(leaked).item.id == "m1"


def test_decontam_real_benchmark_recall_and_precision(shared_data):
    """Every MedQA test item rendered as a training prompt (EN and AR prompts) is caught; Meadow QA is not."""
    from bimedix.data.converters import convert
    from bimedix.data.dedup import record_text
    from bimedix.data.mcqa import read_medqa

    path = shared_data / "medqa_usmle/data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl"
    index = BenchmarkIndex([BenchmarkItem("medqa-test", item.id, "en", item.question, tuple(item.options))
                            for item in read_medqa(path)])
    leaked = list(convert("medqa", path))
    assert len(leaked) == 1018 and all(index.match(record_text(r), normalized=True) for r in leaked)
    arabic_prompt = list(convert("medqa", path, language="ar"))[:100]  # Arabic template, English item text
    assert all(index.match(record_text(r), normalized=True) for r in arabic_prompt)
    meadow = list(convert("meadow", shared_data
                          / "medical_meadow_wikidoc_patient_info/medical_meadow_small.json"))
    assert sum(index.match(record_text(r), normalized=True) is not None for r in meadow[:2000]) == 0


def test_lsh_candidates_are_confirmed_by_exact_jaccard():
    rng = random.Random(2)
    texts = {}
    dedup = Deduplicator(num_perm=64, threshold=0.8, shingle=3, text_of=texts.__getitem__)
    kept = _record("kept", _words(rng, 10), _words(rng, 200))
    texts["ref-kept"] = record_text(kept)
    assert dedup.check(kept, ref="ref-kept") is None
    words = kept["conversations"][1]["value"].split()
    close = _record("close", kept["conversations"][0]["value"], " ".join(words[:190] + ["new"] * 10))
    assert dedup.check(close).kind == "near" and (dedup.candidates, dedup.confirmed) == (1, 1)
    # An LSH band can collide below the threshold: forced here by indexing the kept record's band keys.
    far = _record("far", kept["conversations"][0]["value"], " ".join(words[:100] + _words(rng, 100).split()))
    assert jaccard(dedup.shingles(record_text(far)), dedup.shingles(texts["ref-kept"])) < 0.8
    signature = dedup.signature(record_text(far))._replace(band_keys=dedup.band_keys(texts["ref-kept"]))
    assert dedup.check(far, signature=signature) is None
    assert (dedup.candidates, dedup.confirmed) == (2, 1)


def test_jaccard():
    import numpy as np

    assert jaccard(np.array([1, 2, 3]), np.array([2, 3,
                                                  4])) == 0.5 and jaccard(np.array([]), np.array([])) == 1.0
