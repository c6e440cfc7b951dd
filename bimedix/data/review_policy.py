"""The one review policy for machine translations, used by ``build-data``, ``build-bench`` and ``push``.

Each record gets a review status from ``meta.translation`` (set by `bimedix.llm.translation` and updated
by `bimedix.llm.review.import_reviews`):

==================  ==========================================================================  ======
status              when                                                                        used?
==================  ==========================================================================  ======
``original``        no ``meta.translation`` (source text, generated chats, native Arabic)        always
``approved``        a reviewer approved the translation                                         always
``edited``          a reviewer corrected it                                                     always
``judge-passed``    ``review_state: unreviewed`` and judge score >= ``threshold``                always
``pending``         ``review_state: queued`` (below the threshold, or drawn for the review       opt-in
                    sample) and not reviewed yet
``below-threshold`` ``review_state: unreviewed`` with no score or a score below ``threshold``    opt-in
``rejected``        a reviewer rejected it                                                      never
==================  ==========================================================================  ======

"opt-in": used only with ``include_unreviewed``.

This follows the paper (§3.1.2): every translation scoring below the threshold goes to a medical
professional, and a random sample of the high-scoring ones too; translations that passed the judge and
were not drawn are used as they are. A translation whose ``review_state`` is missing cannot be placed:
`ReviewPolicy.admits` raises a `RecordError` naming the file, the record and the field.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from .schema import RecordError

STATUSES = ("original", "approved", "edited", "judge-passed", "pending", "below-threshold", "rejected")
ALWAYS_USED = ("original", "approved", "edited", "judge-passed")
UNREVIEWED = ("pending", "below-threshold")
DEFAULT_THRESHOLD = 80.0


@dataclass
class ReviewPolicy:
    """Decides which records may be used and counts every status it sees.

    Args:
        include_unreviewed (`bool`, *optional*, defaults to `False`): also use ``pending`` and
            ``below-threshold`` translations (they stay labelled by their ``review_state``).
        threshold (`float`, *optional*, defaults to `80`): judge score an unreviewed translation must reach
            (the `bimedix.llm.translation.TranslationConfig` default).
    """

    include_unreviewed: bool = False
    threshold: float = DEFAULT_THRESHOLD
    seen: Counter = field(default_factory=Counter)
    used: Counter = field(default_factory=Counter)

    def status(self, record: Mapping, *, path: str | os.PathLike | None = None, line: int
               | None = None) -> str:
        """Return the review status of ``record`` (one of `STATUSES`).

        Raises:
            `RecordError`: a translation without ``meta.translation.review_state``.
        """
        translation = (record.get("meta") or {}).get("translation")
        if not translation:
            return "original"
        state = translation.get("review_state")
        if state in ("approved", "edited", "rejected"):
            return state
        if state == "queued":
            return "pending"
        if state == "unreviewed":
            score = translation.get("score")
            return "judge-passed" if score is not None and score >= self.threshold else "below-threshold"
        raise RecordError(
            "a machine translation without a known review state "
            f"({state!r}); run it through `bimedix translate` "
            "(which sets it) or `bimedix review import`, or set it "
            "to one of unreviewed/queued/approved/edited/rejected",
            path=str(path) if path is not None else None, record=line if line is not None
            else record.get("id"),
            field="meta.translation.review_state")

    def admits(self, record: Mapping, *, path: str | os.PathLike | None = None, line: int
               | None = None) -> bool:
        """Count ``record``'s status and return whether the policy uses it."""
        return self.count(self.status(record, path=path, line=line))

    def uses(self, status: str) -> bool:
        """Whether the policy uses records of ``status`` (nothing is counted)."""
        return status in ALWAYS_USED or (self.include_unreviewed and status in UNREVIEWED)

    def count(self, status: str) -> bool:
        """Count one record of ``status`` (e.g. found by `status` in another process); return `uses`."""
        use = self.uses(status)
        self.seen[status] += 1
        if use:
            self.used[status] += 1
        return use

    def summary(self) -> dict:
        """``{"include_unreviewed", "threshold", "states": {status: {"seen", "used", "excluded"}}}`` (seen
        ones only)."""
        return {"include_unreviewed": self.include_unreviewed, "threshold": self.threshold,
                "states": {status: {"seen": self.seen[status], "used": self.used[status],
                                    "excluded": self.seen[status] - self.used[status]}
                           for status in STATUSES if self.seen[status]}}

    @classmethod
    def from_summary(cls, summary: Mapping) -> ReviewPolicy:
        """Rebuild a policy with its counts from `summary` (e.g. as stored in ``stats.json``)."""
        policy = cls(summary["include_unreviewed"], summary["threshold"])
        for status, counts in summary["states"].items():
            policy.seen[status], policy.used[status] = counts["seen"], counts["used"]
        return policy

    def table(self) -> str:
        """The summary as a Markdown table (status, seen, used, excluded)."""
        rows = [f"| {status} | {c['seen']:,} | {c['used']:,} | {c['excluded']:,} |"
                for status, c in self.summary()["states"].items()]
        return "| review status | seen | used | excluded |\n|---|---:|---:|---:|\n" + "\n".join(rows) + "\n"
