"""Training and evaluation data for RETRO: chunk-aligned sequences of T tokens with their neighbours.

A sequence is ``seq_chunks`` consecutive chunks of a :class:`ChunkStore` (the database itself, or held-out
documents tokenized the same way), so sequence chunk u *is* stored chunk u and its neighbours are the
precomputed ones. Documents start on chunk boundaries; the padding after a document's last token is
masked out of the loss, and that last token is trained to predict EOS (so generation knows where to stop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from retrolm.db import ChunkStore
from retrolm.text.tokenizer import LMTokenizer

IGNORE = -100


@dataclass
class Batch:
    """A training batch. ``neighbours`` is None when retrieval is off."""

    idx: torch.Tensor  # (B, T) input tokens
    targets: torch.Tensor  # (B, T) next tokens, IGNORE where there is nothing to predict
    neighbours: torch.Tensor | None  # (B, C, K, R) neighbour tokens (chunk + continuation)
    neighbour_mask: torch.Tensor | None  # (B, C, K, R) True for real tokens
    n_bytes: torch.Tensor  # (B,) UTF-8 bytes of the target text, for bits-per-byte
    token_mask: torch.Tensor | None = None
    """(B, T) True where ``idx`` holds text: False on the padding after a document's last token, except its first
    position, which separates the documents as an end-of-text token would (see :func:`model_kwargs`)."""
    chunk_docs: torch.Tensor | None = None
    """(B, C) database document of each chunk (-1: padding), when the sequences are the database's own chunks."""
    neighbour_docs: torch.Tensor | None = None
    """(B, C, K) database document of each neighbour (-1: none), with ``chunk_docs``."""

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        # the document ids serve the host-side swap only: they stay where they are
        return Batch(mv(self.idx), mv(self.targets), mv(self.neighbours), mv(self.neighbour_mask), self.n_bytes,
                     mv(self.token_mask), self.chunk_docs, self.neighbour_docs)


def model_kwargs(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Keyword arguments of ``model``'s forward beyond the RETRO interface that ``batch`` fills: the token mask, for a
    model that reads it (``reads_token_mask``: a pretrained base, which never saw runs of padding in its context; a
    RETRO trained here did, and keeps reading them as it was trained)."""
    if getattr(model, "reads_token_mask", False) and batch.token_mask is not None:
        return {"attention_mask": batch.token_mask}
    return {}


def swap_neighbours(batch: Batch, share: float, rng: np.random.Generator) -> Batch:
    """``batch`` with each chunk, with probability ``share``, reading the neighbours of the same chunk of the next
    sequence in the batch (the last sequence: of the first) instead of its own.

    Sequences of a batch are drawn at random from the whole corpus, so the swapped neighbours almost always belong to
    another document: a distractor. A chunk keeps its own tokens and targets; only what it reads changes. Where the
    batch knows its documents (``chunk_docs``), a swapped neighbour from any document of the receiving sequence (with
    near-duplicates excluded: of its family) is masked out: the other sequence's neighbours were searched without
    excluding it (two versions of one file in a batch would otherwise hand a chunk its own text), and so is every
    neighbour a sequence would take from a copy of itself.
    """
    if batch.neighbours is None or share <= 0.0:
        return batch
    if batch.neighbours.shape[0] < 2:
        raise ValueError("swap_neighbours needs at least two sequences in the batch")
    pick = torch.from_numpy(rng.random(batch.neighbours.shape[:2]) < share)[:, :, None, None]
    mask = batch.neighbour_mask.roll(-1, 0)
    # a sequence drawn twice in one step (the end of one epoch's order meets the start of the next) would hand its
    # copy its own neighbours: nothing is read instead
    same = (batch.idx == batch.idx.roll(-1, 0)).all(1)
    mask = mask & ~same[:, None, None, None].to(mask.device)
    docs = batch.neighbour_docs
    if docs is not None and batch.chunk_docs is not None:
        donor = docs.roll(-1, 0)  # (B, C, K)
        own = ((donor[..., None] == batch.chunk_docs[:, None, None, :]) & (donor[..., None] >= 0)).any(-1)
        mask = mask & ~own[..., None].to(mask.device)  # the document ids stay on the host (Batch.to)
        docs = torch.where(pick[..., 0], donor, docs)
    return dataclasses.replace(
        batch,
        neighbours=torch.where(pick, batch.neighbours.roll(-1, 0), batch.neighbours),
        neighbour_mask=torch.where(pick, mask, batch.neighbour_mask),
        neighbour_docs=docs,
    )


def n_sequences(n_chunks: int, seq_chunks: int, stride: int | None = None, include_tail: bool = False) -> int:
    """How many sequences of ``seq_chunks`` chunks, started every ``stride`` chunks (default: back to back), a store
    of ``n_chunks`` chunks serves (with ``include_tail``, the last, partial one too)."""
    n, C, S = n_chunks, seq_chunks, stride or seq_chunks
    if n < C:
        return int(include_tail and n > 0)
    return 1 + (-(-(n - C) // S) if include_tail else (n - C) // S)


def chunk_bytes(store: ChunkStore, tokenizer: LMTokenizer | None = None) -> np.ndarray:
    """UTF-8 bytes of the text predicted in each chunk (n_chunks,): its share of its document's bytes by tokens.

    A document's first token is never predicted (nothing precedes it: sequences carry no BOS), so with a
    ``tokenizer`` its bytes are left out and the rest of the document's bytes are shared among the tokens that are
    predicted. Summed over a document's chunks this is exactly the bytes of its predicted text, so bits-per-byte
    over whole documents is exact, and over any subset of chunks (e.g. the leakage analysis) a fair estimate.
    """
    chunk = np.arange(store.n_chunks) + store.first_chunk
    doc = store.all_chunk_docs() - store.first_doc
    lens = store.lengths(chunk).astype(np.float64)
    doc_bytes, doc_tokens = store.doc_n_bytes.astype(np.float64), store.doc_n_tokens.astype(np.float64)
    if tokenizer is not None and store.n_docs:
        first_ids = store.tokens(store.doc_first_chunk)[:, 0]
        # a first token that splits a character decodes to U+FFFD: at most a couple of bytes off for that document
        first = np.array([len(t.encode()) for t in tokenizer.decode_batch([[int(i)] for i in first_ids])])
        doc_bytes = np.maximum(0.0, doc_bytes - first)
        doc_tokens = doc_tokens - 1
        lens = lens - (chunk == store.doc_first_chunk[doc])
    return doc_bytes[doc] * lens / np.maximum(1, doc_tokens[doc])


class RetroSequences:
    """Sequence ``s`` = chunks ``[s*S, s*S + C)`` of ``source`` with their neighbours from ``db_store``, where the
    stride S = C − ``context_chunks`` (S = C: sequences do not overlap).

    Args:
        source: the chunks to train/evaluate on.
        seq_chunks: C, chunks per sequence (T = C * chunk_len).
        eos_id: target after a document's last token (None → not trained).
        neighbours: ``(source.n_chunks, K)`` neighbour chunk ids into ``db_store`` (-1 = missing), or None.
        db_store: the database's chunks, where neighbour tokens come from.
        num_neighbours: use only the first K' <= K neighbours.
        include_tail: also serve the last, partial sequence (padded; evaluation must score every chunk).
        tokenizer: the LM tokenizer, to leave each document's (unpredicted) first token out of the byte counts.
        context_chunks: o, 0 <= o < C: each sequence after the first starts o chunks before the previous one ends
            and those o chunks are context only (:meth:`scored` leaves them to the previous sequence). In RETRO a
            sequence's first chunk reads no neighbours (nothing was retrieved before it), so with o = 0 one chunk in
            C is scored without retrieval; with o >= 1 every chunk after the first o of the stream reads, at a cost
            of C / (C − o) forward passes per chunk.
    """

    def __init__(
        self,
        source: ChunkStore,
        seq_chunks: int,
        eos_id: int | None,
        neighbours: np.ndarray | None = None,
        db_store: ChunkStore | None = None,
        num_neighbours: int | None = None,
        include_tail: bool = False,
        tokenizer: LMTokenizer | None = None,
        context_chunks: int = 0,
        doc_family: np.ndarray | None = None,
    ):
        if not 0 <= context_chunks < seq_chunks:
            raise ValueError(f"context_chunks={context_chunks} must be in 0..seq_chunks-1={seq_chunks - 1}")
        if neighbours is not None and (db_store is None or len(neighbours) != source.n_chunks):
            raise ValueError("neighbours need db_store and one row per source chunk")
        self.source, self.C, self.eos_id = source, seq_chunks, eos_id
        self.context = context_chunks
        self.stride = seq_chunks - context_chunks
        self.m = source.chunk_len
        self.neighbours, self.db_store = neighbours, db_store
        stored = neighbours.shape[1] if neighbours is not None else 0
        self.k = stored if num_neighbours is None else num_neighbours
        if neighbours is not None and self.k > neighbours.shape[1]:
            raise ValueError(f"num_neighbours={self.k} but only {neighbours.shape[1]} neighbours per chunk are stored")
        self.include_tail = include_tail
        # the document ids a batch carries for the neighbour swap: with near-duplicates excluded, a document's whole
        # family (its other versions), so that a swapped neighbour from another version is masked as its own is
        self._family = doc_family
        self._doc = source.all_chunk_docs()
        self._last = np.zeros(source.n_chunks, dtype=bool)  # chunk is the last of its document
        ends = source.doc_first_chunk + source.doc_n_chunks - 1 - source.first_chunk
        self._last[ends] = True
        self.chunk_bytes = chunk_bytes(source, tokenizer)

    def __len__(self) -> int:
        return n_sequences(self.source.n_chunks, self.C, self.stride, self.include_tail)

    def start(self, s: int) -> int:
        """The first chunk of sequence ``s``."""
        return s * self.stride

    def scored(self, s: int) -> tuple[int, int]:
        """The chunks ``[lo, hi)`` whose losses sequence ``s`` books: all its chunks when sequences do not overlap
        (and, as then, the first chunk of the next sequence, whose first token its last position predicts); with
        context chunks, all but the leading ones (except in sequence 0), so that every chunk is scored once."""
        lo = self.start(s)
        if self.context == 0:
            return lo, lo + self.C + 1
        return (lo if s == 0 else lo + self.context), lo + self.C

    def sequence(self, s: int, with_neighbours: bool = True) -> dict[str, np.ndarray]:
        m, C, n = self.m, self.C, self.source.n_chunks
        ids = np.arange(self.start(s), min(self.start(s) + C, n))  # fewer than C only for the tail
        toks = np.full((C, m), self.source.pad_id, dtype=np.int64)
        lens = np.zeros(C, dtype=np.int64)
        toks[: len(ids)] = self.source.tokens(ids + self.source.first_chunk)
        lens[: len(ids)] = self.source.lengths(ids + self.source.first_chunk)
        real = np.arange(m)[None, :] < lens[:, None]  # (C, m)
        flat = toks.reshape(-1)
        nxt = np.empty_like(flat)
        nxt[:-1] = flat[1:]
        last = ids[-1] + 1  # the token after the sequence, if it continues the same document
        nxt[-1] = (self.source.tokens([last + self.source.first_chunk])[0, 0]
                   if last < n and not self._last[ids[-1]] else IGNORE)
        targets = np.where(real.reshape(-1), nxt, IGNORE).reshape(C, m)
        # The last real token of a document predicts EOS; the padding after it predicts nothing.
        rows = np.flatnonzero(self._last[ids])
        targets[rows, lens[rows] - 1] = self.eos_id if self.eos_id is not None else IGNORE
        visible = real.copy()
        ended = rows[lens[rows] < m]  # the first padding position after a document ends stands for end-of-text
        visible[ended, lens[ended]] = True
        out = {
            "idx": flat,
            "targets": targets.reshape(-1),
            "token_mask": visible.reshape(-1),
            # Bytes of the text predicted in this sequence: each chunk's share of its document's bytes.
            "n_bytes": np.float64(self.chunk_bytes[ids[ids >= self.scored(s)[0]]].sum()),
        }
        if with_neighbours and self.neighbours is not None and self.k > 0:
            nb = np.full((C, self.k), -1, dtype=np.int64)
            nb[: len(ids)] = self.neighbours[ids, : self.k]
            ntoks, nmask = self.db_store.neighbour_tokens(nb.reshape(-1))
            out["neighbours"] = ntoks.reshape(C, self.k, 2 * m)
            out["neighbour_mask"] = nmask.reshape(C, self.k, 2 * m)
            if self.db_store is self.source:  # training on the database's chunks: documents share one numbering
                fam = (lambda d: d) if self._family is None else (lambda d: self._family[d])
                chunk_docs = np.full(C, -1, dtype=np.int64)
                chunk_docs[: len(ids)] = fam(self._doc[ids])
                out["chunk_docs"] = chunk_docs
                out["neighbour_docs"] = np.where(nb >= 0, fam(self.db_store.chunk_doc(np.maximum(nb, 0))), -1)
        return out

    def batch(self, seqs: Sequence[int], with_neighbours: bool = True) -> Batch:
        items = [self.sequence(int(s), with_neighbours) for s in seqs]
        has_nb = "neighbours" in items[0]
        return Batch(
            idx=torch.from_numpy(np.stack([i["idx"] for i in items])),
            targets=torch.from_numpy(np.stack([i["targets"] for i in items])),
            neighbours=torch.from_numpy(np.stack([i["neighbours"] for i in items])) if has_nb else None,
            neighbour_mask=torch.from_numpy(np.stack([i["neighbour_mask"] for i in items])) if has_nb else None,
            n_bytes=torch.tensor([i["n_bytes"] for i in items], dtype=torch.float64),
            token_mask=torch.from_numpy(np.stack([i["token_mask"] for i in items])),
            chunk_docs=torch.from_numpy(np.stack([i["chunk_docs"] for i in items])) if "chunk_docs" in items[0]
            else None,
            neighbour_docs=torch.from_numpy(np.stack([i["neighbour_docs"] for i in items]).astype(np.int64))
            if "chunk_docs" in items[0] else None,
        )
