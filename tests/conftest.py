"""Shared fixtures: tiny real corpora (Wikipedia summaries bundled in data/), a tiny random BERT encoder."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
WIKI_SAMPLE = REPO / "data" / "wiki-sample.jsonl"


def wiki_docs(n: int, start: int = 0) -> list[dict]:
    """The first ``n`` documents (after ``start``) of the bundled Wikipedia sample."""
    with open(WIKI_SAMPLE, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return [{"id": d["id"], "text": d["text"]} for d in docs[start : start + n]]


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """Run ``retrolm ARGS`` in-process → (exit status, stdout, stderr)."""
    from retrolm.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with MiniLM's WordPiece tokenizer, saved as a local HF folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retrolm.core.hub import resolve_model

    folder = tmp_path_factory.mktemp("tiny-encoder")
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm").path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def wiki_corpus(tmp_path_factory) -> Path:
    """40 real Wikipedia summaries as JSONL."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "wiki.jsonl", wiki_docs(40))


@pytest.fixture(scope="session")
def tiny_db_config(tiny_encoder):
    from retrolm.db import BuildConfig

    return BuildConfig(encoder=tiny_encoder, tokenizer="train:1000", batch_size=16, shard_size=64)


@pytest.fixture(scope="session")
def built_db(tmp_path_factory, wiki_corpus, tiny_db_config):
    """A read-only database over the 40-document corpus (tests that mutate build their own)."""
    from retrolm.db import Database

    return Database.build([wiki_corpus], tmp_path_factory.mktemp("db") / "db", tiny_db_config, show_progress=False)


def search(db, queries, k: int = 5, retriever: str = "dense", exclude_doc_ids=()):
    """Hits of a text query (a list of them for a list of queries) through the one retrieval interface."""
    from retrolm.retrieval import Exclusion, get_retriever

    single = isinstance(queries, str)
    queries = [queries] if single else list(queries)
    excl = [i for i in (db.store.doc_index(d) for d in exclude_doc_ids) if i is not None]
    exclusion = Exclusion(docs=[excl] * len(queries)) if excl else None
    result = get_retriever(db, retriever).search(queries, k, exclusion)
    hits = [result.hits(i) for i in range(len(queries))]
    return hits[0] if single else hits


def tiny_retro_config(vocab_size: int = 97, chunk_len: int = 8, **overrides):
    """3 layers with CCA in 2 and 3 (the encoder is conditioned on layer-2 inputs), a narrower 2-layer encoder."""
    from retrolm.models.retro import RetroConfig

    kw = dict(vocab_size=vocab_size, seq_len=64, n_layer=3, n_head=2, d_model=32, chunk_len=chunk_len,
              retro_layers=(2, 3), enc_n_layer=2, enc_d_model=16, enc_n_head=2)
    return RetroConfig(**{**kw, **overrides})


def assert_one_line_error(rc: int, err: str, *fragments: str) -> str:
    """A CLI failure as users must see it: exit code 2, one ``error:`` line holding every fragment, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() reports it: no file name


class FullFile:
    """A file opened for writing on a full disk: every write fails as ``write(2)`` reports it (no file name)."""

    def __init__(self, path, mode="wb", *args, **kwargs):
        self.f = open(path, mode, *args, **kwargs)  # noqa: SIM115 - closed through __getattr__ / __exit__

    def write(self, data):
        no_space()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)
