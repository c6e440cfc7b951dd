"""The tiny SFT recipe end to end on CPU: adapter groups move, router report, exact resume, 2 processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_support import updated_lora_groups
from process_support import WatchedProcess
from transformers import TrainerCallback

from bimedix.resources import resource_path
from bimedix.training.provenance import base_fingerprint
from bimedix.training.sft import main, parse_args
from bimedix.training.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(resource_path("recipes", "tiny", "sft.yaml"))
SMALL = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "96",
         "--logging_steps", "1", "--warmup_steps", "1"]


def _run(output_dir, *flags, callbacks=None):
    return main(*parse_args(["--config", RECIPE, "--output_dir", str(output_dir), *SMALL, *flags]),
                callbacks=callbacks)


def _losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


class StopAt(TrainerCallback):
    """Stop training after ``step`` optimizer steps (as if the job were killed after that checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Four uninterrupted steps of the tiny recipe, checkpointing every two."""
    output = tmp_path_factory.mktemp("sft-full")
    return output, _run(output, "--max_steps", "4", "--save_steps", "2")


def test_every_adapter_group_is_updated_and_base_is_frozen(full_run):
    output, trainer = full_run
    model = trainer.model
    assert updated_lora_groups(model) == {"q_proj": True, "k_proj": True, "v_proj": True, "router": True,
                                          "experts": True}
    fresh = build_tiny_model("mixtral", seed=42).state_dict()
    frozen = {name.replace(".base_layer", "").replace(".original_module", ""): param
              for name, param in model.get_base_model().named_parameters()
              if "lora_" not in name and "modules_to_save" not in name}
    assert frozen.keys() == fresh.keys()
    # the recipe trains the head too
    trained_head = model.get_base_model().lm_head.modules_to_save["default"].weight
    assert not torch.equal(trained_head, fresh["lm_head.weight"])
    assert all(torch.equal(param, fresh[name]) for name, param in frozen.items())
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny:mixtral:42" and config["r"] == 8
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj", "gate.weight"]
    # what `bimedix merge` checks --base against
    record = json.loads((output / "bimedix_base.json").read_text())
    base = build_tiny_model("mixtral", seed=42)
    assert record == {"base_model": "tiny:mixtral:42", "fingerprint": base_fingerprint(base)}


def test_chat_prompts_the_adapter_as_it_was_trained(full_run, tmp_path):
    from bimedix.chat import ChatSession
    from bimedix.training.template import load_chat_settings, to_messages
    from bimedix.training.tiny import save_tiny_model

    output, trainer = full_run
    # the paper's: none
    assert load_chat_settings(output) == {"chat_template": "vicuna", "system_prompt": None}
    base = save_tiny_model(tmp_path / "base", "mixtral", seed=42)
    chat = ChatSession.from_pretrained(str(base), peft=str(output), device="cpu", max_new_tokens=2)
    record = {"conversations": [{"from": "human", "value": "ما هي أعراض فقر الدم؟"}]}
    trained = trainer.processing_class.apply_chat_template(to_messages(record), add_generation_prompt=True,
                                                           tokenize=False)
    assert chat.prompt("ما هي أعراض فقر الدم؟") == trained and "مساعد طبي" not in trained


def test_router_load_by_language_is_logged_and_reported(full_run):
    output, trainer = full_run
    report = json.loads((output / "router_load.json").read_text())
    assert report["top_k"] == 2
    for language in ("en", "ar"):
        counts = torch.tensor(report["languages"][language]["counts"])
        assert counts.shape == (2, 4) and counts.sum() > 0
        assert counts.sum() == report["languages"][language]["token_assignments"]
        # every token picks exactly top_k experts in every layer
        assert counts[0].sum() == counts[1].sum() and counts[0].sum() % 2 == 0
    losses = [e for e in trainer.state.log_history if "loss" in e]
    router = [e for e in trainer.state.log_history if "router/layer1/en_max_share" in e]
    assert all("aux_loss" in e for e in losses) and [e["step"] for e in router] == [1, 2, 3, 4]
    assert "router/layer0/tv_en_ar" in router[-1] and "router/layer1/ar_max_share" in router[-1]


def test_language_of_a_sample_is_read_from_its_tokens(mixtral_tokenizer):
    from bimedix.data.schema import read_records
    from bimedix.training.router_stats import arabic_token_table, sample_languages
    from bimedix.training.template import to_messages

    arabic = arabic_token_table(mixtral_tokenizer)
    for record in read_records(resource_path("recipes", "tiny", "data", "train.jsonl")):
        ids = torch.tensor(mixtral_tokenizer.apply_chat_template(
            to_messages(record, system="You are a careful medical assistant."), tokenize=True,
            return_dict=True
        )["input_ids"])
        language = sample_languages(ids, torch.zeros_like(ids), arabic)[0].item()
        assert ("en", "ar")[language] == record["language"], record["id"]


def test_resume_from_checkpoint_is_exact(full_run, tmp_path):
    _, uninterrupted = full_run
    expected = _losses(uninterrupted)
    stopped = _run(tmp_path, "--max_steps", "4", "--save_steps", "2", callbacks=[StopAt(2)])
    assert stopped.state.global_step == 2 and (tmp_path / "checkpoint-2").is_dir()
    resumed = _run(tmp_path, "--max_steps", "4", "--save_steps", "2",
                   "--resume_from_checkpoint", str(tmp_path / "checkpoint-2"))
    # steps 1-2 come from checkpoint-2's trainer state, 3-4 were trained after resuming
    losses = _losses(resumed)
    assert sorted(losses) == [1, 2, 3, 4] and resumed.state.global_step == 4
    for step in (3, 4):
        assert losses[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
    assert _losses(stopped) == {1: expected[1], 2: expected[2]}


def test_final_files_are_swapped_in_whole(full_run, tmp_path, monkeypatch):
    """A run that dies while saving its final files leaves the earlier run's files whole (no new weights
    beside an old base record), keeps the checkpoints, and leaves no staging folder behind."""
    import bimedix.training.sft as sft

    output = tmp_path / "run"
    _run(output, "--max_steps", "2", "--save_steps", "2")
    before = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()}
    assert "adapter_model.safetensors" in before and (output / "checkpoint-2").is_dir()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill between the adapter and the base record

    monkeypatch.setattr(sft, "write_base_record", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(output, "--max_steps", "2", "--save_strategy", "no", "--seed", "7")
    assert {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()} == before
    assert (output / "checkpoint-2" / "trainer_state.json").is_file()
    assert not list(tmp_path.glob(".*staging"))

    monkeypatch.undo()
    _run(output, "--max_steps", "2", "--save_strategy", "no", "--seed", "7")
    after = (output / "adapter_model.safetensors").read_bytes()
    assert after != before["adapter_model.safetensors"] and (output / "checkpoint-2").is_dir()
    assert not list(tmp_path.glob(".*staging"))


def test_output_dir_dot_and_a_link_get_their_final_files_beside_not_inside(tmp_path, monkeypatch):
    """``--output_dir .`` (run from inside the folder) and a symlinked folder stage beside the real folder,
    and the final files land in it."""
    real = tmp_path / "real"
    real.mkdir()
    monkeypatch.chdir(real)
    _run(".", "--max_steps", "1", "--save_strategy", "no")
    assert Path.cwd() == real and (real / "adapter_model.safetensors").is_file()
    assert not list(real.glob(".*staging")) and not list(tmp_path.glob(".*staging"))
    (tmp_path / "link").symlink_to(real)
    _run(tmp_path / "link", "--max_steps", "1", "--save_strategy", "no", "--seed", "3")
    assert (tmp_path / "link").is_symlink() and (real / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".*staging")) and not list(real.glob(".*staging"))


def test_a_recipe_is_checked_once_when_loaded_and_main_checks_what_needs_the_model(tmp_path, monkeypatch):
    import bimedix.training.sft as sft

    calls = []
    for name in ("check_values", "check_conflicts", "check_lora_patterns", "check_compatible"):
        def spy(*args, _name=name, _check=getattr(sft, name), **kwargs):
            calls.append(_name)
            return _check(*args, **kwargs)

        monkeypatch.setattr(sft, name, spy)
    (tmp_path / "notes.txt").write_text("not a run's")  # stops `main` before anything loads
    with pytest.raises(ValueError, match="is not empty and was not made by `bimedix sft`"):
        main(*parse_args(["--config", RECIPE, "--output_dir", str(tmp_path)]))
    assert calls == ["check_values", "check_conflicts", "check_lora_patterns", "check_compatible"]


def test_unknown_keys_are_errors(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(Path(RECIPE).read_text() + "\nlora_rank: 16\n")
    with pytest.raises(ValueError, match="lora_rank"):
        parse_args(["--config", str(recipe)])
    with pytest.raises(ValueError, match="no_such_flag"):
        parse_args(["--config", RECIPE, "--no_such_flag", "1"])
    with pytest.raises(ValueError, match="lora_preset='experts_only'"):
        parse_args(["--config", RECIPE, "--lora_preset", "experts_only"])
    from bimedix.cli import main as cli

    assert cli(["sft", "--config", str(recipe)]) == 2


@pytest.mark.parametrize("line, message", [
    ("seed: 1.5", "`seed` must be an integer, got 1.5 (float)"),
    ("lora_r: [8]", "`lora_r` must be an integer, got [8] (list)"),
    ("use_peft: 1", "`use_peft` must be true or false, got 1 (int)"),
])
def test_recipe_values_are_type_checked_naming_the_key(tmp_path, line, message):
    key = line.split(":")[0]
    recipe = tmp_path / "typed.yaml"
    kept = [row for row in Path(RECIPE).read_text().splitlines() if not row.startswith(f"{key}:")]
    recipe.write_text("\n".join(kept) + f"\n{line}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(["--config", str(recipe)])
    recipe.write_text("\n".join(kept) + '\nseed: "abc"\n')
    with pytest.raises(SystemExit):  # argparse converts quoted YAML values itself and names the flag
        parse_args(["--config", str(recipe)])


def test_dataset_sources_mixture_and_bad_records(tmp_path):
    from datasets import Dataset
    from trl import DatasetMixtureConfig, ScriptArguments
    from trl.scripts.utils import DatasetConfig

    from bimedix.data.schema import FEATURES, RecordError, normalize_record, read_records
    from bimedix.training.sft import load_sft_dataset

    jsonl = resource_path("recipes", "tiny", "data", "train.jsonl")
    records = [normalize_record(r) for r in read_records(jsonl)]
    Dataset.from_list(records[:10], features=FEATURES).to_parquet(str(tmp_path / "built" / "part-0.parquet"))
    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path=str(jsonl), fraction=0.75),
                                             DatasetConfig(path=str(tmp_path / "built"), fraction=0.25)])
    train = load_sft_dataset(ScriptArguments(), mixture, system_prompt="Be careful.")["train"]
    assert train.column_names == ["messages"] and len(train) == 40  # 30 + 10: no source oversampled
    assert train[0]["messages"][0] == {"role": "system", "content": "Be careful."}
    assert train[0]["messages"][1]["content"] == records[0]["conversations"][0]["value"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl.read_text().splitlines()[0] + "\n" + '{"id": "x", "source": "s", "task": "qa"}\n')
    with pytest.raises(RecordError, match="bad.jsonl"):
        load_sft_dataset(ScriptArguments(), DatasetMixtureConfig(datasets=[DatasetConfig(path=str(bad))]))
    with pytest.raises(ValueError, match="No data"):
        load_sft_dataset(ScriptArguments(), DatasetMixtureConfig())


def test_two_processes_both_ranks_finish(full_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "recipes" / "sft.py"), "--config", RECIPE, "--output_dir", str(tmp_path), *SMALL,
               "--max_steps", "2", "--save_strategy", "no"]
    with WatchedProcess(command, env=env, cwd=tmp_path) as run:
        result = run.finish()
        assert result.returncode == 0, run.output(3000)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    epochs = re.findall(r"'epoch': '([0-9.]+)'", result.stdout + result.stderr)
    # each step consumes twice the rows of the single-process run: both ranks trained
    single = next(e["epoch"] for e in full_run[1].state.log_history if e.get("step") == 2 and "loss" in e)
    assert float(epochs[-1]) == pytest.approx(2 * single, abs=1e-3)


def test_bimedix_sft_writes_the_model_card_with_the_final_files(tmp_path, capsys):
    from bimedix.cli import main as cli

    output = tmp_path / "run"
    assert cli(["sft", "--config", RECIPE, "--output_dir", str(output), *SMALL, "--max_steps", "1",
                "--save_strategy", "no"]) == 0
    card = (output / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and "not medical advice" in card.lower()
    assert f"model card: {output / 'README.md'}" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*staging"))


def test_every_row_masked_after_truncation_says_all_rows_were_dropped(tmp_path, capsys):
    from bimedix.cli import main as cli

    assert cli(["sft", "--config", RECIPE, "--max_length", "16", "--max_steps", "1",
                "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("all 48 training rows were dropped: after truncation to max_length=16 they have no assistant "
            "token" in err)
    assert "Raise `max_length`" in err and "num_samples" not in err


@pytest.mark.parametrize("flags, expected", [([], "sdpa"), (["--attn_implementation", "eager"], "eager"),
                                             (["--attn_implementation", "eager", "--load_in_4bit", "true"],
                                              "eager")])
def test_tiny_model_uses_the_recipes_attention_kernel(tmp_path, flags, expected):
    pytest.importorskip("bitsandbytes")
    from bimedix.training.sft import load_model

    _, training, model_args, _, bimedix = parse_args(["--config", RECIPE, "--output_dir", str(tmp_path),
                                                      "--use_cpu", "true", *flags])
    model = load_model(model_args, training, bimedix)
    assert model.config._attn_implementation == expected
    assert model.model.layers[0].self_attn.config._attn_implementation == expected


def test_missing_model_folder_is_named(tmp_path, capsys):
    from bimedix.cli import main as cli

    recipe = tmp_path / "local.yaml"
    recipe.write_text(Path(RECIPE).read_text().replace("tiny_model: mixtral",
                                                       f"model_name_or_path: {tmp_path}/nope"))
    assert cli(["sft", "--config", str(recipe), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"model_name_or_path {tmp_path}/nope: no such model folder" in err and "Repo id" not in err


def test_recipe_script_reports_errors_like_the_cli(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(Path(RECIPE).read_text() + "\nlora_rank: 16\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), "--config", str(recipe)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("recipes/sft.py: error:") and "lora_rank" in errors[0]
