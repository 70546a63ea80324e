"""Lexical retrieval with BM25 over the database's chunks (the stored index, or one built for the session)."""

from __future__ import annotations

import numpy as np

from retrolm.db import DatabaseView
from retrolm.db.lexical import TermStats
from retrolm.retrieval.base import Retriever


class BM25Retriever(Retriever):
    """BM25 (``bm25s``) over the chunk texts. Works on any database, including one built without dense keys.

    Args:
        db: the database.
        stats: BM25 statistics to score with instead of the database's own (a part of a sharded database scored with
            those of all parts: :mod:`retrolm.retrieval.sharded`).
    """

    name = "bm25"
    excluded_fetch = 4096  # one search scores every chunk anyway; the top 4,096 cost ~15% more than the top 4

    def __init__(self, db: DatabaseView, stats: TermStats | None = None) -> None:
        super().__init__(db)
        self.stats = stats

    def _search(self, queries: np.ndarray, k: int, exclude_chunks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self.db.lexical.search(list(queries), k, exclude=exclude_chunks, stats=self.stats)
