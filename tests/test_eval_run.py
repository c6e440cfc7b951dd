"""``bimedix eval`` end to end on a tiny random MoE (with and without a LoRA adapter), and its plain
errors."""

from __future__ import annotations

import json

import pytest

from bimedix.cli import main
from bimedix.eval.bench import PAPER_SUBSETS
from bimedix.eval.run import backend_model_args, check_adapter, evaluate, expert_lora_targets, resolve_tasks


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, eval_bench_dir, tmp_path_factory):
    """One CLI run over every paper task (bimedix_bilingual = all 18 tasks), 2 questions each."""
    output = tmp_path_factory.mktemp("eval-out")
    code = main(["eval", "--model", str(tiny_model_dir), "--tasks", "bimedix_bilingual", "--limit", "2",
                 "--data-dir", str(eval_bench_dir), "--device", "cpu", "--output", str(output)])
    assert code == 0
    return output


def test_tiny_moe_completes_every_task_and_writes_lm_eval_json_and_tables(cli_run):
    results = json.loads((cli_run / "results.json").read_text(encoding="utf-8"))
    for subset in PAPER_SUBSETS:
        for language in ("en", "ar"):
            task = f"bimedix_{subset}_{language}"
            assert results["n-samples"][task]["effective"] == 2, task
            assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
            assert (cli_run / f"samples_{task}.jsonl").is_file()
    assert "bimedix_bilingual" in results["results"] and "bimedix_medqa_bilingual" in results["groups"]
    tables = (cli_run / "tables.md").read_text(encoding="utf-8")
    for title in ("Table 2: Bilingual", "Table 3: Arabic", "Table 4: English"):
        assert title in tables
    assert "| BiMediX (Bilingual) (reported) | 70.6 |" in tables and "not all nine" not in tables
    consistency = json.loads((cli_run / "consistency.json").read_text(encoding="utf-8"))
    assert consistency["all"]["n"] == 18 and 0.0 <= consistency["all"]["agreement"] <= 1.0


def test_tiny_moe_with_saved_lora_adapter(tiny_model_dir, tiny_adapter_dir, eval_bench_dir, tmp_path):
    results = evaluate(str(tiny_model_dir), peft=str(tiny_adapter_dir), tasks="bimedix_bilingual",
                       data_dir=eval_bench_dir, limit=1, device="cpu", output_dir=tmp_path)
    assert results["config"]["model_args"]["peft"] == str(tiny_adapter_dir)
    for subset in PAPER_SUBSETS:
        assert results["n-samples"][f"bimedix_{subset}_ar"]["effective"] == 1
        assert results["n-samples"][f"bimedix_{subset}_en"]["effective"] == 1
    assert results["bimedix_consistency"]["all"]["n"] == 9


def test_adapter_for_another_base_model_is_refused(tiny_adapter_dir, tmp_path):
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}),
                                       encoding="utf-8")
    with pytest.raises(ValueError, match="was trained on base model"):
        check_adapter(str(other), str(tiny_adapter_dir))
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        check_adapter(str(other), str(other))


def test_vllm_backend_gets_the_adapter_rank(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for rank, pattern, expected in ((128, {}, 128), (4, {"experts": 100}, 128), (16, {}, 16)):
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"base_model_name_or_path": str(tiny_model_dir), "r": rank, "rank_pattern": pattern}),
                                                     encoding="utf-8")
        args = backend_model_args("vllm", str(tiny_model_dir), peft=str(adapter))
        assert args == {"pretrained": str(tiny_model_dir), "lora_local_path": str(adapter),
                        "max_lora_rank": expected}
    assert backend_model_args("hf", "m", peft="a")["peft"] == "a"


def test_unknown_task_and_missing_subset_are_plain_cli_errors(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['bimedix_medqa_fr'\].*bimedix_medqa_ar"):
        resolve_tasks("bimedix_medqa_fr")
    names, manager = resolve_tasks("bimedix_en, arabic_leaderboard_arabic_mmlu_anatomy")
    # lm-eval's own task side by side
    assert names == ["bimedix_en", "arabic_leaderboard_arabic_mmlu_anatomy"]
    assert "arabic_leaderboard_arabic_mmlu_anatomy" in manager.all_tasks
    code = main(["eval", "--model", str(tiny_model_dir), "--tasks", "bimedix_ar", "--output", str(tmp_path)])
    assert code == 2
    assert "no Arabic subset 'medmcqa'" in capsys.readouterr().err


def test_data_dir_with_a_parquet_file_of_another_schema_is_a_plain_error(tiny_model_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bench" / "english" / "medqa" / "test.parquet"
    bad.parent.mkdir(parents=True)
    pq.write_table(pa.table({"q": ["What is anemia?"], "a": ["B"]}), bad)
    code = main(["eval", "--model", str(tiny_model_dir), "--tasks", "bimedix_medqa_en", "--limit", "1",
                 "--data-dir", str(tmp_path / "bench"), "--device", "cpu", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{bad}: no column `id` (found: ['q', 'a'])" in err and "bimedix build-bench" in err


@pytest.mark.parametrize("command", [["eval", "--output", "out"], ["chat"]])
def test_missing_model_folder_is_named_not_taken_for_a_repo_id(tmp_path, capsys, command):
    missing = tmp_path / "nonexistent"
    assert main([*command, "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--model {missing}: no such model folder ({missing} does not exist)" in err
    assert "Repo id" not in err and "Traceback" not in err


@pytest.mark.parametrize(("targets", "experts"), [
    (["mlp.gate.weight"], []),  # router only: vLLM may serve it as LoRA
    ([], []),
    (["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
     ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    (["model.layers.0.mlp.experts.down_proj"], ["model.layers.0.mlp.experts.down_proj"]),
    (["gate_up_proj"], ["gate_up_proj"]),
])
def test_expert_lora_targets(targets, experts):
    assert expert_lora_targets({"target_modules": ["q_proj"], "target_parameters": targets}) == experts


def test_vllm_refuses_an_expert_adapter_as_lora_and_names_the_merge(tiny_model_dir, tiny_adapter_dir):
    with pytest.raises(ValueError,
                       match=r"fused MoE experts.*bimedix merge --base .* --adapter .*vllm serve MERGED"):
        backend_model_args("vllm", str(tiny_model_dir), peft=str(tiny_adapter_dir))
    assert backend_model_args("hf", str(tiny_model_dir),
                              peft=str(tiny_adapter_dir))["peft"] == str(tiny_adapter_dir)


def test_cli_vllm_eval_of_an_expert_adapter_evaluates_a_merged_copy(tiny_model_dir, tiny_adapter_dir,
                                                                    tmp_path, monkeypatch, capsys):
    """No vLLM needed: `evaluate` is replaced by a recorder; the merge (with its logit check) runs for
    real."""
    import bimedix.eval.run
    import bimedix.eval.tables

    seen = {}

    def record(model, peft=None, **kwargs):
        folder = __import__("pathlib").Path(model)
        seen.update(model=model, peft=peft, backend=kwargs["backend"],
                    files=sorted(p.name for p in folder.iterdir()),
                    report=json.loads((folder / "merge_report.json").read_text(encoding="utf-8")))
        return {"results": {}}

    monkeypatch.setattr(bimedix.eval.run, "evaluate", record)
    monkeypatch.setattr(bimedix.eval.tables, "format_tables", lambda results, model_name: "")
    output = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--peft", str(tiny_adapter_dir), "--backend", "vllm",
                 "--output", str(output)]) == 0
    assert seen["peft"] is None and seen["backend"] == "vllm" and "model.safetensors" in seen["files"]
    assert seen["report"]["max_abs_diff_merged_vs_adapter"] < 1e-3
    assert not list(output.glob("merged-*"))  # the temporary merged copy is gone
    assert "merging it into" in capsys.readouterr().out
