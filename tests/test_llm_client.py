"""LLMClient against a real local OpenAI-compatible server through the real openai SDK: faults, cache,
ledger."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from llm_support import (
    MODEL,
    PRICES,
    make_client,
    run_closing,
)

from bimedix.llm.cache import RequestCache
from bimedix.llm.client import BudgetExceeded, ClientConfig, Deferred, LLMClient, LLMError, load_prices
from bimedix.llm.fake_server import FakeOpenAIServer, Fault, fake_server_process

MESSAGES = [{"role": "user", "content": "Say hello."}]


def _complete(client, messages=MESSAGES, **kwargs):
    max_tokens = kwargs.pop("max_tokens", 32)
    return run_closing(client, lambda c: c.complete(messages, max_tokens=max_tokens, **kwargs))


@pytest.mark.parametrize("faults", [
    [Fault("status", 500)],
    [Fault("status", 503), Fault("status", 502)],
    [Fault("status", 429, {"retry-after-ms": "50"})],
    [Fault("delay", delay=6.0)],  # past the 3 s timeout
    [Fault("reset")],
    [Fault("malformed")],
    [Fault("truncated")],
    [Fault("reset"), Fault("malformed"), Fault("status", 500)],
], ids=["500", "503-502", "429", "timeout", "reset", "malformed", "truncated", "mixed"])
def test_transient_faults_are_retried_then_succeed(server, api_key, tmp_path, faults):
    server.inject(*faults)
    client = make_client(server.base_url, tmp_path / "c.sqlite", timeout=3.0)
    completion = _complete(client)
    assert completion.text == "echo: Say hello." and completion.finish_reason == "stop"
    assert not completion.cached
    assert server.count() == len(faults) + 1
    assert client.retried == len(faults)
    assert client.cache.get(completion.key) is not None


def test_retry_after_header_is_honoured(server, api_key, tmp_path):
    server.inject(Fault("status", 429, {"Retry-After": "1"}))
    client = make_client(server.base_url, tmp_path / "c.sqlite", backoff_base=0.001)
    start = time.monotonic()
    _complete(client)
    assert time.monotonic() - start >= 1.0
    assert server.count() == 2


def test_retries_stop_after_max_retries(server, api_key, tmp_path):
    server.inject(*[Fault("status", 503)] * 5)
    client = make_client(server.base_url, tmp_path / "c.sqlite", max_retries=2)
    with pytest.raises(LLMError, match="gave up after 3 attempts.*HTTP 503") as info:
        _complete(client)
    assert info.value.transient and info.value.status == 503
    assert server.count() == 3
    assert client.cache.total_cost() == 0


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_fail_fast(server, api_key, tmp_path, status):
    server.inject(Fault("status", status))
    client = make_client(server.base_url, tmp_path / "c.sqlite")
    with pytest.raises(LLMError, match=f"HTTP {status}.*not retried") as info:
        _complete(client)
    assert not info.value.transient
    assert server.count() == 1


def test_length_finish_is_returned_and_cached_not_retried(server, api_key, tmp_path):
    server.inject(Fault("length"))
    client = make_client(server.base_url, tmp_path / "c.sqlite")
    completion = _complete(client)
    assert completion.finish_reason == "length"
    assert server.count() == 1
    again = _complete(make_client(server.base_url, tmp_path / "c.sqlite"))
    assert again.cached and again.finish_reason == "length" and server.count() == 1


def test_cache_hit_sends_nothing_and_ledger_matches_served_usage(server, api_key, tmp_path):
    first = _complete(make_client(server.base_url, tmp_path / "c.sqlite"), seed=3, temperature=0.0)
    second = _complete(make_client(server.base_url, tmp_path / "c.sqlite"), seed=3, temperature=0.0)
    assert second.cached and second.text == first.text and second.cost_usd == first.cost_usd
    assert server.count() == 1
    # the cache key is the hash of the exact body the server received
    assert server.log[0].body_hash == first.key
    other = _complete(make_client(server.base_url, tmp_path / "c.sqlite"), seed=4, temperature=0.0)
    assert not other.cached and server.count() == 2
    prompt, completion = server.served_usage()
    cache = RequestCache(tmp_path / "c.sqlite")
    assert cache.usage() == (prompt, completion)
    price = PRICES[MODEL]
    assert cache.total_cost() == pytest.approx((prompt * price["input"] + completion * price["output"]) / 1e6)


def test_budget_stops_before_sending(server, api_key, tmp_path):
    client = make_client(server.base_url, tmp_path / "c.sqlite", budget_usd=0.001)
    with pytest.raises(BudgetExceeded, match="budget of \\$0.0010"):
        _complete(client, max_tokens=1000)  # worst case 1000 output tokens * $2/1M = $0.002 > $0.001
    assert server.count() == 0
    assert _complete(make_client(server.base_url, tmp_path / "c.sqlite", budget_usd=0.001),
                     max_tokens=100).text


def test_budget_needs_a_price(server, api_key, tmp_path):
    with pytest.raises(ValueError, match="no price for model 'unknown-model'.*--prices"):
        LLMClient(ClientConfig(base_url=server.base_url, model="unknown-model", budget_usd=1.0),
                  RequestCache(tmp_path / "c.sqlite"))


def test_missing_key_is_a_clear_error(server, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable MY_KEY is not set"):
        make_client(server.base_url, tmp_path / "c.sqlite", api_key_env="MY_KEY")


def test_api_key_never_written_or_logged(server, api_key, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server.inject(Fault("status", 500), Fault("status", 401))
    client = make_client(server.base_url, tmp_path / "c.sqlite")
    with pytest.raises(LLMError) as info:
        _complete(client)
    _complete(make_client(server.base_url, tmp_path / "c.sqlite"), seed=1)
    assert api_key not in str(info.value) and api_key not in caplog.text
    for path in tmp_path.iterdir():
        assert api_key.encode() not in path.read_bytes(), path


def test_concurrency_is_bounded(api_key, tmp_path):
    with FakeOpenAIServer(latency=0.2) as slow:
        client = make_client(slow.base_url, tmp_path / "c.sqlite", concurrency=2)
        prompts = [[{"role": "user", "content": str(i)}] for i in range(4)]
        start = time.monotonic()
        results = run_closing(client, lambda c: asyncio.gather(*(c.complete(p, max_tokens=8)
                                                                 for p in prompts)))
        assert len(results) == 4 and time.monotonic() - start >= 0.4  # two waves of two
        assert slow.count() == 4


def test_batch_mode_parks_then_collects_at_half_price(api_key, tmp_path):
    with FakeOpenAIServer(batch_polls=2) as batch_server:
        client = make_client(batch_server.base_url, tmp_path / "c.sqlite", batch=True,
                             batch_poll_interval=0.01)

        async def go():
            try:
                with pytest.raises(Deferred):
                    await client.complete(MESSAGES, max_tokens=16)
                recorded = await client.flush_batch()
                return recorded, await client.complete(MESSAGES, max_tokens=16)
            finally:
                await client.aclose()

        recorded, completion = asyncio.run(go())
        assert recorded == 1 and completion.cached and completion.text == "echo: Say hello."
        assert batch_server.count() == 0 and batch_server.count("batch") == 1
        assert batch_server.count("/v1/files") == 1 and batch_server.count("/v1/batches") == 1
        prompt, output = batch_server.served_usage()
        assert client.cache.total_cost() == pytest.approx((prompt * 1.0 + output * 2.0) / 1e6 / 2)
        assert client.cache.unsubmitted() == [] and client.cache.open_batches() == []


def test_price_table_override(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"my-model": {"input": 3, "output": 4}}')
    prices = load_prices(path)
    assert prices["my-model"] == {"input": 3, "output": 4} and "gpt-4o-mini" in prices
    path.write_text('{"my-model": {"input": 3}}')
    with pytest.raises(ValueError, match="price of 'my-model' must be"):
        load_prices(path)


def test_rate_limiter_spaces_requests_and_tokens(monkeypatch):
    from bimedix.llm.client import _RateLimiter

    waits = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds):
        waits.append(seconds)
        await real_sleep(seconds)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)

    def timed(limiter, tokens):
        """(seconds taken, waits the limiter asked for) to acquire ``tokens`` one request after another."""
        async def go():
            start = time.monotonic()
            for amount in tokens:
                await limiter.acquire(amount)
            return time.monotonic() - start
        waits.clear()
        return asyncio.run(go()), list(waits)

    assert timed(_RateLimiter(None, None), [10] * 50)[1] == []  # no limits: never waits
    assert timed(_RateLimiter(2, None, window=0.2), [1, 1])[1] == []  # within the request limit
    seconds, asked = timed(_RateLimiter(2, None, window=0.2), [1, 1, 1])  # the third waits for the window
    assert seconds >= 0.2 and asked and all(0 < wait <= 0.201 for wait in asked)
    seconds, asked = timed(_RateLimiter(None, 100, window=0.2), [60, 60])  # over the token limit
    assert seconds >= 0.2 and asked


def test_batch_killed_while_waiting_is_polled_not_resubmitted(api_key, tmp_path):
    with FakeOpenAIServer(batch_polls=10_000) as batch_server:
        client = make_client(batch_server.base_url, tmp_path / "c.sqlite", batch=True,
                             batch_poll_interval=0.01)

        async def interrupted():
            try:
                with pytest.raises(Deferred):
                    await client.complete(MESSAGES, max_tokens=16)
                with pytest.raises(TimeoutError):  # the run dies while the batch is in progress
                    await asyncio.wait_for(client.flush_batch(), 0.3)
            finally:
                await client.aclose()

        asyncio.run(interrupted())
        assert len(client.cache.open_batches()) == 1 and batch_server.count("/v1/batches") == 1
        for batch in batch_server._batches.values():
            batch["_polls"] = 0  # the provider finishes the job
        resumed = make_client(batch_server.base_url, tmp_path / "c.sqlite", batch=True,
                              batch_poll_interval=0.01)

        async def resume():
            try:
                recorded = await resumed.flush_batch()
                return recorded, await resumed.complete(MESSAGES, max_tokens=16)
            finally:
                await resumed.aclose()

        recorded, completion = asyncio.run(resume())
        assert recorded == 1 and completion.cached
        assert batch_server.count("/v1/batches") == 1 and batch_server.count("/v1/files") == 1


def test_max_completion_tokens_field(server, api_key, tmp_path):
    seen = []
    server.responder = lambda body: seen.append(sorted(body)) or "ok"
    _complete(make_client(server.base_url, tmp_path / "c.sqlite", max_tokens_field="max_completion_tokens"))
    assert seen == [["max_completion_tokens", "messages", "model"]]


def test_deadline_bounds_an_attempt_whose_body_drips(server, api_key, tmp_path):
    server.inject(Fault("drip", delay=0.5), Fault("drip", delay=0.5))  # each byte inside any read timeout
    client = make_client(server.base_url, tmp_path / "c.sqlite", timeout=1.0, max_retries=1)
    start = time.monotonic()
    with pytest.raises(LLMError,
                       match=r"gave up after 2 attempts; last error: no complete response within 1 s") \
            as caught:
        _complete(client)
    assert time.monotonic() - start < 4.0
    assert caught.value.transient and caught.value.status is None
    assert server.count() == 2 and client.retried == 1
    assert client.cache.keys() == set()


def test_translate_cli_with_a_dripping_server_stops_at_the_deadline(api_key, tmp_path, capsys):
    from llm_support import mcqa_record, write_jsonl

    from bimedix.cli import main

    write_jsonl(tmp_path / "en.jsonl", [mcqa_record(0)])
    with FakeOpenAIServer() as server:
        server.inject(Fault("drip", delay=1.0))  # headers, then 1 byte/s
        start = time.monotonic()
        code = main(["translate", "--input", str(tmp_path / "en.jsonl"), "--output",
                     str(tmp_path / "ar.jsonl"),
                     "--base-url", server.base_url, "--model", MODEL, "--timeout", "3", "--max-retries", "0"])
        elapsed = time.monotonic() - start
        assert server.count() == 1
    out = capsys.readouterr().out
    assert elapsed < 10.0, f"translate ran {elapsed:.1f} s against a 3 s deadline"
    assert code == 3  # incomplete: the record waits for a re-run
    assert "left for the next run: demo-en-000" in out and "no complete response within 3 s" in out
    assert not (tmp_path / "ar.jsonl").read_text() and not (tmp_path / "ar.rejects.jsonl").read_text()


def test_cache_that_is_not_sqlite_is_a_clear_error_and_stays_untouched(server, api_key, tmp_path, capsys):
    from llm_support import mcqa_record, write_jsonl

    from bimedix.cli import main

    write_jsonl(tmp_path / "en.jsonl", [mcqa_record(0)])
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not a database\n" * 50)
    before = notes.read_bytes()
    code = main(["translate", "--input", str(tmp_path / "en.jsonl"), "--output", str(tmp_path / "ar.jsonl"),
                 "--base-url", server.base_url, "--model", MODEL, "--cache", str(notes)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{notes}: file is not a database; it is not a bimedix request cache" in err and "--cache" in err
    assert notes.read_bytes() == before and server.count() == 0


def test_full_disk_on_the_cache_is_a_clear_error(api_key, tmp_path, monkeypatch, capsys):
    """ENOSPC simulated by capping the database's pages: recording a long answer fails with SQLITE_FULL."""
    from llm_support import mcqa_record, write_jsonl

    from bimedix.cli import main

    opened = RequestCache.__init__

    def capped(self, path):
        opened(self, path)
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        self._db.execute(f"PRAGMA max_page_count = {pages}")

    monkeypatch.setattr(RequestCache, "__init__", capped)
    write_jsonl(tmp_path / "en.jsonl", [mcqa_record(0)])
    with FakeOpenAIServer(lambda body: "x" * 20_000) as server:  # more than the free space of any page
        code = main(["translate", "--input", str(tmp_path / "en.jsonl"), "--output",
                     str(tmp_path / "ar.jsonl"),
                     "--base-url", server.base_url, "--model", MODEL, "--max-retries", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'ar.llm.sqlite'}: database or disk is full; the disk is full: free some space" in err


def test_batch_management_calls_have_a_deadline_too(api_key, tmp_path):
    """A server that answers every request with headers, then one byte every 0.2 s (below any read
    timeout)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Drip(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    time.sleep(0.2)
                    self.wfile.write(b" ")
                    self.wfile.flush()
            except OSError:  # the client gave up
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        client = make_client(f"http://127.0.0.1:{httpd.server_address[1]}/v1", tmp_path / "c.sqlite",
                             batch=True,
                             timeout=0.5)

        async def go():
            with pytest.raises(Deferred):
                await client.complete(MESSAGES, max_tokens=16)
            await client.flush_batch()

        start = time.monotonic()
        with pytest.raises(LLMError, match=r"uploading the batch file took more than 3 s") as caught:
            run_closing(client, lambda c: go())
        assert time.monotonic() - start < 8.0 and caught.value.transient
        assert len(client.cache.unsubmitted()) == 1  # still parked for the next run
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fake_server_process_serves_on_a_free_port_until_the_block_ends(api_key, tmp_path):
    with fake_server_process() as base_url:
        completion = _complete(make_client(base_url, tmp_path / "c.sqlite"))
        assert completion.text == "echo: Say hello."
    with pytest.raises(LLMError):  # the process is gone with the block
        _complete(make_client(base_url, tmp_path / "other.sqlite", max_retries=0, timeout=3.0))
