"""`bimedix.llm.engine`: the re-asks every engine makes send the seeds and temperatures their cached requests
were made with, so a resumed run finds them in the cache."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from bimedix.llm.client import Completion
from bimedix.llm.engine import Engine, EngineConfig


class _Client:
    """Answers from a list and records the arguments of every request."""

    def __init__(self, answers: list[str]):
        self.config = SimpleNamespace(model="judge")
        self.answers, self.requests = list(answers), []

    async def complete(self, messages, **kwargs) -> Completion:
        self.requests.append(kwargs)
        return Completion(self.answers.pop(0), "stop", 1, 1, 0.25, False, "key")


class _Judge(Engine):
    name = "judge"
    prompt_names = ("judge",)


def _parse(completion: Completion) -> int | str:
    return int(completion.text) if completion.text.isdigit() else f"{completion.text!r} is not a number"


@pytest.mark.parametrize(("resample", "temperatures"), [(True, [0.2, 0.7, 0.7]), (False, [0.2, 0.2, 0.2])])
def test_ask_re_asks_with_the_next_seed_until_the_answer_parses(resample, temperatures):
    client = _Client(["no", "still no", "42"])
    engine = _Judge(client, EngineConfig(seed=5, temperature=0.2, json_mode=False))
    answer = asyncio.run(engine.ask([{"role": "user", "content": "?"}], _parse, attempts=3, max_tokens=9,
                                    resample=resample))
    assert (answer.value, answer.attempts, answer.cost_usd) == (42, 3, 0.75)
    assert answer.reasons == ["'no' is not a number", "'still no' is not a number"]
    assert [r["seed"] for r in client.requests] == [5, 6, 7]
    assert [r["temperature"] for r in client.requests] == temperatures
    assert all(r["max_tokens"] == 9 and r["response_format"] is None for r in client.requests)


def test_ask_gives_up_after_its_attempts_with_every_reason():
    engine = _Judge(_Client(["a", "b"]), EngineConfig())
    answer = asyncio.run(engine.ask([], _parse, attempts=2, max_tokens=9, resample=True))
    assert answer.value is None and answer.attempts == 2 and len(answer.reasons) == 2
