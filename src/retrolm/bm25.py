"""Lexical retrieval over a database's chunks with BM25 (the ``bm25s`` library), beside the dense frozen-encoder keys.

The BM25 index covers exactly the database's chunks (ids = chunk ids, text = the chunk decoded from its LM tokens)
and lives in the database folder as ``bm25-<key>/``, where the key names the chunk segments it was built from: an
``add`` or ``compact`` changes the segments, so the next search rebuilds it; a ``delete`` does not, because deleted
chunks are masked out at search time (``weight_mask``), as in the FAISS index.

Needs the optional dependency: ``pip install retrolm[bm25]``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrolm.errors import RetrolmError

if TYPE_CHECKING:
    from retrolm.database import Database

logger = logging.getLogger(__name__)

_BUILD_BATCH = 8192  # chunks decoded per call


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise RetrolmError("BM25 search needs the bm25s package: pip install 'retrolm[bm25]'") from None
    return bm25s


def index_key(db: Database) -> str:
    """Names the chunk set a BM25 index was built from (changes with add/compact, not with delete)."""
    return hashlib.sha1("/".join(db.meta["segments"]).encode()).hexdigest()[:12]


class BM25Index:
    """BM25 over the chunks of one database; build with :meth:`for_database`, query with :meth:`search`."""

    def __init__(self, db: Database, retriever, folder: Path) -> None:
        self.db, self.retriever, self.folder = db, retriever, folder

    @classmethod
    def for_database(cls, db: Database, show_progress: bool = False) -> BM25Index:
        """The database's BM25 index: loaded from its folder, or built (and saved) if missing or stale."""
        bm25s = _bm25s()
        folder = db.path / f"bm25-{index_key(db)}"
        if (folder / "params.index.json").is_file():
            return cls(db, bm25s.BM25.load(str(folder), mmap=True, show_progress=False), folder)
        logger.info("%s: building the BM25 index over %d chunks", db.path, db.store.n_chunks)
        texts: list[str] = []
        for start in range(0, db.store.n_chunks, _BUILD_BATCH):
            texts += db.chunk_texts(np.arange(start, min(start + _BUILD_BATCH, db.store.n_chunks)))
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, show_progress=show_progress), show_progress=show_progress)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        retriever.save(str(tmp), show_progress=False)
        tmp.rename(folder)  # the index appears complete or not at all
        for old in db.path.glob("bm25-*"):  # indexes of earlier chunk sets
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return cls(db, retriever, folder)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, chunk ids) per query, best first; deleted chunks never returned; -1 where none is left."""
        bm25s = _bm25s()
        n = self.db.store.n_chunks
        k_eff = min(k, n)
        if k_eff == 0 or not queries:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        mask = (~self.db.deleted_chunks).astype(np.float32)
        # as strings, so that retrieve() maps them through the index's own vocabulary
        tokens = bm25s.tokenize(queries, return_ids=False, show_progress=False)
        ids, scores = self.retriever.retrieve(tokens, k=k_eff, show_progress=False, weight_mask=mask, n_threads=1)
        ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)
        # A query sharing no term with a live chunk scores 0 everywhere: those are not matches.
        miss = (scores <= 0) | (mask[np.clip(ids, 0, n - 1)] == 0)
        ids[miss], scores[miss] = -1, -np.inf
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids[:, :k_eff], out_scores[:, :k_eff] = ids, scores
        return out_scores, out_ids
