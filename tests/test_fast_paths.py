"""The fast training paths are the reference paths, on tiny models: router statistics without host syncs."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from bimedix.training.router_stats import RouterLoadCallback, arabic_token_table
from bimedix.training.tiny import build_tiny_model

SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select"}


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
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        callback._before_forward(decoder, (), dict(inputs))
        callback._after_forward(decoder, (), SimpleNamespace(router_logits=output.router_logits))
    assert not SYNC_OPS & {event.key for event in prof.key_averages()}
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
