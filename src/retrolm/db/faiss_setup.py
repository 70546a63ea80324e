"""How a FAISS index is chosen and trained for a retrieval database: the kind and factory string for a database
size, FAISS's thread count, and training stage by stage with every random choice seeded (used by
:class:`~retrolm.db.index.VectorIndex`)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import faiss
import numpy as np

from retrolm.core.device import usable_cpus
from retrolm.core.errors import RetrolmError

INDEX_KINDS = ("auto", "flat", "ivfpq", "hnsw")

AUTO_FLAT_MAX_VECTORS = 250_000
"""``auto`` picks exact search up to this many chunks, ``ivfpq`` above. At 250k 384-d chunks a flat index is
384 MB and answers a single query in ~10 ms on one core; IVF-PQ needs ~10k+ vectors to train at all and
pays for its training only on larger databases (see benchmarks/RESULTS.md)."""


HNSW_M = 32  # graph degree for both the hnsw kind and the IVF coarse quantizer
TRAIN_POINTS_PER_CENTROID = 32  # k-means sample per IVF list: enough for stable centroids, cheap on 2 cores
MAX_TRAIN_POINTS_PER_CENTROID = 64  # larger training sets are subsampled (k-means cost is linear in them)
PQ_TRAIN_POINTS = 256 * 40  # 8-bit PQ / OPQ: ~40 points per sub-quantizer centroid
TWO_LEVEL_KMEANS_MIN_NLIST = 8192  # from here on, k-means in two levels (sqrt(nlist) x sqrt(nlist)): ~50x cheaper

_FAISS_THREADS_SET = False


# ---------------------------------------------------------------------------------------------------------------
# Choosing an index


def resolve_kind(kind: str, n_vectors: int) -> str:
    """Turn ``"auto"`` into a concrete kind: ``"flat"`` up to ``AUTO_FLAT_MAX_VECTORS`` chunks, ``"ivfpq"`` above."""
    if kind not in INDEX_KINDS:
        raise RetrolmError(f"index kind {kind!r}: unknown (choose from {', '.join(INDEX_KINDS)})")
    if kind != "auto":
        return kind
    return "flat" if n_vectors <= AUTO_FLAT_MAX_VECTORS else "ivfpq"


def default_nlist(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors``: the power of two nearest ``4 * sqrt(n)``, with >= 32 training points each.

    1M → 4096, 3M → 8192, 10M → 16384, 100M → 65536.
    """
    target = 4 * math.sqrt(max(n_vectors, 1))
    nlist = 2 ** round(math.log2(target))
    cap = max(n_vectors // TRAIN_POINTS_PER_CENTROID, 1)
    while nlist > cap and nlist > 8:
        nlist //= 2
    return int(min(max(nlist, 8), 65536))


def default_pq_bytes(dim: int) -> int:
    """PQ code size: the largest divisor of ``dim`` that is <= ``dim / 8`` (one byte per 8 dimensions; 48 for 384)."""
    return max(m for m in range(1, dim // 8 + 1) if dim % m == 0) if dim >= 8 else 1


def default_factory(kind: str, dim: int, n_vectors: int) -> str:
    """The ``faiss.index_factory`` string used for ``kind`` (``"auto"`` is resolved first) at this database size."""
    kind = resolve_kind(kind, n_vectors)
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M},Flat"
    m = default_pq_bytes(dim)
    # OPQ rotates the space so that each PQ sub-vector carries a similar share of the variance: +0.1-0.15
    # recall@10 on clustered embeddings for no extra bytes (benchmarks/RESULTS.md).
    return f"OPQ{m},IVF{default_nlist(n_vectors)}_HNSW{HNSW_M},PQ{m}"


# ---------------------------------------------------------------------------------------------------------------
# Threads


def set_num_threads(n: int | None = None) -> None:
    """Set FAISS's OpenMP thread count (default: ``OMP_NUM_THREADS``, else the CPUs this process may run on).

    Torch sizes its own pool the same way, so the two do not oversubscribe each other when they run in turn;
    a caller running an encoder and searches concurrently should give each half.
    """
    global _FAISS_THREADS_SET
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        n = int(env) if env.isdigit() and int(env) > 0 else usable_cpus()
    faiss.omp_set_num_threads(max(int(n), 1))
    _FAISS_THREADS_SET = True


def ensure_threads() -> None:
    """Size FAISS's thread pool once, before the first FAISS call (``set_num_threads`` defaults)."""
    if not _FAISS_THREADS_SET:
        set_num_threads()


@contextlib.contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# Training, stage by stage


def train_index(index: faiss.Index, x: np.ndarray, seed: int) -> None:
    """Train stage by stage so that every random choice is seeded and the coarse k-means is exact (BLAS)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            vt.train(x)
            x = vt.apply(x)
        train_index(index.index, x, seed)
        index.is_trained = True
    elif isinstance(index, faiss.IndexRefine):
        train_index(index.base_index, x, seed)
        index.refine_index.train(x)
        index.is_trained = True
    elif isinstance(index, faiss.IndexIVF):
        _train_coarse(index, x, seed)
        if hasattr(index, "pq"):
            index.pq.cp.seed = seed
        if isinstance(index, faiss.IndexIVFPQ):
            # polysemous training reorders PQ centroids for Hamming pre-filtering, which search never uses
            # (polysemous_ht = 0); it was ~95% of training time and changes no distance
            index.do_polysemous_training = False
        index.train(x)  # the quantizer is trained, so this trains only the residual encoder
    else:
        index.train(x)


def _train_coarse(ivf: faiss.IndexIVF, x: np.ndarray, seed: int) -> None:
    nlist = int(ivf.nlist)
    # spherical k-means: unit-norm centroids, so the coarse max-inner-product matches cosine similarity
    # (min_points_per_centroid only silences FAISS's stderr warning; train() logs its own)
    kw = dict(seed=seed, spherical=True, min_points_per_centroid=8)
    if nlist >= TWO_LEVEL_KMEANS_MIN_NLIST:
        from faiss.contrib.clustering import two_level_clustering

        centroids, _ = two_level_clustering(x, int(math.sqrt(nlist)), nlist, clustering_niter=10, **kw)
    else:
        km = faiss.Kmeans(x.shape[1], nlist, niter=10, max_points_per_centroid=MAX_TRAIN_POINTS_PER_CENTROID, **kw)
        km.train(x)
        centroids = km.centroids
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    quantizer = faiss.downcast_index(ivf.quantizer)
    quantizer.reset()
    if isinstance(quantizer, faiss.IndexHNSW):
        with _omp_threads(1):  # a parallel HNSW build depends on thread timing; one thread is deterministic
            quantizer.add(centroids)
    else:
        quantizer.add(centroids)
    quantizer.is_trained = True
