"""Review app latency (issue 14): prints measured figures, asserts nothing.

A decision in ``bimedix review serve`` appends (and fsyncs) the audit entries and answers the page; the
output (every record, decisions applied) is rewritten after the answer. This measures, on ``--records``
synthetic translated MCQA records (2 turns + 4 options each) of which ``--queued`` are queued: the start-up
time of a `ReviewSession`, the time of one decision (what a reviewer waits for after each click) and of one
rewrite of the output (how far the output can lag behind the audit trail).

Usage::

    python benchmarks/review_app.py --records 20000 --queued 200 --decisions 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def translated_record(index: int, queued: bool) -> dict:
    from bimedix.data.schema import make_record

    options = [f"خيار {index} {letter}" for letter in "ABCD"]
    return make_record(
        id=f"bench-ar-{index:06d}", source="bench", task="mcqa", language="ar", license="MIT",
        conversations=[{"from": "human",
                        "value": f"سؤال رقم {index}: ما هو العلاج المناسب لمريض عمره {index % 90} سنة؟\n"
                                 + "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", options))},
                       {"from": "gpt",
                        "value": f"B. {options[1]}\n\nالشرح: توصي الإرشادات به عند هذا المستوى."}],
        options=options, answer="B",
        translation={"model": "bench", "score": 60.0 if queued else 95.0, "rounds": 1, "reviewed": False,
                     "review_state": "queued" if queued else "unreviewed",
                     "source_id": f"bench-en-{index:06d}",
                     "cost_usd": 0.0, "comments": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--queued", type=int, default=200)
    parser.add_argument("--decisions", type=int, default=20)
    args = parser.parse_args()

    from bimedix.llm.review_session import ReviewSession

    with tempfile.TemporaryDirectory() as tmp:
        translated = Path(tmp) / "ar.jsonl"
        with open(translated, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(translated_record(index, index < args.queued), ensure_ascii=False)
                              + "\n"
                              for index in range(args.records))
        start = time.perf_counter()
        session = ReviewSession(translated, Path(tmp) / "out.jsonl", fraction=0.0)
        startup = time.perf_counter() - start
        timings, writes = [], []
        for item_id in list(session.items)[: args.decisions]:
            start = time.perf_counter()
            session.decide(item_id, "approve", {}, reviewer="bench")
            timings.append(time.perf_counter() - start)
            start = time.perf_counter()
            session.write_output()
            writes.append(time.perf_counter() - start)
        size_mb = (Path(tmp) / "out.jsonl").stat().st_size / 1e6
    print(f"{args.records} records ({size_mb:.1f} MB output), {len(session.items)} queued")
    print(f"session start-up: {startup:.2f} s")
    print(f"one decision (checks, audit append + fsync): median {1000 * statistics.median(timings):.1f} ms, "
          f"max {1000 * max(timings):.1f} ms over {len(timings)} decisions")
    print(f"one output rewrite (after the answer): median {1000 * statistics.median(writes):.0f} ms, "
          f"max {1000 * max(writes):.0f} ms")


if __name__ == "__main__":
    main()
