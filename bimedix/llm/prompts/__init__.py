"""Versioned prompt templates for the LLM engines, shipped as YAML next to this file and overridable.

Each ``<name>.yaml`` holds ``version`` (recorded in the output's provenance), ``system`` and ``user``,
both Jinja templates. They are rendered with ``payload`` (the task's JSON, which the user template must
include unless the file lists the variables it uses instead under ``inputs``, as ``grader.yaml``,
HealthBench's grader prompt, does), every top-level key of the task payload (e.g. ``min_turns``) and
``arabic_option_letters`` (``A → أ, B → ب, ...`` from `bimedix.core.conventions.OPTION_LETTERS`). To
change a prompt, copy the shipped file into a folder, edit it (and its ``version``), and pass that folder
with ``--prompts DIR``; names missing there fall back to the shipped ones.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from ...core.conventions import OPTION_LETTERS
from ...resources import resource_path

PROMPT_NAMES = ("translate", "refine", "judge", "dialogue", "grader")


@dataclass
class PromptTemplate:
    """One prompt: its name, version and the Jinja sources of its system and user messages."""

    name: str
    version: str
    system: str
    user: str
    _compiled: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        env = jinja2.Environment(undefined=jinja2.StrictUndefined)
        self._compiled = (env.from_string(self.system), env.from_string(self.user))

    def render(self, payload: dict) -> list[dict]:
        """Return OpenAI chat messages for ``payload`` (a JSON-serialisable dict with a ``task`` key)."""
        values = {"arabic_option_letters": ", ".join(f"{en} → {ar}" for en,
                                                     ar in zip(*OPTION_LETTERS.values())),
                  **payload, "payload": json.dumps(payload, ensure_ascii=False)}
        system, user = self._compiled
        return [{"role": "system", "content": system.render(values).strip()},
                {"role": "user", "content": user.render(values).strip()}]


def load_prompt(name: str, override_dir: str | os.PathLike | None = None) -> PromptTemplate:
    """Load prompt ``name`` from ``override_dir`` if it has ``<name>.yaml``, else the shipped one.

    Raises:
        `ValueError`: for an unknown name or a file without ``version``, ``system`` and ``user`` strings.
    """
    if name not in PROMPT_NAMES:
        raise ValueError(f"unknown prompt {name!r}; expected one of {list(PROMPT_NAMES)}")
    path = Path(override_dir) / f"{name}.yaml" if override_dir else None
    if path is None or not path.is_file():
        path = resource_path("bimedix", "llm", "prompts", f"{name}.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with version, system and user")
    for key in ("version", "system", "user"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{path}: field `{key}` must be a non-empty string")
    inputs = data.get("inputs") or ["payload"]
    missing = [name for name in inputs
               if not re.search(r"\{\{\s*" + re.escape(str(name)) + r"\s*\}\}", data["user"])]
    if missing:
        raise ValueError(f"{path}: field `user` must include {{{{ {missing[0]} }}}}"
                         + (", the task's JSON" if missing[0] == "payload" else ""))
    try:
        return PromptTemplate(name, data["version"].strip(), data["system"], data["user"])
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"{path}: invalid Jinja template at line {err.lineno}: {err.message}") from None
