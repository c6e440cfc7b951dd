"""`bimedix review serve` in a real browser: review a fake-server translation with clicks and keys, kill and
restart the server mid-way, overrule as a second reviewer, and get what `review import` gives for the same
decisions; a decision on a page another reviewer has decided since is refused and the page offers a reload."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from browser_support import free_port, get_json, screenshot
from llm_support import mcqa_record, read_jsonl, write_jsonl

from bimedix.llm.fake_server import FakeOpenAIServer
from bimedix.llm.review import export_review_queue, import_reviews, read_audit

expect = pytest.importorskip("playwright.sync_api",
                             reason="Playwright is not installed (pip install playwright)").expect

RECORDS = 6


@pytest.fixture
def translated(tmp_path) -> tuple[Path, Path]:
    """Six MCQA records translated by `bimedix translate` through the fake OpenAI server; the English file
    shown in the app lacks the last original."""
    english = write_jsonl(tmp_path / "en.jsonl", [mcqa_record(i) for i in range(RECORDS)])
    with FakeOpenAIServer() as server:
        subprocess.run([sys.executable, "-m", "bimedix", "translate", "--input", str(english), "--output",
                        str(tmp_path / "ar.jsonl"), "--base-url", server.base_url, "--model", "fake"],
                       check=True, capture_output=True, env={**os.environ, "OPENAI_API_KEY": "unused"})
    shown = write_jsonl(tmp_path / "en-shown.jsonl", [mcqa_record(i) for i in range(RECORDS - 1)])
    return tmp_path / "ar.jsonl", shown


def _serve(translated: Path, source: Path, port: int, out: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "bimedix", "review", "serve", "--input", str(translated), "--source",
         str(source),
         "--output", str(out), "--fraction", "1.0", "--reviewer", "Dr. Amal", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ,
                                                                          "PYTHONUNBUFFERED": "1"})
    get_json(f"http://127.0.0.1:{port}/api/state", process=process)
    return process


def _wait_done(page, count: int) -> None:
    """Wait until the page has saved a decision, shows ``count`` done and has loaded the next item."""
    page.wait_for_function(f"() => !document.body.dataset.busy && "
                           f"document.querySelector('#counts').textContent.startsWith('{count} done')")


def _counts(page) -> str:
    return page.locator("#counts").inner_text()


def test_review_in_the_browser_equals_review_import(browser, translated, tmp_path):
    ar, source = translated
    out, port = tmp_path / "ar.reviewed.jsonl", free_port()
    server = _serve(ar, source, port, out)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#texts textarea")
        # the last record's source is missing
        assert "no English original" in page.locator("#warnings").inner_text()
        assert page.locator("#texts textarea").first.get_attribute("dir") == "rtl"
        assert page.locator("#texts textarea").first.evaluate("e => getComputedStyle(e).direction") == "rtl"
        assert "Option A / أ" in page.locator("#texts").inner_text()
        first = page.locator("#meta").inner_text()
        assert "LLM judge score" in first and "Judge:" in first

        page.click("#approve")  # 1: approve with a click
        _wait_done(page, 1)
        page.keyboard.press("e")  # 2: edit an Arabic option with the keyboard, save with Ctrl+Enter
        option = page.locator("tr[data-field='options.1'] textarea")
        option.fill(option.input_value() + " (مصحح)")
        assert page.locator("tr[data-field='options.1'] .diff ins").inner_text().strip() == "(مصحح)"
        page.keyboard.press("Control+Enter")
        _wait_done(page, 2)
        page.keyboard.press("r")  # 3: reject with a reason
        page.keyboard.type("الترجمة غير دقيقة")
        page.keyboard.press("Enter")
        _wait_done(page, 3)
        assert "approved 1 · edited 1 · rejected 1" in _counts(page)

        server.send_signal(signal.SIGKILL)  # a crash: nothing decided may be lost
        server.wait()
        server = _serve(ar, source, port, out)
        page.reload()
        page.wait_for_selector("#texts textarea")
        assert _counts(page).startswith("3 done / 3 left")
        page.keyboard.press("a")  # the remaining three, by keyboard
        _wait_done(page, 4)
        page.keyboard.press("a")
        _wait_done(page, 5)
        page.keyboard.press("a")
        _wait_done(page, 6)
        assert page.locator("#done").is_visible()

        page.fill("#reviewer", "Dr. Badr")  # a second reviewer overrules the first approval
        page.select_option("#filter-state", "approved")
        page.wait_for_function("() => document.querySelectorAll('#list div').length === 4")
        overruled = page.locator("#list div").first.get_attribute("data-id")
        page.locator("#list div").first.click()
        page.wait_for_function(f"() => document.querySelector('#list div.current').dataset.id === "
                               f"'{overruled}'")
        page.fill("#reason", "wrong drug name")
        page.click("#reject")
        page.wait_for_function("() => !document.body.dataset.busy && "
                               "document.querySelector('#counts').textContent.includes('rejected 2')")
        page.select_option("#filter-state", "")
        page.locator(f"#list div[data-id='{overruled}']").click()
        page.wait_for_function("() => document.querySelectorAll('#history-list li').length > 0")
        page.click("#history summary")
        history = page.locator("#history-list").inner_text()
        assert "Dr. Amal: approved" in history and "Dr. Badr: rejected — wrong drug name" in history
        page.locator("#list div", has_text="edited").click()
        expect(page.locator("#history-list")).to_contain_text("Dr. Amal: edited options.1")
        expect(page.locator("tr[data-field='options.1'] .diff ins")).to_have_text(" (مصحح)")
        page.click("#stats-panel summary")
        assert "ROC AUC" in page.locator("#stats").inner_text()
        screenshot(page, "review-app.png", tmp_path)
    finally:
        page.close()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)

    trail = read_audit(tmp_path / "ar.reviewed.audit.jsonl")
    assert {entry["reviewer"] for entry in trail if entry["id"] == overruled} == {"Dr. Amal", "Dr. Badr"}
    # the same final decisions through a spreadsheet and `review import`
    latest = {(entry["id"], entry["field"]): entry for entry in trail}
    queue = tmp_path / "queue.csv"
    export_review_queue(ar, queue, fraction=1.0)
    rows = list(csv.DictReader(queue.open(encoding="utf-8-sig")))
    for row in rows:
        decided = latest[(row["id"], row["field"])]
        row.update(decision=decided["decision"], arabic=decided["after"], comment=decided["comment"])
    with open(tmp_path / "reviewed.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = import_reviews(ar, tmp_path / "reviewed.csv", tmp_path / "imported.jsonl", reviewer="Dr. Amal")
    assert (summary.approved, summary.edited, summary.rejected) == (3, 1, 2)
    assert read_jsonl(out) == read_jsonl(tmp_path / "imported.jsonl")
    states = [record["meta"]["translation"]["review_state"] for record in read_jsonl(out)]
    assert sorted(states) == ["approved"] * 3 + ["edited"] + ["rejected"] * 2


def test_bad_requests_show_a_message_not_a_traceback(browser, translated, tmp_path):
    ar, source = translated
    port = free_port()
    server = _serve(ar, source, port, tmp_path / "out.jsonl")
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#texts textarea")
        page.click("#reject")  # no reason given
        expect(page.locator("#message")).to_have_text("a rejection needs a reason in the comment")
        page.locator("#texts textarea").first.fill("")
        page.click("#save")
        expect(page.locator("#message")).to_contain_text("conversations.0: is empty")
        shown = page.locator("#list div.current").get_attribute("data-id")  # another reviewer decides it now
        api = f"http://127.0.0.1:{port}/api/item/{quote(shown, safe='')}"
        version = page.request.get(api).json()["version"]
        other = page.request.post(api, data={"action": "reject", "version": version, "reviewer": "Dr. Badr",
                                             "comment": "meaning lost"})
        assert other.status == 200
        page.click("#approve")  # on the page loaded before that decision
        expect(page.locator("#message")).to_contain_text(f"'{shown}' changed after you opened it (Dr. Badr")
        page.click("#reload")
        expect(page.locator("#item-state")).to_have_text("rejected")
        expect(page.locator("#message")).to_be_hidden()
        response = page.request.get(f"http://127.0.0.1:{port}/api/item/..%2F..%2Fetc%2Fpasswd")
        assert response.status == 404 and "Traceback" not in response.text()
        assert page.request.get(f"http://127.0.0.1:{port}/static/review.html").status == 404
        server.send_signal(signal.SIGKILL)
        server.wait()
        page.click("#approve")
        expect(page.locator("#message")).to_contain_text("cannot reach the review server")
    finally:
        page.close()
        if server.poll() is None:
            server.kill()
            server.wait()
