"""Shared pieces of the LLM engine tests: a client factory and runner, MCQA records (the ``api_key`` and
``server`` fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from bimedix.data.schema import make_record
from bimedix.llm.cache import RequestCache
from bimedix.llm.client import ClientConfig, LLMClient

T = TypeVar("T")

SECRET = "sk-test-DO-NOT-LEAK-7f3a9c51"
MODEL = "test-model"
PRICES = {MODEL: {"input": 1.0, "output": 2.0}}  # USD per 1M tokens


def make_client(base_url: str, cache_path: Path, **overrides) -> LLMClient:
    """A client with tiny timeouts and backoffs so fault tests stay fast."""
    settings = {"timeout": 10.0, "backoff_base": 0.01, "backoff_max": 0.05, "max_retries": 3,
                "concurrency": 4,
                "prices": PRICES, **overrides}
    return LLMClient(ClientConfig(base_url=base_url, model=MODEL, **settings), RequestCache(cache_path))


def run_closing(client: LLMClient, work: Callable[[LLMClient], Awaitable[T]]) -> T:
    """Run ``work(client)`` in a fresh event loop, closing the client afterwards."""

    async def go():
        try:
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def mcqa_record(index: int, *, answer: str = "B") -> dict:
    """An English MCQA record with numbers, a unit, a drug name and an abbreviation in it."""
    options = [f"Metformin {500 + index} mg", "Insulin glargine", "Check HbA1c in 3 months", "Start aspirin"]
    human = (f"Answer the following multiple-choice question.\n\nQuestion: A {40 + index}-year-old man has a "
             f"fasting glucose of {7 + index / 10:.1f} mmol/L and an ECG "
             "that is normal. What is the next step?\n\nOptions:\n"
             + "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", options)))
    gpt = (f"{answer}. {options['ABCD'.index(answer)]}\n\n"
           "Explanation: guidelines recommend it at this glucose level.")
    return make_record(id=f"demo-en-{index:03d}", source="demo", task="mcqa", language="en",
                       conversations=[{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
                       license="MIT", options=options, answer=answer, original_id=str(index))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
