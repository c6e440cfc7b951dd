"""Token-length histogram of BiMed1.3M training rows, for `recipe_speed.py` (writes benchmarks/data/).

BiMed1.3M itself is not at hand (its Arabic half is our own translation, its chats are generated), so the
histogram is assembled from what is:

- **per-task means** from the paper's Fig. 3 (arXiv 2402.13253): QA 423.8 K samples / 131.8 M tokens (the
  figure prints "131.8 K"; the total 632.3 M says M), MCQA 638.1 K / 342.5 M, Chat 249.7 K / 158.0 M,
  so 311, 537 and 633 tokens per sample, and 482 overall;
- **per-task shapes** from real source records, converted by `bimedix.data.converters` and tokenized with
  the Vicuna template and the Mixtral tokenizer exactly as training rows are (`encode_conversations`):
  MCQA from MedMCQA, MedQA, PubMedQA, MMLU-medical, AceGPT MMLU-Arabic and MedAraBench; QA from Medical
  Meadow (wikidoc patient information), LiveQA, MedicationQA and MentalQA. No real multi-turn chat ships
  anywhere, so Chat takes the QA shape.

Each task's lengths are scaled so that their mean is the paper's, mixed in the paper's sample shares and
binned (64-token bins; rows above 4,096 tokens fall in the last bin, recipes truncate at ``max_length``).

    python benchmarks/length_histogram.py --sources ../shared/data [--output FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: (task, converter, path under --sources, converter options) of the real records used for the shapes.
SOURCES = (
    ("mcqa", "medmcqa", "medmcqa/data/dev.json", {}),
    ("mcqa", "medqa", "medqa_usmle/data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl", {}),
    ("mcqa", "pubmedqa", "pubmedqa/data/ori_pqal.json", {}),
    ("mcqa", "mmlu", "mmlu_medical/data/test", {}),
    ("mcqa", "mmlu-ar", "mmlu_medical_arabic_acegpt/MMLUArabic/test", {"source_language": "ar"}),
    ("mcqa", "medarabench", "medarabench/medarabench-test_split.csv", {}),
    ("qa", "meadow", "medical_meadow_wikidoc_patient_info/medical_meadow_small.json", {}),
    ("qa", "liveqa", "liveqa_medical_trec2017/TestDataset/TREC-2017-LiveQA-Medical-Test.xml", {}),
    ("qa", "medicationqa", "medicationqa/MedInfo2019-QA-Medications.xlsx", {}),
    ("qa", "mentalqa", "mentalqa/Train_Dev.tsv", {}),
)
#: The paper's Fig. 3: task -> (samples, tokens).
PAPER = {"qa": (423_800, 131_800_000), "mcqa": (638_100, 342_500_000), "chat": (249_700, 158_000_000)}
SHAPE_OF = {"qa": "qa", "mcqa": "mcqa", "chat": "qa"}
BIN, LAST = 64, 4096


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", required=True, help="folder of original source files (../shared/data)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "data" / "bimed1.3m_lengths.json"))
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists():
        raise SystemExit(f"{output} exists; remove it first or pass another --output")
    lengths, used = source_lengths(Path(args.sources))
    histogram = mix(lengths)
    output.parent.mkdir(parents=True, exist_ok=True)
    total = sum(histogram.values())
    mean = sum(float(k) * v for k, v in histogram.items()) / total
    output.write_text(json.dumps({
        "description": "Token lengths of BiMed1.3M training rows (Vicuna template, Mixtral tokenizer): "
                       "fraction of rows per bin; keys are bin centres in tokens. Made by "
                       "benchmarks/length_histogram.py; see its docstring.",
        "bin_tokens": BIN, "mean_tokens": round(mean, 1),
        "paper_fig3": {task: {"samples": s, "tokens": t} for task, (s, t) in PAPER.items()},
        "shape_records": used,
        "fractions": {k: round(v / total, 6) for k, v in histogram.items()},
    }, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {output}: mean {mean:.1f} tokens per row, {len(histogram)} bins; shape records {used}")


def source_lengths(sources: Path) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Token lengths of the real records per task, and how many records each source gave."""
    from bimedix.data.converters import convert
    from bimedix.data.encode import encode_conversations
    from bimedix.data.tokenizer import load_mixtral_tokenizer

    tokenizer = load_mixtral_tokenizer()
    lengths: dict[str, list[int]] = {"qa": [], "mcqa": []}
    used = {}
    for task, converter, path, options in SOURCES:
        records = list(convert(converter, sources / path, on_error=lambda *_: None, **options))
        encoded = encode_conversations(tokenizer, records, with_mask=False)
        lengths[task] += [len(e["input_ids"]) for e in encoded]
        used[converter] = len(records)
    return lengths, used


def mix(lengths: dict[str, list[int]]) -> dict[str, float]:
    """Scale each task's shape to the paper's mean, weight by the paper's samples, bin: {centre: weight}."""
    total_samples = sum(samples for samples, _ in PAPER.values())
    bins: dict[int, float] = {}
    for task, (samples, tokens) in PAPER.items():
        shape = lengths[SHAPE_OF[task]]
        scale = tokens / samples / (sum(shape) / len(shape))
        for length in shape:
            index = min(int(length * scale) // BIN, LAST // BIN - 1)
            bins[index] = bins.get(index, 0.0) + samples / total_samples / len(shape)
    return {str(index * BIN + BIN // 2): bins[index] for index in sorted(bins)}


if __name__ == "__main__":
    main()
