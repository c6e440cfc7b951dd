"""Deterministic mixing: per-source sampling weights and the optional Arabic:English ratio per task.

Every decision hashes ``(seed, record id)`` to a 64-bit key, so the same recipe and inputs give the
same dataset, in any process, without holding records in memory: only the keys (8 bytes a record)
are kept between the counting pass and the writing pass.

By default (no ratio) every clean record is kept: the plan only records the counts. How an explicit
ratio is met. For each task (or overall, with ``per_task: false``) the mixer counts the
English and Arabic records left after dedup and decontamination. If Arabic is scarce it keeps all
Arabic and samples English down to ``n_ar / ratio``; if Arabic is plentiful it samples Arabic down
to ``ratio * n_en``. A task with no records in one language cannot be balanced by sampling: it is
kept as it is and a warning says so (the statistics then show the ratio that was reached). Every
record dropped here is counted as ``dropped_ratio`` so that the counts balance.
"""

from __future__ import annotations

import hashlib
import logging
import math
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_MAX_KEY = 2**64


def selection_key(seed: int, record_id: str, salt: str = "") -> int:
    """Return the 64-bit sampling key of a record: stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}\x00{salt}\x00{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def keep_by_weight(seed: int, record_id: str, weight: float, source: str) -> bool:
    """Whether a record survives its source's sampling ``weight`` (a fraction in (0, 1])."""
    return weight >= 1 or selection_key(seed, record_id, f"weight:{source}") < weight * _MAX_KEY


@dataclass
class RatioPlanner:
    """Collects the sampling keys of the clean records, then decides how many of each group to keep.

    Args:
        seed (`int`): the recipe seed.
        ratio (`float`, *optional*): Arabic samples per English sample (``0.5`` for 1:2); ``None`` keeps all.
        per_task (`bool`, *optional*, defaults to `True`): balance each task separately.
    """

    seed: int
    ratio: float | None
    per_task: bool = True
    keys: dict[tuple[str, str], array] = field(default_factory=dict)

    def add(self, record: Mapping) -> None:
        """Register one record that passed dedup and decontamination."""
        group = (record["task"], record["language"])
        self.keys.setdefault(group, array("Q")).append(selection_key(self.seed, record["id"], "ratio"))

    def plan(self) -> dict[str, dict]:
        """Return ``{"task|language": {"available": n, "keep": k, "threshold": key}}``.

        A record is kept when its key is at most its group's ``threshold``; ``keep`` records qualify.
        """
        counts = {group: len(keys) for group, keys in self.keys.items()}
        targets = dict(counts)
        blocks = [] if self.ratio is None else sorted({task for task,
                                                       _ in counts}) if self.per_task else [None]
        for block in blocks:
            n_en = sum(n for (task, lang), n in counts.items() if lang == "en" and block in (None, task))
            n_ar = sum(n for (task, lang), n in counts.items() if lang == "ar" and block in (None, task))
            label = f"task {block!r}" if block else "the mixture"
            if n_en == 0 or n_ar == 0:
                if n_en + n_ar:
                    logger.warning("%s has %d English and %d Arabic records: the Arabic:English ratio cannot "
                                   "be met by sampling, so it is kept as it is", label, n_en, n_ar)
                continue
            if n_ar < self.ratio * n_en:
                language, keep_total, have = "en", math.floor(n_ar / self.ratio + 1e-9), n_en
            else:
                language, keep_total, have = "ar", math.floor(self.ratio * n_en + 1e-9), n_ar
            if keep_total < have:
                logger.info("%s: sampling %s down from %d to %d records for the ratio", label, language, have,
                            keep_total)
            members = sorted(g for g in counts if g[1] == language and block in (None, g[0]))
            for group, kept in zip(members, apportion([counts[g] for g in members], keep_total)):
                targets[group] = kept
        plan = {}
        for group, keys in sorted(self.keys.items()):
            keep = targets[group]
            ordered = sorted(keys)
            threshold = ordered[keep - 1] if keep else -1
            plan["|".join(group)] = {"available": counts[group], "keep": keep, "threshold": threshold}
        return plan


def keeps(plan: Mapping[str, Mapping], seed: int, record: Mapping) -> bool:
    """Whether ``record`` is in the mixture under a `RatioPlanner.plan`."""
    entry = plan[f"{record['task']}|{record['language']}"]
    return entry["keep"] == entry["available"] or selection_key(seed, record["id"],
                                                                "ratio") <= entry["threshold"]


def apportion(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainders), never above a size."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    shares = [size * total / whole for size in sizes]
    kept = [math.floor(share) for share in shares]
    for index in sorted(range(len(sizes)), key=lambda i: kept[i] - shares[i])[: total - sum(kept)]:
        kept[index] += 1
    return [min(k, size) for k, size in zip(kept, sizes)]
