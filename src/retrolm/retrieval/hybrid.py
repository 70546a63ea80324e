"""Hybrid retrieval: dense and BM25 rankings fused by reciprocal rank (Cormack et al. 2009)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrolm.db import DatabaseView
from retrolm.retrieval.base import Retriever
from retrolm.retrieval.bm25 import BM25Retriever
from retrolm.retrieval.dense import DenseRetriever

RRF_K = 60
"""The constant of reciprocal-rank fusion: score = sum over rankings of 1 / (RRF_K + rank), rank from 1."""


def reciprocal_rank_fusion(rankings: list[np.ndarray], k: int, rrf_k: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Fuse (n_queries, depth) id rankings (-1 = none) into the top-k (scores, ids) by reciprocal rank."""
    nq = rankings[0].shape[0]
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    for q in range(nq):
        fused: dict[int, float] = {}
        for ranking in rankings:
            for rank, c in enumerate(ranking[q]):
                if c >= 0:
                    fused[int(c)] = fused.get(int(c), 0.0) + 1.0 / (rrf_k + rank + 1)
        best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]  # ties: lower chunk id first
        for j, (c, s) in enumerate(best):
            ids[q, j], scores[q, j] = c, s
    return scores, ids


class HybridRetriever(Retriever):
    """Dense + BM25, each fetching ``depth`` × k candidates, fused by reciprocal rank."""

    name = "hybrid"
    removal_stable = False

    def __init__(self, db: DatabaseView, depth: int = 4, **dense_kwargs) -> None:
        super().__init__(db)
        self.dense, self.bm25, self.depth = DenseRetriever(db, **dense_kwargs), BM25Retriever(db), depth

    def _search(self, queries: np.ndarray, k: int, exclude_chunks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        fetch = min(self.depth * k, self.db.store.n_chunks)
        _, dense_ids = self.dense._search(self.dense.prepare(list(queries)), fetch, exclude_chunks)
        _, bm25_ids = self.bm25._search(queries, fetch, exclude_chunks)
        return reciprocal_rank_fusion([dense_ids, bm25_ids], k)

    def _search_excluding_docs(self, queries: np.ndarray, k: int, mask: np.ndarray | None,
                               docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        # each ranking drops the excluded documents before the fusion, at the usual depth: fusing first let them take
        # ranks (and fetched deeper lists), so the result differed from the same exclusion given as a chunk mask
        fetch = min(self.depth * k, self.db.store.n_chunks)
        _, dense_ids = self.dense._search_excluding_docs(self.dense.prepare(list(queries)), fetch, mask, docs)
        _, bm25_ids = self.bm25._search_excluding_docs(queries, fetch, mask, docs)
        return reciprocal_rank_fusion([dense_ids, bm25_ids], k)
