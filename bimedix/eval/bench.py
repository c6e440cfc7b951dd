"""The evaluation data: build it from the original benchmark files, lay it out Hub-ready, load one subset.

A bench folder (written by `build_bench`, shipped as a small slice in ``bimedix/eval/data``) is one
Hub-style dataset whose configs are ``<subset>_<en|ar>``; its ``arabic-bench/`` sub-folder is the
stand-alone Arabic benchmark (configs one per subset plus ``all``), ready to push as
``BiMediX/arabic-bench``::

    OUT/README.md                       configs: mmlu_anatomy_en, ..., medqa_ar, ...
    OUT/english/<subset>/test.parquet
    OUT/arabic-bench/README.md          configs: mmlu_anatomy, ..., pubmedqa, all (+ medarabench)
    OUT/arabic-bench/<subset>/test.parquet

Every row has the same columns (`ROW_FEATURES`); English and Arabic rows of one question share ``id``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset

from bimedix.data import mcqa
from bimedix.resources import resource_path

from ..core.conventions import LANGUAGES, OPTION_LETTERS, PUBMEDQA_ANSWERS
from ..core.io import atomic_open
from ..core.outputs import OutputFolder, safe_name
from ..data.dataset_readme import configs_readme

logger = logging.getLogger(__name__)

MMLU_SUBJECTS = ("clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                 "professional_medicine", "anatomy")
# The nine subsets in the column order of the paper's Tables 2-4, with the paper's column labels.
PAPER_SUBSETS = {
    "mmlu_clinical_knowledge": "Cli-KG",
    "mmlu_college_biology": "C-Bio",
    "mmlu_college_medicine": "C-Med",
    "mmlu_medical_genetics": "Med-Gen",
    "mmlu_professional_medicine": "Pro-Med",
    "mmlu_anatomy": "Ana",
    "medmcqa": "MedMCQA",
    "medqa": "MedQA",
    "pubmedqa": "PubmedQA",
}
EXTRA_SUBSETS = ("medarabench",)  # Arabic only, research use (no licence stated upstream)
PUBMEDQA_OPTIONS = {language: list(answers) for language, answers in PUBMEDQA_ANSWERS.items()}
ENGLISH_DIR, ARABIC_DIR = "english", "arabic-bench"

# Original relative paths under --sources (the layout of ../shared/data and of the upstream repositories).
SOURCE_PATHS = {
    "mmlu_en": "mmlu_medical/data/test/{subject}_test.csv",
    "mmlu_ar": "mmlu_medical_arabic_acegpt/MMLUArabic/test/{subject}_test.csv",
    "medmcqa": "medmcqa/data/dev.json",
    "medqa": "medqa_usmle/data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl",
    "pubmedqa": "pubmedqa/data/ori_pqal.json",
    "pubmedqa_truth": "pubmedqa/data/test_ground_truth.json",
    "medarabench": "medarabench/medarabench-test_split.csv",
}
ACEGPT_ENGINE = "AceGPT MMLUArabic (GPT machine translation)"


#: The columns the lm-eval tasks read (`bimedix.eval.tasks.utils`).
TASK_COLUMNS = ("id", "language", "source", "question", "context", "options", "answer")


def row_features():
    """The `datasets.Features` of every bench row (English and Arabic alike)."""

    return Features({
        "id": Value("string"),
        "language": Value("string"),
        "source": Value("string"),
        "subject": Value("string"),
        "question": Value("string"),
        "context": Value("string"),
        "options": List(Value("string")),
        "answer": Value("string"),
        "translation_engine": Value("string"),
        "translation_score": Value("float32"),
        "translation_reviewed": Value("bool"),
        "provenance": Value("string"),
        "license": Value("string"),
    })


def make_row(*, id: str, language: str, source: str, subject: str, question: str, options: list[str],
             answer: str, context: str = "", license: str | None = None, engine: str | None = None,
             score: float | None = None, reviewed: bool | None = None) -> dict:
    """Build one bench row; ``provenance`` says whether the text is original or a (reviewed) machine
    translation."""
    if engine is None:
        provenance = "original"
    else:
        provenance = "machine-translated, reviewed" if reviewed else "machine-translated, unreviewed"
    return {"id": id, "language": language, "source": source, "subject": subject, "question": question,
            "context": context or "", "options": list(options), "answer": answer,
            "translation_engine": engine, "translation_score": score, "translation_reviewed": reviewed,
            "provenance": provenance, "license": license}


def build_bench(sources: str | Path, output: str | Path, *, limit: int | None = None,
                subsets: Iterable[str] | None = None, arabic_rows: Iterable[dict] = (),
                on_error: Callable[[Exception], None] | None = None) -> dict[str, int]:
    """Build a bench folder from the original benchmark files found under ``sources``.

    Every source present is used; missing ones are skipped with an INFO message. English subsets come
    from the originals; Arabic MMLU from AceGPT's MMLUArabic (rows paired with the English ones, rows
    corrupted upstream dropped); other Arabic subsets from ``arabic_rows`` (translated records or an
    import of BiMediX's Hub files, see `bimedix.eval.arabic_bench`); MedAraBench as its own config.

    Args:
        sources (`str | Path`): folder holding the originals under their original relative paths.
        output (`str | Path | OutputFolder`): the bench folder to write (created; Parquet files of an earlier
            build are replaced or, for subsets not built now, removed; files it did not write are kept).
        limit (`int`, *optional*): keep the first ``limit`` rows per subset (the bundled slice uses 15).
        subsets (`Iterable[str]`, *optional*): build only these subsets (default: every one found).
        arabic_rows (`Iterable[dict]`, *optional*): extra Arabic rows (`make_row` shape) to add.
        on_error (`Callable`, *optional*): called with each bad source record; by default it raises.

    Returns:
        `dict[str, int]`: rows written per config (``<subset>_<language>``).
    """
    sources = Path(sources)
    if not isinstance(output, OutputFolder):
        output = OutputFolder(output, "build-bench", inputs=source_inputs(sources))
    if not sources.is_dir():
        raise FileNotFoundError(f"--sources {sources} is not a folder")
    tables: dict[tuple[str, str], list[dict]] = {}
    wanted = None if subsets is None else set(subsets)
    if wanted is not None and wanted - set(PAPER_SUBSETS) - set(EXTRA_SUBSETS):
        raise ValueError(f"unknown subset(s) {sorted(wanted - set(PAPER_SUBSETS) - set(EXTRA_SUBSETS))}; "
                         f"choose from {[*PAPER_SUBSETS, *EXTRA_SUBSETS]}")
    for (subset, language), rows in read_sources(sources, on_error, subsets=wanted):
        tables[subset, language] = rows
    extra: dict[tuple[str, str], dict[str, dict]] = {}
    for row in arabic_rows:
        extra.setdefault((subset_of(row), "ar"), {})[row["id"]] = row
    for key, rows in extra.items():  # imported / translated rows replace rows with the same id
        tables[key] = list(({row["id"]: row for row in tables.get(key, [])} | rows).values())
    if not tables:
        raise ValueError(f"no benchmark file found under {sources}; expected any of "
                         f"{sorted(set(SOURCE_PATHS.values()))} (the layout of the original repositories)")
    if wanted is not None:
        tables = {key: rows for key, rows in tables.items() if key[0] in wanted}
    _pair_arabic_with_english(tables)
    if limit is not None:
        tables = _first_paired(tables, limit)
    return write_bench(tables, output)


def source_inputs(sources: str | Path) -> dict[str, Path]:
    """Label → path of each original benchmark file (or folder) `build_bench` may read under ``sources``."""
    # {subject}: the folder
    relatives = {relative.split("{")[0].rstrip("/") for relative in SOURCE_PATHS.values()}
    return {f"--sources {relative}": Path(sources) / relative for relative in sorted(relatives)}


def write_bench(tables: dict[tuple[str, str], list[dict]], output: str | Path
                | OutputFolder) -> dict[str, int]:
    """Write ``{(subset, language): rows}`` as a bench folder with its two dataset cards; return rows per
    config.

    ``output`` is an `bimedix.core.outputs.OutputFolder` (a path is opened as one): subset names must be safe
    file names, and only Parquet files an earlier build wrote are removed.
    """
    import pyarrow.parquet as pq

    if not isinstance(output, OutputFolder):
        output = OutputFolder(output, "build-bench")
    root = output.root
    for subset, _ in tables:
        safe_name(subset, "benchmark subset name")
    written = {root / (ENGLISH_DIR if lang == "en" else ARABIC_DIR) / subset / "test.parquet" for subset,
               lang in tables}
    for stale in [*root.glob(f"{ENGLISH_DIR}/*/test.parquet"), *root.glob(f"{ARABIC_DIR}/*/test.parquet")]:
        if stale not in written:  # a subset of an earlier build into the same folder
            if output.remove(stale):
                logger.warning("removed %s: not part of this build", stale)
            else:
                logger.warning("kept %s: not part of this build, but not written by build-bench either",
                               stale)
    counts = {}
    for (subset, language), rows in sorted(tables.items()):
        table = Dataset.from_list(rows, features=row_features()).data.table
        with atomic_open(output.path(ENGLISH_DIR if language == "en" else ARABIC_DIR, subset, "test.parquet"),
                         "wb") as handle:
            pq.write_table(table, handle)
        counts[f"{subset}_{language}"] = len(rows)
    _write_readmes(output, tables)
    return counts


def read_bench(data_dir: str | Path | None = None) -> dict[tuple[str, str], list[dict]]:
    """Every subset of a bench folder as ``{(subset, language): rows}`` (e.g. to extend it and `write_bench`
    again)."""
    tables = {}
    for config in available_configs(data_dir):
        subset, language = config.rsplit("_", 1)
        tables[subset, language] = read_subset_table(subset_path(subset, language, data_dir)).to_pylist()
    return tables


def read_subset_table(path: str | Path):
    """Read one subset's Parquet file as a `pyarrow.Table`, checking it has the columns the tasks read.

    Raises:
        `ValueError`: naming the file, and the column or row at fault, when it is not Parquet, lacks a
            column, has a column of the wrong type, or has a row whose answer letter has no option.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fix = "rebuild the folder with `bimedix build-bench` (or fix the file) and pass it again with --data-dir"
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err}); {fix}") from None
    for name in TASK_COLUMNS:
        if name not in table.column_names:
            raise ValueError(f"{path}: no column `{name}` (found: {table.column_names}); the evaluation "
                             f"tasks read {list(TASK_COLUMNS)}; {fix}")
        kind = table.schema.field(name).type
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        is_list = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
            pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type))
        if not (is_list if name == "options" else is_text):
            expected = "a list of strings" if name == "options" else "a string"
            raise ValueError(f"{path}: column `{name}` holds {kind}, expected {expected}; {fix}")
    for index, row in enumerate(table.select(["id", "options", "answer"]).to_pylist()):
        letter, options = row["answer"], row["options"] or []
        if not letter or letter not in OPTION_LETTERS["en"][:len(options)]:
            raise ValueError(f"{path}: row {index} (id {row['id']!r}): answer {letter!r} names none of its "
                             f"{len(options)} options; {fix}")
    return table


def load_subset(subset: str, language: str, data_dir: str | Path | None = None):
    """Load one subset × language as a ``DatasetDict({"test": ...})``.

    Args:
        subset (`str`): e.g. ``"medqa"`` or ``"mmlu_anatomy"``.
        language (`str`): ``"en"`` or ``"ar"``.
        data_dir (`str | Path`, *optional*): a bench folder, or the Hub id of one (then the config
            ``<subset>_<language>`` is loaded). Defaults to the slice bundled with the package.
    """

    path = subset_path(subset, language, data_dir)
    if path is None:  # a Hub id
        return DatasetDict({"test": load_dataset(str(data_dir), f"{subset}_{language}", split="test")})
    return DatasetDict({"test": Dataset(read_subset_table(path))})


def subset_path(subset: str, language: str, data_dir: str | Path | None = None) -> Path | None:
    """The Parquet file of one subset in a bench folder, or ``None`` when ``data_dir`` is a Hub id.

    Raises:
        `ValueError`: the folder exists but lacks this subset (the message says how to add it).
    """
    root = bundled_data_dir() if data_dir is None else Path(data_dir)
    if data_dir is not None and not root.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(data_dir)):
        return None
    path = root / (ENGLISH_DIR if language == "en" else ARABIC_DIR) / subset / "test.parquet"
    if not path.is_file():
        what = "English" if language == "en" else "Arabic"
        hint = ("build it with `bimedix build-bench --sources DIR --output DIR` from the original files"
                if language == "en" else
                "add translated records (`bimedix build-bench --translations FILE`) or BiMediX's published "
                "Arabic set (`--bimedix-arabic DIR`)")
        raise ValueError(f"evaluation data folder {root} has no {what} "
                         f"subset {subset!r} (missing {path}); {hint}, "
                         "or pick tasks whose subsets it has: "
                         f"{', '.join(available_configs(root)) or 'none'}")
    return path


def available_configs(data_dir: str | Path | None = None) -> list[str]:
    """The ``<subset>_<language>`` configs present in a bench folder."""
    root = bundled_data_dir() if data_dir is None else Path(data_dir)
    found = []
    for folder, language in ((ENGLISH_DIR, "en"), (ARABIC_DIR, "ar")):
        found += [f"{p.parent.name}_{language}" for p in sorted((root / folder).glob("*/test.parquet"))]
    return found


def bundled_data_dir() -> Path:
    """The small benchmark slice shipped with the package (MIT / Apache-2.0 sources only)."""

    return resource_path("bimedix", "eval", "data")


def subset_of(row: dict) -> str:
    """The bench subset a row belongs to (``mmlu_<subject>`` for MMLU, else its source)."""
    return f"mmlu_{row['subject']}" if row["source"] == "mmlu" else row["source"]


def read_sources(sources: Path, on_error: Callable[[Exception], None] | None = None, *,
                 subsets: set[str] | None = None) -> Iterator[tuple[tuple[str, str], list[dict]]]:
    """Yield ``((subset, language), rows)`` for every original benchmark file present under ``sources``.

    Rows of AceGPT's Arabic MMLU that were corrupted upstream (see `bimedix.data.mcqa.read_mmlu`) are
    dropped and counted in the log; other bad records go to ``on_error`` (by default they raise).
    """

    for subject in MMLU_SUBJECTS:
        subset = f"mmlu_{subject}"
        if subsets is not None and subset not in subsets:
            continue
        for language in LANGUAGES:
            path = sources / SOURCE_PATHS[f"mmlu_{language}"].format(subject=subject)
            if not path.is_file():
                logger.info("skipping %s (%s): %s not found", subset, language, path)
                continue
            dropped: list[Exception] = []
            items = mcqa.read_mmlu(path, language=language, subject=subject,
                                   on_error=_drop_corrupted(dropped, on_error) if language == "ar"
                                   else on_error)
            engine = ACEGPT_ENGINE if language == "ar" else None
            rows = [_item_row(item, subset, language, engine=engine) for item in items]
            if dropped:
                logger.warning("%s: dropped %d rows corrupted upstream, kept %d", path, len(dropped),
                               len(rows))
            yield (subset, language), rows
    readers = {
        "medmcqa": lambda p: mcqa.read_medmcqa(p, cop_base=1, on_error=on_error),
        "medqa": lambda p: mcqa.read_medqa(p, on_error=on_error),
        "pubmedqa": lambda p: mcqa.read_pubmedqa(p, sources / SOURCE_PATHS["pubmedqa_truth"], split="test",
                                                 on_error=on_error),
        "medarabench": lambda p: mcqa.read_medarabench(p, on_error=on_error),
    }
    for subset, reader in readers.items():
        if subsets is not None and subset not in subsets:
            continue
        path = sources / SOURCE_PATHS[subset]
        if not path.is_file():
            logger.info("skipping %s: %s not found", subset, path)
            continue
        language = "ar" if subset == "medarabench" else "en"
        yield (subset, language), [_item_row(item, subset, language) for item in reader(path)]


def row_id(subset: str, original_id: str) -> str:
    """The bench ``id`` of a question: ``<subset>-<original id>``, where a ``<file>:<row>`` id keeps the row
    number only, so English and Arabic copies of the same file row (and their translations) share it."""
    return f"{subset}-{str(original_id).rsplit(':', 1)[-1]}"


# ----------------------------------------------------------------------------- private helpers


def _item_row(item: Any, subset: str, language: str, engine: str | None = None) -> dict:
    options = list(item.options)
    if subset == "pubmedqa":
        options = PUBMEDQA_OPTIONS[language]
    mmlu = subset.startswith("mmlu_")
    return make_row(id=row_id(subset, item.original_id), language=language, source="mmlu" if mmlu else subset,
                    subject=subset.removeprefix("mmlu_") if mmlu else (item.subject or subset),
                    question=item.question, options=options,
                    answer=item.answer, context=item.context or "", license=item.license,
                    engine=engine, reviewed=False if engine else None)


def _drop_corrupted(dropped: list[Exception], on_error):
    """An ``on_error`` for AceGPT's Arabic MMLU: collect rows corrupted upstream, pass other errors on."""
    def handle(err: Exception) -> None:
        if "corrupted upstream" in str(err):
            dropped.append(err)
        elif on_error is None:
            raise err
        else:
            on_error(err)
    return handle


def _pair_arabic_with_english(tables: dict) -> None:
    """Order Arabic rows like their English twins (same ``id``), so ``--limit N`` evaluates the same
    questions."""
    for (subset, language), rows in tables.items():
        english = tables.get((subset, "en"))
        if language != "ar" or english is None:
            continue
        order = {row["id"]: index for index, row in enumerate(english)}
        rows.sort(key=lambda row: order.get(row["id"], len(order)))


def _first_paired(tables: dict, limit: int) -> dict:
    """Keep ``limit`` rows per subset: questions present in both languages first, then the others."""
    kept = {}
    for (subset, language), rows in tables.items():
        other = tables.get((subset, "ar" if language == "en" else "en"), [])
        twins = {row["id"] for row in other}
        paired = [row for row in rows if row["id"] in twins]
        kept[subset, language] = (paired + [row for row in rows if row["id"] not in twins])[:limit]
    return kept


def bench_configs(tables: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """The ``configs:`` of a whole bench folder's README: one config per ``<subset>_<language>``."""
    return [{"config_name": f"{subset}_{language}", "data_files": [
        {"split": "test",
         "path": f"{ENGLISH_DIR if language == 'en' else ARABIC_DIR}/{subset}/test.parquet"}]}
        for subset, language in sorted(tables)]


def arabic_configs(subsets: Iterable[str]) -> list[dict]:
    """The ``configs:`` of the Arabic benchmark's README: one per subset, ``all`` (the paper subsets), then
    extras."""
    subsets = set(subsets)
    paper = [s for s in PAPER_SUBSETS if s in subsets]
    configs = [{"config_name": s, "data_files": [{"split": "test", "path": f"{s}/test.parquet"}]}
               for s in paper]
    if paper:
        configs.append({"config_name": "all",
                        "data_files": [{"split": "test", "path": [f"{s}/test.parquet" for s in paper]}]})
    return configs + [{"config_name": s, "data_files": [{"split": "test", "path": f"{s}/test.parquet"}]}
                      for s in EXTRA_SUBSETS if s in subsets]


def _write_readmes(output: OutputFolder, tables: dict) -> None:
    """The machine-readable READMEs (``configs:`` for `datasets.load_dataset`); `bimedix build-bench` adds the
    prose."""
    with atomic_open(output.path("README.md")) as handle:
        handle.write(configs_readme(bench_configs(tables)))
    arabic = [subset for subset, language in tables if language == "ar"]
    if arabic:
        with atomic_open(output.path(ARABIC_DIR, "README.md")) as handle:
            handle.write(configs_readme(arabic_configs(arabic)))
    else:
        output.remove(output.root / ARABIC_DIR / "README.md")
