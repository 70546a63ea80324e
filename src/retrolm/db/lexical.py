"""A lexical BM25 index over a database's chunks (the ``bm25s`` library), stored beside the dense keys.

The index covers exactly the database's stored chunks (ids = chunk ids, text = the chunk decoded from its LM tokens)
and lives in the database folder as ``bm25-vN/``, referenced by ``meta.json`` like the FAISS index: ``add`` and
``compact`` rebuild it inside their transaction (BM25 statistics are global, and rebuilding is seconds per 100k
chunks); ``delete`` only masks deleted chunks at search time. A database without one can still be searched with
BM25: the index is then built in memory for the session (and ``retrolm db bm25 DB`` stores it).

Needs the optional dependency: ``pip install retrolm[bm25]``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from retrolm.core.device import usable_cpus
from retrolm.core.errors import RetrolmError
from retrolm.core.io import fsync_dir, fsync_tree, naming_errors

logger = logging.getLogger(__name__)

BUILD_BATCH = 8192  # chunks decoded per call


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise RetrolmError("BM25 needs the bm25s package: pip install 'retrolm[bm25]'") from None
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


NO_TERMS = "no_terms"
"""Marks a stored index of chunks that hold no term at all (bm25s saves nothing for them)."""


class LexicalIndex:
    """BM25 over the chunks ``0..n_chunks-1`` of one database."""

    def __init__(self, retriever, n_chunks: int, folder: Path | None = None, has_terms: bool = True) -> None:
        self.retriever, self.n_chunks, self.folder = retriever, n_chunks, folder
        self.has_terms = has_terms and n_chunks > 0
        """False when no chunk holds a term BM25 keeps (only stopwords, single characters, punctuation): bm25s cannot
        index that, and every search finds nothing."""

    @classmethod
    def build(cls, chunk_texts: Callable[[np.ndarray], list[str]], n_chunks: int, show_progress: bool = False
              ) -> LexicalIndex:
        """Index ``n_chunks`` chunks whose texts ``chunk_texts(ids)`` returns (in batches)."""
        bm25s = _bm25s()
        texts: list[str] = []
        for start in range(0, n_chunks, BUILD_BATCH):
            texts += chunk_texts(np.arange(start, min(start + BUILD_BATCH, n_chunks)))
        retriever = bm25s.BM25()
        tokens = bm25s.tokenize(texts, show_progress=show_progress) if n_chunks else None
        has_terms = tokens is not None and len(tokens.vocab) > 0
        if has_terms:
            retriever.index(tokens, show_progress=show_progress)
        return cls(retriever, n_chunks, has_terms=has_terms)

    def save(self, folder: Path) -> None:
        """Write the index folder atomically (a temporary folder renamed into place)."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with naming_errors(folder):
                if self.has_terms:
                    self.retriever.save(str(tmp), show_progress=False)
                else:
                    tmp.mkdir(parents=True)
                    (tmp / NO_TERMS).write_text("")
                (tmp / "n_chunks.txt").write_text(str(self.n_chunks))
                fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        fsync_dir(folder.parent)
        self.folder = folder

    @classmethod
    def load(cls, folder: Path) -> LexicalIndex:
        bm25s = _bm25s()
        try:
            n = int((folder / "n_chunks.txt").read_text())
            has_terms = n > 0 and not (folder / NO_TERMS).exists()
            retriever = bm25s.BM25.load(str(folder), mmap=True, show_progress=False) if has_terms else bm25s.BM25()
        except (OSError, ValueError) as e:
            raise RetrolmError(f"{folder}: corrupt or unreadable BM25 index ({e})") from None
        return cls(retriever, n, folder, has_terms)

    def postings(self, query: str) -> int:
        """How many (term, chunk) postings the query's distinct terms have in the index: the entries a BM25 search
        reads. ``n_chunks`` per term (the upper bound) if this bm25s version's index layout cannot say."""
        if not self.has_terms:
            return 0
        bm25s = _bm25s()
        terms = set(bm25s.tokenize([query], return_ids=False, show_progress=False)[0])  # as search() tokenizes
        try:
            indptr, vocab = self.retriever.scores["indptr"], self.retriever.vocab_dict
        except (AttributeError, KeyError, TypeError):
            # an empty index has no arrays; another bm25s layout is worth one line at most
            logger.debug("bm25s index layout unknown: counting every chunk as a posting of each query term")
            return len(terms) * self.n_chunks
        return int(sum(int(indptr[vocab[t] + 1] - indptr[vocab[t]]) for t in terms if t in vocab))

    def search(self, queries: list[str], k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, chunk ids) per query, best first; ``exclude`` (bool per chunk) never returned; -1 / -inf
        where fewer than k chunks share a term with the query (BM25 scores those 0: they are not matches)."""
        bm25s = _bm25s()
        nq = len(queries)
        out_ids = np.full((nq, k), -1, dtype=np.int64)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        allowed = np.ones(self.n_chunks, dtype=np.float32) if exclude is None else (~exclude).astype(np.float32)
        k_eff = min(k, self.n_chunks)
        todo = [i for i, q in enumerate(queries) if q.strip()]
        if k_eff == 0 or not todo or not allowed.any() or not self.has_terms:
            return out_scores, out_ids
        # as strings, so that retrieve() maps them through the index's own vocabulary
        tokens = bm25s.tokenize([queries[i] for i in todo], return_ids=False, show_progress=False)
        # bm25s scores the queries on a thread pool, numpy releasing the GIL (2 cores: 1.95× on 1,024 queries); at
        # most one thread per 50 queries; n_threads=0 is its plain loop, without a pool
        threads = min(usable_cpus(), len(todo) // 50)
        ids, scores = self.retriever.retrieve(tokens, k=k_eff, show_progress=False, weight_mask=allowed,
                                              n_threads=threads if threads > 1 else 0)
        ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)
        miss = (scores <= 0) | (allowed[np.clip(ids, 0, self.n_chunks - 1)] == 0)
        ids[miss], scores[miss] = -1, -np.inf
        out_ids[todo, :k_eff], out_scores[todo, :k_eff] = ids, scores
        return out_scores, out_ids
