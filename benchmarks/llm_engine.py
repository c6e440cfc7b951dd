"""Throughput of the LLM client and the cached re-run rate of the translation engine, against the fake server.

1. Concurrency: the fake OpenAI server (a separate process) answers every chat completion after a fixed
   latency; the client sends N distinct requests with concurrency C. Ideal throughput is C / latency;
   the script prints achieved requests/s and the ratio (target >= 0.9).
2. Cached re-run: translate M records once (filling the request cache), delete the output, translate
   again; every request is a cache hit. Prints records/s (target >= 20,000) and confirms no request was sent.

    python benchmarks/llm_engine.py --latency 0.2 --concurrency 32 --requests 512 --records 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from bimedix.core.io import write_jsonl
from bimedix.data.schema import make_record
from bimedix.llm.cache import RequestCache
from bimedix.llm.client import ClientConfig, LLMClient
from bimedix.llm.fake_server import fake_server_process
from bimedix.llm.translation import TranslationConfig, translate_file

PRICES = {"bench": {"input": 1.0, "output": 2.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=512, help="requests for the concurrency test")
    parser.add_argument("--records", type=int, default=2000, help="records for the cached re-run test")
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with fake_server_process(args.latency) as base_url:
            seconds, cpu = asyncio.run(_concurrency(base_url, tmp / "concurrency.sqlite", args.concurrency,
                                                    args.requests))
        achieved, ideal = args.requests / seconds, args.concurrency / args.latency
        print(f"concurrency: {args.requests} requests, C={args.concurrency}, latency "
              f"{args.latency * 1000:.0f} ms: {seconds:.2f} s, {achieved:.1f} req/s, ideal {ideal:.1f} "
              f"req/s, ratio {achieved / ideal:.3f} (client CPU {cpu * 1000:.2f} ms/request)")

        records = [_record(i) for i in range(args.records)]
        write_jsonl(tmp / "en.jsonl", records)
        with fake_server_process(0.0) as base_url:
            fill = asyncio.run(_translate(base_url, tmp, args.concurrency))
            (tmp / "ar.jsonl").unlink()
            (tmp / "ar.rejects.jsonl").unlink()
            start = time.perf_counter()
            rerun = asyncio.run(_translate(base_url, tmp, args.concurrency))
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            resumed = asyncio.run(_translate(base_url, tmp, args.concurrency))
            resume_seconds = time.perf_counter() - start
        print(f"first run: {args.records} records, {fill.sent} requests sent, {fill.accepted} accepted, "
              f"{fill.rejected} rejected")
        print(f"cached re-run (output deleted): {rerun.accepted + rerun.rejected} records in {seconds:.3f} s "
              f"= {args.records / seconds:,.0f} records/s, requests sent {rerun.sent}")
        print(f"resume of a finished run: {resumed.skipped} records skipped in {resume_seconds:.3f} s = "
              f"{args.records / resume_seconds:,.0f} records/s, requests sent {resumed.sent}")


async def _concurrency(base_url: str, cache_path: Path, concurrency: int,
                       requests: int) -> tuple[float, float]:
    client = LLMClient(ClientConfig(base_url=base_url, model="bench", concurrency=concurrency, prices=PRICES),
                       RequestCache(cache_path))
    try:
        # warm-up: open the C connections of the pool (and import what the first request imports)
        await asyncio.gather(*(client.complete([{"role": "user", "content": f"warm-up {i}"}], max_tokens=8)
                               for i in range(concurrency)))
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client.complete([{"role": "user", "content": f"request {i}"}], max_tokens=8)
                               for i in range(requests)))
        return time.perf_counter() - start, (time.process_time() - cpu) / requests
    finally:
        await client.aclose()


async def _translate(base_url: str, tmp: Path, concurrency: int):
    client = LLMClient(ClientConfig(base_url=base_url, model="bench", concurrency=concurrency, prices=PRICES),
                       RequestCache(tmp / "ar.llm.sqlite"))
    try:
        return await translate_file(tmp / "en.jsonl", tmp / "ar.jsonl", client, TranslationConfig())
    finally:
        await client.aclose()


def _record(index: int) -> dict:
    options = [f"Metformin {500 + index} mg", "Insulin glargine", "Lifestyle advice", "Start aspirin"]
    human = (f"Question: A {20 + index % 60}-year-old has a "
             f"fasting glucose of {7 + index % 30 / 10:.1f} mmol/L. "
             "What is the next step?\n\nOptions:\n" + "\n".join(f"{k}. {t}" for k, t in zip("ABCD", options)))
    turns = [{"from": "human", "value": human}, {"from": "gpt", "value": "B. Insulin glargine"}]
    return make_record(id=f"bench-en-{index:06d}", source="bench", task="mcqa", language="en", license="MIT",
                       conversations=turns, options=options, answer="B")


if __name__ == "__main__":
    main()
