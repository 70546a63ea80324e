"""The vector index behind a retrieval database: a thin wrapper over FAISS.

Keys are L2-normalised float32 sentence embeddings, similarity is the inner product, and ids are the
chunk ids ``0..ntotal-1`` in insertion order. Three kinds of index, all built with ``faiss.index_factory``:

- ``flat``: exact search over the raw vectors (``dim * 4`` bytes per chunk); no training. For small databases.
- ``ivfpq``: ``OPQ{m},IVF{nlist}_HNSW32,PQ{m}`` — an OPQ rotation, an inverted file whose coarse quantizer is
  an HNSW graph over the ``nlist`` centroids, and ``m``-byte product-quantizer codes of the residuals. On disk
  it costs ``m + 8`` bytes per chunk (the codes plus FAISS's int64 id), 56 B for 384-d embeddings.
- ``hnsw``: ``HNSW32,Flat`` — a graph over the raw vectors: fast and accurate, but ``dim * 4 + ~260`` bytes per
  chunk and a slow, thread-order-dependent build. For when RAM is plentiful and latency matters most.

The defaults (``AUTO_FLAT_MAX_VECTORS``, the factory sizing, ``DEFAULT_NPROBE``, ``DEFAULT_EF_SEARCH``) come
from ``benchmarks/bench_search.py``; see ``benchmarks/RESULTS.md`` for the numbers behind them.

Any of them may end in a refine stage (``"...,RFlat"`` or ``"...,Refine(SQfp16)"``; ``IndexRefine``): the base
index returns ``k_factor * k`` candidates, which are re-ranked by exact inner product against a second copy of the
vectors (``dim * 4`` bytes per chunk for ``RFlat``, ``dim * 2`` for ``SQfp16``, ``dim`` for ``SQ8``) — the way to a
high 10-recall@10 for IVF-PQ (its top-10 order is only as good as the PQ estimates). ``k_factor`` is a search
setting (``DEFAULT_K_FACTOR`` is stored in a new refine index).

Deleted chunks are excluded at search time by a boolean mask that becomes an ``IDSelectorBitmap`` inside
FAISS's ``SearchParameters``, so a search still returns ``k`` live results however many ids are excluded.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retrolm.core.errors import RetrolmError
from retrolm.core.io import atomic_path
from retrolm.db.faiss_setup import (
    AUTO_FLAT_MAX_VECTORS,
    INDEX_KINDS,
    MAX_TRAIN_POINTS_PER_CENTROID,
    PQ_TRAIN_POINTS,
    TRAIN_POINTS_PER_CENTROID,
    default_factory,
    default_nlist,
    ensure_threads,
    resolve_kind,
    set_num_threads,
    train_index,
)

logger = logging.getLogger(__name__)

DEFAULT_NPROBE = 32
"""Inverted lists visited per query by default (see benchmarks/RESULTS.md: recall plateaus beyond it)."""

DEFAULT_EF_SEARCH = 128
"""HNSW search-time beam width by default (the ``hnsw`` kind)."""

DEFAULT_K_FACTOR = 4.0
"""Candidates per result re-ranked by a refine stage (``k_factor * k`` from the base index) by default."""



@dataclass
class SearchSettings:
    """Search-time accuracy/speed knobs; ``None`` means the value stored in the index (the tuned default)."""

    nprobe: int | None = None
    """IVF lists visited per query (``ivfpq``): more → higher recall, proportionally slower."""
    ef_search: int | None = None
    """HNSW beam width (``hnsw``): more → higher recall, slower."""
    k_factor: float | None = None
    """Refine stage only: the base index returns ``k_factor * k`` candidates, re-ranked exactly (>= 1)."""

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search", "k_factor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RetrolmError(f"search setting {name}={value}: must be >= 1")


# ---------------------------------------------------------------------------------------------------------------
# Looking inside a FAISS index


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The innermost index that decides the kind: through OPQ/PCA pre-transforms and refinement stages."""
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return index


def _kind_of(index: faiss.Index) -> str | None:
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        return "ivfpq"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    return None


def _factory_of(index: faiss.Index) -> str:
    """Best-effort factory string of a loaded index (FAISS stores the structure, not the string)."""
    from faiss.contrib.factory_tools import reverse_index_factory

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):  # not named by reverse_index_factory: compaction rebuilt "IndexRefine"
        refine = faiss.downcast_index(index.refine_index)
        stage = "RFlat" if type(refine) in (faiss.IndexFlat, faiss.IndexFlatIP) else f"Refine({_factory_of(refine)})"
        return f"{_factory_of(index.base_index)},{stage}"
    try:
        return reverse_index_factory(index)
    except (NotImplementedError, RuntimeError, AttributeError, KeyError, AssertionError):  # PCAW: a bare assert
        pass
    # an OPQ rotation is saved as a plain LinearTransform, which reverse_index_factory does not name
    if isinstance(index, faiss.IndexPreTransform) and index.chain.size() == 1:
        vt = faiss.downcast_VectorTransform(index.chain.at(0))
        inner = _unwrap(index)
        if type(vt) is faiss.LinearTransform and hasattr(inner, "pq"):
            return f"OPQ{inner.pq.M}_{vt.d_out},{_factory_of(index.index)}"
    return type(index).__name__


def _faiss_reason(error: Exception) -> str:
    """FAISS errors are multi-line C++ traces; keep the last line, without the source location."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return text.split(": Error: ", 1)[-1].strip()


def _refine_of(index: faiss.Index) -> faiss.IndexRefine | None:
    """The refine stage of an index (through pre-transforms), or None."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexRefine) else None


def _search_params(
    index: faiss.Index, sel: faiss.IDSelector | None, nprobe: int, ef: int, keep: list, k_factor: float | None = None
) -> faiss.SearchParameters:
    """Nested ``SearchParameters`` mirroring the index's nesting; ``keep`` holds every SWIG object alive."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        inner = _search_params(index.index, sel, nprobe, ef, keep, k_factor)
        params = faiss.SearchParametersPreTransform(index_params=inner)
    elif isinstance(index, faiss.IndexRefine):
        # the selector goes to the base index: the refine stage only re-ranks the candidates it returns
        inner = _search_params(index.base_index, sel, nprobe, ef, keep)
        params = faiss.IndexRefineSearchParameters(k_factor=float(k_factor or index.k_factor),
                                                   base_index_params=inner)
    elif isinstance(index, faiss.IndexIVF):
        quantizer = faiss.downcast_index(index.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            # the coarse HNSW must return at least nprobe good lists; 2x nprobe costs little next to list scans
            qparams = faiss.SearchParametersHNSW(efSearch=max(2 * nprobe, quantizer.hnsw.efSearch))
            keep.append(qparams)
            params = faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=qparams)
        else:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
        if sel is not None:
            params.sel = sel
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=ef)
        if sel is not None:
            params.sel = sel
    else:
        params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
    keep.append(params)
    return params


# ---------------------------------------------------------------------------------------------------------------
# The index


class VectorIndex:
    """A FAISS inner-product index over chunk embeddings with sequential ids.

    Build: ``VectorIndex.create(dim, kind, n_vectors)`` → ``train(sample)`` (if ``needs_training``) → ``add`` in
    blocks → ``save(path)``. Serve: ``VectorIndex.load(path)`` (memory-mapped) → ``search(queries, k, exclude)``.
    """

    def __init__(self, index: faiss.Index, kind: str, factory: str, seed: int = 0, path: Path | None = None) -> None:
        self.index = index
        self.kind = kind
        self.factory = factory
        self.dim = int(index.d)
        self.seed = seed
        self._path = path  # the file this index was loaded from / last saved to
        self._mmapped = False  # loaded with IO_FLAG_MMAP_IFC: arrays are read-only views of the file
        self._dirty = path is None  # changed since it was last saved or loaded
        self._bitmap_cache: tuple[weakref.ref, np.ndarray, int] | None = None  # see _allowed_bitmap

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, dim: int, kind: str = "auto", n_vectors: int = 0, factory: str | None = None, seed: int = 0
    ) -> VectorIndex:
        """A new, empty index.

        ``factory`` overrides the default FAISS factory string; with ``kind="auto"`` the kind is then inferred
        from it (any IVF variant is ``ivfpq``), otherwise it must build an index of that kind.
        """
        ensure_threads()
        if factory is None:
            kind = resolve_kind(kind, n_vectors)
            factory = default_factory(kind, dim, n_vectors)
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise RetrolmError(f"index factory {factory!r}: {_faiss_reason(e)}") from None
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:  # e.g. HNSW32,PQ8: FAISS builds it with L2 regardless
            raise RetrolmError(f"index factory {factory!r}: FAISS builds it with another metric than inner product "
                               "(retrieval scores by inner product); choose another factory")
        actual = _kind_of(index)
        if kind == "auto" and actual is not None:
            kind = actual  # an explicit factory decides the kind
        elif kind not in INDEX_KINDS:
            raise RetrolmError(f"index kind {kind!r}: unknown (choose from {', '.join(INDEX_KINDS)})")
        if actual != kind:
            raise RetrolmError(f"index factory {factory!r}: builds a {actual or 'unsupported'} index, not {kind}")
        ps = faiss.ParameterSpace()
        if kind == "ivfpq":
            ps.set_index_parameter(index, "nprobe", DEFAULT_NPROBE)
        elif kind == "hnsw":
            ps.set_index_parameter(index, "efSearch", DEFAULT_EF_SEARCH)
        refine = _refine_of(index)
        if refine is not None:
            refine.k_factor = DEFAULT_K_FACTOR
        return cls(index, kind, factory, seed=seed)

    # -- properties ----------------------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index (the next id ``add`` assigns)."""
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def needs_training(self) -> bool:
        """True until ``train`` has run (always False for flat and hnsw)."""
        return not self.is_trained

    @property
    def nlist(self) -> int | None:
        return int(faiss.extract_index_ivf(self.index).nlist) if self.kind == "ivfpq" else None

    @property
    def min_train_vectors(self) -> int:
        """How many vectors ``train`` wants: ~32 per IVF list and ~40 per PQ centroid; 0 if no training."""
        if not self.needs_training:
            return 0
        if self.kind != "ivfpq":
            return 256
        return max(TRAIN_POINTS_PER_CENTROID * self.nlist, PQ_TRAIN_POINTS)

    @property
    def fewest_train_vectors(self) -> int:
        """The fewest vectors ``train`` accepts (0 once trained, or for a kind that needs no training)."""
        if not self.needs_training:
            return 0
        return max(self.nlist or 1, 256)

    @property
    def max_train_vectors(self) -> int:
        """``train`` subsamples (deterministically) larger training sets down to this many vectors."""
        if self.kind != "ivfpq":
            return 1 << 20
        return max(MAX_TRAIN_POINTS_PER_CENTROID * self.nlist, 4 * PQ_TRAIN_POINTS)

    @property
    def default_settings(self) -> SearchSettings:
        """The search settings stored in the index (set at ``create``, kept in the saved file)."""
        refine = _refine_of(self.index)
        k_factor = None if refine is None else float(refine.k_factor)
        if self.kind == "ivfpq":
            return SearchSettings(nprobe=int(faiss.extract_index_ivf(self.index).nprobe), k_factor=k_factor)
        if self.kind == "hnsw":
            return SearchSettings(ef_search=int(faiss.downcast_index(_unwrap(self.index)).hnsw.efSearch),
                                  k_factor=k_factor)
        return SearchSettings(k_factor=k_factor)

    @property
    def has_refine(self) -> bool:
        """Whether the index ends in a refine stage (``RFlat`` / ``Refine(...)``)."""
        return _refine_of(self.index) is not None

    @property
    def stores_exact_keys(self) -> bool:
        """Whether ``reconstruct`` returns the exact vectors: flat, hnsw, or a refine stage over raw vectors (RFlat)."""
        refine = _refine_of(self.index)
        if refine is not None:
            return isinstance(faiss.downcast_index(refine.refine_index), faiss.IndexFlat)
        if isinstance(faiss.downcast_index(self.index), faiss.IndexPreTransform):  # PCA, OPQ, RR: other vectors
            return False
        inner = faiss.downcast_index(_unwrap(self.index))
        if isinstance(inner, faiss.IndexHNSW):  # its storage: flat, or scalar-quantized (SQ8, SQ4: approximate)
            inner = faiss.downcast_index(inner.storage)
        return isinstance(inner, faiss.IndexFlat)

    @property
    def refine_nbytes(self) -> int:
        """Serialized size of the refine stage's own vectors (0 without one): its cost, ``/ ntotal`` per chunk."""
        refine = _refine_of(self.index)
        return 0 if refine is None else int(faiss.serialize_index(refine.refine_index).size)

    @property
    def nbytes_on_disk(self) -> int:
        """Size of the index file: the saved file's size if unchanged since, else the serialized size."""
        if self._path is not None and not self._dirty:
            return self._path.stat().st_size
        return int(faiss.serialize_index(self._writable_view()).size)

    def __repr__(self) -> str:
        where = f", path={str(self._path)!r}" if self._path else ""
        return f"VectorIndex(kind={self.kind!r}, factory={self.factory!r}, dim={self.dim}, ntotal={self.ntotal}{where})"

    # -- building ------------------------------------------------------------------------------------------------

    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise RetrolmError(f"{self._name()}: {what} have shape {vectors.shape}, the index expects (n, {self.dim})")
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _name(self) -> str:
        return str(self._path) if self._path else f"{self.kind} vector index"

    def train(self, vectors: np.ndarray) -> None:
        """Train the quantizers on a sample of the database (deterministic for the same data, seed and threads)."""
        vectors = self._check_vectors(vectors, "training vectors")
        if not self.needs_training:
            logger.info("%s: already trained; train() ignored", self._name())
            return
        n = len(vectors)
        if n < self.fewest_train_vectors:
            raise RetrolmError(f"{self._name()}: {n} training vectors, need at least {self.fewest_train_vectors}")
        if n < self.min_train_vectors:
            logger.warning("%s: training on %d vectors, %d recommended", self._name(), n, self.min_train_vectors)
        if n > self.max_train_vectors:
            rng = np.random.default_rng(self.seed)
            vectors = vectors[np.sort(rng.choice(n, self.max_train_vectors, replace=False))]
        ensure_threads()
        train_index(self.index, vectors, self.seed)
        self._dirty = True

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors; they get ids ``ntotal .. ntotal + n - 1``. An mmapped index is first re-read into RAM."""
        vectors = self._check_vectors(vectors, "vectors to add")
        if self.needs_training:
            raise RetrolmError(f"{self._name()}: the {self.kind} index must be trained before vectors are added")
        if len(vectors) == 0:
            return
        self._make_writable()
        ensure_threads()
        self._drop_direct_map()  # stale after an add; rebuilt by the next reconstruct()
        self.index.add(vectors)
        self._dirty = True

    def _make_writable(self) -> None:
        # FAISS aborts the process (not an exception) when it resizes an mmapped array: re-read the file instead
        if not self._mmapped:
            return
        assert self._path is not None
        logger.debug("%s: re-reading the memory-mapped index into RAM to modify it", self._path)
        fresh = type(self).load(self._path, mmap=False)
        if fresh.ntotal != self.ntotal:
            raise RetrolmError(f"{self._path}: index file changed on disk since it was loaded")
        self.index, self._mmapped = fresh.index, False

    # -- searching -----------------------------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None, settings: SearchSettings | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar chunks per query, best first: ``(scores (nq, k) float32, ids (nq, k) int64)``.

        ``exclude`` is a bool mask over ids (True = never return it, e.g. deleted chunks), applied inside FAISS.
        Rows that come back short (few live ids in the visited lists) are searched again with a wider beam,
        so ``k`` results are returned whenever ``k`` live ids exist. Missing results are ``id -1, score -inf``.
        Scores of ``ivfpq`` are PQ estimates of the inner product (typically a few hundredths low), not exact.
        """
        queries = self._check_vectors(queries, "queries")
        if k < 1:
            raise RetrolmError(f"{self._name()}: k={k}, must be >= 1")
        ensure_threads()
        defaults = self.default_settings
        settings = settings or SearchSettings()
        nprobe = settings.nprobe or defaults.nprobe or 1
        ef = max(settings.ef_search or defaults.ef_search or DEFAULT_EF_SEARCH, k)
        k_factor = settings.k_factor or defaults.k_factor

        keep: list = []
        sel = None
        n_live = self.ntotal
        if exclude is not None:
            allowed, n_live = self._allowed_bitmap(exclude)
            # FAISS keeps a raw pointer to the bitmap: `keep` holds it (and every params object) until the search ends
            sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(allowed))
            keep += [allowed, sel]

        scores, ids = self._search_once(queries, k, sel, nprobe, ef, keep, k_factor)
        want = min(k, n_live)
        short = np.flatnonzero((ids >= 0).sum(1) < want)
        nlist = self.nlist or 0
        while len(short) and self.kind != "flat" and (nprobe < nlist or ef < self.ntotal):
            nprobe, ef = min(nprobe * 4, max(nlist, 1)), min(ef * 4, max(self.ntotal, k))
            scores[short], ids[short] = self._search_once(queries[short], k, sel, nprobe, ef, keep, k_factor)
            short = short[(ids[short] >= 0).sum(1) < want]
        scores[ids < 0] = -np.inf
        return scores, ids

    def _allowed_bitmap(self, exclude: np.ndarray) -> tuple[np.ndarray, int]:
        """Packed bitmap of the ids that MAY be returned (== IDSelectorNot of the excluded), and their count.

        Bit ``i % 8`` of byte ``i // 8``, least significant first (FAISS's IDSelectorBitmap layout). Packing 10M
        ids costs ~2 ms, so the result is cached for a read-only mask (e.g. ``np.load(..., mmap_mode="r")``),
        which cannot change behind our back; a writable mask is re-packed on every call.
        """
        cached = self._bitmap_cache
        if cached is not None and cached[0]() is exclude and len(exclude) == self.ntotal:
            return cached[1], cached[2]
        mask = np.asarray(exclude, dtype=bool)
        if mask.shape != (self.ntotal,):
            raise RetrolmError(f"{self._name()}: exclude mask has shape {mask.shape}, expected ({self.ntotal},)")
        allowed = np.packbits(mask, bitorder="little")
        np.invert(allowed, out=allowed)  # padding bits past ntotal become 1: harmless, those ids do not exist
        n_live = self.ntotal - int(np.count_nonzero(mask))
        if isinstance(exclude, np.ndarray) and not exclude.flags.writeable:
            self._bitmap_cache = (weakref.ref(exclude), allowed, n_live)
        return allowed, n_live

    def _search_once(
        self, queries: np.ndarray, k: int, sel: faiss.IDSelector | None, nprobe: int, ef: int, keep: list,
        k_factor: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        params = _search_params(self.index, sel, nprobe, ef, keep, k_factor)
        scores, ids = self.index.search(queries, k, params=params)
        return scores, ids

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors for ``ids`` (n, dim): exact for flat/hnsw, the PQ approximation for ivfpq, a refine
        stage's copy when there is one (exact for ``RFlat``; see ``stores_exact_keys``)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if len(ids) and (ids.min() < 0 or ids.max() >= self.ntotal):
            raise RetrolmError(f"{self._name()}: ids out of range [0, {self.ntotal})")
        if self.kind == "ivfpq" and _refine_of(self.index) is None:  # a refine stage reconstructs from its own copy
            ivf = faiss.extract_index_ivf(self.index)
            if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan):  # FAISS crashes reading them back
                raise RetrolmError(f"{self._name()}: a fast-scan index ({self.factory}) cannot give its vectors back; "
                                   "build the database with a refine stage (e.g. '...fs,RFlat') to compact it")
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                # an id → (list, offset) table: 8 B per vector in RAM, never saved (save() drops it)
                ivf.make_direct_map(True)
        return self.index.reconstruct_batch(ids)

    def _drop_direct_map(self) -> None:
        if self.kind == "ivfpq":
            ivf = faiss.extract_index_ivf(self.index)
            if ivf.direct_map.type != faiss.DirectMap.NoMap:
                ivf.make_direct_map(False)

    def _writable_view(self) -> faiss.Index:
        self._drop_direct_map()  # would add 8 B per vector to the file
        return self.index

    # -- persistence ---------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the index atomically (temporary file in the same folder, fsync, rename)."""
        path = Path(path)
        index = self._writable_view()
        try:
            # Written through Python's file object, not FAISS's own: FAISS only prints an error when the final flush
            # fails (a full disk), and a truncated index would be renamed into place.
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        except RuntimeError as e:
            raise RetrolmError(f"{path}: cannot write FAISS index ({_faiss_reason(e)})") from None
        if not self._mmapped:  # an mmapped index stays tied to its original file (same content)
            self._path = path
        self._dirty = False

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True, seed: int = 0) -> VectorIndex:
        """Read an index file; with ``mmap`` its arrays are memory-mapped read-only where FAISS supports it.

        ``IO_FLAG_MMAP_IFC`` maps the flat codes of Flat, HNSW (vectors and graph) and IVF-PQ (inverted lists)
        indexes, so a 10M-chunk index opens instantly and pages in on demand; other structures are read into
        RAM. ``add`` on a mapped index transparently re-reads it into RAM first.
        """
        ensure_threads()
        path = Path(path)
        if not path.is_file():
            raise RetrolmError(f"{path}: corrupt or unreadable FAISS index (no such file)")
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except (RuntimeError, MemoryError) as e:
            if not mmap:
                raise RetrolmError(f"{path}: corrupt or unreadable FAISS index ({_faiss_reason(e)})") from None
            logger.debug("%s: memory-mapped read failed (%s); reading into RAM", path, _faiss_reason(e))
            return cls.load(path, mmap=False, seed=seed)
        kind = _kind_of(index)
        if kind is None:
            raise RetrolmError(f"{path}: unsupported FAISS index type {type(faiss.downcast_index(index)).__name__}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise RetrolmError(f"{path}: FAISS index uses metric {index.metric_type}, not inner product")
        obj = cls(index, kind, _factory_of(index), seed=seed, path=path)
        obj._mmapped = bool(mmap)
        return obj


__all__ = [
    "AUTO_FLAT_MAX_VECTORS",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_K_FACTOR",
    "DEFAULT_NPROBE",
    "INDEX_KINDS",
    "SearchSettings",
    "VectorIndex",
    "default_factory",
    "default_nlist",
    "resolve_kind",
    "set_num_threads",
]
