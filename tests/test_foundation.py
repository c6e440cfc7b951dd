"""Package plumbing: the tokenizer offline, the Vicuna template, tiny models, shipped resources, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bimedix.training.template import render, to_messages
from bimedix.training.tiny import TINY_CONFIGS, build_tiny_model


def test_mixtral_tokenizer_offline(mixtral_tokenizer):
    tok = mixtral_tokenizer
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok("USER: hello").input_ids == [1, 2223, 725, 28747, 6312, 28709]


def test_vicuna_render_and_generation_prompt_is_a_token_prefix(mixtral_tokenizer):
    record = {"system": "Be careful.", "conversations": [
        {"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "مرحبا"}, {"from": "gpt", "value": "أهلا"}]}
    messages = to_messages(record)
    assert render(messages) == ("<s>Be careful. USER: Hi there ASSISTANT: Hello!</s>"
                                "USER: مرحبا ASSISTANT: أهلا</s>")
    full = mixtral_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
    prompt = mixtral_tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
    assert full["input_ids"][: len(prompt)] == prompt
    trained = [i for i, m in zip(full["input_ids"], full["assistant_masks"]) if m]
    assert mixtral_tokenizer.decode(trained) == "Hello!</s> أهلا</s>"


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_tiny_models_build_and_run(arch):
    model = build_tiny_model(arch, seed=3)
    again = build_tiny_model(arch, seed=3)
    ids = torch.tensor([[1, 2223, 725, 28747]])
    logits = model(ids).logits
    assert logits.shape == (1, 4, 32000)
    assert torch.equal(logits, again(ids).logits)


def test_shipped_resources_resolve():
    from bimedix.resources import resource_path

    assert resource_path("recipes").is_dir() and resource_path("hub_cards").is_dir()
    with pytest.raises(FileNotFoundError, match="not shipped"):
        resource_path("recipes", "no-such-recipe.yaml")


def test_cli_help_lists_commands():
    from bimedix.cli import build_parser

    out = subprocess.run([sys.executable, "-m", "bimedix", "--help"], capture_output=True, text=True,
                         check=True)
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    commands = set(subparsers.choices)
    assert {"convert", "build-data", "translate", "review", "sft", "eval", "push", "chat",
            "quickstart"} <= commands
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert commands <= listed, f"missing from --help: {sorted(commands - listed)}"
