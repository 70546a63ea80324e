"""RETRO-fitting: a frozen pretrained Hugging Face causal LM plus RETRO's neighbour encoder and chunked cross-attention.

The RETRO paper (Borgeaud et al. 2021, "Retrofitting baseline models") freezes a trained transformer, adds the
neighbour encoder and chunked cross-attention (CCA) layers, and trains only those. :class:`RetrofitModel` does that for
any Llama-style (``model.model.layers``) or GPT-2-style (``model.transformer.h``) ``AutoModelForCausalLM`` — the
decoder layer list is found generically — without re-implementing any of its internals: the new modules are attached
with forward hooks on the HF decoder layers::

    idx ─ HF embeddings ─ layer 1 … ─┬─ layer l0 ─ hook: h += CCA_l0(norm(h), E) ─ … ─ layer l1 ─ hook … ─ logits
                                     │ pre-hook on l0: H = its input hidden states
    neighbours ─ HF embeddings (frozen) ─ NeighbourEncoder(·, H of the retrieving chunk) → E (B, C, K, R, d_enc)

* A **pre-hook** on the first CCA layer captures its input hidden states and encodes the neighbours conditioned on
  them, as RETRO does. A **forward hook** on each CCA layer adds ``CCA(norm(h), E)`` to the layer's output hidden
  state (a tensor, or the first element of a tuple for older ``transformers``). The building blocks are RETRO's own
  (:class:`~retrolm.models.retro.NeighbourEncoder`, :class:`~retrolm.models.retro.ChunkedCrossAttention`), so the
  causality (position p reads the neighbours of chunk (p+1)//m − 1) is exactly RETRO's.
* **At initialisation the logits equal the base model's**, bit for bit: each CCA's output projection is zero, so the
  hooks add exact zeros. Its input projections and the encoder are random (std 0.02), so on the first step the output
  projection gets a gradient (the CCA output is not zero before the projection) and from the second step on, every new
  weight does (a zero *gate* in front of a zero projection would starve both). This is the LoRA recipe (B = 0, A
  random), which trains with the usual learning rates.
* The **base is frozen** by default (``requires_grad=False`` and kept in eval mode, so no dropout): retrieval off, the
  hooks do nothing and the output is exactly the base model's, even after training. ``unfreeze=True`` trains every
  base weight too; ``lora=True`` adds LoRA adapters (``peft``) to the base's attention projections and trains those.
* **Checkpoints** (:meth:`RetrofitModel.save_pretrained`) hold only the new weights (plus the LoRA adapters, or the
  whole base when unfrozen) and ``model.json`` names the base and the SHA-256 fingerprint of its weight files;
  :meth:`RetrofitModel.from_pretrained` reloads the base by name and refuses one whose fingerprint differs.

``encoder="base"`` reads the neighbours with the base itself, for a base that already copies from its context (a
pretrained LM does; a small model trained on a few million tokens does not): the base runs over each neighbour alone,
and a forward hook on every chosen layer's self-attention adds what that attention would have read from the neighbour
— through a trained copy of the layer's own query/key/value/output projections, with one softmax over the context
and the neighbour (the two log-sum-exps give the neighbour's share), the neighbour sitting right before the chunk it
continues. Built, the model reads a neighbour as the base reads text in its context, with RETRO's chunked causality
and without the passage in the context window; fitting starts from there instead of from a zero cross-attention.

The model has :class:`~retrolm.models.retro.RetroModel`'s interface (``forward(idx, neighbours, neighbour_mask,
targets, cache)``, ``config.retro_layers / chunk_len / seq_len / num_neighbours / neighbour_len``, ``init_cache``,
``wte``), so the trainer, the bits-per-byte scorer, ``retrolm eval`` and ``retrolm generate`` use it unchanged. One
addition: ``forward(…, attention_mask=)`` (``reads_token_mask``), through which the trainer and the scorer keep the
padding after a document's last chunk out of the base's attention — a pretrained base never saw runs of padding in
its context, and they cost it most of what it reads in the next chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import resolve_model, weights_fingerprint
from retrolm.models.hf import kv_cache_arg, load_hf_causal_lm
from retrolm.models.layers import Attention, RMSNorm, apply_rope, rope_table
from retrolm.models.retro import (
    ChunkedCrossAttention,
    ModelOutput,
    NeighbourEncoder,
    RetroConfig,
    attending_layout,
    check_neighbours,
    encode_attending,
    updating,
)
from retrolm.models.weights import load_weights, read_model_config, save_weights

__all__ = ["RetrofitCache", "RetrofitModel", "RetrofitModelConfig", "default_cca_layers", "find_decoder_layers"]

logger = logging.getLogger(__name__)

BASE = "base."
"""Prefix of the base model's parameter names inside :class:`RetrofitModel`."""

ENCODERS = ("retro", "base")
"""``RetrofitModelConfig.encoder`` choices."""


def default_cca_layers(n_layer: int) -> tuple[int, ...]:
    """A few upper layers: 60%, 80% and 100% of the depth (SmolLM2-135M, 30 layers: 18, 24, 30)."""
    return tuple(sorted({min(n_layer, max(1, round(n_layer * f))) for f in (0.6, 0.8, 1.0)}))


@dataclass
class RetrofitModelConfig:
    """Shape of a RETRO-fitted model: the base it wraps (name, fingerprint, dimensions) and the new modules.

    Written to ``model.json`` (with ``architecture: retrofit``); ``None`` fields are resolved in ``__post_init__``.
    """

    base: str
    """The base model's name as resolved (hub name, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``, or absolute folder);
    ``from_pretrained`` reloads the base by it."""
    base_fingerprint: str | None
    """SHA-256 of the base's weight files (``retrolm.core.hub.weights_fingerprint``); None if it had no local folder."""
    vocab_size: int
    """The base's vocabulary size."""
    n_layer: int
    """Decoder layers of the base."""
    d_model: int
    """Hidden size of the base (the width CCA reads and writes)."""
    n_head: int
    """Attention heads of the CCA layers (default: the base's)."""
    seq_len: int = 512
    """Longest sequence the model accepts (training length; a multiple of chunk_len; at most the base's context)."""
    chunk_len: int = 64
    """m: tokens per retrieval chunk (the database's)."""
    num_neighbours: int = 2
    """k: neighbours per chunk in training."""
    neighbour_len: int | None = None
    """R: tokens per neighbour (chunk + continuation); None → 2·chunk_len."""
    retro_layers: tuple[int, ...] | None = None
    """1-indexed base layers followed by chunked cross-attention (``encoder=base``: whose self-attention also reads the
    neighbours); None → ``default_cca_layers(n_layer)`` (``encoder=base``: every layer)."""
    encoder: str = "retro"
    """How neighbours are read. ``retro``: RETRO's neighbour encoder (new, trained) and a zero-output CCA after each
    cca layer, the paper's RETRO-fitting. ``base``: the base itself encodes each neighbour, and each cca layer's
    self-attention also reads the neighbours' states at that layer, through a trained copy of its own projections
    and one softmax over context and neighbour: at step 0 the model reads a neighbour as the base would read it in
    its context, so fitting starts from the base's own copying instead of from zero (Llama-style bases)."""
    cca_query_offset: int | None = None
    """``encoder=base``: how many positions before the chunk it continues a neighbour sits (its RoPE positions are
    0 … R−1, the chunk's first token is at this offset); None → neighbour_len, right before it as in a context."""
    rope_theta: float = 10000.0
    """RoPE base of the CCA layers (``encoder=base``: the base's, so the copied attention sees its own angles)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon of the new modules (``encoder=base``: the base's)."""
    enc_n_layer: int = 2
    """Layers of the neighbour encoder (``encoder=retro``)."""
    enc_d_model: int | None = None
    """Encoder width; None → min(256, d_model); ``encoder=base``: d_model (the CCA reads the base's hidden states)."""
    enc_n_head: int | None = None
    """Encoder heads; None → enc_d_model // 64 (at least 1)."""
    dropout: float = 0.0
    """Dropout inside the new modules."""
    unfreeze: bool = False
    """Train the base's weights too (checkpoints then hold them)."""
    lora: bool = False
    """Add LoRA adapters to the base (``peft``) and train them."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: tuple[str, ...] | None = None
    """Module names (suffixes) that get adapters; None → every linear projection inside the base's attention."""

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise RetrolmError(f"retrofit config: {msg}")

        self.neighbour_len = 2 * self.chunk_len if self.neighbour_len is None else self.neighbour_len
        check(self.encoder in ENCODERS, f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        base_read = self.encoder == "base"
        if self.retro_layers is None:  # encoder=base: every layer reads, as every layer would read a context
            self.retro_layers = tuple(range(1, self.n_layer + 1)) if base_read else default_cca_layers(self.n_layer)
        if self.cca_query_offset is None and base_read:
            self.cca_query_offset = self.neighbour_len
        check(self.cca_query_offset is None or (base_read and self.cca_query_offset >= 0),
              f"cca_query_offset must be a non-negative integer with encoder=base, got {self.cca_query_offset!r}")
        self.retro_layers = tuple(int(i) for i in self.retro_layers)
        check(
            len(self.retro_layers) > 0 and list(self.retro_layers) == sorted(set(self.retro_layers))
            and all(1 <= i <= self.n_layer for i in self.retro_layers),
            f"cca layers {list(self.retro_layers)} must be increasing, 1-indexed layers within 1..{self.n_layer} "
            "(the base's layers)",
        )
        if base_read:
            check(self.enc_d_model in (None, self.d_model), "encoder=base reads the base's hidden states: "
                  f"enc_d_model must be {self.d_model} (or unset)")
            self.enc_d_model, self.enc_n_head, self.enc_n_layer = self.d_model, self.n_head, 0
        self.enc_d_model = min(256, self.d_model) if self.enc_d_model is None else self.enc_d_model
        self.enc_n_head = max(1, self.enc_d_model // 64) if self.enc_n_head is None else self.enc_n_head
        check(not (self.unfreeze and self.lora), "unfreeze and lora are exclusive (LoRA adapts a frozen base)")
        check(self.lora_r > 0, f"lora_r must be positive, got {self.lora_r}")
        check(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, f"lora_alpha must be positive, got "
              f"{self.lora_alpha}")
        check(self.seq_len > 0 and self.seq_len % self.chunk_len == 0,
              f"seq_len {self.seq_len} must be a positive multiple of chunk_len {self.chunk_len}")
        if self.lora_target_modules is not None:
            self.lora_target_modules = tuple(self.lora_target_modules)
        self.retro_config()  # validates the new modules' shapes (one-line errors)

    def retro_config(self) -> RetroConfig:
        """The RetroConfig that sizes the encoder and the CCA layers (d_model and heads of the base)."""
        return RetroConfig(
            vocab_size=self.vocab_size, seq_len=self.seq_len, n_layer=self.n_layer, n_head=self.n_head,
            d_model=self.d_model, dropout=self.dropout, chunk_len=self.chunk_len, num_neighbours=self.num_neighbours,
            neighbour_len=self.neighbour_len, retro_layers=self.retro_layers, enc_n_layer=self.enc_n_layer,
            enc_d_model=self.enc_d_model, enc_n_head=self.enc_n_head, tie_embeddings=False,
            rope_theta=self.rope_theta, norm_eps=self.norm_eps,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrofitModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RetrolmError(f"retrofit config: unknown field(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list of an HF causal LM (``model.layers``, ``transformer.h``, ``gpt_neox.layers`` …): the
    ``nn.ModuleList`` with ``num_hidden_layers`` entries holding the most parameters."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n:
        lists = [(name, m) for name, m in lists if len(m) == n] or lists
    if not lists:
        raise RetrolmError(f"{type(model).__name__}: no decoder layer list found (no nn.ModuleList of layers)")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _attention_projections(layer: nn.Module) -> tuple[str, ...]:
    """Names (relative to a decoder layer) of the linear projections of its attention, e.g. ``self_attn.q_proj``."""
    out = []
    for name, mod in layer.named_modules():
        parts = name.split(".")
        linear = isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"  # GPT-2's Conv1D is a linear layer
        if linear and any("attn" in p or "attention" in p for p in parts[:-1]):
            out.append(name)
    return tuple(out)


def _base_dims(hf: nn.Module) -> dict[str, int]:
    cfg = hf.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        return {"vocab_size": int(cfg.vocab_size), "d_model": int(cfg.hidden_size),
                "n_head": int(cfg.num_attention_heads)}
    except (AttributeError, TypeError) as e:
        raise RetrolmError(f"{type(hf).__name__}: cannot read the base's vocab/hidden size/heads ({e})") from None


def _base_attention_settings(hf: nn.Module) -> dict[str, float]:
    """The base's RoPE base and RMSNorm epsilon (``rope_parameters`` in recent transformers, ``rope_theta`` before)."""
    cfg = hf.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    # transformers < 5 keeps the scaling (Llama 3's, linear, YaRN) apart, in rope_scaling
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    eps = getattr(cfg, "rms_norm_eps", None)
    if theta is None or eps is None or kind != "default":
        raise RetrolmError(f"{type(hf).__name__}: encoder=base needs plain RoPE and RMSNorm (found rope_theta={theta}, "
                           f"rope_type={kind}, rms_norm_eps={eps})")
    return {"rope_theta": float(theta), "norm_eps": float(eps)}


def _sliding_window(hf: nn.Module) -> int | None:
    """The base's attention window when some of its layers use one (Mistral; Qwen2 only with use_sliding_window)."""
    cfg = hf.config
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(t) for t in layer_types):
        return None
    return int(window)


def _context_len(hf: nn.Module) -> int | None:
    cfg = hf.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


@dataclass
class RetrofitCache:
    """Incremental-decoding state of a :class:`RetrofitModel` (:meth:`RetrofitModel.init_cache`).

    The base keeps its own keys and values in ``past`` (a ``transformers`` ``DynamicCache``), so each call runs the
    base over the new tokens only; the rest is RETRO's chunked causality carried from call to call, as in
    :class:`~retrolm.models.retro.RetroCache`: the most recent complete chunk's encoded neighbours (``encoder=retro``:
    the neighbour encoder's output; ``encoder=base``: the base's states of each neighbour at every reading layer),
    their projected keys and values, the unfinished chunk's activations that will condition the encoder, and
    (``encoder=base``) each reader's own context keys and values. Feeding a sequence in any pieces gives the logits
    of one full forward (up to float rounding).
    """

    past: Any
    """The base's KV cache (``transformers.DynamicCache``)."""
    max_len: int
    """Most tokens this cache can hold (≤ seq_len)."""
    pos: int = 0
    """Number of tokens consumed so far (the position of the next token)."""
    reading: bool | None = None
    """Whether this cache reads neighbours, fixed by the first call (neighbours given or not): the reading state of
    every position has to be kept from the start."""
    chunk_hidden: Tensor | None = None
    """``encoder=retro``: (B, m, d) activations at the first CCA layer's input of the chunk being completed."""
    enc: Tensor | None = None
    """(B, K, R, …) encoded neighbours of the most recent complete chunk, None if it had none."""
    enc_mask: Tensor | None = None
    """(B, K, R) mask of ``enc``."""
    cca_kv: dict[str, tuple[Tensor, Tensor]] = dataclasses.field(default_factory=dict)
    """Per reading layer, the keys and values projected from ``enc``: computed once, read by the next chunk's tokens."""
    ctx_kv: dict[str, tuple[Tensor, Tensor]] = dataclasses.field(default_factory=dict)
    """``encoder=base``: per reading layer, its reader's context keys (with RoPE) and values (B, H, max_len, e)."""
    token_mask: Tensor | None = None
    """(B, max_len) False = padding no position attends to; made by the first call given an ``attention_mask``
    (positions fed without one are text)."""
    failed: bool = False
    """Set when a call failed while updating this cache, which is then refused
    (:func:`~retrolm.models.retro.updating`)."""


class _CrossBlock(nn.Module):
    """One inserted CCA: ``h + drop(CCA(norm(h), E))``; its output projection starts at zero."""

    def __init__(self, rcfg: RetroConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(rcfg.d_model, rcfg.norm_eps)
        self.cca = ChunkedCrossAttention(rcfg)
        self.drop = nn.Dropout(rcfg.dropout)

    def forward(self, h: Tensor, enc: Tensor, enc_mask: Tensor, start: int = 0,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        y = self.cca(self.norm(h), enc, enc_mask, start=start, kv=kv)
        return h + self.drop(y).to(h.dtype)


class _JointReader(nn.Module):
    """``encoder=base``: base layer l's self-attention extended to the neighbours, one softmax over both.

    Reads the layer's own attention input ``x`` (B, T, d) and the neighbours' (B, C, K, R, d), the base's states at
    the same layer, and returns what to add to the layer's attention output: per head, w·(neighbour read − context
    read), where w is the share of a softmax over the context *and* the neighbour tokens that falls on the neighbour
    (from the two log-sum-exps). With the layer's own weights (the init) attention output + this is exactly the
    layer's attention over [neighbour; context]: the neighbour sits ``offset`` positions before the chunk it
    continues, causality as in RETRO (position p reads the neighbours of chunk (p+1)//m − 1). As in
    :class:`~retrolm.models.retro.ChunkedCrossAttention` the attending chunks are folded into the batch, so the
    neighbour scores take (T × K·R) per head, not (T × C·K·R); the context scores are a dense (T × T).
    """

    def __init__(self, rcfg: RetroConfig, offset: int) -> None:
        super().__init__()
        self.m, self.offset = rcfg.chunk_len, offset
        self.attn = Attention(rcfg.d_model, rcfg.n_head, bias=False, dropout=rcfg.dropout, d_ctx=rcfg.d_model)
        self.drop = nn.Dropout(rcfg.dropout)
        self.head = rcfg.d_model // rcfg.n_head
        n_pos = max(rcfg.seq_len, rcfg.neighbour_len, offset + 2 * rcfg.chunk_len)
        self.register_buffer("rope", rope_table(n_pos, self.head, rcfg.rope_theta), persistent=False)

    def project_neighbours(self, nb: Tensor) -> tuple[Tensor, Tensor]:
        """nb (B, N, K, R, d) → keys (with RoPE: neighbour token r at position r) and values (B, H, N, K·R, e)."""
        N, K, R = nb.shape[1:4]
        kn, vn = self.attn.keys_values(rearrange(nb.to(self.attn.kv.weight.dtype), "b n k r d -> b (n k r) d"))
        kn = apply_rope(rearrange(kn, "b h (n kr) e -> b h n kr e", n=N), self.rope[:, :R].repeat(1, K, 1))
        return kn, rearrange(vn, "b h (n kr) e -> b h n kr e", n=N)

    def forward(self, x: Tensor, nb: Tensor | None, nb_mask: Tensor | None, start: int = 0,
                ctx_kv: tuple[Tensor, Tensor] | None = None, kv: tuple[Tensor, Tensor] | None = None,
                *, blocked: Tensor) -> Tensor:
        """What to add to the attention output of positions [start, start+T).

        x (B, T, d); nb (B, N, K, R, d): the neighbours of attending chunks j(max(start, m−1)) … j(start+T−1), where
        j(p) = (p+1)//m − 1, with nb_mask (B, N, K, R) True = real token (None: nothing to read); ``ctx_kv``: (B, H,
        max_len, e) buffers holding the context keys/values of positions < start (incremental decoding; this call's
        are written into them); ``kv``: ``project_neighbours(nb)`` if already computed; ``blocked``: the context
        positions these may not attend to, :func:`context_blocked` (the future and the padding, as in the base's own
        attention; one per pass serves every layer). → (B, T, d), exactly 0 where nothing is read. ValueError when the
        neighbour chunks are not exactly those the positions read."""
        T = x.shape[1]
        m, rope = self.m, self.rope
        kc, vc = self.attn.keys_values(x)
        kc = apply_rope(kc, rope[:, start : start + T])
        if ctx_kv is not None:
            cache_k, cache_v = ctx_kv
            cache_k[:, :, start : start + T] = kc
            cache_v[:, :, start : start + T] = vc
            kc, vc = cache_k[:, :, : start + T].type_as(kc), cache_v[:, :, : start + T].type_as(vc)
        if nb is None:  # retrieval off for this pass
            return torch.zeros_like(x)
        # as RETRO's CCA: the chunks given must be exactly those these positions read (none when p < m−1 for all)
        skip, lead, tail = attending_layout(start, T, m, nb.shape[1], "reader")
        if skip == T:
            return torch.zeros_like(x)
        assert nb_mask is not None
        scale = self.head ** -0.5
        q = self.attn.queries(x)  # (B, H, T, e)
        s_ctx = apply_rope(q, rope[:, start : start + T]) @ kc.transpose(-1, -2) * scale  # (B, H, T, start+T)
        s_ctx = s_ctx.float().masked_fill(blocked, float("-inf"))
        lse_ctx = torch.logsumexp(s_ctx, -1)  # (B, H, T)
        read_ctx = torch.softmax(s_ctx, -1).type_as(vc) @ vc

        # attending chunk j holds positions j·m + m−1 … j·m + 2m−2: fold the reading positions into whole chunks
        qf = rearrange(F.pad(q[:, :, skip:], (0, 0, lead, tail)), "b h (c i) e -> b h c i e", i=m)
        qf = apply_rope(qf, rope[:, self.offset + m - 1 : self.offset + 2 * m - 1])  # m−1+i after the chunk's start
        kn, vn = self.project_neighbours(nb) if kv is None else kv
        s_nb = (qf @ kn.transpose(-1, -2) * scale).float()  # (B, H, N, m, K·R)
        s_nb = s_nb.masked_fill(~rearrange(nb_mask, "b c k r -> b 1 c 1 (k r)"), float("-inf"))
        lse_nb = torch.logsumexp(s_nb, -1)  # −inf where the chunk has no real neighbour token
        reads = torch.isfinite(lse_nb)  # (B, H, N, m)
        read_nb = torch.softmax(s_nb.masked_fill(~reads[..., None], 0.0), -1).type_as(vn) @ vn

        def unfold(t: Tensor, fill: float = 0.0) -> Tensor:  # (B, H, N, m, …) → (B, H, T, …); first `skip`: fill
            t = rearrange(t, "b h c i ... -> b h (c i) ...")[:, :, lead : lead + T - skip]
            return F.pad(t, (0, 0) * (t.dim() - 3) + (skip, 0), value=fill)

        lse_nb = unfold(lse_nb, float("-inf"))  # (B, H, T)
        w = torch.where(torch.isfinite(lse_nb), torch.sigmoid(lse_nb - lse_ctx), 0.0)  # the neighbour's share
        y = w[..., None].type_as(x) * (unfold(read_nb) - read_ctx)
        return self.drop(self.attn.proj(rearrange(y, "b h t e -> b t (h e)")))


def context_blocked(start: int, T: int, ctx_mask: Tensor | None, device: torch.device) -> Tensor:
    """The context positions [0, start+T) that positions [start, start+T) may not attend to: the future and, with
    ``ctx_mask`` (B, start+T; False = padding), the padding. → (T, start+T), or (B, 1, T, start+T) with a mask."""
    blocked = torch.ones(T, start + T, dtype=torch.bool, device=device).triu(start + 1)
    if ctx_mask is not None:  # a position always sees itself (as in the base's masks): no row is left empty
        itself = torch.eye(T, start + T, dtype=torch.bool, device=device).roll(start, 1)
        blocked = blocked | (~ctx_mask[:, None, None, :] & ~itself)
    return blocked


@dataclass
class _Run:
    """What the hooks of one forward pass read: the neighbours, then (after the first CCA layer's pre-hook) E."""

    neighbours: Tensor | None
    mask: Tensor | None
    start: int = 0
    """Position of the first token of this pass (incremental decoding)."""
    cache: RetrofitCache | None = None
    encoded: tuple[Tensor, Tensor] | None = None
    by_layer: dict[str, tuple[Tensor, Tensor]] | None = None
    """``encoder=base``: per CCA layer, the neighbours' hidden states it reads (B, N, K, R, d) and their mask."""
    cached: bool = False
    """Whether what is read is exactly the cache's chunk, whose projected keys/values the cache may hold."""
    token_mask: Tensor | None = None
    """(B, start+T) False = padding that no other position attends to (``attention_mask``, with a cache's earlier
    positions in front)."""
    _blocked: Tensor | None = dataclasses.field(default=None, init=False, repr=False)

    def blocked(self, T: int, device: torch.device) -> Tensor:
        """:func:`context_blocked` of this pass, built by the first reading layer and shared by the others."""
        if self._blocked is None:
            self._blocked = context_blocked(self.start, T, self.token_mask, device)
        return self._blocked


class RetrofitModel(nn.Module):
    """A pretrained HF causal LM with RETRO's neighbour encoder and chunked cross-attention attached by hooks.

    Build one with :meth:`from_base` (by model reference) or ``RetrofitModel(hf_model, config)``; load a checkpoint
    with :meth:`from_pretrained`. See the module docstring for the design.
    """

    reads_token_mask = True
    """``forward`` takes an ``attention_mask``: training and scoring pass the padding between documents as masked
    (a pretrained base never saw runs of padding in its context, and they cost it most of what it reads)."""

    def __init__(self, hf: nn.Module, config: RetrofitModelConfig) -> None:
        super().__init__()
        dims = _base_dims(hf)
        for key, value in dims.items():
            if key != "n_head" and getattr(config, key) != value:
                raise RetrolmError(f"{config.base}: the base has {key}={value}, the retrofit config "
                                   f"{getattr(config, key)}")
        self.config = config
        self.base = hf
        path, layers = find_decoder_layers(hf)
        if len(layers) != config.n_layer:
            raise RetrolmError(f"{config.base}: the base has {len(layers)} decoder layers ({path}), the retrofit "
                               f"config {config.n_layer}")
        ctx = _context_len(hf)
        if ctx is not None and config.seq_len > ctx:
            raise RetrolmError(f"seq_len {config.seq_len} exceeds the base's context of {ctx} tokens")
        emb = hf.get_input_embeddings()
        if emb is None or emb.weight.shape[1] != config.d_model:
            raise RetrolmError(f"{config.base}: token embeddings are not of the hidden size {config.d_model}")

        rcfg = config.retro_config()
        self.base_read = config.encoder == "base"
        self.encoder = None if self.base_read else NeighbourEncoder(rcfg)
        self.cca = nn.ModuleDict({
            str(i): _JointReader(rcfg, config.cca_query_offset) if self.base_read else _CrossBlock(rcfg)
            for i in config.retro_layers})
        if self.base_read:
            window = _sliding_window(hf)
            if window is not None and config.seq_len > window:
                # the readers recompute each layer's attention over the whole causal context: past the window that
                # is not the attention the base was trained with
                raise RetrolmError(f"{config.base}: the base attends over a sliding window of {window} tokens and "
                                   f"encoder=base reads the whole context; use seq_len <= {window} (asked "
                                   f"{config.seq_len}) or encoder=retro")
            self._init_from_base_attention(layers)
        else:
            self._init_new_weights(rcfg)

        base_dtype = next(hf.parameters()).dtype
        for name, child in self.named_children():  # new modules are built in fp32: a bf16 base reads them in bf16
            if name != "base":
                child.to(base_dtype)
        self.base.requires_grad_(config.unfreeze)
        if config.lora:
            self._add_lora(layers)
        self._layers = list(layers)  # not registered again: they are the base's own modules
        self._run: _Run | None = None
        self._past_arg = kv_cache_arg(hf)
        self._hooks = [] if self.base_read else [
            self._layers[config.retro_layers[0] - 1].register_forward_pre_hook(self._encode_hook, with_kwargs=True)]
        for i in config.retro_layers:
            # bound methods (not closures), so that a deep copy's hooks call the copy
            if self.base_read:  # the reader joins layer i's self-attention: it adds to that attention's output
                self._hooks.append(self._layers[i - 1].self_attn.register_forward_hook(
                    functools.partial(self._joint_hook, str(i)), with_kwargs=True))
            else:
                self._hooks.append(self._layers[i - 1].register_forward_hook(functools.partial(self._cca_hook, str(i))))
        self.train(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  **options: Any) -> RetrofitModel:
        """Load the base LM ``ref`` (folder, short name such as ``smollm2-135m``, or hub name) and attach new modules
        shaped by ``options`` (the :class:`RetrofitModelConfig` fields other than the base's)."""
        resolved = resolve_model(ref, what="base model")
        fingerprint = weights_fingerprint(resolved.path) if resolved.local else None
        hf = load_hf_causal_lm(resolved, "cpu", dtype)
        dims = _base_dims(hf)
        if options.get("encoder") == "base":  # the copied attention keeps the base's RoPE angles and norm epsilon
            for key, value in _base_attention_settings(hf).items():
                options.setdefault(key, value)
        config = RetrofitModelConfig(base=resolved.name, base_fingerprint=fingerprint,
                                     n_layer=len(find_decoder_layers(hf)[1]), **dims, **options)
        return cls(hf, config).to(device)

    def _init_new_weights(self, rcfg: RetroConfig) -> None:
        """RETRO's init for the encoder and CCA (N(0, 0.02), residual projections scaled down), then every CCA output
        projection at zero: the model starts exactly at the base."""
        for module, n_layer in ((self.encoder, max(1, rcfg.enc_n_layer)), (self.cca, len(self.config.retro_layers))):
            for name, p in module.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, mean=0.0, std=std)
                elif name.endswith(".bias"):
                    nn.init.zeros_(p)
        for block in self.cca.values():
            nn.init.zeros_(block.cca.attn.proj.weight)
            if block.cca.attn.proj.bias is not None:
                nn.init.zeros_(block.cca.attn.proj.bias)

    @torch.no_grad()
    def _init_from_base_attention(self, layers: nn.ModuleList) -> None:
        """``encoder=base``: each reader starts as its layer's self-attention: the query, key, value and output
        projections (grouped key/value heads repeated per query head, as the base's attention shares them)."""
        cfg = self.config
        for key, block in self.cca.items():
            layer = layers[int(key) - 1]
            attn = getattr(layer, "self_attn", None)
            norm = getattr(layer, "input_layernorm", None)
            projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            if norm is None or any(not isinstance(p, nn.Linear) for p in projs) or not hasattr(norm, "weight"):
                raise RetrolmError(f"{cfg.base}: encoder=base needs Llama-style decoder layers (input_layernorm, "
                                   f"self_attn.q_proj/k_proj/v_proj/o_proj); layer {key} is "
                                   f"{type(layer).__name__}")
            q, k, v, o = projs
            if any(p.bias is not None for p in projs):
                raise RetrolmError(f"{cfg.base}: encoder=base does not copy attention biases")
            head = cfg.d_model // cfg.n_head
            # The reader recomputes the layer's attention as softmax(rope(q x)·rope(k x) / sqrt(head)): a base that
            # also normalises queries and keys (Qwen3's q_norm / k_norm) or scales them otherwise (Granite) would be
            # read wrongly without any error, so it is refused.
            extra = sorted({n.split(".")[0] for n, _ in attn.named_parameters()} - {"q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"})
            scaling = getattr(attn, "scaling", head**-0.5)
            if extra or abs(float(scaling) - head**-0.5) > 1e-6 * head**-0.5:
                what = f"its attention's {', '.join(extra)}" if extra else f"attention scaling {scaling}"
                raise RetrolmError(f"{cfg.base}: encoder=base reproduces plain Llama attention; layer {key} has "
                                   f"{what} (use encoder=retro)")
            n_kv = k.weight.shape[0] // head
            if q.weight.shape != (cfg.d_model, cfg.d_model) or k.weight.shape[0] % head or cfg.n_head % n_kv:
                raise RetrolmError(f"{cfg.base}: layer {key}'s attention is not {cfg.n_head} heads of {head}")

            def per_head(w: Tensor, e: int = head, groups: int = cfg.n_head // n_kv) -> Tensor:
                # (n_kv·e, d) → (n_head·e, d): query head h reads key/value head h // groups, as the base's does
                return rearrange(w, "(g e) d -> g e d", e=e).repeat_interleave(groups, 0).flatten(0, 1)

            block.attn.q.weight.copy_(q.weight)
            block.attn.kv.weight.copy_(torch.cat([per_head(k.weight), per_head(v.weight)]))
            block.attn.proj.weight.copy_(o.weight)

    def _add_lora(self, layers: nn.ModuleList) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:  # pragma: no cover - peft is a dependency of retrofitting
            raise RetrolmError(f"lora=true needs the peft package ({e})") from None
        cfg = self.config
        targets = cfg.lora_target_modules or _attention_projections(layers[0])
        if not targets:
            raise RetrolmError(f"{cfg.base}: no attention projections found for LoRA; set lora_target_modules")
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(targets))
        try:
            inject_adapter_in_model(lora, self.base)
        except ValueError as e:  # no module matched
            raise RetrolmError(f"{cfg.base}: LoRA ({str(e).splitlines()[0]})") from None
        for name, p in self.base.named_parameters():
            p.requires_grad_("lora_" in name)

    # ------------------------------------------------------------------ properties
    @property
    def wte(self) -> nn.Embedding:
        """The base's (frozen unless unfreeze) token embeddings, which the neighbour encoder also reads."""
        return self.base.get_input_embeddings()

    @property
    def base_frozen(self) -> bool:
        return not (self.config.unfreeze or self.config.lora)

    def train(self, mode: bool = True) -> RetrofitModel:
        """A frozen base stays in eval mode (no dropout): its output is the pretrained model's, exactly."""
        super().train(mode)
        if self.base_frozen:
            self.base.train(False)
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of the whole model (shared ones once); ``non_embedding`` leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def num_new_params(self) -> int:
        """Parameters of the neighbour encoder and the CCA layers."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(BASE))

    def _saved(self, name: str) -> bool:
        """Whether a parameter goes into checkpoints: the new ones, plus what of the base is trained."""
        if not name.startswith(BASE):
            return True
        return self.config.unfreeze or (self.config.lora and "lora_" in name)

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, folder: str | Path, state: Mapping[str, Tensor] | None = None) -> None:
        """Write the new weights (+ LoRA adapters or, unfrozen, the base's weights) and ``model.json`` to ``folder``.
        ``state``: the full tensors by name to write instead of the model's own (a sharded model gathers them)."""
        saved = self.saved_names()
        tensors = {n: p if state is None else state[n] for n, p in self.named_parameters() if n in saved}
        save_weights(self, folder, {"architecture": "retrofit", **self.config.to_dict()}, tensors)

    def saved_names(self) -> set[str]:
        """The names :meth:`save_pretrained` writes: the new modules' parameters and what of the base is trained
        (a tied weight under its first name only)."""
        return {n for n, _ in self.named_parameters() if self._saved(n)}

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> RetrofitModel:
        """Reload the base by its recorded name (refusing other weights), attach the new modules, load their weights."""
        folder = Path(folder)
        data = read_model_config(folder)
        data.pop("architecture", None)
        config = RetrofitModelConfig.from_dict(data)
        resolved = resolve_model(config.base, what="base model")
        check_fingerprint(folder, config, weights_fingerprint(resolved.path) if resolved.local else None)
        model = cls(load_hf_causal_lm(resolved, "cpu"), config)
        model.load_trained_weights(folder, device)
        return model.to(device).eval()

    def load_trained_weights(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        """Load what :meth:`save_pretrained` wrote into this model (same base: its fingerprint is checked)."""
        self.check_trained_folder(folder)
        missing = load_weights(self, folder, device, strict=False)
        params = dict(self.named_parameters())  # a tied weight under its first name only
        lost = [n for n in missing if n in params and self._saved(n)]
        if lost:
            raise RetrolmError(f"{Path(folder) / 'model.safetensors'}: misses trained weights: {', '.join(lost[:5])}")

    def check_trained_folder(self, folder: str | Path) -> None:
        """Refuse a folder written for another base (by the base's recorded fingerprint)."""
        check_fingerprint(Path(folder), RetrofitModelConfig.from_dict(
            {k: v for k, v in read_model_config(folder).items() if k != "architecture"}), self.config.base_fingerprint)

    # ------------------------------------------------------------------ forward
    def init_cache(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> RetrofitCache:
        """Empty decoding state for ``batch_size`` sequences of up to ``max_len`` (default seq_len) tokens; ``dtype``
        (default: the parameters') of the reading state kept between calls."""
        max_len = self.config.seq_len if max_len is None else max_len
        if not 0 < max_len <= self.config.seq_len:
            raise RetrolmError(f"init_cache: max_len={max_len} must be in 1..seq_len={self.config.seq_len}")
        from transformers import DynamicCache

        try:  # recent transformers size the cache's layers from the config (sliding-window layers included)
            past = DynamicCache(config=self.base.config)
        except TypeError:  # pragma: no cover - older transformers
            past = DynamicCache()
        w = self.wte.weight
        device, dtype = device or w.device, dtype or w.dtype
        cache = RetrofitCache(past=past, max_len=max_len)
        if self.base_read:
            cfg = self.config
            shape = (batch_size, cfg.n_head, max_len, cfg.d_model // cfg.n_head)
            cache.ctx_kv = {key: (torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype)) for key in self.cca}
        else:
            cache.chunk_hidden = torch.zeros(batch_size, self.config.chunk_len, self.config.d_model, device=device,
                                             dtype=dtype)
        return cache

    def forward(
        self,
        idx: Tensor,
        neighbours: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
        targets: Tensor | None = None,
        cache: RetrofitCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> ModelOutput:
        """Next-token logits for ``idx`` (B, T), reading ``neighbours`` (B, C, K, R) where causality allows.

        The contract of :meth:`retrolm.models.retro.RetroModel.forward`: ``neighbours[:, u]`` were retrieved with chunk
        u and are read by positions ≥ (u+1)·m − 1; ids < 0 and ``neighbour_mask`` False are padding; None → retrieval
        off, exactly the base model's output; ``targets`` -100 are ignored. With a ``cache`` (:meth:`init_cache`),
        ``idx`` continues the cached tokens at position ``cache.pos`` and the base runs over ``idx`` only; chunk
        indices stay absolute (pass the same growing ``neighbours`` as for a full forward): chunk u's neighbours are
        read from the call that feeds its last token, position (u+1)·m − 1, and chunks not complete after ``idx`` are
        ignored. A cache first called without neighbours never reads any. ``attention_mask`` (B, T) bool: False =
        padding, which no other position attends to (the base's and the readers' attention, and RETRO's neighbour
        encoder's cross-attention to the retrieving chunk); with a cache it covers ``idx`` and is kept for the calls
        that follow. A call that fails after it began updating ``cache`` leaves it refused (start another).
        """
        if idx.dim() != 2:
            raise RetrolmError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        limit = self.config.seq_len if cache is None else cache.max_len
        if T == 0 or start + T > limit:
            raise RetrolmError(f"sequence positions [{start}, {start + T}) exceed the model/cache length {limit}")
        passed = neighbours is not None  # an empty tensor (no chunk complete yet, nothing retrieved) starts a reader
        neighbours, neighbour_mask = check_neighbours(B, neighbours, neighbour_mask, self.config.neighbour_len)
        if attention_mask is not None and (attention_mask.shape != idx.shape or attention_mask.dtype != torch.bool):
            raise RetrolmError(f"attention_mask must be bool of shape {tuple(idx.shape)}; got "
                               f"{attention_mask.dtype} of shape {tuple(attention_mask.shape)}")
        if cache is not None and cache.reading is None:
            cache.reading = passed
        if cache is not None and cache.reading is False and neighbours is not None:
            raise RetrolmError("this decoding cache was started without neighbours and cannot read any: start "
                               "one (init_cache) whose first call passes neighbours")
        with updating(cache):
            logits = self._forward(idx, neighbours, neighbour_mask, cache, attention_mask)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss)

    def _forward(self, idx: Tensor, neighbours: Tensor | None, neighbour_mask: Tensor | None,
                 cache: RetrofitCache | None, attention_mask: Tensor | None) -> Tensor:
        """:meth:`forward` after its checks → logits; updates ``cache``."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        visible = attention_mask  # (B, positions the pass attends over)
        if cache is not None and (attention_mask is not None or cache.token_mask is not None):
            if cache.token_mask is None:
                cache.token_mask = torch.ones(B, cache.max_len, dtype=torch.bool, device=idx.device)
            cache.token_mask[:, start : start + T] = True if attention_mask is None else attention_mask
            visible = cache.token_mask[:, : start + T]
        run = None
        if cache is not None:
            run = _Run(neighbours, neighbour_mask, start, cache, token_mask=visible) if cache.reading else None
        elif neighbours is not None:
            run = _Run(neighbours, neighbour_mask, token_mask=attention_mask)
        if run is not None and self.base_read:
            self._read_with_base(run, T)  # before self._run is set: the hooks leave the neighbours' pass alone
        self._run = run
        try:
            mask = None if visible is None else visible.long()
            if cache is None:
                return self.base(input_ids=idx, attention_mask=mask, use_cache=False).logits
            past = {self._past_arg: cache.past}
            logits = self.base(input_ids=idx, attention_mask=mask, use_cache=True, **past).logits
            cache.pos += T
            return logits
        finally:
            self._run = None

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def _encode_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the first CCA layer: encode the neighbours of the chunks that complete in this pass, conditioned
        on the chunk's hidden states at this layer's input, and gather what each CCA reads (chunks without neighbours:
        an all-False mask, CCA reads nothing)."""
        run = self._run
        if run is None:
            return None
        h = self._hidden(args, kwargs)

        def encode(nb: Tensor, nm: Tensor, chunk_h: Tensor | None) -> Tensor:
            assert chunk_h is not None and self.encoder is not None
            # chunk_h holds the chunks that complete in this pass, from chunk start // m on; the neighbours do not
            # read their padding positions (run.token_mask covers positions [0, start+T)).
            m, n = self.config.chunk_len, chunk_h.shape[1]
            first = run.start // m * m
            chunk_mask = None if run.token_mask is None else rearrange(
                run.token_mask[:, first : first + n * m], "b (c m) -> b c m", m=m)
            return self.encoder(self.wte(nb).to(chunk_h.dtype), nm, chunk_h, chunk_mask)  # (B, n, K, R, d_enc)

        run.encoded, run.cached = encode_attending(run.neighbours, run.mask, run.start, h.shape[1],
                                                   self.config.chunk_len, run.cache, encode, h)
        return None

    def _read_with_base(self, run: _Run, T: int) -> None:
        """``encoder=base``: run the base over every neighbour of the chunks that complete in this pass, each alone at
        positions 0 … R−1, and give each reading layer l the neighbours' hidden states at its input (normalised as
        its attention reads them) for every chunk its positions read; with a cache, the last complete chunk's states
        come from the earlier call that encoded them (a neighbour's states depend on it alone)."""
        keys = list(self.cca)

        got, run.cached = encode_attending(run.neighbours, run.mask, run.start, T, self.config.chunk_len, run.cache,
                                           lambda nb, nm, _chunk_h: self._base_states(nb, nm))
        if got is not None:
            run.by_layer = {key: (got[0][..., i, :], got[1]) for i, key in enumerate(keys)}

    def _base_states(self, nb: Tensor, nm: Tensor) -> Tensor:
        """The base over each neighbour ``nb`` (B, C, K, R) alone → the normalised input states of every reading layer
        (B, C, K, R, layers, d), layers in ``self.cca``'s order. A neighbour that occurs more than once in the batch
        (overlapping evaluation sequences, ``context_chunks``, read each chunk's neighbours in several rows) is run
        once."""
        B, C = nb.shape[:2]
        ids = rearrange(nb, "b c k r -> (b c k) r")
        mask = rearrange(nm, "b c k r -> (b c k) r")
        mask = mask | ~mask.any(-1, keepdim=True)  # an all-padding neighbour reads junk (never NaN); CCA masks it
        rows, where = torch.unique(torch.cat([ids, mask.long()], -1), dim=0, return_inverse=True)
        ids, mask = rows.split(ids.shape[1], dim=-1)
        # a frozen base passes no gradient to its own states: the pass needs no graph
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.base_frozen):
            states = self.base.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                          use_cache=False).hidden_states
        # each reading layer's attention reads its input, normalised
        h = torch.stack([self._layers[int(key) - 1].input_layernorm(states[int(key) - 1]) for key in self.cca], -2)
        return rearrange(h[where], "(b c k) r l d -> b c k r l d", b=B, c=C)

    def _joint_hook(self, key: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """``encoder=base``: forward hook of layer ``key``'s self-attention; its output gains the neighbours' share."""
        run = self._run
        if run is None or (run.by_layer is None and run.cache is None):
            return None  # retrieval off (or nothing to read): the base's output, untouched
        x = self._hidden(args, kwargs)
        reader = self.cca[key]
        nb, nm = run.by_layer[key] if run.by_layer is not None else (None, None)
        blocked = run.blocked(x.shape[1], x.device)
        if run.cache is not None:  # decoding: the reader keeps its context keys even when nothing is read yet
            kv = self._cached_kv(run, key, lambda: reader.project_neighbours(nb)) if nb is not None else None
            y = reader(x, nb, nm, start=run.start, ctx_kv=run.cache.ctx_kv[key], kv=kv, blocked=blocked)
        elif self.training and torch.is_grad_enabled():  # recomputed in the backward pass: one layer's scores at a time
            y = checkpoint(reader, x, nb, nm, blocked=blocked, use_reentrant=False)
        else:
            y = reader(x, nb, nm, blocked=blocked)
        return _map_hidden(output, lambda h: h + y.to(h.dtype), module, "attention")

    @staticmethod
    def _cached_kv(run: _Run, key: str, project: Any) -> tuple[Tensor, Tensor] | None:
        """The read chunk's projected keys/values for layer ``key``, computed once per chunk when it is the cache's
        (None otherwise: the reader projects what it reads)."""
        if not run.cached or run.cache is None:
            return None
        if key not in run.cache.cca_kv:
            run.cache.cca_kv[key] = project()
        return run.cache.cca_kv[key]

    def _cca_hook(self, key: str, module: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook of CCA layer ``key``: its output hidden state h becomes h + CCA(norm(h), E)."""
        run = self._run
        if run is None or run.encoded is None:
            return None  # retrieval off (or nothing to read yet): the base's output, untouched
        block = self.cca[key]
        enc, enc_mask = run.encoded
        kv = self._cached_kv(run, key, lambda: block.cca.project_kv(enc))
        return _map_hidden(output, lambda h: block(h, enc, enc_mask, run.start, kv), module, "decoder layer")


def _map_hidden(output: Any, f: Any, module: nn.Module, what: str) -> Any:
    """A hooked module's output with its hidden state h replaced by f(h): the tensor itself, or the first element of a
    tuple (attention layers return (output, weights); decoder layers did in older transformers)."""
    if isinstance(output, Tensor):
        return f(output)
    if isinstance(output, (tuple, list)):
        return type(output)((f(output[0]), *output[1:]))
    raise RetrolmError(f"{type(module).__name__}: unexpected {what} output {type(output).__name__}")


def check_fingerprint(folder: Path, config: RetrofitModelConfig, found: str | None) -> None:
    """A checkpoint reads only the base it was trained on: same weight files (when both fingerprints are known)."""
    recorded = config.base_fingerprint
    if recorded is None:
        logger.warning("%s: no base fingerprint recorded; cannot check that %s is the base it was trained on",
                       folder, config.base)
        return
    if found != recorded:
        raise RetrolmError(f"{folder}: trained on base {config.base} with weights {recorded[:12]}…, but that base "
                           f"now has {'no local weights' if found is None else f'weights {found[:12]}…'}; "
                           "restore the original base model")
