"""Generation with sources: the KV-cache sampler retrieves once per completed chunk, shows what it read, and
produces exactly what a full forward pass over the same neighbours predicts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli, search
from retrolm.core.errors import RetrolmError
from retrolm.infer.generate import format_generation, generate
from retrolm.models.retro import RetroConfig, RetroModel
from retrolm.retrieval import DenseRetriever
from retrolm.train import ModelSpec, TrainConfig, Trainer

K = 2


def random_model(db, retro: bool = True, seq_len: int = 256) -> RetroModel:
    torch.manual_seed(0)
    cfg = RetroConfig(vocab_size=db.tokenizer.vocab_size, seq_len=seq_len, n_layer=2, n_head=2, d_model=32,
                      chunk_len=db.chunk_len, num_neighbours=K, retro_layers=(2,) if retro else (), enc_n_layer=1)
    model = RetroModel(cfg).eval()
    with torch.no_grad():  # make retrieval matter: at init CCA is too weak to change a single greedy choice
        for block in model.blocks:
            if block.cca is not None:
                block.cca.attn.proj.weight.mul_(10)
    return model


def full_forward_argmax(model, db, ids: list[int], sources: list[list]) -> np.ndarray:
    """Greedy predictions of one full forward pass; chunk u reads the neighbours listed in ``sources[u]``."""
    nb = mask = None
    if sources:
        pairs = [db.store.neighbour_tokens(np.array([h.chunk_id for h in hits])) for hits in sources]
        toks, masks = [t for t, _ in pairs], [mk for _, mk in pairs]
        nb, mask = torch.from_numpy(np.stack(toks))[None], torch.from_numpy(np.stack(masks))[None]  # (1, C, K, 2m)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), nb, mask).logits[0]
    return logits.argmax(-1).numpy()


def test_each_chunk_shows_its_sources_and_matches_full_forward(built_db):
    db, m = built_db, built_db.chunk_len
    model = random_model(db)
    prompt = db.chunk_texts([0])[0]  # a whole chunk of the database: its own text is among its neighbours
    g = generate(model, db.tokenizer, prompt, DenseRetriever(db), max_new_tokens=150, stop_at_eos=False)
    assert g.retrieval and g.new_tokens == 150 and len(g.chunks) == 3  # 64 + 64 + 22 tokens
    assert "".join(c.text for c in g.chunks) == g.text

    # chunk j of the output was conditioned on the neighbours of the chunk before it (the prompt for j = 0)
    prompt_ids = db.tokenizer.encode(prompt)
    pad = (-len(prompt_ids)) % m
    out_ids = [t for c in g.chunks for t in c.token_ids]
    queries = [db.tokenizer.decode(prompt_ids)] + [c.text for c in g.chunks[:-1]]
    for chunk, query in zip(g.chunks, queries, strict=True):
        expected = search(db, query, k=K)
        assert [h.chunk_id for h in chunk.sources] == [h.chunk_id for h in expected]
        assert all(h.doc_id and h.text for h in chunk.sources)
    assert g.chunks[0].sources[0].chunk_id == 0  # the prompt chunk retrieves itself first

    # the cached, chunk-by-chunk sampler predicts what one full forward pass over the same neighbours predicts
    ids = [db.tokenizer.pad_id] * pad + prompt_ids + out_ids
    assert len(out_ids) == g.new_tokens
    pred = full_forward_argmax(model, db, ids, [c.sources for c in g.chunks])
    start = pad + len(prompt_ids)
    np.testing.assert_array_equal(pred[start - 1 : -1], ids[start:])

    text = format_generation(g)
    assert text.count("←") == sum(len(c.sources) for c in g.chunks) and "retrieval on" in text


def test_retrieval_off_is_the_plain_decoder_and_short_prompts_work(built_db):
    db = built_db
    model = random_model(db)
    g = generate(model, db.tokenizer, "The", max_new_tokens=20, stop_at_eos=False)
    assert not g.retrieval and all(c.sources == [] for c in g.chunks)
    ids = db.tokenizer.encode("The")
    pad = [db.tokenizer.pad_id] * (db.chunk_len - len(ids))
    gen = [t for c in g.chunks for t in c.token_ids]
    pred = full_forward_argmax(model, db, pad + ids + gen, [])
    np.testing.assert_array_equal(pred[len(pad) + len(ids) - 1 : -1], gen)

    # a prompt shorter than a chunk is left-padded into a whole chunk, so the first output chunk has sources
    g = generate(model, db.tokenizer, "The", DenseRetriever(db), max_new_tokens=5)
    assert g.chunks and len(g.chunks[0].sources) == K
    # sampling is reproducible from its seed
    a = generate(model, db.tokenizer, "The", DenseRetriever(db), max_new_tokens=30, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, db.tokenizer, "The", DenseRetriever(db), max_new_tokens=30, temperature=1.0, top_p=0.9, seed=3)
    assert a.text == b.text


def test_long_prompt_keeps_its_latest_chunks(built_db):
    """A prompt longer than the context keeps its most recent whole chunks: the output is exactly the output of a
    prompt made of those tokens alone (and the sources of its first chunk are those of the last kept chunk)."""
    db, m = built_db, built_db.chunk_len
    model = random_model(db)
    long_prompt = " ".join(db.chunk_texts(np.arange(10)))  # > seq_len tokens
    ids = db.tokenizer.encode(long_prompt)
    g = generate(model, db.tokenizer, long_prompt, DenseRetriever(db), max_new_tokens=8, stop_at_eos=False)
    kept = model.config.seq_len - m
    assert g.new_tokens == 8 and g.prompt_tokens_dropped == len(ids) - kept
    # the same generation from the kept tokens alone (a whole number of chunks: nothing is padded)
    ref = generate(model, db.tokenizer, db.tokenizer.decode(ids[-kept:]), DenseRetriever(db), max_new_tokens=8,
                   stop_at_eos=False)
    assert db.tokenizer.encode(db.tokenizer.decode(ids[-kept:])) == ids[-kept:]
    assert [c.token_ids for c in g.chunks] == [c.token_ids for c in ref.chunks]
    assert [h.chunk_id for h in g.chunks[0].sources] == [h.chunk_id for h in ref.chunks[0].sources]
    expected = search(db, db.tokenizer.decode(ids[-m:]), k=K)  # retrieved with the prompt's very last chunk
    assert [h.chunk_id for h in g.chunks[0].sources] == [h.chunk_id for h in expected]
    assert "did not fit the context" in format_generation(g)


def test_a_context_of_partial_chunks_keeps_whole_chunks_of_the_prompt(built_db):
    """seq_len 164 with chunks of 64: the prompt keeps one whole chunk (it kept 36 tokens, and the generated chunks
    then straddled chunk boundaries, booked to the wrong neighbours); a context under two chunks is refused."""
    db, m = built_db, built_db.chunk_len
    model = random_model(db, seq_len=2 * m + 36)
    ids = db.tokenizer.encode(" ".join(db.chunk_texts(np.arange(4))))
    g = generate(model, db.tokenizer, db.tokenizer.decode(ids), DenseRetriever(db), max_new_tokens=70,
                 stop_at_eos=False)
    assert g.prompt_tokens_dropped == len(ids) - m and [len(c.token_ids) for c in g.chunks] == [64, 6]
    expected = search(db, db.tokenizer.decode(ids[-m:]), k=K)
    assert [h.chunk_id for h in g.chunks[0].sources] == [h.chunk_id for h in expected]
    with pytest.raises(RetrolmError, match="fewer than two chunks of 64"):
        generate(random_model(db, seq_len=m + 10), db.tokenizer, "The", DenseRetriever(db), max_new_tokens=4)


def test_asking_for_more_tokens_than_the_model_has_positions_says_so(built_db, caplog):
    db, m = built_db, built_db.chunk_len
    model = random_model(db)
    prompt = db.chunk_texts([0])[0]
    n = len(db.tokenizer.encode(prompt))
    with caplog.at_level("WARNING", logger="retrolm.infer.generate"):
        g = generate(model, db.tokenizer, prompt, DenseRetriever(db), max_new_tokens=10 * model.config.seq_len,
                     stop_at_eos=False)
    room = model.config.seq_len - (n + (-n) % m)  # the prompt is left-padded to whole chunks
    assert g.new_tokens == room and f"generating {room} tokens, not {10 * model.config.seq_len}" in caplog.text


def test_baseline_refuses_a_database_and_bad_settings_are_errors(built_db):
    with pytest.raises(RetrolmError, match="no RETRO layers"):
        generate(random_model(built_db, retro=False), built_db.tokenizer, "x", DenseRetriever(built_db))
    model = random_model(built_db)
    with pytest.raises(RetrolmError, match="prompt is empty"):
        generate(model, built_db.tokenizer, "  ", DenseRetriever(built_db))
    with pytest.raises(RetrolmError, match="neighbours must be >= 1"):
        generate(model, built_db.tokenizer, "x", DenseRetriever(built_db), num_neighbours=0)
    with pytest.raises(RetrolmError, match="top_p"):
        generate(model, built_db.tokenizer, "x", top_p=0)


def test_top_p_samples_only_from_the_nucleus():
    """Nucleus sampling never draws a token outside the smallest set whose mass reaches top_p."""
    from retrolm.infer.sampling import nucleus, sample

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(nucleus(probs, 0.7).numpy(), [0.625, 0.375, 0, 0])  # 0.5 < 0.7 ≤ 0.8: two tokens
    np.testing.assert_allclose(nucleus(probs, 0.5).numpy(), [1, 0, 0, 0])
    np.testing.assert_allclose(nucleus(probs, 1.0).numpy(), probs.numpy(), rtol=1e-6)
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 1.0, 0.7, gen) for _ in range(300)}
    assert drawn == {0, 1}  # both nucleus tokens appear, the tail never does
    drawn = {sample(logits, 1.0, 1.0, gen) for _ in range(300)}
    assert drawn == {0, 1, 2, 3}
    assert sample(logits, 0.0, 0.1, gen) == 0  # greedy


def test_temperature_divides_the_logits_and_settings_are_checked():
    """A draw at temperature t is a draw from softmax(logits / t): the same seeded generator gives the same tokens."""
    from retrolm.infer.sampling import check_sampling, sample

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    for t in (0.5, 2.0):
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        drawn = [sample(logits, t, 1.0, g1) for _ in range(200)]
        want = [int(torch.multinomial(torch.softmax(logits / t, -1), 1, generator=g2)) for _ in range(200)]
        assert drawn == want, t
    check_sampling(1, 0.0, 1.0)  # the smallest valid settings
    check_sampling(1, 0.0, 1e-6)
    for bad in ((0, 1.0, 0.9), (1, -0.1, 0.9), (1, 1.0, 0.0), (1, 1.0, 1.01), (0, -1.0, 0.9), (1, math.nan, 0.9),
                (1, math.inf, 0.9)):
        with pytest.raises(RetrolmError, match=r"need max_new_tokens >= 1, a finite temperature >= 0 and 0 < top_p"):
            check_sampling(*bad)
    # a tiny temperature is (nearly) greedy: the logits' quotient overflowed to inf and the draw to NaN
    g = torch.Generator().manual_seed(0)
    assert [sample(logits, 1e-38, p, g) for p in (1.0, 0.5)] == [0, 0]
    # a temperature or top_p that float32 holds as 0 (the service answered 500: NaN probabilities)
    assert [sample(logits, 1e-300, 0.9, g), sample(logits, 1.0, 1e-300, g)] == [0, 0]


def test_generate_cli_json_from_a_trained_checkpoint(built_db, tmp_path, capsys):
    cfg = TrainConfig(db=str(built_db.path), out_dir=str(tmp_path / "run"), model=ModelSpec(preset="tiny", seq_len=256),
                      steps=2, batch_size=2, eval_every=2, save_every=2, eval_batches=1, warmup_steps=1,
                      tensorboard=False, val_fraction=0.2)
    t = Trainer(cfg)
    t.setup(show_progress=False)
    t.train()
    t.cleanup()
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "--db", str(built_db.path), "--prompt",
            "The history of", "--max-new-tokens", "70", "--temperature", "0.8", "--json"]
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0
    out = json.loads(out)
    assert out["retrieval"] and out["new_tokens"] <= 70 and out["tokens_per_s"] > 0
    for chunk in out["chunks"]:
        assert {"text", "sources"} <= set(chunk)
        for src in chunk["sources"]:
            assert {"chunk_id", "doc_id", "score", "text", "continuation"} <= set(src)
    # without --db the checkpoint's own tokenizer is used and nothing is retrieved
    args = ["generate", "--checkpoint", tmp_path / "run", "--prompt", "The history", "--max-new-tokens", 5]
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "retrieval off" in out


def test_generation_stops_at_any_stop_token_of_the_tokenizer(built_db, monkeypatch):
    """A chat model's turn ends in its own token (<|im_end|>), not the EOS that separates documents: generation ran
    past it to max_new_tokens, writing turns of its own."""
    import copy
    import sys

    generate_module = sys.modules["retrolm.infer.generate"]  # the package exports the function under that name
    tok = copy.copy(built_db.tokenizer)
    end_of_turn = 5
    tok.stop_ids = frozenset({tok.eos_id, end_of_turn})
    written = iter([7, 8, end_of_turn, 9, 10])
    monkeypatch.setattr(generate_module, "sample", lambda *args: next(written))
    g = generate(random_model(built_db), tok, "The river", DenseRetriever(built_db), max_new_tokens=5)
    assert [t for c in g.chunks for t in c.token_ids] == [7, 8] and g.new_tokens == 2
