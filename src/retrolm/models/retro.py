"""RETRO: a decoder-only transformer with chunked cross-attention to retrieved neighbours (Borgeaud et al. 2021).

Reads top to bottom: config → building blocks → encoder → chunked cross-attention → decoder block → model.

One forward pass over ``idx`` (B, T) with ``neighbours`` (B, C, K, R), chunk length m::

    idx ─ embed ─ block 1 … block l0-1 ─┬─ block l0 … block L ─ norm ─ lm_head ─ logits (B, T, V)
                                        │ H = hidden states at the input of the first RETRO layer l0
    neighbours ─ embed ─ encoder(·, H of the chunk that retrieved them) → E (B, C, K, R, d_enc),
                 computed once and read by the chunked cross-attention (CCA) of every RETRO layer.

Causality: the neighbours of chunk u (positions [u·m, (u+1)·m)) were retrieved with chunk u's own tokens, so
only positions p ≥ (u+1)·m − 1 may see them. With the paper's m−1 shift, position p attends to the neighbours of chunk
(p+1)//m − 1: the last token of chunk u and the first m−1 tokens of chunk u+1 read chunk u's neighbours, and the first
m−1 tokens of the sequence read nothing (their CCA output is exactly 0).

Positions: RoPE everywhere. In both cross-attentions RoPE encodes *relative alignment*: neighbour token r sits at
position r and the retrieving chunk's token i at position i, so a neighbour's chunk half lines up with chunk u and its
continuation half with chunk u+1 (CCA queries sit at m−1+i, their offset from the start of chunk u). This plays the
role of the paper's relative positional encodings and makes "copy the continuation" a fixed relative offset.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from retrolm.core.errors import RetrolmError
from retrolm.models.layers import MLP, Attention, CausalSelfAttention, RMSNorm, apply_rope, padding_mask, rope_table
from retrolm.models.weights import load_weights, read_model_config, save_weights, tied_aliases

__all__ = ["PRESETS", "ChunkedCrossAttention", "ModelOutput", "NeighbourEncoder", "RetroCache", "RetroConfig",
           "RetroModel", "attending_layout", "check_neighbours", "encode_attending"]


CHECKPOINT_MODES = ("none", "encoder", "all")


def _default_retro_layers(n_layer: int) -> tuple[int, ...]:
    """The paper's every 3rd layer from layer 6; small models: every 3rd layer ending at the last, upper half only."""
    if n_layer >= 6:
        return tuple(range(6, n_layer + 1, 3))
    return tuple(range(n_layer, n_layer // 2, -3))[::-1]


def check_neighbours(batch: int, neighbours: Tensor | None, mask: Tensor | None, neighbour_len: int
                     ) -> tuple[Tensor | None, Tensor | None]:
    """Validate neighbour ids ``(B, C, K, R)`` (-1 = padding) and their optional bool mask; returns the ids with
    padding clamped to 0 and the mask of real tokens (both None without neighbours)."""
    if neighbours is None:
        if mask is not None:
            raise RetrolmError("neighbour_mask was given without neighbours")
        return None, None
    if neighbours.dim() != 4 or neighbours.shape[0] != batch or neighbours.is_floating_point():
        raise RetrolmError(
            f"neighbours must be integer ids of shape (B={batch}, C, K, R), got {tuple(neighbours.shape)}"
        )
    if neighbours.shape[3] > neighbour_len:
        raise RetrolmError(f"neighbours have {neighbours.shape[3]} tokens, more than neighbour_len={neighbour_len}")
    real = neighbours >= 0
    if mask is not None:
        if mask.shape != neighbours.shape or mask.dtype != torch.bool:
            raise RetrolmError(
                f"neighbour_mask must be bool of shape {tuple(neighbours.shape)}, "
                f"got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        real = real & mask
    if neighbours.numel() == 0:  # no chunk, no neighbour (K = 0) or no token: nothing to read, as without neighbours
        return None, None
    return neighbours.clamp_min(0), real


@dataclass
class RetroConfig:
    """Shape of a RETRO model. ``None`` fields are resolved in ``__post_init__``, so a saved config is explicit."""

    vocab_size: int = 32000
    """Number of token ids (embedding rows and logits)."""
    seq_len: int = 2048
    """Longest sequence the decoder accepts (training length; RoPE tables and KV caches are sized by it)."""
    n_layer: int = 12
    """Number of decoder layers."""
    n_head: int = 12
    """Attention heads in the decoder (self-attention and CCA)."""
    d_model: int = 768
    """Decoder width."""
    d_ff: int | None = None
    """Hidden width of the decoder MLP; None → 4·d_model."""
    dropout: float = 0.0
    """Dropout on embeddings, residual branches and attention probabilities (0 for pre-training at scale)."""
    chunk_len: int = 64
    """m: tokens per retrieval chunk; a sequence retrieves once per chunk."""
    num_neighbours: int = 2
    """k: neighbours retrieved per chunk in training (the model accepts any K at run time)."""
    neighbour_len: int | None = None
    """R: tokens per neighbour, the chunk plus its continuation; None → 2·chunk_len. Longer inputs are rejected."""
    retro_layers: tuple[int, ...] | None = None
    """1-indexed decoder layers holding chunked cross-attention; None → every 3rd from layer 6 (paper) or, below 6
    layers, every 3rd ending at the last; () → a plain decoder with no encoder and no CCA (the baseline)."""
    enc_n_layer: int = 2
    """Layers of the bidirectional neighbour encoder."""
    enc_d_model: int | None = None
    """Encoder width; None → d_model. Token embeddings are shared with the decoder and projected if it differs."""
    enc_n_head: int | None = None
    """Encoder attention heads; None → n_head."""
    enc_cross_layers: tuple[int, ...] | None = None
    """1-indexed encoder layers that cross-attend to the retrieving chunk's decoder activations (query conditioning);
    None → all encoder layers; () → an unconditioned encoder."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    bias: bool = False
    """Biases in linear layers."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    checkpoint_activations: str = "none"
    """Activation checkpointing in training (a memory/compute trade, results unchanged): none | encoder (the
    neighbour encoder, embedding lookup included, keeps only its input and output and is recomputed in the backward
    pass: its activations are K·R/m times the decoder's per layer) | all (the encoder and every decoder block)."""

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise RetrolmError(f"RetroConfig: {msg}")

        self.d_ff = 4 * self.d_model if self.d_ff is None else self.d_ff
        self.neighbour_len = 2 * self.chunk_len if self.neighbour_len is None else self.neighbour_len
        self.enc_d_model = self.d_model if self.enc_d_model is None else self.enc_d_model
        self.enc_n_head = self.n_head if self.enc_n_head is None else self.enc_n_head
        positive = ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "d_ff", "chunk_len", "num_neighbours")
        for name in (*positive, "neighbour_len", "enc_d_model", "enc_n_head"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        check(
            isinstance(self.enc_n_layer, int) and self.enc_n_layer >= 0,
            f"enc_n_layer must be >= 0, got {self.enc_n_layer!r}",
        )
        for d, h, prefix in ((self.d_model, self.n_head, ""), (self.enc_d_model, self.enc_n_head, "enc_")):
            # RoPE rotates feature pairs, so each head needs an even width.
            check(
                d % h == 0 and (d // h) % 2 == 0,
                f"{prefix}d_model={d} must split into {prefix}n_head={h} heads of even width",
            )
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.rope_theta > 0 and self.norm_eps > 0, "rope_theta and norm_eps must be positive")
        check(
            self.checkpoint_activations in CHECKPOINT_MODES,
            f"checkpoint_activations must be one of {', '.join(CHECKPOINT_MODES)}, got {self.checkpoint_activations!r}",
        )

        if self.retro_layers is None:
            self.retro_layers = _default_retro_layers(self.n_layer)
        self.retro_layers = tuple(self.retro_layers)
        check(
            list(self.retro_layers) == sorted(set(self.retro_layers))
            and all(1 <= i <= self.n_layer for i in self.retro_layers),
            f"retro_layers={self.retro_layers} must be increasing, 1-indexed layers within 1..n_layer={self.n_layer}",
        )
        if self.enc_cross_layers is None:
            self.enc_cross_layers = tuple(range(1, self.enc_n_layer + 1))
        self.enc_cross_layers = tuple(self.enc_cross_layers)
        check(
            all(1 <= i <= self.enc_n_layer for i in self.enc_cross_layers)
            and len(set(self.enc_cross_layers)) == len(self.enc_cross_layers),
            f"enc_cross_layers={self.enc_cross_layers} must be distinct layers in 1..enc_n_layer={self.enc_n_layer}",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-friendly dict (tuples become lists); ``from_dict(to_dict())`` round-trips."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetroConfig:
        """Build from ``to_dict`` output (e.g. a checkpoint's config.yaml); unknown keys are an error, not ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RetrolmError(f"RetroConfig: unknown field(s) {unknown}; known fields: {sorted(names)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RetroConfig:
        """A named shape from ``PRESETS`` (tiny, 25m, 100m, 150m), with field overrides, e.g. ``vocab_size=…``."""
        if name not in PRESETS:
            raise RetrolmError(f"RetroConfig: unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # CPU debugging: one RETRO layer (the last), 16-token chunks. Pass vocab_size=… for a real tokenizer.
    "tiny": dict(vocab_size=512, seq_len=256, n_layer=4, n_head=4, d_model=64, chunk_len=16, enc_n_layer=2),
    "25m": dict(n_layer=6, n_head=6, d_model=384),  # retro_layers (6,)
    "100m": dict(n_layer=12, n_head=10, d_model=640),  # retro_layers (6, 9, 12)
    "150m": dict(
        n_layer=12, n_head=12, d_model=768, retro_layers=(6, 9, 12)
    ),  # the paper's layout at GPT-2-small width
}


@dataclass
class ModelOutput:
    """What ``RetroModel.forward`` returns."""

    logits: Tensor
    """(B, T, vocab_size) next-token logits."""
    loss: Tensor | None = None
    """Mean cross-entropy over targets != -100, or None when no targets were given."""


# ---------------------------------------------------------------------------------------------------------------------
# Neighbour encoder


class EncoderLayer(nn.Module):
    """Bidirectional self-attention over one neighbour, [cross-attention to the retrieving chunk's activations], MLP."""

    def __init__(self, cfg: RetroConfig, cross: bool) -> None:
        super().__init__()
        de, h = cfg.enc_d_model, cfg.enc_n_head
        self.norm1 = RMSNorm(de, cfg.norm_eps)
        self.attn = Attention(de, h, bias=cfg.bias, dropout=cfg.dropout)
        self.norm_cross = RMSNorm(de, cfg.norm_eps) if cross else None
        self.cross = Attention(de, h, bias=cfg.bias, dropout=cfg.dropout, d_ctx=cfg.d_model) if cross else None
        self.norm2 = RMSNorm(de, cfg.norm_eps)
        self.mlp = MLP(de, 4 * de, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, self_mask: Tensor, cond: Tensor, rope_r: Tensor, rope_m: Tensor, k: int,
                cond_mask: Tensor | None = None) -> Tensor:
        """x (B·C·K, R, de); self_mask (B·C·K, 1, 1, R); cond (B·C, m, d) normalised chunk activations; cond_mask
        (B·C, 1, 1, m) or None: the chunk positions the neighbour may read (None: all)."""
        q, kk, v = self.attn.heads(self.norm1(x))
        x = x + self.drop(self.attn.attend(apply_rope(q, rope_r), apply_rope(kk, rope_r), v, attn_mask=self_mask))
        if self.cross is not None:
            # The K neighbours of a chunk query the same m activations: fold K into the query length, not the batch.
            h = rearrange(self.norm_cross(x), "(n k) r d -> n (k r) d", k=k)
            q, kk, v = self.cross.heads(h, cond)  # q (B·C, H, K·R, e), kk and v (B·C, H, m, e)
            y = self.cross.attend(apply_rope(q, rope_r.repeat(1, k, 1)), apply_rope(kk, rope_m), v, attn_mask=cond_mask)
            x = x + self.drop(rearrange(y, "n (k r) d -> (n k) r d", k=k))
        return x + self.drop(self.mlp(self.norm2(x)))


class NeighbourEncoder(nn.Module):
    """Encodes every neighbour independently, batched over (B·C·K), conditioned on the chunk that retrieved it."""

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        de = cfg.enc_d_model
        self.proj_in = nn.Linear(cfg.d_model, de, bias=cfg.bias) if de != cfg.d_model else nn.Identity()
        self.cond_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg, cross=i + 1 in cfg.enc_cross_layers) for i in range(cfg.enc_n_layer)
        )
        self.norm = RMSNorm(de, cfg.norm_eps)
        n_pos = max(cfg.neighbour_len, cfg.chunk_len)
        self.register_buffer("rope", rope_table(n_pos, de // cfg.enc_n_head, cfg.rope_theta), persistent=False)

    def forward(self, emb: Tensor, mask: Tensor, chunk_hidden: Tensor, chunk_mask: Tensor | None = None) -> Tensor:
        """emb (B, C, K, R, d) neighbour token embeddings; mask (B, C, K, R) True = real token;
        chunk_hidden (B, C, m, d) decoder activations of the retrieving chunks; chunk_mask (B, C, m) or None: False =
        a padding position of the retrieving chunk, which the neighbours do not read → (B, C, K, R, d_enc)."""
        B, C, K, R, _ = emb.shape
        x = rearrange(self.proj_in(emb), "b c k r d -> (b c k) r d")
        self_mask, _ = padding_mask(rearrange(mask, "b c k r -> (b c k) r"))  # all-padding neighbours: junk, never read
        cond = self.cond_norm(rearrange(chunk_hidden, "b c m d -> (b c) m d"))
        cond_mask = None if chunk_mask is None else padding_mask(rearrange(chunk_mask, "b c m -> (b c) m"))[0]
        rope_r, rope_m = self.rope[:, :R], self.rope[:, : chunk_hidden.shape[2]]
        for layer in self.layers:
            x = layer(x, self_mask, cond, rope_r, rope_m, K, cond_mask)
        return rearrange(self.norm(x), "(b c k) r d -> b c k r d", b=B, c=C)


# ---------------------------------------------------------------------------------------------------------------------
# Chunked cross-attention


def attending_layout(start: int, T: int, m: int, N: int, what: str) -> tuple[int, int, int]:
    """How positions [start, start+T) fold into the N attending chunks they read (chunk j holds positions
    j·m + m−1 … j·m + 2m−2): (skip, lead, tail) = the leading positions p < m−1 that read nothing, the offset of the
    first reading position inside its attending chunk, and the padding after the last one. ValueError (naming
    ``what``) unless the N chunks are exactly those the positions read."""
    skip = min(T, max(0, m - 1 - start))
    lead = (start + skip + 1) % m
    tail = N * m - lead - (T - skip)
    if not 0 <= tail < m or (N == 0) != (skip == T):
        raise ValueError(f"{what} got {N} neighbour chunks for positions [{start}, {start + T}) with chunk_len {m}")
    return skip, lead, tail


class ChunkedCrossAttention(nn.Module):
    """CCA: each decoder position attends to all K·R tokens of the encoded neighbours of one chunk, exactly causally.

    Position p reads the neighbours of chunk j(p) = (p+1)//m − 1 (none when j(p) < 0). Batched with the paper's shift:
    drop the positions with j(p) < 0, pad to whole chunks, fold the "attending chunks" [j·m + m−1, (j+1)·m + m−1) into
    the batch and attend each to its own neighbours; no loop over chunks and no (T × C·K·R) mask.
    """

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        self.m = cfg.chunk_len
        self.attn = Attention(cfg.d_model, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout, d_ctx=cfg.enc_d_model)
        n_pos = max(2 * cfg.chunk_len, cfg.neighbour_len)
        self.register_buffer("rope", rope_table(n_pos, cfg.d_model // cfg.n_head, cfg.rope_theta), persistent=False)

    def project_kv(self, enc: Tensor) -> tuple[Tensor, Tensor]:
        """enc (B, N, K, R, d_enc) → keys (with RoPE) and values (B·N, H, K·R, e) of each attending chunk's neighbours.

        Depends only on the encoded neighbours, so incremental decoding computes it once per chunk (``RetroCache``).
        """
        K, R = enc.shape[2:4]
        k, v = self.attn.keys_values(rearrange(enc, "b n k r d -> (b n) (k r) d"))
        # neighbour token r sits at position r (chunk half at 0..m−1, continuation at m..2m−1)
        return apply_rope(k, self.rope[:, :R].repeat(1, K, 1)), v

    def forward(
        self, x: Tensor, enc: Tensor, enc_mask: Tensor, start: int = 0, kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Cross-attend positions [start, start+T) to the neighbours of the chunks they may see.

        Args:
            x: (B, T, d) normalised decoder hidden states.
            enc: (B, N, K, R, d_enc) encoded neighbours of attending chunks j0 … j0+N−1, where j0 = j(max(start, m−1))
                and j0+N−1 = j(start+T−1); a chunk without neighbours has an all-False mask.
            enc_mask: (B, N, K, R) True = real neighbour token.
            kv: ``project_kv(enc)`` if already computed (incremental decoding reuses it for a whole chunk).

        Returns:
            (B, T, d), exactly 0 at positions with no real neighbour token to read.
        """
        B, T, _ = x.shape
        m, N = self.m, enc.shape[1]
        skip, lead, tail = attending_layout(start, T, m, N, "CCA")
        if N == 0:
            return torch.zeros_like(x)
        k, v = self.project_kv(enc) if kv is None else kv  # (B·N, H, K·R, e)
        # Relative alignment: query i of an attending chunk is m−1+i tokens after the start of the retrieving chunk.
        if N == 1:  # one attending chunk (e.g. decoding): its positions are the queries, no padding to a whole chunk
            q = apply_rope(self.attn.queries(x[:, skip:]), self.rope[:, m - 1 + lead : m - 1 + lead + T - skip])
        else:  # fold the attending chunks into the batch
            xq = rearrange(F.pad(x[:, skip:], (0, 0, lead, tail)), "b (n m) d -> (b n) m d", m=m)
            q = apply_rope(self.attn.queries(xq), self.rope[:, m - 1 : 2 * m - 1])  # (B·N, H, m, e)
        mask, empty = padding_mask(rearrange(enc_mask, "b n k r -> (b n) (k r)"))
        y = self.attn.attend(q, k, v, attn_mask=mask)  # (B·N, m or T−skip, d)
        y = torch.where(rearrange(empty, "n -> n 1 1"), 0.0, y)  # no neighbours → exactly 0, finite gradients
        if N > 1:
            y = rearrange(y, "(b n) m d -> b (n m) d", b=B)[:, lead : lead + T - skip]
        return F.pad(y, (0, 0, skip, 0))  # un-shift: (B, T, d)


# ---------------------------------------------------------------------------------------------------------------------
# Decoder and model


class DecoderBlock(nn.Module):
    """Pre-norm block: self-attention → [chunked cross-attention, in RETRO layers] → MLP, each residual."""

    def __init__(self, cfg: RetroConfig, retro: bool) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1 = RMSNorm(d, cfg.norm_eps)
        self.attn = CausalSelfAttention(d, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout)
        self.norm_cca = RMSNorm(d, cfg.norm_eps) if retro else None
        self.cca = ChunkedCrossAttention(cfg) if retro else None
        self.norm2 = RMSNorm(d, cfg.norm_eps)
        self.mlp = MLP(d, cfg.d_ff, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope: Tensor,
        start: int = 0,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        retrieved: tuple[Tensor, Tensor] | None = None,
        cca_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, start, kv_cache))
        if self.cca is not None and retrieved is not None:  # retrieval off → skipped: exactly the plain decoder
            x = x + self.drop(self.cca(self.norm_cca(x), *retrieved, start=start, kv=cca_kv))
        return x + self.drop(self.mlp(self.norm2(x)))


@contextmanager
def updating(cache: Any) -> Iterator[None]:
    """Around the part of a forward pass that writes a decoding cache (any state with a ``failed`` flag; None: no
    cache): a call that raises there leaves the cache holding part of its tokens, so the cache is marked failed and
    refused from then on, instead of giving wrong logits later."""
    if cache is None:
        yield
        return
    if cache.failed:
        raise RetrolmError("this decoding cache was left half-updated by a call that failed; start a new one "
                           "(init_cache)")
    try:
        yield
    except BaseException:
        cache.failed = True
        raise


@dataclass
class RetroCache:
    """Incremental-decoding state; create with ``RetroModel.init_cache`` and pass to ``forward(..., cache=cache)``."""

    k: Tensor
    """(n_layer, B, n_head, max_len, head_dim) self-attention keys (after RoPE)."""
    v: Tensor
    """(n_layer, B, n_head, max_len, head_dim) self-attention values."""
    chunk_hidden: Tensor
    """(B, m, d) hidden states at the first RETRO layer's input of the chunk being completed (rows < pos % m valid);
    they condition the encoder when that chunk's neighbours arrive."""
    pos: int = 0
    """Number of tokens consumed so far (the position of the next token)."""
    enc: Tensor | None = None
    """(B, K, R, d_enc) encoded neighbours of the most recent complete chunk, None if it had none."""
    enc_mask: Tensor | None = None
    """(B, K, R) mask of ``enc``."""
    cca_kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Per RETRO layer, the CCA keys and values of ``enc``: projected once, read by every token of the next chunk."""
    failed: bool = False
    """Set when a call failed while updating this cache, which is then refused (:func:`updating`)."""

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class RetroModel(nn.Module):
    """RETRO decoder + neighbour encoder. ``RetroConfig(retro_layers=())`` gives the plain-decoder baseline.

    Generation with retrieval (chunk indices are absolute; ``retrieve`` maps (B, m) chunk tokens → (B, K, R) ids)::

        cache = model.init_cache(B)
        logits = model(prompt, nbrs, cache=cache).logits  # nbrs (B, P // m, K, R): the prompt's whole chunks
        for _ in range(n_new):
            tok = sample(logits[:, -1])  # (B, 1), to be fed at position cache.pos
            seq = torch.cat([seq, tok], 1)
            if (cache.pos + 1) % m == 0:  # tok completes chunk u: retrieve before feeding it
                u = cache.pos // m
                nbrs = torch.cat([nbrs, retrieve(seq[:, u * m :])[:, None]], 1)
            logits = model(tok, nbrs, cache=cache).logits
    """

    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, retro=i + 1 in cfg.retro_layers) for i in range(cfg.n_layer))
        self.encoder = NeighbourEncoder(cfg) if cfg.retro_layers else None
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.first_retro = cfg.retro_layers[0] - 1 if cfg.retro_layers else -1  # 0-indexed; the encoder runs here
        self.register_buffer(
            "rope", rope_table(cfg.seq_len, cfg.d_model // cfg.n_head, cfg.rope_theta), persistent=False
        )
        # GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2·n_layer). The CCA output projection is
        # not zero-initialised: RETRO-fitting a frozen decoder may want that (the model then starts exactly at the
        # baseline), but only CCA.proj would get a gradient on the first step.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    # ---- saving and loading
    def save_pretrained(self, folder: str | Path, state: Mapping[str, Tensor] | None = None) -> None:
        """Write ``model.safetensors`` and ``model.json`` (the config) into ``folder``, atomically per file. ``state``:
        the full tensors by name to write instead of the model's own (a model sharded over processes gathers them)."""
        config = {"architecture": "retro", **self.config.to_dict()}
        if state is None:
            save_weights(self, folder, config)
        else:
            save_weights(self, folder, config, {n: state[n] for n in sorted(self.saved_names())})

    def saved_names(self) -> set[str]:
        """The state-dict names :meth:`save_pretrained` writes: every tensor, a tied one once (under the name
        safetensors keeps for it)."""
        return set(self.state_dict()) - set(tied_aliases(self))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> RetroModel:
        """Load a model written by :meth:`save_pretrained` (a checkpoint folder), in eval mode on ``device``."""
        folder = Path(folder)
        config = read_model_config(folder)
        config.pop("architecture", None)
        model = cls(RetroConfig.from_dict(config))
        load_weights(model, folder, device)
        return model.to(device).eval()

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied embeddings counted once); ``non_embedding`` leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def init_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> RetroCache:
        """Empty decoding state for ``batch_size`` sequences of up to ``max_len`` (default seq_len) tokens.

        ``dtype`` defaults to the parameters' dtype; the activation dtype (bf16 under autocast) halves the memory.
        """
        cfg = self.config
        max_len = cfg.seq_len if max_len is None else max_len
        if not 0 < max_len <= cfg.seq_len:
            raise RetrolmError(f"init_cache: max_len={max_len} must be in 1..seq_len={cfg.seq_len}")
        p = self.wte.weight
        device, dtype = device or p.device, dtype or p.dtype
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.d_model // cfg.n_head)
        return RetroCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            chunk_hidden=torch.zeros(batch_size, cfg.chunk_len, cfg.d_model, device=device, dtype=dtype),
        )

    def forward(
        self,
        idx: Tensor,
        neighbours: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
        targets: Tensor | None = None,
        cache: RetroCache | None = None,
    ) -> ModelOutput:
        """Next-token logits for ``idx`` (B, T), reading retrieved ``neighbours`` where causality allows.

        Args:
            idx: (B, T) token ids; with a ``cache`` they continue the cached sequence at position ``cache.pos``.
            neighbours: (B, C, K, R) token ids; ``neighbours[:, u]`` are the K neighbours retrieved with chunk u
                (positions [u·m, (u+1)·m)), each a chunk plus its continuation. Chunks u ≥ C have no neighbours; ids < 0
                are padding. None → retrieval off: the output is exactly that of the plain decoder.
            neighbour_mask: (B, C, K, R) bool, True = real token (default: ``neighbours >= 0``). A chunk whose mask is
                all False behaves exactly as a chunk without neighbours.
            targets: (B, T) next-token ids for the loss; -100 is ignored.
            cache: incremental decoding (``init_cache``). Chunk indices stay absolute: pass the same growing
                ``neighbours`` tensor as for a full forward. Chunk u's neighbours are read (and encoded, conditioned on
                the cached activations of chunk u) in the call that feeds chunk u's last token, position (u+1)·m − 1 —
                so retrieve with chunk u's tokens once they are all known, before feeding its last one. Chunks that do
                not complete in this call are ignored. Feeding a sequence in any pieces gives the full-forward logits.
        """
        cfg = self.config
        if idx.dim() != 2:
            raise RetrolmError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        limit = cfg.seq_len if cache is None else cache.max_len
        if T == 0 or start + T > limit:
            raise RetrolmError(f"sequence positions [{start}, {start + T}) exceed the model/cache length {limit}")
        neighbours, neighbour_mask = self._check_neighbours(B, neighbours, neighbour_mask)

        with updating(cache):
            x = self.drop(self.wte(idx))  # (B, T, d)
            rope = self.rope[:, start : start + T]
            retrieved, cached_enc = None, False
            for i, block in enumerate(self.blocks):
                if i == self.first_retro:
                    retrieved, cached_enc = self._encode_neighbours(x, neighbours, neighbour_mask, start, cache)
                kv = None if cache is None else (cache.k[i], cache.v[i])
                cca_kv = None
                if cached_enc and block.cca is not None:  # only the cached chunk is read: reuse its projected K/V
                    assert cache is not None and retrieved is not None
                    if i not in cache.cca_kv:
                        cache.cca_kv[i] = block.cca.project_kv(retrieved[0])
                    cca_kv = cache.cca_kv[i]
                if self._checkpointing("all") and cache is None:
                    x = checkpoint(block, x, rope, start, kv, retrieved, cca_kv, use_reentrant=False)
                else:
                    x = block(x, rope, start, kv, retrieved, cca_kv)
            if cache is not None:
                cache.pos += T
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss)

    def _checkpointing(self, part: str) -> bool:
        """Whether ``part`` (encoder | all) is checkpointed now: in training, with gradients, when the config asks."""
        mode = self.config.checkpoint_activations
        wanted = mode == "all" or (mode == "encoder" and part == "encoder")
        return wanted and self.training and torch.is_grad_enabled()

    def _embed_and_encode(self, nb: Tensor, nm: Tensor, chunk_h: Tensor) -> Tensor:
        assert self.encoder is not None
        return self.encoder(self.wte(nb), nm, chunk_h)

    def _check_neighbours(
        self, batch: int, neighbours: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        if neighbours is not None and self.encoder is None:
            raise RetrolmError("neighbours were given to a model without RETRO layers (config.retro_layers is empty)")
        return check_neighbours(batch, neighbours, mask, self.config.neighbour_len)

    def _encode_neighbours(
        self, h: Tensor, neighbours: Tensor | None, mask: Tensor | None, start: int, cache: RetroCache | None
    ) -> tuple[tuple[Tensor, Tensor] | None, bool]:
        """At the first RETRO layer: the encoded neighbours the CCA layers read (:func:`encode_attending`)."""

        def encode(nb: Tensor, nm: Tensor, chunk_h: Tensor | None) -> Tensor:
            if self._checkpointing("encoder"):
                return checkpoint(self._embed_and_encode, nb, nm, chunk_h, use_reentrant=False)
            return self._embed_and_encode(nb, nm, chunk_h)

        return encode_attending(neighbours, mask, start, h.shape[1], self.config.chunk_len, cache, encode, h)


def encode_attending(
    neighbours: Tensor | None,
    mask: Tensor | None,
    start: int,
    T: int,
    m: int,
    cache: Any,
    encode: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    h: Tensor | None = None,
) -> tuple[tuple[Tensor, Tensor] | None, bool]:
    """Encode the neighbours of the chunks that complete at positions [start, start+T) and gather the encoded
    neighbours of every attending chunk those positions read (RETRO's chunked causality, incremental decoding).

    ``encode(nb (B, n, K, R), mask, chunk_h (B, n, m, d) or None) → (B, n, K, R, …)``; ``h`` (B, T, d) are the
    positions' activations that condition the encoder (None: the encoding depends on the neighbours alone).
    ``cache`` (None for a full forward at start 0) is any decoding state with ``chunk_hidden`` (B, m, d; used only
    with ``h``), ``enc``, ``enc_mask`` (the most recent complete chunk's encoding) and ``cca_kv`` (keys/values
    projected from it, reset here when a chunk completes). Returns ((enc (B, N, K, R, …), mask (B, N, K, R)) for the
    attending chunks j(max(start, m−1)) … j(start+T−1), or None when none reads anything, and whether that is
    exactly the cache's chunk).
    """
    cs, ce = start // m, (start + T) // m  # chunks cs..ce-1 complete within this call
    if cache is not None and h is not None:  # prepend chunk cs's rows from earlier calls; keep the rest for later
        h = torch.cat([cache.chunk_hidden[:, : start - cs * m].type_as(h), h], dim=1)  # positions [cs·m, start+T)
        rest = h[:, (ce - cs) * m :]
        cache.chunk_hidden[:, : rest.shape[1]] = rest
    n_new = 0 if neighbours is None else max(0, min(ce, neighbours.shape[1]) - cs)
    new = None
    if n_new > 0:
        assert neighbours is not None and mask is not None
        nb, nm = neighbours[:, cs : cs + n_new], mask[:, cs : cs + n_new]
        chunk_h = None if h is None else rearrange(h[:, : n_new * m], "b (c m) d -> b c m d", m=m)
        new = (encode(nb, nm, chunk_h), nm)  # (B, n_new, K, R, …)
    j0 = max(start + 1, m) // m - 1  # chunk read by the first reading position: cs − 1 (from the cache) or cs
    prev = None
    if j0 == cs - 1 and cache is not None and cache.enc is not None:
        prev = (cache.enc[:, None], cache.enc_mask[:, None])
    if cache is not None and ce > cs:
        cache.enc, cache.enc_mask = (new[0][:, -1], new[1][:, -1]) if new is not None and n_new == ce - cs else (
            None, None)
        cache.cca_kv = {}
    if new is None and prev is None:
        return None, False
    if prev is not None and new is None and ce == cs:  # only the cached chunk is read
        return prev, True

    ref_enc, ref_mask = new if new is not None else prev
    B = ref_enc.shape[0]

    def blank(n: int) -> tuple[Tensor, Tensor]:  # chunks without neighbours: fully masked → CCA output 0
        return ref_enc.new_zeros(B, n, *ref_enc.shape[2:]), ref_mask.new_zeros(B, n, *ref_mask.shape[2:])

    parts = [prev if prev is not None else blank(1)] if j0 == cs - 1 else []
    parts += [new] if new is not None else []
    if ce - cs - n_new > 0:
        parts.append(blank(ce - cs - n_new))
    return (torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)), False
