"""Exact and near-duplicate removal with MinHash (``datasketch``) on normalised text.

A record's text is all its turns (and system prompt), normalised with
`bimedix.data.arabic.normalize_for_match` (case, punctuation, Arabic diacritics, alef forms,
Arabic-Indic digits). Exact duplicates share a 64-bit hash of that text. Near duplicates share a
band of their MinHash signature (locality-sensitive hashing with the bands and rows that best fit
the Jaccard ``threshold``); the first record seen wins, so recipe order sets priority.

The index is streaming and compact: one 64-bit band key per band per kept record in a dict pointing at
the kept record's id (shared, not copied), instead of ``datasketch.MinHashLSH``'s per-bucket sets and
byte-string keys (kilobytes per record); ``benchmarks/data_prep.py`` measures it at 1.3M records.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from datasketch import MinHash

from .arabic import normalize_for_match


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

    Examples:

    ```python
    >>> dedup = Deduplicator()
    >>> dedup.check(record) is None        # first time: kept
    True
    >>> dedup.check(same_record_again)
    Duplicate(kind='exact', kept_id='...')
    ```
    """

    def __init__(self, num_perm: int = 64, threshold: float = 0.8, shingle: int = 3, seed: int = 1):
        self.num_perm = num_perm
        self.shingle = shingle
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        self._permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32", hashfunc=zlib.crc32).permutations
        self._seed = seed
        self._exact: dict[int, str] = {}
        self._buckets: dict[int, str] = {}

    def check(self, record: Mapping, text: str | None = None) -> Duplicate | None:
        """Return a `Duplicate` if ``record`` repeats an earlier one; otherwise index it and return `None`.

        Args:
            record (`Mapping`): a schema record.
            text (`str`, *optional*): its `record_text`, when the caller has it already.
        """
        text = record_text(record) if text is None else text
        digest = _hash64(text.encode())
        kept = self._exact.get(digest)
        if kept is not None:
            return Duplicate("exact", kept)
        band_keys = self.band_keys(text)
        for key in band_keys:
            kept = self._buckets.get(key)
            if kept is not None:
                return Duplicate("near", kept)
        record_id = record["id"]
        self._exact[digest] = record_id
        self._buckets.update(dict.fromkeys(band_keys, record_id))
        return None

    def band_keys(self, text: str) -> list[int]:
        """Return one 64-bit key per LSH band of the MinHash of ``text``'s word shingles."""
        words = text.split()
        size = min(self.shingle, len(words)) or 1
        shingles = {" ".join(words[i:i + size]).encode() for i in range(max(len(words) - size + 1, 1))}
        minhash = MinHash(num_perm=self.num_perm, seed=self._seed, permutations=self._permutations,
                          scheme="affine32", hashfunc=zlib.crc32)  # stable across runs, ~3x faster than sha1
        minhash.update_batch(list(shingles))
        values = minhash.hashvalues.astype(np.uint64)
        return [_hash64(band.tobytes() + bytes([index]))
                for index, band in enumerate(values[: self.bands * self.rows].reshape(self.bands, self.rows))]


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
