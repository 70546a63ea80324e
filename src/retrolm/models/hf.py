"""Pretrained causal LMs from Hugging Face as retrolm readers: any ``AutoModelForCausalLM``, by folder or name.

:class:`CausalLM` wraps the HF model with what retrolm's readers need — its context length, a padded batched forward
that returns logits, and a per-token log-likelihood — and keeps the underlying module reachable as ``.hf``. References
resolve through :mod:`retrolm.core.hub` (a local folder, a packaged model such as ``smollm2-135m``, or a hub name).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import ModelRef, load_error, resolve_model, weights_fingerprint

logger = logging.getLogger(__name__)


def pad_rows(rows: Sequence[Sequence[int]], pad: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """(B, T) ids and attention mask of token rows padded with ``pad`` to the longest, on the right (or the left:
    rows aligned to the right, as a batch of prompts to continue)."""
    T = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            first = T - len(r) if left else 0
            ids[i, first : first + len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, first : first + len(r)] = 1
    return ids, mask


def padded_token_nll(forward: Callable[[Tensor, Tensor], Tensor], rows: list[list[int]], n_targets: list[int],
                     device: torch.device, batch_size: int = 8, left_pad: bool = False,
                     context: tuple[str, int] | None = None) -> list[Tensor]:
    """Negative log-likelihood (nats) of the last ``n_targets[i]`` tokens of each ``rows[i]``: rows sorted by length
    into padded batches, ``forward(ids, attention_mask) -> logits`` run once per batch. Right padding suits a causal
    model without a mask (padding after a token never changes its prediction); left padding needs the mask.
    ``context``: (the model's name, its positions), checked before anything runs."""
    too_long = max((len(r) for r in rows), default=0)
    if context is not None and too_long > context[1]:
        raise RetrolmError(f"{context[0]}: a window of {too_long} tokens exceeds the model's {context[1]}; lower "
                           "context_tokens, stride or the number of passages (a passage takes up to 2 × chunk_len "
                           "tokens)")
    out: list[Tensor] = [torch.empty(0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_rows([rows[i] for i in idx], 0, left=left_pad)
        T = ids.shape[1]
        ends = [T - 1 if left_pad else len(rows[i]) - 1 for i in idx]  # where each row's last token sits
        logp = F.log_softmax(forward(ids.to(device), mask.to(device)).float()[:, :-1], dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None].to(device))[..., 0]  # (B, T-1): nll of token t+1
        for r, i in enumerate(idx):
            n = n_targets[i]
            out[i] = nll[r, ends[r] - n : ends[r]].cpu() if n else torch.empty(0)
    return out


def load_hf_causal_lm(ref: ModelRef, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                      ) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with one-line errors."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype)
    except Exception as e:  # OSError offline / missing files, ValueError for non-causal-LM configs
        raise load_error(ref, "a causal LM", e) from None
    return model.to(device).eval()


class CausalLM(nn.Module):
    """A pretrained causal LM (frozen: no gradients unless a caller enables them) read through retrolm.

    Args:
        hf: the ``transformers`` model.
        name: what to record (hub name or the absolute folder).
        path: the local folder, when there is one (for the weights fingerprint).
    """

    def __init__(self, hf: nn.Module, name: str, path: str | None = None) -> None:
        super().__init__()
        self.hf, self.name, self.path = hf, name, path
        self.hf.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                        ) -> CausalLM:
        """Load a causal LM by reference (folder, short name such as ``smollm2-135m``, or hub name)."""
        resolved = resolve_model(ref, what="model")
        return cls(load_hf_causal_lm(resolved, device, dtype), resolved.name, resolved.path if resolved.local else None)

    @property
    def context_len(self) -> int:
        """Positions the model was trained on (``max_position_embeddings``, or ``n_positions`` for GPT-2)."""
        cfg = self.hf.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024))

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def fingerprint(self) -> str | None:
        """SHA-256 of the weight files (None for a hub model without a local folder)."""
        return weights_fingerprint(self.path) if self.path else None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) ids, optionally left-padded with ``attention_mask`` 0 → (B, T, V) logits."""
        position_ids = None
        if attention_mask is not None:
            # left padding: positions count real tokens only, so a padded row sees the positions it would alone
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.hf(input_ids=idx, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits

    @torch.no_grad()
    def token_nll(self, rows: list[list[int]], n_targets: list[int], batch_size: int = 8) -> list[Tensor]:
        """Negative log-likelihood (nats) of the last ``n_targets[i]`` tokens of each ``rows[i]`` given what
        precedes them; rows are left-padded (with an attention mask) into batches of similar length."""
        return padded_token_nll(lambda ids, mask: self(ids, mask), rows, n_targets, self.device, batch_size,
                                left_pad=True, context=(self.name, self.context_len))

    @torch.no_grad()
    def step(self, ids: list[int], cache: object | None = None) -> tuple[Tensor, object]:
        """Feed ``ids`` (one sequence) after what ``cache`` holds → (logits of the last position, the new cache).
        transformers 5 calls the KV cache ``cache``, 4.x ``past_key_values``: both work."""
        kw = {"use_cache": True}
        if cache is not None:
            kw[self._cache_arg] = cache
        out = self.hf(input_ids=torch.tensor([ids], device=self.device), **kw)
        new = out.get("cache", None) if hasattr(out, "get") else None
        return out.logits[0, -1], new if new is not None else out.past_key_values

    @functools.cached_property
    def _cache_arg(self) -> str:
        return kv_cache_arg(self.hf)

    def save_pretrained(self, folder: str | Path) -> None:
        self.hf.save_pretrained(folder)


def kv_cache_arg(hf: nn.Module) -> str:
    """The name of an HF causal LM's KV-cache argument: ``cache`` in transformers 5, ``past_key_values`` in 4.x."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
