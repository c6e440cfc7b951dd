"""Merging a LoRA adapter on router + fused experts: the deltas survive, a broken merge is refused."""

from __future__ import annotations

import json

import pytest
import torch
from lora_support import lora_group
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from bimedix.training.merge import merge_adapter
from bimedix.training.moe.targets import build_lora_config
from bimedix.training.tiny import build_tiny_model

IDS = torch.tensor([[1, 2223, 725, 28747, 6312, 28709, 13, 330]])


def _adapter(tmp_path, groups: list[str], seed: int = 0):
    """A paper-preset adapter whose lora_B is random in ``groups`` and zero elsewhere (as if only they
    trained)."""
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    model = get_peft_model(build_tiny_model("mixtral", seed=0),
                           build_lora_config(build_tiny_model(), "paper", r=4))
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            weight = module.lora_B["default"].weight
            with torch.no_grad():
                trained = lora_group(name) in groups
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5 if trained else 0)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


@pytest.mark.parametrize("groups", [["experts"], ["router"], ["q_proj", "k_proj", "v_proj", "router",
                                                              "experts"]],
                         ids=["experts", "router", "paper"])
def test_merged_model_keeps_expert_and_router_deltas(tiny_model_dir, tmp_path, groups):
    peft_model, adapter_dir = _adapter(tmp_path, groups)
    report = merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged")
    assert report["max_abs_diff_merged_vs_adapter"] <= 1e-3
    # the deltas are in the merged weights: 10x further from the base than merged is from the adapter model
    assert report["max_abs_diff_merged_vs_base"] > 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        adapter_logits = peft_model(IDS).logits
        merged_logits, base_logits = merged(IDS).logits, base(IDS).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-3
    merged_state, base_state = merged.state_dict(), base.state_dict()
    changed = {name for name in base_state if not torch.equal(merged_state[name], base_state[name])}
    expected = {"experts": {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"},
                "router": {"mlp.gate.weight"},
                "q_proj": {"self_attn.q_proj.weight"}, "k_proj": {"self_attn.k_proj.weight"},
                "v_proj": {"self_attn.v_proj.weight"}}
    assert changed == {f"model.layers.{i}.{suffix}" for i in (0, 1) for g in groups for suffix in expected[g]}
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["tolerance"] == 1e-3


def test_broken_merge_is_refused_and_nothing_is_written(tiny_model_dir, tmp_path, monkeypatch):
    """Simulate a merge that drops the fused-expert deltas (as other tools have done silently)."""
    from peft.tuners.lora.layer import ParamWrapper

    _, adapter_dir = _adapter(tmp_path, ["experts"])
    monkeypatch.setattr(ParamWrapper, "merge", lambda self, *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="Refusing to write the merged model"):
        merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_adapter_reloads_with_identical_logits(tmp_path):
    peft_model, adapter_dir = _adapter(tmp_path, ["q_proj", "router", "experts"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    reloaded = PeftModel.from_pretrained(build_tiny_model("mixtral", seed=0), adapter_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, peft_model(IDS).logits)


def test_cli_merge_uses_the_adapters_recorded_tiny_base(tmp_path, capsys):
    from bimedix.cli import main

    _, adapter_dir = _adapter(tmp_path, ["router"])
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "tiny:mixtral:0"  # what the tiny recipe records
    config_file.write_text(json.dumps(config))
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(tmp_path / "out")]) == 0
    assert "max |merged - adapter| logit difference" in capsys.readouterr().out
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err


def test_merge_chat_and_sft_give_no_peft_checkpointing_deprecation(tiny_model_dir, tiny_adapter_dir,
                                                                   tmp_path):
    """PEFT reads `is_gradient_checkpointing`, which transformers 5.25 deprecates with a FutureWarning."""
    import warnings

    from bimedix.chat import ChatSession
    from bimedix.resources import resource_path
    from bimedix.training.sft import main, parse_args

    recipe = str(resource_path("recipes", "tiny", "sft.yaml"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_adapter(str(tiny_model_dir), tiny_adapter_dir, tmp_path / "merged")
        ChatSession.from_pretrained(str(tiny_model_dir), peft=str(tiny_adapter_dir), device="cpu")
        main(*parse_args(["--config", recipe, "--output_dir", str(tmp_path / "sft"), "--max_steps", "1",
                          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                          "--max_length", "64", "--save_strategy", "no", "--router_report", "false"]))
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []


def test_a_remerge_killed_mid_write_leaves_the_old_merge_whole(tiny_model_dir, tmp_path):
    """Repro: re-merge into a merge folder with another adapter and kill -9 right after model.safetensors is
    replaced: the weights were the new merge, but merge_report.json (which drives provenance and the card)
    still named the old adapter."""
    import os
    import subprocess
    import sys

    _, first = _adapter(tmp_path / "first", ["experts"], seed=0)
    _, second = _adapter(tmp_path / "second", ["router"], seed=1)
    out = tmp_path / "merged"
    merge_adapter(str(tiny_model_dir), first, out)
    (out / "notes.txt").write_text("the user's own file")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    killed = ("import os, signal, sys\nimport bimedix.training.merge as merge\n"
              "merge.write_json = lambda path, obj: os.kill(os.getpid(), signal.SIGKILL)  # the report\n"
              "merge.merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3])\n")
    result = subprocess.run([sys.executable, "-c", killed, str(tiny_model_dir), str(second), str(out)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            timeout=600)
    assert result.returncode == -9, result.stderr[-3000:]
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # the old merge, whole
    report = merge_adapter(str(tiny_model_dir), second, out)  # the next run completes and tidies up
    assert json.loads((out / "merge_report.json").read_text())["adapter"] == report["adapter"] == str(second)
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first", "merged", "second"]
