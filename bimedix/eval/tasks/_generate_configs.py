"""Write the task and group YAMLs of this folder from the subset table in `bimedix.eval.bench`.

Like lm-eval's ``mmlu/_generate_configs.py``: edit the tables here or ``PAPER_SUBSETS``, then run
``python -m bimedix.eval.tasks._generate_configs`` and commit the YAMLs it writes
(``tests/test_eval_tasks.py`` checks that the committed files equal the generated ones).
``_template.yaml`` and ``utils.py`` are written by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bimedix.core.conventions import LANGUAGES
from bimedix.eval.bench import EXTRA_SUBSETS, PAPER_SUBSETS

TASKS_DIR = Path(__file__).parent
# What each subset's questions are "about", in the task's few-shot description (none for PubMedQA).
TOPICS = {
    "mmlu_clinical_knowledge": ("clinical knowledge", "المعرفة السريرية"),
    "mmlu_college_biology": ("college biology", "علم الأحياء الجامعي"),
    "mmlu_college_medicine": ("college medicine", "الطب الجامعي"),
    "mmlu_medical_genetics": ("medical genetics", "علم الوراثة الطبية"),
    "mmlu_professional_medicine": ("professional medicine", "الطب المهني"),
    "mmlu_anatomy": ("anatomy", "علم التشريح"),
    "medmcqa": ("medicine", "الطب"),
    "medqa": ("medicine", "الطب"),
    "medarabench": (None, "الطب"),
}
DESCRIPTIONS = {
    "en": "The following are multiple choice questions (with answers) about {topic}.\\n\\n",
    "ar": "فيما يلي أسئلة اختيار من متعدد (مع الإجابات) حول {topic}.\\n\\n",
}
# Group name -> (comment, alias, member suffix). The paper's Tables 2-4 are aliases of the three benchmarks.
GROUPS = {
    "bimedix_en": ("The English benchmark: nine medical subsets.", "English benchmark", "en"),
    "bimedix_ar": ("The Arabic benchmark: the same nine subsets, translated.", "Arabic benchmark", "ar"),
    "bimedix_bilingual": ("The bilingual benchmark: each subset pooled over English and Arabic.",
                          "Bilingual benchmark", "bilingual"),
    "bimedix_table2": ("Paper Table 2: the bilingual benchmark (same tasks as bimedix_bilingual).",
                       "Table 2 (bilingual)", "bilingual"),
    "bimedix_table3": ("Paper Table 3: the Arabic benchmark (same tasks as bimedix_ar).", "Table 3 (Arabic)",
                       "ar"),
    "bimedix_table4": ("Paper Table 4: the English benchmark (same tasks as bimedix_en).",
                       "Table 4 (English)", "en"),
}
MEDARABENCH_HEADER = (
    "# MedAraBench (native Arabic exam questions, up to six options). No licence stated upstream: research "
    "use only.\n# Not part of any group; present only when build-bench found medarabench/ in --sources.\n"
)


def generate() -> dict[str, str]:
    """Every generated YAML of this folder: file name -> text."""
    files = {}
    for subset in PAPER_SUBSETS:
        for language in LANGUAGES:
            files[f"bimedix_{subset}_{language}.yaml"] = _task(subset, language)
        files[f"bimedix_{subset}_bilingual.yaml"] = _subset_group(subset)
    for subset in EXTRA_SUBSETS:
        files[f"bimedix_{subset}_ar.yaml"] = MEDARABENCH_HEADER + _task(subset, "ar")
    for name, (comment, alias, suffix) in GROUPS.items():
        files[f"{name}.yaml"] = _benchmark_group(name, comment, alias, suffix)
    return files


def write(directory: Path = TASKS_DIR) -> list[Path]:
    """Write the generated YAMLs into ``directory``; returns the paths written."""
    written = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _task(subset: str, language: str) -> str:
    lines = [f"task: bimedix_{subset}_{language}", "include: _template.yaml",
             f"task_alias: {subset} ({language})",
             "dataset_kwargs:", f"  subset: {subset}", f"  language: {language}"]
    topics = TOPICS.get(subset)
    if topics is not None:
        topic = topics[LANGUAGES.index(language)]
        lines.append(f'description: "{DESCRIPTIONS[language].format(topic=topic)}"')
    return "\n".join(lines) + "\n"


def _subset_group(subset: str) -> str:
    return (f"# {subset} in both languages: pooled accuracy over the English and Arabic items.\n"
            f"group: bimedix_{subset}_bilingual\n"
            f"group_alias: {subset} (bilingual)\n"
            "task:\n" + "".join(f"  - bimedix_{subset}_{language}\n" for language in LANGUAGES)
            + _aggregate(weight_by_size=True, comment=""))


def _benchmark_group(name: str, comment: str, alias: str, suffix: str) -> str:
    return (f"# {comment}\ngroup: {name}\ngroup_alias: {alias}\ntask:\n"
            + "".join(f"  - bimedix_{subset}_{suffix}\n" for subset in PAPER_SUBSETS)
            + _aggregate(weight_by_size=False,
                         comment="  # the paper's AVG: unweighted mean over the nine subsets"))


def _aggregate(*, weight_by_size: bool, comment: str) -> str:
    weight = str(weight_by_size).lower()
    return (f"aggregate_metric_list:{comment}\n"
            f"  - metric: acc\n    weight_by_size: {weight}\n"
            f"  - metric: acc_norm\n    weight_by_size: {weight}\n"
            "metadata:\n  version: 1.0\n")


if __name__ == "__main__":
    for path in write():
        print(path.name, file=sys.stderr)
