"""Every YAML under recipes/ parses into the dataclasses that read it; unknown keys are errors."""

from __future__ import annotations

import pytest

from bimedix.resources import resource_path

RECIPES = resource_path("recipes")
SFT_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml")
                     if "accelerate_configs" not in p.parts and "data" not in p.relative_to(RECIPES).parts)


def test_there_are_sft_recipes():
    assert {p.relative_to(RECIPES).as_posix() for p in SFT_RECIPES} >= {"tiny/sft.yaml",
                                                                       "bimedix-mixtral/sft_qlora.yaml"}


@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_sft_recipe_parses(recipe):
    from bimedix.training.sft import parse_args

    script, training, model, mixture, bimedix = parse_args(["--config", str(recipe), "--use_cpu", "true"])
    assert training.assistant_only_loss and bimedix.chat_template == "vicuna"
    assert mixture.datasets or script.dataset_name
    assert model.model_name_or_path or bimedix.tiny_model


def test_load_recipe_names_the_parts_and_applies_overrides_after_the_file():
    from bimedix.training.sft import SFTRecipe, load_recipe

    recipe = load_recipe(RECIPES / "tiny" / "sft.yaml", ["--learning_rate", "0.125"], use_cpu=True)
    assert isinstance(recipe, SFTRecipe) and recipe.training.learning_rate == 0.125
    assert recipe.training.use_cpu and recipe.bimedix.tiny_model and recipe.model is recipe[2]


def test_paper_recipe_has_the_papers_hyper_parameters():
    from bimedix.training.sft import parse_args

    _, training, model, _, bimedix = parse_args(
        ["--config", str(RECIPES / "bimedix-mixtral" / "sft_qlora.yaml"), "--use_cpu", "true"])
    assert (model.lora_r, model.lora_alpha, bimedix.lora_preset,
            model.load_in_4bit) == (128, 64, "paper", True)
    assert (training.learning_rate, str(training.lr_scheduler_type.value),
            training.warmup_steps) == (2e-4, "cosine", 10)
    assert training.per_device_train_batch_size * 8 * training.gradient_accumulation_steps == 16  # 8 GPUs
    # the paper's 2 accumulation steps of 1 sample, as one padding-free micro-batch of 2 (test_fast_paths.py)
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (2, 1)
    assert training.padding_free and not training.packing and training.num_train_epochs == 2
    assert bimedix.expert_lora == "folded" and bimedix.quantize_experts == "nf4"
    assert training.activation_checkpointing and training.bf16 and training.optim.value == "adamw_torch"


@pytest.mark.parametrize("config", sorted((RECIPES / "accelerate_configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_accelerate_config_loads(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes == 8 and loaded.mixed_precision == "bf16"


@pytest.mark.parametrize("recipe", sorted((RECIPES / "data").glob("*.yaml")), ids=lambda p: p.name)
def test_data_recipe_loads(recipe):
    from bimedix.data.recipe import load_data_recipe

    assert load_data_recipe(recipe).sources


@pytest.mark.parametrize("flags, named", [
    (["--model_name_or_path", "MY_MODEL"], ["tiny_model: mixtral", "model_name_or_path: MY_MODEL"]),
    (["--model_revision", "v2"], ["tiny_model: mixtral", "model_revision: v2"]),
    (["--lora_preset", "attention", "--lora_target_modules", "q_proj"], ["lora_preset: attention",
                                                                         "lora_target_modules"]),
    (["--use_peft", "false", "--expert_lora", "folded"], ["expert_lora: folded", "use_peft: true"]),
])
def test_conflicting_recipe_keys_are_errors_naming_both(flags, named):
    from bimedix.training.sft import parse_args

    with pytest.raises(ValueError, match="contradict") as error:
        parse_args(["--config", str(RECIPES / "tiny" / "sft.yaml"), "--use_cpu", "true", *flags])
    assert all(name in str(error.value) for name in named), str(error.value)


def test_tiny_model_config_without_tiny_model_is_a_conflict_naming_the_file():
    from bimedix.training.sft import load_recipe

    recipe = RECIPES / "bimedix-mixtral" / "sft_qlora.yaml"
    with pytest.raises(ValueError, match="contradict") as error:
        load_recipe(recipe, ["--tiny_model_config", '{"hidden_size": 32}'], use_cpu=True)
    assert str(error.value).startswith(f"{recipe}: the recipe") and "`tiny_model`, which is not set" in str(
        error.value)


@pytest.mark.parametrize("key, value, allowed", [
    ("chat_template", "chatml", "['vicuna', 'model']"),  # a `Literal` type
    ("quantize_experts", "int3", "['nf4', 'fp4'] (or unset)"),  # an optional `Literal`
    ("lora_preset", "experts_only", "['paper', 'attention', 'experts', 'all']"),  # `choices` from PRESETS
    ("packing_strategy", "bdf", "['bfd', 'bfd_split', 'wrapped']"),  # TRL's own `choices` metadata
])
def test_undeclared_values_are_errors_in_the_file_and_on_the_command_line(tmp_path, key, value, allowed):
    import yaml

    from bimedix.training.sft import load_recipe

    tiny = RECIPES / "tiny" / "sft.yaml"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(tiny.read_text(encoding="utf-8")), key: value}),
                      encoding="utf-8")
    # argparse never checks `choices` against YAML values; on the command line the message is the same one
    for path, flags in ((recipe, []), (tiny, [f"--{key}", value])):
        with pytest.raises(ValueError) as error:
            load_recipe(path, flags, use_cpu=True)
        assert str(error.value).startswith(f"{path}: {key}={value!r} is not one of {allowed}; "), error.value


def test_recipes_sft_help_lists_the_flags_and_their_declared_values():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "recipes" / "sft.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    flags = ("--lora_preset {paper,attention,experts,all}", "--chat_template {vicuna,model}",
             "--quantize_experts {nf4,fp4}", "--learning_rate", "--lora_r", "--dataset_name")
    assert result.stdout.startswith("usage: sft.py") and all(flag in result.stdout for flag in flags)
