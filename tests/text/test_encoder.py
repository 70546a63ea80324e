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
    assert encoder._fast is not None  # a WordPiece "fast" tokenizer takes the Rust path
    fast, ref = encoder.tokenize(TEXTS), encoder._tokenize_hf(TEXTS)
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
