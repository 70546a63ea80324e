"""The HTTP service: search, answers, generation and documents with their sources, live database edits, the page,
and one-line errors — over FastAPI's TestClient, on the tiny store and copying Llama of the test-time RAG tests."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import assert_one_line_error, run_cli, write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.db import BuildConfig, Database
from retrolm.infer.rag import PassageRetriever, RagConfig
from retrolm.serve import ServeConfig, Service
from retrolm.serve.app import create_app

_spec = importlib.util.spec_from_file_location("rag_tests", Path(__file__).parents[1] / "infer" / "test_rag.py")
_rag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rag)
world = _rag.world  # a BM25 store of summaries + "The code of NAME is WORD" facts, and a Llama that copies

PLAIN = RagConfig(template="{passages}{question}", max_new_tokens=6, top_n=3, passages=1)


@pytest.fixture(scope="module")
def client(world):
    service = Service(ServeConfig(db=str(world["db"].path), reader=world["lm"], rag=PLAIN))
    return TestClient(create_app(service))


def test_search_answer_generate_and_document_show_their_sources(client, world):
    info = client.get("/api/info").json()
    assert info["retrievers"] == ["bm25"] and info["reader"] == info["generator"] == world["lm"]
    assert info["db"]["num_docs"] == 30 and info["reranker"] is None  # one answer reranks only when asked

    hits = client.get("/api/search", params={"q": "The code of quenmir is", "k": 3}).json()["hits"]
    assert len(hits) == 3 and hits[0]["doc_id"] == "fact-quenmir"
    assert hits[0]["text"].startswith("The code of quenmir is basalt")

    a = client.post("/api/answer", json={"question": "The code of quenmir is"}).json()
    assert a["answer"] == "basalt" and a["mode"] == "retrieval"
    assert [p["doc_id"] for p in a["supporting_passages"]] == ["fact-quenmir"] and a["flops"]["total"] > 0
    four = client.post("/api/answer", json={"question": "The code of quenmir is", "passages": 4}).json()
    assert len(four["passages"]) == 4  # more passages than the service's top_n (3): as many candidates are fetched
    other = client.post("/api/answer", json={"question": "The code of quenmir is", "query": "zorblat"}).json()
    assert other["supporting_passages"][0]["doc_id"] == "fact-zorblat"  # searched with the query, read the question

    g = client.post("/api/generate", json={"prompt": "The code of zorblat is", "max_new_tokens": 3}).json()
    assert g["retrieval"] and g["new_tokens"] == 3 and g["chunks"][0]["sources"][0]["doc_id"] == "fact-zorblat"
    assert g["text"].strip().startswith("amber")  # it copies what the passage it read says
    off = client.post("/api/generate", json={"prompt": "The code of zorblat is", "max_new_tokens": 3,
                                             "retrieval": False}).json()
    assert not off["retrieval"] and all(not c["sources"] for c in off["chunks"])

    doc = client.get("/api/document", params={"id": "fact-quenmir"}).json()
    assert doc["text"] == "The code of quenmir is basalt" and doc["chunks"][1] - doc["chunks"][0] == 1


def test_bad_requests_get_one_line(client):
    def err(r, status):
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert err(client.get("/api/search", params={"q": "  "}), 400) == "the query is empty"
    assert err(client.get("/api/search", params={"q": "x", "k": 0}), 400) == "k must be in 1..50, got 0"
    assert "built without dense keys" in err(client.get("/api/search", params={"q": "x", "retriever": "dense"}), 400)
    assert err(client.get("/api/search"), 422) == "q: Field required"
    assert err(client.post("/api/answer", json={}), 422) == "question: Field required"
    assert err(client.post("/api/answer", json={"question": "x", "query": " "}), 400) == "the query is empty"
    assert err(client.post("/api/answer", json={"question": "x", "top_n": 2, "passages": 3}), 400).startswith(
        "passages (3) and cross_doc_passages")
    assert err(client.post("/api/generate", json={"prompt": "x", "max_new_tokens": 10_000}), 400) == \
        "max_new_tokens must be in 1..256, got 10000"
    cold = client.post("/api/generate", json={"prompt": "x", "temperature": -1})
    assert "a finite temperature >= 0" in err(cold, 400)
    assert err(client.get("/api/document", params={"id": "nope"}), 404).startswith("no document 'nope'")
    assert err(client.get("/api/nothing"), 404) == "Not Found" and err(client.get("/api/answer"), 405)
    assert err(client.post("/api/generate", json={"prompt": "x", "seed": 2**64}), 400).startswith("seed must be")
    # "\ud800" is valid JSON but no text (it cannot be tokenized): a 400, not a 500
    lone = '{"question": "What is \\ud800?"}'
    assert err(client.post("/api/answer", content="not json", headers={"content-type": "application/json"}), 422) \
        == "request body: not valid JSON (Expecting value)"
    assert err(client.post("/api/answer", content=lone, headers={"content-type": "application/json"}), 400) == \
        "the question: not valid Unicode (a lone surrogate, U+D800)"
    assert err(client.post("/api/generate", content=lone.replace("question", "prompt"),
                           headers={"content-type": "application/json"}), 400).startswith("the prompt: not valid")
    # bytes that are not UTF-8, and nesting deeper than the parser goes: malformed bodies like any other (a bare 400)
    for body in (b'{"queries": ["caf\xe9"]}', b'{"queries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        assert err(client.post("/api/search", content=body, headers={"content-type": "application/json"}), 422) \
            == "request body: not valid JSON (cannot be parsed)"
    # a temperature or top_p that float32 holds as 0: sampled NaN probabilities (a 500)
    for settings in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}):
        r = client.post("/api/generate", json={"prompt": "The code of zorblat is", "max_new_tokens": 2, **settings})
        assert r.status_code == 200, r.text


def test_requests_without_sizes_stay_within_max_k_and_generation_reads_its_retriever(world, monkeypatch):
    """A front whose parts allow fewer results than the defaults (top_n 10, k 5) failed every request that gave no
    size; and generate.retriever was ignored for the service's own retriever."""
    service = Service(ServeConfig(db=str(world["db"].path), reader=world["lm"], max_k=3,
                                  rag=dataclasses.replace(PLAIN, top_n=10, passages=3)))
    client = TestClient(create_app(service))
    assert len(client.get("/api/search", params={"q": "The code of zorblat is"}).json()["hits"]) == 3
    assert len(client.post("/api/search", json={"queries": ["The code of zorblat is"]}).json()["results"][0]) == 3
    fetched = []
    real_retrieve = PassageRetriever.retrieve

    def counted(self, questions, n):
        fetched.append(n)
        return real_retrieve(self, questions, n)

    monkeypatch.setattr(PassageRetriever, "retrieve", counted)
    for body in ({}, {"passages": 2}):  # a remote part with max_k=3 refused the 10 of rag.top_n
        answer = client.post("/api/answer", json={"question": "The code of zorblat is", **body})
        assert answer.status_code == 200 and fetched[-1] == 3
    assert client.get("/api/search", params={"q": "x", "k": 4}).json()["error"] == "k must be in 1..3, got 4"
    more = client.post("/api/answer", json={"question": "The code of zorblat is", "passages": 5})
    assert more.status_code == 400 and more.json()["error"] == "passages must be in 1..3, got 5"  # its own setting
    asked = []
    real = Service._retriever

    def spy(self, kind):
        asked.append(kind)
        return real(self, kind)

    for kind, want in (("bm25", "bm25"), ("auto", None)):
        s = Service(ServeConfig(db=str(world["db"].path), reader=world["lm"], rag=PLAIN,
                                generate=dataclasses.replace(service.cfg.generate, retriever=kind)))
        asked.clear()
        s._retriever = spy.__get__(s)
        s.generate("The code of zorblat is", max_new_tokens=2)
        assert asked == [want]
    with pytest.raises(RetrolmError, match=r"serve: generate\.retriever must be one of auto, dense, bm25, hybrid"):
        ServeConfig(db=str(world["db"].path), generate=dataclasses.replace(service.cfg.generate, retriever="nope"))


def test_top_n_alone_shrinks_the_passages_read(world):
    service = Service(ServeConfig(db=str(world["db"].path), reader=world["lm"],
                                  rag=dataclasses.replace(PLAIN, passages=2)))
    answer = TestClient(create_app(service)).post("/api/answer", json={"question": "The code of quenmir is",
                                                                           "top_n": 1}).json()
    assert len(answer["passages"]) == 1  # it was 'passages (2) and cross_doc_passages (4) cannot exceed top_n (1)'


def test_a_generator_without_retrieval_layers_generates_without_retrieval(world):
    from retrolm.infer.generator import Generator
    from retrolm.models.retro import RetroConfig, RetroModel

    db = world["db"]
    service = Service(ServeConfig(db=str(db.path)))
    baseline = RetroModel(RetroConfig(vocab_size=db.tokenizer.vocab_size, seq_len=128, n_layer=1, n_head=2,
                                      d_model=16, chunk_len=db.chunk_len, retro_layers=())).eval()
    service.generator = Generator(baseline, db.tokenizer, "retro", "baseline")
    client = TestClient(create_app(service))
    assert client.get("/api/info").json()["generator_retrieves"] is False
    g = client.post("/api/generate", json={"prompt": "The code of zorblat is", "max_new_tokens": 3}).json()
    assert g["retrieval"] is False and g["new_tokens"] == 3  # it was 400 'generate without --db' for every request


def test_database_edits_show_at_the_next_request(world, tmp_path):
    """Knowledge update without a restart: another process deletes a document, the service stops returning it."""
    folder = tmp_path / "db"
    shutil.copytree(world["db"].path, folder)
    client = TestClient(create_app(Service(ServeConfig(db=str(folder)))))  # search only: no models loaded

    def ids() -> list[str]:
        return [h["doc_id"] for h in client.get("/api/search", params={"q": "The code of quenmir is"}).json()["hits"]]

    assert ids()[0] == "fact-quenmir"
    Database.open(folder).delete(["fact-quenmir"], show_progress=False)
    assert "fact-quenmir" not in ids()
    assert client.get("/api/document", params={"id": "fact-quenmir"}).status_code == 404
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "fact-quenmir-2", "text": "The code of quenmir is obsidian"}])
    Database.open(folder).add([new], show_progress=False)  # added documents show too (the view follows the folder)
    assert ids()[0] == "fact-quenmir-2"
    assert client.get("/api/document", params={"id": "fact-quenmir-2"}).json()["text"].endswith("obsidian")
    assert client.post("/api/answer", json={"question": "x"}).json()["error"] == \
        "this service answers no questions: start it with --reader MODEL"


def test_the_page_works_offline_and_asks_every_endpoint(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"(src|href)=\"?(https?:)?//", r.text)  # no script, style or font from elsewhere
    for endpoint in ("/api/info", "/api/search", "/api/answer", "/api/generate", "/api/document"):
        assert endpoint in r.text
    assert "innerHTML" not in r.text  # database text goes in as text, never as markup


def test_cli_refuses_bad_settings_before_loading_anything(world, capsys):
    rc, _, err = run_cli(["serve"], capsys)
    assert_one_line_error(rc, err, "serve: --db is required")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _, err = run_cli(["serve", "--db", world["db"].path, "--port", port], capsys)
    assert_one_line_error(rc, err, f"serve: cannot listen on 127.0.0.1:{port}")
    rc, _, err = run_cli(["serve", "--db", world["db"].path, "port=70000"], capsys)
    assert_one_line_error(rc, err, "port must be in 1..65535")
    rc, _, err = run_cli(["serve", "--db", world["db"].path, "retriever=nope"], capsys)
    assert_one_line_error(rc, err, "serve: retriever must be one of auto, dense, bm25, hybrid; got 'nope'")


def test_a_rebuild_under_the_service_remakes_its_retrievers_and_checks_the_generator_again(built_db, wiki_corpus,
                                                                                           tmp_path):
    folder = tmp_path / "db"
    shutil.copytree(built_db.path, folder)
    service = Service(ServeConfig(db=str(folder)))

    class Checked:  # a generator that reads neighbours by token id: it must be checked against each build
        retrieves, name, kind, calls = True, "retro", "retro", 0

        def check_database(self, db):
            Checked.calls += 1
            if not db.has_dense:
                raise RetrolmError(f"{db.path}: built without the encoder this model was trained with")

    service.generator = Checked()
    client = TestClient(create_app(service))
    assert client.get("/api/search", params={"q": "a city in France"}).json()["retriever"] == "dense"
    Database.build([wiki_corpus], folder, BuildConfig(tokenizer="train:1000", index="none", bm25=True),
                   overwrite=True, show_progress=False)
    # the default retriever follows the database (it stayed the dense one: a 500 on a missing index)
    r = client.get("/api/search", params={"q": "a city in France"})
    assert r.status_code == 200 and r.json()["retriever"] == "bm25" and r.json()["hits"]
    assert client.get("/api/info").json()["retrievers"] == ["bm25"]
    r = client.post("/api/generate", json={"prompt": "Paris"})  # checked again before it reads the new build
    assert r.status_code == 400 and "built without the encoder" in r.json()["error"] and Checked.calls == 1


def test_port_check_tries_every_address_the_host_resolves_to(monkeypatch):
    """uvicorn binds each address of a name such as localhost (::1 and 127.0.0.1): one taken is refused."""
    from retrolm.cli.serve import _check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        both = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: both)
        with pytest.raises(RetrolmError, match=rf"cannot listen on 127\.0\.0\.1:{port} "):
            _check_port("localhost", port)
