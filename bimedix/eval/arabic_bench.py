"""The Arabic benchmark (``BiMediX/arabic-bench``): its rows from translated records or BiMediX's Hub files,
and a `datasets` builder (its dataset card comes from `bimedix.hub.cards`).

BiMediX published its Arabic evaluation sets as ``BiMediX/medqa-test_arabic``, ``BiMediX/medmcqa-arabic``,
``BiMediX/pubmedqa-test_arabic`` and ``BiMediX/mmlu-<subject>-arabic``. `import_bimedix_arabic` reads a
folder holding local copies of them (one sub-folder per Hub repository, as ``hf download --local-dir``
writes them) in the column layout of the English Hub datasets they translate (MedQA-USMLE-4-options,
MedMCQA, PubMedQA ``pqa_labeled``, ``cais/mmlu``); the tests use fixtures in that layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from bimedix.core.conventions import OPTION_LETTERS
from bimedix.data.mcqa import PROMPTS
from bimedix.data.review_policy import ReviewPolicy

from .bench import (
    EXTRA_SUBSETS,
    MMLU_SUBJECTS,
    PAPER_SUBSETS,
    PUBMEDQA_OPTIONS,
    make_row,
    row_features,
    row_id,
    subset_of,
)

logger = logging.getLogger(__name__)

BIMEDIX_ENGINE = "BiMediX semi-automated translation (GPT-3.5 + expert review)"


def rows_from_records(records: Iterable[dict], review: ReviewPolicy | None = None,
                      path: str | Path | None = None) -> Iterator[dict]:
    """Arabic bench rows from translated MCQA records (`bimedix.data.schema` records, ``language: ar``).

    Only records the review policy admits become rows (`bimedix.data.review_policy`; by default rejected,
    pending and below-threshold translations are left out); ``review`` counts them, ``path`` names the file
    in errors.

    The question is the human turn without its option lines; options, answer letter and translation
    provenance (model, score, reviewed) come from ``meta``. Records that are not Arabic MCQA of a bench
    subset are skipped; the row ``id`` is ``<subset>-<meta.original_id>``, the id of its English twin.
    """
    review = ReviewPolicy() if review is None else review
    for record in records:
        meta = record.get("meta") or {}
        if record.get("language") != "ar" or record.get("task") != "mcqa" or not meta.get("options"):
            continue
        source = record["source"]
        if source.startswith("mmlu"):
            source, subject = "mmlu", (meta.get("subject") or source.removeprefix("mmlu_")).replace(" ", "_")
        else:
            subject = meta.get("subject") or source
        subset = f"mmlu_{subject}" if source == "mmlu" else source
        if subset not in PAPER_SUBSETS:
            continue
        if not review.admits(record, path=path):
            continue
        translation = meta.get("translation") or {}
        human = next(turn["value"] for turn in record["conversations"] if turn["from"] == "human")
        question, context = _split_prompt(human, meta["options"])
        options = PUBMEDQA_OPTIONS["ar"] if subset == "pubmedqa" else meta["options"]
        yield make_row(id=row_id(subset, meta.get("original_id") or record["id"]), language="ar",
                       source=source,
                       subject=subject, question=question, context=context, options=options,
                       answer=meta["answer"], license=record.get("license"),
                       engine=translation.get("model") or "unknown", score=translation.get("score"),
                       reviewed=bool(translation.get("reviewed")))


def import_bimedix_arabic(folder: str | Path) -> Iterator[dict]:
    """Arabic bench rows from local copies of BiMediX's published Arabic evaluation sets.

    Args:
        folder (`str | Path`): holds any of ``medqa-test_arabic/``, ``medmcqa-arabic/``,
            ``pubmedqa-test_arabic/``, ``mmlu-<subject>-arabic/`` (Parquet, JSON Lines or CSV inside).

    Answer letters and option counts are kept as published; rows are labelled as BiMediX's reviewed
    translation.
    """
    folder = Path(folder)
    repos = {"medqa-test_arabic": ("medqa", _medqa_row), "medmcqa-arabic": ("medmcqa", _medmcqa_row),
             "pubmedqa-test_arabic": ("pubmedqa", _pubmedqa_row)}
    repos |= {f"mmlu-{s.replace('_', '-')}-arabic": (f"mmlu_{s}", _mmlu_row) for s in MMLU_SUBJECTS}
    found = False
    for name, (subset, convert) in repos.items():
        path = folder / name
        if not path.is_dir():
            continue
        found = True
        dataset = datasets.load_dataset(str(path))
        split = "test" if "test" in dataset else next(iter(dataset))
        for index, raw in enumerate(dataset[split]):
            try:
                yield convert(raw, index, subset)
            except (KeyError, ValueError, TypeError) as err:
                raise ValueError(f"{path}: row {index}: not in the published {name} column layout "
                                 f"({type(err).__name__}: {err}); columns: {sorted(raw)}") from err
    if not found:
        raise FileNotFoundError(f"{folder} holds none of BiMediX's Arabic sets ({', '.join(sorted(repos))})")


@dataclass
class ArabicBenchConfig(datasets.BuilderConfig):
    """One config of the Arabic benchmark: a subset name, ``all``, or ``medarabench``.

    Args:
        sources (`str`, *optional*): folder of original benchmark files (for AceGPT MMLU-Arabic, MedAraBench).
        translations (`str`, *optional*): JSON Lines of translated records (`rows_from_records`).
        bimedix_arabic (`str`, *optional*): folder of BiMediX's published Arabic sets
            (`import_bimedix_arabic`).
    """

    sources: str | None = None
    translations: str | None = None
    bimedix_arabic: str | None = None


class ArabicBench(datasets.GeneratorBasedBuilder):
    """`datasets` builder of the Arabic benchmark from local files; same rows as ``bimedix build-bench``.

    Examples:

    ```python
    builder = ArabicBench(config_name="medqa", bimedix_arabic="downloads/")
    builder.download_and_prepare()
    test = builder.as_dataset(split="test")
    ```
    """

    BUILDER_CONFIG_CLASS = ArabicBenchConfig
    BUILDER_CONFIGS = [ArabicBenchConfig(name=n) for n in [*PAPER_SUBSETS, "all", *EXTRA_SUBSETS]]

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="BiMediX Arabic medical benchmark", features=row_features())

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        return [datasets.SplitGenerator(name=datasets.Split.TEST)]

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        wanted = set(PAPER_SUBSETS) if self.config.name == "all" else {self.config.name}
        for row in collect_arabic_rows(self.config.sources, self.config.translations,
                                       self.config.bimedix_arabic):
            if subset_of(row) in wanted:
                yield f"{subset_of(row)}/{row['id']}", row


def collect_arabic_rows(sources: str | Path | None = None, translations: str | Path | None = None,
                        bimedix_arabic: str | Path | None = None, review: ReviewPolicy
                        | None = None) -> Iterator[dict]:
    """All Arabic rows from the given inputs: AceGPT MMLU-Arabic and MedAraBench under ``sources``,
    translated records that pass ``review`` (default: the strict `ReviewPolicy`), and BiMediX's Hub files
    (later inputs replace earlier rows with the same ``id``)."""
    rows: dict[str, dict] = {}
    if sources is not None:
        from .bench import read_sources

        for (_, language), subset_rows in read_sources(Path(sources)):
            if language == "ar":
                rows |= {row["id"]: row for row in subset_rows}
    if translations is not None:
        from bimedix.data.schema import read_records

        rows |= {row["id"]: row for row in rows_from_records(read_records(translations), review,
                                                             translations)}
    if bimedix_arabic is not None:
        rows |= {row["id"]: row for row in import_bimedix_arabic(bimedix_arabic)}
    yield from rows.values()


# ----------------------------------------------------------------------------- private helpers

def _split_prompt(text: str, options: list[str]) -> tuple[str, str]:
    """Question and context of a human turn rendered by `bimedix.data.mcqa.render_mcqa` (either language).

    Falls back to the text before the first option line when the turn does not follow those prompts.
    """

    for prompts in PROMPTS.values():
        for kind in ("question", "context"):
            pattern = re.escape(prompts[kind]).replace(r"\{question\}", "(?P<question>.*?)")
            pattern = pattern.replace(r"\{options\}", ".*").replace(r"\{context\}", "(?P<context>.*?)")
            match = re.fullmatch(pattern, text.strip(), flags=re.DOTALL)
            if match:
                return match["question"].strip(), (match.groupdict().get("context") or "").strip()
    lines = text.strip().splitlines()
    first = options[0].strip() if options else None
    cut = next((i for i, line in enumerate(lines) if i and first and first in line), len(lines))
    return "\n".join(lines[:cut]).strip(), ""


def _bimedix_row(subset: str, row_id: str, question: str, options: list[str], answer: str, subject: str,
                 context: str = "") -> dict:
    if answer not in OPTION_LETTERS["en"][: len(options)]:
        raise ValueError(f"answer {answer!r} is not one of the {len(options)} option letters")
    return make_row(id=row_id, language="ar", source="mmlu" if subset.startswith("mmlu") else subset,
                    subject=subject, question=question, context=context, options=options, answer=answer,
                    license="CC-BY-NC-SA-4.0", engine=BIMEDIX_ENGINE, reviewed=True)


def _medqa_row(raw: dict, index: int, subset: str) -> dict:
    options = raw["options"]
    if isinstance(options, dict):
        options = [options[key] for key in sorted(options)]
    return _bimedix_row(subset, row_id(subset, index + 1), raw["question"], list(options),
                        raw["answer_idx"].strip(),
                        raw.get("meta_info") or "medqa")


def _medmcqa_row(raw: dict, index: int, subset: str) -> dict:
    options = [raw["opa"], raw["opb"], raw["opc"], raw["opd"]]
    return _bimedix_row(subset, row_id(subset, raw["id"]), raw["question"], options,
                        OPTION_LETTERS["en"][int(raw["cop"])],
                        raw.get("subject_name") or "medmcqa")


def _pubmedqa_row(raw: dict, index: int, subset: str) -> dict:
    context = raw["context"]
    contexts = context["contexts"] if isinstance(context, dict) else [context]
    answer = OPTION_LETTERS["en"][PUBMEDQA_OPTIONS["en"].index(raw["final_decision"].strip().lower())]
    return _bimedix_row(subset, row_id(subset, raw["pubid"]), raw["question"], PUBMEDQA_OPTIONS["ar"], answer,
                        "pubmedqa", context="\n".join(contexts))


def _mmlu_row(raw: dict, index: int, subset: str) -> dict:
    subject = subset.removeprefix("mmlu_")
    return _bimedix_row(subset, row_id(subset, index + 1), raw["question"], list(raw["choices"]),
                        OPTION_LETTERS["en"][int(raw["answer"])], subject)

