"""A database split into shards (``db build --shard I/N``) searched together, here and over HTTP: the merged dense
top-k is the one database's top-k, the parts must be the N parts of one database, ``db add`` routes each document to
its shard, and the service fronts the parts (search, answers with their sources, documents)."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from conftest import assert_one_line_error, run_cli, search, wiki_docs, write_jsonl
from retrolm.cli.generate import run_generate
from retrolm.core.errors import RetrolmError
from retrolm.db import BuildConfig, Database, DatabaseView
from retrolm.infer.generate import GenerateConfig
from retrolm.infer.generator import Generator
from retrolm.infer.rag import PassageRetriever, RagConfig, RagPipeline, ShardedPassageRetriever
from retrolm.retrieval.sharded import LocalShard, ShardedRetriever
from retrolm.serve import ServeConfig, Service
from retrolm.serve.app import create_app
from retrolm.text.corpus import in_shard, iter_documents, parse_shard, shard_of

QUERIES = ["a river in Europe", "the history of a city", "a species of moth", "a football player",
           "an album released by a band", "a village in Poland"]


def shards_file(path: Path, entries: list, **settings) -> Path:
    path.write_text(yaml.safe_dump({"shards": [str(e) for e in entries], **settings}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, wiki_corpus, tiny_db_config):
    """The 40-document corpus built as 3 shards, with the config of the one-database fixture ``built_db``."""
    root = tmp_path_factory.mktemp("sharded")
    paths = []
    for i in range(3):
        cfg = BuildConfig(**{**tiny_db_config.__dict__, "shard": f"{i}/3", "bm25": True})
        paths.append(Database.build([wiki_corpus], root / f"db-{i}", cfg, show_progress=False).path)
    return {"root": root, "paths": paths, "file": shards_file(root / "shards.yaml", [p.name for p in paths])}


def test_a_document_goes_to_one_shard_by_its_id_alone(tmp_path):
    # pinned: a different hash would send documents of existing sharded databases to the wrong part
    assert [shard_of(d, 4) for d in ("a", "b", "doc-1", "Linux/kernel.rst")] == [3, 1, 1, 3]
    assert shard_of("é", 7) == 2
    assert parse_shard("2/5") == (2, 5)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(RetrolmError, match="shard"):
            parse_shard(bad)
    docs = list(iter_documents([write_jsonl(tmp_path / "c.jsonl", wiki_docs(40))]))
    parts = [[d.id for d in in_shard(docs, (i, 3))] for i in range(3)]
    together = [d for part in parts for d in part]
    assert sorted(together) == sorted(d.id for d in docs) and all(parts)  # disjoint, complete, none empty


def test_the_shards_hold_the_corpus_once_with_one_tokenizer(shards, built_db):
    views = [DatabaseView.open(p) for p in shards["paths"]]
    ids = [set(v.live_doc_ids()) for v in views]
    assert sum(map(len, ids)) == 40 and set().union(*ids) == set(built_db.live_doc_ids())
    for i, (v, held) in enumerate(zip(views, ids, strict=True)):
        assert v.shard == (i, 3) and v.info()["shard"] == f"{i}/3"
        assert all(shard_of(d, 3) == i for d in held)
        # train:1000 is trained on the whole corpus in every part: one tokenizer, the one database's
        assert v.meta["tokenizer"]["sha256"] == built_db.meta["tokenizer"]["sha256"]


def test_the_merged_dense_top_k_is_the_one_database_top_k(shards, built_db):
    sharded = ShardedRetriever.open(shards["file"])
    assert sharded.kind == "dense" and sharded.num_chunks == built_db.store.n_chunks
    result = sharded.search(QUERIES, 8)
    for i, q in enumerate(QUERIES):
        want = search(built_db, q, 8)
        got = result.hits(i)
        assert [(h.doc_id, h.position, h.text) for h in got] == [(h.doc_id, h.position, h.text) for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-5, atol=1e-6)
        assert {h.shard for h in got} <= {str(p) for p in shards["paths"]}
        assert all(shard_of(h.doc_id, 3) == shards["paths"].index(Path(h.shard)) for h in got)
    assert len({h.shard for i in range(len(QUERIES)) for h in result.hits(i)}) == 3  # every part contributed
    # the parts on this machine share one embedding of the queries: only the first loaded its encoder
    assert [s.db._encoder is not None for s in sharded.shards] == [True, False, False]
    # a document excluded per query is skipped in whichever part holds it, as in the one database
    top = result.hits(0)[0].doc_id
    excluded = sharded.search([QUERIES[0]], 8, exclude_docs=[[top]]).hits(0)
    assert top not in {h.doc_id for h in excluded}
    assert [h.doc_id for h in excluded] == [h.doc_id for h in search(built_db, QUERIES[0], 8, exclude_doc_ids=[top])]
    sharded.close()


def test_bm25_and_hybrid_merge_every_part(shards):
    sharded = ShardedRetriever.open(shards["file"], retriever="bm25")
    hits = sharded.search("military political century", 6).hits(0)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and len(hits) == 6
    # each part's own best hit for the query is in the merged list unless six better ones came from elsewhere
    for p in shards["paths"]:
        own = search(DatabaseView.open(p), "military political century", 1, retriever="bm25")
        if own and own[0].score >= scores[-1]:
            assert (str(p), own[0].chunk_id) in {(h.shard, h.chunk_id) for h in hits}
    hybrid = sharded.search("military political century", 4, kind="hybrid").hits(0)
    dense = sharded.search("military political century", 16, kind="dense").hits(0)
    bm25 = sharded.search("military political century", 16).hits(0)
    rank = {kind: {(h.shard, h.chunk_id): r for r, h in enumerate(hits)} for kind, hits in (("d", dense), ("b", bm25))}
    for h in hybrid:  # reciprocal-rank fusion of the two merged rankings
        key = (h.shard, h.chunk_id)
        want = sum(1.0 / (61 + rank[k][key]) for k in "db" if key in rank[k])
        assert h.score == pytest.approx(want)
    sharded.close()


def test_bm25_with_summed_statistics_ranks_as_the_one_database(shards, built_db):
    from retrolm.db.lexical import TermStats

    queries = [*QUERIES, "military political century", "works of the early period", "american modern complex"]
    sharded = ShardedRetriever.open(shards["file"], retriever="bm25")
    whole = DatabaseView.open(built_db.path)
    # the parts' statistics add up to the one database's (its BM25 index covers the same chunks)
    assert sharded.term_stats(queries) == whole.lexical.term_stats(queries)
    assert len(whole.lexical.term_stats(queries).df) == 14
    own = ShardedRetriever(sharded.shards, "bm25", global_stats=False)
    differ = 0
    for q in queries:
        want = search(whole, q, 8, retriever="bm25")
        got = sharded.search(q, 8).hits(0)
        # scored as the one database scores: the same scores, the same chunks (ties may come in another order)
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-5)
        above = want[-1].score * (1 + 1e-5) if want else 0.0
        assert {(h.doc_id, h.position) for h in got if h.score > above} == {
            (h.doc_id, h.position) for h in want if h.score > above}
        mine = [h.score for h in own.search(q, 8).hits(0)]
        differ += len(mine) != len(want) or not np.allclose(mine, [h.score for h in want], rtol=1e-5)
    assert differ >= len(queries) // 2  # each part's own statistics score otherwise
    # a part given its own statistics scores exactly as bm25s does (every match kept: ties cannot change the sets)
    lex = DatabaseView.open(shards["paths"][0]).lexical
    plain = lex.search(queries, lex.n_chunks)
    again = lex.search(queries, lex.n_chunks, stats=lex.term_stats(queries))
    for q in range(len(queries)):
        a = {(int(i), round(float(s), 4)) for i, s in zip(plain[1][q], plain[0][q], strict=True) if i >= 0}
        b = {(int(i), round(float(s), 4)) for i, s in zip(again[1][q], again[0][q], strict=True) if i >= 0}
        assert a == b
    assert TermStats.merged([TermStats(3, 10, {"a": 1}), TermStats(2, 5, {"a": 2, "b": 1})]) == TermStats(
        5, 15, {"a": 3, "b": 1})
    sharded.close()


def test_bm25_chunk_lengths_are_stored_or_counted_again(shards, tmp_path):
    import shutil

    from retrolm.db.lexical import LENGTHS, LexicalIndex

    db = DatabaseView.open(shards["paths"][1])
    stored = np.asarray(db.lexical.chunk_lengths())
    assert stored.sum() > 0 and len(stored) == db.store.n_chunks
    old = tmp_path / "bm25"
    shutil.copytree(db.path / db.meta["bm25"], old)
    (old / LENGTHS).unlink()  # an index stored before the lengths were
    assert np.array_equal(LexicalIndex.load(old, texts=db.chunk_texts).chunk_lengths(), stored)
    with pytest.raises(RetrolmError, match="chunk lengths are not stored"):
        LexicalIndex.load(old).chunk_lengths()


def test_bm25_matches_accented_words_in_either_unicode_form(tmp_path):
    """bm25s's word pattern stops at a combining accent: a decomposed (NFD) "Abdülhamid" found nothing in composed
    text, nor the reverse. Texts and queries are put in NFC; an index stored before keeps reading as it was built."""
    import json
    import unicodedata

    from retrolm.db.lexical import SCORER, LexicalIndex

    texts = ["Abdülhamid ruled the empire", "the river Dhahabī flows south", "nothing accented here at all"]
    nfd = [unicodedata.normalize("NFD", t) for t in texts]
    for stored, queries in ((texts, nfd), (nfd, texts)):
        index = LexicalIndex.build(lambda ids, stored=stored: [stored[i] for i in ids], len(stored))
        _, ids = index.search(["Abdülhamid", unicodedata.normalize("NFD", "Dhahabī"), *queries[:1]], 1)
        assert ids[:, 0].tolist() == [0, 1, 0]
    index.save(tmp_path / "bm25")
    assert json.loads((tmp_path / "bm25" / SCORER).read_text())["text_form"] == "NFC"
    assert LexicalIndex.load(tmp_path / "bm25").search(["Abdülhamid"], 1)[1][0, 0] == 0
    record = json.loads((tmp_path / "bm25" / SCORER).read_text())
    del record["text_form"]  # an index stored before: its terms are of the text as it was, queries taken as typed
    (tmp_path / "bm25" / SCORER).write_text(json.dumps(record))
    old = LexicalIndex.load(tmp_path / "bm25")
    assert old.text_form is None and old.search(["Abdülhamid"], 1)[1][0, 0] == 0


def test_parts_that_do_not_make_one_database_are_refused(shards, built_db, tiny_db_config, wiki_corpus, tmp_path):
    root, (p0, p1, p2) = shards["root"], shards["paths"]
    cases = [([p0, p1], "missing 2/3"), ([p0, p1, p2, p1], f"shard {p1} is the same database as {p1}"),
             ([p0, p1, p2, built_db.path], "was not built as a shard (db build --shard I/N); set complete=false")]
    for entries, fragment in cases:
        with pytest.raises(RetrolmError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            ShardedRetriever.open(shards_file(tmp_path / "s.yaml", entries))
    # separate databases of one tokenizer and encoder may be searched together when asked to
    both = ShardedRetriever.open(shards_file(tmp_path / "s.yaml", [p0, built_db.path], complete=False))
    assert both.num_chunks == built_db.store.n_chunks + DatabaseView.open(p0).store.n_chunks
    both.close()
    other = Database.build([wiki_corpus], tmp_path / "other", BuildConfig(**{**tiny_db_config.__dict__,
                           "chunk_len": 32, "shard": "2/3"}), show_progress=False).path
    with pytest.raises(RetrolmError, match=f"shard {other}: chunk_len 32 differs from {p0}'s 64"):
        ShardedRetriever.open(shards_file(tmp_path / "s.yaml", [p0, p1, other]))
    with pytest.raises(RetrolmError, match="no such shards file"):
        ShardedRetriever.open(root / "nope.yaml")
    with pytest.raises(RetrolmError, match="lists no database"):
        ShardedRetriever.open(shards_file(tmp_path / "s.yaml", []))


def test_db_add_puts_each_document_in_its_own_shard(tmp_path, tiny_db_config):
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(12))
    more = write_jsonl(tmp_path / "more.jsonl", wiki_docs(9, start=12))
    paths = [Database.build([corpus], tmp_path / f"db-{i}", BuildConfig(**{**tiny_db_config.__dict__,
                            "shard": f"{i}/2"}), show_progress=False).path for i in range(2)]
    added = [Database.open(p).add([more], show_progress=False) for p in paths]
    assert sum(a["docs_added"] for a in added) == 9
    assert [a["docs_other_shards"] for a in added] == [9 - a["docs_added"] for a in added]
    for i, p in enumerate(paths):
        db = DatabaseView.open(p)
        assert db.shard == (i, 2) and all(shard_of(d, 2) == i for d in db.live_doc_ids())
    sharded = ShardedRetriever.open(shards_file(tmp_path / "s.yaml", paths))
    assert sum(int(i["num_docs"]) for i in sharded.infos) == 21
    sharded.close()


def _serve_in_thread(service: Service) -> tuple[str, object]:
    """A real uvicorn server on a free port of this machine (what another machine's shard would run)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    return f"http://127.0.0.1:{port}", server


def test_a_remote_shard_over_http_gives_the_same_results(shards, tmp_path):
    p0, p1, p2 = shards["paths"]
    # a part's service with small limits: the front splits batches and caps hybrid's depth to them
    url, server = _serve_in_thread(Service(ServeConfig(db=str(p2), max_k=8, max_queries=2)))
    try:
        mixed = ShardedRetriever.open(shards_file(tmp_path / "mixed.yaml", [p0, p1, url]))
        local = ShardedRetriever.open(shards["file"])
        queries = [*QUERIES, "  "]  # a blank query retrieves nothing, here as in one database
        excluded = [[h.doc_id for h in local.search(q, 2).hits(0)] for q in queries]
        # hybrid fetches 4 x k per ranking, here capped at the part's max_k: 8 for k = 4, as 2 x k on the local side
        local_hybrid = ShardedRetriever(local.shards, "hybrid", hybrid_depth=2)
        for kind, k, reference in (("dense", 5, local), ("bm25", 5, local), ("hybrid", 4, local_hybrid)):
            for exclude in (None, excluded):
                got = mixed.search(queries, k, exclude, kind=kind)
                want = reference.search(queries, k, exclude, kind=kind)
                for i in range(len(queries)):
                    assert [(h.doc_id, h.chunk_id) for h in got.hits(i)] == [(h.doc_id, h.chunk_id)
                                                                             for h in want.hits(i)]
                    assert [h.shard for h in got.hits(i)] == [url if h.shard == str(p2) else h.shard
                                                             for h in want.hits(i)]
                    if exclude is not None:
                        assert not {h.doc_id for h in got.hits(i)} & set(exclude[i])
                assert not got.hits(len(queries) - 1)
        with pytest.raises(RetrolmError, match=f"shard {url}: k=9 is more than its service allows \\(max_k=8"):
            mixed.search(QUERIES[0], 9)
        # the remote part reports its FLOPs: its encoder forward and its search, as the local part's would be
        passages = ShardedPassageRetriever(mixed)
        _, flops = passages.retrieve([QUERIES[0]], 3)
        one = PassageRetriever(DatabaseView.open(p2), "dense").flops(QUERIES[0])
        # the remote part embeds the question itself, the two local parts once between them
        assert flops[0].encoder == 2 * one.encoder > 0
        assert flops[0].search == sum(PassageRetriever(DatabaseView.open(p), "dense").flops(QUERIES[0]).search
                                      for p in (p0, p1, p2))
        assert [s.db._encoder is not None for s in mixed.shards[:2]] == [True, False]  # counting loads no encoder
        hybrid = ShardedPassageRetriever(ShardedRetriever(mixed.shards, "hybrid")).retrieve([QUERIES[0]], 3)[1][0]
        bm25 = sum(PassageRetriever(DatabaseView.open(p), "bm25").flops(QUERIES[0]).search for p in (p0, p1, p2))
        assert hybrid.encoder == 2 * one.encoder and hybrid.search == flops[0].search + bm25  # both rankings
        doc = next(d for d in DatabaseView.open(p2).live_doc_ids())
        assert mixed.document(doc)[0] == url and mixed.document("no such doc") is None
        # a front of shards is not a part: its parts are listed instead
        front, front_server = _serve_in_thread(Service(ServeConfig(db=str(shards["file"]))))
        with pytest.raises(RetrolmError, match=f"shard {front} is the front of a sharded database itself"):
            ShardedRetriever.open(shards_file(tmp_path / "nested.yaml", [p0, p1, front]))
        front_server.should_exit = True
        # a front advertises the smallest limit of its parts
        front_client = TestClient(create_app(Service(ServeConfig(db=str(tmp_path / "mixed.yaml")))))
        assert front_client.get("/api/info").json()["max_k"] == 8
        assert front_client.get("/api/search", params={"q": "x", "k": 9}).json()["error"] == "k must be in 1..8, got 9"
        # a shard that is down: one line naming it (a front's service answers 502: its upstream failed)
        server.should_exit = True
        time.sleep(0.3)
        with pytest.raises(RetrolmError, match=f"shard {url}: ConnectError"):
            mixed.search("river", 3)
        down = front_client.get("/api/search", params={"q": "river"})
        assert down.status_code == 502 and down.json()["error"].startswith(f"shard {url}: ConnectError")
        mixed.close()
        local.close()
    finally:
        server.should_exit = True


def test_the_service_fronts_the_shards(shards, built_db, wiki_corpus):
    client = TestClient(create_app(Service(ServeConfig(db=str(shards["file"])))))
    info = client.get("/api/info").json()
    assert info["db"]["num_docs"] == 40 and info["db"]["num_shards"] == 3 and info["retrievers"][0] == "dense"
    hits = client.get("/api/search", params={"q": QUERIES[2], "k": 4}).json()["hits"]
    assert [h["doc_id"] for h in hits] == [h.doc_id for h in search(built_db, QUERIES[2], 4)]
    assert all(h["shard"] for h in hits)
    batch = client.post("/api/search", json={"queries": ["military works", "political century"], "k": 2,
                                              "retriever": "bm25"}).json()
    assert batch["retriever"] == "bm25" and [len(r) for r in batch["results"]] == [2, 2]
    doc = client.get("/api/document", params={"id": hits[0]["doc_id"]}).json()
    assert doc["shard"] == hits[0]["shard"] and hits[0]["text"].strip()[:40] in doc["text"]
    assert doc["source"].startswith(str(wiki_corpus))  # the file it came from, as for one database
    r = client.get("/api/document", params={"id": "nope"})
    assert r.status_code == 404 and r.json()["error"] == "no document 'nope' in any shard"
    # one part's service answers the batch endpoint with FLOPs and per-query exclusions
    part = TestClient(create_app(Service(ServeConfig(db=str(shards["paths"][0])))))
    top = part.post("/api/search", json={"queries": [QUERIES[0]], "k": 1}).json()
    assert top["flops"][0]["encoder"] > 0 and top["flops"][0]["search"] > 0
    first = top["results"][0][0]["doc_id"]
    skip = part.post("/api/search", json={"queries": [QUERIES[0]], "k": 1, "exclude_doc_ids": [[first]]}).json()
    assert skip["results"][0][0]["doc_id"] != first
    bad = part.post("/api/search", json={"queries": ["a", "b"], "exclude_doc_ids": [[]]})
    assert bad.status_code == 400 and bad.json()["error"] == "exclude_doc_ids lists 1 sets for 2 queries"
    terms = part.post("/api/terms", json={"queries": ["military works"]}).json()
    assert terms["n_chunks"] == DatabaseView.open(shards["paths"][0]).store.n_chunks and set(terms["df"]) <= {
        "military", "works"}
    assert terms["total_length"] > terms["n_chunks"]
    stats = {"n_chunks": 10, "total_length": 100, "df": {"x": 1}}
    dense = part.post("/api/search", json={"queries": ["x"], "retriever": "dense", "term_stats": stats})
    assert dense.status_code == 400 and dense.json()["error"] == "term_stats are BM25's; this search is dense"


_spec = importlib.util.spec_from_file_location("rag_tests", Path(__file__).parents[1] / "infer" / "test_rag.py")
_rag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rag)
world = _rag.world  # a BM25 store of summaries + "The code of NAME is WORD" facts, and a Llama that copies


def test_answers_over_shards_cite_the_part_they_read(world, tmp_path):
    corpus, tok = world["root"] / "corpus.jsonl", str(Path(world["lm"]) / "tokenizer.json")
    paths = [Database.build([corpus], tmp_path / f"db-{i}", BuildConfig(tokenizer=tok, index="none", bm25=True,
                                                                       shard=f"{i}/2"), show_progress=False).path
             for i in range(2)]
    file = shards_file(tmp_path / "shards.yaml", paths)
    cfg = RagConfig(db=str(file), reader=world["lm"], template="{passages}{question}", max_new_tokens=6, top_n=3,
                    passages=1)
    pipe = RagPipeline.load(cfg)
    for name, word in (("quenmir", "basalt"), ("zorblat", "amber")):
        a = pipe.answer(f"The code of {name} is")
        assert a.answer == word and a.passages[0].doc_id == f"fact-{name}"
        assert a.passages[0].shard == str(paths[shard_of(f"fact-{name}", 2)])
        assert a.flops.search > 0 and a.flops.encoder == 0  # BM25 over both parts, no encoder
    local = [PassageRetriever(DatabaseView.open(p), "bm25") for p in paths]
    q = "The code of quenmir is"
    assert pipe.answer(q).flops.search == sum(r.flops(q).search for r in local)
    with pytest.raises(RetrolmError, match="unit=document needs one database folder"):
        RagPipeline.load(RagConfig(db=str(file), reader=world["lm"], unit="document"))
    with pytest.raises(RetrolmError, match="a RETRO model reads its neighbours' tokens from one database"):
        Generator(torch.nn.Identity(), pipe.reader.tok, "retrofit", "fitted").check_sharded(str(file))
    # a causal LM generates over the parts, each span citing the part it read
    g = run_generate(GenerateConfig(checkpoint=world["lm"], prompt="The code of zorblat is", db=str(file),
                                    max_new_tokens=3, retriever="bm25"))
    assert g.text.strip().startswith("amber")
    assert g.chunks[0].sources[0].doc_id == "fact-zorblat"
    assert g.chunks[0].sources[0].shard == str(paths[shard_of("fact-zorblat", 2)])
    from retrolm.infer.generate import format_generation

    assert f"fact-zorblat ({paths[shard_of('fact-zorblat', 2)]}: chunk" in format_generation(g)


def test_a_front_generates_with_the_retriever_generate_names(world, tmp_path, tiny_encoder, monkeypatch):
    """generate.retriever was read for one database but a front searched with the kind it was opened for."""
    import dataclasses

    corpus, tok = world["root"] / "corpus.jsonl", str(Path(world["lm"]) / "tokenizer.json")
    paths = [Database.build([corpus], tmp_path / f"db-{i}", BuildConfig(tokenizer=tok, encoder=tiny_encoder, bm25=True,
                                                                       shard=f"{i}/2"), show_progress=False).path
             for i in range(2)]
    kinds, search = [], ShardedRetriever.search

    def spy(self, queries, k, exclude_docs=None, kind=None):
        kinds.append(kind or self.kind)
        return search(self, queries, k, exclude_docs, kind)

    monkeypatch.setattr(ShardedRetriever, "search", spy)
    base = ServeConfig(db=str(shards_file(tmp_path / "s.yaml", paths)), reader=world["lm"], retriever="dense")
    service = Service(dataclasses.replace(base, generate=dataclasses.replace(base.generate, retriever="bm25")))
    service.generate("The code of zorblat is", max_new_tokens=2)
    assert kinds and set(kinds) == {"bm25"}
    kinds.clear()
    Service(base).generate("The code of zorblat is", max_new_tokens=2)  # auto: the front's own
    assert kinds and set(kinds) == {"dense"}


def test_cli_builds_describes_and_searches_shards(shards, tmp_path, capsys, wiki_corpus, tiny_encoder):
    rc, out, _ = run_cli(["db", "info", shards["file"]], capsys)
    assert rc == 0 and "3 shards, 40 documents" in out and "0/3" in out and "2/3" in out
    rc, out, _ = run_cli(["db", "search", shards["file"], QUERIES[0], "-k", "3", "--json"], capsys)
    hits = json.loads(out)
    assert rc == 0 and len(hits) == 3 and all("shard" in h for h in hits)
    rc, out, _ = run_cli(["db", "build", wiki_corpus, "--out", tmp_path / "p", "--encoder", tiny_encoder,
                          "--tokenizer", "train:1000", "--shard", "1/4", "--quiet"], capsys)
    assert rc == 0 and "(shard 1/4)" in out
    assert all(shard_of(d, 4) == 1 for d in DatabaseView.open(tmp_path / "p").live_doc_ids())
    rc, _, err = run_cli(["db", "build", wiki_corpus, "--out", tmp_path / "q", "--shard", "4/4"], capsys)
    assert_one_line_error(rc, err, "shard '4/4': need 0 <= I < N")
    rc, _, err = run_cli(["db", "search", shards["root"] / "missing.yaml", "x"], capsys)
    assert_one_line_error(rc, err, "no such shards file")
    # the file's retriever is the default of every command; an explicit one wins
    lexical = shards_file(tmp_path / "bm25.yaml", shards["paths"], retriever="bm25")
    outs = [json.loads(run_cli(["db", "search", f, "military political century", "-k", "2", "--json", *extra],
                               capsys)[1]) for f, extra in ((lexical, []), (shards["file"], ["--retriever", "bm25"]),
                                                            (lexical, ["--retriever", "dense"]))]
    assert outs[0] == outs[1] != outs[2]
    rc, _, err = run_cli(["db", "info", shards["file"], "--verify"], capsys)
    assert_one_line_error(rc, err, "--verify checks one database folder; run it on each part")


def test_a_local_shard_follows_edits_and_rebuilds(shards, tmp_path, wiki_corpus, tiny_db_config):
    import shutil

    copy = tmp_path / "db-0"
    shutil.copytree(shards["paths"][0], copy)
    part = LocalShard(copy)
    first, n_docs = part.retriever("dense"), part.info()["num_docs"]
    gone = part.db.live_doc_ids()[0]
    Database.open(copy).delete(doc_ids=[gone], show_progress=False)
    assert part.retriever("dense") is first and part.info()["num_docs"] == n_docs - 1  # an edit: same build
    assert gone not in {h.doc_id for h in part.search([gone], 40, "bm25").hits(0)}
    assert part.document(gone) is None and part.document(part.db.live_doc_ids()[0])
    cfg = BuildConfig(**{**tiny_db_config.__dict__, "shard": "0/3"})
    Database.build([wiki_corpus], copy, cfg, overwrite=True, show_progress=False)
    assert part.retriever("dense") is not first and part.info()["num_docs"] == n_docs  # a new build: made again


def test_commands_that_need_one_folder_say_so_for_a_shards_file(shards, capsys):
    rc, _, err = run_cli(["db", "delete", shards["file"], "--doc-id", "x"], capsys)
    assert_one_line_error(rc, err, "a shards file; this needs one database folder")


def _other_encoder(folder: Path, like: str, width: int | None = None) -> str:
    """The tiny encoder's shape (or another ``width``) and tokenizer with other weights."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(1)
    cfg = BertConfig.from_pretrained(like)
    if width is not None:
        cfg.hidden_size, cfg.intermediate_size = width, 2 * width
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(like).save_pretrained(folder)
    return str(folder)


def test_parts_are_checked_again_when_one_is_rebuilt(shards, tmp_path, wiki_corpus, tiny_db_config, tiny_encoder):
    import shutil

    paths = [tmp_path / f"db-{i}" for i in range(3)]
    for src, dst in zip(shards["paths"], paths, strict=True):
        shutil.copytree(src, dst)
    sharded = ShardedRetriever.open(shards_file(tmp_path / "s.yaml", paths))
    before = sharded.search(QUERIES[0], 5).hits(0)
    other = BuildConfig(**{**tiny_db_config.__dict__, "shard": "2/3", "encoder": _other_encoder(tmp_path / "enc",
                                                                                              tiny_encoder)})
    Database.build([wiki_corpus], paths[2], other, overwrite=True, show_progress=False)
    with pytest.raises(RetrolmError, match=f"shard {paths[2]}: encoder_fingerprint .* differs from {paths[0]}'s"):
        sharded.search(QUERIES[0], 5)  # part 0's query vectors would be searched among another encoder's keys
    with pytest.raises(RetrolmError, match=f"shard {paths[2]}: encoder_fingerprint .* differs"):
        sharded.refresh_infos()  # (the service's /api/info): the new build is not taken as checked
    with pytest.raises(RetrolmError, match=f"shard {paths[2]}: encoder_fingerprint .* differs"):
        sharded.search(QUERIES[0], 5)
    same = BuildConfig(**{**tiny_db_config.__dict__, "shard": "0/3", "bm25": True})
    Database.build([wiki_corpus], paths[2], same, overwrite=True, show_progress=False)
    with pytest.raises(RetrolmError, match="missing 2/3; twice 0/3"):
        sharded.search(QUERIES[0], 5)
    Database.build([wiki_corpus], paths[2], BuildConfig(**{**same.__dict__, "shard": "2/3"}), overwrite=True,
                   show_progress=False)
    after = sharded.search(QUERIES[0], 5).hits(0)  # the part is back: checked, and searched as before
    assert [(h.doc_id, h.position) for h in after] == [(h.doc_id, h.position) for h in before]
    # the same encoder in another folder (another machine's copy) is the same encoder: its fingerprint says so
    copied = shutil.copytree(tiny_encoder, tmp_path / "encoder-copy")
    Database.build([wiki_corpus], paths[2], BuildConfig(**{**same.__dict__, "shard": "2/3", "encoder": str(copied)}),
                   overwrite=True, show_progress=False)
    again = sharded.search(QUERIES[0], 5).hits(0)
    assert [(h.doc_id, h.position) for h in again] == [(h.doc_id, h.position) for h in before]
    sharded.close()


def test_a_first_part_rebuilt_with_a_wider_encoder_is_named(shards, tmp_path, wiki_corpus, tiny_db_config,
                                                            tiny_encoder):
    """The parts here share the query vectors of the first one's encoder: rebuilt with a 48-wide encoder, its vectors
    went to the others before the parts were checked again, and the error blamed another part's index."""
    import shutil

    paths = [tmp_path / f"db-{i}" for i in range(3)]
    for src, dst in zip(shards["paths"], paths, strict=True):
        shutil.copytree(src, dst)
    sharded = ShardedRetriever.open(shards_file(tmp_path / "s.yaml", paths))
    sharded.search(QUERIES[0], 5)
    wide = _other_encoder(tmp_path / "wide", tiny_encoder, width=48)
    Database.build([wiki_corpus], paths[0], BuildConfig(**{**tiny_db_config.__dict__, "shard": "0/3",
                                                           "encoder": wide}), overwrite=True, show_progress=False)
    with pytest.raises(RetrolmError, match=r"shard .*db-[12]: encoder_fingerprint .* differs from .*db-0's"):
        sharded.search(QUERIES[0], 5)
    sharded.close()


def test_mismatched_parts_and_bad_requests_get_one_line(shards, tmp_path, wiki_corpus, tiny_db_config):
    p0, p1 = shards["paths"][:2]
    tok = Database.build([wiki_corpus], tmp_path / "tok", BuildConfig(**{**tiny_db_config.__dict__, "shard": "2/3",
                         "tokenizer": "train:500"}), show_progress=False).path
    with pytest.raises(RetrolmError, match=f"shard {tok}: tokenizer_sha256 .* differs"):
        ShardedRetriever.open(shards_file(tmp_path / "s.yaml", [p0, p1, tok]))
    half = Database.build([wiki_corpus], tmp_path / "half", BuildConfig(**{**tiny_db_config.__dict__,
                          "shard": "1/2"}), show_progress=False).path
    with pytest.raises(RetrolmError, match="shards of different splits: 0/3, 1/2, 1/3"):
        ShardedRetriever.open(shards_file(tmp_path / "s.yaml", [p0, p1, half]))
    lexical = Database.build([wiki_corpus], tmp_path / "lex", BuildConfig(**{**tiny_db_config.__dict__, "index": "none",
                             "bm25": True, "shard": "2/3"}), show_progress=False).path
    both = ShardedRetriever.open(shards_file(tmp_path / "s.yaml", [p0, p1, lexical]))
    assert both.kind == "bm25"  # auto: BM25 when a part has no dense keys
    with pytest.raises(RetrolmError, match=f"dense search needs dense keys in every shard; {lexical} has none"):
        both.search("x", 3, kind="dense")
    with pytest.raises(RetrolmError, match="exclusion lists 1 document sets for 2 queries"):
        both.search(["a", "b"], 3, exclude_docs=[["x"]])
    assert [len(both.search(["", "  ", "military"], 3).hits(i)) for i in range(3)] == [0, 0, 3]  # blanks: nothing
    for bad, why in (("timeout: 0", "timeout must be > 0 and hybrid_depth >= 1"),
                     ("hybrid_depth: 0", "timeout must be > 0 and hybrid_depth >= 1"),
                     ("retriever: bm2", "retriever must be one of auto, dense, bm25, hybrid; got 'bm2'")):
        (tmp_path / "bad.yaml").write_text(f"shards: [{p0}]\n{bad}\n")
        with pytest.raises(RetrolmError, match=f"^{tmp_path / 'bad.yaml'}: {why}"):
            ShardedRetriever.open(tmp_path / "bad.yaml")
    with pytest.raises(RetrolmError, match=f"shard {p0} is the same database as {p0} .*: list each part once"):
        ShardedRetriever.open(shards_file(tmp_path / "s.yaml", [p0, p0], complete=False))
    with pytest.raises(RetrolmError, match=r"shards\.yaml is a shards file itself; list its parts instead"):
        ShardedRetriever.open(shards_file(tmp_path / "s.yaml", [shards["file"]], complete=False))
    # commands that need one folder refuse a shards file before they write anything
    from retrolm.eval.config import EvalConfig
    from retrolm.infer.rag_eval import RagEvalConfig

    for make in (lambda: EvalConfig(checkpoint="x", db=str(shards["file"])),
                 lambda: RagEvalConfig(db=str(shards["file"]))):
        with pytest.raises(RetrolmError, match=r"a shards file; .* needs one database folder"):
            make()
    # a db add whose documents all belong to other parts commits nothing
    part = Database.build([wiki_corpus], tmp_path / "p", BuildConfig(**{**tiny_db_config.__dict__, "shard": "0/3"}),
                          show_progress=False)
    version = part.meta["version"]
    others = write_jsonl(tmp_path / "o.jsonl", [d for d in wiki_docs(20, start=40) if shard_of(d["id"], 3) != 0])
    assert part.add([others], show_progress=False) == {"docs_added": 0, "chunks_added": 0, "docs_replaced": 0,
                                                        "docs_other_shards": len(wiki_docs(20, start=40)) - sum(
                                                            shard_of(d["id"], 3) == 0 for d in wiki_docs(20, 40))}
    assert Database.open(part.path).meta["version"] == version


def test_an_empty_part_cannot_be_built(tmp_path, tiny_db_config, capsys):
    docs = wiki_docs(3)
    empty = next(i for i in range(4) if all(shard_of(d["id"], 4) != i for d in docs))
    corpus = write_jsonl(tmp_path / "three.jsonl", docs)
    rc, _, err = run_cli(["db", "build", corpus, "--out", tmp_path / "e", "--encoder", tiny_db_config.encoder,
                          "--tokenizer", "train:500", "--shard", f"{empty}/4"], capsys)
    assert_one_line_error(rc, err, f"corpus produced no tokens in shard {empty}/4")


def test_fusion_keys_chunks_by_document_and_sorts_ties_like_one_database(built_db):
    from retrolm.retrieval import get_retriever
    from retrolm.retrieval.sharded import ShardHit, _fuse

    def hit(doc, pos, chunk, shard="a"):
        return ShardHit(chunk, doc, 1.0, "t", "", pos, shard=shard)

    # chunk 7 of part a renumbered between the two rankings: two chunks, not one chunk found twice
    fused = _fuse([hit("x", 0, 7), hit("y", 1, 3)], [hit("z", 2, 7)], 2, lambda h: (0, h.chunk_id))
    assert [(h.doc_id, round(h.score, 6)) for h in fused] == [("x", round(1 / 61, 6)), ("z", round(1 / 61, 6))]
    # one database searched as a single part: the same hybrid ranking, ties included
    single = ShardedRetriever([LocalShard(built_db.path)], "hybrid", complete=False)
    for q in QUERIES:
        want = get_retriever(built_db, "hybrid").search([q], 6)
        got = single.search(q, 6).hits(0)
        assert [h.chunk_id for h in got] == [int(i) for i in want.ids[0] if i >= 0]
        assert [h.score for h in got] == pytest.approx([float(s) for s in want.scores[0] if np.isfinite(s)])
    single.close()


def test_statistics_a_part_is_given_are_checked(shards):
    part = TestClient(create_app(Service(ServeConfig(db=str(shards["paths"][0])))))
    own = part.post("/api/terms", json={"queries": ["military works"]}).json()

    def ask(stats):
        r = part.post("/api/search", json={"queries": ["military works"], "retriever": "bm25", "term_stats": stats})
        return r.status_code, r.json().get("error", "")

    assert ask(own)[0] == 200
    assert ask({**own, "df": {"military": -1}})[1].startswith("term statistics need n_chunks, total_length >= 0")
    assert ask({**own, "n_chunks": own["n_chunks"] - 1})[1].endswith(f"do not include this index's own ("
                                                                      f"{own['n_chunks']} chunks, "
                                                                      f"{own['total_length']} terms, {own['df']})")
    assert "do not include" in ask({**own, "df": {}})[1]  # a sum without this part's counts
    assert ask({**own, "df": {"military": 0}})[0] == 400


def test_a_part_of_another_release_or_scorer_gets_one_line(shards, tmp_path):
    import shutil

    import httpx

    from retrolm.core.io import read_json, write_json
    from retrolm.db.lexical import SCORER
    from retrolm.retrieval.sharded import PartUnavailable, RemoteShard

    old = RemoteShard("http://old:8000")
    old._client = httpx.Client(base_url="http://old:8000", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json={"db": {"num_docs": 1}, "max_k": 50})))
    with pytest.raises(PartUnavailable, match="shard http://old:8000: /api/info answered without max_queries"):
        old.info()  # the front's upstream failing (502), not the client's request (400)
    bad = RemoteShard("http://bad:8000")
    bad.max_k, bad.max_queries = 50, 256
    bad._client = httpx.Client(base_url="http://bad:8000", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json={"results": [[{"score": 1.0}]], "flops": [None], "build_id": "b"})))
    with pytest.raises(PartUnavailable, match="shard http://bad:8000: /api/search answered hits of another shape"):
        bad.search(["q"], 2, "bm25")
    for body, path in (({"results": None, "flops": [None], "build_id": "b"}, "/api/search"),
                       ({"db": None, "max_k": 5, "max_queries": 2}, "/api/info"),
                       ({"db": {}, "max_k": None, "max_queries": 2}, "/api/info"),
                       ({"n_chunks": 3, "total_length": 9, "df": None}, "/api/terms")):
        bad._client = httpx.Client(base_url="http://bad:8000", transport=httpx.MockTransport(
            lambda request, body=body: httpx.Response(200, json=body)))  # were TypeErrors: a 500 from the front
        call = {"/api/search": lambda: bad.search(["q"], 2, "bm25"), "/api/info": bad.info,
                "/api/terms": lambda: bad.term_stats(["q"])}[path]
        with pytest.raises(PartUnavailable, match=f"shard http://bad:8000: {path} answered .* of another type"):
            call()
    # parts whose BM25 indexes score otherwise (another bm25s release, variant or parameters) are not merged
    copy = tmp_path / "db-2"
    shutil.copytree(shards["paths"][2], copy)
    meta = read_json(copy / "meta.json")
    scorer = copy / meta["bm25"] / SCORER
    scorer.write_text(scorer.read_text().replace('"k1": 1.5', '"k1": 1.2'))  # as another bm25s default would be
    write_json(copy / "meta.json", {**meta, "files": {k: v for k, v in meta["files"].items() if SCORER not in k}})
    with pytest.raises(RetrolmError, match=f"shard {copy}: bm25_scorer .* differs"):
        ShardedRetriever.open(shards_file(tmp_path / "s.yaml", [*shards["paths"][:2], copy]), retriever="bm25")
    dense = ShardedRetriever.open(shards_file(tmp_path / "s.yaml", [*shards["paths"][:2], copy]), retriever="dense")
    with pytest.raises(RetrolmError, match="bm25_scorer"):
        dense.search("x", 2, kind="bm25")
    dense.close()


def test_db_bm25_stores_the_chunk_lengths_an_older_index_lacks(shards, tmp_path):
    import shutil

    from retrolm.core.io import read_json, write_json
    from retrolm.db.lexical import LENGTHS

    copy = tmp_path / "db"
    shutil.copytree(shards["paths"][0], copy)
    meta = read_json(copy / "meta.json")
    (copy / meta["bm25"] / LENGTHS).unlink()  # as stored before 2026-12-07
    write_json(copy / "meta.json", {**meta, "files": {k: v for k, v in meta["files"].items() if LENGTHS not in k}})
    want = np.asarray(DatabaseView.open(shards["paths"][0]).lexical.chunk_lengths())
    assert np.array_equal(DatabaseView.open(copy).lexical.chunk_lengths(), want)  # counted again, in memory
    Database.open(copy).store_bm25(show_progress=False)
    folder = DatabaseView.open(copy).meta["bm25"]
    assert folder != meta["bm25"] and np.array_equal(np.load(copy / folder / LENGTHS), want)
    assert DatabaseView.open(copy).verify() > 0


def test_a_baseline_checkpoint_over_shards_says_it_reads_nothing(shards, tmp_path):
    from retrolm.models.retro import RetroConfig, RetroModel

    db = DatabaseView.open(shards["paths"][0])
    RetroModel(RetroConfig(vocab_size=db.tokenizer.vocab_size, seq_len=128, n_layer=1, n_head=2, d_model=16,
                           chunk_len=db.chunk_len, retro_layers=())).save_pretrained(tmp_path / "base")
    db.tokenizer.save(tmp_path / "base" / "tokenizer.json")
    with pytest.raises(RetrolmError, match="this checkpoint has no RETRO layers; generate without --db"):
        run_generate(GenerateConfig(checkpoint=str(tmp_path / "base"), prompt="The city", db=str(shards["file"])))


def test_a_part_restarted_with_other_limits_is_read_again():
    import httpx

    from retrolm.retrieval.sharded import RemoteShard

    limit = {"max_k": 50}

    def part(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/info":
            return httpx.Response(200, json={"db": {"num_docs": 1}, "max_k": limit["max_k"], "max_queries": 256})
        return httpx.Response(400, json={"error": f"k must be in 1..{limit['max_k']}, got 6"})

    shard = RemoteShard("http://p:1")
    shard._client = httpx.Client(base_url="http://p:1", transport=httpx.MockTransport(part))
    shard.info()
    limit["max_k"] = 5  # restarted with max_k=5 since the front read its limits
    with pytest.raises(RetrolmError, match="shard http://p:1: k=6 is more than its service allows \\(max_k=5"):
        shard.search(["q"], 6, "bm25")
    assert shard.max_k == 5


def test_parts_whose_bm25_text_form_differs_still_search_together(tmp_path, wiki_corpus, tiny_db_config, monkeypatch):
    """Parts built before the BM25 text form was recorded, one of them since rebuilt by db add (recording NFC): the
    front refused every BM25 search, and db bm25 could not bring the others up to date."""
    from retrolm.db import lexical
    from retrolm.text.corpus import shard_of

    real = lexical.LexicalIndex.scorer
    with monkeypatch.context() as m:  # as stored before: no text_form
        m.setattr(lexical.LexicalIndex, "scorer",
                  lambda self: {k: v for k, v in real(self).items() if k != "text_form"})
        paths = [Database.build([wiki_corpus], tmp_path / f"db-{i}",
                                BuildConfig(**{**tiny_db_config.__dict__, "shard": f"{i}/3", "bm25": True}),
                                show_progress=False).path for i in range(3)]
    doc_id = next(f"new-{j}" for j in range(100) if shard_of(f"new-{j}", 3) == 0)
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": doc_id, "text": wiki_docs(1, start=60)[0]["text"]}])
    Database.open(paths[0]).add([new], show_progress=False)
    assert json.loads((paths[0] / Database.open(paths[0]).meta["bm25"] / "scorer.json").read_text())["text_form"]
    r = ShardedRetriever([LocalShard(p) for p in paths], "bm25")
    try:
        assert r.search("a river in Europe", 3).hits(0)
    finally:
        r.close()
