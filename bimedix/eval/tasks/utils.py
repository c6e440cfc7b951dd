"""Dataset loading and prompts shared by every ``bimedix_*`` lm-eval task (referenced as ``!function
utils.*``).

Each row of the evaluation data (see `bimedix.eval.bench`) has ``question``, ``options`` (list),
``answer`` (Latin letter), ``context`` (PubMedQA abstract, else empty) and ``language``.

Prompts (log-likelihood of each choice after the prompt; ``acc`` and ``acc_norm`` are reported):

- multiple choice, English::

      {question}
      A. {option A}
      B. {option B}
      ...
      Answer:            -> choices " A", " B", ...

Letters and cues come from `bimedix.core.conventions` (the training data uses the same ones).

- multiple choice, Arabic (Arabic option letters, right-to-left text)::

      {question}
      أ. {option A}
      ب. {option B}
      ...
      الإجابة:           -> choices " أ", " ب", ...

- PubMedQA, English: ``Abstract: {context}\\nQuestion: {question}\\nAnswer:`` -> " yes" / " no" / " maybe";
  Arabic: ``الملخص: {context}\\nالسؤال: {question}\\nالإجابة:`` -> " نعم" / " لا" / " ربما".
"""

from __future__ import annotations

from typing import Any

from bimedix.core.conventions import ANSWER_CUES, OPTION_LETTERS

_PUBMEDQA_CUES = {"en": ("Abstract:", "Question:"), "ar": ("الملخص:", "السؤال:")}


def load_bench(subset: str, language: str, data_dir: str | None = None, **_: Any):
    """Load one subset × language of the evaluation data as a ``DatasetDict`` with a ``test`` split.

    lm-eval calls this as ``custom_dataset`` with the task's ``dataset_kwargs`` and the
    ``TaskManager`` metadata (``data_dir``: a folder written by ``bimedix build-bench`` or a Hub
    dataset id; the bundled slice when unset). Extra metadata keys are ignored.
    """
    from bimedix.eval.bench import load_subset

    return load_subset(subset, language, data_dir)


def doc_to_text(doc: dict) -> str:
    """The prompt: question and lettered options (or abstract and question for PubMedQA), then the answer
    cue."""
    language = doc["language"]
    if doc["source"] == "pubmedqa":
        abstract, question = _PUBMEDQA_CUES[language]
        return f"{abstract} {doc['context']}\n{question} {doc['question']}\n{ANSWER_CUES[language]}"
    lines = [doc["question"].strip()]
    lines += [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS[language], doc["options"])]
    lines.append(ANSWER_CUES[language])
    return "\n".join(lines)


def doc_to_choice(doc: dict) -> list[str]:
    """What is scored: option letters for multiple choice, the option words (yes/no/maybe) for PubMedQA."""
    if doc["source"] == "pubmedqa":
        return list(doc["options"])
    return list(OPTION_LETTERS[doc["language"]][: len(doc["options"])])


def doc_to_target(doc: dict) -> int:
    """Index of the gold choice (the answer is stored as a Latin letter in both languages)."""
    return OPTION_LETTERS["en"].index(doc["answer"])
