"""`transformers serve` on a tiny model, on 127.0.0.1, talked to with the `openai` client (offline)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from process_support import WatchedProcess, free_port

pytest.importorskip("fastapi",
                    reason="`transformers serve` needs the serve extra: pip install 'bimedix[serve]'")
pytest.importorskip("uvicorn",
                    reason="`transformers serve` needs the serve extra: pip install 'bimedix[serve]'")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("the `transformers` CLI is not installed next to this Python")
    port = free_port()
    with WatchedProcess([executable, "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port),
                         "--device", "cpu"]) as server:
        server.wait_for_port(port)  # fails at once, with its output, if it exits first
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        client.models.list()
        yield client, str(tiny_model_dir)


def _greedy_reply(model_dir: str, messages: list[dict], max_new_tokens: int) -> str:
    """The tiny model's own greedy continuation of the chat-templated prompt, decoded as the server does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_completion_through_openai_client(server):
    client, model = server
    assert model in [m.id for m in client.models.list().data]
    messages = [{"role": "system", "content": "You are a medical assistant."},
                {"role": "user", "content": "What is anemia?"}]
    reply = client.chat.completions.create(model=model, max_tokens=4, temperature=0, messages=messages)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 4
    assert reply.choices[0].message.content == _greedy_reply(model, messages, max_new_tokens=4)


def test_streaming_arabic_chat(server):
    client, model = server
    stream = client.chat.completions.create(model=model, max_tokens=4, stream=True, temperature=0,
                                            messages=[{"role": "user", "content": "ما هو فقر الدم؟"}])
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices
              and chunk.choices[0].delta.content]
    assert "".join(pieces) == _greedy_reply(model, [{"role": "user", "content": "ما هو فقر الدم؟"}],
                                            max_new_tokens=4)
