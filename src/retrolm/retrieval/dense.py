"""Dense retrieval: queries embedded by the database's frozen encoder, searched in its FAISS index."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrolm.db import DatabaseView, SearchSettings
from retrolm.retrieval.base import Retriever


class DenseRetriever(Retriever):
    """Frozen-encoder keys in FAISS (exact or approximate, as the database was built).

    Args:
        db: the database (it must hold dense keys).
        settings: FAISS search settings (``nprobe``, ``ef_search``); None = the index's tuned defaults.
        batch_size: queries per encoder forward pass.
    """

    name = "dense"

    def __init__(self, db: DatabaseView, settings: SearchSettings | None = None, batch_size: int = 128) -> None:
        super().__init__(db)
        self.settings, self.batch_size = settings, batch_size
        if not db.has_dense:
            db.encoder  # raises the one-line "built without dense keys" error  # noqa: B018

    def prepare(self, queries: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """(n, dim) query vectors; blank queries get a zero vector (and retrieve nothing)."""
        vecs = np.zeros((len(queries), self.db.index.dim), dtype=np.float32)
        live = [i for i, q in enumerate(queries) if q.strip()]
        if live:
            vecs[live] = self.db.embed([queries[i] for i in live], self.batch_size, show_progress)
        return vecs

    def _prepared(self, queries: object) -> bool:
        # query vectors; an object or string array (a pandas column's values) holds texts
        return isinstance(queries, np.ndarray) and queries.ndim == 2 and queries.dtype.kind in "fiu"

    def _search(self, queries: np.ndarray, k: int, exclude_chunks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.db.search_vectors(queries, k, exclude_chunks=exclude_chunks, settings=self.settings,
                                             refresh=False)  # Retriever.search refreshed the view
        blank = ~queries.any(axis=1)
        ids[blank], scores[blank] = -1, -np.inf
        return scores, ids
