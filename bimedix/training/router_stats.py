"""Expert load per MoE layer, split by the language of each training sample (English vs Arabic).

`RouterLoadCallback` hooks the decoder of the model being trained: a forward pre-hook reads the batch
(``input_ids`` plus ``attention_mask`` or, for packed / padding-free batches, ``position_ids``) and asks
the decoder for its router logits; a forward hook counts, per layer, how many tokens each expert
receives (top-k of the router logits), per sample language. Only training forwards count, once per
step (gradient-checkpoint recomputation happens inside the layers and is not seen here). The counts stay on
the device and the hooks never wait for it (no ``.item()``, no boolean indexing, no copy to the host): they
are read only at logging steps and at the end.

The language of a sample is read from its tokens, because TRL's packing keeps only ``input_ids`` and
``labels``: a sample (a row, or a packed segment) is Arabic when at least `ARABIC_SHARE` of its
tokens contain Arabic letters, English otherwise. The Mixtral tokenizer spends about one token per
Arabic letter, so Arabic samples are far above the threshold even with an English system prompt.

At every logging step the callback logs (through ``trainer.log``, so every configured logger and
``state.log_history`` get it), per layer, the total-variation distance between the English and Arabic
expert distributions and each language's busiest-expert share, counted since the start of training;
at the end it writes the full per-layer, per-expert loads to a JSON report.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..core.conventions import LANGUAGES
from ..core.io import write_json

logger = logging.getLogger(__name__)

ARABIC_SHARE = 0.3
_ARABIC = re.compile("[\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff]")


def arabic_token_table(tokenizer) -> torch.Tensor:
    """Return a bool tensor over the vocabulary: True where the token's text contains an Arabic letter."""
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    for piece, index in tokenizer.get_vocab().items():
        if _ARABIC.search(piece):
            table[index] = True
    return table


def sample_languages(input_ids: torch.Tensor, segments: torch.Tensor, arabic: torch.Tensor) -> torch.Tensor:
    """Language index (0 = en, 1 = ar) of every token, decided per sample.

    Args:
        input_ids (`torch.Tensor`): flat token ids ``(N,)``.
        segments (`torch.Tensor`): flat sample index of each token ``(N,)``, ``-1`` for padding.
        arabic (`torch.Tensor`): `arabic_token_table` of the tokenizer.

    Returns:
        `torch.Tensor`: ``(N,)`` long, ``-1`` for padding.

    Computed without a host-device sync: there are at most N samples, and padding counts in an extra slot.
    """
    valid = segments >= 0
    slot = torch.where(valid, segments, segments.numel())
    is_ar = arabic.to(input_ids.device)[input_ids].float() * valid
    totals = torch.zeros(segments.numel() + 1, device=input_ids.device).index_add_(0, slot, valid.float())
    ar = torch.zeros(segments.numel() + 1, device=input_ids.device).index_add_(0, slot, is_ar)
    segment_language = (ar >= ARABIC_SHARE * totals).long()
    return torch.where(valid, segment_language[slot], -1)


class RouterLoadCallback(TrainerCallback):
    """Count tokens per expert, per MoE layer, per sample language, and report them.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the training tokenizer (to tell Arabic tokens).
        log (`Callable[[dict], None]`, *optional*): where the per-step summary goes, normally ``trainer.log``
            (the trainer's loggers and ``state.log_history``); without it only the JSON report is written.
        report_path (`str | os.PathLike`, *optional*): the JSON report; defaults to
            ``<output_dir>/router_load.json``.

    Example:
        >>> trainer.add_callback(RouterLoadCallback(tokenizer, log=trainer.log))  # doctest: +SKIP
    """

    def __init__(self, tokenizer, log: Callable[[dict], None] | None = None,
                 report_path: str | os.PathLike | None = None):
        self.arabic = arabic_token_table(tokenizer)
        self.log = log
        self.report_path = Path(report_path) if report_path else None
        self.counts: torch.Tensor | None = None  # (languages, layers, experts), float64 on the device
        self.top_k = 1
        self._languages: torch.Tensor | None = None  # of the batch being forwarded
        self._handles: list = []

    # --- trainer events ---------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config.get_text_config()
        self.top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
        decoder = base.get_decoder()
        self._handles = [decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                         decoder.register_forward_hook(self._after_forward)]

    def on_log(self, args, state, control, logs=None, **kwargs):
        # right after the trainer's own training log; our entry carries no "loss", so this does not recurse
        if logs and "loss" in logs and self.log is not None and self.counts is not None:
            self.log(self.summary(self._gathered(args)))

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.counts is None:
            return
        counts = self._gathered(args)
        if state.is_world_process_zero:
            path = self.report_path or Path(args.output_dir) / "router_load.json"
            write_json(path, self.report(counts))
            logger.info("Wrote the expert load by language to %s", path)

    # --- results ----------------------------------------------------------------------------------

    def summary(self, counts: torch.Tensor) -> dict[str, float]:
        """Per layer: total-variation distance between English and Arabic loads, busiest-expert share each."""
        shares = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        logs = {}
        for layer in range(counts.shape[1]):
            if counts[:, layer].sum(-1).min() > 0:
                total_variation = float((shares[0, layer] - shares[1, layer]).abs().sum() / 2)
                logs[f"router/layer{layer}/tv_en_ar"] = round(total_variation, 4)
            for i, language in enumerate(LANGUAGES):
                if counts[i, layer].sum() > 0:
                    max_share = float(shares[i, layer].max())
                    logs[f"router/layer{layer}/{language}_max_share"] = round(max_share, 4)
        return logs

    def report(self, counts: torch.Tensor) -> dict:
        """The JSON report: token-expert assignments per language, layer and expert, and their shares."""
        shares = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        return {
            "top_k": self.top_k,
            "languages": {
                language: {
                    "token_assignments": int(counts[i].sum()),
                    "counts": counts[i].long().tolist(),
                    "shares": [[round(float(v), 6) for v in row] for row in shares[i]],
                }
                for i, language in enumerate(LANGUAGES)
            },
            "tv_en_ar": [round(float(v), 6) for v in (shares[0] - shares[1]).abs().sum(-1) / 2],
            "note": "counts[layer][expert] = tokens routed to that "
                    "expert (top-k), by sample language read from tokens",
        }

    # --- hooks ------------------------------------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not module.training or not torch.is_grad_enabled() or input_ids is None:
            self._languages = None
            return None
        segments = _segments(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        if self.arabic.device != input_ids.device:  # copied to the device once
            self.arabic = self.arabic.to(input_ids.device)
        self._languages = sample_languages(input_ids.reshape(-1), segments, self.arabic)
        kwargs["output_router_logits"] = True
        return args, kwargs

    def _after_forward(self, module, args, output):
        if self._languages is None:
            return
        router_logits = getattr(output, "router_logits", None)
        languages, self._languages = self._languages, None
        if not router_logits:
            return
        n_layers, n_experts = len(router_logits), router_logits[0].shape[-1]
        if self.counts is None:
            self.counts = torch.zeros(len(LANGUAGES), n_layers, n_experts, dtype=torch.float64,
                                      device=languages.device)
        with torch.no_grad():
            # one scatter-add for all layers into (language, layer, expert) slots; padding: a dropped slot
            chosen = torch.stack([logits.detach().reshape(-1, n_experts).to(languages.device)
                                  for logits in router_logits]).topk(self.top_k, dim=-1).indices
            layer = torch.arange(n_layers, device=languages.device)[:, None, None]
            slot = (languages[None, :, None] * n_layers + layer) * n_experts + chosen
            slot = torch.where(languages[None, :, None] >= 0, slot, self.counts.numel()).reshape(-1)
            added = torch.zeros(self.counts.numel() + 1, dtype=torch.float64, device=languages.device)
            added.index_add_(0, slot, torch.ones_like(slot, dtype=torch.float64))
            self.counts += added[:-1].view_as(self.counts)

    def _gathered(self, args) -> torch.Tensor:
        """The counts summed over processes, on the host (the one read of the device counts)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.counts.cpu()
        total = self.counts.to(args.device, torch.float32)
        torch.distributed.all_reduce(total)
        return total.cpu().double()


def _segments(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor | None) -> torch.Tensor:
    """Flat sample index of each token: rows of a padded batch, or position-0 resets of a packed row."""
    if attention_mask is None and position_ids is not None:
        starts = (position_ids.reshape(-1) == 0).long()
        return (starts.cumsum(0) - 1).clamp_min(0)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    if attention_mask is not None:
        rows = rows.masked_fill(attention_mask == 0, -1)
    return rows.reshape(-1)
