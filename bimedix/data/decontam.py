"""Benchmark decontamination: drop training records that overlap an evaluation item.

Each benchmark item (read with the `bimedix.data.mcqa` readers) is normalised with
`normalize_for_match` (so Arabic diacritics, alef forms and Arabic-Indic digits do not hide a match)
and cut into word n-grams, its question and each option separately (training prompts put letters
between options); a part shorter than ``ngram`` words is one gram of its own length. A training record
is contaminated by the item whose grams it contains the largest fraction of, when that fraction reaches
``threshold``, the matched grams hold at least ``ngram`` words (or all the item has, if it has fewer),
and, when the question has indexed grams, one of them is among the matches: a two-word question such as
"Metronidazole:" is not enough on its own, nor are options such as "Stage I | Stage II" without the
question. Grams shared by more than ``max_item_frequency`` items
(exam boilerplate such as "which of the following is true", options such as "yes" or "all of the
above") are not evidence and are left out of the index.

English and Arabic benchmarks go into one index: n-grams in different scripts never meet.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .arabic import normalize_for_match

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkItem:
    """One evaluation item as the index keeps it."""

    benchmark: str
    id: str
    language: str | None
    question: str
    options: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """Question and options, as the report shows them."""
        return " | ".join([self.question, *self.options])


@dataclass(frozen=True)
class Contamination:
    """A match between a training record and a benchmark item.

    Attributes:
        item (`BenchmarkItem`): the benchmark side.
        overlap (`float`): fraction of the item's n-grams found in the record.
        matched (`int`): number of those n-grams.
    """

    item: BenchmarkItem
    overlap: float
    matched: int


class BenchmarkIndex:
    """An n-gram index over benchmark items.

    Args:
        items (`Iterable[BenchmarkItem]`): the benchmark items.
        ngram (`int`, *optional*, defaults to 8): words per n-gram.
        threshold (`float`, *optional*, defaults to 0.5): fraction of an item's n-grams a record must hold.
        max_item_frequency (`int`, *optional*, defaults to 10): drop n-grams shared by more items than this.
    """

    def __init__(self, items: Iterable[BenchmarkItem], *, ngram: int = 8, threshold: float = 0.5,
                 max_item_frequency: int = 10):
        self.ngram = ngram
        self.threshold = threshold
        self.items: list[BenchmarkItem] = []
        postings: dict[tuple[str, ...], set[int]] = defaultdict(set)
        item_grams: list[set[tuple[str, ...]]] = []
        question_grams: list[set[tuple[str, ...]]] = []
        for item in items:
            question = _ngrams(normalize_for_match(item.question).split(), ngram)
            grams = set(question)
            for option in item.options:  # each option alone: prompts put letters between options
                grams |= _ngrams(normalize_for_match(option).split(), ngram)
            if not grams:
                continue
            for gram in grams:
                postings[gram].add(len(self.items))
            item_grams.append(grams)
            question_grams.append(question)
            self.items.append(item)
        self._index = {gram: tuple(ids) for gram, ids in postings.items() if len(ids) <= max_item_frequency}
        self._sizes = [sum(1 for gram in grams if gram in self._index) for grams in item_grams]
        # Evidence a match needs: `ngram` words, or all the item has; and a question gram when one is indexed.
        self._needed = [min(ngram, sum(len(gram) for gram in grams if gram in self._index))
                        for grams in item_grams]
        self._questions = [frozenset(gram for gram in grams if gram in self._index)
                           for grams in question_grams]
        # Parts shorter than `ngram` words are one shorter gram; find them by first word and length.
        short: dict[str, set[int]] = defaultdict(set)
        for gram in self._index:
            if len(gram) < ngram:
                short[gram[0]].add(len(gram))
        self._short_lengths = {word: tuple(sorted(lengths)) for word, lengths in short.items()}
        logger.info("decontamination index: %d benchmark items, %d n-grams (%d boilerplate n-grams ignored)",
                    len(self.items), len(self._index), len(postings) - len(self._index))

    def __len__(self) -> int:
        return len(self.items)

    def match(self, text: str, *, normalized: bool = False) -> Contamination | None:
        """Return the best-matching benchmark item if ``text`` overlaps one at or above the threshold.

        Args:
            text (`str`): the training text (all turns).
            normalized (`bool`, *optional*, defaults to `False`): ``text`` is already
                `normalize_for_match`-ed.
        """
        words = (text if normalized else normalize_for_match(text)).split()
        grams = _ngrams(words, self.ngram, short=False)
        for position, word in enumerate(words):
            for length in self._short_lengths.get(word, ()):
                grams.add(tuple(words[position:position + length]))
        hits: Counter[int] = Counter()
        evidence: Counter[int] = Counter()
        for gram in grams:
            for item_id in self._index.get(gram, ()):
                hits[item_id] += 1
                evidence[item_id] += len(gram)
        best = None
        for item_id, matched in hits.items():
            overlap = matched / self._sizes[item_id]
            if (overlap >= self.threshold and evidence[item_id] >= self._needed[item_id]
                    and (not self._questions[item_id] or not self._questions[item_id].isdisjoint(grams))
                    and (best is None or overlap > best.overlap)):
                best = Contamination(self.items[item_id], overlap, matched)
        return best


def load_benchmark_items(specs: Iterable, resolve, *, on_error=None) -> list[BenchmarkItem]:
    """Read benchmark files with the `bimedix.data.mcqa` readers.

    Args:
        specs (`Iterable[BenchmarkSpec]`): the recipe's ``decontaminate.benchmarks``.
        resolve (`Callable[[str], Path]`): turns a recipe path into a file path.
        on_error (`OnError`, *optional*): the on-error policy for malformed benchmark rows.

    Returns:
        `list[BenchmarkItem]`: question and options of every item.
    """
    mcqa = importlib.import_module("bimedix.data.mcqa")
    items = []
    for spec in specs:
        reader = getattr(mcqa, f"read_{spec.reader}")
        kwargs = {**spec.options, **{name: resolve(value) for name, value in spec.files.items()}}
        if spec.language is not None:
            kwargs["language"] = spec.language
        count = 0
        for item in reader(resolve(spec.path), on_error=on_error, **kwargs):
            items.append(BenchmarkItem(spec.name, str(item.id), item.language, item.question,
                                       tuple(item.options)))
            count += 1
        logger.info("benchmark %s: %d items from %s", spec.name, count, spec.path)
    return items


def report_entry(record: Mapping, found: Contamination, ngram: int) -> dict:
    """One line of ``decontamination.jsonl``: both sides of a match and the evidence."""
    return {
        "id": record["id"], "source": record["source"], "task": record["task"],
        "language": record["language"],
        "text": _excerpt(" ".join(turn["value"] for turn in record["conversations"])),
        "benchmark": found.item.benchmark, "benchmark_id": found.item.id,
        "benchmark_language": found.item.language, "benchmark_text": _excerpt(found.item.text),
        "overlap": round(found.overlap, 4), "matched_ngrams": found.matched, "ngram": ngram,
        "reason": f"holds {found.overlap:.0%} of the {ngram}-grams "
                  f"of {found.item.benchmark} item {found.item.id}",
    }


def _ngrams(words: list[str], size: int, *, short: bool = True) -> set[tuple[str, ...]]:
    if len(words) < size:
        return {tuple(words)} if short and words else set()
    return {tuple(words[i:i + size]) for i in range(len(words) - size + 1)}


def _excerpt(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
