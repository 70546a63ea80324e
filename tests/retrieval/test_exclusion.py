"""What a query must not retrieve: per-query document exclusion in the Retriever interface (against a brute-force
reference) and the neighbour rules of RETRO training (own document, whole sequence) on a real database."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from conftest import wiki_docs, write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.db import ChunkStore, tokenize_corpus
from retrolm.retrieval import DenseRetriever, Exclusion
from retrolm.retrieval.base import Retriever
from retrolm.retrieval.neighbours import (
    NeighbourConfig,
    compute_neighbours,
    db_identity,
    load_neighbours,
    near_duplicate_groups,
    save_neighbours,
)

# --- the Retriever interface on a hand-made "database" -------------------------------------------------------------


class FakeStore:
    """Chunk c belongs to document ``first_doc + chunk_docs[c]`` (global document indices, as in a store that is the
    new segment of an ``add``)."""

    def __init__(self, chunk_docs, first_doc=0):
        self.doc = np.asarray(chunk_docs) + first_doc
        self.n_chunks = len(self.doc)
        self.first_doc = first_doc
        self.doc_n_chunks = np.bincount(self.doc - first_doc)

    def chunk_doc(self, ids):
        return self.doc[np.asarray(ids)]


class FakeDB:
    def __init__(self, chunk_docs, deleted_chunks=None, first_doc=0):
        self.store = FakeStore(chunk_docs, first_doc)
        self.deleted = deleted_chunks

    def refresh(self) -> bool:  # nothing else writes to it
        return False

    def exclusion_mask(self, chunks):
        if chunks is None:
            return self.deleted
        return chunks if self.deleted is None else self.deleted | chunks


class ByDistance(Retriever):
    """Query q (an int, as text) scores chunk c by -|c - q| (ties: the lower id first); records each fetch size."""

    def __init__(self, db):
        super().__init__(db)
        self.fetches, self.prepared = [], 0

    def prepare(self, queries):
        self.prepared += len(queries)
        return super().prepare(queries)

    def _search(self, queries, k, exclude_chunks):
        self.fetches.append(k)
        n = self.db.store.n_chunks
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, q in enumerate(queries):
            order = [c for c in sorted(range(n), key=lambda c: (abs(c - int(q)), c))
                     if exclude_chunks is None or not exclude_chunks[c]][:k]
            ids[row, : len(order)] = order
            scores[row, : len(order)] = [-abs(c - int(q)) for c in order]
        return scores, ids


def reference(db, q: int, k: int, docs=(), mask=None) -> list[int]:
    n = db.store.n_chunks
    order = [c for c in sorted(range(n), key=lambda c: (abs(c - q), c))
             if db.store.doc[c] not in docs and (mask is None or not mask[c])]
    return (order + [-1] * k)[:k]


CHUNK_DOCS = [5] + [0] * 9 + [1] * 3 + [2] * 30 + [3] * 5 + [4] * 2  # 50 chunks; document 2 is long


def test_documents_excluded_per_query_match_a_brute_force_reference():
    db = FakeDB(CHUNK_DOCS)
    r = ByDistance(db)
    queries = ["25", "0", "11", "49", "44", "1"]
    docs = [[2], [0, 1], [1], [4, 3], [], [0]]  # a long document around the query forces several fetches
    for k in (1, 3, 5):
        res = r.search(queries, k, Exclusion(docs=docs))
        assert res.ids.shape == (6, k) and res.ids.dtype == np.int64 and res.scores.dtype == np.float32
        for i, q in enumerate(queries):
            want = reference(db, int(q), k, docs[i])
            assert res.ids[i].tolist() == want, (q, k)
            np.testing.assert_array_equal(res.scores[i], [-abs(c - int(q)) for c in want])
    assert all(f <= 50 for f in r.fetches)  # never asks for more than the database holds


@pytest.mark.parametrize(("cap", "first_doc"), [(100, 0), (4, 0), (100, 7)])
def test_one_search_passes_over_the_excluded_documents_when_the_retriever_allows(cap, first_doc):
    """A retriever whose search costs the same at any k (BM25) fetches k + the excluded documents' chunks at once:
    one search per query batch (capped: then the loop fetches the rest), the same hits as the reference; in a store
    whose documents start at ``first_doc`` the excluded (global) documents are sized the same."""
    db = FakeDB(CHUNK_DOCS, first_doc=first_doc)
    r = ByDistance(db)
    r.excluded_fetch = cap
    queries = ["25", "0", "11", "49", "44", "1"]
    docs = [[d + first_doc for d in ds] for ds in [[2], [0, 1], [1], [4, 3], [], [0]]]
    res = r.search(queries, 3, Exclusion(docs=docs))
    assert res.ids.tolist() == [reference(db, int(q), 3, docs[i]) for i, q in enumerate(queries)]
    if cap == 100:
        assert r.fetches == [3 + 30]  # document 2 (30 chunks) is the largest excluded set
    else:
        assert r.fetches[0] == 3 + 4 and len(r.fetches) > 1


def test_documents_excluded_per_query_equal_the_same_chunk_mask_for_every_retriever(built_db):
    """Excluding a query's document by id or by a mask of its chunks is one exclusion. Hybrid used to fuse rankings
    that still held the document (fetched 2-8x deeper) and filter afterwards: 28 of 44 queries differed. BM25 ties
    come lower chunk id first, as in every other path (bm25s returned them higher id first). Texts may come as an
    object array."""
    from retrolm.retrieval import get_retriever

    store = built_db.store
    chunk_doc = store.all_chunk_docs()
    rows = np.arange(0, store.n_chunks, 3)
    texts = built_db.chunk_texts(rows)
    for kind in ("bm25", "dense", "hybrid"):
        r = get_retriever(built_db, kind)
        by_id = r.search(texts, 5, Exclusion(docs=[[int(chunk_doc[u])] for u in rows]))
        # texts as a numpy object array (a pandas column's values): dense took them for query vectors (a ValueError)
        as_array = r.search(np.array(texts[:4], dtype=object), 5).ids
        assert as_array.tolist() == r.search(texts[:4], 5).ids.tolist()
        for row, u in enumerate(rows):
            by_mask = r.search([texts[row]], 5, Exclusion(chunks=chunk_doc == chunk_doc[u]))
            assert by_id.ids[row].tolist() == by_mask.ids[0].tolist(), (kind, u)
        if kind == "bm25":
            hit = by_id.ids >= 0
            ties = hit[:, 1:] & hit[:, :-1] & (by_id.scores[:, 1:] == by_id.scores[:, :-1])
            assert ties.any() and (by_id.ids[:, 1:] > by_id.ids[:, :-1])[ties].all()


def test_exclusion_that_leaves_fewer_than_k_fills_with_missing():
    db = FakeDB(CHUNK_DOCS)
    res = ByDistance(db).search(["5", "45"], 4, Exclusion(docs=[[0, 2, 3, 4, 5], [0, 1, 2, 3, 5]]))
    assert res.ids.tolist() == [[10, 11, 12, -1], [48, 49, -1, -1]]
    assert res.scores[0, 3] == -np.inf and np.isneginf(res.scores[1, 2:]).all()
    # chunk-level and document-level exclusions together, deleted chunks included
    deleted = np.zeros(50, dtype=bool)
    deleted[[9, 13]] = True
    mask = np.zeros(50, dtype=bool)
    mask[[8, 14]] = True
    db = FakeDB(CHUNK_DOCS, deleted)
    res = ByDistance(db).search(["11", "7"], 3, Exclusion(chunks=mask, docs=[[1], [2]]))
    assert res.ids.tolist() == [reference(db, 11, 3, [1], deleted | mask), reference(db, 7, 3, [2], deleted | mask)]
    assert res.ids.tolist() == [[7, 15, 6], [7, 6, 5]]
    res = ByDistance(db).search(["11"], 3, Exclusion(chunks=mask))  # without document sets: one plain search
    assert res.ids.tolist() == [[11, 10, 12]]


def test_exclusion_argument_checks():
    db = FakeDB(CHUNK_DOCS)
    r = ByDistance(db)
    assert Exclusion().per_query_docs(2) is None
    assert Exclusion(docs=[[], []]).per_query_docs(2) is None  # nothing to exclude: one plain search
    assert Exclusion(docs=[[], [3]]).per_query_docs(2) == [[], [3]]
    with pytest.raises(RetrolmError, match="exclusion lists 1 document sets for 2 queries"):
        r.search(["1", "2"], 2, Exclusion(docs=[[3]]))
    with pytest.raises(RetrolmError, match="k must be >= 1, got 0"):
        r.search("1", 0)
    r.fetches.clear()
    res = r.search(["3", "4"], 2, Exclusion(docs=[[], []]))
    assert r.fetches == [2] and res.ids.tolist() == [[3, 2], [4, 3]]
    assert r.search("7", 2).ids.tolist() == [[7, 6]]  # one text query
    prepared = r.prepare(["7", "30"])
    assert prepared.dtype == object and prepared.tolist() == ["7", "30"]
    r.prepared = 0
    assert r.search(prepared[::-1], 1).ids.tolist() == [[30], [7]]  # prepared queries are searched as they are
    assert r.prepared == 0
    assert r.search(["7", "30"], 1).ids.tolist() == [[7], [30]] and r.prepared == 2  # texts are prepared once
    assert len(r.search(["1", "2", "3"], 1)) == 3


# --- RETRO training neighbours on a real database -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ranking(built_db):
    """Every chunk's full ranking of the database (no exclusion): the reference the rules must filter."""
    assert built_db.index.kind == "flat"  # exact search: the ranking is well defined
    n = built_db.store.n_chunks
    return DenseRetriever(built_db).search(built_db.index.reconstruct(np.arange(n)), n).ids


@pytest.mark.parametrize("rule", ["none", "document", "sequence"])
def test_neighbour_rules_keep_the_best_allowed_chunks(built_db, ranking, rule):
    store = built_db.store
    docs = store.all_chunk_docs()
    cfg = NeighbourConfig(k=3, exclude=rule, seq_chunks=4, batch_size=7)  # batches that do not divide the chunks
    nb = compute_neighbours(DenseRetriever(built_db), config=cfg, show_progress=False)
    assert nb.shape == (store.n_chunks, 3) and nb.dtype == np.int64
    n = store.n_chunks
    for c in range(n):
        if rule == "none":
            banned = set()
        elif rule == "document":  # the chunk's own document and the next chunk's (its neighbours' readers)
            banned = {docs[c], docs[min(c + 1, n - 1)]}
        else:
            banned = set(docs[(c // 4) * 4 : (c // 4 + 1) * 4].tolist())
        want = [x for x in ranking[c] if docs[x] not in banned][:3]
        assert nb[c].tolist() == want, c
    if rule == "none":
        np.testing.assert_array_equal(nb[:, 0], np.arange(store.n_chunks))  # a chunk finds itself first
    if rule == "document":  # a document's last chunk retrieves nothing of the document that follows it
        ends = np.flatnonzero(docs[:-1] != docs[1:])
        assert len(ends) > 10 and (nb[ends] >= 0).all() and not (docs[nb[ends]] == docs[ends + 1][:, None]).any()


@pytest.fixture(scope="module")
def versions_db(tmp_path_factory, tiny_db_config):
    """Twelve summaries plus planted versions: an exact copy of 3, a truncated copy of 7 (its first half: contained in
    7), and 5 followed by 6 (5 and 6 are both contained in it), and a flat index."""
    from retrolm.db import Database

    docs = wiki_docs(12)
    half = docs[7]["text"][: len(docs[7]["text"]) // 2]
    docs += [{"id": "copy-of-3", "text": docs[3]["text"]}, {"id": "half-of-7", "text": half},
             {"id": "5-then-6", "text": docs[5]["text"] + "\n\n" + docs[6]["text"]}]
    folder = tmp_path_factory.mktemp("versions")
    return Database.build([write_jsonl(folder / "docs.jsonl", docs)], folder / "db", tiny_db_config,
                          show_progress=False)


def test_near_duplicate_rule_keeps_other_versions_out(versions_db):
    """exclude="near_duplicate": a chunk retrieves neither its own document nor any document that holds >= 80% of
    its 13-grams or >= 80% of whose 13-grams it holds; every other chunk is ranked as without the rule."""
    db = versions_db
    ids = db.store.doc_ids
    groups = near_duplicate_groups(db, 0.8)
    named = {ids[d]: sorted(ids[x] for x in g) for d, g in enumerate(groups) if len(g)}
    w = [d["id"] for d in wiki_docs(12)]
    assert named == {w[3]: ["copy-of-3"], "copy-of-3": [w[3]], w[7]: ["half-of-7"], "half-of-7": [w[7]],
                     w[5]: ["5-then-6"], w[6]: ["5-then-6"], "5-then-6": sorted([w[5], w[6]])}
    n = db.store.n_chunks
    ranking = DenseRetriever(db).search(db.index.reconstruct(np.arange(n)), n).ids
    docs = db.store.all_chunk_docs()
    nb = compute_neighbours(DenseRetriever(db), config=NeighbourConfig(k=3, exclude="near_duplicate", batch_size=5),
                            show_progress=False)
    plain = compute_neighbours(DenseRetriever(db), config=NeighbourConfig(k=3), show_progress=False)
    for c in range(n):
        nxt = docs[min(c + 1, n - 1)]
        banned = {docs[c], *groups[docs[c]].tolist(), nxt, *groups[nxt].tolist()}
        assert nb[c].tolist() == [x for x in ranking[c] if docs[x] not in banned][:3], c
    planted = np.flatnonzero(np.isin(docs, [ids.index(x) for x in ("copy-of-3", "half-of-7", "5-then-6")]))
    # under the paper's rule most chunks of a planted version retrieve another version first; under this one none
    assert np.mean([docs[plain[c, 0]] in groups[docs[c]] for c in planted]) > 0.5
    assert not any(docs[x] in groups[docs[c]] for c in range(n) for x in nb[c])
    # the exact search on a torch device (the GPU path) applies the same rule
    cfg = NeighbourConfig(k=3, exclude="near_duplicate", search="torch", device="cpu", key_chunk=16)
    on_device = compute_neighbours(DenseRetriever(db), config=cfg, show_progress=False)
    assert not any(docs[x] in groups[docs[c]] or docs[x] == docs[c] for c in range(n) for x in on_device[c])
    assert (nb >= 0).all() and (on_device >= 0).all()
    keys = db.index.reconstruct(np.arange(n))  # the same scores, best first (tied chunks may swap places)
    np.testing.assert_allclose(*(np.einsum("nd,nkd->nk", keys, keys[found]) for found in (on_device, nb)), atol=1e-4)


def test_held_out_source_gets_no_document_rule_only_the_chunk_mask(built_db, tmp_path):
    """Held-out documents are other documents: their index numbers say nothing about the database's; only the given
    chunk mask (their copies, near-duplicates) is kept out."""
    held = tokenize_corpus([write_jsonl(tmp_path / "h.jsonl", wiki_docs(3, start=1))], built_db.tokenizer,
                           built_db.chunk_len, tmp_path / "held")  # copies of database documents 1-3
    n = built_db.store.n_chunks
    retriever = DenseRetriever(built_db)
    queries = retriever.prepare(held.texts(np.arange(held.n_chunks), built_db.tokenizer))
    full = retriever.search(queries, n).ids
    nb = compute_neighbours(retriever, held, NeighbourConfig(k=2, batch_size=4), show_progress=False)
    np.testing.assert_array_equal(nb, full[:, :2])
    db_docs = built_db.store.all_chunk_docs()
    assert (db_docs[nb[:, 0]] == held.all_chunk_docs() + 1).all()  # each held-out chunk finds its copy
    mask = (db_docs >= 1) & (db_docs <= 3)
    nb = compute_neighbours(retriever, held, NeighbourConfig(k=2, batch_size=4), show_progress=False,
                            exclude_chunks=mask)
    np.testing.assert_array_equal(nb, [[x for x in row if not mask[x]][:2] for row in full])


def test_source_chunk_ids_need_not_start_at_zero(built_db, ranking):
    """A source store whose chunk ids start later (a database's added segment) is read at its own ids."""
    store = built_db.store
    shifted = ChunkStore([dataclasses.replace(store.segments[0], first_chunk=1000, first_doc=50)], store.chunk_len,
                         store.pad_id)
    retriever = DenseRetriever(built_db)
    nb = compute_neighbours(retriever, shifted, NeighbourConfig(k=2, batch_size=16), show_progress=False)
    queries = retriever.prepare(store.texts(np.arange(store.n_chunks), built_db.tokenizer))
    np.testing.assert_array_equal(nb, retriever.search(queries, 2).ids)


@pytest.mark.parametrize("kind", ["dense", "hybrid"])
def test_a_deletion_during_the_neighbour_search_is_applied_to_every_row(built_db, tmp_path, kind):
    """Another process deletes a document after two batches: the earlier rows that held its chunks are searched
    again, so the set equals one computed after the deletion (it kept them, saved under the new version). A database
    that grows during the search is refused."""
    import shutil

    from retrolm.db import Database, DatabaseView
    from retrolm.retrieval import get_retriever

    shutil.copytree(built_db.path, tmp_path / "db")
    db = DatabaseView.open(tmp_path / "db")
    r = get_retriever(db, kind)
    cfg = NeighbourConfig(k=2, batch_size=16)
    before = compute_neighbours(r, config=cfg)
    victim = int(np.bincount(db.store.chunk_doc(before[before >= 0])).argmax())  # the most retrieved document
    search, calls = r.search, []

    def deleting_search(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            Database.open(tmp_path / "db").delete([db.store.doc_ids[victim]], show_progress=False)
        return search(*args, **kwargs)

    r.search = deleting_search
    during = compute_neighbours(r, config=cfg)
    assert db.meta["version"] == 2 and db.deleted_docs[victim]
    assert (db.store.chunk_doc(before[:32][before[:32] >= 0]) == victim).any()  # the first batches had read it
    np.testing.assert_array_equal(during, compute_neighbours(get_retriever(db, kind), config=cfg))

    def rebuilding_search(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # as a view sees a rebuild: another build id
            db.meta.update(version=db.meta["version"] + 1, build_id="rebuilt")
        return search(*args, **kwargs)

    calls.clear()
    r.search = rebuilding_search
    with pytest.raises(RetrolmError, match="rebuilt or grew during the neighbour search"):
        compute_neighbours(r, config=cfg)


def test_neighbour_config_and_identity(built_db):
    rules = "^neighbour exclude rule must be one of none, document, near_duplicate, sequence, got 'doc'$"
    for bad, match in ((dict(exclude="doc"), rules),
                       (dict(near_dup_threshold=0.0), r"^neighbour near_dup_threshold must be in \(0, 1\], got 0.0$"),
                       (dict(k=0), "^neighbour k and seq_chunks must be positive$"),
                       (dict(seq_chunks=0), "^neighbour k and seq_chunks must be positive$")):
        with pytest.raises(RetrolmError, match=match):
            NeighbourConfig(**bad)
    assert NeighbourConfig(k=1, seq_chunks=1).seq_chunks == 1  # the smallest valid settings
    ident = db_identity(built_db)
    assert ident == {"path": str(built_db.path.resolve()), "build_id": built_db.meta["build_id"],
                     "version": built_db.meta["version"], "n_chunks": built_db.store.n_chunks,
                     "encoder": built_db.meta["encoder"]["name"], "index": built_db.meta["index"]["file"]}


def test_saved_neighbours_describe_themselves_and_refuse_another_build(built_db, tmp_path, caplog):
    nb = np.arange(built_db.store.n_chunks * 2, dtype=np.int64).reshape(-1, 2) % built_db.store.n_chunks
    cfg = NeighbourConfig(k=2)
    save_neighbours(tmp_path / "nb", nb, built_db, cfg)
    save_neighbours(tmp_path / "nb", nb, built_db, cfg)  # again into the same folder (a recompute)
    saved = json.loads((tmp_path / "nb" / "neighbours.json").read_text())
    assert saved == {"db": str(built_db.path.resolve()), "db_version": built_db.meta["version"],
                     "db_identity": db_identity(built_db), "source": "database", "n_chunks": len(nb),
                     "config": dataclasses.asdict(cfg), "exclusion_rule": 2}
    loaded = load_neighbours(tmp_path / "nb", built_db)
    assert isinstance(loaded, np.memmap)  # memory-mapped, not read into memory
    np.testing.assert_array_equal(loaded, nb)
    build_id = built_db.meta["build_id"]
    built_db.meta["build_id"] = "another-build"  # a rebuilt database starts again at the same version
    try:
        with pytest.raises(RetrolmError, match="computed against another build or version"):
            load_neighbours(tmp_path / "nb", built_db)
    finally:
        built_db.meta["build_id"] = build_id
    del saved["db_identity"]  # a set saved before identities were recorded is checked by version only
    (tmp_path / "nb" / "neighbours.json").write_text(json.dumps(saved))
    np.testing.assert_array_equal(load_neighbours(tmp_path / "nb", built_db), nb)
    assert "recompute for exactness" not in caplog.text
    del saved["exclusion_rule"]  # saved before the next chunk's document was excluded too: loaded, with a warning
    (tmp_path / "nb" / "neighbours.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(load_neighbours(tmp_path / "nb", built_db), nb)
    assert "computed before the next chunk's document was excluded too" in caplog.text
    with pytest.raises(RetrolmError, match=r"missing/neighbours.json: neighbour description not found$"):
        load_neighbours(tmp_path / "missing", built_db)
