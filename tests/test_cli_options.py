"""The command line's flags: every visible one is kebab-case (bar `sft`, which takes TRL's dataclass flags),
the shared ones (`bimedix/cli/_options.py`) read alike everywhere, and older snake_case spellings parse."""

from __future__ import annotations

import argparse

import pytest

from bimedix.cli import build_parser

TRL_COMMANDS = {"sft"}  # TRL's `--output_dir`, `--max_length`: its contract, not ours


def _commands(parser: argparse.ArgumentParser, prefix: str = "bimedix"):
    """(name, parser) of every (sub-)command below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


COMMANDS = dict(_commands(build_parser()))


def _visible_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions if action.help != argparse.SUPPRESS
            for flag in action.option_strings}


@pytest.mark.parametrize("command", sorted(name for name in COMMANDS if name.split()[1] not in TRL_COMMANDS))
def test_visible_flags_are_kebab_case(command):
    flags = _visible_flags(COMMANDS[command])
    assert flags and not [flag for flag in flags if "_" in flag], command


def test_shared_flags_have_one_wording():
    shared = ("--overwrite", "--include-unreviewed", "--peft", "--device", "--token", "--fraction",
              "--concurrency", "--timeout", "--max-retries", "--prices", "--batch-api", "--no-progress",
              "--api-key-env")
    wordings: dict[str, set[str]] = {flag: set() for flag in shared}
    for name, parser in COMMANDS.items():
        flags = _visible_flags(parser)
        for flag in set(shared) & set(flags):
            wording = flags[flag].help.replace(f"no {name.split()[-1]} made", "no COMMAND made")
            # which input, or when it applies
            for where in ("dataset: ", "--translations: ", "with --web: ", "hf backend: "):
                wording = wording.removeprefix(where)
            wordings[flag].add(wording.split(" (default: $")[0])  # --token: each app's own variable
    assert {flag: found for flag, found in wordings.items() if len(found) != 1} == {}


@pytest.mark.parametrize("argv, dest, value", [
    (["show-mask", "--data", "x.jsonl", "--max_length", "64"], "max_length", 64),
    (["show-mask", "--data", "x.jsonl", "--max-length", "64"], "max_length", 64),
    (["show-mask", "--data", "x.jsonl"], "max_length", None),
    (["merge", "--adapter", "a", "--output", "o", "--quantize_experts", "nf4"], "quantize_experts", "nf4"),
    (["merge", "--adapter", "a", "--output", "o", "--quantize-experts", "fp4"], "quantize_experts", "fp4"),
    (["merge", "--adapter", "a", "--output", "o"], "quantize_experts", None),
    (["estimate-memory", "--recipe", "r.yaml", "--num_processes", "8"], "num_processes", 8),
    (["estimate-memory", "--recipe", "r.yaml", "--accelerate_config", "zero2"], "accelerate_config", "zero2"),
    (["chat", "--model", "m", "--use_kernels"], "use_kernels", True),
    (["eval", "--model", "m", "--output", "o", "--use_kernels"], "use_kernels", True),
    (["merge", "--adapter", "a", "--output", "o", "--use-kernels"], "use_kernels", True),
    (["merge", "--adapter", "a", "--output", "o"], "use_kernels", False),
])
def test_old_snake_case_spellings_still_parse(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_hidden_aliases_keep_the_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["merge", "--adapter", "a", "--output", "o", "--quantize_experts", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
