"""Test-time retrieval over the pretraining data: retrieve → rerank → read, with self-consistency and cross-document
consistency, and the FLOPs of every stage (SPEC T1–T3).

Every stage is pluggable through :class:`RagConfig`:

1. **Retrieve** the top ``top_n`` chunks (``unit=chunk``: the chunk and, by default, its continuation) or whole
   documents (``unit=document``: a window of ``document_tokens`` around each of the best documents' best chunk) from a
   retrolm database, with a dense, BM25 or hybrid (reciprocal-rank fusion) retriever.
2. **Rerank** them with a causal LM's yes/no logits (the reader by default) or a cross-encoder, keep the best.
3. **Read** the best ``passages`` with a causal LM (:class:`~retrolm.infer.reader.Reader`).
4. **Self-consistency** (``samples > 1``): sample that many answers and take the normalised majority.
   **Cross-document consistency** (``cross_doc``): answer from each of the ``cross_doc_passages`` best documents
   separately (its best passage) and vote, weighting passages by how consistent their answers are
   (:mod:`retrolm.infer.consistency`).

In Python::

    pipe = RagPipeline.load(RagConfig(db="runs/db", reader="smollm2-135m", cross_doc=True))
    answer = pipe.answer("What is 3C 273?")
    print(answer.answer, [answer.passages[i].doc_id for i in answer.support])
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import regex

from retrolm.core.device import default_device
from retrolm.core.errors import RetrolmError
from retrolm.core.io import check_unicode
from retrolm.db import DatabaseView, Hit
from retrolm.eval.qa import CHOICE_NORMALIZATIONS, QAItem
from retrolm.infer.consistency import CrossDocVote, cross_document_vote, majority_vote
from retrolm.infer.flops import ModelCost, StageFlops, bm25_search_flops, dense_search_flops
from retrolm.infer.reader import DEFAULT_SYSTEM, DEFAULT_TEMPLATE, Reader, Reading, check_template
from retrolm.infer.rerank import LMReranker, Reranker, load_reranker
from retrolm.infer.sampling import check_sampling
from retrolm.retrieval import get_retriever
from retrolm.retrieval.sharded import LocalShard, ShardedRetriever, is_shards_file

logger = logging.getLogger(__name__)

MODES = ("closed_book", "retrieval", "rerank", "self_consistency", "cross_doc")
"""The configurations of the evaluation, each adding one stage to the one before."""


@dataclass
class RagConfig:
    """The retrieve → rerank → read pipeline."""

    db: str | None = None
    """Retrieval database folder, or a shards file (:mod:`retrolm.retrieval.sharded`); None: closed book only."""
    reader: str = "smollm2-135m"
    """The reading causal LM: HF folder, short name or hub name."""
    retriever: str = "auto"
    """auto | dense | bm25 | hybrid (auto = dense when the database has dense keys, else BM25)."""
    unit: str = "chunk"
    """What a passage is: chunk (a chunk, plus its continuation) or document (a window of the document)."""
    top_n: int = 10
    """Candidates retrieved per question and hop (and reranked)."""
    hops: int = 1
    """Multi-hop retrieval: each hop after the first searches again with the question followed by the words of the
    previous hop's best chunk that the question lacks, for what the question does not name (the bridge of a two-step
    question), and adds up to ``top_n`` passages that do not overlap earlier ones; the hops' passages are interleaved,
    best of each hop first (:func:`retrieve_hops`), so read at least ``hops`` passages."""
    passages: int = 3
    """Passages placed in the reader's prompt."""
    continuation: bool = True
    """unit=chunk: a passage is the chunk followed by the next chunk of its document."""
    document_tokens: int = 256
    """unit=document: database tokens per passage, centred on the document's best chunk."""
    rerank: bool | None = None
    """Rerank the candidates before reading. None: ``rag-eval`` does (its report compares the stages), one answer
    (``retrolm rag``, :meth:`RagPipeline.answer`) only when ``reranker`` names a model: the default reranker is the
    reader itself, and SmolLM2-135M judging its own candidates put the question's source first for 19% of questions
    where BM25 had 59-60%, lowering accuracy (docs/test-time-rag.md)."""
    reranker: str | None = None
    """None = the reader's LM judging yes/no; a causal LM reference; or cross-encoder:REF (any HF sequence
    classifier; a folder holding one is recognised without the prefix)."""
    samples: int = 1
    """Self-consistency: answers sampled per question (> 1 enables it)."""
    sample_temperature: float = 0.7
    """Temperature of the samples (self-consistency, and cross-document samples)."""
    top_p: float = 0.95
    """Nucleus mass of the samples."""
    cross_doc: bool = False
    """Cross-document consistency: answer from each of the best documents separately (its best passage) and vote."""
    cross_doc_passages: int = 4
    """Documents answered separately, each from its best passage after reranking (a document retrieved as several
    chunks votes once)."""
    cross_doc_samples: int = 1
    """Answers per passage (greedy when 1)."""
    temperature: float = 0.0
    """Temperature of the plain reading (0 = greedy)."""
    max_new_tokens: int = 16
    """Answer length limit in tokens."""
    max_passage_tokens: int = 192
    """Each passage is cut to this many of the reader's tokens."""
    system_prompt: str = DEFAULT_SYSTEM
    """System message of a chat reader."""
    template: str = DEFAULT_TEMPLATE
    """Prompt of a reader without a chat template ({passages} then {question})."""
    examples: list[list[str]] = field(default_factory=list)
    """Demonstrations shown to the reader before each question: [question, answer] pairs."""
    choice_normalize: str = "mean"
    """Multiple choice: option log-likelihood per token (mean), in total (sum), or in total less its likelihood after
    the prompt without question and passages (pmi; one more forward per question)."""
    batch_size: int = 8
    """Prompts per forward pass (reader and reranker)."""
    seed: int = 0
    """Sampling seed."""
    device: str = "cpu"
    """cpu or cuda."""

    def __post_init__(self) -> None:
        if self.unit not in ("chunk", "document"):
            raise RetrolmError(f"unit must be chunk or document, got {self.unit!r}")
        if self.choice_normalize not in CHOICE_NORMALIZATIONS:  # checked here, not at the first multiple-choice item
            raise RetrolmError(f"choice_normalize must be mean, sum or pmi, got {self.choice_normalize!r}")
        for name in ("top_n", "hops", "passages", "samples", "cross_doc_passages", "cross_doc_samples",
                     "max_new_tokens", "max_passage_tokens", "batch_size", "document_tokens"):
            if getattr(self, name) < 1:
                raise RetrolmError(f"{name} must be >= 1, got {getattr(self, name)}")
        found = self.top_n * self.hops
        if self.passages > found or (self.cross_doc and self.cross_doc_passages > found):
            raise RetrolmError(f"passages ({self.passages}) and cross_doc_passages ({self.cross_doc_passages}) "
                               f"cannot exceed top_n × hops ({found})")
        if (self.samples > 1 or self.cross_doc_samples > 1) and self.sample_temperature <= 0:
            raise RetrolmError("samples > 1 needs sample_temperature > 0 (greedy samples are all the same)")
        # here, not at the first sampled reading, after the model loads and the first stages ran
        check_sampling(self.max_new_tokens, self.temperature, self.top_p)
        check_sampling(self.max_new_tokens, self.sample_temperature, self.top_p)
        check_template(self.template)
        default_device(self.device)  # here, not as a traceback once the reader is loaded


@dataclass
class Passage:
    """A retrieved passage."""

    text: str
    doc_id: str
    chunk_id: int
    """The chunk it was retrieved by (unit=document: the document's best chunk)."""
    position: int
    """That chunk's index in its document."""
    score: float
    """Retrieval score (comparable within one retriever)."""
    rank: int
    """Retrieval rank, 0 = best."""
    rerank_score: float | None = None
    shard: str | None = None
    """The part of a sharded database it came from (``chunk_id`` is that part's); None for one database."""
    hop: int = 1
    """The retrieval hop that found it (``hops`` > 1; ``rank`` is its rank among that hop's new passages)."""
    span: int = 1
    """unit=chunk: chunks of its document it holds from ``position`` on (2 with the continuation)."""
    matched: str | None = None
    """The text the query matched when the passage holds more (unit=chunk: the chunk without its continuation)."""

    def to_dict(self) -> dict:
        out = {"doc_id": self.doc_id, "chunk_id": self.chunk_id, "position": self.position,
               "score": round(self.score, 4), "rank": self.rank,
               "rerank_score": None if self.rerank_score is None else round(self.rerank_score, 4), "text": self.text}
        if self.hop != 1:
            out["hop"] = self.hop
        return out if self.shard is None else {**out, "shard": self.shard}


def chunk_passage(hit: Hit, rank: int, continuation: bool, shard: str | None = None) -> Passage:
    """A retrieved chunk as a passage, followed by the next chunk of its document when ``continuation``."""
    more = continuation and bool(hit.continuation)
    return Passage(hit.text + (hit.continuation if more else ""), hit.doc_id, hit.chunk_id, hit.position, hit.score,
                   rank, shard=shard, span=2 if more else 1, matched=hit.text if more else None)


class PassageRetriever:
    """Top-n passages of a database for questions, and what searching cost.

    Args:
        db: the database.
        kind: auto | dense | bm25 | hybrid.
        unit: chunk | document.
        continuation: chunk passages include the next chunk of their document.
        document_tokens: document passages' length in database tokens.
    """

    max_k: int | None = None
    """The most passages one search may ask for (None: no limit; a sharded database's remote parts have one)."""

    def __init__(self, db: DatabaseView, kind: str = "auto", unit: str = "chunk", continuation: bool = True,
                 document_tokens: int = 256) -> None:
        self.db, self.unit, self.continuation, self.document_tokens = db, unit, continuation, document_tokens
        self.retriever = get_retriever(db, kind)
        self.kind = self.retriever.name

    def retrieve(self, questions: Sequence[str], n: int) -> tuple[list[list[Passage]], list[StageFlops]]:
        """Per question, up to ``n`` passages (best first) and the encoder + search FLOPs."""
        if self.unit == "chunk":
            result = self.retriever.search(list(questions), max(1, n))
            out = [[chunk_passage(h, r, self.continuation) for r, h in enumerate(result.hits(i))]
                   for i in range(len(questions))]
            return out, [self.flops(q) for q in questions]
        # documents: their best chunks, searched deeper where a few long documents fill the chunks fetched
        total = self.db.store.n_chunks
        fetch, todo = max(1, min(4 * n, total)), list(range(len(questions)))
        docs: list[list[Passage]] = [[] for _ in questions]
        rounds = [0] * len(questions)  # searches of each question: each one costs (and embeds the query) again
        while todo:
            result = self.retriever.search([questions[i] for i in todo], fetch)
            short = []
            for j, i in enumerate(todo):
                rounds[i] += 1
                hits = result.hits(j)
                found = len({h.doc_id for h in hits})
                if found < n and len(hits) == fetch and fetch < total:
                    short.append(i)
                else:
                    docs[i] = self._documents(hits, n)
            todo, fetch = short, min(2 * fetch, total)
        once = [self.flops(q) for q in questions]
        return docs, [StageFlops(encoder=f.encoder * r, search=f.search * r) for f, r in zip(once, rounds, strict=True)]

    def _documents(self, hits: list, n: int) -> list[Passage]:
        store, m = self.db.store, self.db.chunk_len
        best: dict[str, object] = {}
        for h in hits:  # best first: the first hit of a document is its best chunk
            best.setdefault(h.doc_id, h)
        out = []
        for rank, h in enumerate(list(best.values())[:n]):
            d = int(store.chunk_doc(np.asarray([h.chunk_id]))[0])
            toks = store.doc_tokens(d)
            start = max(0, min(h.position * m - (self.document_tokens - m) // 2, len(toks) - self.document_tokens))
            text = self.db.tokenizer.decode_cut(toks[start : start + self.document_tokens].tolist())
            # the best chunk is what the query matched: a reader keeps it when it cuts the window, and a later
            # hop follows its words, not the whole window's
            out.append(Passage(text, h.doc_id, h.chunk_id, h.position, h.score, rank, matched=h.text))
        return out

    @functools.cached_property
    def _encoder_cost(self) -> ModelCost | None:
        if self.kind not in ("dense", "hybrid"):
            return None
        enc = self.db.encoder
        return ModelCost.of(enc.model, enc.name, bidirectional=True)

    def flops(self, question: str) -> StageFlops:
        """Encoder and search FLOPs of one query (see :mod:`retrolm.infer.flops`)."""
        return StageFlops(encoder=self.encoder_flops(question), search=self.search_flops(question))

    def encoder_flops(self, question: str) -> int:
        """Embedding the query (dense and hybrid; loads the encoder)."""
        if self.kind not in ("dense", "hybrid"):
            return 0
        tokens = int(self.db.encoder.tokenize([question])["attention_mask"].sum())
        return self._encoder_cost.prompt(tokens)

    def search_flops(self, question: str) -> int:
        """Searching the index for the query (the encoder is not loaded)."""
        n_chunks, search = self.db.store.n_chunks, 0
        if self.kind in ("dense", "hybrid"):
            search += dense_search_flops(int(self.db.meta["encoder"]["dim"]), n_chunks)
        if self.kind in ("bm25", "hybrid"):
            search += bm25_search_flops(self.db.lexical.postings(question), n_chunks)
        return search


class ShardedPassageRetriever:
    """Chunk passages from the parts of a sharded database (:mod:`retrolm.retrieval.sharded`), with the FLOPs of
    every part's search: each remote part embeds the question itself (a dense search over N machines pays the
    encoder N times), the parts on this machine once between them. ``unit=document`` needs one database folder
    (passages are cut from its token arrays)."""

    unit = "chunk"

    def __init__(self, sharded: ShardedRetriever, continuation: bool = True) -> None:
        self.sharded, self.continuation = sharded, continuation
        self.retriever = sharded
        self.kind = sharded.kind
        self._local: dict[str, tuple[str | None, PassageRetriever]] = {}

    def retrieve(self, questions: Sequence[str], n: int) -> tuple[list[list[Passage]], list[StageFlops]]:
        """Per question, up to ``n`` passages (best first) and the FLOPs of every part's search."""
        result = self.sharded.search(list(questions), max(1, n))
        out, flops = [], []
        local = [s for s in self.sharded.shards if isinstance(s, LocalShard)]
        for i, q in enumerate(questions):
            out.append([chunk_passage(h, r, self.continuation, shard=h.shard) for r, h in enumerate(result.hits(i))])
            total = StageFlops()
            if local:  # the parts on this machine share one embedding of the question (ShardedRetriever)
                total += StageFlops(encoder=self._local_retriever(local[0]).encoder_flops(q))
            for shard, reported in zip(self.sharded.shards, result.flops[i], strict=True):
                if reported is not None:  # a remote part counted its own
                    total += StageFlops(encoder=int(reported.get("encoder", 0)), search=int(reported.get("search", 0)))
                elif isinstance(shard, LocalShard):
                    total += StageFlops(search=self._local_retriever(shard).search_flops(q))
            flops.append(total)
        return out, flops

    @property
    def max_k(self) -> int | None:
        """The most passages one search may ask for (the remote parts' limit; None: none)."""
        return self.sharded.max_k

    def _local_retriever(self, shard: LocalShard) -> PassageRetriever:
        """A part's passage retriever (its FLOPs: hybrid's are its dense and BM25 searches over the part), made again
        when the part was rebuilt."""
        build = shard.db.meta.get("build_id")
        made = self._local.get(shard.name)
        if made is None or made[0] != build:
            made = self._local[shard.name] = (build, PassageRetriever(shard.db, self.kind))
        return made[1]


_WORD = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]|(?:(?![\p{Han}\p{Hiragana}\p{Katakana}])[\p{L}\p{M}\p{N}])+")
"""A word: a run of letters (with their combining marks) and digits; each Chinese or Japanese character alone, as
those scripts do not separate words."""


def words(text: str) -> list[str]:
    """The words of ``text`` (NFC, so that a decomposed accent stays in its word), in order."""
    return _WORD.findall(unicodedata.normalize("NFC", text))


def new_words(question: str, passage: str) -> str:
    """The words of ``passage`` (in order, each once) that ``question`` does not hold, case-insensitively."""
    have = {w.casefold() for w in words(question)}
    out: list[str] = []
    for w in words(passage):
        if w.casefold() not in have:
            have.add(w.casefold())
            out.append(w)
    return " ".join(out)


def retrieve_hops(retriever: PassageRetriever | ShardedPassageRetriever, questions: Sequence[str], n: int,
                  hops: int) -> tuple[list[list[Passage]], list[StageFlops]]:
    """Multi-hop retrieval: per question up to ``n`` passages per hop and the FLOPs of every hop's search.

    Hop 1 searches with the question. Hop h > 1 searches with the question followed by the words of the best chunk
    hop h - 1 added that the question lacks: what the question does not name ("All troff are" finds "All troff are
    glon.", and the second hop, asked "All troff are glon", the facts about glon). It keeps the first ``n`` passages
    that overlap no passage found before (a chunk's continuation counts as found). The hops' lists are interleaved
    (the best of each hop, then the second of each, ...), so that reading the first few passages reads every hop's
    best. A hop that adds nothing ends the chain."""
    found, flops = retriever.retrieve(questions, n)
    document = retriever.unit == "document"

    def overlaps(p: Passage, q: Passage) -> bool:  # the same text, or part of it (a chunk and its continuation)
        if (p.shard, p.doc_id) != (q.shard, q.doc_id):
            return False
        return document or (p.position < q.position + q.span and q.position < p.position + p.span)

    by_hop = [[ps] for ps in found]
    for hop in range(2, hops + 1):
        # the words of the previous hop's best new chunk that the question lacks: repeating the question's own
        # words would weigh them twice and find what hop 1 found
        bridge = {i: new_words(questions[i], lists[-1][0].matched or lists[-1][0].text)
                  for i, lists in enumerate(by_hop) if lists[-1]}
        follow = [i for i, extra in bridge.items() if extra]  # nothing new to follow ends the chain
        for lists in by_hop:
            lists.append([])
        if not follow:
            break
        # fetched beyond n by what earlier hops found, so that each hop can add n passages that are new (up to what
        # the retriever serves: a sharded database's parts cap k)
        # (a passage found before rules out up to 3 chunks, its own, its continuation and the one whose continuation
        # it is; each new one up to 2 more)
        fetch = 3 * (n + max(sum(map(len, by_hop[i])) for i in follow))
        limit = retriever.max_k
        more, more_flops = retriever.retrieve([f"{questions[i]} {bridge[i]}" for i in follow],
                                              fetch if limit is None else max(n, min(fetch, limit)))
        for i, ps, f in zip(follow, more, more_flops, strict=True):
            kept = [p for lists in by_hop[i] for p in lists]
            new: list[Passage] = []
            for p in ps:  # best first; nothing that overlaps an earlier hop's passage or a better one of this hop
                if len(new) < n and not any(overlaps(p, q) for q in kept):
                    new.append(dataclasses.replace(p, hop=hop, rank=len(new)))
                    kept.append(p)
            by_hop[i][-1] = new
            flops[i] += f
    merged = [[p for group in itertools.zip_longest(*lists) for p in group if p is not None] for lists in by_hop]
    return merged, flops


@dataclass
class RagAnswer:
    """The pipeline's answer to one question."""

    question: str
    answer: str
    mode: str
    """Which stage produced it (see :data:`MODES`)."""
    passages: list[Passage]
    """The passages read (cross_doc: each answered separately)."""
    support: list[int]
    """Indices into ``passages`` of those supporting the answer."""
    flops: StageFlops
    vote: dict | None = None
    """The vote's tally (self-consistency, cross-document consistency)."""
    samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "mode": self.mode,
                "support": self.support, "supporting_passages": [self.passages[i].to_dict() for i in self.support],
                "passages": [p.to_dict() for p in self.passages], "vote": self.vote, "samples": self.samples,
                "flops": self.flops.to_dict()}


def reading_flops(r: Reading) -> StageFlops:
    """The reader's FLOPs of one reading, as stages."""
    return StageFlops(reader_prompt=r.prompt_flops, reader_generation=r.generation_flops)


_FIT_WARNED: set[str] = set()
"""Readers already warned that passages were left out to fit their context."""


class RagPipeline:
    """Retrieve → rerank → read, stage by stage over batches of questions.

    Args:
        cfg: the configuration.
        reader: the reading LM.
        retriever: passages from the database (None: closed book).
        reranker: None when reranking is off.
    """

    def __init__(self, cfg: RagConfig, reader: Reader, retriever: PassageRetriever | ShardedPassageRetriever | None,
                 reranker: Reranker | None = None) -> None:
        self.cfg, self.reader, self.retriever, self.reranker = cfg, reader, retriever, reranker
        if retriever is not None and cfg.hops > cfg.passages and reranker is None and not cfg.cross_doc:
            # the hops are interleaved best first: fewer passages than hops leave the last hops searched but unread
            logger.warning("hops=%d with passages=%d and no reranker: the passages of the last %d hop(s) are searched "
                           "but not read; read at least as many passages as hops", cfg.hops, cfg.passages,
                           cfg.hops - cfg.passages)

    @classmethod
    def load(cls, cfg: RagConfig, db: DatabaseView | None = None, evaluation: bool = False,
             sharded: ShardedRetriever | None = None) -> RagPipeline:
        """Open the database (unless given: ``db``, or the parts of a sharded one opened as ``sharded``), load the
        reader and the reranker (``evaluation``: for ``rag-eval``, which reranks unless ``cfg.rerank`` is false)."""
        reader = Reader.load(cfg.reader, cfg.device, system=cfg.system_prompt, template=cfg.template,
                             max_passage_tokens=cfg.max_passage_tokens, examples=cfg.examples)
        retriever: PassageRetriever | ShardedPassageRetriever | None = None
        shards = sharded is not None or (db is None and cfg.db is not None and is_shards_file(cfg.db))
        if shards and cfg.unit != "chunk":
            raise RetrolmError(f"{cfg.db}: unit=document needs one database folder; a sharded one serves chunks")
        if shards:
            sharded = sharded or ShardedRetriever.open(cfg.db, device=cfg.device, retriever=cfg.retriever)
            retriever = ShardedPassageRetriever(sharded, cfg.continuation)
        elif db is None and cfg.db is not None:
            db = DatabaseView.open(cfg.db, device=cfg.device)
        if db is not None:
            retriever = PassageRetriever(db, cfg.retriever, cfg.unit, cfg.continuation, cfg.document_tokens)
        rerank = cfg.rerank if cfg.rerank is not None else (evaluation or cfg.reranker is not None)
        reranker = load_reranker(cfg.reranker, reader, cfg.device, cfg.batch_size) if rerank and retriever else None
        return cls(cfg, reader, retriever, reranker)

    def with_database(self, db: DatabaseView) -> RagPipeline:
        """The same models over another database (e.g. the store plus unrelated text)."""
        c = self.cfg
        return RagPipeline(c, self.reader, PassageRetriever(db, c.retriever, c.unit, c.continuation,
                                                            c.document_tokens), self.reranker)

    # --------------------------------------------------------------------------------------------------- stages
    def retrieve(self, questions: Sequence[str]) -> tuple[list[list[Passage]], list[StageFlops]]:
        if self.retriever is None:
            raise RetrolmError("no database: retrieval needs --db")
        found, flops = retrieve_hops(self.retriever, questions, self.cfg.top_n, self.cfg.hops)
        if self.retriever.unit == "document":  # what the reranker and the reader read of each: around its best chunk
            found = [[dataclasses.replace(p, text=self.reader.window(p.text, p.matched)) for p in ps] for ps in found]
        return found, flops

    def rerank(self, questions: Sequence[str], candidates: Sequence[list[Passage]]
               ) -> tuple[list[list[Passage]], list[StageFlops]]:
        """Candidates reordered by the reranker's score (each passage keeps its retrieval rank)."""
        if self.reranker is None:
            raise RetrolmError("reranking is off (rerank=false)")
        out, flops = [], []
        for q, cands in zip(questions, candidates, strict=True):
            scores, f = self.reranker.score(q, [p.text for p in cands]) if cands else ([], 0)
            for p, s in zip(cands, scores, strict=True):
                p.rerank_score = s
            out.append(sorted(cands, key=lambda p: (-(p.rerank_score or 0.0), p.rank)))
            flops.append(StageFlops(reranker=f))
        return out, flops

    def reserve(self, item: QAItem) -> int:
        """Tokens the context must keep free after ``item``'s prompt: its longest option (multiple choice) or the
        answer to generate."""
        return self.reader.option_room(item.choices) if item.multiple_choice else self.cfg.max_new_tokens

    def check_fits(self, items: Sequence[QAItem], source: str) -> None:
        """Refuse, before anything is read, items whose answer or longest option leaves no room for a prompt in the
        reader's context, or whose question does not fit it (they would stop an evaluation half way)."""
        room = self.reader.lm.context_len
        for it in items:
            if (need := self.reserve(it)) >= room:
                what = "its longest option takes" if it.multiple_choice else "max_new_tokens is"
                raise RetrolmError(f"{source}: question {it.id!r}: {what} {need} tokens, no room for a "
                                   f"prompt in the {room}-token context of {self.reader.lm.name}")
            try:
                if isinstance(self.reranker, LMReranker):
                    self.reranker.check_question(it.question)
                # the question alone (passages that do not fit are left out; the question cannot be)
                self.reader.prompt_ids(it.question, None, reserve=need)
            except RetrolmError as e:
                raise RetrolmError(f"{source}: question {it.id!r}: {e}") from None

    def fit(self, items: Sequence[QAItem], passages: Sequence[Sequence[Passage]]) -> list[list[Passage]]:
        """Each item's passages that fit the reader's context, best first: the lowest-ranked are left out (and not
        reported as read) where all of them would not fit with the answer or the options after them."""
        out = []
        for it, ps in zip(items, passages, strict=True):
            n = self.reader.passages_that_fit(it.question, [p.text for p in ps], self.reserve(it)) if ps else 0
            if n < len(ps) and self.reader.lm.name not in _FIT_WARNED:  # once per reader (the service makes a
                _FIT_WARNED.add(self.reader.lm.name)  # pipeline per request)
                logger.warning("%d of the %d passages of question %r do not fit the %d-token context of %s: the "
                               "lowest-ranked are left out (fewer passages, or a smaller max_passage_tokens, avoid "
                               "it)", len(ps) - n, len(ps), it.id, self.reader.lm.context_len, self.reader.lm.name)
            out.append(list(ps[:n]))
        return out

    def read(self, items: Sequence[QAItem], passages: Sequence[Sequence[Passage]] | None, samples: int = 1,
             temperature: float | None = None) -> list[Reading]:
        """Answer every item from its passages (None: closed book); multiple-choice items by option likelihood."""
        c = self.cfg
        temp = c.temperature if temperature is None else temperature
        # room after the prompt for what is read next: the answer, or the longest option of a multiple-choice item
        prompts = [self.reader.prompt_ids(it.question, [p.text for p in passages[i]] if passages else None,
                                          reserve=self.reserve(it))
                   for i, it in enumerate(items)]
        out: list[Reading | None] = [None] * len(items)
        short = [i for i, it in enumerate(items) if not it.multiple_choice]
        mc = [i for i, it in enumerate(items) if it.multiple_choice]
        if short:
            got = self.reader.generate([prompts[i] for i in short], samples, temp, c.top_p if temp > 0 else 1.0,
                                       c.max_new_tokens, c.seed, c.batch_size)
            for i, r in zip(short, got, strict=True):
                out[i] = r
        if mc:
            got = self.reader.choose([prompts[i] for i in mc], [items[i].choices for i in mc], c.choice_normalize)
            for i, r in zip(mc, got, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def cross_doc_candidates(self, passages: Sequence[Passage], item: QAItem | None = None) -> list[Passage]:
        """The passages cross-document consistency reads alone: the best-ranked one of each of the first
        ``cross_doc_passages`` documents (chunk i and chunk i+1 of one document, which overlap through the continuation,
        would otherwise vote twice for one source); with ``item``, only those that fit its prompt."""
        seen: set[str] = set()
        out = []
        for p in passages:
            if p.doc_id not in seen and (item is None or self.fit([item], [[p]])[0]):
                seen.add(p.doc_id)
                out.append(p)
                if len(out) == self.cfg.cross_doc_passages:
                    break
        return out

    def read_each(self, items: Sequence[QAItem], passages: Sequence[Sequence[Passage]]) -> list[list[Reading]]:
        """Cross-document reading: every item answered from each of its :meth:`cross_doc_candidates` alone (from
        the question alone when retrieval found nothing)."""
        c = self.cfg
        flat_items, flat_passages, owner = [], [], []
        for i, (it, ps) in enumerate(zip(items, passages, strict=True)):
            # nothing retrieved: the question alone, as every other configuration reads it (the vote then has one
            # reading and no passage supports it)
            for p in self.cross_doc_candidates(ps, it) or [None]:
                flat_items.append(it)
                flat_passages.append([p] if p is not None else [])
                owner.append(i)
        temp = c.sample_temperature if c.cross_doc_samples > 1 else c.temperature
        readings = self.read(flat_items, flat_passages, c.cross_doc_samples, temp) if flat_items else []
        out: list[list[Reading]] = [[] for _ in items]
        for i, r in zip(owner, readings, strict=True):
            out[i].append(r)
        return out

    def vote_across_documents(self, item: QAItem, passages: Sequence[Passage], readings: Sequence[Reading],
                              flops: StageFlops) -> tuple[CrossDocVote, list[Passage], list[int], StageFlops]:
        """Cross-document consistency's answer to ``item`` from its :meth:`read_each` readings: the vote, the passages
        read alone, the indices of those supporting the answer (none when nothing was retrieved and the question was
        read alone), and ``flops`` with the readings' added."""
        vote = cross_document_vote([r.answers for r in readings], exact=item.multiple_choice)
        total = flops
        for r in readings:
            total = total + reading_flops(r)
        candidates = self.cross_doc_candidates(passages, item)
        return vote, candidates, vote.support if candidates else [], total

    # -------------------------------------------------------------------------------------------------- answer
    def mode(self) -> str:
        """The last stage the configuration enables."""
        if self.retriever is None:
            return "closed_book"
        if self.cfg.cross_doc:
            return "cross_doc"
        if self.cfg.samples > 1:
            return "self_consistency"
        return "rerank" if self.reranker is not None else "retrieval"

    def answer(self, question: str, query: str | None = None) -> RagAnswer:
        """Answer one question with every stage the configuration enables; ``query``: what to search with instead of
        the question (the reader still reads the question)."""
        if not question.strip():
            raise RetrolmError("rag: the question is empty")
        if query is not None and not query.strip():
            raise RetrolmError("rag: the query is empty")
        check_unicode(question, "rag: the question")
        if query is not None:
            check_unicode(query, "rag: the query")
        return self.answer_items([QAItem("q", question, [], query=query)])[0]

    def answer_items(self, items: Sequence[QAItem]) -> list[RagAnswer]:
        """Answer questions with every stage the configuration enables."""
        mode = self.mode()
        questions = [it.question for it in items]
        if mode == "closed_book":
            return [RagAnswer(it.question, r.answers[0], mode, [], [], reading_flops(r), samples=r.answers)
                    for it, r in zip(items, self.read(items, None), strict=True)]
        passages, flops = self.retrieve([it.search_text() for it in items])
        if self.reranker is not None:
            passages, rr = self.rerank(questions, passages)
            flops = [a + b for a, b in zip(flops, rr, strict=True)]
        out = []
        if mode == "cross_doc":
            for it, ps, f, rs in zip(items, passages, flops, self.read_each(items, passages), strict=True):
                vote, candidates, support, total = self.vote_across_documents(it, ps, rs, f)
                out.append(RagAnswer(it.question, vote.answer, mode, candidates, support, total, vote.to_dict(),
                                     [a for r in rs for a in r.answers]))
            return out
        sc = mode == "self_consistency"
        passages = self.fit(items, [ps[: self.cfg.passages] for ps in passages])
        readings = self.read(items, passages, self.cfg.samples if sc else 1,
                             self.cfg.sample_temperature if sc else None)
        for it, ps, f, r in zip(items, passages, flops, readings, strict=True):
            vote = majority_vote(r.answers, exact=it.multiple_choice) if sc else None
            answer = vote.answer if vote is not None else r.answers[0]
            out.append(RagAnswer(it.question, answer, mode, ps, list(range(len(ps))), f + reading_flops(r),
                                 vote.to_dict() if vote is not None else None, r.answers))
        return out


__all__ = ["MODES", "Passage", "PassageRetriever", "RagAnswer", "RagConfig", "RagPipeline", "new_words",
           "reading_flops", "retrieve_hops"]
