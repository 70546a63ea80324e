"""In-context retrieval: any pretrained causal LM reads retrieved text placed before its context (Ram et al. 2023).

Every ``stride`` tokens of a document, the last ``query_tokens`` tokens are the query; the retrieved passages (a
database chunk, plus its continuation by default) are placed before the most recent ``context_tokens`` tokens of the
document, and the LM predicts the next ``stride`` tokens. Nothing is trained. The query holds only tokens that come
before the predicted ones, and evaluation documents (and their near-duplicates) are excluded from retrieval exactly as
for RETRO, so the comparison with RETRO and with the LM alone is on the same held-out chunks.

The LM may use another tokenizer than the database: losses are booked to the database chunk in which the predicted
token starts (by character offset), so bits-per-byte per chunk, the leakage analysis and novel chunks are shared
with every other reader. Without retrieval the LM reads the same document window, so the gain is retrieval's alone.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from retrolm.db import ChunkStore, Hit
from retrolm.models.hf import CausalLM
from retrolm.retrieval import Exclusion, Retriever
from retrolm.text.corpus import iter_documents
from retrolm.text.tokenizer import PIECE_CHARS, LMTokenizer, _pieces
from retrolm.train import Scores

logger = logging.getLogger(__name__)

PASSAGE_SEPARATOR = "\n\n"


@dataclass
class InContextSettings:
    """How the LM reads retrieved text."""

    stride: int = 32
    """Tokens predicted per retrieval (Ram et al.: 4 is best, 64 loses much of the gain)."""
    query_tokens: int = 32
    """The query: this many of the most recent tokens before the predicted ones."""
    passages: int = 1
    """Retrieved passages placed in the context (the best one closest to the document text)."""
    continuation: bool = True
    """A passage is the retrieved chunk followed by its continuation (RETRO's neighbour), else the chunk alone."""
    context_tokens: int = 512
    """Most recent document tokens kept before the predicted ones (with or without retrieval)."""
    batch_size: int = 8
    """Windows per forward pass."""


def encode_with_offsets(tokenizer: LMTokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the character offset at which each token starts (tokenized in the same pieces as
    :meth:`LMTokenizer.encode`, so the ids are identical)."""
    ids: list[int] = []
    starts: list[int] = []
    shift = 0
    for piece in _pieces(text) if len(text) > PIECE_CHARS and tokenizer._pieces_safe else [text]:
        enc = tokenizer.tok.encode(piece, add_special_tokens=False)
        ids += enc.ids
        starts += [shift + s for s, _ in enc.offsets]
        shift += len(piece)
    return ids, starts


@dataclass
class _Document:
    ids: list[int]
    """The LM's tokens of the document."""
    owner: np.ndarray
    """(len(ids),) held-out chunk id (global in the source store) of each token."""
    first: int = 1
    """The first token predicted: the tokens before it cover the text of the database tokenizer's first token, which
    no model predicts (the byte counts leave it out); exactly, unless that token ends inside a character or the LM's
    tokenizer marks the start of a text (then to the LM's next token)."""


@dataclass
class InContextRun:
    """What scoring cost."""

    scored_tokens: int
    forward_tokens: int
    seconds: float
    retrievals: int

    def to_dict(self) -> dict:
        return {"scored_tokens": self.scored_tokens, "forward_tokens": self.forward_tokens,
                "forward_tokens_per_scored_token": round(self.forward_tokens / max(1, self.scored_tokens), 2),
                "scored_tokens_per_s": round(self.scored_tokens / max(self.seconds, 1e-9), 1),
                "seconds": round(self.seconds, 1), "retrievals": self.retrievals}


class InContextScorer:
    """Per-chunk nats of a causal LM on held-out documents, with or without in-context retrieval.

    Args:
        lm: the reader.
        lm_tokenizer: its tokenizer.
        source: the held-out documents tokenized like the database (the chunks results are booked to).
        source_tokenizer: the database's tokenizer.
        texts: doc id → text of every held-out document.
    """

    def __init__(self, lm: CausalLM, lm_tokenizer: LMTokenizer, source: ChunkStore, source_tokenizer: LMTokenizer,
                 texts: dict[str, str], settings: InContextSettings) -> None:
        self.lm, self.tok, self.settings = lm, lm_tokenizer, settings
        self.docs = [self._align(source, source_tokenizer, d, texts[doc_id]) for d, doc_id in enumerate(source.doc_ids)]
        self.n_chunks = source.n_chunks
        self.last_run: InContextRun | None = None

    def _align(self, source: ChunkStore, source_tokenizer: LMTokenizer, d: int, text: str) -> _Document:
        """The LM's tokens of document ``d`` and the held-out chunk each one starts in."""
        src_ids, src_starts = encode_with_offsets(source_tokenizer, text)
        m, first = source.chunk_len, int(source.doc_first_chunk[d])
        assert len(src_ids) == int(source.doc_n_tokens[d]), "held-out text and its stored tokens disagree"
        chunk_starts = np.asarray(src_starts[::m])  # character where each of the document's chunks starts
        ids, starts = encode_with_offsets(self.tok, text)
        # the bytes of a chunk are those of its database tokens, less the document's first one (chunk_bytes): the
        # LM predicts from the character where the database's second token starts, so both score the same text
        end = src_starts[1] if len(src_ids) > 1 else len(text)
        if end >= len(text):
            predicted_from = len(ids)  # a one-token document: only the end of text is predicted
        elif end in starts or not self.tok._pieces_safe:
            # (a tokenizer that marks the start of a text, Llama-2's "▁", would gain a phantom token in a second part:
            # it predicts from its first token at or after that point, a few bytes off for such a document)
            predicted_from = bisect.bisect_left(starts, end)
        else:  # an LM token straddles it: the LM reads the text in two parts there
            head, head_starts = encode_with_offsets(self.tok, text[:end])
            tail, tail_starts = encode_with_offsets(self.tok, text[end:])
            ids, starts, predicted_from = head + tail, head_starts + [end + t for t in tail_starts], len(head)
        owner = first + np.maximum(np.searchsorted(chunk_starts, np.asarray(starts), side="right") - 1, 0)
        return _Document(ids, owner.astype(np.int64), max(1, predicted_from))

    def _windows(self) -> list[tuple[int, int, int]]:
        """(document, first target index, number of targets) of every block; the EOS after the last token counts as
        a target when the LM has one."""
        s = self.settings.stride
        out = []
        for d, doc in enumerate(self.docs):
            n = len(doc.ids) + (1 if self.tok.eos_id is not None else 0)
            out += [(d, t0, min(s, n - t0)) for t0 in range(doc.first, n, s)]
        return out

    def _merge_unretrieved(self, windows: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Without retrieval, the blocks of a document whose window starts at its first token are one row: each of
        their targets sees exactly what it would see in its own block (everything before it), at a fraction of the
        cost."""
        out: list[tuple[int, int, int]] = []
        for d, t0, n in windows:
            prev = out[-1] if out else None
            if prev is not None and prev[0] == d and prev[1] + prev[2] == t0 and t0 <= self.settings.context_tokens:
                out[-1] = (d, prev[1], prev[2] + n)
            else:
                out.append((d, t0, n))
        return out

    def score(self, retriever: Retriever | None = None, exclude_chunks: np.ndarray | None = None,
              show_progress: bool = False, desc: str = "score") -> Scores:
        """Per-chunk nats and target counts over all held-out chunks; with a ``retriever``, each block reads the
        passages retrieved with the tokens before it (``exclude_chunks`` never retrieved)."""
        cfg, eos = self.settings, self.tok.eos_id
        windows = self._windows()
        passages: list[list[int]] = [[] for _ in windows]
        retrievals = 0
        if retriever is not None:
            todo = [i for i, (d, t0, _) in enumerate(windows) if t0 > self.docs[d].first]  # the first reads none
            queries = [self.tok.decode(self.docs[windows[i][0]].ids[max(0, windows[i][1] - cfg.query_tokens):
                                                                    windows[i][1]]) for i in todo]
            if queries:
                result = retriever.search(queries, cfg.passages, Exclusion(chunks=exclude_chunks))
                retrievals = len(queries)
                for row, i in enumerate(todo):
                    passages[i] = self.passage_tokens(result.hits(row))
        if retriever is None:
            windows = self._merge_unretrieved(windows)
            passages = [[] for _ in windows]
        rows, n_targets = [], []
        for (d, t0, n), passage in zip(windows, passages, strict=True):
            ids = self.docs[d].ids + ([eos] if eos is not None else [])
            start = max(0, t0 - cfg.context_tokens)
            rows.append(passage + ids[start : t0 + n])
            n_targets.append(n)
        nats, count = np.zeros(self.n_chunks), np.zeros(self.n_chunks, dtype=np.int64)
        t = time.perf_counter()
        for b in tqdm(range(0, len(rows), 64), desc=desc, unit="x64 windows", disable=not show_progress, leave=False):
            nll = self.lm.token_nll(rows[b : b + 64], n_targets[b : b + 64], cfg.batch_size)
            for (d, t0, n), values in zip(windows[b : b + 64], nll, strict=True):
                doc = self.docs[d]
                # the EOS after the last token belongs to the chunk of that token
                owners = doc.owner[np.minimum(np.arange(t0, t0 + n), len(doc.ids) - 1)]
                np.add.at(nats, owners, values.double().numpy())
                np.add.at(count, owners, 1)
        self.last_run = InContextRun(int(sum(n_targets)), int(sum(map(len, rows))), time.perf_counter() - t,
                                     retrievals)
        return Scores(nats, count)

    def passage_tokens(self, hits: list[Hit]) -> list[int]:
        """The LM's tokens of retrieved passages (see :func:`passages_text`)."""
        text = passages_text(hits, self.settings.continuation)
        return self.tok.encode(text) if text else []


def passages_text(hits: list[Hit], continuation: bool = True) -> str:
    """Retrieved passages as the text placed before the document: best last (closest to the document), each one the
    chunk (and its continuation) followed by a blank line."""
    return "".join((h.text + (h.continuation if continuation else "")).strip() + PASSAGE_SEPARATOR
                   for h in reversed(hits))


def document_texts(paths: list[str], max_docs: int | None) -> dict[str, str]:
    """doc id → text of held-out documents, read exactly as :func:`retrolm.db.tokenize_corpus` reads them."""
    return {d.id: d.text for d in itertools.islice(iter_documents(paths, warn=False), max_docs)}


__all__ = ["InContextRun", "InContextScorer", "InContextSettings", "document_texts", "encode_with_offsets",
           "passages_text"]
