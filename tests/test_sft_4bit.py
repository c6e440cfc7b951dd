"""Full QLoRA for MoE on CPU: bitsandbytes 4-bit Linear layers + bimedix NF4 experts, in-process and from a
checkpoint; the start-up refusals; DDP with 4-bit experts; what a finished run leaves in `output_dir`."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import PeftModel  # noqa: E402
from process_support import WatchedProcess  # noqa: E402

from bimedix.resources import resource_path  # noqa: E402
from bimedix.training.moe.quantize import fused_experts, is_quantized  # noqa: E402
from bimedix.training.sft import check_compatible, main, make_parser, parse_args  # noqa: E402
from bimedix.training.tiny import save_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(resource_path("recipes", "tiny", "sft_4bit_experts.yaml"))
SMALL = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "96",
         "--logging_steps", "1", "--warmup_steps", "1", "--save_strategy", "no"]
# bf16 as in real QLoRA: TRL casts the adapter of a bitsandbytes-loaded model to bf16
QLORA = ["--load_in_4bit", "true", "--use_bnb_nested_quant", "true", "--bnb_4bit_quant_type", "nf4",
         "--dtype", "bfloat16"]


def _run(output_dir, *flags):
    return main(*parse_args(["--config", RECIPE, "--output_dir", str(output_dir), *SMALL, *flags]))


def _lora_b_by_group(model) -> dict[str, list[torch.Tensor]]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            group = ("router" if name.endswith(".gate") else name.rsplit(".", 1)[-1] if ".experts" not in name
                     else "experts." + getattr(module, "parameter_name", name.rsplit(".", 1)[-1]))
            groups.setdefault(group, []).append(module.lora_B["default"].weight.detach().float())
    return groups


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """Three steps of the tiny 4-bit-experts recipe with `load_in_4bit` too (full QLoRA), no checkpoint
    saved."""
    output = tmp_path_factory.mktemp("sft-qlora")
    return output, _run(output, *QLORA, "--max_steps", "3")


def test_full_qlora_quantizes_linears_and_experts_and_trains_every_group(qlora_run):
    _, trainer = qlora_run
    import bitsandbytes as bnb

    model = trainer.model
    attention = model.base_model.model.model.layers[0].self_attn
    assert isinstance(attention.q_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(attention.o_proj, bnb.nn.Linear4bit)  # not adapted, still 4-bit
    experts = fused_experts(model)
    assert experts and all(is_quantized(m, p) for m in experts.values()
                           for p in ("gate_up_proj", "down_proj"))
    groups = _lora_b_by_group(model)
    assert {"q_proj", "k_proj", "v_proj", "router"} <= set(groups) and len(groups) >= 6, sorted(groups)
    # PEFT initializes every lora_B to zero: non-zero after training means the group received updates
    for group, tensors in groups.items():
        assert all(t.abs().sum() > 0 for t in tensors), f"{group} adapter did not move"
    router_weight = model.base_model.model.model.layers[0].mlp.gate.weight
    # router trained via its LoRA
    assert router_weight.dtype != torch.uint8 and not router_weight.requires_grad


def test_full_qlora_adapter_reloads_on_the_same_4bit_base(qlora_run):
    output, trainer = qlora_run
    ids = torch.tensor([[1, 330, 1149, 28747, 4567, 349, 264, 1369, 28723, 2]])
    # an eval-mode forward would repack the CPU Linear4bit weights (STACK-NOTES)
    model = trainer.model.train()
    with torch.no_grad():
        trained = model(input_ids=ids).logits.float()
    reloaded = _run_load(output)
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits.float()
    torch.testing.assert_close(again, trained, atol=2e-2, rtol=0)


def _run_load(adapter_dir: Path):
    """The same base the run trained on (tiny weights, bnb 4-bit Linears, NF4 experts), with the saved
    adapter."""
    from bimedix.training.moe.quantize import quantize_experts
    from bimedix.training.sft import load_model

    script, training, model_args, mixture, bimedix_args = parse_args(["--config", RECIPE, *QLORA])
    base = load_model(model_args, training, bimedix_args)
    model = PeftModel.from_pretrained(base, adapter_dir)
    quantize_experts(model)
    return model.train()


def test_run_saves_state_metrics_and_card_without_checkpoints(qlora_run):
    output, _ = qlora_run
    from bimedix.hub.cards import save_model_card

    assert not list(output.glob("checkpoint-*"))  # save_strategy: no
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    train = json.loads((output / "train_results.json").read_text())
    assert train["train_samples"] > 0 and train["train_loss"] > 0
    assert json.loads((output / "all_results.json").read_text())["train_loss"] == train["train_loss"]
    text = save_model_card(output).read_text()
    assert "**Steps:** 3" in text and "not logged" not in text and "`trainer_state.json`" in text.replace(
        f"{output.name}/", "")


def test_card_uses_the_run_summary_when_no_step_was_logged(tmp_path):
    from bimedix.hub.cards import save_model_card

    run = _run(tmp_path, "--max_steps", "1", "--logging_steps", "5", "--router_report", "false")
    summary = run.state.log_history[-1]["train_loss"]
    text = save_model_card(tmp_path).read_text()
    assert f"{summary:.4f} averaged over the run" in text and "not logged" not in text


def test_full_qlora_from_a_checkpoint(tmp_path):
    base = save_tiny_model(tmp_path / "base", "mixtral", seed=0)
    flags = ["--config", RECIPE, "--output_dir", str(tmp_path / "out"), *SMALL, *QLORA, "--max_steps", "1",
             "--model_name_or_path", str(base), "--router_report", "false"]
    script, training, model_args, mixture, bimedix_args = make_parser().parse_args_and_config(flags)
    bimedix_args.tiny_model = None  # the recipe's tiny model, replaced by the saved checkpoint
    trainer = main(script, training, model_args, mixture, bimedix_args)
    import bitsandbytes as bnb

    layer = trainer.model.base_model.model.model.layers[1]
    assert isinstance(layer.self_attn.v_proj.base_layer, bnb.nn.Linear4bit)
    assert all(is_quantized(module, "down_proj") for module in fused_experts(trainer.model).values())
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--tiny_model", "llama"], {}, r"quantize_experts: nf4.*tiny_model: llama.*no fused MoE experts"),
    (["--use_peft", "false"], {}, r"quantize_experts: nf4.*needs LoRA \(`use_peft: true`\)"),
    (["--load_in_8bit", "true"], {},
     r"quantize_experts: nf4.*composes with `load_in_4bit: true`.*not with `load_in_8bit`"),
    ([], {"ACCELERATE_USE_FSDP": "true"}, r"quantize_experts: nf4.*FSDP2 only"),  # accelerate's default: 1
    ([], {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     r"not supported under DeepSpeed ZeRO-3.*deepspeed_zero2\.yaml"),
])
def test_incompatible_4bit_expert_recipes_fail_at_start_up(flags, env, message, monkeypatch):
    with pytest.raises(ValueError, match=message):  # from parse_args (contradicting keys) or check_compatible
        script, training, model_args, mixture, bimedix_args = parse_args(["--config", RECIPE, *flags])
        for key, value in env.items():  # what `accelerate launch` sets, after TRL's own config parsing
            monkeypatch.setenv(key, value)
        check_compatible(training, model_args, bimedix_args)


def test_zero3_from_a_deepspeed_file_is_refused_and_zero2_is_not(tmp_path):
    script, training, model_args, mixture, bimedix_args = parse_args(["--config", RECIPE])
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    training.deepspeed = str(config)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3"):
        check_compatible(training, model_args, bimedix_args)
    training.deepspeed = {"zero_optimization": {"stage": 2}}
    check_compatible(training, model_args, bimedix_args)


def test_ddp_with_4bit_experts_matches_one_process(tmp_path):
    """2 gloo processes x 2 rows = 1 process x 4 rows: same samples per step, same loss within tolerance."""
    common = ["--config", RECIPE, *QLORA, "--max_length", "96", "--logging_steps", "1", "--warmup_steps", "1",
              "--save_strategy", "no", "--max_steps", "2", "--gradient_accumulation_steps", "1",
              "--router_aux_loss_coef", "0", "--router_report", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    losses = {}
    for processes, rows in ((1, 4), (2, 2)):
        output = tmp_path / f"p{processes}"
        # --standalone: the rendezvous picks a free port itself (no port chosen here, then taken by another)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), str(REPO / "recipes" / "sft.py"), *common,
                   "--output_dir", str(output), "--per_device_train_batch_size", str(rows)]
        with WatchedProcess(command, env=env, cwd=tmp_path) as run:
            result = run.finish()
            assert result.returncode == 0, run.output(6000)
        state = json.loads((output / "trainer_state.json").read_text())
        losses[processes] = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        assert re.search(r"train_loss", result.stdout + result.stderr)
    assert len(losses[1]) == len(losses[2]) == 2
    assert losses[2] == pytest.approx(losses[1], rel=1e-4), losses  # measured: equal to ~1e-6
