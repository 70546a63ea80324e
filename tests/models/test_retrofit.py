"""RETRO-fitting a pretrained HF causal LM: the base's logits at init, a frozen base after training, checkpoints that
hold only the new weights, refusals (another base, another tokenizer), the CLI path retrofit → eval → generate, and
the base reading its neighbours itself (``encoder=base``).

The base is a tiny random Llama (2 layers, 64 wide) the tests create, with the test database's tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, wiki_docs, write_jsonl
from retrolm.core.config import load_config
from retrolm.core.errors import RetrolmError
from retrolm.models.loading import load_model
from retrolm.models.retrofit import RetrofitModel, RetrofitModelConfig, find_decoder_layers
from retrolm.train.retrofit import RetrofitConfig

M, T = 64, 256
NEW = dict(retro_layers=(1, 2), enc_n_layer=1, enc_d_model=32, enc_n_head=2)
"""New modules of the tiny retrofits: CCA after both layers, a 1-layer, 32-wide encoder."""


def save_llama(folder: Path, vocab: int, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # embeddings (tied to the output) of a trained LM's scale: confident, learnable logits
        model.model.embed_tokens.weight.mul_(5)
    model.save_pretrained(folder)
    return folder


def save_gpt2(folder: Path, vocab: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_base(built_db, tmp_path_factory) -> Path:
    """A random 2-layer Llama saved as an HF folder, with the database's tokenizer.json (so it matches the db)."""
    folder = save_llama(tmp_path_factory.mktemp("tiny-llama"), built_db.tokenizer.vocab_size)
    shutil.copy(built_db.path / "tokenizer.json", folder / "tokenizer.json")
    return folder


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def retrofit(base: Path, **kw) -> RetrofitModel:
    torch.manual_seed(1)
    return RetrofitModel.from_base(str(base), chunk_len=M, seq_len=T, **{**NEW, **kw})


def inputs(vocab: int, seed: int = 0, T: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (2, T) and neighbours (2, T/M, 2, 2M); chunk 1 of row 0 retrieved nothing (all padding)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (2, T), generator=g)
    nb = torch.randint(0, vocab, (2, T // M, 2, 2 * M), generator=g)
    nb[0, 1] = -1
    nb[1, :, 1, M + 10 :] = -1  # a short second neighbour
    return idx, nb


def train_steps(model: RetrofitModel, idx: torch.Tensor, nb: torch.Tensor, targets: torch.Tensor, steps: int
                ) -> list[float]:
    """``steps`` AdamW steps (lr 1e-2) on one batch, in train mode; the loss before each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(idx, nb, targets=targets).loss
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


def perturb(model: RetrofitModel, seed: int = 2) -> None:
    """Stand-in for training: noise on every trainable weight (CCA output projections included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ["llama", "llama+lora", "gpt2"])
def test_init_logits_equal_the_untouched_base_and_cca_is_wired(arch, tiny_base, built_db, tmp_path):
    vocab = built_db.tokenizer.vocab_size
    base = tiny_base
    if arch == "gpt2":
        base = save_gpt2(tmp_path / "gpt2", vocab)
    model = retrofit(base, lora=arch.endswith("lora"))
    reference = hf_model(base)
    idx, nb = inputs(vocab)
    with torch.no_grad():
        want = reference(input_ids=idx).logits
        torch.testing.assert_close(model(idx, nb).logits, want, rtol=0, atol=0)  # neighbours given: still the base
        torch.testing.assert_close(model(idx).logits, want, rtol=0, atol=0)
        # the hooks are live: a non-zero CCA changes the logits exactly where causality lets neighbours be read
        for block in model.cca.values():
            block.cca.attn.proj.weight.normal_(0, 0.1)
        diff = (model(idx, nb).logits - want).abs().amax(-1)  # (B, T)
    assert float(diff[:, : M - 1].max()) == 0.0  # the first m−1 positions read no neighbours
    assert float(diff[1, M - 1 :].min()) > 0  # every later position of row 1 reads some


def base_lengths(model: RetrofitModel) -> list[int]:
    """Records the length of every pass of the base over the sequence itself (not over neighbours: those passes
    carry an attention mask)."""
    seen: list[int] = []
    model.base.base_model.register_forward_pre_hook(
        lambda _m, args, kw: seen.append((kw.get("input_ids") if args == () else args[0]).shape[1])
        if kw.get("attention_mask") is None else None, with_kwargs=True)
    return seen


@pytest.mark.parametrize("encoder", ["retro", "base", "retro-gpt2"])
@pytest.mark.parametrize("pieces", [(100,) + (1,) * 60, (37, 1, 26, 1, 63, 5, 27)])
def test_cached_decoding_logits_equal_a_full_forward(encoder, pieces, tiny_base, built_db, tmp_path):
    """Fed in pieces (one token at a time, or pieces that end on a chunk's last token, inside a chunk, or complete
    several chunks at once), the KV-cached model gives the full forward's logits, and the base runs over the new
    tokens only. Row 0's chunk 1 retrieved nothing."""
    if encoder == "base":
        model = base_read(tiny_base)
    else:  # a Llama or a GPT-2 base (each has its own KV cache layout inside transformers)
        model = retrofit(save_gpt2(tmp_path / "gpt2", built_db.tokenizer.vocab_size) if encoder == "retro-gpt2"
                         else tiny_base)
    perturb(model)
    idx, nb = inputs(built_db.tokenizer.vocab_size, seed=3, T=160)
    seen = base_lengths(model)
    with torch.no_grad():
        full = model(idx, nb).logits
        seen.clear()
        cache = model.init_cache(2, 160)
        parts, pos = [], 0
        for n in pieces:
            parts.append(model(idx[:, pos : pos + n], nb, cache=cache).logits)
            pos += n
    assert cache.pos == 160
    assert seen == list(pieces)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the neighbours of the chunks complete so far, none at first (RetroModel's recipe): the same
        cache = model.init_cache(2, 160)
        parts = [model(idx[:, :10], nb[:, :0], cache=cache).logits]
        parts += [model(idx[:, p : p + 30], nb[:, : (p + 30) // M], cache=cache).logits for p in range(10, 160, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    # the neighbours matter in this comparison: without them the logits differ after the first chunk
    with torch.no_grad():
        off = model(idx).logits
    assert float((off - full)[:, M:].abs().amax()) > 1e-2


def test_generation_encodes_each_neighbour_once_with_encoder_base(tiny_base, built_db):
    model = base_read(tiny_base)
    perturb(model)
    idx, nb = inputs(built_db.tokenizer.vocab_size, seed=3, T=T)
    idx, nb = idx[:1], nb[:1]  # 4 chunks of 2 neighbours
    encoded = []
    model.base.base_model.register_forward_pre_hook(
        lambda _m, args, kw: encoded.append(kw["input_ids"].shape[0]) if kw.get("attention_mask") is not None else None,
        with_kwargs=True)  # the neighbour pass is the one with an attention mask
    with torch.no_grad():
        full = model(idx, nb).logits
        encoded.clear()
        cache = model.init_cache(1, T)
        parts = [model(idx[:, :100], nb, cache=cache).logits]  # chunk 0 complete: its 2 neighbours
        parts += [model(idx[:, p : p + 1], nb, cache=cache).logits for p in range(100, T)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    # chunks 0-3, each when it completes, never again; chunk 1 retrieved nothing: two all-padding neighbours, one row
    assert encoded == [2, 1, 2, 2]


def test_a_neighbour_read_by_several_rows_is_encoded_once(tiny_base, built_db):
    """Overlapping evaluation sequences (context_chunks) read the same chunk's neighbours in several rows: the base
    runs over each distinct neighbour once, and every row's logits are those it gets alone."""
    model = base_read(tiny_base)
    perturb(model)
    idx, nb = inputs(built_db.tokenizer.vocab_size, seed=4, T=T)
    nb[1, :3] = nb[0, 1:]  # row 1 starts one chunk later than row 0: three chunks' neighbours in common
    distinct = torch.unique(nb.clamp_min(0).flatten(0, 2), dim=0).shape[0]
    encoded = []
    model.base.base_model.register_forward_pre_hook(
        lambda _m, args, kw: encoded.append(kw["input_ids"].shape[0]) if kw.get("attention_mask") is not None else None,
        with_kwargs=True)
    with torch.no_grad():
        both = model(idx, nb).logits
        assert encoded == [distinct] and distinct < 2 * 4 * 2
        alone = torch.cat([model(idx[i : i + 1], nb[i : i + 1]).logits for i in range(2)])
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", ["retro", "base"])
def test_masked_padding_is_read_by_no_one(encoder, tiny_base, built_db):
    """With ``attention_mask``, what the masked positions hold changes no visible position's logits (the base's
    attention, the readers' attention over the context with ``encoder=base``, and with ``encoder=retro`` the neighbour
    encoder's cross-attention to the retrieving chunk skip them); without it, it does."""
    model = retrofit(tiny_base) if encoder == "retro" else base_read(tiny_base)
    perturb(model)
    vocab = built_db.tokenizer.vocab_size
    idx, nb = inputs(vocab, seed=5)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[:, 20:64] = False  # a document ended at token 19 of chunk 0: 44 positions of padding
    mask[1, 150:180] = False
    mask[0, :5] = False  # a left-padded prompt: the first positions see nothing else (no NaN)
    other = torch.where(mask, idx, (idx + 7) % vocab)
    with torch.no_grad():
        for neighbours in (nb, None):
            a = model(idx, neighbours, attention_mask=mask).logits
            b = model(other, neighbours, attention_mask=mask).logits
            torch.testing.assert_close(a[mask], b[mask], rtol=1e-5, atol=1e-5)
            assert torch.isfinite(a).all()
        assert float((model(idx, nb).logits - model(other, nb).logits)[mask].abs().amax()) > 1e-3
        with pytest.raises(RetrolmError, match="attention_mask must be bool"):
            model(idx, nb, attention_mask=mask.long())
        # decoding keeps the mask: a masked prompt, then one token at a time (row 1 meets more padding) = full forward
        full = model(idx, nb, attention_mask=mask).logits
        cache = model.init_cache(2, T)
        parts = [model(idx[:, :100], nb, cache=cache, attention_mask=mask[:, :100]).logits]
        parts += [model(idx[:, p : p + 1], nb, cache=cache, attention_mask=mask[:, p : p + 1]).logits
                  for p in range(100, T)]
    torch.testing.assert_close(torch.cat(parts, 1)[mask], full[mask], rtol=1e-4, atol=1e-4)


def test_a_cache_started_without_neighbours_reads_none(tiny_base, built_db):
    model = base_read(tiny_base)
    idx, nb = inputs(built_db.tokenizer.vocab_size, seed=3, T=T)
    with torch.no_grad():
        cache = model.init_cache(2, T)
        first = model(idx[:, :70], cache=cache).logits  # retrieval off: exactly the base
        torch.testing.assert_close(first, hf_model(tiny_base)(input_ids=idx[:, :70]).logits)
        with pytest.raises(RetrolmError, match="started without neighbours"):
            model(idx[:, 70:71], nb, cache=cache)


@pytest.mark.parametrize("encoder", ["retro", "base"])
def test_a_cache_left_half_updated_by_a_failed_call_is_refused(encoder, tiny_base, built_db):
    """A call that raises inside the base (after earlier layers wrote the base's KV cache and the readers' state) is
    not counted in ``pos``; the cache is refused from then on. A refused input (reading with a cache started without
    neighbours) writes nothing and leaves the cache usable."""
    model = retrofit(tiny_base) if encoder == "retro" else base_read(tiny_base)
    idx, nb = inputs(built_db.tokenizer.vocab_size, seed=6, T=T)
    _, layers = find_decoder_layers(model.base)

    def boom(*_):
        raise RuntimeError("out of memory")

    with torch.no_grad():
        cache = model.init_cache(2, T)
        model(idx[:, :70], nb, cache=cache)
        hook = layers[-1].register_forward_pre_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="out of memory"):
                model(idx[:, 70:75], nb, cache=cache)
        finally:
            hook.remove()
        assert cache.pos == 70 and cache.failed
        with pytest.raises(RetrolmError, match="failed; start a new one"):
            model(idx[:, 70:75], nb, cache=cache)
        plain = model.init_cache(2, T)
        model(idx[:, :70], cache=plain)
        with pytest.raises(RetrolmError, match="started without neighbours"):
            model(idx[:, 70:71], nb, cache=plain)
        assert not plain.failed and plain.pos == 70
        model(idx[:, 70:71], cache=plain)


def test_training_moves_the_retrieval_loss_and_never_the_frozen_base(tiny_base, built_db):
    """A few AdamW steps on a copy task (each chunk's neighbour holds it and the next chunk): the retrieval-on loss
    drops, the encoder learns too (not only the zero-initialised output projections), the base stays bit for bit."""
    vocab = built_db.tokenizer.vocab_size
    model = retrofit(tiny_base)
    reference = hf_model(tiny_base)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, vocab, (2, T), generator=g)
    chunks = idx.view(2, T // M, M)
    nb = torch.cat([chunks, torch.roll(chunks, -1, dims=1)], dim=-1)[:, :, None]  # (B, C, 1, 2M): chunk + next
    nb[:, -1, :, M:] = -1  # the last chunk has no continuation
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)
    encoder_before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    assert all(not p.requires_grad for p in model.base.parameters())
    losses = train_steps(model, idx, nb, targets, 30)
    model.eval()
    with torch.no_grad():
        on = float(model(idx, nb, targets=targets).loss)
        off = model(idx, targets=targets)
        want = reference(input_ids=idx).logits
    assert losses[1] != losses[0] and on < float(off.loss) - 1.0, losses  # it learnt to read its neighbours
    assert torch.equal(off.logits, want)  # retrieval off: exactly the base, after training
    assert all(torch.equal(p, reference.state_dict()[n.removeprefix("base.")])
               for n, p in model.base.named_parameters(prefix="base"))
    moved = [n for n, p in model.encoder.named_parameters() if not torch.equal(p, encoder_before[n])]
    assert len(moved) == len(encoder_before)  # every encoder weight got a gradient


@pytest.mark.parametrize("mode", ["frozen", "lora", "unfreeze"])
def test_save_load_round_trip_holds_only_what_is_trained(mode, tiny_base, built_db, tmp_path):
    model = retrofit(tiny_base, lora=mode == "lora", unfreeze=mode == "unfreeze")
    perturb(model)
    model.save_pretrained(tmp_path / "ckpt")
    saved = set(load_file(tmp_path / "ckpt" / "model.safetensors"))
    new = {n for n, _ in model.named_parameters() if not n.startswith("base.")}
    base_saved = saved - new
    assert new <= saved
    if mode == "frozen":
        assert base_saved == set()
        base_bytes = (tiny_base / "model.safetensors").stat().st_size
        assert (tmp_path / "ckpt" / "model.safetensors").stat().st_size < base_bytes
    elif mode == "lora":
        assert base_saved and all("lora_" in n for n in base_saved)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == saved
    else:  # the whole base, its tied embedding once
        assert base_saved == {n for n, _ in model.base.named_parameters(prefix="base")}
    info = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert info["architecture"] == "retrofit" and info["base"] == str(tiny_base.resolve())
    assert len(info["base_fingerprint"]) == 64

    loaded = load_model(tmp_path / "ckpt")
    assert loaded.kind == "retrofit"
    idx, nb = inputs(built_db.tokenizer.vocab_size, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.model(idx, nb).logits, model.eval()(idx, nb).logits)
        assert torch.equal(loaded.model(idx).logits, model(idx).logits)


def test_another_base_behind_the_same_name_is_refused(tiny_base, built_db, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    model = retrofit(base)
    model.save_pretrained(tmp_path / "ckpt")
    save_llama(base, built_db.tokenizer.vocab_size, seed=7)  # the folder now holds other weights
    with pytest.raises(RetrolmError, match="trained on base") as e:
        RetrofitModel.from_pretrained(tmp_path / "ckpt")
    assert "\n" not in str(e.value)


def test_lora_trains_only_adapters_and_new_modules(tiny_base, built_db):
    model = retrofit(tiny_base, lora=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if n.startswith("base.")}
    assert lora and all("lora_" in n for n in lora)
    assert {n.split(".")[-4] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}  # attention projections
    assert trainable - lora == {n for n, _ in model.named_parameters() if not n.startswith("base.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx, nb = inputs(built_db.tokenizer.vocab_size, seed=6)
    train_steps(model, idx, nb, idx, 2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # every adapter and new weight moved (lora_B from zero included), nothing else


def test_shipped_retrofit_config_parses():
    cfg = load_config(RetrofitConfig, REPO / "configs" / "retrofit-smollm2.yaml")
    assert cfg.base == "smollm2-135m" and not cfg.unfreeze and not cfg.lora
    # SmolLM2-135M's shape (without loading it): 30 layers, 576 wide, 9 heads
    shape = RetrofitModelConfig(base=cfg.base, base_fingerprint=None, vocab_size=49152, n_layer=30, d_model=576,
                                n_head=9, seq_len=cfg.seq_len, chunk_len=64, retro_layers=tuple(cfg.cca_layers),
                                enc_n_layer=cfg.enc_n_layer, enc_d_model=cfg.enc_d_model, enc_n_head=cfg.enc_n_head)
    assert shape.retro_config().retro_layers == (18, 24, 30) and cfg.seq_len % 64 == 0
    base = load_config(RetrofitConfig, REPO / "configs" / "retrofit-smollm2-base.yaml")
    assert base.encoder == "base" and base.cca_layers is None and base.lr < cfg.lr  # copies start pretrained
    shape = RetrofitModelConfig(base=base.base, base_fingerprint=None, vocab_size=49152, n_layer=30, d_model=576,
                                n_head=9, seq_len=base.seq_len, chunk_len=64, encoder=base.encoder)
    assert shape.retro_layers == tuple(range(1, 31)) and shape.cca_query_offset == 128


def test_retrofit_cli_then_eval_and_generate(tiny_base, built_db, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["retrofit", "--base", tiny_base, "--db", built_db.path, "--out", run, "-q", f"seq_len={T}",
            "batch_size=2", "eval_every=3", "save_every=3", "eval_batches=1", "log_every=1", "warmup_steps=1",
            "tensorboard=false", "val_fraction=0.2", "lr=0.01", "cca_layers=[1,2]", "enc_n_layer=1",
            "enc_d_model=32", "enc_n_head=2"]
    rc, out, err = run_cli([*args, "steps=3"], capsys)
    assert rc == 0, err
    ckpt = run / "checkpoints" / "step-000003"
    assert {"model.safetensors", "model.json", "tokenizer.json", "database.json", "checksums.json",
            "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}
    assert not any(n.startswith("base.") for n in load_file(ckpt / "model.safetensors"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "val/bpb" in rows[-1] and "val_no_retrieval/bpb" in rows[-1]

    # after training: retrieval off is the untouched base, bit for bit; retrieval on is not
    model = load_model(run).model
    idx, nb = inputs(built_db.tokenizer.vocab_size, seed=8)
    with torch.no_grad():
        want = hf_model(tiny_base)(input_ids=idx).logits
        assert torch.equal(model(idx).logits, want)
        assert not torch.allclose(model(idx, nb).logits, want)

    # a base whose fingerprint was unknown when the run started (a hub name, not yet downloaded) resumes: the base's
    # own check only warns there, and the model check must not refuse it
    from retrolm.models.weights import write_checksums

    saved = json.loads((ckpt / "model.json").read_text())
    (ckpt / "model.json").write_text(json.dumps({**saved, "base_fingerprint": None}))
    write_checksums(ckpt)
    rc, _, err = run_cli([*args, "steps=4"], capsys)  # resumes from step 3: only step 4 is trained
    assert rc == 0, err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]

    held = write_jsonl(tmp_path / "held.jsonl", wiki_docs(3, start=40))
    rc, out, err = run_cli(["eval", "--checkpoint", run, "--db", built_db.path, "--data", held, "--out",
                            tmp_path / "eval", "--json", "-q", "near_dup_threshold=0"], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert {"retro", "retro_no_retrieval"} <= set(result["summary"]) and "all" in result["gain"]
    assert [m["kind"] for m in result["models"].values()] == ["retrofit"]
    assert result["summary"]["retro"]["bpb"] != result["summary"]["retro_no_retrieval"]["bpb"]

    rc, out, err = run_cli(["generate", "--checkpoint", run, "--db", built_db.path, "--prompt",
                            "The history of the city", "--max-new-tokens", "70", "--ignore-eos", "--json"], capsys)
    assert rc == 0, err
    g = json.loads(out)
    assert g["retrieval"] and g["new_tokens"] == 70 and len(g["chunks"]) == 2
    assert len(g["chunks"][0]["sources"]) == 2  # the prompt chunk's neighbours condition the first generated chunk


def test_a_database_with_another_tokenizer_is_refused(tiny_base, built_db, tmp_path, capsys):
    from tokenizers import Tokenizer

    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    tok.add_tokens(["<extra>"])
    tok.save(str(other / "tokenizer.json"))
    rc, _, err = run_cli(["retrofit", "--base", other, "--db", built_db.path, "--out", tmp_path / "run", "-q",
                          "steps=1", "tensorboard=false"], capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error:") and "tokenizer" in line and str(other) in line and str(built_db.path) in line
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------------------
# encoder=base: the base encodes the neighbours and each layer's self-attention reads them through a copy of its own
# projections, with one softmax over context and neighbour. The reference is written out by hand from the HF layer's
# projections: a softmax over [the neighbours of chunk (p+1)//m − 1, placed cca_query_offset positions before that
# chunk; the context up to p].

OFFSET = 2 * M


def base_read(base, **kw) -> RetrofitModel:
    torch.manual_seed(1)
    return RetrofitModel.from_base(str(base), chunk_len=M, seq_len=T, encoder="base", **kw)


def rotate(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (the rotate-half layout) of x (..., n, e) at any, even negative, positions pos (n,)."""
    e = x.shape[-1]
    angles = pos[:, None].double() * (1.0 / theta ** (torch.arange(0, e, 2).double() / e))[None]
    cos, sin = angles.cos().float(), angles.sin().float()
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)


def joint_attention(layer, x: torch.Tensor, nb_states: torch.Tensor, nb_mask: torch.Tensor, theta: float):
    """Layer ``layer``'s attention output over [neighbours; context], position by position, from its own weights.

    x (T, d) its normalised input; nb_states (C, K, R, d) the neighbours' normalised states; nb_mask (C, K, R)."""
    attn = layer.self_attn
    H, e = 4, 16
    q = attn.q_proj(x).view(-1, H, e).transpose(0, 1)  # (H, T, e)

    def kv(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = attn.k_proj(h).view(len(h), -1, e).transpose(0, 1).repeat_interleave(2, 0)  # 2 key/value heads
        v = attn.v_proj(h).view(len(h), -1, e).transpose(0, 1).repeat_interleave(2, 0)
        return k, v

    kc, vc = kv(x)
    out = torch.zeros(T, H * e)
    C, K, R = nb_mask.shape
    for p in range(T):
        j = (p + 1) // M - 1
        pos = torch.arange(p + 1)
        keys, values = rotate(kc[:, : p + 1], pos, theta), vc[:, : p + 1]
        if 0 <= j < C and nb_mask[j].any():
            real = nb_mask[j].reshape(-1)
            kn, vn = kv(nb_states[j].reshape(K * R, -1)[real])
            r = torch.arange(R).repeat(K)[real]
            keys = torch.cat([rotate(kn, j * M - OFFSET + r, theta), keys], 1)  # the neighbour sits before chunk j
            values = torch.cat([vn, values], 1)
        qp = rotate(q[:, p : p + 1], torch.tensor([p]), theta)
        w = torch.softmax(qp @ keys.transpose(-1, -2) / e**0.5, -1)
        out[p] = (w @ values).reshape(-1)
    return attn.o_proj(out)


def test_each_layer_reads_context_and_neighbours_in_one_softmax(tiny_base, built_db):
    """At init the hooked attention output is exactly the layer's attention over [neighbour; context] — grouped
    key/value heads, RoPE offsets, which chunk a position reads, padding and the joint softmax all enter."""
    model = base_read(tiny_base)
    assert model.config.retro_layers == (1, 2) and model.config.cca_query_offset == OFFSET
    idx, nb = inputs(built_db.tokenizer.vocab_size)
    layers = model._layers
    seen: dict[int, torch.Tensor] = {}
    handles = [layer.self_attn.register_forward_hook(  # registered after the model's: sees the sum
        lambda mod, args, kwargs, out, i=i: seen.__setitem__(i, out[0]), with_kwargs=True)
        for i, layer in enumerate(layers)]
    handles += [layer.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: seen.__setitem__(10 + i, (args[0] if args else kwargs["hidden_states"])),
        with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(idx, nb)
        for h in handles:
            h.remove()
        row = 1
        mask = nb[row] >= 0
        states = model.base.base_model(input_ids=nb[row].clamp_min(0).reshape(-1, 2 * M),
                                       attention_mask=mask.reshape(-1, 2 * M).long(),
                                       output_hidden_states=True).hidden_states
        theta = model.config.rope_theta
        for i, layer in enumerate(layers):
            x = layer.input_layernorm(seen[10 + i][row])
            nb_states = layer.input_layernorm(states[i]).reshape(*nb.shape[1:], -1)
            want = joint_attention(layer, x, nb_states, mask, theta)
            torch.testing.assert_close(seen[i][row], want, rtol=1e-4, atol=1e-5)


def test_retrieval_off_and_unread_positions_are_the_base_exactly(tiny_base, built_db):
    model = base_read(tiny_base)
    perturb(model)  # trained readers too: off is still the base
    idx, nb = inputs(built_db.tokenizer.vocab_size, seed=3)
    with torch.no_grad():
        want = hf_model(tiny_base)(input_ids=idx).logits
        torch.testing.assert_close(model(idx).logits, want, rtol=0, atol=0)
        on = model(idx, nb).logits
        empty = model(idx, torch.full_like(nb, -1)).logits
    diff = (on - want).abs().amax(-1)
    assert float(diff[:, : M - 1].max()) == 0.0  # the first m−1 positions read no neighbours
    assert float(diff[1, M - 1 :].min()) > 0  # every later position of row 1 reads some
    torch.testing.assert_close(empty, want, rtol=0, atol=1e-6)  # nothing to read: the base


@torch.no_grad()
def test_a_reader_given_neighbour_chunks_its_positions_do_not_read_refuses_them(tiny_base, built_db):
    """As RETRO's CCA: the chunks handed to a reading layer must be exactly those its positions read; too many, too
    few, or any for positions before the first chunk ends raise instead of reading nothing or the wrong chunk."""
    from retrolm.models.retrofit import context_blocked

    reader = base_read(tiny_base).cca["1"].eval()
    torch.manual_seed(0)
    d = reader.attn.kv.weight.shape[1]
    x, nb = torch.randn(1, T, d), torch.randn(1, T // M + 1, 2, 2 * M, d)
    nm = torch.ones(nb.shape[:4], dtype=torch.bool)
    blocked = context_blocked(0, T, None, x.device)
    assert float(reader(x, nb[:, :4], nm[:, :4], blocked=blocked)[:, M - 1 :].abs().amin(-1).min()) > 0
    for n in (5, 3, 0):  # positions 63..255 read chunks 0..3: one too many, one too few, none
        with pytest.raises(ValueError, match=rf"^reader got {n} neighbour chunks for positions \[0, {T}\)"):
            reader(x, nb[:, :n], nm[:, :n], blocked=blocked)
    head = context_blocked(0, M - 1, None, x.device)
    out = reader(x[:, : M - 1], nb[:, :0], nm[:, :0], blocked=head)  # p < m−1: nothing to read, nothing given
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match=rf"^reader got 1 neighbour chunks for positions \[0, {M - 1}\)"):
        reader(x[:, : M - 1], nb[:, :1], nm[:, :1], blocked=head)


def test_training_moves_only_the_readers_and_the_round_trip_is_exact(tiny_base, built_db, tmp_path):
    vocab = built_db.tokenizer.vocab_size
    model = base_read(tiny_base)
    base_before = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    idx, nb = inputs(vocab, seed=6)
    losses = train_steps(model, idx, nb, torch.roll(idx, -1, 1), 3)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, base_before[n]) for n, p in model.base.named_parameters())
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").model
    assert loaded.config.encoder == "base" and loaded.encoder is None
    with torch.no_grad():
        assert torch.equal(loaded(idx, nb).logits, model.eval()(idx, nb).logits)


def test_bases_it_cannot_copy_from_are_one_line_errors(tiny_base, tmp_path, built_db):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=built_db.tokenizer.vocab_size, n_embd=64, n_layer=2, n_head=4,
                               n_positions=512)).save_pretrained(gpt2)
    with pytest.raises(RetrolmError, match="encoder=base needs plain RoPE and RMSNorm") as e:
        base_read(gpt2)
    assert "\n" not in str(e.value)
    with pytest.raises(RetrolmError, match="enc_d_model must be 64"):
        base_read(tiny_base, enc_d_model=32)
    with pytest.raises(RetrolmError, match="encoder must be one of retro, base"):
        RetrofitModel.from_base(str(tiny_base), chunk_len=M, seq_len=T, encoder="bert")


def test_a_scaled_rope_is_refused_as_transformers_4_records_it():
    """transformers 4.x keeps RoPE scaling in ``rope_scaling`` (5.x in ``rope_parameters``): a Llama 3 base passed
    the plain-RoPE check there and its copied readers rotated without the scaling."""
    from types import SimpleNamespace

    from retrolm.models.retrofit import _base_attention_settings

    def base(**cfg):
        return SimpleNamespace(config=SimpleNamespace(rope_theta=10000.0, rms_norm_eps=1e-5, **cfg))

    assert _base_attention_settings(base()) == {"rope_theta": 10000.0, "norm_eps": 1e-5}
    assert _base_attention_settings(base(rope_scaling=None))["rope_theta"] == 10000.0
    for scaling in ({"rope_type": "llama3", "factor": 8.0}, {"type": "linear", "factor": 2.0}):
        with pytest.raises(RetrolmError, match="encoder=base needs plain RoPE"):
            _base_attention_settings(base(rope_scaling=scaling))


def test_retrofit_cli_steps_0_writes_the_base_reader_as_built(tiny_base, built_db, tmp_path, capsys):
    """``encoder=base`` reads before any training: steps=0 writes checkpoint step-000000 without searching training
    neighbours, and it evaluates (retrieval on differs from off)."""
    run = tmp_path / "run"
    rc, _, err = run_cli(["retrofit", "--base", tiny_base, "--db", built_db.path, "--out", run, "-q", f"seq_len={T}",
                          "encoder=base", "steps=0", "tensorboard=false"], capsys)
    assert rc == 0, err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000"]
    assert not (run / "neighbours").exists()
    model = load_model(run).model
    fresh = base_read(tiny_base)
    assert model.config.encoder == "base" and model.config.retro_layers == (1, 2)
    assert all(torch.equal(p, fresh.state_dict()[n]) for n, p in model.state_dict().items())
    held = write_jsonl(tmp_path / "held.jsonl", wiki_docs(2, start=40))
    rc, _, err = run_cli(["eval", "--checkpoint", run, "--db", built_db.path, "--data", held, "--out",
                          tmp_path / "eval", "-q", "near_dup_threshold=0"], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"]
    assert summary["retro"]["bpb"] != summary["retro_no_retrieval"]["bpb"]


@pytest.mark.parametrize("arch", ["qwen3", "granite"])
def test_encoder_base_refuses_attention_it_would_read_wrongly(arch, tmp_path):
    """encoder=base recomputes each layer's attention as plain Llama attention: a base that normalises queries and
    keys per head (Qwen3) or scales them otherwise (Granite) is refused, not read wrongly without a word."""
    from transformers import GraniteConfig, GraniteForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    hf = (Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16)) if arch == "qwen3"
          else GraniteForCausalLM(GraniteConfig(**common, attention_multiplier=0.5)))
    hf.save_pretrained(tmp_path / arch)
    want = "q_norm" if arch == "qwen3" else "attention scaling 0.5"
    with pytest.raises(RetrolmError, match=rf"encoder=base reproduces plain Llama attention; layer \d+ has .*{want}"):
        RetrofitModel.from_base(str(tmp_path / arch), chunk_len=8, seq_len=64, encoder="base")
    RetrofitModel.from_base(str(tmp_path / arch), chunk_len=8, seq_len=64, encoder="retro")  # its own encoder reads


def test_encoder_base_refuses_a_sliding_window_shorter_than_its_sequences(tmp_path):
    """Mistral attends over a window: encoder=base, which reads the whole context, is refused past it."""
    from transformers import MistralConfig, MistralForCausalLM

    hf = MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          sliding_window=32))
    hf.save_pretrained(tmp_path / "mistral")
    with pytest.raises(RetrolmError, match=r"sliding window of 32 tokens .* use seq_len <= 32 \(asked 64\)"):
        RetrofitModel.from_base(str(tmp_path / "mistral"), chunk_len=8, seq_len=64, encoder="base")
    RetrofitModel.from_base(str(tmp_path / "mistral"), chunk_len=8, seq_len=32, encoder="base")


@pytest.mark.parametrize("encoder", ["retro", "base"])
def test_a_bf16_base_reads_its_neighbours_in_bf16(encoder, tiny_base, built_db):
    """``from_base(dtype=bfloat16)`` built the new modules in fp32 under a bf16 base: every forward with neighbours
    was a dtype error."""
    torch.manual_seed(1)
    kw = NEW if encoder == "retro" else {}
    model = RetrofitModel.from_base(str(tiny_base), dtype=torch.bfloat16, chunk_len=M, seq_len=T, encoder=encoder,
                                    **kw)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    perturb(model)  # the readers read something
    idx, nb = inputs(built_db.tokenizer.vocab_size)
    with torch.no_grad():
        on, off = model(idx, nb).logits, model(idx).logits
    assert on.dtype == torch.bfloat16 and torch.isfinite(on).all() and not torch.equal(on, off)


@pytest.mark.parametrize("encoder", ["retro", "base"])
def test_no_neighbour_per_chunk_reads_as_no_retrieval(encoder, tiny_base, built_db):
    """Neighbours of shape (B, C, 0, R) (nothing found for any chunk) mean no retrieval; they were a
    ZeroDivisionError in einops (RETRO and encoder=retro) or a reshape error in the base (encoder=base)."""
    model = retrofit(tiny_base) if encoder == "retro" else base_read(tiny_base)
    perturb(model)
    idx, nb = inputs(built_db.tokenizer.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, nb[:, :, :0]).logits, model(idx).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_fsdp_retrofitting_on_two_cpu_processes_is_one_process_and_resumes(mode, tiny_base, built_db, tmp_path):
    """A frozen pretrained base (or its LoRA adapters) and the new modules sharded over two processes (torchrun,
    gloo): the same steps as one process, a checkpoint of only the trained weights, and a resume that picks them up
    again."""
    args = ["-m", "retrolm.cli", "retrofit", "--base", str(tiny_base), "--db", str(built_db.path), "-q",
            f"seq_len={T}", "steps=2", "eval_every=2", "save_every=1", "eval_batches=1", "log_every=1",
            "warmup_steps=1", "tensorboard=false", "val_fraction=0.2", "lr=0.01", "cca_layers=[1,2]", "enc_n_layer=1",
            "enc_d_model=32", "enc_n_head=2", f"lora={mode == 'lora'}"]
    # PYTHONFAULTHANDLER: a rank that aborts prints every thread's stack (a rare abort at the end of the resumed run,
    # "terminate called without an active exception", has been seen under load; its stack is what would explain it)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    sharded, one = tmp_path / "fsdp", tmp_path / "one"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args, "--out", str(sharded),
                "batch_size=1", "distributed=fsdp"]
    for cmd in (torchrun, [sys.executable, *args, "--out", str(one), "batch_size=2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, _failure(proc.stderr)

    def losses(run):
        return {r["step"]: r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "train/loss" in r}

    assert list(losses(sharded).values()) == pytest.approx(list(losses(one).values()), rel=1e-5)
    ckpt = "checkpoints/step-000002"
    weights = [load_file(run / ckpt / "model.safetensors") for run in (sharded, one)]
    assert weights[0].keys() == weights[1].keys()
    assert {n.startswith("base.") for n in weights[0]} == ({True, False} if mode == "lora" else {False})
    for name, t in weights[0].items():
        assert torch.allclose(t, weights[1][name], atol=2e-5), name

    first = losses(sharded)[2]
    shutil.rmtree(sharded / ckpt)
    (sharded / "metrics.jsonl").write_text("")
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, _failure(proc.stderr)
    assert losses(sharded) == pytest.approx({2: first}, rel=1e-6)


def _failure(stderr: str) -> str:
    """What a failed torchrun said: the stacks a fault dumped (they come before the long list of extension modules
    that the last 3,000 characters were), else its end."""
    at = stderr.find("Fatal Python error")
    return stderr[at : at + 8000] if at >= 0 else stderr[-3000:]


def test_encoder_base_is_refused_under_fsdp(tiny_base, built_db, tmp_path):
    """encoder=base runs the base's layer norms and projections outside the layers' forward, where FSDP has not
    gathered their weights: one line before anything is built, not a DTensor traceback on every rank."""
    from retrolm.train.retrofit import RetrofitTrainer

    trainer = RetrofitTrainer(RetrofitConfig(base=str(tiny_base), db=str(built_db.path), out_dir=str(tmp_path),
                                             encoder="base", distributed="fsdp"))
    trainer.sharded = True  # what setup decides under torchrun with distributed=fsdp
    with pytest.raises(RetrolmError, match=r"encoder=base .* use distributed=ddp"):
        trainer.build_model()
