"""The conventions shared from data to evaluation: language codes, option letters, answer cues, on-error
policies.

Defined once here and used by the converters and MCQA rendering (`bimedix.data.mcqa`), the translation prompts
and their invariants (`bimedix.llm`), and the lm-eval tasks (`bimedix/eval/tasks/utils.py`), so a model is
trained on the same letters and cues it is scored on.

Arabic multiple-choice items are lettered with the Arabic abjad letters ``أ ب ج د هـ و ...`` in training data
(converted and machine-translated alike) and in the Arabic evaluation prompts; the stored answer
(``meta.answer``, the benchmark rows' ``answer``) stays a Latin letter, an index into `OPTION_LETTERS`
``["en"]``. docs/evaluation.md says why.
"""

from __future__ import annotations

#: Language codes of records, benchmark rows and tasks.
LANGUAGES = ("en", "ar")

#: Option labels shown in prompts, per language (the abjad order for Arabic); the same index is the same
# option.
OPTION_LETTERS = {"en": ("A", "B", "C", "D", "E", "F", "G", "H", "I", "J"),
                  "ar": ("أ", "ب", "ج", "د", "هـ", "و", "ز", "ح", "ط", "ي")}

#: The cue after which a multiple-choice answer letter (or yes / no / maybe) is scored in evaluation prompts.
ANSWER_CUES = {"en": "Answer:", "ar": "الإجابة:"}

#: PubMedQA's answers per language, in the order of its English labels (``yes``, ``no``, ``maybe``).
PUBMEDQA_ANSWERS = {"en": ("yes", "no", "maybe"), "ar": ("نعم", "لا", "ربما")}

#: Words that introduce an option letter in running text ("the answer is B", "الخيار ب"), per language,
#: lower case; the Arabic list has the hamza-less spelling writers often use.
ANSWER_WORDS = {"en": ("answer", "option"), "ar": ("الإجابة", "الاجابة", "الخيار", "خيار")}

#: The ``--on-error`` policies of the readers and builders: stop at the first bad record (``raise``), or set
# it
#: aside in a rejects file and go on (``skip``); `bimedix.data.rejects.on_error_for` turns a name into an
# `OnError`.
ON_ERROR_POLICIES = ("raise", "skip")
