"""Bits-per-byte by hand: which chunk owns each loss, the bytes each chunk holds, and the sum / ln 2 / bytes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrolm.db.chunks import ChunkStore, SegmentWriter
from retrolm.train.data import IGNORE, RetroSequences, chunk_bytes
from retrolm.train.scoring import bits_per_byte, book_losses, score_sequences

M, PAD, EOS = 4, 0, 3


class ByteTokenizer:
    """Token t decodes to 'é' * (t % 3) + 'a': 2 * (t % 3) + 1 UTF-8 bytes."""

    def decode_batch(self, batch):
        return ["".join("é" * (t % 3) + "a" for t in ids) for ids in batch]


def make_store(tmp_path, docs_per_segment) -> list:
    """Segments of (tokens, n_bytes) documents; returns their folders."""
    folders, first_chunk, first_doc = [], 0, 0
    for s, docs in enumerate(docs_per_segment):
        w = SegmentWriter(tmp_path / f"seg{s}", M, np.dtype(np.uint16), PAD, first_chunk, first_doc)
        for i, (ids, n_bytes) in enumerate(docs):
            w.add(f"d{s}.{i}", "x", n_bytes, ids)
        info = w.close()
        folders.append(tmp_path / f"seg{s}")
        first_chunk, first_doc = first_chunk + info["n_chunks"], first_doc + info["n_docs"]
    return folders


# doc 0: 5 tokens (chunks 0, 1), doc 1: 8 tokens (chunks 2, 3), doc 2: 1 token (chunk 4), doc 3: 6 tokens (5, 6)
SEG0 = [([11, 12, 13, 14, 15], 50), ([21, 22, 23, 24, 25, 26, 27, 28], 80)]
SEG1 = [([31], 10), ([40, 41, 42, 43, 44, 45], 2)]


def test_chunk_bytes_share_each_documents_bytes_by_tokens(tmp_path):
    store = ChunkStore.open(make_store(tmp_path, [SEG0, SEG1]), M, PAD)
    # without a tokenizer: n_bytes * tokens in the chunk / tokens in the document
    np.testing.assert_allclose(chunk_bytes(store), [40, 10, 40, 40, 10, 2 * 4 / 6, 2 * 2 / 6], rtol=1e-12)
    # with one: the unpredicted first token's bytes (11 → 5, 21 → 1, 31 → 3, 40 → 3) and the token itself are left out
    np.testing.assert_allclose(chunk_bytes(store, ByteTokenizer()), [
        45 * 3 / 4, 45 * 1 / 4,  # 50 - 5 bytes over 4 predicted tokens: 3 in the first chunk, 1 in the second
        79 * 3 / 7, 79 * 4 / 7,
        0.0,  # a one-token document predicts nothing
        0.0, 0.0,  # fewer bytes than its first token (a U+FFFD split): nothing left, never negative
    ], rtol=1e-12)
    # the new segment of an `add` alone gets the same numbers as inside the whole database
    tail = ChunkStore.open([tmp_path / "seg1"], M, PAD)
    np.testing.assert_allclose(chunk_bytes(tail, ByteTokenizer()), chunk_bytes(store, ByteTokenizer())[4:])
    np.testing.assert_allclose(chunk_bytes(tail), chunk_bytes(store)[4:])
    assert chunk_bytes(ChunkStore([], M, PAD), ByteTokenizer()).shape == (0,)


def test_bits_per_byte_is_nats_over_ln2_over_bytes():
    nats = np.array([1.0, 2.0, 3.0]) * math.log(2)
    n_bytes = np.array([1.0, 2.0, 5.0])
    assert bits_per_byte(nats, n_bytes) == pytest.approx(6 / 8, rel=1e-12)
    assert bits_per_byte(nats, n_bytes, np.array([True, False, True])) == pytest.approx(4 / 6, rel=1e-12)
    assert bits_per_byte(nats, n_bytes, np.array([1])) == pytest.approx(1.0, rel=1e-12)
    assert math.isnan(bits_per_byte(nats, np.zeros(3)))
    assert math.isnan(bits_per_byte(nats, n_bytes, np.zeros(3, dtype=bool)))
    assert isinstance(bits_per_byte(nats, n_bytes), float)
    assert bits_per_byte(np.array([math.log(2)]), np.array([0.5])) == pytest.approx(2.0)  # under one byte is fine


def book(nats, count, ce, targets, first_seq, eos, scored=None):
    """book_losses for consecutive non-overlapping sequences of 2 chunks of 2 tokens, one row at a time."""
    for r in range(len(ce)):
        book_losses(nats, count, ce[r : r + 1], targets[r : r + 1], 2 * (first_seq + r), 2, eos, scored)


def test_each_loss_is_booked_to_the_chunk_of_the_token_it_predicts():
    # chunks of 2, sequences of 2 chunks, 6 chunks in all; rows are sequences 1 and 2 (chunks 2-3 and 4-5)
    targets = np.array([[5, EOS, 6, IGNORE], [7, 8, 9, 10]])
    ce = np.array([[0.1, 0.2, 0.4, 0.8], [1.0, 2.0, 4.0, 8.0]])
    nats, count = np.full(6, 100.0), np.zeros(6, dtype=np.int64)
    book(nats, count, ce, targets, 1, EOS)
    # position p predicts token p+1: owner chunk (p+1)//2; the EOS after a document's last token (p=1) stays in
    # that token's chunk (0); the last position predicts the next sequence's first token (chunk 6: none, dropped)
    np.testing.assert_allclose(nats - 100, [0, 0, 0.1 + 0.2, 0.4, 1.0, 2.0 + 4.0])
    np.testing.assert_array_equal(count, [0, 0, 2, 1, 1, 2])
    nats, count = np.zeros(6), np.zeros(6, dtype=np.int64)
    book(nats, count, ce, targets, 1, None)  # no EOS: position 1 simply predicts into chunk 1
    np.testing.assert_allclose(nats, [0, 0, 0.1, 0.2 + 0.4, 1.0, 2.0 + 4.0])
    np.testing.assert_array_equal(count, [0, 0, 1, 2, 1, 2])
    nats, count = np.zeros(6), np.zeros(6, dtype=np.int64)
    book(nats, count, ce[:1], np.array([[5, 1, 6, IGNORE]]), 1, None)  # token 1 is no EOS either
    np.testing.assert_allclose(nats, [0, 0, 0.1, 0.2 + 0.4, 0, 0])
    nats, count = np.zeros(6), np.zeros(6, dtype=np.int64)
    book(nats, count, ce[1:], targets[1:], 0, EOS)  # the same row as sequence 0: chunk 2 gets position 3
    np.testing.assert_allclose(nats, [1.0, 6.0, 8.0, 0, 0, 0])
    np.testing.assert_array_equal(count, [1, 2, 1, 0, 0, 0])
    nats, count = np.zeros(6), np.zeros(6, dtype=np.int64)
    book(nats, count, ce[1:], targets[1:], 0, EOS, scored=(1, 2))  # only the owners in [1, 2): chunk 1
    np.testing.assert_allclose(nats, [0, 6.0, 0, 0, 0, 0])


class LookupModel(torch.nn.Module):
    """logits[b, t] = table[idx[b, t]]; records whether it was given neighbours and whether it was in eval mode."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))
        self.calls = []

    def forward(self, idx, neighbours=None, mask=None):
        self.calls.append((neighbours is not None, self.training, idx.shape[0]))
        return SimpleNamespace(logits=self.table[idx])


def test_score_sequences_sums_cross_entropy_over_every_scored_target(tmp_path):
    store = ChunkStore.open(make_store(tmp_path, [SEG0, SEG1]), M, PAD)
    seqs = RetroSequences(store, 2, EOS, include_tail=True)  # 7 chunks: sequences 0-3, the last one partial
    model = LookupModel(64).train()
    scores = score_sequences(model, seqs, [2, 0], batch_size=2)  # one batch of two sequences, not in order
    assert model.training and model.calls == [(False, False, 2)]  # scored in eval mode, then restored
    assert scores.nats.shape == (7,) and scores.tokens.dtype == np.int64
    want_nats, want_tokens = np.zeros(7), np.zeros(7, dtype=np.int64)
    for s in (0, 2):
        item = seqs.sequence(s)
        idx, tgt = torch.from_numpy(item["idx"]), torch.from_numpy(item["targets"])
        ce = F.cross_entropy(model.table[idx].double(), tgt, ignore_index=IGNORE, reduction="none").detach().numpy()
        book_losses(want_nats, want_tokens, ce[None], item["targets"][None], 2 * s, M, EOS)
    np.testing.assert_allclose(scores.nats, want_nats, rtol=1e-6)
    np.testing.assert_array_equal(scores.tokens, want_tokens)
    # a document's first token is never predicted, its EOS is; sequence 2's last position predicts chunk 6's first
    assert scores.tokens[[0, 1, 4, 5, 6]].tolist() == [3, 2, 1, 3, 1]
    assert scores.tokens[2:4].sum() == 0 and scores.nats[2:4].sum() == 0  # sequence 1 was not asked for
    model.calls.clear()
    again = score_sequences(model.eval(), seqs, batch_size=2, with_neighbours=False)  # all sequences, 2 at a time
    assert [c[2] for c in model.calls] == [2, 2] and not model.training
    assert again.tokens.sum() == sum(int((seqs.sequence(s)["targets"] != IGNORE).sum()) for s in range(4))
    np.testing.assert_allclose(again.nats[[0, 1, 4, 5]], scores.nats[[0, 1, 4, 5]], rtol=1e-6)


class FirstChunkBlind(LookupModel):
    """LookupModel, but uniform where a RETRO model reads nothing: positions before the first chunk's last one."""

    def forward(self, idx, neighbours=None, mask=None):
        logits = self.table[idx].clone()
        logits[:, : M - 1] = 0.0
        return SimpleNamespace(logits=logits)


def test_context_chunks_score_every_chunk_once_and_never_from_a_sequences_first_chunk(tmp_path):
    store = ChunkStore.open(make_store(tmp_path, [SEG0, SEG1]), M, PAD)  # 7 chunks
    lookup = LookupModel(64)
    for C in (2, 3, 4):
        plain = RetroSequences(store, C, EOS, include_tail=True, tokenizer=ByteTokenizer())
        want = score_sequences(lookup, plain)
        for o in range(1, C):
            seqs = RetroSequences(store, C, EOS, include_tail=True, tokenizer=ByteTokenizer(), context_chunks=o)
            assert seqs.start(len(seqs) - 1) + C >= 7 > seqs.start(len(seqs) - 2) + C  # covers all, no extra one
            got = score_sequences(lookup, seqs)  # a model without context: the same nats, chunk by chunk
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_allclose(got.nats, want.nats, rtol=1e-6)
            n_bytes = sum(seqs.sequence(s)["n_bytes"] for s in range(len(seqs)))
            assert n_bytes == pytest.approx(seqs.chunk_bytes.sum())  # each chunk's bytes counted once
    assert len(RetroSequences(store, 4, EOS, context_chunks=1)) == 2  # full sequences only: chunks 0-3 and 3-6
    assert len(RetroSequences(store, 4, EOS, context_chunks=3)) == 4
    with pytest.raises(ValueError, match=r"context_chunks=2 must be in 0\.\.seq_chunks-1=1"):
        RetroSequences(store, 2, EOS, context_chunks=2)
    # a model blind in each sequence's first chunk: with context chunks only the stream's first chunk pays for it
    blind = FirstChunkBlind(64)
    blind.table = lookup.table
    plain = score_sequences(blind, RetroSequences(store, 2, EOS, include_tail=True))
    ctx = score_sequences(blind, RetroSequences(store, 2, EOS, include_tail=True, context_chunks=1))
    seeing = score_sequences(lookup, RetroSequences(store, 2, EOS, include_tail=True))
    np.testing.assert_allclose(ctx.nats[1:], seeing.nats[1:], rtol=1e-6)
    uniform = math.log(64)
    assert ctx.nats[0] == pytest.approx(3 * uniform)  # the stream's first chunk: three tokens predicted blind
    # without context chunks, sequences start at chunks 0, 2, 4, 6: chunk 2 predicts three tokens blind, the lone-token
    # chunk 4 its EOS; chunks 1, 3, 5 are read as before
    assert plain.nats[2] == pytest.approx(3 * uniform) and plain.nats[4] == pytest.approx(uniform)
    np.testing.assert_allclose(plain.nats[[1, 3, 5]], seeing.nats[[1, 3, 5]], rtol=1e-6)
