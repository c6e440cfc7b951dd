"""Which English records go to translation: a seeded selection stratified by task and source.

The paper keeps all its English instructions and translates 444,995 of them (about 51%) "covering all
three types" (§3.1.3). `select_for_translation` reproduces that step: the target (a count, or a fraction
of the English pool) is split over the strata (``task``, ``source`` or both) in proportion to their sizes
(largest remainders), and within each stratum the records with the smallest seeded hash of their id are
picked (`bimedix.data.mixing.selection_key`). The same inputs, target and seed always give the same
picks, whatever the order of the files; only 8 bytes a record are held between the two passes.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.io import atomic_open, iter_jsonl
from .mixing import apportion, selection_key
from .schema import validate_record

STRATA_FIELDS = ("task", "source")
_SALT = "translate"


@dataclass
class Selection:
    """What `select_for_translation` picked.

    Attributes:
        pool (`int`): English records read.
        target (`int`): records to pick.
        skipped_non_english (`int`): records of other languages, ignored.
        strata (`dict[str, dict]`): per stratum (``"qa|healthcaremagic"``), ``{"available", "picked"}``.
    """

    pool: int
    target: int
    skipped_non_english: int
    strata: dict[str, dict] = field(default_factory=dict)

    @property
    def picked(self) -> int:
        return sum(entry["picked"] for entry in self.strata.values())

    def table(self, by: Sequence[str]) -> str:
        """A Markdown table: one row per stratum with available, picked and the share picked."""
        header = " | ".join(by)
        lines = [f"| {header} | available | picked | share |", "|" + "---|" * len(by) + "---:|---:|---:|"]
        for key, entry in self.strata.items():
            share = entry["picked"] / entry["available"] if entry["available"] else 0.0
            lines.append(f"| {' | '.join(key.split('|'))} | {entry['available']:,} "
                         f"| {entry['picked']:,} | {share:.1%} |")
        share = self.picked / self.pool if self.pool else 0.0
        lines.append(f"| {' | '.join(['total'] + [''] * (len(by) - 1))} "
                     f"| {self.pool:,} | {self.picked:,} | {share:.1%} |")
        return "\n".join(lines) + "\n"


def select_for_translation(inputs: str | os.PathLike, output: str | os.PathLike, *, target: float,
                           by: Sequence[str] = STRATA_FIELDS, seed: int = 42) -> Selection:
    """Pick ``target`` English records of ``inputs`` for translation and write them to ``output``.

    Args:
        inputs (`str | os.PathLike`): a JSON Lines file of bimedix records, or a folder (every ``*.jsonl`` in
            it, recursively, in name order, except ``*.rejects.jsonl`` reject logs; e.g. build-data's
            ``.work/sources``).
        output (`str | os.PathLike`): the picks, JSON Lines, in input order (must not exist yet); the summary
            table goes next to it (`summary_path`).
        target (`float`): a count (an integer >= 1, e.g. the paper's 444995) or a fraction of the English pool
            in (0, 1) (e.g. 0.51).
        by (`Sequence[str]`, *optional*, defaults to ``("task", "source")``): the fields to stratify by.
        seed (`int`, *optional*, defaults to 42): the selection seed.

    Returns:
        `Selection`: pool size, target and per-stratum counts.

    Raises:
        `ValueError`: a target larger than the English pool (both numbers named), a bad ``by`` or target,
            or an existing ``output``.
        `bimedix.data.schema.RecordError`: a malformed record (file, line and field named).
    """
    by = tuple(by)
    if not by or set(by) - set(STRATA_FIELDS):
        raise ValueError(f"--by {','.join(by)!r}: choose from {list(STRATA_FIELDS)} (comma-separated)")
    if target <= 0 or (target >= 1 and target != int(target)):
        raise ValueError(f"--target {target!r}: give a count (an integer >= 1) or a fraction in (0, 1)")
    output = Path(output)
    for path in (output, summary_path(output)):
        if path.exists():
            raise ValueError(f"{path} already exists; choose a new --output (nothing is overwritten)")
    files = _input_files(Path(inputs))
    keys: dict[str, array] = {}
    skipped = 0
    for record in _records(files):
        if record["language"] != "en":
            skipped += 1
            continue
        keys.setdefault(_stratum(record, by), array("Q")).append(selection_key(seed, record["id"], _SALT))
    pool = sum(len(k) for k in keys.values())
    count = int(target) if target >= 1 else round(target * pool)
    if count > pool:
        raise ValueError(f"--target {count:,} is larger than the "
                         f"English pool of {pool:,} records in {inputs}; "
                         "lower the target or add English sources")
    names = sorted(keys)
    quotas = apportion([len(keys[name]) for name in names], count)
    thresholds = {name: sorted(keys[name])[quota - 1] if quota else -1 for name, quota in zip(names, quotas)}
    selection = Selection(pool, count, skipped, {name: {"available": len(keys[name]), "picked": quota}
                                                  for name, quota in zip(names, quotas)})
    written = 0
    with atomic_open(output) as handle:
        for record in _records(files):
            if record["language"] == "en":
                key = selection_key(seed, record["id"], _SALT)
                if key <= thresholds[_stratum(record, by)]:
                    handle.write(_json_line(record))
                    written += 1
        if written != count:  # only records sharing an id share a key
            raise ValueError(f"{inputs}: record ids are not unique "
                             f"({written:,} picked for a target of {count:,}); "
                             "make ids unique across the input files")
    with atomic_open(summary_path(output)) as handle:
        handle.write(selection.table(by))
    return selection


def summary_path(output: str | os.PathLike) -> Path:
    """Where `select_for_translation` writes its summary table: ``<output stem>.summary.md``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".summary.md")


def _input_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file()
                       and not p.name.endswith(".rejects.jsonl"))
        if not files:
            raise FileNotFoundError(f"{path} holds no *.jsonl files of bimedix records")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"--input {path} does not exist")
    return [path]


def _records(files: list[Path]) -> Iterator[dict]:
    for path in files:
        for line, obj in iter_jsonl(path):
            yield validate_record(obj, path=str(path), line=line)


def _stratum(record: dict, by: tuple[str, ...]) -> str:
    return "|".join(str(record[name]) for name in by)


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"
