"""Near-duplicate detection between document sets by token n-gram Jaccard similarity.

RETRO removes from its retrieval database the training documents that are near-duplicates of evaluation
documents: 13-gram Jaccard similarity >= 0.8 (Borgeaud et al. 2021, §2.6). Candidates come from MinHash LSH
(``datasketch``) with a candidate threshold well below the target, and are confirmed with the exact Jaccard
similarity of the two n-gram sets: no false positives, and a miss probability of ~5e-5 at the threshold.

Documents are token-id sequences (the LM tokenizer's), so the test is tokenizer-level, as in the paper.

Jaccard needs whole documents on both sides: an evaluation *excerpt* (the first 1,600 characters of a file) has a
small Jaccard similarity with its full copy in the database. ``measure="containment"`` handles excerpts: the share of
the query's n-grams found in one reference document, |Q ∩ R| / |Q|, computed exactly from a sorted n-gram index.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH
from numpy.lib.stride_tricks import sliding_window_view
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

NUM_PERM = 128
LSH_MARGIN = 0.3  # the LSH candidate threshold sits this far below the Jaccard threshold
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio) for the polynomial n-gram hash


def ngram_set(tokens: np.ndarray, n: int = 13) -> np.ndarray:
    """Sorted unique 32-bit hashes of the token n-grams of one document (a shorter document is one n-gram)."""
    t = np.asarray(tokens, dtype=np.uint64)
    if len(t) == 0:
        return np.zeros(0, dtype=np.uint64)
    windows = sliding_window_view(t, n) if len(t) >= n else t[None, :]
    powers = _MULT ** np.arange(windows.shape[1], dtype=np.uint64)  # wraps mod 2^64 by design
    with np.errstate(over="ignore"):
        h = (windows * powers).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(29)
        h *= _MULT
    return np.unique(h >> np.uint64(32))  # datasketch takes 32-bit hash values


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays."""
    if len(a) == 0 and len(b) == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _minhash(hashes: np.ndarray) -> MinHash:
    m = MinHash(num_perm=NUM_PERM, seed=1, hashfunc=int)
    if len(hashes):
        m.update_batch(hashes.tolist())
    return m


MEASURES = ("jaccard", "containment")


@dataclass
class NearDuplicate:
    """A reference document whose n-gram set overlaps a query document's by at least the threshold."""

    query: int
    """Index of the query document (e.g. an evaluation document)."""
    reference: int
    """Index of the reference document (e.g. a database document)."""
    jaccard: float
    """The similarity that passed the threshold (Jaccard, or containment with ``measure="containment"``)."""


def find_near_duplicates(
    queries: Iterable[np.ndarray],
    references: Iterable[np.ndarray],
    threshold: float = 0.8,
    n: int = 13,
    show_progress: bool = False,
    measure: str = "jaccard",
) -> list[NearDuplicate]:
    """All (query, reference) document pairs with n-gram Jaccard similarity (or containment of the query in the
    reference) >= ``threshold``.

    ``queries`` and ``references`` yield token-id arrays; results use their positions in those sequences.
    The references are indexed once (MinHash LSH, or an exact n-gram index for containment), then every query is
    looked up and confirmed exactly.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if measure not in MEASURES:
        raise ValueError(f"near-duplicate measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    if measure == "containment":
        return _find_contained(queries, references, threshold, n, show_progress)
    # LSH tuned at the threshold misses ~60% of pairs right at it (bands of 13 rows); a lower LSH threshold makes
    # misses negligible (5e-5 at J = 0.8 for threshold 0.8), and the exact check below removes the extra candidates.
    lsh = MinHashLSH(threshold=max(0.1, threshold - LSH_MARGIN), num_perm=NUM_PERM)
    ref_sets: dict[int, np.ndarray] = {}
    for i, toks in enumerate(tqdm(references, desc="index n-grams", unit="doc", disable=not show_progress)):
        hashes = ngram_set(toks, n)
        if len(hashes):
            ref_sets[i] = hashes
            lsh.insert(i, _minhash(hashes), check_duplication=False)
    found = []
    for q, toks in enumerate(queries):
        hashes = ngram_set(toks, n)
        if not len(hashes):
            continue
        for r in lsh.query(_minhash(hashes)):
            j = jaccard(hashes, ref_sets[r])
            if j >= threshold:
                found.append(NearDuplicate(q, int(r), j))
    logger.info("near-duplicates (%d-gram Jaccard >= %.2f): %d pairs", n, threshold, len(found))
    return found


def _find_contained(queries: Iterable[np.ndarray], references: Iterable[np.ndarray], threshold: float, n: int,
                    show_progress: bool) -> list[NearDuplicate]:
    """Exact containment: every reference n-gram goes into one sorted (hash, document) table; a query's n-grams are
    looked up with binary search and counted per document. No sketch, so nothing is missed. A query of n/2 to n - 1
    tokens is contained where a reference holds its whole token sequence (its one gram is then a window of its own
    length, which the references are hashed at too); a shorter one only in an identical document."""
    query_sets: list[np.ndarray] = []
    short: dict[int, dict[int, list[int]]] = {}  # length < n → hash of the whole query → the queries
    for q, toks in enumerate(queries):
        query_sets.append(ngram_set(toks, n))
        if (n + 1) // 2 <= len(toks) < n:  # shorter still (a word or two) is no copy of anything: identical only
            short.setdefault(len(toks), {}).setdefault(int(query_sets[-1][0]), []).append(q)
    wanted = {length: np.array(sorted(by_hash), dtype=np.uint64) for length, by_hash in short.items()}
    hashes, owners = [], []
    short_hits: dict[int, set[int]] = {}  # short query → references holding it
    for i, toks in enumerate(tqdm(references, desc="index n-grams", unit="doc", disable=not show_progress)):
        h = ngram_set(toks, n)
        hashes.append(h)
        owners.append(np.full(len(h), i, dtype=np.int64))
        for length, by_hash in short.items():
            if len(toks) >= length:
                for held in np.intersect1d(ngram_set(toks, length), wanted[length], assume_unique=True).tolist():
                    for q in by_hash[held]:
                        short_hits.setdefault(q, set()).add(i)
    short_queries = {q for by_hash in short.values() for qs in by_hash.values() for q in qs}
    table = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    order = np.argsort(table, kind="stable")
    table, owner = table[order], owner[order]
    found = []
    for q, h in enumerate(query_sets):
        if not len(h):
            continue
        if len(h) == 1 and q in short_queries:
            found += [NearDuplicate(q, r, 1.0) for r in sorted(short_hits.get(q, ()))]
            continue
        lo, hi = np.searchsorted(table, h, "left"), np.searchsorted(table, h, "right")
        hit = hi > lo
        if not hit.any():
            continue
        # each reference document holds an n-gram at most once (sets), so counting owners counts shared n-grams
        docs = np.concatenate([owner[a:b] for a, b in zip(lo[hit], hi[hit], strict=True)])
        counts = np.bincount(docs)
        # the share compared, not counts against threshold × size: 0.55 × 100 is 55.000000000000007 in floating point
        for r in np.flatnonzero(counts / len(h) >= threshold):
            found.append(NearDuplicate(q, int(r), float(counts[r] / len(h))))
    logger.info("near-duplicates (%d-gram containment >= %.2f): %d pairs", n, threshold, len(found))
    return found
