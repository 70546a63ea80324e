"""The frozen encoder: its fast tokenization path must give exactly the ids of the Hugging Face call it replaces,
and embeddings must not depend on how texts are batched or prepared."""

import numpy as np
import pytest
import torch

from retrolm.text.encoder import SentenceEncoder

TEXTS = [
    "Chunked cross-attention lets each chunk read its neighbours.",
    "",
    "naïve café — 東京 ünïcödé, emoji 🙂 and tabs\tand\nnewlines",
    "word " * 400,  # longer than max_length: truncated
    "def f(x):\n    return x ** 2  # code",
    "A",
]


@pytest.fixture(scope="module")
def encoder(tiny_encoder) -> SentenceEncoder:
    return SentenceEncoder(tiny_encoder, device="cpu", max_length=128)


def test_fast_tokenizer_matches_hf_call(encoder):
    assert encoder.wordpiece._fast is not None  # a WordPiece "fast" tokenizer takes the Rust path
    fast, ref = encoder.tokenize(TEXTS), encoder.wordpiece._tokenize_hf(TEXTS)
    assert list(fast) == list(ref)
    for key in ref:
        assert torch.equal(fast[key], ref[key]), key
    assert fast["input_ids"].shape[1] == 128  # truncated to max_length, padded to the longest


def test_prepared_and_streamed_encodings_agree(encoder):
    texts = TEXTS * 5
    streamed = encoder.encode(texts, batch_size=4)
    prepared = encoder.encode_prepared(encoder.prepare(texts, batch_size=7))
    np.testing.assert_allclose(streamed, prepared, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(prepared, axis=1), 1.0, atol=1e-5)
    assert encoder.encode_prepared(encoder.prepare([], batch_size=4)).shape == (0, encoder.dim)


@pytest.mark.parametrize("fast", [True, False])
def test_stored_token_ids_rebuild_the_batch_tokenize_makes(encoder, fast, monkeypatch):
    """Pre-tokenization (the database build stores ``token_ids`` once): any selection of stored ids padded by
    ``features_from_ids`` is exactly ``tokenize`` of the same texts, on the Rust path and on the HF fallback, and
    the one text longer than max_length is the one flagged as cut."""
    if not fast:
        monkeypatch.setattr(encoder.wordpiece, "_fast_unpadded", None)
    pieces, cut = encoder.token_ids(TEXTS)
    assert cut.tolist() == [len(t.split()) > 100 for t in TEXTS]
    assert max(len(p) for p in pieces) == 128 and len(pieces[1]) == 2  # "" is [CLS] [SEP]
    for pick in ([0, 1, 2, 3, 4, 5], [4, 0], [5]):
        got = encoder.wordpiece.features_from_ids([pieces[i] for i in pick])
        ref = encoder.tokenize([TEXTS[i] for i in pick])
        assert list(got) == list(ref)
        for key in ref:
            assert torch.equal(got[key], ref[key]), (pick, key)
    flat, lengths = np.concatenate(pieces), np.array([len(p) for p in pieces])
    from_ids = encoder.encode_prepared(encoder.prepare_ids(flat, lengths, batch_size=4))
    np.testing.assert_allclose(from_ids, encoder.encode(TEXTS, batch_size=4), atol=1e-5)


def test_exact_length_batches_need_no_mask_and_embed_the_same(encoder):
    """The build's default batching: the chunks of one WordPiece count form batches of their own (full, or down to
    min_exact rows) with no padding and no attention mask; smaller leftovers of every count are padded together;
    each chunk is embedded once and to the same vector as in padded batches (and as from its text)."""
    texts = ["alpha beta gamma"] * 9 + ["alpha"] * 5 + ["x y"] * 2 + TEXTS  # 5, 3, 4 WordPieces; "A" is 3 too
    pieces, _ = encoder.token_ids(texts)
    flat, lengths = np.concatenate(pieces), np.array([len(p) for p in pieces])
    assert lengths[[0, 9, 14, 21]].tolist() == [5, 3, 4, 3]
    padded = encoder.prepare_ids(flat, lengths, batch_size=4, exact=False)
    assert len(padded.batches) == 6 and all("attention_mask" in b for b in padded.batches)
    ref = encoder.encode_prepared(padded)
    np.testing.assert_allclose(ref, encoder.encode(texts, batch_size=4), atol=1e-5)

    def unmasked(prepared):
        return [tuple(b["input_ids"].shape) for b in prepared.batches if "attention_mask" not in b]

    # 9 of 5 WordPieces → 4 + 4 (+ 1 left over), 6 of 3 → 4 (+ 2); at min_exact 2 the 2 + 2 left of 3 and 4 run too
    for least, shapes, n_batches in ((3, [(4, 5), (4, 5), (4, 3)], 6),
                                     (2, [(4, 5), (4, 5), (2, 4), (4, 3), (2, 3)], 7),
                                     (1, None, 11)):  # every batch of one count, none padded
        exact = encoder.prepare_ids(flat, lengths, batch_size=4, min_exact=least)
        assert sorted(exact.order.tolist()) == list(range(len(texts)))
        assert sum(len(b["input_ids"]) for b in exact.batches) == len(texts) and len(exact.batches) == n_batches
        assert unmasked(exact) == (shapes or [tuple(b["input_ids"].shape) for b in exact.batches])
        np.testing.assert_allclose(encoder.encode_prepared(exact), ref, atol=1e-5)
    # leftovers that happen to share one count need no mask either; the default min_exact is batch_size // 8
    two = encoder.prepare_ids(np.concatenate(pieces[9:11]), lengths[9:11], batch_size=4, min_exact=3)
    assert unmasked(two) == [(2, 3)]
    assert unmasked(encoder.prepare_ids(flat, lengths, batch_size=16)) == [(9, 5), (2, 4), (6, 3)]
    assert encoder.encode_prepared(encoder.prepare_ids(flat[:0], lengths[:0], batch_size=4)).shape == (0, encoder.dim)


def test_length_batches_partition_the_chunks_by_length():
    """On one shard (8,192 chunks, GPU batch 1,024, lengths spread like Wikipedia's): every chunk in exactly one
    batch, in ``order``; batches of one length down to an eighth of the batch, the rest padded at full size."""
    from retrolm.text.encoder import length_batches

    lengths = np.random.default_rng(0).normal(67, 15, 8192).clip(3, 256).astype(int)
    order, groups = length_batches(lengths, 1024)
    assert np.array_equal(np.concatenate(groups), order) and sorted(order.tolist()) == list(range(8192))
    one = [g for g in groups if lengths[g].min() == lengths[g].max()]
    mixed = [g for g in groups if lengths[g].min() != lengths[g].max()]
    assert all(128 <= len(g) <= 1024 for g in one) and all(len(g) == 1024 for g in mixed[:-1])
    assert 0.6 < sum(map(len, one)) / 8192 < 0.8  # 71% of this shard runs unpadded, in 35 batches instead of 8
    assert len(groups) == 35
    _, plain = length_batches(lengths, 1024, exact=False)  # the old batching: sorted, cut every 1,024
    assert [len(g) for g in plain] == [1024] * 8 and not any(lengths[g].min() == lengths[g].max() for g in plain)


@pytest.mark.parametrize("path", ["fast", "hf", "pickled"])
def test_special_token_strings_in_text_are_text(encoder, path, monkeypatch):
    """"[SEP]" / "[MASK]" written in a chunk are its characters: parsed as the special tokens they would end the
    encoder's input or mask a word, on the Rust path, the HF fallback and in a spawned worker's (pickled) copy."""
    import pickle

    wordpiece = pickle.loads(pickle.dumps(encoder.wordpiece)) if path == "pickled" else encoder.wordpiece
    if path == "hf":
        monkeypatch.setattr(wordpiece, "_fast", None)
        monkeypatch.setattr(wordpiece, "_fast_unpadded", None)
    if path != "hf":  # the Rust path itself (its probe falls back to HF when the two disagree)
        assert wordpiece._fast is not None and wordpiece._fast_unpadded is not None
    hf = wordpiece.hf
    text = "a [SEP] b [MASK] c"
    ids = wordpiece.tokenize([text])["input_ids"][0].tolist()
    assert ids[0] == hf.cls_token_id and ids[-1] == hf.sep_token_id
    assert hf.sep_token_id not in ids[1:-1] and hf.mask_token_id not in ids
    assert hf.convert_ids_to_tokens(ids[1:-1]) == ["a", "[", "sep", "]", "b", "[", "mask", "]", "c"]
    pieces, _ = wordpiece.token_ids([text])
    assert pieces[0].tolist() == ids
