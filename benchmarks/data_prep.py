"""Data preparation speed and memory (issue 3): prints measured figures, asserts nothing.

1. Encoding, on the same real records (``--encode-records``, at least 20K, by repeating them): records/s of
   - ``apply_chat_template(..., return_assistant_tokens_mask=True)`` with the Vicuna template (Jinja path,
     timed once: it is far slower),
   - `bimedix.data.encode.encode_conversations` (render + tokenize + assistant mask, the fast path),
   - the raw fast tokenizer ``encode_batch`` on the already rendered texts, ids read back (the ceiling; the
     Rust tokenizer uses every core),
   the fast path and the ceiling alternating ``--encode-runs`` times (at least 5), median and best of each,
   and the ratio fast / ceiling of the medians and of the bests (target ≥ 0.8).
2. Wall time and peak RSS of ``bimedix build-data`` (a child process) on ``--records`` records made by
   repeating the bundled real records (each copy gets a new id and a "(copy k)" tag, so exact dedup does not
   collapse them; MinHash near-dedup then removes them), once with ``--num-proc 1`` and once with every core,
   on the same input: the speed-up (target ≥ 1.7× on 2 cores) and peak RSS (target ≤ 2 GB), and whether
   both outputs are byte-identical.
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
import resource
import statistics
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


def bench_encoding(records: list[dict], count: int, runs: int) -> None:
    from bimedix.data.encode import encode_conversations, render_vicuna
    from bimedix.data.tokenizer import load_mixtral_tokenizer
    from bimedix.training.template import apply_vicuna_template, to_messages

    tokenizer = load_mixtral_tokenizer()
    apply_vicuna_template(tokenizer)
    sample = (records * (count // len(records) + 1))[:count]
    texts = [render_vicuna(record)[0] for record in sample]

    def timed(func, items) -> float:
        start = time.perf_counter()
        func(items)
        return len(items) / (time.perf_counter() - start)

    def fast_path(items):
        return encode_conversations(tokenizer, items)

    def ceiling_path(items):
        return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(items, add_special_tokens=False)]

    jinja_sample = sample[: min(len(sample), 2000)]
    jinja = timed(lambda items: [tokenizer.apply_chat_template(to_messages(r), tokenize=True,
                                                               return_dict=True,
                                                               return_assistant_tokens_mask=True)
                                 for r in items],
                  jinja_sample)
    fast, ceiling = [], []
    for _ in range(runs):  # alternating, so load changes hit both sides alike
        fast.append(timed(fast_path, sample))
        ceiling.append(timed(ceiling_path, texts))
    tokens = sum(len(ids) for ids in ceiling_path(texts))
    fast_median, ceiling_median = statistics.median(fast), statistics.median(ceiling)
    print(f"encoding {len(sample):,} real records ({tokens / len(sample):.0f} Mixtral tokens each on "
          f"average), {runs} alternating runs each, {os.cpu_count()} CPUs, load average {_load()}:")
    print(f"  apply_chat_template + assistant mask : {jinja:10,.0f} records/s  (one run over "
          f"{len(jinja_sample):,}; ratio {jinja / ceiling_median:.2f})")
    print("  bimedix encode_conversations          : median "
          f"{fast_median:10,.0f}  best {max(fast):10,.0f} records/s")
    print("  raw encode_batch (ceiling)            : median "
          f"{ceiling_median:10,.0f}  best {max(ceiling):10,.0f} records/s")
    print(f"  fast / ceiling: {fast_median / ceiling_median:.2f} "
          f"(medians), {max(fast) / max(ceiling):.2f} (bests); "
          "target >= 0.8")


def bench_build(records: list[dict], count: int, folder: Path) -> None:
    """build-data on the same input at ``--num-proc 1`` and with every core: wall time, peak RSS, identity."""
    from bimedix.data.parallel import default_num_proc
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
    cores = default_num_proc()
    runs = {num_proc: _run_build(recipe, folder / f"out-{num_proc}", num_proc) for num_proc in (1, cores)}
    (one_time, one_peak, one_cpu, total), (all_time, all_peak, all_cpu, _) = runs[1], runs[cores]
    identical = _same_files(folder / "out-1", folder / f"out-{cores}")
    print(f"build-data on {count:,} records (repeated real records), load average {_load()}:")
    print(f"  --num-proc 1 : {one_time:8,.1f} s ({count / one_time:8,.0f} records/s), CPU {one_cpu:8,.1f} s, "
          f"peak memory {one_peak:6,.0f} MB")
    print(f"  --num-proc {cores} : {all_time:8,.1f} s ({count / all_time:8,.0f} records/s), CPU "
          f"{all_cpu:8,.1f} s (with its workers), peak memory "
          f"{all_peak:6,.0f} MB (with its workers; target <= 2048 MB)")
    print(f"  speed-up {one_time / all_time:.2f}x on {cores} cores (target >= 1.7x on 2); outputs "
          f"byte-identical: {identical}")
    print(f"  {total}")


def _run_build(recipe: Path, output: Path, num_proc: int) -> tuple[float, float, str]:
    """Run build-data in a child process; return wall seconds, peak memory in MB, CPU seconds and the total
    line.

    The peak is the larger of the child's own peak RSS (VmHWM) and the highest sum, sampled every 0.2 s, of
    the proportional set sizes of the child and its worker processes (PSS splits pages the forked workers
    share with the parent, which a sum of RSS would count twice)."""
    start, cpu = time.perf_counter(), _children_cpu()
    log = output.with_suffix(".log")
    with open(log, "w") as handle:
        child = subprocess.Popen([sys.executable, "-m", "bimedix", "build-data", "--recipe", str(recipe),
                                  "--output",
                                  str(output), "--no-progress", "--num-proc", str(num_proc)],
                                 stdout=handle, stderr=subprocess.STDOUT)
        peak = 0.0
        while child.poll() is None:
            peak = max(peak, sum(_pss_mb(pid) for pid in [child.pid, *_children(child.pid)]),
                       _status_mb(child.pid, "VmHWM"))
            time.sleep(0.2)
    elapsed, cpu = time.perf_counter() - start, _children_cpu() - cpu
    output_text = log.read_text()
    if child.returncode:
        raise RuntimeError(f"build-data failed:\n{output_text[-3000:]}")
    total = [line for line in output_text.splitlines() if line.startswith("Total:")]
    return elapsed, peak, cpu, total[0] if total else output_text[-500:]


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (and the workers they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pss_mb(pid: int) -> float:
    """The proportional set size of a process in MB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return 0.0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except FileNotFoundError:
        return []


def _same_files(a: Path, b: Path) -> bool:
    """Every built file byte-identical; for README.md, its YAML header (``configs:``): the prose card that
    ``bimedix build-data`` renders under it names its own folder in the `load_dataset` example."""
    def files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".work" not in
                      p.relative_to(root).parts)

    def content(path: Path) -> bytes:
        data = path.read_bytes()
        return data.split(b"\n---\n", 1)[0] if path.name == "README.md" else data

    return files(a) == files(b) and all(content(a / f) == content(b / f) for f in files(a))


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def bench_index(records: list[dict], count: int) -> None:
    code = (
        "import random, sys, json\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from data_prep import _status_mb\n"
        "from bimedix.data.dedup import Deduplicator\n"
        "words = json.loads(sys.stdin.read())\n"
        "def text(i):\n"
        "    return ' '.join(random.Random(i).choices(words, k=60))\n"
        "before = _status_mb('self', 'VmRSS')\n"
        "dedup = Deduplicator(text_of=text)  # as in build-data: kept texts are re-read, not held\n"
        f"for i in range({count}):\n"
        "    record = {'id': f'record-{i}', 'conversations': [{'from': 'human', 'value': text(i)}]}\n"
        "    dedup.check(record, ref=i)\n"
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
    parser.add_argument("--index-records", type=int, default=1_300_000,
                        help="distinct records in the dedup index "
                                                                               "(0 to skip)")
    parser.add_argument("--encode-records", type=int, default=20_000,
                        help="records encoded per run (>= 20000 for a "
                                                                         "stable figure; the "
                                                                         "real records repeated)")
    parser.add_argument("--encode-runs", type=int, default=5,
                        help="alternating runs of the fast path and the ceiling")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = real_records()
    random.Random(0).shuffle(records)
    bench_encoding(records, args.encode_records, args.encode_runs)
    with tempfile.TemporaryDirectory(prefix="bimedix-data-prep-") as folder:
        bench_build(records, args.records, Path(folder))
    if args.index_records:
        bench_index(records, args.index_records)


if __name__ == "__main__":
    main()
