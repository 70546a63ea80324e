"""REALM model: retrieval distribution with the null document, marginal likelihood, gradients, heads, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from retrolm.models.realm import (
    MISSING,
    RealmModel,
    RealmShape,
    marginal_log_likelihood,
    retrieval_utility,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from retrolm.core.hub import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm").path)


def tiny_realm(tokenizer, embed_dim: int | None = 16, seed: int = 0) -> RealmModel:
    from transformers import BertConfig

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    return RealmModel(cfg, tokenizer, RealmShape("tiny", embed_dim))


def test_marginal_log_likelihood_equals_brute_force_sum():
    scores = [[0.3, -1.2, 2.0, 0.0], [1.0, 1.0, -0.5, 4.0]]
    p_y = [[0.1, 0.7, 0.05, 0.2], [0.9, 0.01, 0.3, 0.002]]
    log_p_z = torch.tensor(scores).log_softmax(-1)
    got = marginal_log_likelihood(log_p_z, torch.tensor(p_y).log())
    for b in range(2):
        z = sum(math.exp(s) for s in scores[b])
        want = math.log(sum(math.exp(s) / z * p for s, p in zip(scores[b], p_y[b], strict=True)))
        assert got[b].item() == pytest.approx(want, rel=1e-5)


def test_retrieval_log_probs_include_the_null_document_first(tokenizer):
    model = tiny_realm(tokenizer, embed_dim=2)
    with torch.no_grad():
        model.null_embedding.copy_(torch.tensor([0.5, -1.0]))
    q = torch.tensor([[1.0, 2.0]])
    docs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]])  # scores 1, 2, 1
    lp = model.retrieval_log_probs(q, docs)
    raw = [0.5 - 2.0, 1.0, 2.0, 1.0]  # null first: q·e_null = -1.5
    z = sum(math.exp(s) for s in raw)
    assert lp.shape == (1, 4)
    assert lp[0].tolist() == pytest.approx([s - math.log(z) for s in raw], abs=1e-5)
    no_null = model.retrieval_log_probs(q, docs, with_null=False)
    z3 = sum(math.exp(s) for s in raw[1:])
    assert no_null[0].tolist() == pytest.approx([s - math.log(z3) for s in raw[1:]], abs=1e-5)


def test_retrieval_utility_is_best_document_minus_null():
    lp = torch.tensor([[-3.0, -5.0, -1.0, -2.0], [-1.0, -4.0, -6.0, -2.0]])
    assert retrieval_utility(lp).tolist() == pytest.approx([2.0, -1.0])


def test_span_log_likelihood_sums_gold_spans_and_marks_missing():
    start = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]).log()
    end = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]).log()
    starts = torch.tensor([[1, 2], [-1, -1]])
    ends = torch.tensor([[1, 3], [-1, -1]])
    got = RealmModel.span_log_likelihood(start, end, starts, ends)
    assert got[0].item() == pytest.approx(math.log(0.2 * 0.3 + 0.3 * 0.1), rel=1e-5)
    assert got[1].item() == MISSING


def _pretrain_like_loss(model: RealmModel, doc_emb: torch.Tensor) -> torch.Tensor:
    tok = model.tokenizer
    x = tok(["paris is the capital of [MASK] ."], return_tensors="pt")
    q = model.embed_queries(x["input_ids"], x["attention_mask"])
    log_p_z = model.retrieval_log_probs(q, doc_emb)  # (1, 3): null + 2 docs
    rows = tok(["paris is the capital of [MASK] ."] * 3, ["", "france is a country", "cats purr"], padding=True,
               return_tensors="pt")
    labels = torch.full_like(rows["input_ids"], -100)
    mask_pos = (rows["input_ids"] == tok.mask_token_id)
    labels[mask_pos] = tok.convert_tokens_to_ids("france")
    hidden = model.read(rows["input_ids"], rows["attention_mask"], rows["token_type_ids"])
    log_p_y_z = model.mlm_log_likelihood(hidden, labels).view(1, 3)
    return -marginal_log_likelihood(log_p_z, log_p_y_z).mean()


def test_gradients_reach_query_encoder_reader_and_null_but_not_the_index(tokenizer):
    model = tiny_realm(tokenizer)
    doc_emb = torch.randn(1, 2, 16)  # the index's embeddings: constants
    _pretrain_like_loss(model, doc_emb).backward()

    def norm(module) -> float:
        return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)

    assert norm(model.query_encoder) > 0
    assert norm(model.query_proj) > 0
    assert norm(model.reader) > 0
    assert norm(model.mlm_head) > 0
    assert model.null_embedding.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.doc_encoder.parameters())


def test_mlm_log_likelihood_sums_masked_positions(tokenizer):
    model = tiny_realm(tokenizer)
    ids = torch.tensor([[101, 103, 2000, 103, 102]])
    labels = torch.tensor([[-100, 3000, -100, 4000, -100]])
    hidden = model.read(ids, torch.ones_like(ids))
    got = model.mlm_log_likelihood(hidden, labels)
    logits = model.mlm_head(hidden, model.reader.get_input_embeddings().weight).log_softmax(-1)
    assert got.item() == pytest.approx((logits[0, 1, 3000] + logits[0, 3, 4000]).item(), rel=1e-5)


def test_null_document_takes_the_mass_when_no_document_helps(tokenizer):
    model = tiny_realm(tokenizer, embed_dim=4)
    q = torch.nn.Parameter(torch.tensor([[0.1, 0.2, -0.1, 0.3]]))
    docs = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    log_p_y_z = torch.tensor([[-1.0, -6.0, -7.0, -6.5]])  # the null document (column 0) predicts y best
    opt = torch.optim.SGD([q, model.null_embedding], lr=1.0)
    before = model.retrieval_log_probs(q, docs)[0, 0].exp().item()
    for _ in range(50):
        opt.zero_grad()
        (-marginal_log_likelihood(model.retrieval_log_probs(q, docs), log_p_y_z).mean()).backward()
        opt.step()
    after = model.retrieval_log_probs(q, docs)[0, 0].exp().item()
    assert before < 0.3
    assert after > 0.9


def test_save_and_load_round_trip(tokenizer, tmp_path):
    model = tiny_realm(tokenizer).eval()
    with torch.no_grad():
        model.null_embedding.normal_()
        model.mlm_head.bias.normal_()
    model.save_pretrained(tmp_path / "m")
    loaded = RealmModel.from_pretrained(tmp_path / "m")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = model.tokenize(["who wrote hamlet"], 16)
    assert torch.equal(model.embed_queries(**x), loaded.embed_queries(**x))
    assert loaded.tokenizer("hamlet")["input_ids"] == tokenizer("hamlet")["input_ids"]


def test_from_encoder_copies_the_encoder_into_all_three_parts(tiny_encoder):
    from transformers import AutoModel

    src = AutoModel.from_pretrained(tiny_encoder).state_dict()
    model = RealmModel.from_encoder(tiny_encoder, embed_dim=None)
    for part in (model.query_encoder, model.doc_encoder, model.reader):
        state = part.state_dict()
        for k, v in src.items():
            if not k.startswith("pooler."):
                assert torch.equal(state[k], v), k
    assert model.query_encoder.embeddings.word_embeddings.weight.data_ptr() != \
        model.reader.embeddings.word_embeddings.weight.data_ptr()
    assert isinstance(model.query_proj, torch.nn.Identity)


def test_an_encoder_without_pooler_or_segments_builds_and_reads(tiny_encoder, tmp_path):
    """DistilBERT (a WordPiece encoder, as the module says any works) has no pooler and no token_type_ids: building
    a REALM from it was a TypeError."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2,
                                     hidden_dim=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = RealmModel.from_encoder(str(tmp_path), embed_dim=16).eval()
    enc = model.tokenize(["a question", "another one here"], 16)
    h = model.read(enc["input_ids"], enc["attention_mask"], torch.ones_like(enc["input_ids"]))
    assert h.shape == (2, enc["input_ids"].shape[1], 32) and torch.isfinite(h).all()
    assert model.embed_queries(**enc).shape == (2, 16)


def test_an_encoder_saved_in_half_precision_builds_in_float32(tiny_encoder, tmp_path):
    """transformers loads a checkpoint in the dtype it was saved in: a bfloat16 encoder gave bfloat16 encoders beside
    float32 heads, and the first embedding failed with a dtype mismatch; saved and loaded again, likewise."""
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(tiny_encoder).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(tmp_path / "bf16")
    model = RealmModel.from_encoder(str(tmp_path / "bf16"), embed_dim=16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    enc = model.tokenize(["a question"], 16)
    assert model.embed_queries(**enc).dtype == torch.float32
    model.save_pretrained(tmp_path / "realm")
    assert {p.dtype for p in RealmModel.from_pretrained(tmp_path / "realm").parameters()} == {torch.float32}
