"""Fast Vicuna encoding: render, tokenize and mask the assistant turns of many records at once.

`encode_conversations` gives, for each record, exactly what
``tokenizer.apply_chat_template(to_messages(record), tokenize=True, return_dict=True,
return_assistant_tokens_mask=True)`` gives with `bimedix.training.template.VICUNA_TEMPLATE`
(``input_ids`` and ``assistant_masks``; ``tests/test_stats.py`` checks it token for token on random
English and Arabic conversations), but renders the template with plain string operations and
tokenizes in batches with the Rust tokenizer (every core), rendering and reading back one batch while the
next is tokenized, which is several times faster than the Jinja path. The data statistics count tokens with it
and trainers may use it for pre-tokenization.

The rendered text, with ``{system} `` only when there is a system prompt::

    <s>{system} USER: {question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

_ROLES = {"human": "USER: ", "gpt": "ASSISTANT:"}
_CHUNK = 1024  # records tokenized per call of the Rust tokenizer


def render_vicuna(record: Mapping, *, system: str | None = None, bos_token: str = "<s>",
                  eos_token: str = "</s>") -> tuple[str, list[tuple[int, int]]]:
    """Render a record as Vicuna text and return it with the character spans of the assistant turns.

    Args:
        record (`Mapping`): a schema record (``conversations`` with ``from``/``value``, optional ``system``).
        system (`str`, *optional*): a system prompt used when the record has none.
        bos_token (`str`, *optional*, defaults to ``"<s>"``): the tokenizer's BOS token.
        eos_token (`str`, *optional*, defaults to ``"</s>"``): the tokenizer's EOS token.

    Returns:
        `tuple[str, list[tuple[int, int]]]`: the text and the ``(start, end)`` character span of each
        assistant answer (its leading space, the answer and the EOS token), as the template's
        ``{% generation %}`` blocks mark them.
    """
    parts = [bos_token]
    length = len(bos_token)
    spans = []
    system_prompt = record.get("system") or system
    if system_prompt:
        parts.append(system_prompt.strip() + " ")
        length += len(parts[-1])
    for turn in record["conversations"]:
        role = turn["from"]
        if role == "human":
            text = "USER: " + turn["value"].strip() + " "
        elif role == "gpt":
            parts.append("ASSISTANT:")
            length += 10
            text = " " + turn["value"].strip() + eos_token
            spans.append((length, length + len(text)))
        else:
            raise ValueError(f"record {record.get('id')!r}: unknown role {role!r} in `conversations` "
                             f"(expected one of {sorted(_ROLES)})")
        parts.append(text)
        length += len(text)
    return "".join(parts), spans


def encode_conversations(tokenizer, records: Sequence[Mapping], *, system: str | None = None,
                         with_mask: bool = True) -> list[dict[str, list[int]]]:
    """Tokenize records with the Vicuna template in one batch, with the assistant-token mask.

    Args:
        tokenizer (`PreTrainedTokenizerFast`): a fast tokenizer (e.g. `load_mixtral_tokenizer()`).
        records (`Sequence[Mapping]`): schema records.
        system (`str`, *optional*): a system prompt for records without one.
        with_mask (`bool`, *optional*, defaults to `True`): also compute ``assistant_masks``.

    Returns:
        `list[dict[str, list[int]]]`: per record ``{"input_ids": [...], "assistant_masks": [...]}``
        (``assistant_masks`` only with ``with_mask``), equal to what ``apply_chat_template`` returns.
    """
    out: list[dict[str, list[int]]] = []
    pending: deque = deque()
    # The Rust tokenizer releases the GIL and uses every core, so chunk k+1 is tokenized in a thread while
    # this one renders the next chunk and reads back chunk k: Python work overlaps tokenization instead of
    # adding to it.
    with ThreadPoolExecutor(max_workers=1) as pool:
        for start in range(0, len(records), _CHUNK):
            rendered = [render_vicuna(record, system=system, bos_token=tokenizer.bos_token,
                                      eos_token=tokenizer.eos_token)
                        for record in records[start:start + _CHUNK]]
            pending.append((rendered, pool.submit(tokenizer.backend_tokenizer.encode_batch,
                                                  [text for text, _ in rendered], add_special_tokens=False)))
            if len(pending) > 1:
                _read_back(*pending.popleft(), with_mask, out)
        while pending:
            _read_back(*pending.popleft(), with_mask, out)
    return out


def _read_back(rendered: list[tuple[str, list[tuple[int, int]]]], encodings: Future, with_mask: bool,
               out: list[dict[str, list[int]]]) -> None:
    for (_, spans), encoding in zip(rendered, encodings.result()):
        if with_mask:
            out.append({"input_ids": encoding.ids, "assistant_masks": _assistant_mask(encoding, spans)})
        else:
            out.append({"input_ids": encoding.ids})


def _assistant_mask(encoding, spans: list[tuple[int, int]]) -> list[int]:
    """Mark every token overlapping a span, the rule ``apply_chat_template`` uses.

    Fast path: the tokens holding a span's first and last characters (one Rust call each). When a
    boundary character belongs to no token, fall back to bisecting the token offsets: they are in
    order, so the tokens overlapping ``(start, end)`` follow the last token ending at or before
    ``start`` and precede the first token starting at or after ``end``.
    """
    mask = [0] * len(encoding.ids)
    bounds = [(encoding.char_to_token(start), encoding.char_to_token(end - 1)) for start, end in spans]
    if all(first is not None and last is not None for first, last in bounds):
        for first, last in bounds:
            mask[first:last + 1] = [1] * (last + 1 - first)
        return mask
    offsets = encoding.offsets
    ends = [end for _, end in offsets]
    starts = [start for start, _ in offsets]
    for start, end in spans:
        first = bisect_right(ends, start)
        last = bisect_left(starts, end)
        if last > first:
            mask[first:last] = [1] * (last - first)
    return mask
