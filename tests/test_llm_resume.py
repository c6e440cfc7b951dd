"""Crash safety: kill -9 the translate / generate-chats CLI at random points, resume, account for
everything."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
from llm_support import (
    MODEL,
    PRICES,
    SECRET,
    make_client,
    mcqa_record,
    read_jsonl,
    run_closing,
    write_jsonl,
)
from process_support import WatchedProcess

from bimedix.llm.cache import RequestCache
from bimedix.llm.dialogue import DialogueConfig, generate_chats_file
from bimedix.llm.fake_server import FakeOpenAIServer
from bimedix.llm.translation import TranslationConfig, translate_file

CONCURRENCY = 4
#: command, records, largest random step (requests) between kills, source id of an output record, in-process
# run
ENGINES = {
    "translate": (14, 14, lambda r: r["meta"]["translation"]["source_id"],
                  lambda i, o, c: translate_file(i, o, c, TranslationConfig())),
    "generate-chats": (24, 7, lambda r: r["meta"]["generation"]["source_id"],
                       lambda i, o, c: generate_chats_file(i, o, c, DialogueConfig())),
}


def _command(engine: str, base_url: str, tmp_path) -> list[str]:
    return [sys.executable, "-m", "bimedix", engine, "--input", str(tmp_path / "en.jsonl"),
            "--output", str(tmp_path / "out" / "ar.jsonl"), "--base-url", base_url, "--model", MODEL,
            "--prices", str(tmp_path / "prices.json"), "--concurrency", str(CONCURRENCY), "--timeout", "10"]


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_kill9_at_random_points_then_resume(api_key, tmp_path, engine):
    records, step, source_id_of, run_in_process = ENGINES[engine]
    rng = random.Random(20240222)
    write_jsonl(tmp_path / "en.jsonl", [mcqa_record(i) for i in range(records)])
    (tmp_path / "prices.json").write_text(json.dumps(PRICES))
    cache_path = tmp_path / "out" / "ar.llm.sqlite"
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    snapshots, kills, stderr = [], 0, []
    with FakeOpenAIServer(latency=0.02) as server:
        command = _command(engine, server.base_url, tmp_path)
        for _ in range(3):
            target = server.count() + rng.randint(2, step)
            with WatchedProcess(command, env=env) as run:
                # it may finish all its work first: then there is nothing to kill
                if run.wait_until(lambda: server.count() >= target, f"{target} requests", poll=0.005,
                                  exit_ok=True):
                    run.send_signal(signal.SIGKILL)
                    kills += 1
                result = run.finish()
            stderr.append((result.stdout + result.stderr).encode())
            # The server logs a request before it answers, so everything the cache holds is in the log by
            # now; requests still in flight land later and were not recorded (nothing to wait for).
            snapshots.append((server.count(), RequestCache(cache_path).keys()))
        final = subprocess.run(command, env=env, capture_output=True, timeout=120)
        stderr.append(final.stdout + final.stderr)
        assert final.returncode == 0, final.stderr.decode()[-2000:]
        log = list(server.log)
    assert kills >= 2

    # 0 lost, 0 duplicated
    written = read_jsonl(tmp_path / "out" / "ar.jsonl")
    rejected = read_jsonl(tmp_path / "out" / "ar.rejects.jsonl")
    sources = [source_id_of(r) for r in written] + [r["source_id"] for r in rejected]
    assert sorted(sources) == [f"demo-en-{i:03d}" for i in range(records)]

    # 0 requests repeated for finished work: nothing recorded before a kill is requested after it
    for count_at_kill, recorded in snapshots:
        repeated = [item for item in log[count_at_kill:] if item.body_hash in recorded]
        assert repeated == []

    # only requests in flight at a kill may have been served twice
    served = [item for item in log if item.outcome in ("ok", "length")]
    assert len(served) - len({item.body_hash for item in served}) <= kills * CONCURRENCY

    # the ledger is the served usage of every recorded request, priced
    cache = RequestCache(cache_path)
    keys = cache.keys()
    usage = {item.body_hash: (item.prompt_tokens, item.completion_tokens) for item in served}
    assert keys <= set(usage)
    assert cache.usage() == tuple(map(sum, zip(*(usage[key] for key in keys))))
    prompt, completion = cache.usage()
    assert abs(cache.total_cost() - (prompt * 1.0 + completion * 2.0) / 1e6) < 1e-9

    # the same result as an uninterrupted run, and the key is nowhere
    with FakeOpenAIServer() as clean_server:
        client = make_client(clean_server.base_url, tmp_path / "clean" / "ar.llm.sqlite",
                             concurrency=CONCURRENCY)
        run_closing(client, lambda c: run_in_process(tmp_path / "en.jsonl", tmp_path / "clean" / "ar.jsonl",
                                                     c))
    clean = read_jsonl(tmp_path / "clean" / "ar.jsonl")
    assert sorted(map(json.dumps, clean)) == sorted(map(json.dumps, written))
    assert all(SECRET.encode() not in blob for blob in stderr)
    for path in (tmp_path / "out").iterdir():
        assert SECRET.encode() not in path.read_bytes(), path


def test_half_written_last_line_is_dropped_and_redone_from_cache(server, api_key, tmp_path):
    write_jsonl(tmp_path / "en.jsonl", [mcqa_record(i) for i in range(3)])

    def run():
        client = make_client(server.base_url, tmp_path / "ar.llm.sqlite")
        return run_closing(client, lambda c: translate_file(tmp_path / "en.jsonl", tmp_path / "ar.jsonl", c,
                                                            TranslationConfig()))

    run()
    sent = server.count()
    lines = (tmp_path / "ar.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "ar.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2], encoding="utf-8")
    summary = run()
    assert summary.skipped == 1 and summary.accepted == 2 and summary.sent == 0 and server.count() == sent
    assert sorted(read_jsonl(tmp_path / "ar.jsonl"), key=json.dumps) == sorted(
        [json.loads(line) for line in lines], key=json.dumps)
