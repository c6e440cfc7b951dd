"""Dataset statistics in the shape of the paper's Fig. 3: samples, turns and tokens per task × language.

Turns are question–answer exchanges (a single QA pair is one turn, as in the paper's "Avg. Turns").
Tokens are those the model trains on: the record rendered with the Vicuna template (BOS, system prompt,
every turn and each ``</s>``), counted with the real Mixtral-8x7B tokenizer
(`bimedix.data.tokenizer.load_mixtral_tokenizer`) through `bimedix.data.encode.encode_conversations`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from ..core.conventions import LANGUAGES
from .encode import encode_conversations
from .schema import TASKS

LANGUAGE_NAMES = {"en": "English", "ar": "Arabic"}


@dataclass
class GroupStats:
    """Totals for one task × language cell."""

    samples: int = 0
    turns: int = 0
    tokens: int = 0

    def add(self, other: GroupStats) -> None:
        self.samples += other.samples
        self.turns += other.turns
        self.tokens += other.tokens

    @property
    def avg_turns(self) -> float:
        return self.turns / self.samples if self.samples else 0.0


@dataclass
class DataStats:
    """Fig. 3-style statistics, accumulated batch by batch (and mergeable across shards)."""

    groups: dict[tuple[str, str], GroupStats] = field(default_factory=dict)

    def update(self, records: Iterable[Mapping], tokenizer, *, batch_size: int = 1000) -> DataStats:
        """Count ``records`` (tokenized in batches with ``tokenizer``) and return ``self``."""
        batch: list[Mapping] = []
        for record in records:
            batch.append(record)
            if len(batch) == batch_size:
                self._add_batch(batch, tokenizer)
                batch = []
        if batch:
            self._add_batch(batch, tokenizer)
        return self

    def merge(self, other: DataStats) -> DataStats:
        """Add ``other``'s counts into ``self`` and return ``self``."""
        for group, stats in other.groups.items():
            self.groups.setdefault(group, GroupStats()).add(stats)
        return self

    def cell(self, task: str | None = None, language: str | None = None) -> GroupStats:
        """Totals over the groups matching ``task`` and ``language`` (``None`` = all)."""
        total = GroupStats()
        for (group_task, group_language), stats in self.groups.items():
            if task in (None, group_task) and language in (None, group_language):
                total.add(stats)
        return total

    def to_dict(self) -> dict:
        """JSON form: ``{"groups": [{"task", "language", "samples", "turns", "tokens", "avg_turns"}], "total":
        ...}``."""
        rows = [{"task": task, "language": language, **asdict(stats), "avg_turns": round(stats.avg_turns, 4)}
                for (task, language), stats in sorted(self.groups.items(), key=_order)]
        total = self.cell()
        return {"tokenizer": "mistralai/Mixtral-8x7B-v0.1 (mistral_common tokenizer.model.v1)",
                "groups": rows, "total": {**asdict(total), "avg_turns": round(total.avg_turns, 4)}}

    @classmethod
    def from_dict(cls, data: Mapping) -> DataStats:
        """Inverse of `to_dict`."""
        return cls({(row["task"], row["language"]): GroupStats(row["samples"], row["turns"], row["tokens"])
                    for row in data["groups"]})

    def to_markdown(self) -> str:
        """A Markdown table like Fig. 3: one row per task × language, per-task and overall totals."""
        lines = ["| Data | Language | Samples | Avg. Turns | #Tokens |", "|---|---|---:|---:|---:|"]
        tasks = [task for task in TASKS if any(group[0] == task for group in self.groups)]
        for task in [*tasks, None]:
            for language in [*LANGUAGES, None]:
                stats = self.cell(task, language)
                if not stats.samples:
                    continue
                lines.append(f"| {task.upper() if task else 'Total'} | {LANGUAGE_NAMES.get(language, 'All')} "
                             f"| {stats.samples:,} | {stats.avg_turns:.2f} | {stats.tokens:,} |")
        return "\n".join(lines) + "\n"

    def plot(self, target: str | os.PathLike | BinaryIO) -> None:
        """Save a PNG (to a path or binary file) with samples, average turns and tokens per task, by
        language."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tasks = [task for task in TASKS if any(group[0] == task for group in self.groups)]
        figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        width = 0.38
        for axis, (metric, title) in zip(axes, [("samples", "Samples"), ("avg_turns", "Avg. turns"),
                                                 ("tokens", "Tokens (Mixtral)")]):
            for offset, language in zip((-width / 2, width / 2), LANGUAGES):
                values = [getattr(self.cell(task, language), metric) for task in tasks]
                axis.bar([i + offset for i in range(len(tasks))], values, width,
                         label=LANGUAGE_NAMES[language])
            axis.set_xticks(range(len(tasks)), [task.upper() for task in tasks])
            axis.set_title(title)
        axes[0].legend()
        total = self.cell()
        figure.suptitle(f"{total.samples:,} samples, {total.avg_turns:.2f} "
                        f"avg. turns, {total.tokens:,} tokens")
        figure.tight_layout()
        figure.savefig(target, format="png", dpi=100)
        plt.close(figure)

    def _add_batch(self, batch: list[Mapping], tokenizer) -> None:
        for record, encoded in zip(batch, encode_conversations(tokenizer, batch, with_mask=False)):
            stats = self.groups.setdefault((record["task"], record["language"]), GroupStats())
            stats.samples += 1
            stats.turns += len(record["conversations"]) // 2
            stats.tokens += len(encoded["input_ids"])


def compute_stats(records: Iterable[Mapping], tokenizer=None, *, batch_size: int = 1000) -> DataStats:
    """Compute Fig. 3-style statistics.

    Args:
        records (`Iterable[Mapping]`): schema records.
        tokenizer (`PreTrainedTokenizerFast`, *optional*): defaults to the real Mixtral tokenizer.
        batch_size (`int`, *optional*, defaults to 1000): records tokenized per call.

    Returns:
        `DataStats`: the counts; ``.to_markdown()``, ``.to_dict()`` and ``.plot(path)`` render them.
    """
    if tokenizer is None:
        from .tokenizer import load_mixtral_tokenizer

        tokenizer = load_mixtral_tokenizer()
    return DataStats().update(records, tokenizer, batch_size=batch_size)


def _order(item) -> tuple[int, int]:
    (task, language), _ = item
    return (TASKS.index(task) if task in TASKS else len(TASKS), LANGUAGES.index(language)
            if language in LANGUAGES else 2)
