"""Hub kernels are opt-in: bimedix loads models offline and without the `kernels` package unless asked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bimedix.resources import resource_path

REPO = Path(__file__).resolve().parent.parent
RECIPE = resource_path("recipes", "tiny", "sft.yaml")

# Run in a fresh interpreter whose `sitecustomize` makes `kernels` unimportable (`import kernels` fails and
# `importlib.util.find_spec("kernels")` is None, as when it is not installed), with the Hub offline.
COMMANDS = textwrap.dedent("""
    import importlib.util, sys
    from bimedix.cli import main

    assert importlib.util.find_spec("kernels") is None, "kernels is still importable"
    model, recipe, out = sys.argv[1:4]
    small = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "64",
             "--max_steps", "1", "--save_strategy", "no", "--router_report", "false"]
    steps = {
        "sft": ["sft", "--config", recipe, "--output_dir", f"{out}/sft", *small],
        "merge": ["merge", "--base", model, "--adapter", f"{out}/sft", "--output", f"{out}/merged"],
        "eval": ["eval", "--model", f"{out}/merged", "--tasks", "bimedix_mmlu_anatomy_en", "--limit", "1",
                 "--device", "cpu", "--output", f"{out}/eval"],
        "chat": ["chat", "--model", f"{out}/merged", "--device", "cpu", "--max-new-tokens", "2"],
        "chat --use-kernels": ["chat", "--model", f"{out}/merged", "--device", "cpu", "--use-kernels"],
    }
    for name, argv in steps.items():
        sys.stdin = open(f"{out}/chat-input.txt", encoding="utf-8")
        print(f"== {name}: rc {main(argv)}", flush=True)
""")


@pytest.fixture(scope="module")
def blocked_run(tmp_path_factory, tiny_model_dir):
    """sft, merge, eval and chat on a tiny model with `kernels` unimportable and HF_HUB_OFFLINE=1."""
    tmp = tmp_path_factory.mktemp("no-kernels")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text('import sys\nsys.modules["kernels"] = None\n')
    (tmp / "chat-input.txt").write_text("What is anaemia?\n/exit\n", encoding="utf-8")
    recipe = Path(RECIPE).read_text(encoding="utf-8").replace("tiny_model: mixtral",
                                                              f"model_name_or_path: {tiny_model_dir}")
    (tmp / "sft.yaml").write_text(recipe.replace("bimedix:recipes/", f"{resource_path('recipes')}/"),
                                  encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp / "site"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("USE_HUB_KERNELS", None)  # transformers' default: hub kernels on
    result = subprocess.run([sys.executable, "-c", COMMANDS, str(tiny_model_dir), str(tmp / "sft.yaml"),
                             str(tmp)], capture_output=True, text=True, env=env, timeout=900)
    return tmp, result


@pytest.mark.parametrize("command", ["sft", "merge", "eval", "chat"])
def test_commands_load_models_without_kernels_package_and_offline(blocked_run, command):
    tmp, result = blocked_run
    output = result.stdout + result.stderr
    assert f"== {command}: rc 0" in result.stdout, output[-4000:]
    assert "Kernels are not available" not in output
    expected = {"sft": "sft/adapter_config.json", "merge": "merged/merge_report.json",
                "eval": "eval/results.json", "chat": "merged/config.json"}[command]
    assert (tmp / expected).is_file()


def test_asking_for_kernels_without_the_package_is_one_line_with_the_fix(blocked_run):
    _, result = blocked_run
    assert "== chat --use-kernels: rc 2" in result.stdout, (result.stdout + result.stderr)[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("bimedix chat: error:")]
    assert len(errors) == 1 and "`kernels` package is not importable" in errors[0]
    assert "pip install 'kernels>=" in errors[0] and "drop --use-kernels" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_kernel_missing_from_the_cache_offline_is_one_line_with_the_fix(tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    pytest.importorskip("kernels")
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, KernelConfig

    from bimedix.hub_kernels import HubKernelsError, load_pretrained

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # empty: the kernel was never downloaded
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    # what `kernels-community/rotary` did on the offline GPU machine, through a CPU-usable mapping
    config = KernelConfig({"RMSNorm": ("kernels-community/liger-kernels:LigerRMSNorm", {"version": 4})})
    with pytest.raises(HubKernelsError) as caught:
        load_pretrained(AutoModelForCausalLM, tiny_model_dir, use_kernels=True, kernel_config=config)
    message = str(caught.value)
    assert "\n" not in message and "not available in the local cache" in message
    assert "without HF_HUB_OFFLINE=1" in message and "drop --use-kernels" in message
    # not asked: the same load works offline
    model = load_pretrained(AutoModelForCausalLM, tiny_model_dir)
    assert not model.use_kernels


def test_kernels_are_used_only_when_asked(tiny_model_dir):
    pytest.importorskip("kernels")
    from transformers import AutoModelForCausalLM

    from bimedix.hub_kernels import apply_kernels, load_pretrained
    from bimedix.training.tiny import build_tiny_model

    assert not load_pretrained(AutoModelForCausalLM, tiny_model_dir).use_kernels
    assert load_pretrained(AutoModelForCausalLM, tiny_model_dir, use_kernels=True).use_kernels
    tiny = build_tiny_model("mixtral", seed=0)  # the in-process models of tiny recipes and `tiny:` bases
    apply_kernels(tiny)
    assert tiny.use_kernels
