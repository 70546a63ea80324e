"""A refine stage after IVF-PQ (``...,RFlat`` / ``...,Refine(SQfp16)``): exact re-ranking of ``k_factor * k``
candidates lifts 10-recall@10, ``k_factor`` is a search setting stored in the index, and exclusions still apply."""

from __future__ import annotations

import numpy as np
import pytest

from retrolm.core.errors import RetrolmError
from retrolm.db.index import DEFAULT_K_FACTOR, SearchSettings, VectorIndex

D, N, NQ = 32, 8000, 100


@pytest.fixture(scope="module")
def clustered():
    """Unit vectors around 40 centres, and queries near database vectors: many close competitors per query."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, D))
    x = centres[rng.integers(0, 40, N)] + 0.5 * rng.standard_normal((N, D))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[rng.choice(N, NQ, replace=False)] + 0.1 * rng.standard_normal((NQ, D))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return x, q


def exact_top(x, q, k, mask=None):
    scores = q @ x.T
    if mask is not None:
        scores[:, mask] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(ids, truth):
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth, strict=True)]))


def build(factory, x):
    index = VectorIndex.create(D, factory=factory)
    index.train(x)
    index.add(x)
    return index


@pytest.fixture(scope="module")
def indexes(clustered):
    x, _ = clustered
    return {f: build(f, x) for f in ("IVF32,PQ8", "IVF32,PQ8,RFlat", "IVF32,PQ8,Refine(SQfp16)")}


def test_refine_lifts_ten_recall_at_ten(clustered, indexes):
    x, q = clustered
    truth = exact_top(x, q, 10)
    plain = indexes["IVF32,PQ8"]
    assert not plain.has_refine and plain.default_settings.k_factor is None and plain.refine_nbytes == 0
    settings = SearchSettings(nprobe=32)  # every list: what is left is the PQ ranking error
    base = recall(plain.search(q, 10, settings=settings)[1], truth)
    assert base < 0.8
    for factory in ("IVF32,PQ8,RFlat", "IVF32,PQ8,Refine(SQfp16)"):
        index = indexes[factory]
        assert index.kind == "ivfpq" and index.has_refine
        assert index.default_settings.k_factor == DEFAULT_K_FACTOR >= 4
        stored = recall(index.search(q, 10, settings=settings)[1], truth)  # the stored k_factor
        one = recall(index.search(q, 10, settings=SearchSettings(nprobe=32, k_factor=1))[1], truth)
        four = recall(index.search(q, 10, settings=SearchSettings(nprobe=32, k_factor=4))[1], truth)
        many = recall(index.search(q, 10, settings=SearchSettings(nprobe=32, k_factor=16))[1], truth)
        assert one == pytest.approx(base, abs=0.02), factory  # k_factor 1 only re-orders the same shortlist
        assert four == stored and four >= 0.9 and four > base + 0.15, factory
        assert many >= four and many >= 0.97, factory
    # exact re-ranking: the refined scores are the true inner products (RFlat)
    scores, ids = indexes["IVF32,PQ8,RFlat"].search(q, 10, settings=SearchSettings(nprobe=32, k_factor=16))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, ids, 1), rtol=1e-5, atol=1e-6)


def test_refine_stage_cost_per_chunk(indexes):
    plain, flat, fp16 = (indexes[f] for f in ("IVF32,PQ8", "IVF32,PQ8,RFlat", "IVF32,PQ8,Refine(SQfp16)"))
    extra_flat = (flat.nbytes_on_disk - plain.nbytes_on_disk) / N
    extra_fp16 = (fp16.nbytes_on_disk - plain.nbytes_on_disk) / N
    assert extra_flat == pytest.approx(4 * D, abs=1) and flat.refine_nbytes / N == pytest.approx(4 * D, abs=1)
    assert extra_fp16 == pytest.approx(2 * D, abs=1) and fp16.refine_nbytes / N == pytest.approx(2 * D, abs=1)
    assert flat.stores_exact_keys and not fp16.stores_exact_keys and not plain.stores_exact_keys


def test_exclusion_masks_still_apply_with_refine(clustered, indexes):
    x, q = clustered
    index = indexes["IVF32,PQ8,RFlat"]
    mask = np.zeros(N, dtype=bool)
    mask[::3] = True
    mask[exact_top(x, q, 5).ravel()] = True  # every query's true top-5 is excluded
    scores, ids = index.search(q, 10, exclude=mask, settings=SearchSettings(nprobe=32, k_factor=8))
    assert (ids >= 0).all() and not mask[ids].any()
    assert recall(ids, exact_top(x, q, 10, mask)) >= 0.9
    only = np.ones(N, dtype=bool)
    only[[5, 17, 300]] = False  # fewer live chunks than k: the refine stage pads with missing results
    scores, ids = index.search(q[:3], 10, exclude=only, settings=SearchSettings(k_factor=4))
    assert sorted(ids[0, :3].tolist()) == [5, 17, 300] and (ids[:, 3:] == -1).all()
    assert np.isneginf(scores[:, 3:]).all()


def test_k_factor_is_saved_and_checked(clustered, indexes, tmp_path):
    x, q = clustered
    index = indexes["IVF32,PQ8,Refine(SQfp16)"]
    index.save(tmp_path / "r.index")
    loaded = VectorIndex.load(tmp_path / "r.index")
    assert loaded.has_refine and loaded.kind == "ivfpq" and loaded.factory.endswith("Refine(SQfp16)")
    assert loaded.default_settings == index.default_settings
    np.testing.assert_array_equal(loaded.search(q, 10)[1], index.search(q, 10)[1])
    with pytest.raises(RetrolmError, match=r"search setting k_factor=0\.5: must be >= 1"):
        SearchSettings(k_factor=0.5)
    flat = VectorIndex.create(D, factory="IVF32,PQ8,RFlat")
    np.testing.assert_array_equal(indexes["IVF32,PQ8,RFlat"].reconstruct(np.arange(4)), x[:4])  # the exact copy
    assert flat.default_settings.k_factor == DEFAULT_K_FACTOR


@pytest.mark.parametrize("factory", ["IVF32,PQ8,RFlat", "IVF32,PQ8,Refine(SQfp16)", "OPQ8,IVF32_HNSW16,PQ8,Refine(SQ8)",
                                     "HNSW16,Flat,RFlat"])
def test_a_loaded_refine_index_names_its_factory(clustered, factory, tmp_path):
    """FAISS saves the structure, not the string; a refine stage was named "IndexRefine", which compaction (it makes
    the index again from that name) could not parse: compacting a refined database always failed."""
    x, _ = clustered
    path = tmp_path / "index.faiss"
    build(factory, x[:2000]).save(path)
    loaded = VectorIndex.load(path)
    again = VectorIndex.create(D, factory=loaded.factory)  # what compaction does with it
    assert ("RFlat" in factory) == loaded.factory.endswith(",RFlat") and again.kind == loaded.kind
    assert type(again.index) is type(loaded.index)
    if "Refine(" in factory:
        assert loaded.factory.endswith(factory[factory.index(",Refine("):])
