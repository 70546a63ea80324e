"""Honest evaluation: every model scored on the same held-out chunks, with evaluation documents kept out of retrieval.

:class:`Evaluator` prepares everything once — the models, the held-out documents tokenized exactly like the database,
the database chunks that must not be retrieved, and the retrieval queries — then scores every held-out chunk under
any setting (retrieval on or off, k neighbours, a database subset). :mod:`retrolm.eval.run` and
:mod:`retrolm.eval.scaling` build the reports on top of it.

Evaluation documents never reach a model through retrieval: database documents with the same id are excluded, and
so are near-duplicates (13-gram Jaccard >= 0.8, as the RETRO paper). Bits-per-byte = total nats / ln 2 / UTF-8 bytes
of the scored text (:mod:`retrolm.train.scoring`); the EOS predicted after a document's last token is scored, as in
training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrolm.core.device import default_device
from retrolm.core.errors import RetrolmError
from retrolm.core.io import read_json_object
from retrolm.db import DatabaseView, tokenize_corpus
from retrolm.eval.config import EvalConfig
from retrolm.eval.incontext import InContextScorer, InContextSettings, document_texts
from retrolm.eval.leakage import longest_common_run, overlap_ratio
from retrolm.models.decoder_lm import DecoderLM
from retrolm.models.loading import load_model
from retrolm.retrieval import Exclusion, Retriever, get_retriever
from retrolm.text.dedup import find_near_duplicates
from retrolm.text.tokenizer import LMTokenizer, load_tokenizer
from retrolm.train import RetroSequences, Scores, bits_per_byte, chunk_bytes, score_sequences

logger = logging.getLogger(__name__)

RETRO, RETRO_OFF = "retro", "retro_no_retrieval"
IN_CONTEXT, NO_RETRIEVAL = "in_context", "no_retrieval"


def neighbours_of_other_documents(neighbours: np.ndarray, doc: np.ndarray, seed: int = 0) -> np.ndarray:
    """Rows of ``neighbours`` (one per chunk) reassigned so that every chunk gets the row of a chunk drawn uniformly
    from the *other* documents (``doc`` = document of each chunk): the shuffled-neighbours control of ``retrolm
    eval``. Chunks of the same document are excluded because a neighbour of the previous chunk (chunk +
    continuation) may hold this one's text."""
    n = len(doc)
    order = np.argsort(doc, kind="stable")
    start = np.searchsorted(doc[order], doc, "left")
    size = np.searchsorted(doc[order], doc, "right") - start
    if n == 0 or (size == n).any():
        raise RetrolmError("shuffle_neighbours needs held-out chunks from at least two documents")
    # a uniform draw among the n - size chunks outside the chunk's own block of the doc-sorted order
    r = np.random.default_rng(seed).integers(0, n - size)
    return neighbours[order[np.where(r < start, r, r + size)]]


@dataclass
class EvalModel:
    """A model under evaluation, with what it needs to run."""

    model: torch.nn.Module
    tokenizer: LMTokenizer
    path: Path
    """The checkpoint folder it was loaded from (or the pretrained LM's folder / name)."""
    kind: str = "retro"
    """retro (RETRO or its baseline), retrofit, or causal_lm (a pretrained LM, read with in-context retrieval)."""
    label: str = ""
    """A short, unique name for tables and plots."""

    @property
    def in_context(self) -> bool:
        """A plain pretrained LM: it reads retrieved text in its context."""
        return self.kind == "causal_lm"

    @property
    def retrieval(self) -> bool:
        """True for a model that reads retrieved text (RETRO, RETRO-fitted, in-context), False for a baseline."""
        return self.in_context or bool(self.model.config.retro_layers)

    @property
    def trained_on(self) -> dict | None:
        """What the checkpoint records about its training database (None for checkpoints before 0.2)."""
        record = self.path / "database.json"
        return read_json_object(record, "database record") if record.is_file() else None

    def describe(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.model.parameters())
        if self.in_context:
            return {"path": str(self.path), "kind": self.kind, "retro": False, "params": n}
        return {"path": str(self.path), "kind": self.kind, "retro": self.retrieval, "params": n,
                "non_embedding_params": n - self.model.wte.weight.numel(),
                "retro_layers": list(self.model.config.retro_layers),
                "train_num_neighbours": self.model.config.num_neighbours}


def _labels(paths: list[Path]) -> list[str]:
    """Short, unique names of checkpoints: their run folders' names (``name#2`` … where two are the same)."""
    names = [p.parent.parent.name if p.parent.name == "checkpoints" else p.name for p in paths]
    out: list[str] = []
    for name in names:
        out.append(name if name not in out else f"{name}#{sum(o.split('#')[0] == name for o in out) + 1}")
    return out


def display_name(key: str) -> str:
    """A result key ("retro", "retro_no_retrieval", "in_context", "no_retrieval", "baseline:<run>") as a label."""
    return {RETRO: "RETRO, retrieval on", RETRO_OFF: "RETRO, retrieval off", IN_CONTEXT: "in-context retrieval",
            NO_RETRIEVAL: "LM alone (no retrieval)"}.get(key, key.replace("baseline:", "baseline "))


class Evaluator:
    """Models, database, held-out chunks, exclusions and queries, prepared once for any number of settings."""

    def __init__(self, cfg: EvalConfig, show_progress: bool = True) -> None:
        if not cfg.checkpoint or not cfg.db or not cfg.data:
            raise RetrolmError("evaluation needs a checkpoint, a database and held-out data")
        self.cfg, self.show = cfg, show_progress
        self.device = default_device(cfg.device)
        self.db = DatabaseView.open(cfg.db)
        refs = [cfg.checkpoint, *cfg.baselines]
        loaded = [load_model(r, device=self.device) for r in refs]
        labels = _labels([lm.folder or Path(lm.name) for lm in loaded])
        models = [EvalModel(lm.model, load_tokenizer(str(lm.folder or lm.name)), lm.folder or Path(lm.name), lm.kind,
                            label) for lm, label in zip(loaded, labels, strict=True)]
        self.main, self.baselines = models[0], models[1:]
        if cfg.in_context and not self.main.in_context:  # a baseline decoder reading passages in its context
            self.main.model = DecoderLM(self.main.model, str(self.main.path))
            self.main.kind = "causal_lm"
        for em in models:
            self._check_compatible(em)
        for b in self.baselines:
            if b.retrieval and not b.in_context:
                raise RetrolmError(f"{b.path}: --baseline must be a model without RETRO layers")
        self.retrieval = cfg.retrieval and self.main.retrieval
        self.k = cfg.neighbours or (1 if self.main.in_context else self.main.model.config.num_neighbours)
        m = self.db.chunk_len
        chunked = [e for e in models if not e.in_context]  # models that read RETRO-style, chunk-aligned sequences
        seq_len = cfg.seq_len or min((e.model.config.seq_len for e in chunked), default=m)
        if seq_len % m or any(seq_len > e.model.config.seq_len for e in chunked):
            raise RetrolmError(f"seq_len {seq_len}: must be a multiple of chunk_len {m} and fit every model")
        self.seq_chunks = seq_len // m
        if chunked and cfg.context_chunks >= self.seq_chunks:
            raise RetrolmError(f"context_chunks {cfg.context_chunks}: must be below the {self.seq_chunks} chunks of an "
                               f"evaluation sequence (seq_len {seq_len})")

        self._tmp = tempfile.TemporaryDirectory(prefix="retrolm-eval-")
        self.source = tokenize_corpus(cfg.data, self.db.tokenizer, m, Path(self._tmp.name) / "heldout",
                                      max_docs=cfg.max_docs)
        if self.source.n_chunks == 0:
            raise RetrolmError(f"{', '.join(cfg.data)}: held-out data produced no tokens")
        self.n_bytes = chunk_bytes(self.source, self.db.tokenizer)
        self.lengths = self.source.lengths(np.arange(self.source.n_chunks)).astype(np.int64)
        # the retriever first: one the database cannot serve fails before the near-duplicate scan
        self.retriever: Retriever | None = get_retriever(self.db, cfg.retriever) if self.retrieval else None
        self.exclusion = self._exclusions()
        self._queries: dict[str, np.ndarray] = {}
        self._scores: dict[tuple, Scores] = {}
        self._readers: dict[int, InContextScorer] = {}
        self.costs: dict[str, dict] = {}
        """What in-context scoring cost, per result key (forward tokens per scored token, tokens/s)."""

    # ---- setup
    def _check_compatible(self, em: EvalModel) -> None:
        db = self.db
        if em.in_context:  # it reads text: any tokenizer, any chunk length
            return
        if em.tokenizer.sha256 != db.tokenizer.sha256:
            raise RetrolmError(f"{em.path}: trained with another tokenizer than the database {db.path} uses")
        if em.model.config.chunk_len != db.chunk_len:
            raise RetrolmError(
                f"{em.path}: chunk_len {em.model.config.chunk_len}, the database {db.path} has {db.chunk_len}"
            )
        if em.retrieval:
            db.check_trained_with(em.trained_on, em.path)

    def _exclusions(self) -> dict[str, Any]:
        """Database chunks never retrieved for evaluation: copies of the held-out documents and near-duplicates."""
        by_id, near, pairs = self.excluded_docs(self.db, np.arange(self.db.store.n_docs))
        self.excluded_chunks = (by_id | near)[self.db.store.all_chunk_docs()]
        live = ~self.db.deleted_docs  # deleted documents are never retrieved anyway: not counted as excluded
        return {
            "eval_docs": self.source.n_docs,
            "eval_chunks": self.source.n_chunks,
            "excluded_docs_same_id": int((by_id & live).sum()),
            "excluded_docs_near_duplicate": int((near & ~by_id & live).sum()),
            "excluded_chunks": int((self.excluded_chunks & ~self.db.deleted_chunks).sum()),
            "near_duplicate_pairs": pairs[:100],
        }

    def excluded_docs(self, db: DatabaseView, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        """Which of the database documents ``docs`` (global indices) share an id with a held-out document, and which
        are near-duplicates of one: two bool masks over ``db``'s documents (False outside ``docs``), and the pairs."""
        store = db.store
        held_ids = set(self.source.doc_ids)
        by_id = np.zeros(store.n_docs, dtype=bool)
        by_id[docs] = [store.doc_ids[d] in held_ids for d in docs]
        near = np.zeros(store.n_docs, dtype=bool)
        pairs = []
        if self.cfg.near_dup_threshold > 0:
            cand = docs[~db.deleted_docs[docs] & ~by_id[docs]]
            found = find_near_duplicates(
                (self.source.doc_tokens(d) for d in range(self.source.n_docs)),
                (store.doc_tokens(int(d)) for d in cand),
                threshold=self.cfg.near_dup_threshold, n=self.cfg.ngram, show_progress=self.show,
                measure=self.cfg.near_dup_measure,
            )
            for f in found:
                near[cand[f.reference]] = True
                pairs.append([self.source.doc_ids[f.query], store.doc_ids[cand[f.reference]], round(f.jaccard, 4)])
        return by_id, near, pairs

    @property
    def query_texts(self) -> list[str]:
        """Every held-out chunk as text: the retrieval query of that chunk."""
        return self.source.texts(np.arange(self.source.n_chunks), self.db.tokenizer)

    def queries(self, retriever: Retriever) -> np.ndarray:
        """Prepared queries of every held-out chunk (vectors for the dense retriever), computed once per kind of
        retriever: databases compared here share one encoder (a noisy copy, a masked subset)."""
        if retriever.name not in self._queries:
            self._queries[retriever.name] = retriever.prepare(self.query_texts)
        return self._queries[retriever.name]

    def neighbours(self, k: int, db: DatabaseView | None = None, exclude_chunks: np.ndarray | None = None
                   ) -> np.ndarray:
        """(n_chunks, k) database chunk ids retrieved for every held-out chunk, evaluation documents excluded."""
        retriever = self.retriever if db is None or db is self.db else get_retriever(db, self.cfg.retriever)
        if retriever is None:
            raise RetrolmError(f"{self.main.path}: a baseline does not retrieve")
        mask = self.excluded_chunks if exclude_chunks is None else exclude_chunks
        return retriever.search(self.queries(retriever), k, Exclusion(chunks=mask)).ids

    def longest_common_runs(self, neighbours: np.ndarray, block: int = 4096, chunks: np.ndarray | None = None
                            ) -> np.ndarray:
        """Longest token run each held-out chunk shares with any of its ``neighbours`` (chunk + continuation); with
        ``chunks``, row i of ``neighbours`` is compared with held-out chunk ``chunks[i]`` instead of chunk i."""
        n, K = neighbours.shape
        rows = np.arange(n) if chunks is None else np.asarray(chunks, dtype=np.int64)
        out = np.zeros(n, dtype=np.int64)
        for s in range(0, n, block):  # bounded memory: one block of neighbour tokens at a time
            ids = np.arange(s, min(s + block, n))
            ntoks, nmask = self.db.store.neighbour_tokens(neighbours[ids].reshape(-1))
            out[ids] = longest_common_run(self.source.tokens(rows[ids]), self.lengths[rows[ids]],
                                          ntoks.reshape(len(ids), K, -1), nmask.reshape(len(ids), K, -1))
        return out

    def next_chunk_overlap(self, neighbours: np.ndarray) -> np.ndarray:
        """(n_chunks, K): the share of the *next* held-out chunk that each neighbour of a chunk holds verbatim (its
        longest common run over the next chunk's length). A chunk's neighbours are read while its successor is
        predicted, so this is the text a reader could copy from each rank. NaN for a document's last chunk."""
        n, K = neighbours.shape
        nxt = self.source.continuation_ids(np.arange(n))
        has = np.flatnonzero(nxt >= 0)
        out = np.full((n, K), np.nan)
        for j in range(K):
            runs = self.longest_common_runs(neighbours[has, j : j + 1], chunks=nxt[has])
            out[has, j] = overlap_ratio(runs, self.lengths[nxt[has]])
        return out

    # ---- scoring
    def score(self, em: EvalModel, neighbours: np.ndarray | None = None, k: int | None = None,
              db: DatabaseView | None = None, desc: str = "score") -> Scores:
        """Per-chunk nats of ``em`` over all held-out chunks, reading ``neighbours[:, :k]`` (None → retrieval off)."""
        db = db or self.db
        seqs = RetroSequences(self.source, self.seq_chunks, self.db.tokenizer.eos_id, neighbours,
                              db.store if neighbours is not None else None, k, include_tail=True,
                              tokenizer=self.db.tokenizer, context_chunks=self.cfg.context_chunks)
        return score_sequences(em.model, seqs, batch_size=self.cfg.batch_size, with_neighbours=neighbours is not None,
                               device=self.device, desc=desc, show_progress=self.show)

    def reader(self, em: EvalModel) -> InContextScorer:
        """The in-context scorer of a pretrained LM (its tokens aligned with the held-out chunks once)."""
        if id(em) not in self._readers:
            settings = InContextSettings(stride=self.cfg.stride, query_tokens=self.cfg.query_tokens,
                                         passages=self.k, continuation=self.cfg.continuation,
                                         context_tokens=self.cfg.context_tokens, batch_size=self.cfg.batch_size)
            texts = document_texts(self.cfg.data, self.cfg.max_docs)
            self._readers[id(em)] = InContextScorer(em.model, em.tokenizer, self.source, self.db.tokenizer, texts,
                                                    settings)
        return self._readers[id(em)]

    def score_in_context(self, em: EvalModel, retrieval: bool, db: DatabaseView | None = None,
                         exclude_chunks: np.ndarray | None = None, desc: str = "score", key: str | None = None,
                         passages: int | None = None) -> Scores:
        """Per-chunk nats of a pretrained LM over all held-out chunks, reading ``passages`` (default: k) passages
        retrieved from ``db`` (the evaluation database by default; evaluation documents excluded) when
        ``retrieval``."""
        db = db or self.db
        if retrieval and db is not self.db and exclude_chunks is None:  # the evaluation's exclusions are this db's
            raise RetrolmError(f"{db.path}: in-context scoring against another database needs its exclusion mask "
                               "(exclude_chunks)")
        retriever = None
        if retrieval:
            retriever = self.retriever if db is self.db else get_retriever(db, self.cfg.retriever)
        mask = self.excluded_chunks if exclude_chunks is None and db is self.db else exclude_chunks
        reader = self.reader(em)
        reader.settings = dataclasses.replace(reader.settings, passages=passages or self.k)
        scores = reader.score(retriever, mask, show_progress=self.show, desc=desc)
        if key is not None and reader.last_run is not None:
            self.costs[key] = reader.last_run.to_dict()
        return scores

    def summary(self, scores: Scores, select: np.ndarray | None = None) -> dict[str, float]:
        """bits-per-byte, nats per token, perplexity and counts over all (or the selected) chunks."""
        sel = np.ones(len(scores.nats), dtype=bool) if select is None else select
        tokens = int(scores.tokens[sel].sum())
        loss = float(scores.nats[sel].sum()) / tokens if tokens else float("nan")  # nothing scored: no loss, not 0
        return {
            "bpb": bits_per_byte(scores.nats, self.n_bytes, sel),
            "loss": loss,
            "perplexity": math.exp(loss) if tokens else float("nan"),
            "tokens": tokens,
            "bytes": float(self.n_bytes[sel].sum()),
            "chunks": int(sel.sum()),
        }

    def models(self) -> dict[str, dict]:
        """Name → description of every evaluated checkpoint."""
        return {em.label: em.describe() for em in (self.main, *self.baselines)}

    @property
    def main_keys(self) -> tuple[str, str]:
        """Result keys of the main model with and without retrieval."""
        if self.main.in_context:
            return IN_CONTEXT, NO_RETRIEVAL
        return (RETRO, RETRO_OFF) if self.main.retrieval else ("", f"baseline:{self.main.label}")

    def score_off(self, em: EvalModel, key: str) -> Scores:
        """Retrieval-off per-chunk nats of any model (cached)."""
        if ("off", key) not in self._scores:
            desc = "retrieval off" if em is self.main else f"baseline {em.label}"
            self._scores[("off", key)] = (self.score_in_context(em, False, desc=desc, key=key) if em.in_context
                                          else self.score(em, desc=desc))
        return self._scores[("off", key)]

    def reference_scores(self) -> dict[str, Scores]:
        """Retrieval-off scores: the main model without retrieval and every baseline (cached)."""
        out = {self.main_keys[1]: self.score_off(self.main, self.main_keys[1])}
        for b in self.baselines:
            out[f"baseline:{b.label}"] = self.score_off(b, f"baseline:{b.label}")
        return out

    def close(self) -> None:
        self._tmp.cleanup()
