"""Exact neighbour search on a torch device (CPU here): same results and exclusions as the FAISS flat path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from retrolm.core.errors import RetrolmError
from retrolm.retrieval import DenseRetriever, ExactRetriever, Exclusion
from retrolm.retrieval.exact import load_keys, resolve_dtype, topk_inner_product
from retrolm.retrieval.neighbours import NeighbourConfig, compute_neighbours


def test_topk_merges_key_chunks_and_masks_like_a_full_sort():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((103, 8)).astype(np.float32)
    queries = rng.standard_normal((9, 8)).astype(np.float32)
    mask = rng.random(103) < 0.3
    full = queries @ keys.T
    full[:, mask] = -np.inf
    want = np.argsort(-full, axis=1, kind="stable")[:, :5]
    for chunk in (1, 7, 50, 103, 1000):
        s, i = topk_inner_product(torch.from_numpy(queries), torch.from_numpy(keys), 5, torch.from_numpy(mask), chunk)
        assert s.dtype == torch.float32 and i.dtype == torch.int64 and i.shape == (9, 5)
        np.testing.assert_array_equal(i.numpy(), want, err_msg=f"key_chunk={chunk}")
        np.testing.assert_allclose(s.numpy(), np.take_along_axis(full, want, 1), rtol=1e-5, atol=1e-6)
    assert not np.isin(i.numpy(), np.flatnonzero(mask)).any()


def test_topk_pads_with_missing_when_fewer_keys_are_allowed():
    keys = torch.eye(4)
    mask = torch.tensor([False, True, True, False])
    s, i = topk_inner_product(torch.tensor([[1.0, 0, 0, 0.5]]), keys, 6, mask, key_chunk=3)
    assert i.tolist() == [[0, 3, -1, -1, -1, -1]]
    assert s[0, :2].tolist() == [1.0, 0.5] and torch.isneginf(s[0, 2:]).all()
    s, i = topk_inner_product(torch.ones(2, 4), keys, 2, torch.ones(4, dtype=torch.bool), key_chunk=2)
    assert (i == -1).all() and torch.isneginf(s).all()


def assert_same_ranking(got, want, queries: np.ndarray, keys: np.ndarray, tol: float = 1e-5) -> None:
    """Same ranking up to the order of near-tied keys: where two keys score within float rounding of each other, the
    summation order of the matrix multiply (BLAS kernel, CPU) decides which comes first, in FAISS as in torch."""
    np.testing.assert_allclose(got.scores, want.scores, rtol=tol, atol=1e-6)
    np.testing.assert_array_equal(got.ids == -1, want.ids == -1)
    rows, cols = np.nonzero(got.ids != want.ids)
    true = np.einsum("ij,ij->i", queries[rows], keys[got.ids[rows, cols]])  # what the swapped-in key really scores
    np.testing.assert_allclose(true, want.scores[rows, cols], rtol=tol, atol=1e-6)
    assert len(rows) <= 0.01 * got.ids.size, f"{len(rows)} of {got.ids.size} ranks differ"
    for g in got.ids:
        assert len(set(g[g >= 0].tolist())) == int((g >= 0).sum())  # no key twice


def assert_same_neighbours(got: np.ndarray, want: np.ndarray, keys: np.ndarray) -> None:
    """``assert_same_ranking`` for neighbour id arrays of the database's own chunks (each chunk's query is its key)."""

    def scored(ids: np.ndarray) -> SimpleNamespace:
        scores = np.einsum("nd,nkd->nk", keys, keys[np.maximum(ids, 0)])
        return SimpleNamespace(ids=ids, scores=np.where(ids >= 0, scores, -np.inf))

    assert_same_ranking(scored(got), scored(want), keys, keys)


@pytest.fixture(scope="module")
def exact(built_db):
    return ExactRetriever(built_db, device="cpu", key_chunk=16, query_chunk=5)


def test_exact_search_equals_faiss_flat_with_every_exclusion(built_db, exact):
    assert built_db.index.kind == "flat" and exact.key_chunk < built_db.store.n_chunks
    assert exact.keys.dtype == torch.float32 and exact.keys.device.type == "cpu"
    n = built_db.store.n_chunks
    queries = built_db.index.reconstruct(np.arange(0, n, 3))
    queries[1] = 0  # a blank query retrieves nothing, as in the FAISS path
    dense = DenseRetriever(built_db)
    keys = built_db.index.reconstruct(np.arange(n))
    docs = built_db.store.all_chunk_docs()
    mask = docs % 5 == 1
    per_query = [[int(docs[c]), int(docs[c]) + 1] for c in range(0, n, 3)]
    for ex in (None, Exclusion(chunks=mask), Exclusion(docs=per_query), Exclusion(chunks=mask, docs=per_query)):
        for k in (1, 4, n + 3):
            want, got = dense.search(queries, k, ex), exact.search(queries, k, ex)
            assert_same_ranking(got, want, queries, keys)
            if ex is not None and ex.chunks is not None:
                assert not mask[got.ids[got.ids >= 0]].any()
            if ex is not None and ex.docs is not None:
                for row, banned in zip(got.ids, per_query, strict=True):
                    assert not np.isin(docs[row[row >= 0]], banned).any()
    assert (exact.search(queries, 3).ids[1] == -1).all()


@pytest.mark.parametrize("rule", ["none", "document", "sequence"])
def test_torch_neighbours_equal_faiss_neighbours(built_db, rule):
    base = dict(k=3, exclude=rule, seq_chunks=4, batch_size=7)
    want = compute_neighbours(DenseRetriever(built_db), config=NeighbourConfig(**base), show_progress=False)
    cfg = NeighbourConfig(**base, search="torch", device="cpu", key_chunk=16)
    assert cfg.key_chunk < built_db.store.n_chunks
    got = compute_neighbours(DenseRetriever(built_db), config=cfg, show_progress=False)
    keys = built_db.index.reconstruct(np.arange(built_db.store.n_chunks))
    assert_same_neighbours(got, want, keys)
    docs = built_db.store.all_chunk_docs()
    if rule != "none":  # the rule itself, checked directly: no chunk retrieves its own document
        assert not (docs[np.maximum(got, 0)] == docs[:, None])[got >= 0].any()
    mask = docs % 4 == 2  # a chunk mask on top of the rule
    want = compute_neighbours(DenseRetriever(built_db), config=NeighbourConfig(**base), show_progress=False,
                              exclude_chunks=mask)
    got = compute_neighbours(DenseRetriever(built_db), config=cfg, show_progress=False, exclude_chunks=mask)
    assert_same_neighbours(got, want, keys)
    assert not mask[got[got >= 0]].any()


def test_deleted_chunks_are_never_returned(built_db, exact, monkeypatch):
    n = built_db.store.n_chunks
    deleted = np.zeros(n, dtype=bool)
    deleted[::2] = True
    orig = built_db.exclusion_mask
    monkeypatch.setattr(built_db, "exclusion_mask", lambda chunks=None: deleted if chunks is None else deleted | chunks)
    assert orig() is None  # the test database has no deletions of its own
    queries = built_db.index.reconstruct(np.arange(n))
    res = exact.search(queries, 5, Exclusion(docs=[[0]] * n))
    want = DenseRetriever(built_db).search(queries, 5, Exclusion(docs=[[0]] * n))
    assert_same_ranking(res, want, queries, queries)
    assert (res.ids >= 0).all() and (res.ids % 2 == 1).all()  # k hits, none from an even (deleted) document


def test_exact_search_configuration_errors(built_db, monkeypatch):
    n, dim = built_db.store.n_chunks, built_db.index.dim
    with pytest.raises(RetrolmError, match=r"keys have shape \(3, 4\), expected"):
        ExactRetriever(built_db, device="cpu", keys=np.zeros((3, 4), np.float32))
    keys = built_db.index.reconstruct(np.arange(n))
    r = ExactRetriever(built_db, device="cpu", dtype="bfloat16", keys=keys)
    assert r.keys.dtype == torch.bfloat16
    res = r.search(keys, 3)  # half precision: scores are rounded, the ranking is nearly the fp32 one
    assert res.scores.dtype == np.float32 and np.mean(res.ids[:, 0] == np.arange(n)) >= 0.9
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(RetrolmError, match="dtype must be one of"):
        ExactRetriever(built_db, device="cpu", dtype="int8")
    with pytest.raises(RetrolmError, match="key_chunk=0 and query_chunk=1 must be >= 1"):
        ExactRetriever(built_db, device="cpu", key_chunk=0, query_chunk=1)
    with pytest.raises(RetrolmError, match="neighbour search must be one of faiss, torch, got 'gpu'"):
        NeighbourConfig(search="gpu")
    with pytest.raises(RetrolmError, match="neighbour key_chunk must be positive"):
        NeighbourConfig(key_chunk=0)
    if not torch.cuda.is_available():
        with pytest.raises(RetrolmError, match="CUDA is not available"):
            ExactRetriever(built_db, device="cuda")
    monkeypatch.setattr(built_db.index, "kind", "ivfpq")  # as an IVF-PQ index (approximate keys) would be
    monkeypatch.setattr(type(built_db.index), "stores_exact_keys", property(lambda self: False))
    with pytest.raises(RetrolmError, match=r"^\S+: exact torch search needs the exact keys, but its ivfpq index"):
        load_keys(built_db, torch.device("cpu"), torch.float32)
    assert dim == r.keys.shape[1]
    # its keys are a snapshot of the chunks: after an add or a compaction it refuses to answer for the old ones
    segments = built_db.meta["segments"]
    monkeypatch.setitem(built_db.meta, "segments", [*segments, "seg-999999"])
    for exclusion in (None, Exclusion(docs=[[0]] * 2)):
        with pytest.raises(RetrolmError, match="added or renumbered since this exact retriever loaded its keys"):
            r.search(keys[:2], 3, exclusion)
    monkeypatch.setitem(built_db.meta, "segments", segments)
    assert r.search(keys[:2], 3).ids[:, 0].tolist() == [0, 1]
    monkeypatch.setitem(built_db.meta, "build_id", "a rebuild")  # same segment names, other chunks
    with pytest.raises(RetrolmError, match="added or renumbered"):
        r.search(keys[:2], 3)


def test_torch_search_refuses_a_retriever_without_dense_keys(built_db):
    from retrolm.retrieval.base import Retriever

    class Lexical(Retriever):
        name = "bm25"

        def _search(self, queries, k, exclude_chunks):
            raise AssertionError("never searched")

    with pytest.raises(RetrolmError, match="neighbour search 'torch' is exact dense search; the bm25 retriever"):
        compute_neighbours(Lexical(built_db), config=NeighbourConfig(search="torch", device="cpu"),
                           show_progress=False)
