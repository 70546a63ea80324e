"""Precomputed RETRO neighbours: for every chunk of a token source, the ids of its k nearest database chunks.

RETRO retrieves with each training chunk as the query and never lets a chunk retrieve its own document
(the paper's rule). ``exclude="near_duplicate"`` also keeps out every document that is a near-duplicate of the
chunk's own (another version of the same file: the strict evaluation protocol, applied to training), so that a
model trains on neighbours that are related text, never a copy. ``exclude="sequence"`` is stricter in another way:
no neighbour may come from any document that appears in the same training sequence. Neighbour ids are stored as a
``(n_chunks, k)`` int64 ``.npy`` (memory-mapped when read) next to a ``neighbours.json`` that records the database
and the database *version* they were computed against: chunk ids change when a database is compacted, so a stale
set is refused.

Any :class:`~retrolm.retrieval.Retriever` serves; the dense one reuses the database's stored keys as queries when
the index holds them exactly (flat / HNSW), which skips the encoder. ``NeighbourConfig(search="torch")`` replaces
the host FAISS search of a dense retriever by exact matrix-multiply top-k on a torch device (a GPU), with the same
exclusions (:class:`~retrolm.retrieval.exact.ExactRetriever`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrolm.core.errors import RetrolmError
from retrolm.core.io import load_npy, read_json, save_npy, write_json
from retrolm.db import ChunkStore, DatabaseView
from retrolm.retrieval.base import Exclusion, Retriever
from retrolm.retrieval.dense import DenseRetriever
from retrolm.retrieval.exact import ExactRetriever
from retrolm.text.dedup import find_near_duplicates

logger = logging.getLogger(__name__)

EXCLUDE_RULES = ("none", "document", "near_duplicate", "sequence")
EXCLUSION_RULE = 2
"""Version of how the exclusions are applied, saved with every neighbour set (2: the next chunk's document too)."""
SEARCH_BACKENDS = ("faiss", "torch")


MAX_NEIGHBOURS = 1000
"""The most neighbours (or passages) a model reads per chunk: RETRO reads 2-40, in-context readers a few; a count
beyond this (-k 100000) is a typo that ran for minutes or out of memory."""


@dataclass
class NeighbourConfig:
    """How neighbours are precomputed."""

    k: int = 2
    """Neighbours per chunk (RETRO trains with 2)."""
    exclude: str = "document"
    """none | document (the chunk's own document) | near_duplicate (its own and every near-duplicate of it) |
    sequence (every document of its training sequence). With document and near_duplicate, the document of the next
    chunk is excluded too (with its near-duplicates): chunk u's neighbours are read by the positions of chunk u+1,
    which may start another document."""
    near_dup_threshold: float = 0.8
    """``exclude="near_duplicate"``: a document is a near-duplicate of another when at least this share of its
    13-grams occurs in the other, either way round (containment, so a file that grew or shrank between versions
    still counts)."""
    seq_chunks: int = 32
    """Chunks per training sequence (T / chunk_len), used by ``exclude="sequence"``."""
    batch_size: int = 1024
    """Queries per search call."""
    retriever: str = "dense"
    """dense | bm25 | hybrid: how neighbours are found (RETRO: dense, with the frozen encoder's keys)."""
    search: str = "faiss"
    """faiss (the database's index, on the host) | torch (dense only: exact inner product by matrix multiply on
    ``device`` against the stored keys of a flat / hnsw index; see :mod:`retrolm.retrieval.exact`)."""
    device: str = "auto"
    """Device of the torch search: auto (CUDA if available) | cpu | cuda | cuda:N."""
    key_chunk: int = 1 << 18
    """Keys scored per matrix multiply by the torch search."""

    def __post_init__(self) -> None:
        if self.exclude not in EXCLUDE_RULES:
            rules = ", ".join(EXCLUDE_RULES)
            raise RetrolmError(f"neighbour exclude rule must be one of {rules}, got {self.exclude!r}")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise RetrolmError(f"neighbour near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        if self.k < 1 or self.seq_chunks < 1:
            raise RetrolmError("neighbour k and seq_chunks must be positive")
        if self.search not in SEARCH_BACKENDS:
            raise RetrolmError(f"neighbour search must be one of {', '.join(SEARCH_BACKENDS)}, got {self.search!r}")
        if self.key_chunk < 1:
            raise RetrolmError("neighbour key_chunk must be positive")


def _queries(retriever: Retriever, source: ChunkStore, ids: np.ndarray, same_db: bool) -> np.ndarray:
    """Prepared queries of source chunks, formatted exactly like the database's keys (stored keys when exact)."""
    db = retriever.db
    if same_db and isinstance(retriever, DenseRetriever) and db.index.stores_exact_keys:
        return db.index.reconstruct(ids)
    return retriever.prepare(source.texts(ids, db.tokenizer))


def near_duplicate_groups(db: DatabaseView, threshold: float = 0.8, n: int = 13,
                          show_progress: bool = False) -> list[np.ndarray]:
    """Per database document, the sorted indices of the other live documents that are its near-duplicates: at
    least ``threshold`` of one's ``n``-grams occur in the other, either way round (exact containment). Holds every
    n-gram hash of the store in memory (~16 bytes per token): seconds for millions of tokens, too much for billions."""
    store = db.store
    live = np.flatnonzero(~db.deleted_docs)
    found = find_near_duplicates((store.doc_tokens(int(d)) for d in live), (store.doc_tokens(int(d)) for d in live),
                                 threshold=threshold, n=n, show_progress=show_progress, measure="containment")
    pairs = np.asarray([(live[f.query], live[f.reference]) for f in found if f.query != f.reference],
                       dtype=np.int64).reshape(-1, 2)
    pairs = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)  # symmetric: either way round counts
    starts = np.searchsorted(pairs[:, 0], np.arange(store.n_docs + 1))
    groups = [pairs[a:b, 1] for a, b in itertools.pairwise(starts)]
    logger.info("near-duplicates among %d documents (%d-gram containment >= %.2f): %d pairs, %d documents have one",
                len(live), n, threshold, len(pairs) // 2, sum(len(g) > 0 for g in groups))
    return groups


def document_families(groups: list[np.ndarray]) -> np.ndarray:
    """Per document, the smallest document of its family: the documents linked to it through near-duplicate pairs
    (:func:`near_duplicate_groups`), so that "the same text" is one id wherever documents are compared."""
    parent = np.arange(len(groups))

    def root(d: int) -> int:
        while parent[d] != d:
            parent[d] = parent[parent[d]]
            d = parent[d]
        return d

    for d, group in enumerate(groups):
        for other in group:
            a, b = root(d), root(int(other))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.asarray([root(d) for d in range(len(groups))], dtype=np.int64)


def compute_neighbours(
    retriever: Retriever,
    source: ChunkStore | None = None,
    config: NeighbourConfig | None = None,
    show_progress: bool = True,
    exclude_chunks: np.ndarray | None = None,
    groups: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Neighbour chunk ids ``(source.n_chunks, k)`` (-1 where fewer than k exist) for every source chunk.

    ``source=None`` means the database's own chunks (training on the retrieval corpus, as RETRO does); then the
    exclusion rule applies. A separate source (held-out documents) is a different set of documents; database chunks
    that must not be retrieved for it (copies of the held-out documents, near-duplicates, or everything outside a
    database-size subset) are given as the bool mask ``exclude_chunks``. ``groups``: the database's
    :func:`near_duplicate_groups` under ``config.near_dup_threshold`` when the caller has them (else found here).
    """
    config = config or NeighbourConfig()
    db = retriever.db
    if config.search == "torch" and not isinstance(retriever, ExactRetriever):
        if not isinstance(retriever, DenseRetriever):
            raise RetrolmError(f"neighbour search 'torch' is exact dense search; the {retriever.name} retriever "
                               "has no dense keys (use search='faiss')")
        retriever = ExactRetriever(db, device=config.device, key_chunk=config.key_chunk,
                                   query_chunk=config.batch_size, batch_size=retriever.batch_size)
    same_db = source is None
    source = db.store if source is None else source
    n = source.n_chunks
    out = np.full((n, config.k), -1, dtype=np.int64)
    chunk_doc = source.all_chunk_docs()
    if not (same_db and config.exclude == "near_duplicate"):
        groups = []
    elif groups is None:
        groups = near_duplicate_groups(db, config.near_dup_threshold, show_progress=show_progress)
    pinned = db_identity(db)

    def search_rows(ids: np.ndarray) -> None:
        docs = None
        # the documents read by chunk u's neighbours' readers: u's own and, where u ends a document, u+1's
        own, after = chunk_doc[ids], chunk_doc[np.minimum(ids + 1, n - 1)]
        if same_db and config.exclude == "document":
            docs = [[a] if a == b else [a, b] for a, b in zip(own, after, strict=True)]
        elif same_db and config.exclude == "near_duplicate":
            docs = [np.append(groups[a], a) if a == b else np.concatenate([groups[a], [a], groups[b], [b]])
                    for a, b in zip(own, after, strict=True)]
        elif same_db and config.exclude == "sequence":
            seq = ids // config.seq_chunks
            docs_of_seq = {s: np.unique(chunk_doc[s * config.seq_chunks : (s + 1) * config.seq_chunks])
                           for s in np.unique(seq)}
            docs = [docs_of_seq[s] for s in seq]
        queries = _queries(retriever, source, ids + source.first_chunk, same_db)
        out[ids] = retriever.search(queries, config.k, Exclusion(chunks=exclude_chunks, docs=docs)).ids

    for start in tqdm(range(0, n, config.batch_size), desc="neighbours", unit="batch", disable=not show_progress):
        search_rows(np.arange(start, min(start + config.batch_size, n)))
    # every search reads the database as it is now: a deletion by another process during the run reached only the
    # later batches. The earlier rows that hold a chunk deleted since are searched again (for a ranking by score the
    # others cannot change: a deletion only removes candidates), so that the set is that of the version it is saved
    # with.
    db.refresh()
    while (now := db_identity(db)) != pinned:
        if {**now, "version": 0} != {**pinned, "version": 0}:
            raise RetrolmError(f"{db.path}: the database was rebuilt or grew during the neighbour search "
                               f"(version {pinned['version']} → {now['version']}); compute the neighbours again")
        pinned = now
        stale = np.flatnonzero(((out >= 0) & db.deleted_chunks[np.maximum(out, 0)]).any(1)) \
            if retriever.removal_stable else np.arange(n)  # fused ranks move: every row again
        for start in range(0, len(stale), config.batch_size):
            search_rows(stale[start : start + config.batch_size])
        db.refresh()
    return out


def db_identity(db: DatabaseView) -> dict:
    """What a neighbour set depends on: a rebuilt database restarts at version 1, so the version alone is not enough."""
    return {"path": str(db.path.resolve()), "build_id": db.meta.get("build_id"), "version": db.meta["version"],
            "n_chunks": db.store.n_chunks, "encoder": (db.meta.get("encoder") or {}).get("name"),
            "index": (db.meta.get("index") or {}).get("file")}


def save_neighbours(folder: str | Path, neighbours: np.ndarray, db: DatabaseView, config: NeighbourConfig,
                    source: str = "database") -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_npy(folder / "neighbours.npy", neighbours)
    write_json(folder / "neighbours.json", {
        "db": str(db.path.resolve()),
        "db_version": db.meta["version"],
        "db_identity": db_identity(db),
        "source": source,
        "n_chunks": len(neighbours),
        "config": asdict(config),
        "exclusion_rule": EXCLUSION_RULE,
    })


def rule_outdated(meta: dict) -> bool:
    """Whether a saved set (its ``neighbours.json``) of the database's own chunks was made under a document rule
    older than :data:`EXCLUSION_RULE` (before the next chunk's document was excluded too)."""
    exclude = (meta.get("config") or {}).get("exclude", "document")
    return (meta.get("source", "database") == "database" and exclude in ("document", "near_duplicate")
            and meta.get("exclusion_rule", 1) < EXCLUSION_RULE)


def load_neighbours(folder: str | Path, db: DatabaseView) -> np.ndarray:
    """Memory-map a neighbour set, refusing one computed against another version of the database."""
    folder = Path(folder)
    meta = read_json(folder / "neighbours.json", "neighbour description")
    if meta["db_version"] != db.meta["version"] or meta.get("db_identity", db_identity(db)) != db_identity(db):
        raise RetrolmError(
            f"{folder}: neighbours were computed against another build or version of {meta['db']} "
            f"(version {meta['db_version']}, now {db.meta['version']}); recompute them"
        )
    if rule_outdated(meta):
        logger.warning("%s: computed before the next chunk's document was excluded too (a chunk that ends a document "
                       "may have the next document's own text among its neighbours); recompute for exactness", folder)
    return load_npy(folder / "neighbours.npy", mmap=True)
