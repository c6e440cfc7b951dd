"""Exact and near-duplicate removal with MinHash (``datasketch``) on normalised text.

A record's text is all its turns (and system prompt), normalised with
`bimedix.data.arabic.normalize_for_match` (case, punctuation, Arabic diacritics, alef forms,
Arabic-Indic digits). Exact duplicates share a 64-bit hash of that text. Near-duplicate *candidates*
share a band of their MinHash signature (locality-sensitive hashing with the bands and rows that best fit
the Jaccard ``threshold``); a candidate is removed only when the exact Jaccard similarity of its word
shingles (as their CRC-32s, the MinHash input) with the kept record's reaches the threshold (``candidates``
and ``confirmed`` count both). The first record seen wins, so recipe order sets priority.

`Deduplicator.signature` (hash and band keys) is a pure function of the text, so callers can compute it in
worker processes and hand it to `Deduplicator.check`, whose decisions stay sequential.

The index is streaming and compact: one 64-bit band key per band per kept record in a dict pointing at
the kept record's id (shared, not copied), instead of ``datasketch.MinHashLSH``'s per-bucket sets and
byte-string keys (kilobytes per record); ``benchmarks/data_prep.py`` measures it at 1.3M records. To confirm
a candidate the kept record's text is fetched through ``text_of`` (``build-data`` re-reads it from its
converted shard by byte offset), so kept texts are not held in memory.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from datasketch import MinHash

from .arabic import normalize_for_match

_SHINGLE_CACHE = 4096  # kept records whose shingles stay cached for confirming candidates


class Signature(NamedTuple):
    """What `Deduplicator.check` compares: the text's 64-bit hash, its LSH band keys and its shingle
    hashes."""

    digest: int
    band_keys: list[int]
    shingles: np.ndarray


@dataclass(frozen=True)
class Duplicate:
    """Why a record was dropped as a duplicate.

    Attributes:
        kind (`str`): ``"exact"`` or ``"near"``.
        kept_id (`str`): the id of the earlier (kept) record it duplicates; for a near duplicate, the first
            kept record found in a shared LSH band.
    """

    kind: Literal["exact", "near"]
    kept_id: str


def record_text(record: Mapping) -> str:
    """Return the text dedup and decontamination look at: system prompt and every turn, normalised."""
    parts = [record.get("system") or ""] + [turn["value"] for turn in record["conversations"]]
    return normalize_for_match(" ".join(parts))


class Deduplicator:
    """Streaming exact + MinHash-LSH near-duplicate filter.

    Args:
        num_perm (`int`, *optional*, defaults to 64): MinHash permutations.
        threshold (`float`, *optional*, defaults to 0.8): Jaccard similarity of word shingles above which
            two records count as near duplicates.
        shingle (`int`, *optional*, defaults to 3): words per shingle.
        seed (`int`, *optional*, defaults to 1): MinHash seed.
        text_of (`Callable`, *optional*): returns the `record_text` of a kept record from the ``ref`` it was
            checked with; without it, kept texts are held in memory (fine for small inputs).

    Attributes:
        candidates (`int`): records that shared an LSH band with a kept record (near-duplicate candidates).
        confirmed (`int`): candidates whose exact shingle Jaccard similarity reached ``threshold`` (removed).

    Examples:

    ```python
    >>> record = {"id": "a", "conversations": [{"from": "human", "value": "What is anemia?"},
    ...                                        {"from": "gpt", "value": "A low red cell count."}]}
    >>> dedup = Deduplicator()
    >>> dedup.check(record) is None        # first time: kept
    True
    >>> dedup.check({**record, "id": "b"})
    Duplicate(kind='exact', kept_id='a')

    ```
    """

    def __init__(self, num_perm: int = 64, threshold: float = 0.8, shingle: int = 3, seed: int = 1,
                 text_of: Callable[[Hashable], str] | None = None):
        self.num_perm = num_perm
        self.threshold = threshold
        self.candidates = 0
        self.confirmed = 0
        self._text_of = text_of
        self._texts: dict[Hashable, str] = {}
        self._kept_shingles: dict[Hashable, np.ndarray] = {}
        self.shingle = shingle
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        self._permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32",
                                     hashfunc=zlib.crc32).permutations
        self._seed = seed
        self._exact: dict[int, str] = {}
        self._buckets: dict[int, tuple[str, Hashable]] = {}

    def check(self, record: Mapping, text: str | None = None, *, signature: Signature | None = None,
              ref: Hashable | None = None) -> Duplicate | None:
        """Return a `Duplicate` if ``record`` repeats an earlier one; otherwise index it and return `None`.

        Args:
            record (`Mapping`): a schema record.
            text (`str`, *optional*): its `record_text`, when the caller has it already.
            signature (`Signature`, *optional*): its `signature`, when the caller computed it (e.g. in a
                worker).
            ref (`Hashable`, *optional*, defaults to the record id): what ``text_of`` gets to find this record
                again if it is kept.
        """
        if signature is None:
            text = record_text(record) if text is None else text
            signature = self.signature(text)
        digest, band_keys, hashes = signature
        kept = self._exact.get(digest)
        if kept is not None:
            return Duplicate("exact", kept)
        candidates = list(dict.fromkeys(entry for entry in map(self._buckets.get, band_keys)
                                        if entry is not None))
        if candidates:
            self.candidates += 1
            for kept_id, kept_ref in candidates:
                if jaccard(hashes, self._shingles_of(kept_ref)) >= self.threshold:
                    self.confirmed += 1
                    return Duplicate("near", kept_id)
        entry = (record["id"], record["id"] if ref is None else ref)
        if self._text_of is None:
            self._texts[entry[1]] = record_text(record) if text is None else text
        self._exact[digest] = entry[0]
        for key in band_keys:
            self._buckets.setdefault(key, entry)
        return None

    def signature(self, text: str) -> Signature:
        """Return what `check` compares for a `record_text`: a pure function of the text, for worker
        processes."""
        hashes = self.shingles(text)
        return Signature(_hash64(text.encode()), self.band_keys(hashes=hashes), hashes)

    def shingles(self, text: str) -> np.ndarray:
        """The word shingles of ``text`` (``shingle`` words each; the whole text when shorter) as their
        sorted, distinct CRC-32 hashes: the MinHash input, and what the Jaccard similarity is computed on."""
        words = text.split()
        size = min(self.shingle, len(words)) or 1
        return np.unique(np.fromiter((zlib.crc32(" ".join(words[i:i + size]).encode())
                                      for i in range(max(len(words) - size + 1, 1))), dtype=np.uint32))

    def _shingles_of(self, ref: Hashable) -> np.ndarray:
        shingles = self._kept_shingles.get(ref)
        if shingles is None:
            if len(self._kept_shingles) >= _SHINGLE_CACHE:
                self._kept_shingles.clear()
            text = self._texts[ref] if self._text_of is None else self._text_of(ref)
            shingles = self._kept_shingles[ref] = self.shingles(text)
        return shingles

    def band_keys(self, text: str | None = None, *, hashes: np.ndarray | None = None) -> list[int]:
        """Return one 64-bit key per LSH band of the MinHash of ``text``'s word shingles (or of their
        ``hashes``)."""
        hashes = self.shingles(text) if hashes is None else hashes
        minhash = MinHash(num_perm=self.num_perm, seed=self._seed, permutations=self._permutations,
                          scheme="affine32", hashfunc=int)  # the shingles' CRC-32s: stable across runs
        minhash.update_batch(hashes.tolist())
        values = minhash.hashvalues.astype(np.uint64)
        return [_hash64(band.tobytes() + bytes([index]))
                for index, band in enumerate(values[: self.bands * self.rows].reshape(self.bands, self.rows))]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity ``|a ∩ b| / |a ∪ b|`` of two sorted arrays of distinct values (1 if both are
    empty)."""
    if not len(a) and not len(b):
        return 1.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """Return the ``(bands, rows)`` minimising false positives plus false negatives around ``threshold``.

    Same criterion as ``datasketch.MinHashLSH`` (equal weights), integrated numerically.
    """
    grid = np.linspace(0, 1, 201)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            probability = 1 - (1 - grid ** rows) ** bands
            false_positive = np.trapezoid(np.where(grid < threshold, probability, 0), grid)
            false_negative = np.trapezoid(np.where(grid >= threshold, 1 - probability, 0), grid)
            if false_positive + false_negative < best_error:
                best, best_error = (bands, rows), false_positive + false_negative
    return best


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
