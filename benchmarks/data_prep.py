"""Data preparation speed and memory (issue 3): prints measured figures, asserts nothing.

1. Encoding, on the same real records: records/s of
   - ``apply_chat_template(..., return_assistant_tokens_mask=True)`` with the Vicuna template (Jinja path),
   - `bimedix.data.encode.encode_conversations` (render + tokenize + assistant mask, the fast path),
   - the raw fast tokenizer ``encode_batch`` on the already rendered texts, ids read back (the ceiling),
   and the ratio fast / ceiling (target ≥ 0.8).
2. Peak RSS of ``bimedix build-data`` (a child process) on ``--records`` records made by repeating the
   bundled real records (each copy gets a new id and a "(copy k)" tag, so exact dedup does not collapse
   them; MinHash near-dedup then removes them), target ≤ 2 GB.
3. Peak RSS of the MinHash-LSH dedup index holding ``--index-records`` distinct records (the worst case:
   nothing is a duplicate, every record stays in the index).

Usage::

    python benchmarks/data_prep.py                       # 1.3M records (takes a while)
    python benchmarks/data_prep.py --records 100000 --index-records 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def real_records() -> list[dict]:
    """All records of the bundled real data (mini recipe sources, malformed upstream rows skipped)."""
    from bimedix.data.build import iter_source
    from bimedix.data.recipe import load_data_recipe
    from bimedix.data.rejects import RejectLog

    recipe = load_data_recipe("mini")
    return [record for spec in recipe.sources for record in iter_source(recipe, spec, on_error=RejectLog())]


def bench_encoding(records: list[dict], repeats: int) -> None:
    from bimedix.data.encode import encode_conversations, render_vicuna
    from bimedix.data.tokenizer import load_mixtral_tokenizer
    from bimedix.training.template import apply_vicuna_template, to_messages

    tokenizer = load_mixtral_tokenizer()
    apply_vicuna_template(tokenizer)
    sample = (records * repeats)
    texts = [render_vicuna(record)[0] for record in sample]

    def timed(func) -> float:
        start = time.perf_counter()
        func()
        return len(sample) / (time.perf_counter() - start)

    jinja = timed(lambda: [tokenizer.apply_chat_template(to_messages(r), tokenize=True, return_dict=True,
                                                         return_assistant_tokens_mask=True) for r in sample])
    fast = timed(lambda: encode_conversations(tokenizer, sample))
    ceiling = timed(lambda: [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)])
    tokens = sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    print(f"encoding {len(sample):,} real records ({tokens / len(sample):.0f} Mixtral tokens each on average), "
          f"{os.cpu_count()} CPUs:")
    print(f"  apply_chat_template + assistant mask : {jinja:10,.0f} records/s  (ratio {jinja / ceiling:.2f})")
    print(f"  bimedix encode_conversations          : {fast:10,.0f} records/s  (ratio {fast / ceiling:.2f}, target >= 0.8)")
    print(f"  raw encode_batch (ceiling)            : {ceiling:10,.0f} records/s")


def bench_build(records: list[dict], count: int, folder: Path) -> None:
    from bimedix.resources import resource_path

    source = folder / "input.jsonl"
    with open(source, "w", encoding="utf-8") as handle:
        for index in range(count):
            record = records[index % len(records)]
            copy = index // len(records)
            if copy:
                record = {**record, "id": f"{record['id']}-copy{copy}", "conversations": [
                    {"from": "human", "value": f"(copy {copy}) " + record["conversations"][0]["value"]},
                    *record["conversations"][1:]]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    bundled = resource_path("bimedix", "data", "bundled")
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"name: rss-benchmark\nsources_dir: {folder}\nshard_size: 100000\n"
        "sources:\n  - {name: repeated, converter: records, path: input.jsonl}\n"
        "decontaminate:\n  benchmarks:\n"
        f"    - {{name: medqa-test, reader: medqa, path: {bundled}/medqa/phrases_no_exclude_test.jsonl}}\n"
        f"    - {{name: medmcqa-dev, reader: medmcqa, path: {bundled}/medmcqa/dev.json}}\n")
    start = time.perf_counter()
    log = folder / "build.log"
    with open(log, "w") as handle:
        child = subprocess.Popen([sys.executable, "-m", "bimedix", "build-data", "--recipe", str(recipe), "--output",
                                  str(folder / "out"), "--no-progress"], stdout=handle, stderr=subprocess.STDOUT)
        peak = 0.0
        while child.poll() is None:  # VmHWM: the child's own peak (ru_maxrss would include the parent's at fork)
            peak = max(peak, _status_mb(child.pid, "VmHWM"))
            time.sleep(0.2)
    elapsed = time.perf_counter() - start
    output = log.read_text()
    if child.returncode:
        raise RuntimeError(f"build-data failed:\n{output[-3000:]}")
    total = [line for line in output.splitlines() if line.startswith("Total:")]
    print(f"build-data on {count:,} records (repeated real records): {elapsed:,.0f} s "
          f"({count / elapsed:,.0f} records/s), peak RSS {peak:,.0f} MB (target <= 2048 MB)")
    print(f"  {total[0] if total else output[-500:]}")


def bench_index(records: list[dict], count: int) -> None:
    code = (
        "import random, sys, json\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from data_prep import _status_mb\n"
        "from bimedix.data.dedup import Deduplicator\n"
        "words = json.loads(sys.stdin.read())\n"
        "rng = random.Random(0)\n"
        "before = _status_mb('self', 'VmRSS')\n"
        "dedup = Deduplicator()\n"
        f"for i in range({count}):\n"
        "    dedup.check({'id': f'record-{i}', 'conversations': [{'from': 'human', 'value': ' '.join(rng.choices(words, k=60))}]})\n"
        "print(before, _status_mb('self', 'VmHWM'), len(dedup._exact))\n"
    )
    words = sorted({w for r in records for t in r["conversations"] for w in t["value"].split()})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], input=json.dumps(words),
                          capture_output=True, text=True, check=True)
    before, after, kept = done.stdout.split()
    print(f"dedup index with {int(kept):,} distinct records kept: peak RSS {float(after):,.0f} MB, of which "
          f"{float(after) - float(before):,.0f} MB for the index ({time.perf_counter() - start:,.0f} s)")


def _status_mb(pid: int | str, field: str) -> float:
    """A memory field (``VmHWM`` peak, ``VmRSS`` current) of ``/proc/<pid>/status``, in MB (0 once gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:  # the process has exited
        return 0.0
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_300_000, help="records fed to build-data")
    parser.add_argument("--index-records", type=int, default=1_300_000, help="distinct records in the dedup index "
                                                                               "(0 to skip)")
    parser.add_argument("--encode-repeats", type=int, default=10, help="passes over the real records for encoding")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = real_records()
    random.Random(0).shuffle(records)
    bench_encoding(records, args.encode_repeats)
    with tempfile.TemporaryDirectory(prefix="bimedix-data-prep-") as folder:
        bench_build(records, args.records, Path(folder))
    if args.index_records:
        bench_index(records, args.index_records)


if __name__ == "__main__":
    main()
