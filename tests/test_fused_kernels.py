"""Liger's fused kernels (`bimedix.training.fused_kernels`): where they apply, the fallback, what they
replace, and (on CUDA) that training with them gives the reference losses and gradients."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trl import SFTConfig

import bimedix.training.fused_kernels as fused_kernels
import bimedix.training.sft as sft
from bimedix.resources import resource_path
from bimedix.training.fused_kernels import (
    apply_fused_kernels,
    check_fused_kernels,
    plan_fused_kernels,
    requested_kernels,
)
from bimedix.training.sft import BimedixArguments, make_peft_config, make_trainer, parse_args
from bimedix.training.tiny import build_tiny_model

TINY_RECIPE = str(resource_path("recipes", "tiny", "sft.yaml"))
# What Liger's apply functions may replace module-wide, per model type: restored after each test.
PATCHED = {"mixtral": ("transformers.models.mixtral.modeling_mixtral",
                       ("apply_rotary_pos_emb", "MixtralRMSNorm", "MixtralExperts")),
           "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe",
                         ("apply_rotary_pos_emb", "Qwen3MoeRMSNorm", "Qwen3MoeExperts"))}
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels run on CUDA")


@pytest.fixture
def restore_modeling(monkeypatch):
    """Undo Liger's module-wide patches (and the ForCausalLM forwards) when the test ends."""
    for module_name, names in PATCHED.values():
        module = importlib.import_module(module_name)
        for name in names:
            monkeypatch.setattr(module, name, getattr(module, name))
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__name__.endswith("ForCausalLM"):
                monkeypatch.setattr(cls, "forward", cls.forward)


def _norms(model) -> list[torch.nn.Module]:
    return [module for module in model.modules() if type(module).__name__.endswith("RMSNorm")]


def test_auto_falls_back_off_cuda_and_leaves_the_model_as_it_was(restore_modeling, caplog):
    from transformers.models.mixtral import modeling_mixtral

    model = build_tiny_model("mixtral")
    rope = modeling_mixtral.apply_rotary_pos_emb
    with caplog.at_level(logging.INFO, logger="bimedix.training.fused_kernels"):
        chosen = apply_fused_kernels(model, "auto", "cpu")
    assert chosen.kernels == () and "trains on cpu" in chosen.reason
    assert "Fused kernels: none (auto: the run trains on cpu" in caplog.text
    assert modeling_mixtral.apply_rotary_pos_emb is rope
    assert all("forward" not in vars(norm) for norm in _norms(model))
    assert apply_fused_kernels(model, "off", "cuda").kernels == ()


def test_liger_mode_stops_with_the_reason_and_the_fix(monkeypatch):
    model = build_tiny_model("mixtral")
    with pytest.raises(ValueError, match=r"fused_kernels: liger.*trains on cpu.*fused_kernels: auto"):
        plan_fused_kernels(model, "liger", "cpu")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    assert "liger-kernel is not importable" in plan_fused_kernels(model, "auto", "cuda").reason
    with pytest.raises(ValueError, match=r"not importable.*pip install 'bimedix\[liger\]'"):
        plan_fused_kernels(model, "liger", "cuda")
    with pytest.raises(ValueError, match="one of"):
        plan_fused_kernels(model, "fast", "cuda")


def test_a_kernel_that_fails_its_self_test_is_not_used(restore_modeling, monkeypatch):
    """``auto`` falls back, with the self-test's reason, when a kernel does not compile or does not give
    transformers' results on the run's device (e.g. a Triton the installed Liger does not fit); ``liger``
    stops with it."""
    pytest.importorskip("liger_kernel.transformers.monkey_patch")
    from transformers.models.mixtral import modeling_mixtral

    tested = []

    def failing(kernels, device, dtype):
        tested.append((kernels, device, dtype))
        return f"Liger's rope kernel failed its self-test on {device} in {dtype} (RuntimeError: no driver)"

    monkeypatch.setattr(fused_kernels, "_self_test", failing)
    model = build_tiny_model("mixtral")  # float32
    rope = modeling_mixtral.apply_rotary_pos_emb
    chosen = apply_fused_kernels(model, "auto", "cuda")
    assert chosen.kernels == () and chosen.reason == ("auto: Liger's rope kernel failed its self-test on "
                                                      "cuda in torch.float32 (RuntimeError: no driver)")
    assert tested == [(("rms_norm", "rope"), "cuda", torch.float32)]
    assert modeling_mixtral.apply_rotary_pos_emb is rope
    assert all("forward" not in vars(norm) for norm in _norms(model))
    with pytest.raises(ValueError, match=r"fused_kernels: liger.*failed its self-test.*fused_kernels: auto"):
        plan_fused_kernels(model.to(torch.bfloat16), "liger", "cuda:0")
    assert tested[-1] == (("rms_norm", "rope"), "cuda:0", torch.bfloat16)  # the model's dtype and device


def test_models_liger_does_not_cover_fall_back():
    pytest.importorskip("liger_kernel.transformers.monkey_patch")
    olmoe = build_tiny_model("olmoe")
    reason = plan_fused_kernels(olmoe, "auto", "cuda").reason
    assert reason == "auto: Liger has no kernels for model type 'olmoe'"
    with pytest.raises(ValueError, match="'olmoe'"):
        plan_fused_kernels(olmoe, "liger", "cuda")
    assert "hub kernels are on" in plan_fused_kernels(build_tiny_model("mixtral"), "auto", "cuda",
                                                      hub_kernels=True).reason


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_liger_replaces_the_norms_and_rope_only(arch, restore_modeling, monkeypatch, mixtral_tokenizer,
                                                tmp_path):
    """On the recipe's model (PEFT LoRA on attention, router and experts, folded expert LoRA) Liger takes
    every RMSNorm (with the model's epsilon) and the rotary function; the experts, the model's forward and
    TRL's fused LM head stay as they were."""
    pytest.importorskip("liger_kernel.transformers.monkey_patch")
    from datasets import Dataset
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    module = importlib.import_module(PATCHED[arch][0])
    experts_class = getattr(module, PATCHED[arch][1][2])
    recipe = parse_args(["--config", TINY_RECIPE, "--tiny_model", arch, "--output_dir", str(tmp_path),
                         "--expert_lora", "folded", "--report_to", "none", "--fused_kernels", "auto"])
    model = build_tiny_model(arch)
    forward = type(model).forward
    # decide as on a GPU (the run's own device is the CPU here), whose self-test passed
    monkeypatch.setattr(sft, "apply_fused_kernels", lambda model, mode, device, kernels, **kw:
                        apply_fused_kernels(model, mode, "cuda", kernels, **kw))
    monkeypatch.setattr(fused_kernels, "_self_test", lambda *args: None)
    rows = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]]})
    trainer = make_trainer(recipe.training, recipe.model, recipe.bimedix, model,
                           mixtral_tokenizer, rows,
                           peft_config=make_peft_config(model, recipe.model, recipe.bimedix))
    base = trainer.model.get_base_model()
    norms = _norms(base)
    assert len(norms) == (2 + 2 * (arch == "qwen3_moe")) * base.config.num_hidden_layers + 1
    for norm in norms:
        assert norm.forward.__func__ is LigerRMSNorm.forward
        assert norm.variance_epsilon == base.config.rms_norm_eps
    assert module.apply_rotary_pos_emb is liger_rotary_pos_emb
    experts = [m for m in base.modules() if type(m).__name__.endswith("Experts")]
    assert experts and all(type(m) is experts_class and "forward" not in vars(m) for m in experts)
    # TRL's fused LM head wraps the model's own forward (Liger's fused cross-entropy would have replaced it)
    assert type(base).forward is forward
    fused_head = vars(base)["forward"].__func__
    assert fused_head is not forward and fused_head.__wrapped__ is forward
    assert recipe.training.use_liger_kernel is False


def test_use_liger_kernel_is_read_as_fused_kernels_liger(tmp_path):
    def config(**keys) -> SFTConfig:
        return SFTConfig(output_dir=str(tmp_path), bf16=False, **keys)

    bimedix = BimedixArguments()
    assert requested_kernels(config(), bimedix) == ("auto", ("rms_norm", "rope"))
    asked = config(use_liger_kernel=True, liger_kernel_config={"rope": False})
    assert requested_kernels(asked, bimedix) == ("liger", ("rms_norm",))
    with pytest.raises(ValueError, match="forbids them"):
        check_fused_kernels(asked, BimedixArguments(fused_kernels="off"))
    with pytest.raises(ValueError, match="'swiglu'.*expert"):
        check_fused_kernels(config(use_liger_kernel=True, liger_kernel_config={"swiglu": True}), bimedix)
    with pytest.raises(ValueError, match="replace the same RMSNorm"):
        check_fused_kernels(config(), BimedixArguments(fused_kernels="liger", use_kernels=True))
    with pytest.raises(ValueError, match="replace the same RMSNorm"):
        check_fused_kernels(config(use_liger_kernel=True, model_init_kwargs={"use_kernels": True}), bimedix)
    with pytest.raises(ValueError, match="trains on cpu"):  # before any model is loaded
        check_fused_kernels(asked, bimedix)
    check_fused_kernels(config(), bimedix)  # auto: nothing to refuse


def test_sft_with_use_liger_kernel_on_cpu_stops_before_loading(tmp_path):
    from bimedix.training.sft import main

    recipe = parse_args(["--config", TINY_RECIPE, "--output_dir", str(tmp_path / "run"),
                         "--use_liger_kernel", "true", "--report_to", "none"])
    with pytest.raises(ValueError, match="use_liger_kernel: true.*trains on cpu"):
        main(*recipe)
    assert not (tmp_path / "run").exists()


# --- the same losses and gradients --------------------------------------------------------------------------


def _loss_and_grads(arch: str, dtype: torch.dtype, kernels: tuple[str, ...], device: str = "cuda"
                    ) -> tuple[torch.Tensor, dict]:
    """One padding-free row of three samples (positions restart at each), checkpointed, through the model
    with Liger's ``kernels`` (none: transformers' layers)."""
    model = build_tiny_model(arch, seed=3).to(device, dtype)
    if kernels:  # planned as on CUDA: under the Triton interpreter the kernels run on CPU tensors too
        assert apply_fused_kernels(model, "liger", "cuda", kernels).kernels == kernels
        rope = importlib.import_module(PATCHED[arch][0]).apply_rotary_pos_emb
        assert rope.__module__.startswith("liger_kernel") == ("rope" in kernels)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    generator = torch.Generator().manual_seed(0)
    lengths = (7, 12, 5)
    input_ids = torch.randint(3, model.config.vocab_size, (1, sum(lengths)), generator=generator).to(device)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    loss = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach().float(), {name: p.grad.float() for name, p in model.named_parameters()}


def _differences(arch: str, dtype: torch.dtype, kernels: tuple[str, ...], device: str = "cuda"
                 ) -> tuple[float, dict[str, float]]:
    """The loss's relative difference with Liger's ``kernels`` and without, and each parameter's largest
    gradient difference relative to its largest gradient."""
    loss, grads = _loss_and_grads(arch, dtype, (), device)
    liger_loss, liger_grads = _loss_and_grads(arch, dtype, kernels, device)
    return abs(liger_loss / loss - 1).item(), {
        name: ((liger_grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)).item()
        for name, grad in grads.items()}


@pytest.mark.gpu  # pytest -m gpu tests/test_fused_kernels.py (benchmarks/gpu_speed.sh runs it)
@NO_CUDA
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_liger_gives_the_reference_losses_and_gradients_on_cuda(arch, dtype, tolerance, restore_modeling):
    """Tolerance: on the loss, and relative to the largest gradient of each parameter (fp32 1e-4, bf16 5e-2:
    rounding only)."""
    pytest.importorskip("liger_kernel.transformers.monkey_patch")
    loss, grads = _differences(arch, dtype, ("rms_norm", "rope"))
    assert loss <= tolerance
    assert {name: diff for name, diff in grads.items() if diff > tolerance} == {}


def test_liger_rope_gives_the_reference_losses_and_gradients_under_the_triton_interpreter(tmp_path):
    """Liger's RoPE kernel itself, run by Triton's interpreter on CPU (``TRITON_INTERPRET=1``, in a fresh
    process: it must be set before the kernels are defined): it passes bimedix's self-test (which fails a
    kernel 1% off), and through bimedix's swap on both model types gives the reference within 1e-6.
    (Liger's RMSNorm kernel does not run under the interpreter, which passes float arguments as Python floats
    and has no libdevice ``rsqrt``; nor does bf16: it gives NaN there. Both are compared on CUDA only.)"""
    pytest.importorskip("triton")
    pytest.importorskip("liger_kernel.transformers.monkey_patch")
    script = ("import json, torch, test_fused_kernels as t\n"
              "import bimedix.training.fused_kernels as f\n"
              "import liger_kernel.transformers.rope as rope\n"
              "passed = f._self_test(('rope',), 'cpu', torch.float32)\n"
              "real = rope.liger_rotary_pos_emb\n"  # a kernel 1% off must fail the self-test
              "rope.liger_rotary_pos_emb = lambda *args: tuple(1.01 * x for x in real(*args))\n"
              "f._self_test.cache_clear()\n"
              "failed = f._self_test(('rope',), 'cpu', torch.float32)\n"
              "rope.liger_rotary_pos_emb = real\n"
              "f._self_test = lambda *args: None\n"  # the swap below plans as on CUDA
              "print(json.dumps({'self_test': [passed, failed], 'runs': {arch: t._differences("
              "arch, torch.float32, ('rope',), 'cpu') for arch in ('mixtral', 'qwen3_moe')}}))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    passed, failed = results["self_test"]
    assert passed is None, passed
    assert failed.startswith("Liger's rope kernel failed its self-test on cpu in torch.float32: results "
                             "differ from transformers' by 0.01"), failed
    for arch, (loss, grads) in results["runs"].items():
        assert loss <= 1e-6, arch
        assert len(grads) > 10 and max(grads.values()) <= 1e-6, (arch, grads)
