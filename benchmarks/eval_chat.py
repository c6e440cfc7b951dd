"""Throughput of ``bimedix eval-chat`` on the fake OpenAI-compatible server, and the cost of a cached re-run.

The bundled 8 examples (30 criteria) are copied with distinct conversations until the file holds
``--criteria`` criteria (990 by default: 264 examples). The fake server (its own process) answers every
request after ``--latency`` seconds; the model under test and the judge are both served by it. The first
run sends one reply request per example and one judge request per criterion, phase after phase, so the
ideal wall time is ``(examples + criteria) / concurrency * latency``; the script prints the measured time,
judge calls per second and the ratio to ideal. The second run over the same output is served from the
request cache: it prints its time and the number of requests it sent (0 expected).

    python benchmarks/eval_chat.py --criteria 990 --concurrency 32 --latency 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bimedix.llm.cache import RequestCache
from bimedix.llm.fake_server import fake_server_process
from bimedix.resources import resource_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criteria", type=int, default=990,
                        help="criteria to grade (a multiple of 30 is exact)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    args = parser.parse_args()
    env = {**os.environ, "OPENAI_API_KEY": "benchmark"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        examples, criteria = _data(tmp / "data.jsonl", args.criteria)
        (tmp / "prices.json").write_text(json.dumps({"bench-judge": {"input": 2.0, "output": 8.0},
                                                      "bench-model": {"input": 0.0, "output": 0.0}}))
        with fake_server_process(args.latency) as base_url:
            command = [sys.executable, "-m", "bimedix", "eval-chat", "--data", str(tmp / "data.jsonl"),
                       "--output", str(tmp / "out"), "--model", "bench-model", "--base-url", base_url,
                       "--judge-base-url", base_url, "--judge-model", "bench-judge", "--prices",
                       str(tmp / "prices.json"), "--concurrency", str(args.concurrency)]
            first = _timed(command, env)
            cache = RequestCache(tmp / "out" / "eval-chat.llm.sqlite")
            recorded, ledger = len(cache.keys()), cache.total_cost()
            cache.close()
            with sqlite3.connect(tmp / "out" / "eval-chat.llm.sqlite") as db:
                calls, prompt, completion = db.execute(
                    "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM responses "
                    "WHERE model = 'bench-judge'").fetchone()
            second = _timed(command, env)
            cache = RequestCache(tmp / "out" / "eval-chat.llm.sqlite")
            sent_again = len(cache.keys()) - recorded
            cache.close()
    ideal = (examples + criteria) / args.concurrency * args.latency
    print(f"first run: {examples} examples, {criteria} criteria, concurrency {args.concurrency}, latency "
          f"{args.latency * 1000:.0f} ms: {first:.2f} s (ideal {ideal:.2f} s, "
          f"ratio {ideal / first:.3f}); {criteria / first:.1f} criteria/s end to end; "
          f"{recorded} requests recorded, "
          f"ledger ${ledger:.4f} at $2/$8 per 1M judge tokens")
    print("judge tokens per call (fake server: 1 token per 4 characters; echo replies of <= 206 characters): "
          f"{prompt / calls:.0f} prompt, {completion / calls:.0f} completion over {calls} calls")
    print(f"cached re-run over the same output: {second:.2f} s, new requests {sent_again}")


def _data(path: Path, wanted: int) -> tuple[int, int]:
    lines = resource_path("bimedix", "eval", "rubric_examples", "examples_en.jsonl").read_text(
        encoding="utf-8").splitlines()
    examples = criteria = copy = 0
    with open(path, "w", encoding="utf-8") as handle:
        while criteria < wanted:
            for line in lines:
                example = json.loads(line)
                example["prompt_id"] = f"{example['prompt_id']}-{copy}"
                example["prompt"][-1]["content"] += f" (case {copy})"
                handle.write(json.dumps(example, ensure_ascii=False) + "\n")
                examples, criteria = examples + 1, criteria + len(example["rubrics"])
                if criteria >= wanted:
                    break
            copy += 1
    return examples, criteria


def _timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"eval-chat failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
