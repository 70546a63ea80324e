"""What ``retrolm serve`` serves, without HTTP: one database opened once, a reader and a generator loaded once, and
the requests they answer (search, answer a question with its sources, continue a text with the chunks each span read,
show a document). :mod:`retrolm.serve.app` puts it behind FastAPI.

The database view follows other processes' edits at every search (``retrolm db add`` / ``db delete`` on the same
folder take effect at the next request: the knowledge update of SPEC R7 without restarting anything). Models and
searches are not thread-safe, so requests are served one at a time (a lock); run several processes for more.

The database may be a shards file (:mod:`retrolm.retrieval.sharded`): the service then fronts the parts, each a
folder here or another machine's ``retrolm serve`` of its part, and searches, answers and in-context generation read
all of them (``POST /api/search`` is how a front asks a part).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

from retrolm.core.errors import RetrolmError
from retrolm.core.io import check_unicode
from retrolm.db import DatabaseView
from retrolm.db.lexical import TermStats
from retrolm.infer.generate import GenerateConfig
from retrolm.infer.generator import Generator
from retrolm.infer.rag import PassageRetriever, RagConfig, RagPipeline
from retrolm.retrieval import RETRIEVERS, BM25Retriever
from retrolm.retrieval.sharded import ShardedRetriever, exclusion_by_ids, is_shards_file


class NotFoundError(RetrolmError):
    """What a request names is not there (HTTP 404)."""


@dataclass
class ServeConfig:
    """``retrolm serve``: the database, the models and the limits of one service."""

    db: str | None = None
    """Database folder, or a shards file naming the parts of one (required)."""
    reader: str | None = None
    """Causal LM answering questions (``POST /api/answer``): HF folder, short name (smollm2-135m) or hub name; None →
    the service searches but does not answer."""
    generator: str | None = None
    """Model continuing text (``POST /api/generate``): a RETRO / RETRO-fitted checkpoint, or a causal LM (it reads
    passages in its context); None → the reader, if any."""
    retriever: str = "auto"
    """Default retriever: auto | dense | bm25 | hybrid (auto: dense when the database has dense keys, else BM25)."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0: every interface; there is no authentication)."""
    port: int = 8000
    device: str = "cpu"
    max_k: int = 50
    """Most results one search may ask for."""
    max_queries: int = 256
    """Most queries one ``POST /api/search`` may carry."""
    max_new_tokens: int = 256
    """Most tokens one generation or answer may ask for."""
    rag: RagConfig = field(default_factory=RagConfig)
    """How questions are answered (``rag.top_n=10 rag.passages=3 rag.reranker=...``); its db, reader, retriever and
    device are this config's."""
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(checkpoint="-", prompt="-"))
    """Generation defaults (``generate.stride=32 generate.max_new_tokens=64``; a request may change the sampling
    settings); its checkpoint, prompt and db are not read."""

    def __post_init__(self) -> None:
        if self.db is None:
            raise RetrolmError("serve: --db is required")
        if not 0 < self.port < 65536:
            raise RetrolmError(f"serve: port must be in 1..65535, got {self.port}")
        if self.max_k < 1 or self.max_new_tokens < 1 or self.max_queries < 1:
            raise RetrolmError("serve: max_k, max_new_tokens and max_queries must be >= 1")
        for name, value in (("retriever", self.retriever), ("generate.retriever", self.generate.retriever)):
            if value != "auto" and value not in RETRIEVERS:  # else every search (or generation) would fail
                raise RetrolmError(f"serve: {name} must be one of auto, {', '.join(RETRIEVERS)}; got {value!r}")


class Service:
    """One database and the models that read it, serving requests one at a time. Every method returns plain JSON
    data and raises :class:`RetrolmError` for a request it cannot serve (the HTTP layer answers 400)."""

    def __init__(self, cfg: ServeConfig, db: DatabaseView | None = None) -> None:
        self.cfg = cfg
        self.sharded: ShardedRetriever | None = None
        if db is None and is_shards_file(cfg.db):
            self.sharded = ShardedRetriever.open(cfg.db, device=cfg.device, retriever=cfg.retriever)
        # follow: documents added by another process (db add, add --replace) show too, not only deletions
        self.db = db if db is not None or self.sharded else DatabaseView.open(cfg.db, device=cfg.device, follow=True)
        self.lock = threading.Lock()
        self._retrievers: dict[str, PassageRetriever] = {}
        self.pipe: RagPipeline | None = None
        if cfg.reader is not None:
            rag = dataclasses.replace(cfg.rag, db=cfg.db, reader=cfg.reader, retriever=cfg.retriever,
                                      device=cfg.device)
            self.pipe = RagPipeline.load(rag, self.db, sharded=self.sharded)
        self.generator: Generator | None = None
        if cfg.generator is not None and cfg.generator != cfg.reader:
            self.generator = Generator.load(cfg.generator, device=cfg.device)
            self._check_generator()
        elif self.pipe is not None:  # the reader continues text too: loaded once
            lm = self.pipe.reader.lm
            self.generator = Generator(lm, self.pipe.reader.tok, "causal_lm", lm.name)
        # the build the retrievers were made for, and the one the generator was checked against
        self._build = self._checked = self.db.meta.get("build_id") if self.db is not None else None

    # ------------------------------------------------------------------------------------------------ requests
    def info(self) -> dict[str, Any]:
        """The database (counts, tokenizer, encoder, indexes), the retrievers it serves and the loaded models."""
        with self.lock:
            self._sync()
            if self.sharded is not None:
                self.sharded.refresh_infos()
                db, kinds = self.sharded.describe(), self.sharded.kinds()
            else:  # BM25 is built if not stored
                db, kinds = self.db.info(), ["dense", "bm25", "hybrid"] if self.db.has_dense else ["bm25"]
            return {"db": db, "retrievers": kinds, "default_retriever": self.cfg.retriever,
                    "reader": self.pipe.reader.lm.name if self.pipe else None,
                    "reranker": self.pipe.reranker.describe() if self.pipe and self.pipe.reranker else None,
                    "generator": self.generator.name if self.generator else None,
                    "generator_kind": self.generator.kind if self.generator else None,
                    "generator_retrieves": bool(self.generator and self.generator.retrieves),
                    "max_k": self.max_k, "max_queries": self.cfg.max_queries,
                    "max_new_tokens": self.cfg.max_new_tokens}

    def search(self, query: str, k: int | None = None, retriever: str | None = None) -> dict[str, Any]:
        """The ``k`` best chunks for ``query`` (default 5, or fewer where the service allows fewer), each with its
        continuation, document and score."""
        query = _text(query, "query")
        out = self.search_batch([query], k, retriever)  # which checks k (and gives the default)
        return {"query": query, "retriever": out["retriever"], "hits": out["results"][0]}

    def search_batch(self, queries: list[str], k: int | None = None, retriever: str | None = None,
                     exclude_doc_ids: list[list[str]] | None = None, term_stats: TermStats | None = None
                     ) -> dict[str, Any]:
        """The ``k`` best chunks of each query (``exclude_doc_ids``: per query, documents it must not retrieve;
        ``term_stats``: BM25 statistics of all parts of a sharded database, to score with), and per query the encoder
        and search FLOPs. This is how the front of a sharded database asks each part."""
        if not isinstance(queries, list) or not queries:
            raise RetrolmError("queries must be a non-empty list")
        if len(queries) > self.cfg.max_queries:
            raise RetrolmError(f"at most {self.cfg.max_queries} queries per request, got {len(queries)}")
        queries = [_text(q, "query") for q in queries]
        k = self._k(k)
        if exclude_doc_ids is not None and len(exclude_doc_ids) != len(queries):
            raise RetrolmError(f"exclude_doc_ids lists {len(exclude_doc_ids)} sets for {len(queries)} queries")
        with self.lock:
            self._sync()
            if self.sharded is not None:
                if term_stats is not None:
                    raise RetrolmError("term_stats are for a part of a sharded database; this service fronts the parts")
                result = self.sharded.search(queries, k, exclude_doc_ids, kind=retriever)
                hits = [[h.to_dict() for h in result.hits(i)] for i in range(len(queries))]
                return {"retriever": result.kind, "results": hits, "flops": None}
            ret = self._retriever(retriever)
            searcher = ret.retriever
            if term_stats is not None:
                if ret.kind != "bm25":
                    raise RetrolmError(f"term_stats are BM25's; this search is {ret.kind}")
                searcher = BM25Retriever(self.db, term_stats)
            result = searcher.search(queries, k, exclusion_by_ids(self.db, exclude_doc_ids))
            hits = [[h.to_dict() for h in result.hits(i)] for i in range(len(queries))]
            return {"retriever": ret.kind, "results": hits, "build_id": self.db.meta.get("build_id"),
                    "flops": [{"encoder": f.encoder, "search": f.search} for f in map(ret.flops, queries)]}

    def terms(self, queries: list[str]) -> dict[str, Any]:
        """This database's BM25 statistics for the queries' terms (what a sharded front sums over its parts)."""
        if not isinstance(queries, list) or len(queries) > self.cfg.max_queries:
            raise RetrolmError(f"queries must be a list of at most {self.cfg.max_queries}")
        with self.lock:
            self._sync()
            if self.sharded is not None:
                raise RetrolmError("term statistics come from a part; this service fronts the parts")
            return self.db.lexical.term_stats(queries).to_dict()

    def answer(self, question: str, top_n: int | None = None, passages: int | None = None,
               max_new_tokens: int | None = None, query: str | None = None) -> dict[str, Any]:
        """Retrieve → (rerank →) read: the answer, the passages read and those that support it, FLOPs by stage;
        ``query``: what to search with instead of the question."""
        question = _text(question, "question")
        query = _text(query, "query") if query is not None else None
        if self.pipe is None:
            raise RetrolmError("this service answers no questions: start it with --reader MODEL")
        rag = self.pipe.cfg
        changes = {name: value for name, value in (("top_n", top_n), ("passages", passages),
                                                   ("max_new_tokens", max_new_tokens)) if value is not None}
        if "top_n" in changes:
            changes["top_n"] = _bounded(changes["top_n"], "top_n", self.max_k)
        if "max_new_tokens" in changes:
            changes["max_new_tokens"] = _bounded(changes["max_new_tokens"], "max_new_tokens", self.cfg.max_new_tokens)
        if "passages" in changes:  # within what one search may bring back (a front's parts may allow fewer)
            changes["passages"] = _bounded(changes["passages"], "passages", self.max_k * rag.hops)
        if "passages" in changes and "top_n" not in changes:  # more passages than candidates: fetch as many
            changes["top_n"] = min(max(rag.top_n, changes["passages"]), self.max_k)
        elif "top_n" not in changes and rag.top_n > self.max_k:  # a front's parts may serve fewer than the default
            changes["top_n"] = self.max_k
        if "top_n" in changes and "passages" not in changes:  # fewer candidates than passages: read them all
            changes["passages"] = min(rag.passages, changes["top_n"])
        if "top_n" in changes:
            changes["cross_doc_passages"] = min(rag.cross_doc_passages, changes["top_n"])
        cfg = dataclasses.replace(rag, **changes)  # validated: passages <= top_n, every count >= 1
        with self.lock:
            self._sync()
            pipe = RagPipeline(cfg, self.pipe.reader, self.pipe.retriever, self.pipe.reranker)
            return pipe.answer(question, query).to_dict()

    def generate(self, prompt: str, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, k: int | None = None,
                 retrieval: bool = True) -> dict[str, Any]:
        """Continue ``prompt``; every generated span lists the database chunks it read (none for a generator that
        reads no retrieved text: a baseline checkpoint)."""
        prompt = _text(prompt, "prompt")
        if self.generator is None:
            raise RetrolmError("this service generates no text: start it with --generator MODEL or --reader MODEL")
        base = self.cfg.generate
        values = {"prompt": prompt, "max_new_tokens": min(base.max_new_tokens, self.cfg.max_new_tokens),
                  "temperature": temperature, "top_p": top_p, "seed": seed, "neighbours": k}
        if max_new_tokens is not None:
            values["max_new_tokens"] = _bounded(max_new_tokens, "max_new_tokens", self.cfg.max_new_tokens)
        if k is not None:
            _bounded(k, "k", self.max_k)
        if seed is not None and not 0 <= seed < 2**63:
            raise RetrolmError(f"seed must be in 0..2^63-1, got {seed}")
        cfg = dataclasses.replace(base, **{n: v for n, v in values.items() if v is not None})
        with self.lock:
            self._sync(generating=True)
            ret = None
            if retrieval and self.generator.retrieves:
                # generate.retriever, unless auto: the service's default retriever
                kind = None if base.retriever == "auto" else base.retriever
                if self.sharded is not None:
                    ret = self.sharded if kind is None else _SearchedAs(self.sharded, kind)
                else:
                    ret = self._retriever(kind).retriever
            return self.generator.generate(cfg, ret).to_dict()

    def document(self, doc_id: str) -> dict[str, Any]:
        """A live document's whole text, as the database holds it (its chunks' tokens decoded)."""
        with self.lock:
            self._sync()
            if self.sharded is not None:
                found = self.sharded.document(doc_id)
                if found is None:
                    raise NotFoundError(f"no document {doc_id!r} in any shard")
                return {"id": doc_id, "source": found[1]["source"], "shard": found[0], "chunks": None,
                        "text": found[1]["text"]}
            doc = self.db.document(doc_id)
            if doc is None:
                raise NotFoundError(f"no document {doc_id!r} in {self.db.path}")
            return {"id": doc_id, **doc}

    # ------------------------------------------------------------------------------------------------ helpers
    def _k(self, k: int | None) -> int:
        """A search's k: as asked (within ``max_k``), or the default cut to ``max_k``."""
        return min(DEFAULT_K, self.max_k) if k is None else _bounded(k, "k", self.max_k)

    @property
    def max_k(self) -> int:
        """Most results one request may ask for: ``max_k``, and no more than any remote part of a front allows."""
        parts = self.sharded.max_k if self.sharded is not None else None
        return self.cfg.max_k if parts is None else min(self.cfg.max_k, parts)

    def _sync(self, generating: bool = False) -> None:
        """Take in other processes' writes. After a rebuild (another build id) the retrievers are made again (a
        dense database rebuilt as BM25-only: ``auto`` becomes BM25, and the encoder's FLOPs are the new one's) and
        a generator that reads neighbours by token id (RETRO) is checked against the new database before it reads.
        A step that fails raises, and is tried again at the next request."""
        if self.sharded is not None:  # each part follows its own folder (here, or in its own service)
            return
        self.db.refresh()
        build = self.db.meta.get("build_id")
        if build != self._build:
            self._retrievers.clear()
            if self.pipe is not None:
                self.pipe = self.pipe.with_database(self.db)
            self._build = build
        if generating and self.generator is not None and self._checked != build:
            self.generator.check_database(self.db)
            self._checked = build

    def _check_generator(self) -> None:
        if self.sharded is None:
            self.generator.check_database(self.db)
        else:
            self.generator.check_sharded(self.cfg.db)

    def _retriever(self, kind: str | None) -> PassageRetriever:
        """The retriever of ``kind`` with its FLOPs (made again after a rebuild, see :meth:`_sync`)."""
        kind = kind or self.cfg.retriever
        if kind == "auto":  # what auto means follows the database (a rebuild may add or drop dense keys)
            kind = "dense" if self.db.has_dense else "bm25"
        if kind not in self._retrievers:
            self._retrievers[kind] = PassageRetriever(self.db, kind)
        return self._retrievers[kind]


class _SearchedAs:
    """A sharded front searched with another retriever kind than it was opened for (``generate.retriever``)."""

    def __init__(self, sharded: ShardedRetriever, kind: str) -> None:
        self.sharded, self.kind = sharded, kind

    def search(self, queries: str | list[str], k: int, exclude_docs: list[list[str]] | None = None) -> Any:
        return self.sharded.search(queries, k, exclude_docs, kind=self.kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sharded, name)


def _text(value: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RetrolmError(f"the {name} is empty")
    return check_unicode(value, f"the {name}")


DEFAULT_K = 5
"""Results of a search that asks for no number (fewer where the service allows fewer)."""


def _bounded(value: int, name: str, most: int) -> int:
    if not 1 <= value <= most:
        raise RetrolmError(f"{name} must be in 1..{most}, got {value}")
    return value


__all__ = ["NotFoundError", "ServeConfig", "Service"]
