"""The fast training paths are the reference paths, on tiny models.

- padding-free micro-batches (the samples of a step in one row, ``position_ids`` restarting per sample):
  every sample's logits equal the sample run alone (attention never crosses samples), the trained labels are
  the padded batch's, and training with ``per_device_train_batch_size 2 x accumulation 1`` padding-free gives
  the losses and adapter weights of ``1 x 2`` with padding (same 2 samples per optimizer step, same LR
  schedule) within 1e-5;
- router statistics are counted on the device without a host sync;
- nothing bimedix runs in a training step waits for the device (`bimedix.training.device_waits`): the
  folded 4-bit experts forward, recomputation and backward, and the whole step of the paper recipe's
  settings, where the only waits left are TRL's per-micro-batch metric reads and transformers' packed-row
  check.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from bimedix.resources import resource_path
from bimedix.training.device_waits import DeviceWaits, StepWaits
from bimedix.training.router_stats import RouterLoadCallback, arabic_token_table
from bimedix.training.sft import main, parse_args
from bimedix.training.tiny import build_tiny_model

TINY_RECIPE = str(resource_path("recipes", "tiny", "sft.yaml"))


@pytest.mark.parametrize("arch, attention", [
    *[(arch, attention) for attention in ("sdpa", "eager") for arch in ("mixtral", "qwen3_moe", "olmoe")],
    ("mixtral", "flex_attention"),  # torch's own (compiled: ~30 s here); its backward needs CUDA, see below
])
def test_padding_free_row_equals_each_sample_alone(arch, attention):
    model = build_tiny_model(arch, seed=0, attn_implementation=attention).eval()
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 32000, (n,), generator=generator).tolist() for n in (7, 12, 5)]
    examples = [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]} for ids in samples]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, 24)
    with torch.no_grad():
        # as TRL's `compute_loss` calls it: no KV cache (with one, transformers does not look for samples)
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for ids in samples:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[start:start + len(ids)], alone, atol=1e-5, rtol=1e-5)
            start += len(ids)
    # the trained (next-token) targets are the padded batch's: label t+1 of each sample
    targets_packed, targets_padded, start = [], [], 0
    for row, ids in enumerate(samples):
        targets_packed.append(packed["labels"][0, start + 1:start + len(ids)])
        targets_padded.append(padded["labels"][row, 1:len(ids)])
        assert (padded["labels"][row, len(ids):] == -100).all()
        start += len(ids)
    assert torch.equal(torch.cat(targets_packed), torch.cat(targets_padded))


def _train(output_dir, *flags, config=TINY_RECIPE):
    """3 steps of a tiny recipe, aux loss off (later ``flags`` win, e.g. ``--router_aux_loss_coef``)."""
    return main(*parse_args(["--config", str(config), "--output_dir", str(output_dir), "--max_steps", "3",
                             "--max_length", "96", "--logging_steps", "1", "--warmup_steps", "1",
                             "--router_aux_loss_coef", "0", "--save_strategy", "no",
                             "--router_report", "false", *flags]))


def _adapter_weights(trainer) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in trainer.model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("device_flags, attention, tolerance", [
    pytest.param([], "sdpa", 1e-5, id="sdpa-cpu"),
    # pytest -m gpu tests/test_fast_paths.py (benchmarks/gpu_speed.sh --runs flex-equivalence); another kernel
    # than the reference's, so rounding differs more
    pytest.param(["--use_cpu", "false"], "flex_attention", 1e-4, id="flex-attention-cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                            reason="flex attention's backward needs CUDA")]),
])
def test_padding_free_batch_trains_like_accumulated_padded_batches(tmp_path, device_flags, attention,
                                                                   tolerance):
    """2 samples per optimizer step either way: loss per step and adapter weights after 3 steps agree (the
    reference: 1 x 2 padded, sdpa)."""
    reference = _train(tmp_path / "ref", "--per_device_train_batch_size", "1",
                       "--gradient_accumulation_steps", "2", *device_flags)
    fast = _train(tmp_path / "fast", "--per_device_train_batch_size", "2",
                  "--gradient_accumulation_steps", "1", "--padding_free", "true", *device_flags,
                  "--attn_implementation", attention)
    assert fast.model.config._attn_implementation == attention
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (reference, fast)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=tolerance,
                               rtol=tolerance)
    weights = [_adapter_weights(t) for t in (reference, fast)]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=tolerance, rtol=max(tolerance, 1e-4),
                                   msg=name)
    assert fast.args.padding_free and not fast.args.packing and fast.data_collator.collator.padding_free


def test_load_balancing_loss_weighs_the_same_per_step_whatever_the_split(tmp_path):
    """TRL adds the router aux loss as its mean over a step's micro-batches, so a recipe that packs the
    1 x 2 step into one 2 x 1 micro-batch keeps the model's own ``router_aux_loss_coef`` (the paper recipe:
    Mixtral's 0.02). On identical samples a packed row's aux loss equals each sample's, so the two splits
    must agree."""
    recipe = yaml.safe_load(Path(TINY_RECIPE).read_text(encoding="utf-8"))
    record = (resource_path("recipes", "tiny", "data", "train.jsonl").read_text(encoding="utf-8")
              .splitlines()[0])
    (tmp_path / "same.jsonl").write_text((record + "\n") * 8, encoding="utf-8")
    recipe["datasets"] = [{"path": str(tmp_path / "same.jsonl")}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")

    def train(name, coefficient, *flags):
        trainer = _train(tmp_path / name, "--router_aux_loss_coef", str(coefficient), *flags,
                         config=tmp_path / "recipe.yaml")
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        return ([entry["loss"] for entry in history], [entry["aux_loss"] for entry in history],
                _adapter_weights(trainer))

    packed = ("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--padding_free",
              "true")
    losses, aux, weights = train("ref", 0.5, "--per_device_train_batch_size", "1",
                                 "--gradient_accumulation_steps", "2")
    same_losses, _, same_weights = train("packed", 0.5, *packed)
    doubled_losses, _, _ = train("doubled", 1.0, *packed)
    assert min(aux) > 1.0  # the aux loss is there to be weighed (8 experts, top-2: 2 when balanced)
    torch.testing.assert_close(torch.tensor(same_losses), torch.tensor(losses), atol=1e-5, rtol=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(same_weights[name], value, atol=1e-5, rtol=1e-4, msg=name)
    # twice the coefficient adds 0.5 x aux to the first step's loss (same weights so far): weighed per step
    assert doubled_losses[0] == pytest.approx(losses[0] + 0.5 * aux[0], abs=1e-5)
    paper = yaml.safe_load(resource_path("recipes", "bimedix-mixtral", "sft_qlora.yaml").read_text(
        encoding="utf-8"))
    assert paper["router_aux_loss_coef"] == 0.02  # Mixtral's own coefficient, as with the paper's 1 x 2 steps


def _reference_counts(model, inputs, token_languages, top_k=2):
    """Per (language, layer, expert) counts by plain loops over the router logits of the same forward."""
    with torch.no_grad():
        logits = model(**inputs, output_router_logits=True).router_logits
    counts = torch.zeros(2, len(logits), logits[0].shape[-1], dtype=torch.float64)
    for layer, layer_logits in enumerate(logits):
        chosen = layer_logits.topk(top_k, dim=-1).indices
        for token, language in enumerate(token_languages):
            if language >= 0:
                for expert in chosen[token].tolist():
                    counts[language, layer, expert] += 1
    return counts


def _assert_hooks_never_sync(callback, model, inputs):
    """The callback's two hooks, profiled alone on a training forward's inputs and router logits."""
    with torch.no_grad():
        output = model(**inputs, output_router_logits=True)
    counts = callback.counts.clone()
    decoder = model.get_decoder()
    with DeviceWaits() as waits:
        callback._before_forward(decoder, (), dict(inputs))
        callback._after_forward(decoder, (), SimpleNamespace(router_logits=output.router_logits))
    assert not waits.counts
    callback.counts = counts


def test_router_counts_match_reference_and_never_sync(mixtral_tokenizer):
    model = build_tiny_model("mixtral", seed=0)
    arabic = arabic_token_table(mixtral_tokenizer)
    ar_ids = torch.nonzero(arabic).flatten()[:40]
    en_ids = torch.nonzero(~arabic).flatten()[1000:1040]
    # a padded batch: an English row and an Arabic row with 5 pads
    padded = torch.stack([en_ids[:12], torch.cat([ar_ids[:7], torch.zeros(5, dtype=torch.long)])])
    mask = torch.ones_like(padded)
    mask[1, 7:] = 0
    callback = RouterLoadCallback(mixtral_tokenizer)
    callback.on_train_begin(None, None, None, model=model)
    model.train()
    model(input_ids=padded, attention_mask=mask)
    _assert_hooks_never_sync(callback, model, {"input_ids": padded, "attention_mask": mask})
    model.eval()  # the reference forward must not count
    torch.testing.assert_close(callback.counts, _reference_counts(
        model, {"input_ids": padded, "attention_mask": mask}, [0] * 12 + [1] * 7 + [-1] * 5))

    # a packed, padding-free row (position_ids restart at 0): Arabic, English, Arabic samples
    packed = torch.cat([ar_ids[:9], en_ids[:6], ar_ids[9:20]])[None]
    position_ids = torch.cat([torch.arange(9), torch.arange(6), torch.arange(11)])[None]
    callback.counts = None
    model.train()
    model(input_ids=packed, position_ids=position_ids)
    _assert_hooks_never_sync(callback, model, {"input_ids": packed, "position_ids": position_ids})
    model.eval()
    torch.testing.assert_close(callback.counts, _reference_counts(
        model, {"input_ids": packed, "position_ids": position_ids}, [1] * 9 + [0] * 6 + [1] * 11))
    callback.on_train_end(SimpleNamespace(output_dir="unused"), SimpleNamespace(is_world_process_zero=False),
                          None)
    assert not model.get_decoder()._forward_hooks  # the hooks are gone


def _folded_4bit_model():
    from peft import LoraConfig, get_peft_model

    from bimedix.training.moe.expert_lora import set_expert_lora_mode
    from bimedix.training.moe.quantize import quantize_experts

    model = build_tiny_model("mixtral", seed=0)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj",
                                                                "mlp.experts.down_proj"],
                                             lora_dropout=0.0, init_lora_weights=False))
    quantize_experts(model)
    set_expert_lora_mode(model, "folded")
    return model.train()


def test_checkpointed_4bit_experts_dequantize_twice_not_three_times(monkeypatch):
    """Under activation checkpointing the recomputation's dequantized experts serve backward: 2
    dequantizations per expert parameter and micro-step instead of 3 (the gradients of no checkpointing),
    also with transformers' ``every_n_layers`` checkpointing only some layers (the others save packed bytes
    and dequantize again in backward)."""
    pytest.importorskip("bitsandbytes")
    from bimedix.training.moe import experts

    calls = []

    def counted(quantized, state):
        calls.append(quantized.data_ptr())
        return dequantize(quantized, state)

    dequantize = experts.flat_dequantize
    monkeypatch.setattr(experts, "flat_dequantize", counted)
    ids = torch.randint(3, 32000, (2, 10), generator=torch.Generator().manual_seed(0))
    results = {}
    for every_n_layers in (None, 1, 2):  # no checkpointing, every layer, layer 0 of 2
        model = _folded_4bit_model()
        if every_n_layers:
            model.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers)
        checkpointed = [layer.gradient_checkpointing for layer in model.get_decoder().layers]
        assert checkpointed == {None: [False, False], 1: [True, True], 2: [True, False]}[every_n_layers]
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[every_n_layers] = (len(calls), grads)
    quantized = 2 * model.config.num_hidden_layers  # gate_up_proj and down_proj per layer
    # forward + backward (packed bytes saved in between), or forward + recomputation (backward reuses it)
    assert {key: count for key, (count, _) in results.items()} == {None: 2 * quantized, 1: 2 * quantized,
                                                                    2: 2 * quantized}
    for key in (1, 2):
        for name, grad in results[None][1].items():
            torch.testing.assert_close(results[key][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointed_4bit_folded_experts_never_wait_for_the_device():
    pytest.importorskip("bitsandbytes")
    model = _folded_4bit_model()
    block = model.get_decoder().layers[0].mlp  # run under torch's checkpoint, as a checkpointed layer is
    hidden = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)
    with DeviceWaits() as waits:
        out = torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=False)
        out = out[0] if isinstance(out, tuple) else out
        out.square().sum().backward()
    assert hidden.grad is not None and not waits.counts, waits.counts


def test_training_step_waits_for_the_device_only_in_trl_and_transformers(tmp_path, monkeypatch):
    """The paper recipe's step settings on the tiny model (NF4 folded experts, checkpointing, the step's
    samples in one padding-free micro-batch, its optimizer, router report on): bimedix adds no wait; what is
    left is TRL's metric reads (entropy, token accuracy, token count, aux loss) and transformers' packed-row
    check, per micro-batch."""
    pytest.importorskip("bitsandbytes")
    import bimedix.training.sft as sft

    counter = StepWaits()
    make_trainer = sft.make_trainer

    def with_counter(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(counter)
        return trainer

    monkeypatch.setattr(sft, "make_trainer", with_counter)
    paper = yaml.safe_load(resource_path("recipes", "bimedix-mixtral", "sft_qlora.yaml").read_text())
    settings = {key: paper[key] for key in ("expert_lora", "quantize_experts", "load_in_4bit", "padding_free",
                                            "per_device_train_batch_size", "gradient_accumulation_steps",
                                            "activation_checkpointing", "logging_nan_inf_filter", "optim")}
    flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    _train(tmp_path / "run", *flags, "--router_report", "true")
    assert len(counter.steps) == 3
    files = {source.rsplit(":", 1)[0] for source in counter.by_source()}
    assert files <= {"trl/trainer/sft_trainer.py", "transformers/masking_utils.py"}, counter.by_source()
