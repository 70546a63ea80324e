"""Activation checkpointing in RETRO: same loss and gradients, fewer saved activations, training only."""

from __future__ import annotations

import math

import pytest
import torch

import retrolm.models.retro as retro
from conftest import tiny_retro_config
from retrolm.core.errors import RetrolmError
from retrolm.models.retro import RetroConfig, RetroModel

V, M, K, R, T = 97, 8, 2, 16, 44


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> RetroConfig:
    return tiny_retro_config(**{"vocab_size": V, "chunk_len": M, **overrides})


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (2, T), generator=g)
    targets = torch.randint(0, V, (2, T), generator=g)
    targets[0, :3] = -100
    neighbours = torch.randint(0, V, (2, math.ceil(T / M), K, R), generator=g)
    neighbours[0, 1, 1, 10:] = -1
    neighbours[1, 3, 0] = -1
    return idx, neighbours, targets


def run(mode: str, data, dropout: float = 0.0, seed: int = 0) -> tuple[float, dict[str, torch.Tensor], int, int]:
    """Loss, parameter gradients, numel of the tensors autograd saved outside checkpoints, and checkpoint calls."""
    torch.manual_seed(0)
    model = RetroModel(tiny_config(checkpoint_activations=mode, dropout=dropout)).train()
    idx, neighbours, targets = data
    saved = [0]

    def pack(t):
        saved[0] += t.numel()
        return t

    calls = [0]
    real = retro.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        assert kwargs.get("use_reentrant") is False
        return real(*args, **kwargs)

    retro.checkpoint = counting
    try:
        torch.manual_seed(seed)  # dropout masks: checkpointing replays the same RNG state
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(idx, neighbours, targets=targets).loss
        loss.backward()
    finally:
        retro.checkpoint = real
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == len(list(model.parameters()))  # every parameter gets a gradient
    return loss.item(), grads, saved[0], calls[0]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_changes_neither_loss_nor_gradients(data, dropout):
    loss0, grads0, saved0, calls0 = run("none", data, dropout)
    assert calls0 == 0
    for mode, want_calls in (("encoder", 1), ("all", 1 + 3)):
        loss, grads, saved, calls = run(mode, data, dropout)
        assert calls == want_calls, mode
        assert loss == pytest.approx(loss0, rel=1e-6, abs=1e-6), mode
        assert grads.keys() == grads0.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, grads0[name], rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")
        assert saved < saved0, mode  # fewer activations kept for the backward pass
    _, _, saved_enc, _ = run("encoder", data, dropout)
    _, _, saved_all, _ = run("all", data, dropout)
    assert saved_all < saved_enc


def test_no_checkpointing_in_eval_or_without_gradients(data):
    torch.manual_seed(0)
    model = RetroModel(tiny_config(checkpoint_activations="all"))
    idx, neighbours, _ = data
    calls = [0]
    real = retro.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    retro.checkpoint = counting
    try:
        model.eval()
        out_eval = model(idx, neighbours).logits
        model.train()
        with torch.no_grad():
            out_nograd = model(idx, neighbours).logits
        cache = model.init_cache(2)
        with torch.no_grad():
            model(idx[:, :20], neighbours, cache=cache)
    finally:
        retro.checkpoint = real
    assert calls[0] == 0
    torch.testing.assert_close(out_eval, out_nograd)


def test_flag_is_checked_and_round_trips(tmp_path):
    with pytest.raises(RetrolmError, match="checkpoint_activations must be one of none, encoder, all, got 'decoder'"):
        tiny_config(checkpoint_activations="decoder")
    cfg = tiny_config(checkpoint_activations="encoder")
    assert cfg.to_dict()["checkpoint_activations"] == "encoder"
    assert RetroConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    model = RetroModel(cfg)
    model.save_pretrained(tmp_path / "m")
    loaded = RetroModel.from_pretrained(tmp_path / "m")
    assert loaded.config.checkpoint_activations == "encoder" and loaded.config == cfg
    old = cfg.to_dict()
    del old["checkpoint_activations"]  # a config saved before the flag existed
    assert RetroConfig.from_dict(old).checkpoint_activations == "none"
