"""Target vs achieved composition of a built dataset: samples per task × language, and training tokens.

The targets come from the recipe's ``mix.targets`` / ``mix.target_tokens`` (for ``bimed1.3m``: the paper's
Fig. 3 and §3.1.3); they are reported, never enforced. ``build-data`` prints the table, stores it in
``stats.json`` under ``composition`` and shows it in the dataset README.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.conventions import LANGUAGES
from .schema import TASKS
from .stats import DataStats

ALL = "all"


def composition(stats: DataStats, targets: Mapping[str, Mapping[str, int]] | None = None,
                target_tokens: int | None = None) -> dict:
    """Compare the built dataset with its targets.

    Args:
        stats (`DataStats`): the statistics of what was written.
        targets (`Mapping`, *optional*): ``{task or "all": {language or "all": samples}}``.
        target_tokens (`int`, *optional*): the training tokens aimed at.

    Returns:
        `dict`: ``{"rows": [{"task", "language", "target", "achieved"}], "tokens": {"target", "achieved"}}``,
        one row per task × language cell (``all`` for the totals); ``target`` is ``None`` where none is set.
    """
    targets = targets or {}
    rows = []
    for task in (*TASKS, ALL):
        for language in (*LANGUAGES, ALL):
            achieved = stats.cell(None if task == ALL else task, None if language == ALL
                                  else language).samples
            rows.append({"task": task, "language": language, "target": targets.get(task, {}).get(language),
                         "achieved": achieved})
    return {"rows": rows, "tokens": {"target": target_tokens, "achieved": stats.cell().tokens}}


def has_targets(report: Mapping) -> bool:
    """Whether the `composition` report has any target to compare with."""
    return report["tokens"]["target"] is not None or any(row["target"] is not None for row in report["rows"])


def composition_markdown(report: Mapping) -> str:
    """The `composition` report as a Markdown table (achieved / target and their ratio where a target is
    set)."""
    lines = ["| task | language | achieved | target | achieved / target |", "|---|---|---:|---:|---:|"]
    entries = [(row["task"], row["language"], row["achieved"], row["target"]) for row in report["rows"]]
    tokens = report["tokens"]
    entries.append(("tokens", ALL, tokens["achieved"], tokens["target"]))
    for task, language, achieved, target in entries:
        share = f"{achieved / target:.1%}" if target else ""
        lines.append(f"| {task} | {language} | {achieved:,} | "
                     f"{'' if target is None else f'{target:,}'} | {share} |")
    return "\n".join(lines) + "\n"
