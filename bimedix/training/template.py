"""The Vicuna v1.1 chat template BiMediX trains and chats with.

Rendered text (``{system}`` only when a system message is given)::

    <s>{system} USER: {question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

Assistant turns sit inside ``{% generation %}`` blocks, with their leading space and the closing
``</s>``, so TRL's ``assistant_only_loss=True`` trains exactly the answers and their end-of-turn token.
The generation prompt (``... ASSISTANT:``) is a token prefix of the full conversation.

A training run records how its prompts were built in ``bimedix_chat.json`` next to the adapter
(`save_chat_settings`: the template name and the system prompt, ``null`` when there was none), so that
`bimedix.chat.ChatSession` prompts the model exactly as it was trained (`load_chat_settings`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

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
    "{{ raise_exception('Vicuna template: unexpected role ' + message['role'] + ' (use system, user, "
    "assistant)') }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

ROLE_TO_CHAT = {"human": "user", "gpt": "assistant"}
#: File in an adapter (or merged model) folder recording the chat template and system prompt of its training.
CHAT_SETTINGS_FILE = "bimedix_chat.json"


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
        conversations=[list(messages)], chat_template=VICUNA_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token,
    )
    return rendered[0]


def save_chat_settings(folder: str | os.PathLike, *, chat_template: str, system_prompt: str | None) -> Path:
    """Write `CHAT_SETTINGS_FILE` into ``folder``: how the training prompts were built.

    Args:
        folder (`str | os.PathLike`): the adapter or model folder.
        chat_template (`str`): ``"vicuna"`` (`VICUNA_TEMPLATE`) or ``"model"`` (the tokenizer's own template,
            saved with the tokenizer in the same folder).
        system_prompt (`str`, *optional*): the system prompt given to records without one; `None` for none.
    """
    from ..core.io import write_json

    path = Path(folder) / CHAT_SETTINGS_FILE
    write_json(path, {"chat_template": chat_template, "system_prompt": system_prompt})
    return path


def load_chat_settings(folder: str | os.PathLike) -> dict | None:
    """Read `CHAT_SETTINGS_FILE` from ``folder``; `None` when the folder has none (e.g. a Hub id or a base
    model).

    Returns:
        `dict | None`: ``{"chat_template": "vicuna" | "model", "system_prompt": str | None}``.

    Raises:
        `ValueError`: when the file is not such a mapping.
    """
    path = Path(folder) / CHAT_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(settings, dict) or settings.get("chat_template") not in ("vicuna", "model") \
            or not isinstance(settings.get("system_prompt"), (str, type(None))):
        raise ValueError(f"{path}: expected {{\"chat_template\": \"vicuna\" | \"model\", \"system_prompt\": "
                         f"string or null}}, got {settings!r:.200}")
    return settings
