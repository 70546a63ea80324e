"""Behavioural tests for retrolm.model: exact causality of chunked cross-attention, retrieval off = plain decoder,
KV-cache decoding = full forward, and a copy task that a RETRO model can only solve through its neighbours."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_retro_config
from retrolm.core.errors import RetrolmError
from retrolm.models.layers import apply_rope
from retrolm.models.retro import ChunkedCrossAttention, RetroConfig, RetroModel

V, M, K, R = 97, 8, 2, 16  # vocab, chunk length, neighbours per chunk, tokens per neighbour
T = 44  # 5 whole chunks + 4 tokens: the ragged end is the generation case


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models run faster single-threaded, and a shared 2-core box slows down badly when oversubscribed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> RetroConfig:
    return tiny_retro_config(**{"vocab_size": V, "chunk_len": M, **overrides})


@pytest.fixture(scope="module")
def model() -> RetroModel:
    torch.manual_seed(0)
    return RetroModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (2, T), generator=g)
    neighbours = torch.randint(0, V, (2, math.ceil(T / M), K, R), generator=g)
    neighbours[0, 1, 1, 10:] = -1  # a short neighbour
    neighbours[1, 3, 0] = -1  # a missing neighbour
    return idx, neighbours


def perturb(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Every entry changed to another valid token id."""
    g = torch.Generator().manual_seed(seed)
    return (x.clamp_min(0) + torch.randint(1, V, x.shape, generator=g)) % V


# --- causality ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [M - 2, M - 1, M, 2 * M - 1, 2 * M, 3 * M + 3, T - 1])
@torch.no_grad()
def test_future_tokens_and_neighbours_do_not_leak(model, data, t):
    idx, nb = data
    ref = model(idx, nb).logits
    idx2 = idx.clone()
    idx2[:, t:] = perturb(idx[:, t:], t)
    assert torch.equal(model(idx2, nb).logits[:, :t], ref[:, :t])

    u0 = (t + M) // M - 1  # first chunk whose last token (u+1)·m−1 is ≥ t
    nb2 = nb.clone()
    nb2[:, u0:] = perturb(nb[:, u0:], t)
    out = model(idx, nb2).logits
    assert torch.equal(out[:, :t], ref[:, :t])
    p = (u0 + 1) * M - 1  # positive control: the last token of chunk u0 does read its neighbours
    if p < T:
        assert not torch.allclose(out[:, p], ref[:, p])


@torch.no_grad()
def test_chunk_neighbours_are_first_read_at_the_chunks_last_token(model, data):
    idx, nb = data
    ref = model(idx, nb).logits
    for u in range(T // M):
        nb2 = nb.clone()
        nb2[:, u] = perturb(nb[:, u], u)
        changed = (model(idx, nb2).logits != ref).any(-1).any(0).nonzero().flatten()
        assert changed.min().item() == (u + 1) * M - 1, f"chunk {u}"
    nb2 = nb.clone()  # neighbours of the ragged last chunk can never be read
    nb2[:, T // M] = perturb(nb[:, T // M], 99)
    assert torch.equal(model(idx, nb2).logits, ref)


@pytest.mark.parametrize("R", [2 * M, M])  # neighbours of chunk + continuation (default), or of the chunk alone
@torch.no_grad()
def test_cca_matches_a_per_position_reference(R):
    """The batched shift/pad/fold of ChunkedCrossAttention against a naive loop, also from a mid-sequence start."""
    torch.manual_seed(0)
    cfg = tiny_config(neighbour_len=R)
    cca = ChunkedCrossAttention(cfg).eval()
    B, N, H, e = 2, T // M, cfg.n_head, cfg.d_model // cfg.n_head
    x = torch.randn(B, T, cfg.d_model)
    enc = torch.randn(B, N, K, R, cfg.enc_d_model)
    mask = torch.rand(B, N, K, R) > 0.3
    mask[1, 2] = False  # a chunk without neighbours
    out = cca(x, enc, mask)

    ref = torch.zeros_like(x)
    for b in range(B):
        for p in range(T):
            j = (p + 1) // M - 1
            if j < 0 or not mask[b, j].any():
                continue
            q = cca.attn.q(x[b, p]).view(H, 1, e)
            k, v = cca.attn.kv(enc[b, j].flatten(0, 1)).view(K * R, 2, H, e).permute(1, 2, 0, 3)
            q = apply_rope(q, cca.rope[:, M - 1 + (p + 1) % M][:, None])
            k = apply_rope(k, cca.rope[:, :R].repeat(1, K, 1))
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(e)
            scores = scores.masked_fill(~mask[b, j].flatten(), float("-inf"))
            ref[b, p] = cca.attn.proj((scores.softmax(-1) @ v).flatten())
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[:, : M - 1], torch.zeros_like(out[:, : M - 1]))
    for s in (3, M - 1, M, 2 * M + 5):  # a suffix, given the chunks it reads, matches the full pass
        j0 = max(s + 1, M) // M - 1
        torch.testing.assert_close(cca(x[:, s:], enc[:, j0:], mask[:, j0:], start=s), out[:, s:])


@torch.no_grad()
def test_cca_refuses_misaligned_neighbour_chunks_and_reads_nothing_before_the_first_chunk_ends():
    torch.manual_seed(0)
    cfg = tiny_config()
    cca = ChunkedCrossAttention(cfg).eval()
    x = torch.randn(2, 47, cfg.d_model)
    enc = torch.randn(2, 6, K, R, cfg.enc_d_model)
    mask = torch.ones(2, 6, K, R, dtype=torch.bool)
    assert cca(x, enc[:, :5], mask[:, :5]).shape == x.shape  # positions 7..46 read chunks 0..4
    for n in (6, 4, 0):  # one chunk too many (the pad would be a whole chunk), one too few, none
        msg = rf"^CCA got {n} neighbour chunks for positions \[0, 47\) with chunk_len 8$"
        with pytest.raises(ValueError, match=msg):
            cca(x, enc[:, :n], mask[:, :n])
    out = cca(x[:, : M - 1], enc[:, :0], mask[:, :0])  # positions before the first chunk's last token read nothing
    assert torch.equal(out, torch.zeros(2, M - 1, cfg.d_model))
    with pytest.raises(ValueError, match=r"CCA got 1 neighbour chunks for positions \[0, 7\)"):
        cca(x[:, : M - 1], enc[:, :1], mask[:, :1])
    # the RoPE table is derived, not learned: checkpoints do not hold it; biases follow the config
    assert "rope" not in cca.state_dict() and not any(k.endswith("rope") for k in RetroModel(cfg).state_dict())
    assert cca.attn.q.bias is None and cca.attn.kv.bias is None
    biased = ChunkedCrossAttention(tiny_config(bias=True)).attn
    assert biased.q.bias is not None and biased.kv.bias is not None and biased.proj.bias is not None


# --- retrieval off, masks, gradients ------------------------------------------------------------------------------


@torch.no_grad()
def test_retrieval_off_is_exactly_the_plain_decoder(model, data):
    idx, nb = data
    baseline = RetroModel(RetroConfig.from_dict({**model.config.to_dict(), "retro_layers": []})).eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert unexpected and all(k.startswith("encoder.") or "cca" in k.split(".")[2] for k in unexpected)
    assert baseline.encoder is None and baseline.num_params() < model.num_params()
    ref = baseline(idx).logits
    assert torch.equal(model(idx).logits, ref)
    assert torch.equal(model(idx, nb, torch.zeros_like(nb, dtype=torch.bool)).logits, ref)  # all neighbours masked
    assert not torch.allclose(model(idx, nb).logits, ref)


def test_masked_chunk_equals_absent_chunk_without_nan(model, data):
    idx, nb = data
    last = T // M - 1  # the last chunk that is read
    mask = torch.ones_like(nb, dtype=torch.bool)
    mask[:, last] = False
    mask[0, 1] = False  # and one chunk of one row only
    nb_absent = nb[:, :last]
    absent = torch.ones_like(nb_absent, dtype=torch.bool)
    absent[0, 1] = False
    model.zero_grad()
    out = model(idx, nb, mask, targets=idx)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(idx, nb_absent, absent).logits)
        assert not torch.allclose(out.logits, model(idx, nb).logits)


def test_gradients_reach_encoder_and_every_cca_parameter(model, data):
    idx, nb = data
    model.zero_grad()
    model(idx, nb, targets=torch.roll(idx, -1, 1)).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.norm() == 0]
    model.zero_grad()
    assert not no_grad
    assert any(n.startswith("encoder.") for n, _ in model.named_parameters())


@torch.no_grad()
def test_loss_is_mean_cross_entropy_ignoring_minus_100(model, data):
    idx, nb = data
    targets = torch.roll(idx, -1, 1)
    targets[:, -1] = -100
    out = model(idx, nb, targets=targets)
    want = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets[:, :-1].flatten())
    torch.testing.assert_close(out.loss, want)
    assert model(idx).loss is None


# --- incremental decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [[1] * T, [3, 14, 1, 9, 17], [M - 1, 1, M, 2 * M + 3, T - 4 * M - 3]])
@pytest.mark.parametrize("retrieval", [True, False])
@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(model, data, pieces, retrieval):
    idx, nb = data
    assert sum(pieces) == T
    full = model(idx, nb if retrieval else None).logits
    cache = model.init_cache(idx.shape[0])
    logits, pos = [], 0
    for n in pieces:
        # As in generation: only the neighbours of chunks complete by the end of this piece are known.
        known = nb[:, : (pos + n) // M] if retrieval else None
        logits.append(model(idx[:, pos : pos + n], known, cache=cache).logits)
        pos += n
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(logits, 1), full)  # fp32 defaults; measured max diff ~2e-7


# --- learning -----------------------------------------------------------------------------------------------------


def copy_batch(g: torch.Generator, batch: int, seq: int, m: int, vocab: int):
    """Random sequences whose neighbours for chunk u are [chunk u, chunk u+1] plus a random distractor, shuffled."""
    tokens = torch.randint(0, vocab, (batch, seq + 2 * m), generator=g)
    true = tokens.unfold(1, 2 * m, m)[:, : seq // m]  # (B, C, 2m)
    distractor = torch.randint(0, vocab, true.shape, generator=g)
    nb = torch.stack([true, distractor], 2)  # (B, C, 2, 2m)
    order = torch.rand(batch, seq // m, 2, generator=g).argsort(-1)
    nb = nb.gather(2, order[..., None].expand_as(nb))
    return tokens[:, :seq], tokens[:, 1 : seq + 1], nb, distractor


def test_tiny_retro_learns_to_copy_from_neighbours():
    # Measured (7 init seeds, 300 steps): on/off loss ratio 0.12–0.19, off ≈ ln 64 = 4.16; ~15 s on a loaded CPU.
    # One decoder layer with CCA and a 1-layer encoder learns this fastest (the copy needs an induction-style
    # composition: encoder "previous token" attention + CCA content match); deeper stacks plateau longer.
    torch.manual_seed(0)
    vocab, seq, m = 64, 64, 8
    cfg = RetroConfig(
        vocab_size=vocab, seq_len=seq, n_layer=1, n_head=4, d_model=32, chunk_len=m, retro_layers=(1,), enc_n_layer=1
    )
    model = RetroModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        idx, tgt, nb, _ = copy_batch(g, 16, seq, m, vocab)
        loss = model(idx, nb, targets=tgt).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        idx, tgt, nb, distractor = copy_batch(torch.Generator().manual_seed(99), 64, seq, m, vocab)
        on = model(idx, nb, targets=tgt).loss.item()
        off = model(idx, targets=tgt).loss.item()
        only_distractors = torch.stack([distractor, distractor.flip(0)], 2)
        fooled = model(idx, only_distractors, targets=tgt).loss.item()
    print(f"copy task: on={on:.3f} off={off:.3f} distractors-only={fooled:.3f}")
    assert off > 0.8 * math.log(vocab)  # nothing to learn without retrieval
    assert on < 0.4 * off, (on, off)
    assert fooled > 0.8 * off, (fooled, off)  # it uses the matching neighbour, not just any neighbour


# --- config and input validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(d_model=30, n_head=4),  # not divisible
        dict(d_model=36, n_head=12),  # odd head width: RoPE needs pairs
        dict(retro_layers=(0,)),
        dict(retro_layers=(3, 2)),
        dict(retro_layers=(4,)),
        dict(enc_cross_layers=(3,)),
        dict(chunk_len=0),
        dict(dropout=1.0),
        dict(enc_d_model=16, enc_n_head=3),
    ],
)
def test_bad_config_raises_clear_error(bad):
    with pytest.raises(RetrolmError, match="RetroConfig"):
        tiny_config(**bad)


def test_config_defaults_round_trip_and_presets():
    assert RetroConfig().retro_layers == (6, 9, 12)
    assert RetroConfig(n_layer=24).retro_layers == (6, 9, 12, 15, 18, 21, 24)
    assert RetroConfig(n_layer=4).retro_layers == (4,)
    assert RetroConfig(n_layer=1).retro_layers == (1,)
    cfg = tiny_config(retro_layers=None, d_ff=None)
    assert (cfg.d_ff, cfg.neighbour_len, cfg.enc_cross_layers) == (128, 2 * M, (1, 2))
    assert RetroConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(RetrolmError, match="unknown field"):
        RetroConfig.from_dict({"n_embd": 8})
    with pytest.raises(RetrolmError, match="unknown preset"):
        RetroConfig.preset("7b")
    big = RetroConfig.preset("150m")
    assert (big.d_model, big.n_layer, big.n_head, big.seq_len, big.chunk_len, big.num_neighbours) == (
        768,
        12,
        12,
        2048,
        64,
        2,
    )
    assert (big.retro_layers, big.vocab_size, big.neighbour_len) == ((6, 9, 12), 32000, 128)
    assert RetroConfig.preset("tiny", vocab_size=300).vocab_size == 300
    sizes = {}
    for name in ("25m", "100m", "150m"):
        with torch.device("meta"):
            sizes[name] = RetroModel(RetroConfig.preset(name)).num_params()
    assert sizes["25m"] < sizes["100m"] < sizes["150m"]


@torch.no_grad()
def test_bad_inputs_raise_clear_errors(model, data):
    idx, nb = data
    with pytest.raises(RetrolmError, match="exceed"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(RetrolmError, match="shape"):
        model(idx, nb[0])
    with pytest.raises(RetrolmError, match="neighbour_len"):
        model(idx, torch.zeros(2, 5, K, R + 1, dtype=torch.long))
    with pytest.raises(RetrolmError, match="without RETRO layers"):
        RetroModel(tiny_config(retro_layers=()))(idx, nb)
    cache = model.init_cache(2, max_len=T)
    model(idx, cache=cache)
    with pytest.raises(RetrolmError, match="exceed"):
        model(idx[:, :1], cache=cache)


@torch.no_grad()
def test_a_cache_left_half_updated_by_a_failed_call_is_refused(model, data):
    """A call that raises after writing part of the cache (here: in the last block) would leave keys of tokens that
    ``pos`` does not count; the cache is refused from then on instead of giving wrong logits."""
    idx, nb = data
    cache = model.init_cache(2, max_len=T)
    model(idx[:, :M], nb, cache=cache)

    def boom(*_):
        raise RuntimeError("out of memory")

    hook = model.blocks[-1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            model(idx[:, M : M + 3], nb, cache=cache)
    finally:
        hook.remove()
    assert cache.pos == M and cache.failed
    with pytest.raises(RetrolmError, match="failed; start a new one"):
        model(idx[:, M : M + 3], nb, cache=cache)
    fresh = model.init_cache(2, max_len=T)  # input errors are raised before any write and leave a cache usable
    with pytest.raises(RetrolmError, match="neighbour_len"):
        model(idx[:, :M], torch.zeros(2, 5, K, R + 1, dtype=torch.long), cache=fresh)
    assert not fresh.failed
    model(idx[:, :M], nb, cache=fresh)


@pytest.mark.parametrize("strict", [True, False])
def test_weights_of_another_shape_name_the_tensor_that_differs(tmp_path, strict):
    """torch's first line ("Error(s) in loading state_dict for RetroModel:") named no tensor."""
    from retrolm.models.weights import load_weights

    RetroModel(RetroConfig.preset("tiny")).save_pretrained(tmp_path / "m")
    wider = RetroModel(RetroConfig.preset("tiny", d_model=128))
    with pytest.raises(RetrolmError, match=r"model.safetensors: cannot load \(blocks.0.norm1.weight has shape \(64,\) "
                                           r"in the file, \(128,\) in the model\)"):
        load_weights(wider, tmp_path / "m", strict=strict)
