"""`transformers serve` on a tiny model, on 127.0.0.1, talked to with the `openai` client (offline)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi",
                    reason="`transformers serve` needs the serve extra: pip install 'bimedix[serve]'")
pytest.importorskip("uvicorn",
                    reason="`transformers serve` needs the serve extra: pip install 'bimedix[serve]'")
openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("the `transformers` CLI is not installed next to this Python")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([executable, "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port",
                                    str(port), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield client, str(tiny_model_dir)
    finally:
        process.terminate()
        process.wait(timeout=30)


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
