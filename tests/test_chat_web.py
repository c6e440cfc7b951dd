"""`ChatSession.launch` / `bimedix chat --web` in a real browser on a tiny random Mixtral: English and Arabic
messages stream into the page, Arabic turns are laid out right to left, the notice is shown, reset clears; and
the app holds up under hostile use: clients that go away, huge bodies and histories, foreign Host names,
tokens."""

from __future__ import annotations

import gc
import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from browser_support import free_port, screenshot

from bimedix.chat import ChatSession
from bimedix.cli import main

expect = pytest.importorskip("playwright.sync_api",
                             reason="Playwright is not installed (pip install playwright)").expect

COUNT_UPDATES = """() => { window.updates = 0; new MutationObserver(() => window.updates++)
    .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }"""


@pytest.fixture(scope="module")
def chat_server(tiny_model_dir):
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", max_new_tokens=12)
    stream = session.stream

    def paced_stream(text):  # a tiny model replies faster than a page repaints: pace it like a real model
        for piece in stream(text):
            time.sleep(0.05)
            yield piece

    session.stream = paced_stream
    server = session.launch(port=free_port())
    yield session, server
    server.close()


def test_chat_page_streams_english_and_arabic(browser, chat_server, tmp_path):
    session, server = chat_server
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    try:
        page.goto(server.url)
        expect(page.locator("#notice")).to_contain_text("not medical advice")
        assert page.locator("#notice p[dir='rtl']").inner_text().startswith("نموذج بحثي")
        page.evaluate(COUNT_UPDATES)
        page.fill("#input", "What are the symptoms of anaemia?")
        page.keyboard.press("Enter")
        english = page.locator(".turn.assistant.done").nth(0)
        expect(english).to_be_visible(timeout=60_000)
        assert english.get_attribute("dir") == "ltr" and english.inner_text().strip()
        assert page.evaluate("window.updates") >= 3  # the bubble, then the reply in several pieces
        page.fill("#input", "ما هي أعراض فقر الدم؟")
        page.click("#send")
        arabic = page.locator(".turn.assistant.done").nth(1)
        expect(arabic).to_be_visible(timeout=60_000)
        assert arabic.get_attribute("dir") == "rtl"
        assert arabic.evaluate("e => getComputedStyle(e).direction") == "rtl"
        assert page.locator(".turn.user").nth(1).evaluate("e => getComputedStyle(e).direction") == "rtl"
        assert page.locator(".turn.user").nth(0).evaluate("e => getComputedStyle(e).direction") == "ltr"
        # the page sent its history
        assert [turn["role"] for turn in session.history] == ["user", "assistant"] * 2
        screenshot(page, "chat-web.png", tmp_path)
        page.click("#reset")
        assert page.locator(".turn").count() == 0
        page.fill("#input", "Hello")
        page.keyboard.press("Enter")
        expect(page.locator(".turn.assistant.done")).to_have_count(1, timeout=60_000)
        assert [turn["role"] for turn in session.history] == ["user", "assistant"]  # a fresh conversation
    finally:
        page.close()


def test_chat_page_reports_a_stopped_server(browser, tiny_model_dir):
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", max_new_tokens=4)
    server = session.launch(port=free_port())
    page = browser.new_page()
    try:
        page.goto(server.url)
        expect(page.locator("#notice")).to_contain_text("not medical advice")
        server.close()
        page.fill("#input", "Hello")
        page.keyboard.press("Enter")
        expect(page.locator("#message")).to_have_text("cannot reach the chat server (was it stopped?)")
        assert page.locator("#input").input_value() == "Hello"  # the message is kept for a retry
    finally:
        page.close()


def test_chat_web_bad_model_path_and_busy_port(tmp_path, capsys):
    assert main(["chat", "--web", "--model", str(tmp_path / "missing-model")]) == 2
    assert f"--model {tmp_path / 'missing-model'}: no such model folder" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "bimedix", "chat", "--web", "--model", str(tmp_path),
                                 "--port", str(port)], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def _post_chat(server, payload: dict, *, host: str | None = None, timeout: float = 120) -> tuple[int, list]:
    """POST ``payload`` to ``/api/chat``; the status and the JSON lines (or the one JSON error body)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        connection.request("POST", "/api/chat", body=json.dumps(payload).encode(),
                           headers={"Content-Type": "application/json", **({"Host": host} if host else {})})
        response = connection.getresponse()
        return response.status, [json.loads(line) for line in response.read().splitlines() if line.strip()]
    finally:
        connection.close()


def test_a_client_that_goes_away_stops_its_reply_and_frees_the_model(tiny_model_dir):
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", max_new_tokens=400)
    stream, ends = session.stream, []

    def watched_stream(text):  # records how each reply ended: ran to its end, or was stopped
        finished = False
        try:
            yield from stream(text)
            finished = True
        finally:
            ends.append("finished" if finished else "stopped")

    session.stream = watched_stream
    server = session.launch(port=free_port())
    request = (b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s")
    body = json.dumps({"message": "What are the symptoms of anaemia?", "history": []}).encode()
    collecting = gc.isenabled()
    gc.disable()  # the model must be freed by the app itself, not whenever the garbage collector runs
    clients = []
    try:
        for attempt in range(9):
            client = socket.create_connection((server.host, server.port), timeout=120)
            clients.append(client)
            client.sendall(request % (len(body), body))
            received = b""  # the headers, then about 400 bytes of the reply
            while len(received.partition(b"\r\n\r\n")[2]) < 400 and (chunk := client.recv(100)):
                received += chunk
            assert b'"piece"' in received  # the reply had started
            if attempt < 8:
                client.close()  # the client leaves mid-reply
        for _ in range(50):  # while the ninth reply runs, 50 more wait for the model: the page still loads
            clients.append(socket.create_connection((server.host, server.port), timeout=120))
            clients[-1].sendall(request % (len(body), body))
        with urllib.request.urlopen(server.url, timeout=120) as response:
            assert b"BiMediX chat" in response.read()
        for client in clients:
            client.close()
        session.max_new_tokens = 4
        status, lines = _post_chat(server, {"message": "Hello", "history": []})  # hangs if the lock leaked
        assert status == 200 and lines[-1] == {"done": True}
        # every reply whose client left was stopped (a waiter may have started before its leaving was seen)
        assert ends[-1] == "finished" and len(ends) >= 10 and set(ends[:-1]) == {"stopped"}
    finally:
        for client in clients:
            client.close()
        if collecting:
            gc.enable()
        server.close()


def test_chat_page_guards(chat_server):
    session, server = chat_server
    history = [{"role": role, "content": "hi"} for _ in range(201) for role in ("user", "assistant")]
    status, [body] = _post_chat(server, {"message": "Hello", "history": history})
    assert status == 422 and "too long (402 turns, at most 400)" in body["error"]
    status, [body] = _post_chat(server, {"message": "x" * 2_000_000, "history": []})
    assert status == 413 and "over 1,000,000 bytes" in body["error"]
    status, [body] = _post_chat(server, {"message": "Hello", "history": []},
                                host=f"evil.example.com:{server.port}")  # DNS rebinding
    assert status == 400 and "'evil.example.com'" in body["error"]
    status, [body] = _post_chat(server, {"history": []})
    assert status == 422 and body == {"error": "message: Field required"}
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
        with urllib.request.urlopen(urllib.request.Request(server.url + "api/info", headers={"Host": host})) \
                as response:
            assert response.headers["X-Frame-Options"] == "DENY" and json.loads(response.read())["notice"]


def test_chat_page_token(tiny_model_dir, capsys, monkeypatch):
    from bimedix.web.server import WebServer

    monkeypatch.setattr(WebServer, "run", lambda self: pytest.fail("served on 0.0.0.0 without a token"))
    assert main(["chat", "--web", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0 lets other machines reach the chat page; give a shared secret with --token" \
        in capsys.readouterr().err
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", max_new_tokens=2)
    server = session.launch(port=free_port(), token="كلمة سر")
    try:
        status, [body] = _post_chat(server, {"message": "Hello", "history": []})
        assert status == 401 and "/?token=" in body["error"]
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        assert b"BiMediX chat" in opener.open(server.url + "?token=" + urllib.parse.quote("كلمة سر")).read()
        reply = opener.open(urllib.request.Request(server.url + "api/chat", method="POST",
                                                   data=json.dumps({"message": "Hello"}).encode(),
                                                   headers={"Content-Type": "application/json"})).read()
        assert json.loads(reply.splitlines()[-1]) == {"done": True}
    finally:
        server.close()


def test_fitting_a_long_history_renders_few_prompts(tiny_model_dir):
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", max_new_tokens=16,
                                          context_length=400)
    exchanges = [[{"role": "user", "content": f"question {i} about anaemia"},
                  {"role": "assistant", "content": f"answer {i}: iron, rest and a blood test"}]
                 for i in range(800)]
    session.history = [turn for exchange in exchanges for turn in exchange]
    prompt, renders = session.prompt, []
    session.prompt = lambda text: renders.append(text) or prompt(text)
    fitted = session.fit_history("What now?")
    assert 0 < len(session.history) < 1600 and session.trimmed_turns == 800 - len(session.history) // 2
    assert len(renders) <= 13  # bisection over 800 exchanges, not one render per dropped exchange
    assert fitted == prompt("What now?")

    def fits(text: str) -> bool:
        return len(session.tokenizer(text, add_special_tokens=False)["input_ids"]) + 16 <= 400

    session.history = [turn for exchange in exchanges[session.trimmed_turns - 1:] for turn in exchange]
    assert fits(fitted) and not fits(prompt("What now?"))  # one more exchange would not fit
