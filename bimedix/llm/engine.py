"""What the LLM engines (`Translator`, `DialogueGenerator`, `RubricGrader`) share: their request settings,
their prompts, one request re-asked until its answer parses, and the run over a file of records.

An engine's ``fingerprint`` (its name, the model, its settings and prompt templates) keys the results kept in
the cache database: change any of them and the records run again (their unchanged requests still come from
the cache, so no finished request is paid twice).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .client import Completion, LLMClient
from .prompts import load_prompt
from .runner import RunSummary, engine_fingerprint, run_records

T = TypeVar("T")

#: The lowest temperature of a re-ask, so that it can give a different answer.
RESAMPLE_TEMPERATURE = 0.7


@dataclass(kw_only=True)
class EngineConfig:
    """The request settings every engine has; each engine's config adds its own. Configs take keyword
    arguments only (their fields come from two classes, so positions would mislead).

    Args:
        seed (`int`, *optional*, defaults to `0`): request seed of the first attempt (+1 per re-ask).
        max_tokens (`int`, *optional*, defaults to `4096`): completion limit.
        temperature (`float`, *optional*, defaults to `0`): sampling temperature.
        json_mode (`bool`, *optional*, defaults to `True`): send ``response_format={"type": "json_object"}``.
        prompts_dir (`str`, *optional*): folder overriding the shipped prompt templates.
    """

    seed: int = 0
    max_tokens: int = 4096
    temperature: float = 0.0
    json_mode: bool = True
    prompts_dir: str | None = None


@dataclass(frozen=True)
class Answer(Generic[T]):
    """What `Engine.ask` got: the first parsed answer (``None`` if every attempt was refused), why each
    refused attempt was refused, the attempts made and their cost."""

    value: T | None
    reasons: list[str]
    attempts: int
    cost_usd: float


class Engine:
    """An LLM engine: a `LLMClient`, its settings and its prompt templates (``prompt_names``).

    Args:
        client (`LLMClient`): the endpoint, cache and ledger.
        config (`EngineConfig`): the engine's settings.
    """

    name: str  #: the engine's name in its fingerprint
    prompt_names: tuple[str, ...]

    def __init__(self, client: LLMClient, config: EngineConfig):
        self.client = client
        self.config = config
        self.prompts = {name: load_prompt(name, config.prompts_dir) for name in self.prompt_names}
        self.response_format = {"type": "json_object"} if config.json_mode else None

    @property
    def fingerprint(self) -> str:
        """Model, settings and prompts: what a result depends on besides the engine's input."""
        return engine_fingerprint(self.name, self.client.config.model, self.config, self.prompts.values())

    async def complete(self, messages: list[dict], max_tokens: int, *, seed: int,
                       resample: bool = False) -> Completion:
        """One request; ``resample`` (a re-ask) raises the temperature to at least `RESAMPLE_TEMPERATURE`."""
        temperature = self.config.temperature
        if resample:
            temperature = max(temperature, RESAMPLE_TEMPERATURE)
        return await self.client.complete(messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                          response_format=self.response_format)

    async def ask(self, messages: list[dict], parse: Callable[[Completion], T | str], *, attempts: int,
                  max_tokens: int, resample: bool) -> Answer[T]:
        """Send ``messages`` until ``parse`` accepts the answer, at most ``attempts`` times.

        Args:
            messages (`list[dict]`): the rendered prompt.
            parse (`Callable`): the parsed answer, or a string saying why the answer is refused.
            attempts (`int`): requests at most; attempt k uses seed ``config.seed + k``.
            max_tokens (`int`): completion limit.
            resample (`bool`): re-asks use a temperature of at least `RESAMPLE_TEMPERATURE`.
        """
        cost, reasons = 0.0, []
        for attempt in range(attempts):
            completion = await self.complete(messages, max_tokens, seed=self.config.seed + attempt,
                                             resample=resample and attempt > 0)
            cost += completion.cost_usd
            parsed = parse(completion)
            if not isinstance(parsed, str):
                return Answer(parsed, reasons, attempt + 1, cost)
            reasons.append(parsed)
        return Answer(None, reasons, attempts, cost)


class RecordEngine(Engine):
    """An engine that makes one output record from each input record: ``async __call__(record)`` returns an
    `Accepted` or a `Rejected` (`bimedix.llm.runner`); `run_file` runs it over a file, resumably.

    ``meta_field`` is the ``meta`` field of output records that holds their ``source_id``.
    """

    meta_field: str

    async def run_file(self, input_path: str | os.PathLike, output_path: str | os.PathLike) -> RunSummary:
        """Run the engine over every record of ``input_path`` into ``output_path``, resuming a previous run
        (rejects go to ``OUT.rejects.jsonl``)."""
        return await run_records(input_path, self, output=output_path, client=self.client, desc=self.name,
                                 fingerprint=self.fingerprint,
                                 source_id_of=lambda record: record["meta"][self.meta_field]["source_id"])
