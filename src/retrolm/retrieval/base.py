"""One retrieval interface for every reader: ``retriever.search(queries, k, exclude=...)`` → ids, scores, chunk text.

Training-neighbour precompute, evaluation, RETRO generation and the in-context readers all retrieve through a
:class:`Retriever`; dense (frozen-encoder keys in FAISS), BM25 and hybrid (reciprocal-rank fusion) implement it.
What a query must not retrieve is an :class:`Exclusion`: chunks no query may see (deleted documents always; an
evaluation document's copies and near-duplicates), and per query, documents it may not see (its own document when
precomputing RETRO's training neighbours). Chunk-level exclusions are applied inside the index; per-query document
exclusions by fetching more results and filtering, until k are left or none remain.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrolm.core.errors import RetrolmError
from retrolm.db import DatabaseView, Hit


@dataclass
class Exclusion:
    """What queries must not retrieve."""

    chunks: np.ndarray | None = None
    """Bool mask over the database's chunk ids, for every query."""
    docs: Sequence[Sequence[int]] | None = None
    """Per query, global document indices it must not retrieve (one entry per query)."""

    def per_query_docs(self, nq: int) -> Sequence[Sequence[int]] | None:
        if self.docs is None or not any(len(d) for d in self.docs):
            return None
        if len(self.docs) != nq:
            raise RetrolmError(f"exclusion lists {len(self.docs)} document sets for {nq} queries")
        return self.docs


@dataclass
class SearchResult:
    """The top-k of each query: chunk ids (-1 = nothing more to return) and scores, best first."""

    ids: np.ndarray
    """(n_queries, k) int64 chunk ids."""
    scores: np.ndarray
    """(n_queries, k) float32 scores (-inf where the id is -1); comparable within one retriever only."""
    db: DatabaseView

    def texts(self, i: int) -> list[str]:
        """Chunk texts of query i's results, best first."""
        ids = self.ids[i][self.ids[i] >= 0]
        return self.db.chunk_texts(ids) if len(ids) else []

    def hits(self, i: int) -> list[Hit]:
        """Query i's results with their continuation, document id and position."""
        return self.db.hits(self.scores[i], self.ids[i])

    def __len__(self) -> int:
        return len(self.ids)


class Retriever(ABC):
    """Top-k chunks of a database for text queries. Subclasses implement :meth:`_search` (chunk mask only)."""

    name = "retriever"
    removal_stable = True
    """Whether excluding a chunk leaves every other query's top k as it was unless that chunk was in it (true of a
    ranking by score; not of rank fusion, where it moves the ranks below it)."""
    excluded_fetch = 0
    """With documents excluded per query: fetch up to k + this many hits in the first search, enough to pass over
    every chunk of the excluded documents (for searches that cost about the same at any k: BM25); 0 → fetch 2k and
    quadruple until k remain (searches whose cost grows with k: faiss)."""

    def __init__(self, db: DatabaseView) -> None:
        self.db = db

    def prepare(self, queries: Sequence[str]) -> np.ndarray:
        """Queries in the form :meth:`_search` takes, indexable by an array of rows (texts as an object array; the
        dense retriever's are vectors, which a caller may also pass directly to :meth:`search`)."""
        out = np.empty(len(queries), dtype=object)
        out[:] = list(queries)
        return out

    def _prepared(self, queries: object) -> bool:
        """Whether ``queries`` is already :meth:`prepare`'s output (texts as an object array)."""
        return isinstance(queries, np.ndarray) and queries.dtype == object and queries.ndim == 1

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, exclude_chunks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top-k per prepared query; ``exclude_chunks`` (deleted ones included) never returned."""

    def search(self, queries: str | Sequence[str] | np.ndarray, k: int, exclude: Exclusion | None = None
               ) -> SearchResult:
        """The ``k`` best chunks per query (a blank query retrieves nothing). ``queries``: text(s), or the output of
        :meth:`prepare` (e.g. query vectors computed once and searched under several exclusions)."""
        if k < 1:
            raise RetrolmError(f"k must be >= 1, got {k}")
        # other processes' writes first: deletions count from this search on, and a followed rebuild's new encoder
        # embeds the queries
        self.db.refresh()
        if isinstance(queries, str):
            queries = [queries]
        if not self._prepared(queries):
            queries = self.prepare(list(queries))
        exclude = exclude or Exclusion()
        mask = self.db.exclusion_mask(exclude.chunks)
        docs = exclude.per_query_docs(len(queries))
        if docs is None:
            scores, ids = self._search(queries, k, mask)
        else:
            scores, ids = self._search_excluding_docs(queries, k, mask, docs)
        return SearchResult(ids, scores, self.db)

    def _search_excluding_docs(self, queries: np.ndarray, k: int, mask: np.ndarray | None,
                               docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        store = self.db.store
        nq, n = len(queries), store.n_chunks
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        fetch = 2 * k
        if self.excluded_fetch:  # at most every chunk of a query's excluded documents ranks above its k-th hit
            sizes, need = store.doc_n_chunks, k
            for d in docs:
                d = np.asarray(d, dtype=np.int64) - store.first_doc
                need = max(need, int(sizes[d[(d >= 0) & (d < len(sizes))]].sum()))
            fetch = k + min(need, self.excluded_fetch)
        todo = np.arange(nq)
        while len(todo):
            s, i = self._search(queries[todo], min(fetch, n), mask)
            chunk_docs = np.where(i >= 0, store.chunk_doc(np.maximum(i, 0)), -1)
            still = []
            for row, q in enumerate(todo):
                keep = (i[row] >= 0) & ~np.isin(chunk_docs[row], np.asarray(docs[q]))
                if keep.sum() >= k or fetch >= n or (i[row] < 0).any():  # enough, or nothing more to fetch
                    take = np.flatnonzero(keep)[:k]
                    scores[q, : len(take)], ids[q, : len(take)] = s[row, take], i[row, take]
                else:
                    still.append(q)
            todo = np.asarray(still, dtype=np.int64)
            fetch *= 4
        return scores, ids
