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
import math
import shutil
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrolm.core.device import usable_cpus
from retrolm.core.errors import RetrolmError
from retrolm.core.io import fsync_dir, fsync_tree, naming_errors, read_json, write_json

logger = logging.getLogger(__name__)

BUILD_BATCH = 8192  # chunks decoded per call


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise RetrolmError("BM25 needs the bm25s package: pip install 'retrolm[bm25]'") from None
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


SCORER = "scorer.json"
"""The bm25s release, variant and parameters the index was made with."""
TEXT_FORM = "NFC"
"""The Unicode form texts and queries are put in before BM25 splits them into terms: bm25s's word pattern stops at a
combining accent, so a decomposed (NFD) "Abdülhamid" never matched a composed one, either way round."""
LENGTHS = "chunk_lengths.npy"
"""BM25 terms per chunk, stored beside bm25s's files (bm25s keeps only their mean)."""
NO_TERMS = "no_terms"
"""Marks a stored index of chunks that hold no term at all (bm25s saves nothing for them)."""


class LexicalIndex:
    """BM25 over the chunks ``0..n_chunks-1`` of one database."""

    def __init__(self, retriever, n_chunks: int, folder: Path | None = None, has_terms: bool = True,
                 lengths: np.ndarray | None = None, texts: Callable[[np.ndarray], list[str]] | None = None,
                 text_form: str | None = TEXT_FORM) -> None:
        self.retriever, self.n_chunks, self.folder = retriever, n_chunks, folder
        self.text_form = text_form
        """Unicode form of the indexed text, which queries are put in too (None: an index stored before it was)."""
        self.has_terms = has_terms and n_chunks > 0
        """False when no chunk holds a term BM25 keeps (only stopwords, single characters, punctuation): bm25s cannot
        index that, and every search finds nothing."""
        self.lengths = lengths
        """BM25 terms per chunk (see :meth:`chunk_lengths`)."""
        self.texts = texts
        self._total_length: int | None = None

    @classmethod
    def build(cls, chunk_texts: Callable[[np.ndarray], list[str]], n_chunks: int, show_progress: bool = False
              ) -> LexicalIndex:
        """Index ``n_chunks`` chunks whose texts ``chunk_texts(ids)`` returns (in batches)."""
        bm25s = _bm25s()
        texts: list[str] = []
        for start in range(0, n_chunks, BUILD_BATCH):
            texts += chunk_texts(np.arange(start, min(start + BUILD_BATCH, n_chunks)))
        retriever = bm25s.BM25()
        tokens = bm25s.tokenize(_in_form(texts, TEXT_FORM), show_progress=show_progress) if n_chunks else None
        has_terms = tokens is not None and len(tokens.vocab) > 0
        if has_terms:
            retriever.index(tokens, show_progress=show_progress)
        # the document lengths bm25s normalised by (it keeps only their mean): shared statistics need each
        lengths = np.array([len(ids) for ids in tokens.ids] if has_terms else np.zeros(n_chunks), dtype=np.int32)
        return cls(retriever, n_chunks, has_terms=has_terms, lengths=lengths, texts=chunk_texts)

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
                if self.lengths is not None:
                    np.save(tmp / LENGTHS, np.asarray(self.lengths, dtype=np.int32))
                write_json(tmp / SCORER, self.scorer())
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
    def load(cls, folder: Path, texts: Callable[[np.ndarray], list[str]] | None = None) -> LexicalIndex:
        """The index stored in ``folder``; ``texts`` gives chunk texts where its chunk lengths were not stored."""
        bm25s = _bm25s()
        try:
            n = int((folder / "n_chunks.txt").read_text())
            has_terms = n > 0 and not (folder / NO_TERMS).exists()
            retriever = bm25s.BM25.load(str(folder), mmap=True, show_progress=False) if has_terms else bm25s.BM25()
            lengths = np.load(folder / LENGTHS, mmap_mode="r") if (folder / LENGTHS).is_file() else None
            scorer = read_json(folder / SCORER, "BM25 scorer record") if (folder / SCORER).is_file() else {}
        except (OSError, ValueError) as e:
            raise RetrolmError(f"{folder}: corrupt or unreadable BM25 index ({e})") from None
        if lengths is not None and len(lengths) != n:
            raise RetrolmError(f"{folder / LENGTHS}: {len(lengths)} chunk lengths for {n} chunks (damaged index)")
        return cls(retriever, n, folder, has_terms, lengths, texts, scorer.get("text_form"))

    def tokenize(self, texts: list[str], **kwargs) -> object:
        """bm25s's terms of texts or queries, in the Unicode form the index holds."""
        return _bm25s().tokenize(_in_form(texts, self.text_form), show_progress=False, **kwargs)

    def postings(self, query: str) -> int:
        """How many (term, chunk) postings the query's distinct terms have in the index: the entries a BM25 search
        reads. ``n_chunks`` per term (the upper bound) if this bm25s version's index layout cannot say."""
        if not self.has_terms:
            return 0
        terms = set(self.tokenize([query], return_ids=False)[0])  # as search() tokenizes
        try:
            indptr, vocab = self.retriever.scores["indptr"], self.retriever.vocab_dict
        except (AttributeError, KeyError, TypeError):
            # an empty index has no arrays; another bm25s layout is worth one line at most
            logger.debug("bm25s index layout unknown: counting every chunk as a posting of each query term")
            return len(terms) * self.n_chunks
        return int(sum(int(indptr[vocab[t] + 1] - indptr[vocab[t]]) for t in terms if t in vocab))

    def _layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict] | None:
        """bm25s's precomputed scores, one column per term (indptr, chunk indices, idf x tf part), and its vocabulary;
        None for an index without terms."""
        if not self.has_terms:
            return None
        try:
            sc, method = self.retriever.scores, self.retriever.method
            layout = sc["indptr"], sc["indices"], sc["data"], self.retriever.vocab_dict
        except (AttributeError, KeyError, TypeError):
            layout, method = None, None
        if layout is None or method != "lucene":
            raise RetrolmError("this bm25s version or scorer stores its index in another layout: BM25 with shared "
                               "term statistics (sharded databases) is not available with it")
        return layout

    def chunk_lengths(self) -> np.ndarray:
        """BM25 terms per chunk, as indexed (BM25's document lengths): stored with the index since 2026-12-07,
        counted again from the chunk texts for an index stored before."""
        if self.lengths is None:
            if self.texts is None:
                raise RetrolmError(f"{self.folder}: BM25 chunk lengths are not stored and no chunk texts are at hand")
            logger.warning("%s: counting BM25 terms per chunk (an index stored before they were; `retrolm db bm25` "
                           "stores them)", self.folder)
            counts = []
            for start in range(0, self.n_chunks, BUILD_BATCH):
                texts = self.texts(np.arange(start, min(start + BUILD_BATCH, self.n_chunks)))
                counts += [len(t) for t in self.tokenize(texts, return_ids=False)]
            self.lengths = np.asarray(counts, dtype=np.int32)
        return self.lengths

    def term_stats(self, queries: list[str]) -> TermStats:
        """This index's statistics for the queries' terms: what the front of a sharded database sums over its parts
        so that every part scores alike (:meth:`search` with ``stats``)."""
        layout = self._layout()
        if layout is None:
            return TermStats(self.n_chunks, 0, {})
        return self._stats_of(self.tokenize(queries, return_ids=False), layout)

    def _stats_of(self, tokens: list[list[str]], layout: tuple) -> TermStats:
        """:meth:`term_stats` of queries already tokenized."""
        indptr, _, _, vocab = layout
        terms = {t for toks in tokens for t in toks}
        df = {t: int(indptr[vocab[t] + 1] - indptr[vocab[t]]) for t in sorted(terms) if t in vocab}
        if self._total_length is None:
            self._total_length = int(self.chunk_lengths().sum())
        return TermStats(self.n_chunks, self._total_length, df)

    def search(self, queries: list[str], k: int, exclude: np.ndarray | None = None,
               stats: TermStats | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, chunk ids) per query, best first; ``exclude`` (bool per chunk) never returned; -1 / -inf
        where fewer than k chunks share a term with the query (BM25 scores those 0: they are not matches).

        ``stats``: score with these statistics instead of this index's own (those of every part of a sharded
        database summed: each part then scores a chunk as one database holding all parts would)."""
        if stats is not None:
            return self._search_with_stats(queries, k, exclude, stats)
        nq = len(queries)
        out_ids = np.full((nq, k), -1, dtype=np.int64)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        allowed = np.ones(self.n_chunks, dtype=np.float32) if exclude is None else (~exclude).astype(np.float32)
        k_eff = min(k, self.n_chunks)
        todo = [i for i, q in enumerate(queries) if q.strip()]
        if k_eff == 0 or not todo or not allowed.any() or not self.has_terms:
            return out_scores, out_ids
        # as strings, so that retrieve() maps them through the index's own vocabulary
        tokens = self.tokenize([queries[i] for i in todo], return_ids=False)
        # ties as everywhere else (the exact path, fusion, shards): lower chunk id first. bm25s orders them higher id
        # first and cuts them anywhere: one more hit than asked shows a tie across the k-th place, and such a query
        # is scored over every chunk once more, alone (fetching ever deeper for all tied queries cost 10-100x)
        fetch = min(self.n_chunks, k_eff + 1)
        # bm25s scores the queries on a thread pool, numpy releasing the GIL (2 cores: 1.95× on 1,024 queries); at
        # most one thread per 50 queries; n_threads=0 is its plain loop, without a pool
        threads = min(usable_cpus(), len(todo) // 50)
        ids, scores = self.retriever.retrieve(tokens, k=fetch, show_progress=False, weight_mask=allowed,
                                              n_threads=threads if threads > 1 else 0)
        ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)
        order = np.lexsort((ids, -scores), axis=-1)
        ids, scores = np.take_along_axis(ids, order, -1)[:, :k_eff], np.take_along_axis(scores, order, -1)
        tied = (fetch > k_eff) & (scores[:, k_eff - 1] > 0) & (scores[:, k_eff - 1] == scores[:, -1])
        scores = scores[:, :k_eff]
        for row in np.flatnonzero(tied):
            ids[row], scores[row] = self._top_by_id(tokens[row], k_eff, allowed)
        miss = (scores <= 0) | (allowed[np.clip(ids, 0, self.n_chunks - 1)] == 0)
        ids[miss], scores[miss] = -1, -np.inf
        out_ids[todo, :k_eff], out_scores[todo, :k_eff] = ids, scores
        return out_scores, out_ids

    def _top_by_id(self, terms: list[str], k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of one query's top k over every chunk, ties lower id first (bm25s's own scores)."""
        scores = np.asarray(self.retriever.get_scores(list(terms), weight_mask=allowed), dtype=np.float32)
        top = _top_k_lower_id_first(scores, k)
        ids, out = np.full(k, -1, dtype=np.int64), np.full(k, -np.inf, dtype=np.float32)
        ids[: len(top)], out[: len(top)] = top, scores[top]
        return ids, out

    def _search_with_stats(self, queries: list[str], k: int, exclude: np.ndarray | None, stats: TermStats
                           ) -> tuple[np.ndarray, np.ndarray]:
        # bm25s stores idf(t) x tf/(tf + K(chunk)) per posting, K = k1 (1 - b + b len/mean len) with this index's
        # statistics: the term count tf is recovered (an integer), and the posting scored with the given idf and mean
        # length. Columns are summed as bm25s sums them (a term repeated in a query counts twice).
        nq = len(queries)
        out_ids = np.full((nq, k), -1, dtype=np.int64)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        layout = self._layout()
        if layout is None or k < 1:
            return out_scores, out_ids
        indptr, indices, data, vocab = layout
        lengths = self.chunk_lengths()
        tokens = self.tokenize(queries, return_ids=False)
        own = self._stats_of(tokens, layout)
        # sums over parts that include this one hold at least its own counts: anything less is stale or made up
        if stats.n_chunks < own.n_chunks or stats.total_length < own.total_length or any(
                stats.df.get(t, 0) < n for t, n in own.df.items()):
            raise RetrolmError(f"{self.folder or 'BM25 index'}: the term statistics given do not include this index's "
                               f"own ({own.n_chunks} chunks, {own.total_length} terms, {own.df})")
        k1, b = float(self.retriever.k1), float(self.retriever.b)
        # the mean length bm25s normalised by when it indexed, and the one of all parts
        own_mean, mean = own.total_length / own.n_chunks, stats.total_length / max(1, stats.n_chunks)
        for q, toks in enumerate(tokens):
            if not queries[q].strip():
                continue
            scores = np.zeros(self.n_chunks, dtype=np.float64)
            for t in toks:
                if t not in vocab or t not in stats.df:
                    continue
                col = slice(int(indptr[vocab[t]]), int(indptr[vocab[t] + 1]))
                rows, length = indices[col], lengths[indices[col]].astype(np.float64)
                part = data[col].astype(np.float64) / bm25_idf(col.stop - col.start, self.n_chunks)
                own_k = k1 * (1 - b + b * length / own_mean)
                tf = np.rint(part * own_k / (1 - part))
                scores[rows] += bm25_idf(stats.df[t], stats.n_chunks) * tf / (k1 * (1 - b + b * length / mean) + tf)
            scores = scores.astype(np.float32)  # as bm25s's own scores
            if exclude is not None:
                scores[exclude] = 0.0
            top = _top_k_lower_id_first(scores, k)
            out_ids[q, : len(top)], out_scores[q, : len(top)] = top, scores[top]
        return out_scores, out_ids

    def scorer(self) -> dict:
        """What decides this index's scores: the bm25s release, its variant and parameters (parts of a sharded
        database must agree on it)."""
        from importlib.metadata import version

        r = self.retriever
        return {"bm25s": version("bm25s"), "method": getattr(r, "method", None), "k1": getattr(r, "k1", None),
                "b": getattr(r, "b", None), "text_form": self.text_form}


def _top_k_lower_id_first(scores: np.ndarray, k: int) -> np.ndarray:
    """Ids of the (up to) k best positive ``scores``, best first, ties lower id first."""
    hit = np.flatnonzero(scores > 0)
    if len(hit) > k:  # only what scores at least the k-th best is sorted
        hit = hit[scores[hit] >= np.partition(scores[hit], len(hit) - k)[len(hit) - k]]
    return hit[np.argsort(-scores[hit], kind="stable")[:k]]


def _in_form(texts: list[str], form: str | None) -> list[str]:
    return [unicodedata.normalize(form, t) for t in texts] if form else list(texts)


@dataclass
class TermStats:
    """BM25 statistics of an index for some query terms: chunks indexed, their total length in BM25 terms, and per
    term how many chunks hold it."""

    n_chunks: int
    total_length: int
    df: dict[str, int]

    def __post_init__(self) -> None:
        if self.n_chunks < 0 or self.total_length < 0 or any(not 0 <= n <= self.n_chunks for n in self.df.values()):
            raise RetrolmError(f"term statistics need n_chunks, total_length >= 0 and 0 <= df <= n_chunks; got "
                               f"n_chunks={self.n_chunks}, total_length={self.total_length}, df={self.df}")

    @classmethod
    def merged(cls, parts: list[TermStats]) -> TermStats:
        """The statistics of one index holding every part's chunks."""
        df: dict[str, int] = {}
        for p in parts:
            for t, n in p.df.items():
                df[t] = df.get(t, 0) + n
        return cls(sum(p.n_chunks for p in parts), sum(p.total_length for p in parts), df)

    def to_dict(self) -> dict:
        return asdict(self)


def bm25_idf(df: int, n: int) -> float:
    """BM25's inverse document frequency as bm25s's default (Lucene) scorer computes it: log(1 + (n - df + 0.5) /
    (df + 0.5)) for a term held by ``df`` of ``n`` chunks."""
    return math.log(1.0 + (n - df + 0.5) / (df + 0.5))
