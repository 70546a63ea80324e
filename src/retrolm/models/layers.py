"""Transformer building blocks shared by retrolm's models: RMSNorm, RoPE, attention around SDPA, the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["MLP", "Attention", "CausalSelfAttention", "RMSNorm", "apply_rope", "padding_mask", "rope_table"]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (computed in fp32 for bf16 stability)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).type_as(x)


def rope_table(n: int, head_dim: int, theta: float) -> Tensor:
    """(2, n, head_dim/2): cos and sin of position × frequency for positions 0..n-1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos(), angles.sin()))


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate x (..., T, e) by ``rope`` (2, T, e/2), pairing feature i with i + e/2 (the GPT-NeoX layout)."""
    cos, sin = rope[0], rope[1]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def padding_mask(key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Key mask (N, L), True = real key → (SDPA boolean mask (N, 1, 1, L), empty (N,) rows with no real key).

    SDPA gives NaN for a query row whose keys are all masked, and NaN gradients even if that output is zeroed later, so
    empty rows get all their (padding) keys back: finite junk that the caller zeroes (CCA) or never reads (encoder).
    """
    empty = ~key_mask.any(-1)
    return rearrange(key_mask | empty[:, None], "n l -> n 1 1 l"), empty


class Attention(nn.Module):
    """Multi-head attention projections around ``F.scaled_dot_product_attention``.

    Self-attention (``d_ctx=None``) uses one fused QKV matmul; cross-attention one Q matmul of the queries and one fused
    KV matmul of the context (width ``d_ctx``).
    """

    def __init__(self, d: int, n_head: int, *, bias: bool, dropout: float, d_ctx: int | None = None) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        if d_ctx is None:
            self.qkv = nn.Linear(d, 3 * d, bias=bias)
        else:
            self.q = nn.Linear(d, d, bias=bias)
            self.kv = nn.Linear(d_ctx, 2 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)

    def heads(self, x: Tensor, ctx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, T, d) [and ctx (N, S, d_ctx)] → q (N, H, T, e), k and v (N, H, T or S, e)."""
        if ctx is None:
            q, k, v = rearrange(self.qkv(x), "n t (three h e) -> three n h t e", three=3, h=self.n_head).unbind(0)
            return q, k, v
        return self.queries(x), *self.keys_values(ctx)

    def queries(self, x: Tensor) -> Tensor:
        """Cross-attention queries: x (N, T, d) → (N, H, T, e)."""
        return rearrange(self.q(x), "n t (h e) -> n h t e", h=self.n_head)

    def keys_values(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values: ctx (N, S, d_ctx) → two (N, H, S, e)."""
        k, v = rearrange(self.kv(ctx), "n s (two h e) -> two n h s e", two=2, h=self.n_head).unbind(0)
        return k, v

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """SDPA, merge heads, output projection → (N, T, d)."""
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=p)
        return self.proj(rearrange(y, "n h t e -> n t (h e)"))


class CausalSelfAttention(Attention):
    """Decoder self-attention with RoPE and an optional KV cache for incremental decoding."""

    def forward(self, x: Tensor, rope: Tensor, start: int = 0, kv_cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, T, d) at positions [start, start+T); rope (2, T, e/2); kv_cache: (B, H, max_len, e) K and V buffers."""
        T = x.shape[1]
        q, k, v = self.heads(x)  # (B, H, T, e)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            cache_k[:, :, start : start + T] = k
            cache_v[:, :, start : start + T] = v
            k, v = cache_k[:, :, : start + T].type_as(q), cache_v[:, :, : start + T].type_as(q)
        if start == 0:
            return self.attend(q, k, v, is_causal=True)
        if T == 1:
            return self.attend(q, k, v)  # one new token sees the whole prefix
        # is_causal aligns the triangle top-left; queries at start.. need it bottom-right, hence a (T, start+T) mask.
        mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        return self.attend(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    """Two-layer GELU feed-forward (GPT-2 style; d_ff defaults to 4·d)."""

    def __init__(self, d: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))
