"""Precomputed neighbours (own document excluded, version-checked) and chunk-aligned training sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import wiki_docs, write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.db import tokenize_corpus
from retrolm.retrieval import DenseRetriever
from retrolm.retrieval.neighbours import NeighbourConfig, compute_neighbours, load_neighbours, save_neighbours
from retrolm.train.data import IGNORE, RetroSequences, chunk_bytes, swap_neighbours


def test_neighbours_never_come_from_own_document(built_db):
    nb = compute_neighbours(DenseRetriever(built_db), config=NeighbourConfig(k=4), show_progress=False)
    store = built_db.store
    assert nb.shape == (store.n_chunks, 4) and (nb >= 0).all()
    own = store.chunk_doc(np.arange(store.n_chunks))
    assert (store.chunk_doc(nb) != own[:, None]).all()
    # Without exclusion a chunk's nearest neighbour is itself.
    nb0 = compute_neighbours(DenseRetriever(built_db), config=NeighbourConfig(k=1, exclude="none"), show_progress=False)
    np.testing.assert_array_equal(nb0[:, 0], np.arange(store.n_chunks))


def test_sequence_exclusion_is_stricter(built_db):
    cfg = NeighbourConfig(k=2, exclude="sequence", seq_chunks=4)
    nb = compute_neighbours(DenseRetriever(built_db), config=cfg, show_progress=False)
    docs = built_db.store.chunk_doc(np.arange(built_db.store.n_chunks))
    for c in range(0, built_db.store.n_chunks):
        seq_docs = set(docs[(c // 4) * 4 : (c // 4 + 1) * 4].tolist())
        assert not set(built_db.store.chunk_doc(nb[c]).tolist()) & seq_docs


def test_neighbour_sets_record_the_database_version(built_db, tmp_path):
    nb = compute_neighbours(DenseRetriever(built_db), config=NeighbourConfig(k=2), show_progress=False)
    save_neighbours(tmp_path / "nb", nb, built_db, NeighbourConfig(k=2))
    np.testing.assert_array_equal(load_neighbours(tmp_path / "nb", built_db), nb)
    built_db.meta["version"] += 1
    try:
        with pytest.raises(RetrolmError, match="recompute"):
            load_neighbours(tmp_path / "nb", built_db)
    finally:
        built_db.meta["version"] -= 1


def test_sequences_targets_and_neighbours(built_db):
    store, m = built_db.store, built_db.chunk_len
    nb = compute_neighbours(DenseRetriever(built_db), config=NeighbourConfig(k=2), show_progress=False)
    eos = built_db.tokenizer.eos_id
    seqs = RetroSequences(store, seq_chunks=4, eos_id=eos, neighbours=nb, db_store=store)
    assert len(seqs) == store.n_chunks // 4
    b = seqs.batch([0, 1])
    assert b.idx.shape == (2, 4 * m) and b.neighbours.shape == (2, 4, 2, 2 * m)
    item = seqs.sequence(1)
    ids = np.arange(4, 8)
    np.testing.assert_array_equal(item["idx"].reshape(4, m), store.tokens(ids))
    lens, targets = store.lengths(ids), item["targets"].reshape(4, m)
    last = store.doc_first_chunk + store.doc_n_chunks - 1
    for row, c in enumerate(ids):
        n = int(lens[row])
        assert (targets[row, n:] == IGNORE).all()  # padding predicts nothing
        np.testing.assert_array_equal(targets[row, : n - 1], store.tokens([c])[0, 1:n])
        if c in last:
            assert targets[row, n - 1] == eos  # a document's last token predicts EOS
        elif row < 3:
            assert targets[row, n - 1] == store.tokens([c + 1])[0, 0]
    # The token mask shows the text and, after a document's last token, one padding position (its end-of-text).
    for s in range(len(seqs)):
        got, cs = seqs.sequence(s)["token_mask"].reshape(4, m), np.arange(4 * s, 4 * s + 4)
        lens = store.lengths(cs)
        for row, c in enumerate(cs):
            want = np.arange(m) < lens[row] + (1 if c in last and lens[row] < m else 0)
            np.testing.assert_array_equal(got[row], want)
    assert any(c in last and store.lengths([c])[0] < m for c in range(len(seqs) * 4))  # the case occurs
    # Neighbour tokens are the neighbour chunk followed by its continuation.
    toks, _mask = store.neighbour_tokens(nb[ids].reshape(-1))
    np.testing.assert_array_equal(item["neighbours"].reshape(-1, 2 * m), toks)
    # Bytes: a sequence holds each of its chunks' share of the chunk's document bytes (by tokens), so over every
    # sequence a whole document's UTF-8 bytes are counted exactly once, and a document cut off at the end pro rata.
    n_bytes = [seqs.sequence(s, with_neighbours=False)["n_bytes"] for s in range(len(seqs))]
    covered_ids = np.arange(len(seqs) * 4)
    covered, covered_lens = store.chunk_doc(covered_ids), store.lengths(covered_ids).astype(int)
    expected = 0.0
    for d in np.unique(covered):
        tokens = store.doc_tokens(d)
        n_covered = covered_lens[covered == d].sum()
        utf8 = len(built_db.tokenizer.decode(tokens.tolist()).encode())  # byte-level BPE: the document's text
        expected += utf8 if n_covered == len(tokens) else store.doc_n_bytes[d] * n_covered / len(tokens)
    assert sum(n_bytes) == pytest.approx(expected, rel=1e-12)
    # sequence 1 (chunks 4-7): the shares of exactly those chunks
    doc1, lens1 = store.chunk_doc(ids), store.lengths(ids).astype(int)
    share = sum(store.doc_n_bytes[d] * n / store.doc_n_tokens[d] for d, n in zip(doc1, lens1, strict=True))
    assert n_bytes[1] == pytest.approx(share, rel=1e-12)


def test_swapped_chunks_read_the_next_sequences_neighbours(built_db):
    """neighbour_swap's distractors: a picked chunk reads the neighbours (and mask) of the same chunk of the next
    sequence in the batch, the last sequence those of the first; its own tokens and targets stay; share 0 and 1 are
    exact, and about that share of chunks is picked in between."""
    nb = compute_neighbours(DenseRetriever(built_db), config=NeighbourConfig(k=2), show_progress=False)
    seqs = RetroSequences(built_db.store, seq_chunks=4, eos_id=built_db.tokenizer.eos_id, neighbours=nb,
                          db_store=built_db.store)
    b = seqs.batch([0, 1, 2])
    assert swap_neighbours(b, 0.0, np.random.default_rng(0)) is b
    every = swap_neighbours(b, 1.0, np.random.default_rng(0))
    for row, nxt in ((0, 1), (1, 2), (2, 0)):
        assert (every.neighbours[row] == b.neighbours[nxt]).all()
        own = torch.isin(b.neighbour_docs[nxt], b.chunk_docs[row])  # the receiver's documents: masked (next test)
        assert (every.neighbour_mask[row] == (b.neighbour_mask[nxt] & ~own[..., None])).all()
    assert (every.idx == b.idx).all() and (every.targets == b.targets).all()
    assert not (every.neighbours == b.neighbours).all()
    big = seqs.batch(list(range(len(seqs))))
    half = swap_neighbours(big, 0.5, np.random.default_rng(0))
    own = (half.neighbours == big.neighbours).flatten(2).all(-1)
    other = (half.neighbours == big.neighbours.roll(-1, 0)).flatten(2).all(-1)
    assert (own | other).all()
    assert 0.35 < float((~own).float().mean()) < 0.65
    with pytest.raises(ValueError, match="two sequences"):
        swap_neighbours(seqs.batch([0]), 0.5, np.random.default_rng(0))


def test_a_swapped_neighbour_from_the_receiving_sequences_documents_is_masked(built_db):
    """The next sequence's neighbours were searched excluding its own documents, not the receiver's: where they come
    from a document of the receiving sequence (two versions of one file in a batch), a swapped chunk does not read
    them; every other swapped neighbour is read as the donor's."""
    store = built_db.store
    docs = store.all_chunk_docs()
    nb = np.stack([np.zeros(store.n_chunks, np.int64), np.full(store.n_chunks, store.n_chunks - 1)], 1)
    seqs = RetroSequences(store, seq_chunks=4, eos_id=built_db.tokenizer.eos_id, neighbours=nb, db_store=store)
    b = seqs.batch([0, 1, len(seqs) - 1])  # every chunk's neighbours: the first and the last chunk of the store
    assert b.chunk_docs.tolist()[0] == docs[:4].tolist() and (b.neighbour_docs[..., 0] == docs[0]).all()
    every = swap_neighbours(b, 1.0, np.random.default_rng(0))
    for row, nxt in ((0, 1), (1, 2), (2, 0)):
        assert (every.neighbours[row] == b.neighbours[nxt]).all()
        for k, doc in ((0, docs[0]), (1, docs[-1])):
            read = every.neighbour_mask[row, :, k]
            if doc in b.chunk_docs[row].tolist():  # the receiver's own text: never read
                assert not read.any()
            else:
                assert (read == b.neighbour_mask[nxt, :, k]).all() and read.any()
    assert not every.neighbour_mask[0, :, 0].any() and not every.neighbour_mask[2, :, 1].any()
    assert every.neighbour_mask[1].any()


def test_held_out_corpus_is_chunked_like_the_database(built_db, tmp_path):
    held = write_jsonl(tmp_path / "held.jsonl", wiki_docs(5, start=100))
    source = tokenize_corpus([held], built_db.tokenizer, built_db.chunk_len, tmp_path / "held")
    assert source.n_docs == 5
    nb = compute_neighbours(DenseRetriever(built_db), source, NeighbourConfig(k=3), show_progress=False)
    assert nb.shape == (source.n_chunks, 3) and (nb >= 0).all() and (nb < built_db.store.n_chunks).all()


def test_chunk_bytes_leave_out_each_documents_unpredicted_first_token(built_db):
    store, tok = built_db.store, built_db.tokenizer
    with_first, without_first = chunk_bytes(store), chunk_bytes(store, tok)
    doc = store.all_chunk_docs()
    for d in (0, 5, 17):
        text = tok.decode(store.doc_tokens(d).tolist())
        first = tok.decode(store.doc_tokens(d)[:1].tolist())
        assert with_first[doc == d].sum() == pytest.approx(store.doc_n_bytes[d])
        assert without_first[doc == d].sum() == pytest.approx(store.doc_n_bytes[d] - len(first.encode()))
        assert len(text.encode()) == store.doc_n_bytes[d]  # byte-level BPE: decoding gives the document back



def test_a_swap_never_hands_a_chunk_its_own_or_its_other_versions_neighbours(built_db):
    """A sequence drawn twice in one step would read its own neighbours from its copy; with near-duplicates excluded,
    a neighbour from another version of the receiving sequence's documents (its family) is masked like its own."""
    from retrolm.retrieval.neighbours import document_families

    store = built_db.store
    docs = store.all_chunk_docs()
    nb = compute_neighbours(DenseRetriever(built_db), config=NeighbourConfig(k=2), show_progress=False)
    seqs = RetroSequences(store, seq_chunks=4, eos_id=built_db.tokenizer.eos_id, neighbours=nb, db_store=store)
    twice = swap_neighbours(seqs.batch([3, 3]), 1.0, np.random.default_rng(0))
    assert not twice.neighbour_mask.any()  # its own neighbours, from its copy: nothing is read instead
    # families: document 0 and the documents of sequence 2's neighbours are one text in three versions
    b = seqs.batch([0, 2])
    theirs = sorted({int(d) for d in b.neighbour_docs[1].flatten() if d >= 0} - set(b.chunk_docs[0].tolist()))
    assert theirs  # sequence 0 would read some of them as distractors...
    groups = [np.zeros(0, np.int64) for _ in range(store.n_docs)]
    for d in theirs:
        groups[d], groups[int(docs[0])] = np.array([docs[0]]), np.append(groups[int(docs[0])], d)
    family = document_families(groups)
    assert family[theirs].tolist() == [int(docs[0])] * len(theirs) and family[int(docs[0])] == int(docs[0])
    fam = RetroSequences(store, seq_chunks=4, eos_id=built_db.tokenizer.eos_id, neighbours=nb, db_store=store,
                         doc_family=family)
    plain = swap_neighbours(b, 1.0, np.random.default_rng(0))
    masked = swap_neighbours(fam.batch([0, 2]), 1.0, np.random.default_rng(0))
    from_family = torch.isin(b.neighbour_docs[1], torch.tensor(theirs))  # (C, K) donor neighbours of the family
    assert plain.neighbour_mask[0][from_family].any()  # ...read without families
    assert not masked.neighbour_mask[0][from_family].any()  # masked as its own text with them
    assert (masked.neighbour_mask[0][~from_family] == plain.neighbour_mask[0][~from_family]).all()
