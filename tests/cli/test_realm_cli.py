"""``retrolm realm pretrain|finetune|eval`` on a tiny database (the conftest's 2-layer random BERT as encoder)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli, write_jsonl
from retrolm.db import BuildConfig, Database

FACTS = [("Alice", "Paris"), ("Bob", "London"), ("Carol", "Berlin"), ("David", "Madrid"), ("Emma", "Rome")]


def test_realm_pretrain_finetune_eval(tmp_path, tiny_encoder, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"{p} lives in {c}."}
                                                for i, (p, c) in enumerate(FACTS)] +
                         [{"id": "x", "text": "The sky is blue and water is wet."}])
    db = Database.build([corpus], tmp_path / "db", BuildConfig(encoder=tiny_encoder, tokenizer="train:300",
                                                                batch_size=16, shard_size=64), show_progress=False)
    assert db.store.n_chunks == 6
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": str(i), "question": f"Where does {p} live?", "answers": [c]}
                                             for i, (p, c) in enumerate(FACTS)])
    common = ["max_doc_len=32", "max_query_len=16", "embed_dim=8"]
    run = tmp_path / "run"
    rc, out, err = run_cli(["realm", "pretrain", "--db", db.path, "--out", run, f"encoder={tiny_encoder}", "steps=2",
                            "batch_size=2", "k=3", "refresh_every=1", *common, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["steps"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    rc, out, err = run_cli(["realm", "pretrain", "--db", db.path, "--out", run, f"encoder={tiny_encoder}", "steps=3",
                            "batch_size=2", "k=3", *common, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["steps"] == 3  # resumed at step 2, one more step
    assert json.loads((run / "pretrain.json").read_text())["steps"][-1]["step"] == 3

    ft = tmp_path / "ft"
    rc, out, err = run_cli(["realm", "finetune", "--checkpoint", run, "--db", db.path, "--data", qa, "--out", ft,
                            "steps=2", "qa_k=3", *common, "--json"], capsys)
    assert rc == 0, err
    assert (ft / "final" / "model.json").is_file()

    ev = tmp_path / "ev"
    rc, out, err = run_cli(["realm", "eval", "--checkpoint", ft, "--db", db.path, "--data", qa, "--out", ev,
                            "qa_k=6", *common, "--json"], capsys)
    assert rc == 0, err
    result = json.loads((ev / "realm.json").read_text())
    assert {"em", "f1", "n", "recall_at_k"} <= set(result)
    assert result["n"] == 5 and result["recall_at_k"] == 100.0  # every chunk retrieved: every answer is in the top 6
    assert json.loads(out)["em"] == result["em"]


def test_realm_eval_bad_checkpoint_is_one_line_error(tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": "1", "question": "q?", "answers": ["a"]}])
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(["realm", "eval", "--checkpoint", tmp_path / "empty", "--db", tmp_path / "nodb", "--data", qa,
                          "--out", tmp_path / "ev"], capsys)
    assert rc == 2
    assert "Traceback" not in err
    assert "not a REALM model" in err


def test_database_documents_skip_deleted_chunks(tmp_path, tiny_encoder):
    import torch

    from retrolm.train.realm_index import DatabaseDocuments, DocumentIndex

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"{p} lives in {c}."}
                                                for i, (p, c) in enumerate(FACTS)])
    db = Database.build([corpus], tmp_path / "db", BuildConfig(encoder=tiny_encoder, tokenizer="train:300",
                                                                batch_size=16, shard_size=64), show_progress=False)
    docs = DatabaseDocuments(db)
    assert len(docs) == 5 and docs.texts([1]) == ["Bob lives in London."] and docs.live() is None
    db.delete(["d1"], show_progress=False)
    assert docs.live().tolist() == [True, False, True, True, True]
    index = DocumentIndex(torch.eye(5), 0, torch.from_numpy(docs.live()))
    assert 1 not in index.search(torch.eye(5)[1:2], 4)[1][0].tolist()


def test_untrained_realm_from_an_encoder_retrieves_as_the_frozen_encoder(tmp_path, tiny_encoder, capsys):
    """``--checkpoint ENCODER pooling=mean embed_dim=null normalize=true``: the no-pre-training baseline. Its
    document embeddings are the database's own frozen-encoder keys and its query embeddings the database's query
    vectors × COSINE_SCALE, so it ranks documents as the database's dense search does (without ``normalize`` the
    vectors are not of unit length: documents with long ones rank higher); fine-tuning with
    train_query_encoder=false leaves the query encoder as it was, and the setting is kept in the saved model."""
    import numpy as np
    import torch

    from retrolm.cli.realm import load_realm
    from retrolm.models.realm import COSINE_SCALE
    from retrolm.retrieval import DenseRetriever
    from retrolm.train.realm import RealmConfig

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"{p} lives in {c}."}
                                                for i, (p, c) in enumerate(FACTS)])
    db = Database.build([corpus], tmp_path / "db", BuildConfig(encoder=tiny_encoder, tokenizer="train:300",
                                                                batch_size=16, shard_size=64), show_progress=False)
    cfg = RealmConfig(embed_dim=None, pooling="mean", normalize=True, max_doc_len=32, max_query_len=16)
    model = load_realm(Path(tiny_encoder), cfg)
    texts = db.chunk_texts(np.arange(db.store.n_chunks))
    questions = [f"Where does {p} live?" for p, _ in FACTS]
    with torch.no_grad():
        docs_v = model.embed_documents(**_ids(model, texts)).numpy()
        queries_v = model.embed_queries(**_ids(model, questions)).numpy()
        raw = load_realm(Path(tiny_encoder), RealmConfig(embed_dim=None, pooling="mean")).embed_documents(
            **_ids(model, texts)).numpy()
    np.testing.assert_allclose(docs_v, db.index.reconstruct(np.arange(len(texts))), atol=1e-5)
    np.testing.assert_allclose(queries_v / COSINE_SCALE, DenseRetriever(db).prepare(questions), atol=1e-5)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 0.1  # without normalize: other lengths, other ranking

    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": str(i), "question": f"Where does {p} live?", "answers": [c]}
                                             for i, (p, c) in enumerate(FACTS)])
    common = ["max_doc_len=32", "max_query_len=16", "embed_dim=null", "pooling=mean", "normalize=true"]
    rc, _, err = run_cli(["realm", "finetune", "--checkpoint", tiny_encoder, "--db", db.path, "--data", qa, "--out",
                          tmp_path / "ft", "steps=2", "qa_k=3", "lr=1e-2", "train_query_encoder=false", *common,
                          "--json"], capsys)
    assert rc == 0, err
    tuned = load_realm(tmp_path / "ft", cfg)
    assert tuned.shape.normalize
    for name, value in model.query_encoder.state_dict().items():
        assert torch.equal(value, tuned.query_encoder.state_dict()[name]), name
    assert not all(torch.equal(v, tuned.reader.state_dict()[k]) for k, v in model.reader.state_dict().items())
    rc, out, err = run_cli(["realm", "eval", "--checkpoint", tiny_encoder, "--db", db.path, "--data", qa, "--out",
                            tmp_path / "ev", "qa_k=2", *common, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["n"] == 5


def _ids(model, texts):
    batch = model.tokenize(texts, 32)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
