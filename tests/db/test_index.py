"""Behaviour of retrolm.index on small clustered data: exactness, recall, exclusion, ids, persistence, errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from retrolm.core.errors import RetrolmError
from retrolm.db.index import (
    AUTO_FLAT_MAX_VECTORS,
    DEFAULT_NPROBE,
    SearchSettings,
    VectorIndex,
    default_factory,
    default_nlist,
    resolve_kind,
)

DIM = 32
N = 4000
# PQ32 on 32-d (one byte per dimension) is fine enough that recall measures the IVF/HNSW search, not quantisation
# noise (PQ16 caps recall@10 at ~0.87 on this data)
IVF_FACTORY = "IVF32_HNSW32,PQ32"


def clustered(n: int, dim: int = DIM, n_centres: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``n_centres`` random centres: enough structure for quantisers, like embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim))
    x = centres[rng.integers(0, n_centres, n)] + 0.5 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def perturbed(x: np.ndarray, seed: int = 1) -> np.ndarray:
    q = x + 0.1 * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(ids, truth, strict=True)]))


def build(kind: str, x: np.ndarray, factory: str | None = None, seed: int = 0) -> VectorIndex:
    index = VectorIndex.create(x.shape[1], kind, n_vectors=len(x), factory=factory, seed=seed)
    if index.needs_training:
        index.train(x)
    index.add(x)
    return index


@pytest.fixture(scope="session")
def data() -> np.ndarray:
    return clustered(N)


@pytest.fixture(scope="session")
def queries(data: np.ndarray) -> np.ndarray:
    return perturbed(data[:200])


@pytest.fixture(scope="session")
def truth(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    _, ids = build("flat", data).search(queries, 10)
    return ids


@pytest.fixture(scope="session")
def indexes(data: np.ndarray) -> dict[str, VectorIndex]:
    """One built index per kind, shared by the read-only tests."""
    return {"flat": build("flat", data), "ivfpq": build("ivfpq", data, IVF_FACTORY), "hnsw": build("hnsw", data)}


# -- choosing an index -----------------------------------------------------------------------------------------


def test_resolve_kind_thresholds() -> None:
    assert resolve_kind("auto", 0) == "flat"
    assert resolve_kind("auto", AUTO_FLAT_MAX_VECTORS) == "flat"
    assert resolve_kind("auto", AUTO_FLAT_MAX_VECTORS + 1) == "ivfpq"
    for kind in ("flat", "ivfpq", "hnsw"):
        assert resolve_kind(kind, 10**9) == kind
    with pytest.raises(RetrolmError, match="unknown"):
        resolve_kind("annoy", 10)


def test_default_factory_sizes_by_n() -> None:
    assert default_factory("flat", 384, 10**7) == "Flat"
    assert default_factory("hnsw", 384, 10**6) == "HNSW32,Flat"
    assert default_factory("ivfpq", 384, 1_000_000) == "OPQ48,IVF4096_HNSW32,PQ48"
    assert default_factory("ivfpq", 384, 10_000_000) == "OPQ48,IVF16384_HNSW32,PQ48"
    assert default_factory("auto", 384, 1000) == "Flat"
    # small databases get few enough lists that each has >= 32 training points
    assert default_nlist(N) * 32 <= N


def test_factory_decides_kind_under_auto() -> None:
    assert VectorIndex.create(DIM, factory="HNSW16,Flat").kind == "hnsw"
    assert VectorIndex.create(DIM, factory="IVF16,Flat").kind == "ivfpq"
    with pytest.raises(RetrolmError, match="not hnsw"):
        VectorIndex.create(DIM, kind="hnsw", factory="Flat")


# -- searching ---------------------------------------------------------------------------------------------------


def test_exact_search_finds_each_vector_first(indexes: dict[str, VectorIndex], data: np.ndarray) -> None:
    scores, ids = indexes["flat"].search(data[:300], 5)
    np.testing.assert_array_equal(ids[:, 0], np.arange(300))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (300, 5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


@pytest.mark.parametrize(("kind", "min_recall"), [("ivfpq", 0.9), ("hnsw", 0.97)])
def test_approximate_recall(indexes, queries, truth, kind: str, min_recall: float) -> None:
    _, ids = indexes[kind].search(queries, 10)
    assert recall_at_10(ids, truth) >= min_recall


def test_more_nprobe_more_recall(indexes, queries, truth) -> None:
    index = indexes["ivfpq"]
    assert index.default_settings.nprobe == DEFAULT_NPROBE
    low = recall_at_10(index.search(queries, 10, settings=SearchSettings(nprobe=1))[1], truth)
    high = recall_at_10(index.search(queries, 10, settings=SearchSettings(nprobe=32))[1], truth)
    assert high > low


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
@pytest.mark.parametrize("frac", [0.5, 0.99])
def test_exclude_mask_is_respected_and_k_results_come_back(indexes, queries, kind: str, frac: float) -> None:
    index = indexes[kind]
    exclude = np.random.default_rng(2).random(index.ntotal) < frac
    # nprobe=1 / ef=10 visit few candidates: the index must widen its search to find 10 live ids
    settings = SearchSettings(nprobe=1, ef_search=10)
    scores, ids = index.search(queries, 10, exclude=exclude, settings=settings)
    assert (ids >= 0).all(), "k results expected: there are far more than k live ids"
    assert not exclude[ids].any()
    assert np.isfinite(scores).all()


def test_exclude_everything_returns_missing(indexes, queries) -> None:
    scores, ids = indexes["ivfpq"].search(queries[:3], 4, exclude=np.ones(N, dtype=bool))
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_exclude_mask_length_is_checked(indexes, queries) -> None:
    with pytest.raises(RetrolmError, match="exclude mask"):
        indexes["flat"].search(queries, 3, exclude=np.zeros(N + 1, dtype=bool))


def test_dimension_mismatch_is_a_clear_error(indexes) -> None:
    with pytest.raises(RetrolmError, match=r"expects \(n, 32\)"):
        indexes["flat"].search(np.zeros((2, 48), np.float32), 3)


# -- building ----------------------------------------------------------------------------------------------------


def test_add_before_train_is_refused(data) -> None:
    index = VectorIndex.create(DIM, "ivfpq", factory=IVF_FACTORY)
    assert index.needs_training and index.min_train_vectors >= 32 * 32
    with pytest.raises(RetrolmError, match="must be trained"):
        index.add(data[:10])


def test_add_after_train_appends_sequential_ids(data) -> None:
    index = VectorIndex.create(DIM, "ivfpq", factory=IVF_FACTORY)
    index.train(data)
    index.add(data[:1000])
    index.add(data[1000:1500])
    assert index.ntotal == 1500
    _, ids = index.search(data[1000:1500], 1)
    assert np.mean(ids[:, 0] == np.arange(1000, 1500)) > 0.95
    approx = index.reconstruct(np.array([0, 1200]))
    assert approx.shape == (2, DIM)
    assert np.all(np.sum(approx * data[[0, 1200]], axis=1) > 0.9)  # PQ reconstruction is close
    index.add(data[1500:1600])  # adding after reconstruct (direct map) keeps ids sequential
    assert index.search(data[1550:1551], 1)[1][0, 0] == 1550


def test_training_is_deterministic(data, queries) -> None:
    a, b = build("ivfpq", data, IVF_FACTORY, seed=3), build("ivfpq", data, IVF_FACTORY, seed=3)
    (sa, ia), (sb, ib) = a.search(queries, 10), b.search(queries, 10)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(sa, sb)


def test_default_ivfpq_factory_with_opq(data, queries, truth, tmp_path) -> None:
    """The production path: OPQ pre-transform + IVF with HNSW coarse quantizer, through save/load."""
    x = data[:2000]
    index = build("ivfpq", x)
    assert index.factory.startswith("OPQ4,IVF")
    ids = index.search(queries[:50], 10)[1]
    assert np.mean([t in row for t, row in zip(np.arange(50), ids, strict=True)]) > 0.8
    index.save(tmp_path / "opq.faiss")
    loaded = VectorIndex.load(tmp_path / "opq.faiss")
    assert loaded.kind == "ivfpq" and loaded.factory.startswith("OPQ4_32,IVF")
    np.testing.assert_array_equal(loaded.search(queries[:50], 10)[1], ids)


# -- persistence -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(indexes, queries, data, tmp_path, kind: str, mmap: bool) -> None:
    index = indexes[kind]
    path = tmp_path / f"{kind}.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    assert index.nbytes_on_disk == path.stat().st_size
    loaded = VectorIndex.load(path, mmap=mmap)
    assert (loaded.kind, loaded.dim, loaded.ntotal) == (kind, DIM, N)
    assert loaded.default_settings == index.default_settings
    exclude = np.zeros(N, dtype=bool)
    exclude[::3] = True
    for ex in (None, exclude):
        s0, i0 = index.search(queries, 10, exclude=ex)
        s1, i1 = loaded.search(queries, 10, exclude=ex)
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_array_equal(s0, s1)
    # a memory-mapped index is read-only inside FAISS: add() must re-read it into RAM transparently
    loaded.add(data[:5])
    assert loaded.ntotal == N + 5
    assert loaded.search(data[:1], 1)[1][0, 0] in (0, N)  # the vector and its new copy tie


def test_save_replaces_atomically_under_a_mapped_reader(indexes, queries, data, tmp_path) -> None:
    path = tmp_path / "db.faiss"
    indexes["flat"].save(path)
    reader = VectorIndex.load(path, mmap=True)
    before = reader.search(queries, 5)[1]
    build("flat", data[:100]).save(path)  # a new index is renamed over the file the reader maps
    np.testing.assert_array_equal(reader.search(queries, 5)[1], before)
    assert VectorIndex.load(path).ntotal == 100
    with pytest.raises(RetrolmError, match="changed on disk"):
        reader.add(data[:1])


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "garbage"])
@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
@pytest.mark.parametrize("mmap", [True, False])
def test_corrupt_file_is_a_retrolm_error(indexes, tmp_path, damage: str, kind: str, mmap: bool) -> None:
    path = tmp_path / "index.faiss"
    indexes[kind].save(path)
    raw = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) * 2 // 3])
    else:
        path.write_bytes(b"not an index" + raw[12:])
    with pytest.raises(RetrolmError, match=re.escape(f"{path}: corrupt or unreadable FAISS index")):
        VectorIndex.load(path, mmap=mmap)


def test_factories_faiss_builds_with_another_metric_are_refused_when_created() -> None:
    """FAISS builds HNSW32,PQ8 with L2 whatever metric it is asked for: the build embedded every chunk, then its
    index was refused on loading (and again at every resume)."""
    with pytest.raises(RetrolmError, match="'HNSW32,PQ8': FAISS builds it with another metric than inner product"):
        VectorIndex.create(DIM, factory="HNSW32,PQ8")


@pytest.mark.parametrize("factory, exact", [("Flat", True), ("HNSW16,Flat", True), ("IVF8,Flat", False),
                                            ("HNSW16,SQ8", False), ("PCA16,Flat", False), ("PCA16,HNSW16,Flat", False),
                                            ("IVF8,PQ8,RFlat", True)])
def test_only_indexes_holding_the_vectors_themselves_store_exact_keys(data, factory: str, exact: bool) -> None:
    """'Exact' search and the neighbour precompute read keys back from flat and HNSW indexes: scalar-quantized or
    projected keys are approximations."""
    index = build("auto", data[:1000], factory=factory)
    assert index.stores_exact_keys is exact
    if exact:
        np.testing.assert_array_equal(index.reconstruct(np.arange(5)), data[:5])


def test_indexes_faiss_cannot_name_or_read_back_give_one_line(data, tmp_path) -> None:
    """A whitened PCA made reverse_index_factory fail with a bare AssertionError when the index was loaded; a loaded
    fast-scan IVF crashes the process (segfault) when its vectors are read back, as compaction does."""
    build("auto", data[:2000], factory="PCAW16,IVF8,Flat").save(tmp_path / "pcaw.faiss")
    assert VectorIndex.load(tmp_path / "pcaw.faiss").kind == "ivfpq"
    build("auto", data[:2000], factory="IVF8,PQ8x4fs").save(tmp_path / "fs.faiss")
    with pytest.raises(RetrolmError, match=r"a fast-scan index .* cannot give its vectors back"):
        VectorIndex.load(tmp_path / "fs.faiss").reconstruct(np.arange(3))
