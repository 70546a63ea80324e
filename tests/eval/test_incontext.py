"""In-context retrieval: a pretrained causal LM (here a tiny Llama built to copy) reads retrieved passages, on the
same held-out chunks and with the same exclusions as RETRO."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, wiki_docs, write_jsonl
from retrolm.db import BuildConfig, Database, tokenize_corpus
from retrolm.eval import EvalConfig, run_eval
from retrolm.eval.config import ScaleConfig
from retrolm.eval.incontext import InContextScorer, InContextSettings, document_texts, encode_with_offsets
from retrolm.eval.scaling import scale_db_size, scale_neighbours
from retrolm.infer.incontext import generate_in_context
from retrolm.models.hf import CausalLM
from retrolm.models.loading import load_model
from retrolm.retrieval import BM25Retriever
from retrolm.text.tokenizer import load_tokenizer, train_bpe
from retrolm.train import RetroSequences, chunk_bytes, score_sequences

HELD = 5


def induction_llama(vocab_size: int, seed: int = 0):
    """A 2-layer Llama whose weights copy by construction (so the test needs no training): layer 1 writes the previous
    token into the residual stream (a head whose constant query and key peak, through RoPE, one position back), and
    layer 2 attends to the positions whose previous token is the current token and predicts the token found there
    (an induction head). Measured on random tokens: NLL 0.2 nats when the text was seen 60 tokens earlier, 1.1 at 600
    tokens, 7.5 (≈ ln V) on first sight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    H, hd, E = 256, 128, 64  # hidden size, head dim, dims of a token's vector
    theta = 1.6e9  # RoPE pair p turns theta^(-2p/hd) rad per position: pairs 0-16 span 1…0.005, pairs >= 32 stay put
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=H, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=hd, max_position_embeddings=4096,
                      rope_theta=theta, attention_bias=True, tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(cfg)
    tok = torch.randn(vocab_size, E, generator=torch.Generator().manual_seed(seed))
    tok = tok / tok.norm(dim=1, keepdim=True) * E**0.5
    half = hd // 2
    inv_freq = theta ** (-torch.arange(0, half, dtype=torch.float64) * 2 / hd)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.model.norm] + [n for layer in model.model.layers
                                          for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, :E] = tok
        prev = model.model.layers[0].self_attn  # previous-token head: q·k = Σ_p cos(f_p (j - i + 1)), max at j = i - 1
        for p in range(17):
            f = float(inv_freq[p])
            prev.q_proj.bias[p] = 6.0
            prev.k_proj.bias[p], prev.k_proj.bias[p + half] = 6.0 * math.cos(f), 6.0 * math.sin(f)
        prev.v_proj.weight[:E, :E] = torch.eye(E)
        prev.o_proj.weight[E : 2 * E, :E] = torch.eye(E)  # residual dims E..2E: the previous token
        ind = model.model.layers[1].self_attn  # induction head, in head dims RoPE leaves alone
        still = torch.cat([torch.arange(32, 64), torch.arange(96, 128)])
        ind.q_proj.weight[still, :E] = 0.9 * torch.eye(E)  # query: the current token
        ind.k_proj.weight[still, E : 2 * E] = 0.9 * torch.eye(E)  # key: the token before
        ind.v_proj.weight[:E, :E] = torch.eye(E)
        ind.o_proj.weight[2 * E : 3 * E, :E] = 4.0 * torch.eye(E)  # residual dims 2E..3E: the prediction
        model.lm_head.weight[:, 2 * E : 3 * E] = 0.1 * tok
    return model.eval()


@pytest.fixture(scope="module")
def copy_world(tmp_path_factory):
    """A BM25-only database holding copies of the held-out documents under other ids, and a copying Llama as an HF
    folder (with the database's tokenizer)."""
    root = tmp_path_factory.mktemp("incontext")
    held = wiki_docs(HELD, start=300)
    corpus = wiki_docs(30) + [{"id": f"copy-of-{d['id']}", "text": d["text"]} for d in held]
    db = Database.build([write_jsonl(root / "corpus.jsonl", corpus)], root / "db",
                        BuildConfig(tokenizer="train:1000", index="none", bm25=True), show_progress=False)
    lm_dir = root / "copy-llama"
    induction_llama(db.tokenizer.vocab_size).save_pretrained(lm_dir)
    db.tokenizer.save(lm_dir / "tokenizer.json")
    held = [dict(d, bucket="copied" if i < 3 else "other") for i, d in enumerate(held)]
    return {"root": root, "db": db, "held": write_jsonl(root / "held.jsonl", held), "lm": lm_dir}


def eval_cfg(world, out: str, **kw) -> EvalConfig:
    base = dict(checkpoint=str(world["lm"]), db=str(world["db"].path), data=[str(world["held"])],
                out_dir=str(world["root"] / out), near_dup_threshold=0.0, stride=16, query_tokens=16,
                context_tokens=256, batch_size=8, retriever="bm25")
    base.update(kw)
    return EvalConfig(**base)


def test_in_context_retrieval_reads_the_copy_and_not_when_it_is_excluded(copy_world):
    r = run_eval(eval_cfg(copy_world, "on"), show_progress=False)
    on, off = r["summary"]["in_context"]["bpb"], r["summary"]["no_retrieval"]["bpb"]
    assert r["models"][next(iter(r["models"]))]["kind"] == "causal_lm"
    assert on < 0.5 * off, (on, off)  # the copy is retrieved and copied
    assert r["gain"]["all"] > 0.5 and r["gain"]["all"] == pytest.approx((off - on) / off)
    assert 0 <= r["novel"]["fraction"] < 0.5  # most held-out chunks have their copy among the neighbours
    cost = r["reader"]["cost"]
    assert cost["in_context"]["forward_tokens_per_scored_token"] > cost["no_retrieval"][
        "forward_tokens_per_scored_token"] >= 1
    # the copies are near-duplicates: excluded by the strict protocol, and retrieval has nothing left to copy
    strict = run_eval(eval_cfg(copy_world, "strict", near_dup_threshold=0.8), show_progress=False)
    assert strict["exclusion"]["excluded_docs_near_duplicate"] == HELD
    s_on, s_off = strict["summary"]["in_context"]["bpb"], strict["summary"]["no_retrieval"]["bpb"]
    assert s_on > 0.85 * s_off and s_off == pytest.approx(off)


def test_eval_cli_with_a_pretrained_lm(copy_world, capsys):
    out = copy_world["root"] / "cli"
    rc, _, err = run_cli(["eval", "--checkpoint", copy_world["lm"], "--db", copy_world["db"].path, "--data",
                          copy_world["held"], "--out", out, "-q", "near_dup_threshold=0", "retriever=bm25",
                          "stride=16", "context_tokens=256", "max_docs=4", "group_by=bucket"], capsys)
    assert rc == 0, err
    r = json.loads((out / "eval.json").read_text())
    assert r["summary"]["in_context"]["bpb"] < 0.5 * r["summary"]["no_retrieval"]["bpb"]
    assert {"all", "novel"} <= set(r["gain"]) and 0 <= r["novel"]["fraction"] <= 1
    assert r["reader"]["retriever"] == "bm25" and r["exclusion"]["eval_docs"] == 4
    lo, hi = r["gain_ci95"]["all"]
    assert lo <= r["gain"]["all"] <= hi
    groups = r["groups"]
    assert {g: d["docs"] for g, d in groups.items()} == {"copied": 3, "other": 1}
    assert sum(d["chunks"] for d in groups.values()) == r["exclusion"]["eval_chunks"]
    for d in groups.values():
        assert d["gain"] == pytest.approx(1 - d["summary"]["in_context"]["bpb"] / d["summary"]["no_retrieval"]["bpb"])
    report = (out / "report.md").read_text()
    assert "Per bucket" in report and "in-context" in report
    # --no-retrieval: the LM alone, nothing retrieved
    rc, _, err = run_cli(["eval", "--checkpoint", copy_world["lm"], "--db", copy_world["db"].path, "--data",
                          copy_world["held"], "--out", out / "off", "-q", "--no-retrieval", "max_docs=2"], capsys)
    off = json.loads((out / "off" / "eval.json").read_text())
    assert rc == 0 and list(off["summary"]) == ["no_retrieval"] and "gain" not in off
    # an LM whose context the windows overflow: one line (was an IndexError from the position embeddings)
    short = Path(shutil.copytree(copy_world["lm"], out / "short-lm"))
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    rc, _, err = run_cli(["eval", "--checkpoint", short, "--db", copy_world["db"].path, "--data", copy_world["held"],
                          "--out", out / "short", "-q", "near_dup_threshold=0", "retriever=bm25", "stride=16",
                          "context_tokens=256", "max_docs=2"], capsys)
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "exceeds the model's 128" in err, err


def test_losses_are_booked_to_the_same_chunks_as_retro(copy_world, tmp_path):
    """With the database's tokenizer, in-context scoring books each target to the chunk RETRO's scorer books it to,
    and scores every token RETRO scores (the first of each document excepted, the EOS after the last included)."""
    db = copy_world["db"]
    source = tokenize_corpus([copy_world["held"]], db.tokenizer, db.chunk_len, tmp_path / "held")
    lm = load_model(copy_world["lm"])
    assert lm.kind == "causal_lm" and isinstance(lm.model, CausalLM)
    scorer = InContextScorer(lm.model, load_tokenizer(str(copy_world["lm"])), source, db.tokenizer,
                             document_texts([str(copy_world["held"])], None), InContextSettings(stride=16))
    ours = scorer.score()
    seqs = RetroSequences(source, 4, db.tokenizer.eos_id, include_tail=True, tokenizer=db.tokenizer)

    class Shim(torch.nn.Module):  # the same LM behind RETRO's scorer interface (one sequence = 4 chunks)
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm.model

        def forward(self, idx, neighbours=None, neighbour_mask=None):
            return type("Out", (), {"logits": self.lm(idx)})()

    retro = score_sequences(Shim(), seqs, with_neighbours=False)
    np.testing.assert_array_equal(ours.tokens, retro.tokens)
    # without retrieval, blocks that start at a document's first token are merged into one row: the same numbers
    unmerged = InContextScorer(lm.model, load_tokenizer(str(copy_world["lm"])), source, db.tokenizer,
                               document_texts([str(copy_world["held"])], None), InContextSettings(stride=16))
    unmerged._merge_unretrieved = lambda windows: windows
    np.testing.assert_allclose(unmerged.score().nats, ours.nats, rtol=1e-5)
    assert scorer.last_run.forward_tokens < unmerged.last_run.forward_tokens / 3
    assert ours.tokens.sum() == sum(int(n) for n in source.doc_n_tokens)  # n - 1 targets + EOS per document
    assert np.isfinite(ours.nats).all() and (ours.nats > 0).all()
    assert chunk_bytes(source, db.tokenizer).sum() > 0


def test_another_lm_tokenizer_books_by_character(copy_world, tmp_path):
    """An LM with its own tokenizer: each of its predicted tokens lands in the chunk holding its first character, and
    it predicts exactly the text the byte counts hold (all but the database tokenizer's first token of a document)."""
    db = copy_world["db"]
    texts = document_texts([str(copy_world["held"])], None)
    other = train_bpe(texts.values(), 600)
    assert other.sha256 != db.tokenizer.sha256
    source = tokenize_corpus([copy_world["held"]], db.tokenizer, db.chunk_len, tmp_path / "held")
    scorer = InContextScorer(load_model(copy_world["lm"]).model, other, source, db.tokenizer, texts,
                             InContextSettings(stride=32))
    split = 0
    for d, doc_id in enumerate(source.doc_ids):
        doc, text = scorer.docs[d], texts[doc_id]
        ids, starts = encode_with_offsets(other, text)
        _, src_starts = encode_with_offsets(db.tokenizer, text)
        chunk_starts = src_starts[:: db.chunk_len]
        # the LM predicts exactly the text the byte counts hold: all but the database tokenizer's first token
        if doc.ids == ids == other.encode(text):
            assert starts[doc.first] == src_starts[1] and doc.first >= 1
        else:  # one of its tokens straddled that point: the text is read in two parts there
            split += 1
            head, head_starts = encode_with_offsets(other, text[: src_starts[1]])
            tail, tail_starts = encode_with_offsets(other, text[src_starts[1] :])
            assert doc.ids == head + tail and doc.first == len(head)
            starts = head_starts + [src_starts[1] + t for t in tail_starts]
        for s, owner in zip(starts, doc.owner, strict=True):
            c = owner - source.doc_first_chunk[d]
            assert chunk_starts[c] <= s and (c + 1 == len(chunk_starts) or s < chunk_starts[c + 1])
    assert split == len(source.doc_ids)  # the database's first tokens here are one letter ("D" of "Digital")
    scores = scorer.score()
    assert scores.tokens.sum() == sum(len(d.ids) + 1 - d.first for d in scorer.docs)  # + EOS per document


def test_generation_reads_passages_and_shows_them(copy_world):
    db = copy_world["db"]
    lm = load_model(copy_world["lm"]).model
    tok = load_tokenizer(str(copy_world["lm"]))
    doc = json.loads(copy_world["held"].read_text().splitlines()[0])
    ids = tok.encode(doc["text"])
    prompt = tok.decode(ids[:40])
    g = generate_in_context(lm, tok, prompt, BM25Retriever(db), InContextSettings(stride=16, query_tokens=16),
                            max_new_tokens=32, stop_at_eos=False)
    assert g.retrieval and g.new_tokens == 32 and len(g.chunks) == 2
    assert all(c.sources for c in g.chunks)
    assert g.chunks[0].sources[0].doc_id == f"copy-of-{doc['id']}"  # the copy, found with the prompt's last tokens
    assert ids[40] not in ids[:40] and g.chunks[0].token_ids[0] == ids[40]  # it read the passage: the next token
    assert g.chunks[1].sources[0].doc_id == f"copy-of-{doc['id']}"  # re-retrieved with the generated tokens
    # without retrieval it cannot know the continuation (the next token is nowhere in the prompt)
    plain = generate_in_context(lm, tok, prompt, None, InContextSettings(stride=16), max_new_tokens=16,
                                stop_at_eos=False)
    assert not plain.retrieval and plain.chunks[0].sources == [] and plain.chunks[0].token_ids[0] != ids[40]


def test_a_context_too_small_for_passage_and_prompt_keeps_both_and_reports_what_it_read():
    """When passages + prompt + span exceed the LM's context, the prompt is shortened (to half the room at most), the
    worst passages are dropped and the best is cut from its front; the context used to be cut from the front, which
    dropped the passages first while their sources were still reported, and prompt_tokens_dropped missed that cut."""
    from retrolm.db import Hit

    class CharTokenizer:  # one token per character
        eos_id, stop_ids = None, frozenset()

        def encode(self, text):
            return [ord(c) % 256 for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

        def decode_spans(self, spans):
            return [self.decode(s) for s in spans]

    class TinyLM:  # a 64-token context that always says "x"; records every context it is given
        context_len, name, seen = 64, "tiny", []

        def step(self, ids, cache=None):
            ctx = (cache or []) + list(ids)
            if cache is None:
                TinyLM.seen.append(ctx)
            return torch.zeros(256).index_fill_(0, torch.tensor([ord("x")]), 1.0), ctx

    class TwoPassages:  # the best hit first, as retrievers return them
        def search(self, queries, k, *args, **kwargs):
            hits = [Hit(7, "best", 2.0, "B" * 30, "", 0), Hit(8, "worst", 1.0, "W" * 30, "", 0)][:k]
            return type("Results", (), {"hits": lambda self, i: hits})()

    room = 64 - 8
    for passages in (1, 2):
        TinyLM.seen = []
        settings = InContextSettings(stride=8, query_tokens=8, passages=passages, context_tokens=60)
        g = generate_in_context(TinyLM(), CharTokenizer(), "p" * 100, TwoPassages(), settings, max_new_tokens=16)
        for ctx, chunk in zip(TinyLM.seen, g.chunks, strict=True):
            text = "".join(chr(i) for i in ctx)
            # the worst passage goes first, the best is cut from its front: its end stays next to the document
            assert len(ctx) == room and [h.doc_id for h in chunk.sources] == ["best"]
            head, tail = text[: room - room // 2], text[room - room // 2 :]
            assert head == "B" * (len(head) - 2) + "\n\n" and set(tail) <= {"p", "x"}
        first = "".join(chr(i) for i in TinyLM.seen[0])
        assert g.prompt_tokens_dropped == 100 - first.count("p") == 100 - room // 2
    # a span shorter than the stride (the last, or max_new_tokens below it) leaves the context more room
    TinyLM.seen = []
    settings = InContextSettings(stride=8, query_tokens=8, passages=1, context_tokens=60)
    g = generate_in_context(TinyLM(), CharTokenizer(), "p" * 100, TwoPassages(), settings, max_new_tokens=12)
    assert [len(ctx) for ctx in TinyLM.seen] == [64 - 8, 64 - 4] and g.new_tokens == 12


def test_scaling_curves_of_a_pretrained_lm(copy_world):
    noise = write_jsonl(copy_world["root"] / "noise.jsonl", wiki_docs(15, start=600))
    cfg = ScaleConfig(**{**vars(eval_cfg(copy_world, "scale")), "ks": [2, 1, 2], "fractions": [0.1, 1.0, 0.1],
                         "noise": [str(noise)]})  # a value given twice is evaluated once
    by_size = scale_db_size(cfg, show_progress=False)
    small, full, noisy = by_size["rows"]
    off = by_size["references"]["no_retrieval"]["bpb"]
    assert by_size["main"] == "in_context" and small["db_chunks"] < full["db_chunks"] < noisy["db_chunks"]
    assert full["bpb"] < 0.5 * off < small["bpb"]  # 10% of the documents keeps few of the copies
    assert noisy["noise"] and abs(noisy["bpb"] - full["bpb"]) < 0.05 * full["bpb"]  # unrelated text changes little
    by_k = scale_neighbours(cfg, show_progress=False)
    assert [r["k"] for r in by_k["rows"]] == [1, 2] and all(r["bpb"] < 0.5 * off for r in by_k["rows"])
    assert by_k["rows"][0]["bpb"] != by_k["rows"][1]["bpb"]  # the second passage really is read
    assert (copy_world["root"] / "scale" / "scale-db-size.png").is_file()


def test_a_retrolm_baseline_reads_passages_in_its_context(copy_world, tmp_path):
    """in_context=true: a decoder trained from scratch (no RETRO layers) is scored like a pretrained LM. Its token
    NLLs equal an unpadded forward of each row, and a window longer than its seq_len is a one-line error."""
    from conftest import tiny_retro_config
    from retrolm.core.errors import RetrolmError
    from retrolm.models import RetroModel
    from retrolm.models.decoder_lm import DecoderLM

    db = copy_world["db"]
    torch.manual_seed(0)
    model = RetroModel(tiny_retro_config(vocab_size=db.tokenizer.vocab_size, chunk_len=db.chunk_len, seq_len=256,
                                         retro_layers=())).eval()
    lm = DecoderLM(model, "tiny")
    rows = [list(range(5, 40)), list(range(7, 200)), [3, 4]]
    got = lm.token_nll(rows, [10, 50, 1], batch_size=2)
    for row, n, values in zip(rows, [10, 50, 1], got, strict=True):
        logp = torch.log_softmax(model(torch.tensor([row])).logits[0].float(), -1)
        want = -logp[:-1].gather(-1, torch.tensor(row[1:])[:, None])[:, 0][-n:]
        torch.testing.assert_close(values, want, atol=1e-4, rtol=1e-4)

    folder = tmp_path / "baseline"
    model.save_pretrained(folder)
    db.tokenizer.save(folder / "tokenizer.json")
    r = run_eval(eval_cfg(copy_world, "baseline-incontext", checkpoint=str(folder), in_context=True,
                          context_tokens=64), show_progress=False)
    assert set(r["summary"]) == {"in_context", "no_retrieval"} and r["reader"]["context_tokens"] == 64
    with pytest.raises(RetrolmError, match="exceeds the model's 256"):
        run_eval(eval_cfg(copy_world, "too-long", checkpoint=str(folder), in_context=True, context_tokens=256),
                 show_progress=False)
