"""The Vicuna v1.1 chat template BiMediX trains and chats with.

Rendered text (``{system}`` only when a system message is given)::

    <s>{system} USER: {question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

Assistant turns sit inside ``{% generation %}`` blocks, with their leading space and the closing
``</s>``, so TRL's ``assistant_only_loss=True`` trains exactly the answers and their end-of-turn token.
The generation prompt (``... ASSISTANT:``) is a token prefix of the full conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

VICUNA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] | trim }}{{ ' ' }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'USER: ' + (message['content'] | trim) + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT:' }}"
    "{%- generation -%}{{ ' ' + (message['content'] | trim) + eos_token }}{%- endgeneration -%}"
    "{%- else -%}"
    "{{ raise_exception('Vicuna template: unexpected role ' + message['role'] + ' (use system, user, assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

ROLE_TO_CHAT = {"human": "user", "gpt": "assistant"}


def to_messages(record: Mapping, system: str | None = None) -> list[dict[str, str]]:
    """Turn a schema record (Vicuna ``conversations``) into chat ``messages``.

    Args:
        record (`Mapping`): a BiMed record with ``conversations`` and optional ``system``.
        system (`str`, *optional*): a system prompt used when the record has none.

    Returns:
        `list[dict[str, str]]`: ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``.
    """
    messages = []
    system_prompt = record.get("system") or system
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.extend(
        {"role": ROLE_TO_CHAT[turn["from"]], "content": turn["value"]} for turn in record["conversations"]
    )
    return messages


def apply_vicuna_template(tokenizer) -> None:
    """Install `VICUNA_TEMPLATE` as ``tokenizer.chat_template`` (and a pad token if it has none)."""
    tokenizer.chat_template = VICUNA_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


def render(messages: Sequence[Mapping[str, str]], *, bos_token: str = "<s>", eos_token: str = "</s>",
           add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with `VICUNA_TEMPLATE` without a tokenizer (for logs, previews and tests)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[list(messages)], chat_template=VICUNA_TEMPLATE, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token,
    )
    return rendered[0]
