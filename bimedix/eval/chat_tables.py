"""The ``eval-chat`` table: rubric scores (%) with 95% CIs per language, overall, per theme and per axis, and
the EN↔AR agreement line, as printed at the end of a run and added to the model card."""

from __future__ import annotations

LANGUAGE_NAMES = {"en": "EN", "ar": "AR"}


def format_chat_table(results: dict, *, markdown: bool = False) -> str:
    """Render ``results.json`` of ``bimedix eval-chat`` as a text or markdown table.

    Rows: overall, ``theme:*`` and ``axis:*``; per language a score column (``42.1 [35.0, 49.3]``) and ``n``.
    """
    languages = [language for language in LANGUAGE_NAMES if language in results]
    header = ["Rubric score (%)"]
    for language in languages:
        header += [f"{LANGUAGE_NAMES[language]} score [95% CI]", f"{LANGUAGE_NAMES[language]} n"]
    keys = [("Overall", None, None)]
    for group in ("by_theme", "by_axis"):
        names = sorted({name for language in languages for name in results[language][group]})
        keys += [(f"{group[3:]}:{name}", group, name) for name in names]
    rows = []
    for label, group, name in keys:
        row = [label]
        for language in languages:
            stats = results[language] if group is None else results[language][group].get(name)
            row += [_cell(stats), str(stats["n"]) if stats else "0"]
        rows.append(row)
    title = "Open-ended answers: HealthBench-style rubric score (mean clipped to [0, 100])"
    notes = []
    for language in languages:
        failed = results[language].get("n_failed")
        if failed:
            notes.append(
                f"{LANGUAGE_NAMES[language]}: {failed} example(s) left out: the judge gave no valid "
                "verdict on one of their criteria"
            )
    agreement = results.get("en_ar_agreement")
    if agreement and agreement["n"]:
        notes.append(
            f"EN↔AR: the same verdict on {100 * agreement['criterion_agreement']:.1f}% of "
            f"{agreement['criteria']} criteria over {agreement['n']} paired examples; mean |EN−AR| "
            f"example score difference {100 * agreement['mean_abs_score_diff']:.1f} points "
            f"(EN higher on {agreement['en_higher']}, AR higher on {agreement['ar_higher']})"
        )
    run = results.get("run") or {}
    if run.get("arabic_source"):
        notes.append(f"Arabic set: {run['arabic_source']}")
    if run.get("judge"):
        notes.append(f"Judge: {run['judge']}; model: {run.get('model', '?')}")
    if markdown:
        lines = [
            f"**{title}**",
            "",
            "| " + " | ".join(header) + " |",
            "|---" + "|---:" * (len(header) - 1) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else []))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(lines + notes)


def _cell(stats: dict | None) -> str:
    if not stats or stats["score"] is None:
        return "–"
    low, high = stats["ci95"]
    return f"{100 * stats['score']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
