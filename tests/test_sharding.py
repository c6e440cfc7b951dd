"""4-bit experts under FSDP (`bimedix.training.sharding`): shardable quantization state, the launch checks,
and 2-process CPU (gloo) runs of the tiny 4-bit-experts recipe under FSDP: same loss as one process, half the
expert bytes per rank, an adapter `bimedix merge` accepts, and resuming after a kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from bimedix.resources import resource_path  # noqa: E402
from bimedix.training.sft import check_compatible, parse_args  # noqa: E402
from bimedix.training.sharding import check_one_job, make_experts_shardable, placement_line  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = resource_path("recipes", "tiny", "sft_4bit_experts.yaml")
QLORA = ["--load_in_4bit", "true", "--use_bnb_nested_quant", "true", "--bnb_4bit_quant_type", "nf4",
         "--dtype", "bfloat16"]
SHORT = ["--max_length", "96", "--logging_steps", "1", "--warmup_steps", "1", "--gradient_accumulation_steps",
         "1", "--router_aux_loss_coef", "0", "--router_report", "false"]


def _tiny_4bit_model(mode: str):
    from peft import get_peft_model

    from bimedix.training.moe.expert_lora import set_expert_lora_mode
    from bimedix.training.moe.quantize import quantize_experts
    from bimedix.training.moe.targets import build_lora_config
    from bimedix.training.tiny import build_tiny_model

    model = build_tiny_model("mixtral", seed=0)
    model = get_peft_model(model, build_lora_config(model, "paper", r=8, alpha=4))
    quantize_experts(model)
    set_expert_lora_mode(model, mode)
    return model


@pytest.mark.parametrize("mode", ["folded", "peft"])
def test_shardable_experts_keep_the_logits_and_hold_their_statistics_as_parameters(mode):
    model = _tiny_4bit_model(mode)
    ids = torch.tensor([[1, 330, 1149, 28747, 4567, 349, 264, 1369, 28723, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    names = make_experts_shardable(model)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert len(names) == 4  # 2 layers x (gate_up_proj, down_proj)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    keys = model.state_dict().keys()
    stats = [k for k in keys if k.endswith(("gate_up_proj.0.absmax", "gate_up_proj.0.nested_absmax"))]
    assert len(stats) == 4, stats
    # bitsandbytes' packed keys (`...gate_up_proj.quant_state.bitsandbytes__nf4`) would break FSDP checkpoints
    assert not [k for k in keys if "quant_state" in k or "quant_map" in k]
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and not [n for n in trainable if "parametrizations" in n]


def test_placement_line_names_the_bytes_held_and_the_whole():
    model = _tiny_4bit_model("folded")
    make_experts_shardable(model)
    line = placement_line(model, "one process", 1)
    assert re.fullmatch(r"rank 0 holds (\S+ \S+) of \1 frozen weights \(one process\); "
                        r"4-bit experts (\S+ KiB) of \2", line), line


@pytest.mark.parametrize("flags", [["--fsdp", "true"], ["--fsdp", "full_shard auto_wrap"], ["--fsdp"]])
def test_fsdp_is_reachable_from_the_command_line(flags):
    _, training, *_ = parse_args(["--config", str(RECIPE), *flags])
    assert training.fsdp is True and training.fsdp_plugin_args["fsdp_version"] == 2


def test_fsdp_is_reachable_from_a_recipe(tmp_path):
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(RECIPE.read_text() + "fsdp: true\nfsdp_config:\n  transformer_layer_cls_to_wrap: "
                      "[MixtralDecoderLayer]\n")
    _, training, model_args, _, bimedix_args = parse_args(["--config", str(recipe)])
    assert training.fsdp is True
    assert training.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "MixtralDecoderLayer"
    check_compatible(training, model_args, bimedix_args)  # 4-bit experts are no longer refused under FSDP
    _, training, *_ = parse_args(["--config", str(recipe), "--fsdp", "false"])
    assert not training.fsdp


@pytest.mark.parametrize(("flags", "env", "message"), [
    ([], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
     r"quantize_experts: nf4.*FSDP2 only.*fsdp_version"),
    (["--fsdp", "true", "--fsdp_config", '{"version": 1}'], {}, r"FSDP2 only.*fsdp_config: \{version: 1\}"),
    ([], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
     r"fsdp_activation_checkpointing: true.*`activation_checkpointing: true` in the recipe"),
])
def test_what_fsdp_cannot_do_with_4bit_experts_is_refused_naming_the_keys(flags, env, message, monkeypatch):
    with pytest.raises(ValueError, match=message):
        _, training, model_args, _, bimedix_args = parse_args(["--config", str(RECIPE), *flags])
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        check_compatible(training, model_args, bimedix_args)


@pytest.mark.parametrize(("env", "fsdp", "message"), [
    ({"OMPI_COMM_WORLD_SIZE": "2"}, False, r"OMPI_COMM_WORLD_SIZE=2: 2 tasks.*WORLD_SIZE is unset"),
    ({"SLURM_NTASKS": "8"}, True, r"SLURM_NTASKS=8"),
    ({"ACCELERATE_USE_CPU": "True"}, True, r"accelerate launch --cpu.*torch.distributed.run"),
])
def test_processes_that_are_not_one_job_are_refused(env, fsdp, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        check_one_job(fsdp)


def test_one_job_passes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    check_one_job(True)


# --- 2 processes on CPU (gloo) --------------------------------------------------------------------------

GRADIENTS_WORKER = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[1])
from test_sharding import _tiny_4bit_model
from bimedix.training.sharding import make_experts_shardable

def build(mode, checkpointing):
    torch.manual_seed(0)
    model = _tiny_4bit_model(mode)
    for name, param in model.named_parameters():  # non-zero B: gradients flow through every adapter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model.train()

dist.init_process_group("gloo")
ids = torch.randint(3, 32000, (2, 16), generator=torch.Generator().manual_seed(1))
for mode, checkpointing in (("folded", False), ("peft", True)):  # the recipe runs test folded + checkpointing
    reference = build(mode, checkpointing)
    reference(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    model = build(mode, checkpointing)
    make_experts_shardable(model)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=f"{mode} {name}")
    print("equal", mode, checkpointing, flush=True)
"""


def test_sharded_4bit_experts_give_the_gradients_of_one_process(tmp_path):
    """Folded expert LoRA without checkpointing, PEFT's path with it: FSDP over 2 processes = one process."""
    worker = tmp_path / "worker.py"
    worker.write_text(GRADIENTS_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(worker), str(Path(__file__).parent)]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert result.stdout.count("equal") == 2 * 2, result.stdout



def _fsdp_recipe(tmp_path: Path) -> Path:
    """The tiny 4-bit-experts recipe with `fsdp: true`, as the issue's test recipe."""
    recipe = tmp_path / "sft_4bit_experts_fsdp.yaml"
    recipe.write_text(RECIPE.read_text() + "fsdp: true\nfsdp_config:\n  transformer_layer_cls_to_wrap: "
                      "[MixtralDecoderLayer]\n")
    return recipe


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(processes: int, recipe: Path, output: Path, *flags: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_port", str(_free_port())] if processes > 1 else [sys.executable])
    return [*launcher, str(REPO / "recipes" / "sft.py"), "--config", str(recipe), "--output_dir", str(output),
            *SHORT, *flags]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _train(processes: int, recipe: Path, output: Path, *flags: str) -> str:
    result = subprocess.run(_command(processes, recipe, output, *flags), capture_output=True, text=True,
                            env=_env(), timeout=600, cwd=output.parent)
    assert result.returncode == 0, result.stderr[-6000:]
    return result.stderr


def _losses(output: Path) -> list[float]:
    state = json.loads((output / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def _kib(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1 / 1024, "KiB": 1, "MiB": 1024, "GiB": 1024**2}[unit]


@pytest.mark.parametrize(("quantization", "batching"), [([], []), (QLORA, ["--padding_free", "true"])],
                         ids=["4bit-experts", "full-qlora-padding-free"])
def test_fsdp_matches_one_process_shards_the_experts_and_merges(quantization, batching, tmp_path):
    """2 processes x 2 rows under FSDP (padded, or padding-free as recipes/mixtral-8x22b) = 1 process x 4
    padded rows: same losses; half the expert bytes per rank."""
    recipe = _fsdp_recipe(tmp_path)
    steps = ["--max_steps", "2", "--save_strategy", "no"]
    _train(1, recipe, tmp_path / "p1", *quantization, *steps, "--fsdp", "false",
           "--per_device_train_batch_size", "4")
    log = _train(2, recipe, tmp_path / "p2", *quantization, *steps, "--per_device_train_batch_size", "2",
                 *batching)
    one, two = _losses(tmp_path / "p1"), _losses(tmp_path / "p2")
    assert len(one) == len(two) == 2
    assert two[0] == pytest.approx(one[0], rel=1e-4), (one, two)  # measured: equal to ~1e-7

    lines = re.findall(r"rank (\d) holds (\S+ \S+) of (\S+ \S+) frozen weights "
                       r"\(FSDP full_shard, 2 processes\); 4-bit experts (\S+ \S+) of (\S+ \S+)", log)
    assert sorted(line[0] for line in lines) == ["0", "1"], log[-3000:]
    for _, held, whole, experts_held, experts_whole in lines:
        assert _kib(experts_held) == pytest.approx(_kib(experts_whole) / 2, rel=0.02)
        assert _kib(held) < _kib(whole)

    # the adapter of a sharded run is a normal PEFT adapter: the same tensors as one process's, whole
    from safetensors.torch import load_file

    whole, gathered = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("p1", "p2"))
    assert {k: v.shape for k, v in gathered.items()} == {k: v.shape for k, v in whole.items()}
    configs = [{key: sorted(value) if isinstance(value, list) else value  # PEFT writes sets as lists
                for key, value in json.loads((tmp_path / run / "adapter_config.json").read_text()).items()}
               for run in ("p1", "p2")]
    assert configs[0] == configs[1]
    if not quantization:  # and `bimedix merge` checks its logits
        from bimedix.training.merge import merge_adapter

        report = merge_adapter("tiny:mixtral:42", tmp_path / "p2", tmp_path / "merged",
                               quantize_experts="nf4")
        assert report["max_abs_diff_merged_vs_adapter"] <= 1e-3
        assert report["max_abs_diff_adapter_vs_base"] > 0


def test_fsdp_run_resumes_after_kill_9(tmp_path):
    """Kill both processes once checkpoint-2 is complete; `--resume_from_checkpoint true` finishes the run
    with the losses of an uninterrupted one, skipping a half-written newer checkpoint."""
    recipe = _fsdp_recipe(tmp_path)
    flags = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
             "--per_device_train_batch_size", "2"]
    _train(2, recipe, tmp_path / "straight", *flags)

    output = tmp_path / "killed"
    process = subprocess.Popen(_command(2, recipe, output, *flags, "--save_steps", "1"), env=_env(),
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in process.stdout:  # the run says when a step's checkpoint is complete
            seen.append(line)
            if (output / "checkpoint-2" / "trainer_state.json").is_file():
                break
        else:
            pytest.fail("the run ended before writing checkpoint-2:\n" + "".join(seen[-60:]))
    finally:  # kill -9 the launcher and its workers (which run in sessions of their own)
        import psutil

        for child in psutil.Process(process.pid).children(recursive=True):
            child.send_signal(signal.SIGKILL)
        process.send_signal(signal.SIGKILL)
        process.wait()
    for stale in output.glob("checkpoint-*"):
        if int(stale.name.split("-")[1]) > 2:  # what the kill left of later checkpoints: half of one
            for path in stale.glob("trainer_state.json"):
                path.unlink()
    (output / "checkpoint-9").mkdir()  # a newer, half-written checkpoint (no trainer_state.json)
    _train(2, recipe, output, *flags, "--resume_from_checkpoint", "true")
    resumed, straight = _losses(output), _losses(tmp_path / "straight")
    assert len(straight) == len(resumed) == 4
    assert resumed[-2:] == pytest.approx(straight[-2:], rel=1e-4), (resumed, straight)
