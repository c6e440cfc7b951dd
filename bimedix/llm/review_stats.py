"""How well the LLM judge's scores agree with the human reviewers (paper §3.1.2 checked its scores the same
way).

For every reviewed machine translation (``meta.translation.reviewed``), the judge's ``score`` is set against
the reviewers' verdict (``review_state``): per score bucket, the share approved, edited and rejected; and the
ROC AUC of the score as a detector of "approved" against "edited or rejected" (0.5: the score says nothing;
1.0: every approved record scores above every corrected one). A team picks the ``--threshold`` of
``bimedix translate`` / ``review export`` from it.

Examples:

```python
>>> from bimedix.llm.review_stats import roc_auc
>>> roc_auc([90, 95, 80], [70, 85])
0.8333333333333334

```
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

BUCKET_EDGES = (0, 50, 60, 70, 80, 90, 100)
VERDICTS = ("approved", "edited", "rejected")


def review_agreement(records: Iterable[dict], edges: tuple[float, ...] = BUCKET_EDGES) -> dict:
    """Judge-vs-reviewer agreement over the reviewed translations of ``records``.

    Args:
        records (`Iterable[dict]`): schema records (others than reviewed machine translations are skipped).
        edges (`tuple[float, ...]`, *optional*, defaults to `BUCKET_EDGES`): bucket bounds; the last bucket
            includes its upper bound (100).

    Returns:
        ``{"reviewed": n, "unscored": n, "buckets": [{"range", "count", "approved", "edited", "rejected"}],
        "roc_auc": float | None}``; the verdict values are shares of the bucket's count (``None`` when empty),
        and ``roc_auc`` is ``None`` unless both approved and corrected records have scores.
    """
    scored: list[tuple[float, str]] = []
    reviewed = unscored = 0
    for record in records:
        info = record["meta"].get("translation") or {}
        if not info.get("reviewed") or info.get("review_state") not in VERDICTS:
            continue
        reviewed += 1
        if info.get("score") is None:
            unscored += 1
        else:
            scored.append((float(info["score"]), info["review_state"]))
    buckets = []
    for index, (low, high) in enumerate(pairwise(edges)):
        last = index == len(edges) - 2
        verdicts = [state for score, state in scored if low <= score < high or (last and score == high)]
        shares = {state: verdicts.count(state) / len(verdicts) if verdicts else None for state in VERDICTS}
        buckets.append({"range": f"{low:g}-{high:g}", "count": len(verdicts), **shares})
    auc = roc_auc([score for score, state in scored if state == "approved"],
                  [score for score, state in scored if state != "approved"])
    return {"reviewed": reviewed, "unscored": unscored, "buckets": buckets, "roc_auc": auc}


def roc_auc(positives: list[float], negatives: list[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half); ``None`` if one is
    empty."""
    if not positives or not negatives:
        return None
    ranked = sorted([(score, 1) for score in positives] + [(score, 0) for score in negatives])
    rank_sum, index = 0.0, 0
    while index < len(ranked):  # average ranks over ties (Mann-Whitney U)
        end = index
        while end + 1 < len(ranked) and ranked[end + 1][0] == ranked[index][0]:
            end += 1
        average_rank = (index + end) / 2 + 1
        rank_sum += average_rank * sum(label for _, label in ranked[index:end + 1])
        index = end + 1
    u = rank_sum - len(positives) * (len(positives) + 1) / 2
    return u / (len(positives) * len(negatives))
