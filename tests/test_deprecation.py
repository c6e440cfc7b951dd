"""The old module paths of the base layer (`bimedix.core`) keep working for one release, with a warning that
names the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import bimedix.core.conventions
import bimedix.core.io
import bimedix.core.outputs
import bimedix.data.schema
import bimedix.training.moe.expert_lora
import bimedix.training.moe.experts
import bimedix.training.moe.quantize
import bimedix.training.moe.targets


@pytest.mark.parametrize(("old", "name", "new"), [
    ("bimedix.data.io", "write_jsonl", bimedix.core.io),
    ("bimedix.data.io", "RecordError", bimedix.core.io),
    ("bimedix.data.io", "read_records", bimedix.data.schema),
    ("bimedix.data.outputs", "OutputFolder", bimedix.core.outputs),
    ("bimedix.data.conventions", "OPTION_LETTERS", bimedix.core.conventions),
    ("bimedix.training.targets", "build_lora_config", bimedix.training.moe.targets),
    ("bimedix.training.experts", "fused_experts", bimedix.training.moe.experts),
    ("bimedix.training.expert_lora", "set_expert_lora_mode", bimedix.training.moe.expert_lora),
    ("bimedix.training.quantize", "quantize_experts", bimedix.training.moe.quantize),
])
def test_old_path_forwards_with_a_warning_naming_the_new_one(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated.*import {name} from {new.__name__}$"):
        value = getattr(module, name)
    assert value is getattr(new, name)


def test_old_path_refuses_names_it_never_had():
    module = importlib.import_module("bimedix.data.io")
    with pytest.raises(AttributeError, match="'bimedix.data.io' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018
    with pytest.raises(AttributeError):
        module._umask  # noqa: B018  (private names are not forwarded)


def test_from_import_warns_at_the_importing_line():
    code = "import warnings\nwarnings.simplefilter('default')\nfrom bimedix.data.outputs import safe_name\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr.startswith("<string>:3: DeprecationWarning: bimedix.data.outputs is deprecated")


def test_the_command_line_imports_no_deprecated_path():
    code = ("import warnings\nwarnings.simplefilter('error', DeprecationWarning)\n"
            "from bimedix.cli import build_parser\nbuild_parser()\n")
    subprocess.run([sys.executable, "-c", code], check=True)
