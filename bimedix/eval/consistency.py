"""Bilingual consistency: does the model pick the same option for a question in English and in Arabic?

Computed from lm-eval's per-sample logs (``log_samples=True``) of the sibling tasks
``bimedix_<subset>_en`` / ``bimedix_<subset>_ar``, whose rows share ``id``. For every question asked in
both languages: the chosen option is the one with the highest log-likelihood (what ``acc`` scores);
``agreement`` is the share of questions where both languages choose the same option, and on the
questions where they disagree, ``en_acc_on_disagreement`` / ``ar_acc_on_disagreement`` say which
language was right.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_TASK = re.compile(r"bimedix_(?P<subset>.+)_(?P<language>en|ar)")


def bilingual_consistency(samples: Mapping[str, list[dict]]) -> dict[str, dict]:
    """Consistency per subset and ``"all"`` (pooled over the subsets) from lm-eval per-sample logs.

    Args:
        samples (`Mapping[str, list[dict]]`): lm-eval's ``results["samples"]``: task name → samples,
            each with ``doc`` (holding ``id``), ``filtered_resps`` (one ``(loglikelihood, is_greedy)`` per
            choice) and ``target`` (gold choice index).

    Returns:
        `dict[str, dict]`: per subset with paired questions: ``n`` (questions in both languages),
        ``agreement``, ``both_correct``, ``n_disagree``, ``en_acc_on_disagreement``,
        ``ar_acc_on_disagreement`` (``None`` when there is no disagreement); ``"all"`` pools the subsets.
    """
    by_subset: dict[str, dict[str, dict[str, tuple[int, bool]]]] = {}
    for task, task_samples in samples.items():
        match = _TASK.fullmatch(task)
        if not match:
            continue
        answers = by_subset.setdefault(match["subset"], {}).setdefault(match["language"], {})
        for sample in task_samples:
            choice = chosen_option(sample)
            answers[str(sample["doc"]["id"])] = (choice, choice == int(sample["target"]))
    report: dict[str, dict] = {}
    pooled: list[tuple[tuple[int, bool], tuple[int, bool]]] = []
    for subset, languages in sorted(by_subset.items()):
        english, arabic = languages.get("en", {}), languages.get("ar", {})
        pairs = [(english[i], arabic[i]) for i in english if i in arabic]
        if pairs:
            report[subset] = _summary(pairs)
            pooled += pairs
    if pooled:
        report["all"] = _summary(pooled)
    return report


def chosen_option(sample: dict) -> int:
    """The choice index with the highest log-likelihood in one lm-eval multiple-choice sample."""
    scores = [float(response[0]) for response in sample["filtered_resps"]]
    return max(range(len(scores)), key=scores.__getitem__)


def _summary(pairs: list[tuple[tuple[int, bool], tuple[int, bool]]]) -> dict:
    disagree = [(en, ar) for en, ar in pairs if en[0] != ar[0]]
    n_disagree = len(disagree)
    return {
        "n": len(pairs),
        "agreement": 1 - n_disagree / len(pairs),
        "both_correct": sum(en[1] and ar[1] for en, ar in pairs) / len(pairs),
        "n_disagree": n_disagree,
        "en_acc_on_disagreement": sum(en[1] for en, _ in disagree) / n_disagree if disagree else None,
        "ar_acc_on_disagreement": sum(ar[1] for _, ar in disagree) / n_disagree if disagree else None,
    }
