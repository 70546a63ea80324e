"""Exact dense search on a torch device: inner-product top-k by matrix multiply against the database's stored keys.

For precomputing RETRO's training and evaluation neighbours on a GPU, where the host FAISS path is most of a run's
time. The keys (``n_chunks × dim``) are copied once to the device (fp32 on CPU, fp16 by default on CUDA: 7.7 GB for
10M 384-d keys); queries are scored in blocks of ``query_chunk`` against blocks of ``key_chunk`` keys, and a
running top-k is merged block by block, so memory stays ``query_chunk × key_chunk`` scores whatever the database size.

Exclusions are the FAISS path's: the bool chunk mask (deleted chunks included) is applied to the scores (``-inf``)
before the top-k, and per-query document exclusions are exact in one pass: a query that may not retrieve documents
``D`` fetches ``k + (chunks of D)`` results, which always leaves ``k`` allowed ones when that many exist, and is
filtered exactly like :meth:`Retriever._search_excluding_docs` (best allowed first, ``-1`` / ``-inf`` padding).

Results equal FAISS flat search in fp32 up to the order of exact ties (and, in fp16/bf16, of near ties).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from retrolm.core.errors import RetrolmError
from retrolm.db import DatabaseView
from retrolm.retrieval.dense import DenseRetriever

DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None → CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RetrolmError(f"exact search device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RetrolmError(f"exact search device {device}: CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/None → fp16 on CUDA, fp32 elsewhere (CPU half-precision matmul is slow and imprecise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise RetrolmError(f"exact search dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype] or (torch.float16 if device.type == "cuda" else torch.float32)


def load_keys(db: DatabaseView, device: torch.device, dtype: torch.dtype, block: int = 1 << 20) -> torch.Tensor:
    """The database's stored keys ``(n_chunks, dim)`` on ``device``, copied from the index in host blocks."""
    index = db.index
    if not index.stores_exact_keys:
        raise RetrolmError(
            f"{db.path}: exact torch search needs the exact keys, but its {index.kind} index ({index.factory}) stores "
            "only compressed codes; rebuild with --index flat (or hnsw, or a factory ending in RFlat), or pass the "
            "keys (n_chunks, dim) explicitly"
        )
    n = index.ntotal
    keys = torch.empty((n, index.dim), dtype=dtype, device=device)
    for start in range(0, n, block):
        ids = np.arange(start, min(start + block, n))
        keys[start : start + len(ids)] = torch.from_numpy(index.reconstruct(ids)).to(device=device, dtype=dtype)
    return keys


@torch.no_grad()
def topk_inner_product(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    key_chunk: int = 1 << 18,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` keys by inner product per query row, best first: ``(scores float32, ids int64)``, both ``(nq, k)``.

    ``exclude`` (bool, one per key, on the keys' device) is never returned. Where fewer than ``k`` keys are allowed the
    row ends with ``id -1, score -inf``. Scores are computed in the keys' dtype and returned as float32.
    """
    nq, n = len(queries), len(keys)
    k_eff = min(k, n)
    best_s = torch.full((nq, k_eff), -torch.inf, dtype=torch.float32, device=keys.device)
    best_i = torch.full((nq, k_eff), -1, dtype=torch.int64, device=keys.device)
    queries = queries.to(keys.dtype)
    for start in range(0, n, key_chunk):
        block = keys[start : start + key_chunk]
        scores = queries @ block.T  # in the keys' dtype: a (query_chunk, key_chunk) fp16 block on CUDA
        if exclude is not None:
            scores.masked_fill_(exclude[start : start + len(block)], -torch.inf)
        s, i = torch.topk(scores, min(k_eff, len(block)), dim=1)
        s = s.float()
        # running best first: at equal scores the earlier (lower) id stays ahead, as in FAISS's flat scan
        s, order = torch.sort(torch.cat([best_s, s], 1), dim=1, descending=True, stable=True)
        i = torch.gather(torch.cat([best_i, i + start], 1), 1, order)
        best_s, best_i = s[:, :k_eff].contiguous(), i[:, :k_eff].contiguous()
    best_i[torch.isneginf(best_s)] = -1
    if k_eff < k:
        best_s = torch.cat([best_s, best_s.new_full((nq, k - k_eff), -torch.inf)], 1)
        best_i = torch.cat([best_i, best_i.new_full((nq, k - k_eff), -1)], 1)
    return best_s, best_i


def _chunk_set(db: DatabaseView) -> tuple:
    """What identifies a database's chunk ids: its build and its segments (a rebuild reuses the segment names)."""
    return db.meta.get("build_id"), tuple(db.meta["segments"])


class ExactRetriever(DenseRetriever):
    """Dense retrieval by exact inner product on a torch device (the database's own encoder embeds text queries).

    Args:
        db: the database; its index must hold the exact keys (flat / hnsw / ``RFlat`` refine) unless ``keys`` is given.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"float32"``, ``"float16"``, ``"bfloat16"``.
        key_chunk: keys scored per matrix multiply (memory: ``query_chunk × key_chunk`` fp32 scores).
        query_chunk: queries per matrix multiply.
        keys: explicit ``(n_chunks, dim)`` keys (e.g. re-encoded chunks of an IVF-PQ database) instead of the index's.
        batch_size: queries per encoder forward pass (text queries).
    """

    name = "exact"

    def __init__(
        self,
        db: DatabaseView,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        key_chunk: int = 1 << 18,
        query_chunk: int = 4096,
        keys: np.ndarray | torch.Tensor | None = None,
        batch_size: int = 128,
    ) -> None:
        super().__init__(db, batch_size=batch_size)
        if key_chunk < 1 or query_chunk < 1:
            raise RetrolmError(f"exact search key_chunk={key_chunk} and query_chunk={query_chunk} must be >= 1")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.key_chunk, self.query_chunk = key_chunk, query_chunk
        n = db.store.n_chunks
        if keys is None:
            self.keys = load_keys(db, self.device, self.dtype)
        else:
            keys = torch.as_tensor(keys)
            if keys.shape != (n, db.index.dim):
                raise RetrolmError(f"exact search keys have shape {tuple(keys.shape)}, expected ({n}, {db.index.dim})")
            self.keys = keys.to(device=self.device, dtype=self.dtype)
        if len(self.keys) != n:
            raise RetrolmError(f"{db.path}: the index holds {len(self.keys)} keys for {n} chunks")
        self._doc_chunks: np.ndarray | None = None
        self._loaded_for = _chunk_set(db)  # the chunk set the keys were loaded for

    def _check_fresh(self) -> None:
        # keys are a snapshot: an add, a compaction or a rebuild since would leave chunks unfindable or renumbered
        if _chunk_set(self.db) != self._loaded_for:
            raise RetrolmError(f"{self.db.path}: chunks were added or renumbered since this exact retriever loaded its "
                               "keys; make a new one")

    def _device_mask(self, mask: np.ndarray | None) -> torch.Tensor | None:
        return None if mask is None else torch.from_numpy(np.asarray(mask, dtype=bool)).to(self.device)

    def _top(self, queries: np.ndarray, k: int, mask: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        s, i = topk_inner_product(q, self.keys, k, mask, self.key_chunk)
        s, i = s.cpu().numpy(), i.cpu().numpy()
        blank = ~queries.any(axis=1)  # a blank query retrieves nothing (as in DenseRetriever)
        i[blank], s[blank] = -1, -np.inf
        return s, i

    def _search(self, queries: np.ndarray, k: int, exclude_chunks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        self._check_fresh()
        mask = self._device_mask(exclude_chunks)
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        for start in range(0, nq, self.query_chunk):
            rows = slice(start, start + self.query_chunk)
            scores[rows], ids[rows] = self._top(queries[rows], k, mask)
        return scores, ids

    def _search_excluding_docs(self, queries: np.ndarray, k: int, mask: np.ndarray | None,
                               docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """One pass: each query fetches ``k`` plus the chunk count of its excluded documents, then filters them."""
        self._check_fresh()
        store = self.db.store
        n = store.n_chunks
        if self._doc_chunks is None:
            self._doc_chunks = np.bincount(store.all_chunk_docs())
        counts = self._doc_chunks
        banned = np.array([sum(int(counts[d]) for d in set(map(int, ds)) if 0 <= d < len(counts)) for ds in docs])
        fetch = np.minimum(k + banned, n)
        device_mask = self._device_mask(mask)
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        order = np.argsort(fetch, kind="stable")  # queries with similar fetch sizes together
        for start in range(0, nq, self.query_chunk):
            rows = order[start : start + self.query_chunk]
            s, i = self._top(queries[rows], int(fetch[rows].max()), device_mask)
            chunk_docs = np.where(i >= 0, store.chunk_doc(np.maximum(i, 0)), -1)
            for row, q in enumerate(rows):
                keep = (i[row] >= 0) & ~np.isin(chunk_docs[row], np.asarray(docs[q]))
                take = np.flatnonzero(keep)[:k]
                scores[q, : len(take)], ids[q, : len(take)] = s[row, take], i[row, take]
        return scores, ids
