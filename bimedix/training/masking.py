"""Show which tokens of a conversation are trained: the assistant turns and their ``</s>``, nothing else.

`assistant_token_mask` tokenizes a conversation exactly as TRL's ``assistant_only_loss`` preparation
does (``apply_chat_template(..., return_assistant_tokens_mask=True)`` with the tokenizer's template,
then ``max_length`` truncation); `render_mask` prints it with trained tokens in colour, or, for logs,
with trained spans between `TRAIN_OPEN` and `TRAIN_CLOSE` markers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

TRAIN_OPEN, TRAIN_CLOSE = "[[", "]]"
_GREEN, _DIM, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


def assistant_token_mask(tokenizer, messages: Sequence[Mapping[str, str]], max_length: int | None = None,
                         truncation_mode: str = "keep_start") -> tuple[list[int], list[int]]:
    """Token ids and their 0/1 trained mask for ``messages``, as TRL's assistant-only loss builds them.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): with a chat template that has ``{% generation %}`` markers.
        messages (`Sequence[Mapping[str, str]]`): chat messages (``role``, ``content``).
        max_length (`int`, *optional*): truncate like `SFTConfig.max_length`.
        truncation_mode (`str`, *optional*, defaults to `"keep_start"`): or ``"keep_end"``.

    Returns:
        `tuple[list[int], list[int]]`: ``input_ids`` and the mask (1 = trained).
    """
    encoded = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if max_length is not None:
        window = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        ids, mask = ids[window], mask[window]
    return ids, mask


def render_mask(tokenizer, input_ids: Sequence[int], mask: Sequence[int], plain: bool = False) -> str:
    """Render tokens as text, trained ones highlighted (ANSI colour) or marked (``plain=True``).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): decodes the ids.
        input_ids (`Sequence[int]`): token ids.
        mask (`Sequence[int]`): 1 where the token is trained.
        plain (`bool`, *optional*, defaults to `False`): use `TRAIN_OPEN`/`TRAIN_CLOSE` instead of colour.
    """
    pieces = _token_texts(tokenizer, input_ids)
    out, run, trained = [], [], None
    for piece, bit in zip(pieces, mask):
        if trained is not None and bool(bit) != trained:
            out.append(_wrap("".join(run), trained, plain))
            run = []
        trained = bool(bit)
        run.append(piece)
    if run:
        out.append(_wrap("".join(run), trained, plain))
    return "".join(out)


def mask_summary(mask: Sequence[int]) -> str:
    """``"123 tokens, 45 trained (36.6%)"``."""
    trained = sum(1 for bit in mask if bit)
    return f"{len(mask)} tokens, {trained} trained ({100 * trained / max(len(mask), 1):.1f}%)"


def _token_texts(tokenizer, input_ids: Sequence[int]) -> list[str]:
    """The text each token adds, by decoding growing prefixes (keeps SentencePiece spaces and byte pieces)."""
    texts, previous = [], ""
    for end in range(1, len(input_ids) + 1):
        current = tokenizer.decode(list(input_ids[:end]), skip_special_tokens=False)
        texts.append(current[len(os.path.commonprefix([previous, current])):])
        previous = current
    return texts


def _wrap(text: str, trained: bool, plain: bool) -> str:
    if plain:
        return f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}" if trained else text
    return f"{_GREEN if trained else _DIM}{text}{_RESET}"
