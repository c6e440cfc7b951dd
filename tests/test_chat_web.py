"""`ChatSession.launch` / `bimedix chat --web` in a real browser on a tiny random Mixtral: English and Arabic
messages stream into the page, Arabic turns are laid out right to left, the notice is shown, reset clears."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

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
