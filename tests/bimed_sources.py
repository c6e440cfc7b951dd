"""Hand-made sources and a recipe for the build-data tests, with counts worked out by hand.

Sources (``records`` files are in the bimedix schema; ``medqa.jsonl`` and ``*_test.csv`` are in the
original MedQA / MMLU layouts and go through part A's converters and readers):

============  ======================================================================================
en_qa         10 distinct English QA + 1 exact duplicate + 1 near duplicate (one word changed in a
              120-word answer) + 1 record quoting a MedQA test item + 1 bad record (no `conversations`)
ar_qa         3 distinct Arabic QA + 1 record quoting the MMLU-Arabic test item with diacritics and
              Arabic-Indic digits (the benchmark file has neither)
en_mcqa       4 MedQA-format items (converter ``medqa``)
ar_mcqa       2 Arabic MCQA records
chat          2 English and 1 Arabic multi-turn chats
============  ======================================================================================

The recipe asks for the explicit per-task 1:2 ratio. After cleaning: QA 10 en / 3 ar, so 1:2 keeps 6 en
(4 dropped for the ratio); MCQA 4 en / 2 ar and chat 2 en / 1 ar are already 1:2. Written: en 12, ar 6
(mcqa 6, qa 9, chat 3); read 27 = written 18 + rejected 1 + deduplicated 2 + decontaminated 2 + dropped for
the ratio 4 (`EXPECTED`).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

BENCH_QUESTION = ("A 45-year-old man presents with crushing substernal chest pain radiating to the left arm "
                  "for two hours. His ECG shows ST elevation in leads II, III and aVF. Which coronary artery "
                  "is most likely occluded?")
BENCH_OPTIONS = {"A": "Right coronary artery", "B": "Left anterior descending artery",
                 "C": "Left circumflex artery",
                 "D": "Left main coronary artery"}
AR_BENCH_QUESTION = ("ما هو العلاج الأول لارتفاع ضغط الدم عند مريض عمره 65 سنة "
                     "مصاب بالسكري والفشل الكلوي المزمن؟")
AR_BENCH_OPTIONS = ["مثبطات الإنزيم المحول للأنجيوتنسين", "حاصرات بيتا", "مدرات البول الثيازيدية",
                    "حاصرات قنوات الكالسيوم"]
# The same question as a user might paste it: diacritics, tatweel and Arabic-Indic digits.
AR_CONTAMINATED = ("مَا هُوَ العِلاجُ الأوَّل لارتفاع ضغط الـدم عند مريض عمره ٦٥ سنة مصاب بالسكري والفشل "
                   "الكلوي المزمن؟ الخيارات: مثبطات الإنزيم المحول للأنجيوتنسين، حاصرات "
                   "بيتا، مدرات البول الثيازيدية، حاصرات قنوات الكالسيوم")

EXPECTED = {
    "configs": {"all": 18, "en": 12, "ar": 6, "mcqa": 6, "qa": 9, "chat": 3},
    "counts": {"read": 27, "written": 18, "rejected": 1, "excluded_review": 0, "deduplicated_exact": 1,
               "deduplicated_near": 1, "near_candidates": 1,
               "decontaminated": 2, "dropped_weight": 0, "dropped_ratio": 4},
}

_EN_WORDS = ("patient fever cough pain chest abdomen liver kidney heart lung blood pressure sugar insulin "
             "dose tablet infection virus bacteria antibiotic rash skin allergy asthma migraine nausea "
             "vomiting diarrhea fatigue anemia iron vitamin calcium bone fracture joint arthritis swelling "
             "thyroid hormone pregnancy child elderly sleep anxiety depression stroke seizure vision "
             "hearing ear throat tooth gum stomach ulcer reflux").split()
_AR_WORDS = ("مريض حمى سعال ألم صدر بطن كبد كلية قلب رئة دم ضغط سكر أنسولين جرعة قرص عدوى فيروس بكتيريا مضاد "
             "حيوي طفح جلد حساسية ربو صداع غثيان قيء إسهال تعب فقر حديد فيتامين كالسيوم عظم كسر مفصل تورم "
             "غدة هرمون حمل طفل نوم قلق اكتئاب سكتة نوبة بصر سمع أذن حلق سن معدة قرحة").split()


def _text(rng: random.Random, words: tuple | list, n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def _record(id_: str, language: str, task: str, turns: list[str], **meta) -> dict:
    conversations = [{"from": "human" if i % 2 == 0 else "gpt", "value": value} for i,
                     value in enumerate(turns)]
    return {"id": id_, "source": "handmade", "task": task, "language": language,
            "conversations": conversations,
            "license": "CC0-1.0", "meta": meta}


def write_sources(root: Path, *, with_bad_record: bool = True) -> Path:
    """Write the sources, benchmarks and ``recipe.yaml`` under ``root``; return the recipe path."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    en_qa = [_record(f"en-qa-{i}", "en", "qa", [_text(rng, _EN_WORDS, 25) + "?", _text(rng, _EN_WORDS, 120)])
             for i in range(10)]
    exact = json.loads(json.dumps(en_qa[1]))
    exact["id"] = "en-qa-exact-copy"
    # same after normalisation
    exact["conversations"][0]["value"] = exact["conversations"][0]["value"].upper() + "  "
    near = json.loads(json.dumps(en_qa[2]))
    near["id"] = "en-qa-near-copy"
    words = near["conversations"][1]["value"].split()
    words[60] = "hypothetically"
    near["conversations"][1]["value"] = " ".join(words)
    leaked = _record("en-qa-leaked", "en", "qa", [
        f"My exam prep question: {BENCH_QUESTION} Options: " + "; ".join(BENCH_OPTIONS.values()),
        "The right coronary artery supplies the inferior wall."])
    lines = [json.dumps(r) for r in [*en_qa[:5], exact, leaked, *en_qa[5:], near]]
    if with_bad_record:
        lines.insert(3, json.dumps({"id": "en-qa-bad", "source": "handmade", "task": "qa", "language": "en"}))
    (root / "en_qa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    ar_qa = [_record(f"ar-qa-{i}", "ar", "qa", [_text(rng, _AR_WORDS, 20) + "؟", _text(rng, _AR_WORDS, 60)])
             for i in range(3)]
    ar_qa.insert(1, _record("ar-qa-leaked", "ar", "qa", [AR_CONTAMINATED,
                                                         "مثبطات الإنزيم المحول للأنجيوتنسين."]))
    _write_jsonl(root / "ar_qa.jsonl", ar_qa)

    with open(root / "medqa.jsonl", "w", encoding="utf-8") as handle:
        for i in range(4):
            options = {letter: _text(rng, _EN_WORDS, 3) for letter in "ABCD"}
            handle.write(json.dumps({"question": f"Case {i}: " + _text(rng, _EN_WORDS, 30) + "?",
                                     "options": options,
                                     "answer": options["B"], "answer_idx": "B", "meta_info": "step1"}) + "\n")
    _write_jsonl(root / "ar_mcqa.jsonl", [
        _record(f"ar-mcqa-{i}", "ar", "mcqa", [_text(rng, _AR_WORDS, 20) + "؟ أ. نعم ب. لا", "الإجابة: أ"],
                options=["نعم", "لا"], answer="A") for i in range(2)])
    _write_jsonl(root / "chat.jsonl", [
        _record("chat-en-0", "en", "chat", [_text(rng, _EN_WORDS, 15), _text(rng, _EN_WORDS, 30),
                                            _text(rng, _EN_WORDS, 10), _text(rng, _EN_WORDS, 25)]),
        _record("chat-en-1", "en", "chat", [_text(rng, _EN_WORDS, 15), _text(rng, _EN_WORDS, 30),
                                            _text(rng, _EN_WORDS, 10), _text(rng, _EN_WORDS, 25),
                                            _text(rng, _EN_WORDS, 8), _text(rng, _EN_WORDS, 20)]),
        _record("chat-ar-0", "ar", "chat", [_text(rng, _AR_WORDS, 15), _text(rng, _AR_WORDS, 30),
                                            _text(rng, _AR_WORDS, 10), _text(rng, _AR_WORDS, 25)]),
    ])

    bench = root / "benchmarks"
    bench.mkdir(exist_ok=True)
    with open(bench / "medqa_test.jsonl", "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"question": BENCH_QUESTION, "options": BENCH_OPTIONS,
                                 "answer": BENCH_OPTIONS["A"],
                                 "answer_idx": "A", "meta_info": "step2&3"}) + "\n")
        other = {k: _text(rng, _EN_WORDS, 2) for k in "ABCD"}
        handle.write(json.dumps({"question": "Which of the following is the most likely diagnosis? "
                                             + _text(rng, _EN_WORDS, 20), "options": other,
                                 "answer": other["C"],
                                 "answer_idx": "C", "meta_info": "step1"}) + "\n")
    (bench / "mmlu_ar").mkdir(exist_ok=True)
    with open(bench / "mmlu_ar" / "clinical_knowledge_test.csv", "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerow([AR_BENCH_QUESTION, *AR_BENCH_OPTIONS, "A"])

    recipe = root / "recipe.yaml"
    recipe.write_text(
        "name: handmade-bimed\n"
        "description: Hand-made records for the build-data tests.\n"
        "sources_dir: .\n"
        "seed: 7\n"
        "shard_size: 4\n"
        "mix: {ar_en_ratio: '1:2'}\n"  # the explicit per-task ratio option (the default keeps English whole)
        "sources:\n"
        "  - {name: en_qa, converter: records, path: en_qa.jsonl}\n"
        "  - {name: ar_qa, converter: records, path: ar_qa.jsonl}\n"
        "  - {name: en_mcqa, converter: medqa, path: medqa.jsonl}\n"
        "  - {name: ar_mcqa, converter: records, path: ar_mcqa.jsonl}\n"
        "  - {name: chat, converter: records, path: chat.jsonl}\n"
        "decontaminate:\n"
        "  benchmarks:\n"
        "    - {name: medqa-test, reader: medqa, path: benchmarks/medqa_test.jsonl}\n"
        "    - {name: mmlu-ar-test, reader: mmlu, path: benchmarks/mmlu_ar, language: ar}\n",
        encoding="utf-8")
    return recipe


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
