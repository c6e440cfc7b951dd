"""Paper-shaped tables (columns, AVG, pooled bilingual cells, reported rows) and the bilingual consistency
metric."""

from __future__ import annotations

import pytest

from bimedix.eval.bench import PAPER_SUBSETS
from bimedix.eval.consistency import bilingual_consistency
from bimedix.eval.tables import REPORTED, average, format_table, format_tables, subset_scores


def _results(english: dict[str, tuple[float, int]], arabic: dict[str, tuple[float, int]]) -> dict:
    results, n_samples = {}, {}
    for language, scores in (("en", english), ("ar", arabic)):
        for subset, (acc, n) in scores.items():
            task = f"bimedix_{subset}_{language}"
            results[task] = {"acc,none": acc, "acc_norm,none": acc / 2}
            n_samples[task] = {"original": n, "effective": n}
    return {"results": results, "n-samples": n_samples}


@pytest.mark.parametrize("table", ["table2", "table3", "table4"])
def test_reported_rows_average_to_the_paper_avg(table):
    for model, values in REPORTED[table].items():
        assert len(values) == len(PAPER_SUBSETS) + 1
        mean = sum(values[:-1]) / 9
        if (table, model) == ("table3", "BiMediX (Bilingual)"):
            # the paper prints AVG 56.5, but its nine cells average 57.3: kept as printed, flagged in the
            # module
            assert mean == pytest.approx(57.34, abs=0.01)
            continue
        assert mean == pytest.approx(values[-1], abs=0.051), model


def test_avg_is_the_unweighted_mean_and_bilingual_cells_pool_both_languages():
    english = {s: (0.1 * (i + 1), 10 * (i + 1)) for i, s in enumerate(PAPER_SUBSETS)}
    arabic = {s: (0.05 * (i + 1), 10) for i, s in enumerate(PAPER_SUBSETS)}
    results = _results(english, arabic)
    assert average(subset_scores(results, "en")) == pytest.approx(sum(0.1 * k for k in range(1, 10)) / 9)
    pooled = subset_scores(results, "bilingual")["medqa"]  # 8th subset: en 0.8 on 80, ar 0.4 on 10
    assert pooled.acc == pytest.approx((0.8 * 80 + 0.4 * 10) / 90) and pooled.n == 90
    assert pooled.acc_norm == pytest.approx((0.4 * 80 + 0.2 * 10) / 90)
    text = format_table(results, "table4", model_name="mine")
    header, *rows = text.splitlines()[1:]
    assert header.split() == ["Model", "Cli-KG", "C-Bio", "C-Med", "Med-Gen", "Pro-Med", "Ana", "MedMCQA",
                              "MedQA",
                              "PubmedQA", "AVG"]
    assert rows[-2].split() == ["mine", "10.0", "20.0", "30.0", "40.0", "50.0", "60.0", "70.0", "80.0",
                                "90.0", "50.0"]
    assert rows[-1].split()[-1] == str(sum(10 * k for k in range(1, 10)))
    assert "Meditron-70B (reported)" in text


def test_missing_subsets_print_dashes_and_a_starred_partial_average():
    results = _results({"medqa": (0.5, 4), "pubmedqa": (0.25, 4)}, {})
    markdown = format_table(results, "table4", model_name="mine", markdown=True)
    assert "| mine | – | – | – | – | – | – | – | 50.0 | 25.0 | 37.5* |" in markdown
    assert format_table(results, "table3") is None
    assert "Table 2" not in format_tables(results) and "Table 4" in format_tables(results)


def _sample(doc_id: str, chosen: int, target: int, n_choices: int = 4) -> dict:
    return {"doc": {"id": doc_id}, "target": target,
            "filtered_resps": [(0.0 if i == chosen else -1.0, False) for i in range(n_choices)]}


def test_consistency_pairs_questions_by_id_and_scores_disagreements():
    samples = {
        "bimedix_medqa_en": [_sample("q1", 0, 0), _sample("q2", 1, 1), _sample("q3", 2, 3),
                             _sample("q4", 0, 0)],
        "bimedix_medqa_ar": [_sample("q1", 0, 0), _sample("q2", 2, 1), _sample("q3", 3, 3),
                             _sample("q5", 0, 0)],
        "bimedix_pubmedqa_en": [_sample("p1", 0, 0, 3)],
        "arabic_leaderboard_arabic_mmlu_anatomy": [_sample("x", 0, 0)],
    }
    report = bilingual_consistency(samples)
    medqa = report["medqa"]
    assert medqa["n"] == 3  # q4 / q5 have no twin
    assert medqa["agreement"] == pytest.approx(1 / 3) and medqa["both_correct"] == pytest.approx(1 / 3)
    assert medqa["n_disagree"] == 2
    assert medqa["en_acc_on_disagreement"] == pytest.approx(1 / 2)  # q2 right in English, q3 wrong
    assert medqa["ar_acc_on_disagreement"] == pytest.approx(1 / 2)  # q3 right in Arabic, q2 wrong
    assert set(report) == {"medqa", "all"} and report["all"] == medqa
    assert "Bilingual consistency" in format_tables({"results": {}, "bimedix_consistency": report})
