"""Retrieval over a database: one interface (:class:`Retriever`), dense / BM25 / hybrid, RETRO neighbour precompute."""

from __future__ import annotations

from retrolm.core.errors import RetrolmError
from retrolm.db import DatabaseView
from retrolm.retrieval.base import Exclusion, Retriever, SearchResult
from retrolm.retrieval.bm25 import BM25Retriever
from retrolm.retrieval.dense import DenseRetriever
from retrolm.retrieval.exact import ExactRetriever
from retrolm.retrieval.hybrid import HybridRetriever, reciprocal_rank_fusion

RETRIEVERS = {"dense": DenseRetriever, "bm25": BM25Retriever, "hybrid": HybridRetriever}


def get_retriever(db: DatabaseView, kind: str = "auto", **kwargs) -> Retriever:
    """A retriever of ``kind`` (dense | bm25 | hybrid | auto) over ``db``; auto = dense if the database has dense
    keys, else BM25."""
    if kind == "auto":
        kind = "dense" if db.has_dense else "bm25"
    if kind not in RETRIEVERS:
        raise RetrolmError(f"retriever must be one of auto, {', '.join(RETRIEVERS)}; got {kind!r}")
    return RETRIEVERS[kind](db, **kwargs)


__all__ = ["RETRIEVERS", "BM25Retriever", "DenseRetriever", "ExactRetriever", "Exclusion", "HybridRetriever",
           "Retriever", "SearchResult", "get_retriever", "reciprocal_rank_fusion"]
