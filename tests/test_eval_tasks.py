"""The packaged lm-eval tasks: they parse, render the documented prompts, and score exactly with a known
LM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bimedix.eval.bench import PAPER_SUBSETS, build_bench, read_bench
from bimedix.eval.run import evaluate, tasks_dir
from bimedix.eval.tables import average, subset_scores
from bimedix.eval.tasks._generate_configs import generate

SNAPSHOTS = Path(__file__).parent / "fixtures" / "eval_prompt_snapshots.json"
LEAF_TASKS = [f"bimedix_{s}_{lang}" for s in PAPER_SUBSETS for lang in ("en", "ar")]


def test_committed_task_yamls_equal_generated():
    generated = generate()
    committed = {p.name for p in tasks_dir().glob("bimedix_*.yaml")}
    assert committed == set(generated), "run `python -m bimedix.eval.tasks._generate_configs`"
    for name, text in generated.items():
        assert (tasks_dir() / name).read_text(encoding="utf-8") == text, f"{name} is out of date"


def _register_stub():
    import lm_eval.models  # noqa: F401  (lm-eval fills its built-in backends only into an empty registry)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    @register_model("bimedix-stub")
    class StubLM(LM):
        """Known log-likelihoods: 0 for the preferred continuation, -1 for the others.

        ``prefer="A"`` prefers option A in both languages (" A", " أ", and " yes"/" نعم" for PubMedQA);
        ``prefer="gold"`` prefers the gold choice of the prompt (looked up in ``gold``: prompt end → choice).
        """

        def __init__(self, prefer: str = "A", gold: dict[str, str] | None = None, **kwargs):
            super().__init__()
            self.prefer, self.gold = prefer, gold or {}

        def _preferred(self, context: str) -> set[str]:
            if self.prefer == "A":
                return {" A", " أ", " yes", " نعم"}
            return {choice for prompt, choice in self.gold.items() if context.endswith(prompt)}

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [(0.0 if r.args[1] in self._preferred(r.args[0]) else -1.0, False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return StubLM


@pytest.fixture(scope="module")
def stub_lm():
    from lm_eval.api.registry import MODEL_REGISTRY

    return MODEL_REGISTRY.get("bimedix-stub", None) or _register_stub()


@pytest.fixture(scope="module")
def real_bench(shared_data, tmp_path_factory) -> Path:
    """20 real rows per subset from ../shared/data (English originals, AceGPT Arabic MMLU)."""
    output = tmp_path_factory.mktemp("real-bench")
    build_bench(shared_data, output, limit=20, subsets=list(PAPER_SUBSETS))
    return output


def test_every_task_yaml_parses_and_is_indexed():
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    for path in sorted(tasks_dir().glob("*.yaml")):
        assert isinstance(load_yaml(path, resolve_func=True), dict), path
    names = set(TaskManager(include_path=str(tasks_dir()), include_defaults=False).all_tasks)
    expected = {*LEAF_TASKS, *(f"bimedix_{s}_bilingual" for s in PAPER_SUBSETS), "bimedix_en", "bimedix_ar",
                "bimedix_bilingual", "bimedix_table2", "bimedix_table3", "bimedix_table4",
                "bimedix_medarabench_ar"}
    assert expected <= names


def test_rendered_prompts_match_snapshots(eval_bench_dir):
    """One English and one Arabic prompt per subset (first row), with its scored choices and gold index."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False,
                          metadata={"data_dir": str(eval_bench_dir)})
    rendered = {}
    for name, task in manager.load(LEAF_TASKS)["tasks"].items():
        doc = task.test_docs()[0]
        rendered[name] = {"prompt": task.fewshot_context(doc, 0), "choices": task.doc_to_choice(doc),
                          "target": task.doc_to_target(doc)}
    if os.environ.get("BIMEDIX_UPDATE_SNAPSHOTS"):
        SNAPSHOTS.write_text(json.dumps(rendered, ensure_ascii=False, indent=1, sort_keys=True) + "\n",
                             encoding="utf-8")
    expected = json.loads(SNAPSHOTS.read_text(encoding="utf-8"))
    assert sorted(rendered) == sorted(expected)
    for name in rendered:
        assert rendered[name] == expected[name], name
    assert rendered["bimedix_medqa_ar"]["prompt"].endswith("د. الربط المتصالب للحمض النووي\nالإجابة:")
    assert rendered["bimedix_pubmedqa_en"]["choices"] == ["yes", "no", "maybe"]


def test_stub_preferring_a_scores_the_share_of_gold_a_on_real_rows(real_bench, stub_lm, shared_data):
    results = evaluate(stub_lm(prefer="A"),
                       tasks="bimedix_en,bimedix_mmlu_anatomy_ar,bimedix_mmlu_college_biology_ar",
                       data_dir=real_bench)
    rows = read_bench(real_bench)
    for (subset, language), subset_rows in rows.items():
        task = f"bimedix_{subset}_{language}"
        if task not in results["results"]:
            continue
        expected = sum(row["answer"] == "A" for row in subset_rows) / len(subset_rows)
        assert results["results"][task]["acc,none"] == pytest.approx(expected), task
        assert results["results"][task]["acc_norm,none"] == pytest.approx(expected), task
    # hand check on the original file: MedQA's first 20 gold letters (answer_idx)
    medqa_file = shared_data / "medqa_usmle/data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl"
    gold = [json.loads(line)["answer_idx"]
            for line in medqa_file.read_text(encoding="utf-8").splitlines()[:20]]
    assert results["results"]["bimedix_medqa_en"]["acc,none"] == pytest.approx(gold.count("A") / 20)
    # the group score is the paper's AVG: the unweighted mean of the nine subsets
    english = subset_scores(results, "en")
    hand = sum(s.acc for s in english.values()) / 9
    assert len(english) == 9
    assert average(english) == pytest.approx(hand)
    assert results["results"]["bimedix_en"]["acc,none"] == pytest.approx(hand)


def test_stub_preferring_gold_scores_one_and_pools_bilingual(real_bench, stub_lm):
    from bimedix.eval.tasks import utils

    gold = {}
    for rows in read_bench(real_bench).values():
        for row in rows:
            gold[utils.doc_to_text(row)] = " " + utils.doc_to_choice(row)[utils.doc_to_target(row)]
    tasks = "bimedix_mmlu_anatomy_bilingual,bimedix_mmlu_medical_genetics_bilingual,bimedix_pubmedqa_en"
    results = evaluate(stub_lm(prefer="gold", gold=gold), tasks=tasks, data_dir=real_bench)
    for task in ("bimedix_mmlu_anatomy_en", "bimedix_mmlu_anatomy_ar", "bimedix_mmlu_medical_genetics_ar",
                 "bimedix_pubmedqa_en"):
        assert results["results"][task]["acc,none"] == 1.0, task
    assert results["results"]["bimedix_mmlu_anatomy_bilingual"]["acc,none"] == 1.0
    consistency = results["bimedix_consistency"]
    assert consistency["mmlu_anatomy"]["agreement"] == 1.0 and consistency["all"]["n"] == 40


def test_request_cache_lets_a_rerun_resume_without_asking_the_model_again(stub_lm, tmp_path):
    class CountingStub(stub_lm):
        calls = 0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            CountingStub.calls += len(requests)
            return super().loglikelihood(requests, disable_tqdm)

    first = evaluate(CountingStub(prefer="A"), tasks="bimedix_medqa_en", limit=3, cache=tmp_path / "cache")
    asked = CountingStub.calls
    second = evaluate(CountingStub(prefer="A"), tasks="bimedix_medqa_en", limit=3, cache=tmp_path / "cache")
    assert asked == 12 and CountingStub.calls == asked  # 3 questions x 4 options, all answered from the cache
    accuracy = first["results"]["bimedix_medqa_en"]["acc,none"]
    assert second["results"]["bimedix_medqa_en"]["acc,none"] == accuracy


def test_medarabench_task_scores_up_to_six_arabic_letters(shared_data, tmp_path):
    from lm_eval.tasks import TaskManager

    from bimedix.data.rejects import RejectLog

    with RejectLog() as rejects:
        build_bench(shared_data, tmp_path, limit=200, subsets=["medarabench"], on_error=rejects)
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False,
                          metadata={"data_dir": str(tmp_path)})
    task = manager.load("bimedix_medarabench_ar")["tasks"]["bimedix_medarabench_ar"]
    doc = next(doc for doc in task.test_docs() if len(doc["options"]) == 5)
    assert task.doc_to_choice(doc) == ["أ", "ب", "ج", "د", "هـ"]
    assert f"\nهـ. {doc['options'][4]}\nالإجابة:" in task.fewshot_context(doc, 0)
    assert task.doc_to_target(doc) == "ABCDE".index(doc["answer"])
