"""HealthBench's scores from per-criterion verdicts, with bootstrap confidence intervals.

* An example's score is the points of its met criteria (negative ones included) divided by the sum of its
  positive points; it can fall below 0 or, never in practice, above 1.
* The overall score is the mean of the example scores, clipped to [0, 1].
* A theme's score is the same mean over the examples tagged ``theme:X``. An axis score is computed per
  example over the criteria tagged ``axis:X`` (only where they hold positive points), then averaged and
  clipped the same way.
* ``ci95`` is the 2.5th–97.5th percentile of the clipped mean over ``resamples`` bootstrap resamples of the
  examples (seeded, so a re-run prints the same interval). HealthBench reports the bootstrap standard
  deviation; both come from the same resamples, and ``std`` is given too.

An example with a criterion the judge failed to grade has no score: it is counted in ``n_failed`` and left out
of every mean, never scored as if the criterion were met or unmet.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..data.rubric import Criterion

RESAMPLES = 1000


def example_score(criteria: Sequence[Criterion], met: Sequence[bool]) -> float | None:
    """Met points over positive points; ``None`` when no criterion has positive points."""
    possible = sum(c.points for c in criteria if c.points > 0)
    if possible <= 0:
        return None
    return sum(c.points for c, hit in zip(criteria, met, strict=True) if hit) / possible


def axis_scores(criteria: Sequence[Criterion], met: Sequence[bool]) -> dict[str, float]:
    """`example_score` over the criteria of each ``axis:`` tag (axes without positive points are left out)."""
    by_axis: dict[str, list[tuple[Criterion, bool]]] = {}
    for criterion, hit in zip(criteria, met, strict=True):
        if criterion.axis:
            by_axis.setdefault(criterion.axis, []).append((criterion, hit))
    scores = {}
    for axis, pairs in sorted(by_axis.items()):
        score = example_score([c for c, _ in pairs], [hit for _, hit in pairs])
        if score is not None:
            scores[axis] = score
    return scores


def clipped_mean(values: Sequence[float]) -> float:
    """The mean clipped to [0, 1]."""
    return float(np.clip(np.mean(values), 0.0, 1.0))


def bootstrap(values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """``{"ci95": [lo, hi], "std": s}`` of the clipped mean over seeded bootstrap resamples of ``values``."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.clip(data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1), 0.0, 1.0)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"ci95": [float(low), float(high)], "std": float(means.std())}


def summarize(examples: Iterable[dict], *, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Scores of one language from graded examples (lines of ``examples.jsonl``).

    Args:
        examples (`Iterable[dict]`): each with ``score`` (``None`` if a criterion failed), ``themes`` and
            ``axis_scores``.
        seed (`int`, *optional*, defaults to `0`): bootstrap seed.
        resamples (`int`, *optional*, defaults to `1000`): bootstrap resamples.

    Returns:
        ``{"score", "ci95", "std", "n", "n_failed", "by_theme": {theme: {...}}, "by_axis": {axis: {...}}}``
        (``score``/``ci95``/``std`` are ``None`` when no example was scored).
    """
    examples = list(examples)
    scored = [e for e in examples if e["score"] is not None]
    themes: dict[str, list[float]] = {}
    axes: dict[str, list[float]] = {}
    for example in scored:
        for theme in example["themes"]:
            themes.setdefault(theme, []).append(example["score"])
        for axis, value in example["axis_scores"].items():
            axes.setdefault(axis, []).append(value)
    return {
        **_stats([e["score"] for e in scored], seed, resamples),
        "n_failed": len(examples) - len(scored),
        "by_theme": {k: _stats(v, seed, resamples) for k, v in sorted(themes.items())},
        "by_axis": {k: _stats(v, seed, resamples) for k, v in sorted(axes.items())},
    }


def language_agreement(english: Iterable[dict], arabic: Iterable[dict]) -> dict:
    """Per-example EN↔AR agreement of the verdicts on paired examples (same ``prompt_id``, same criteria).

    Returns:
        ``{"n", "criteria", "criterion_agreement", "mean_abs_score_diff", "en_higher", "ar_higher",
        "examples": [{"prompt_id", "en", "ar", "agreement"}]}``: ``criterion_agreement`` is the share of
        criteria with the same verdict in both languages (pooled), ``agreement`` the same per example.
    """
    by_id = {e["prompt_id"]: e for e in arabic if e["score"] is not None}
    rows, same, total = [], 0, 0
    for en in english:
        ar = by_id.get(en["prompt_id"])
        if en["score"] is None or ar is None:
            continue
        verdicts = [
            (a["criteria_met"], b["criteria_met"])
            for a, b in zip(en["criteria"], ar["criteria"], strict=True)
        ]
        agree = sum(a == b for a, b in verdicts)
        same, total = same + agree, total + len(verdicts)
        rows.append(
            {
                "prompt_id": en["prompt_id"],
                "en": en["score"],
                "ar": ar["score"],
                "agreement": agree / len(verdicts),
            }
        )
    if not rows:
        return {
            "n": 0,
            "criteria": 0,
            "criterion_agreement": None,
            "mean_abs_score_diff": None,
            "en_higher": 0,
            "ar_higher": 0,
            "examples": [],
        }
    return {
        "n": len(rows),
        "criteria": total,
        "criterion_agreement": same / total,
        "mean_abs_score_diff": float(np.mean([abs(r["en"] - r["ar"]) for r in rows])),
        "en_higher": sum(r["en"] > r["ar"] for r in rows),
        "ar_higher": sum(r["ar"] > r["en"] for r in rows),
        "examples": rows,
    }


def _stats(values: list[float], seed: int, resamples: int) -> dict:
    if not values:
        return {"score": None, "ci95": None, "std": None, "n": 0}
    return {
        "score": clipped_mean(values),
        **bootstrap(values, seed=seed, resamples=resamples),
        "n": len(values),
    }
