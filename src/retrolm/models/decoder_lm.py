"""A retrolm decoder read as a plain causal LM: how ``retrolm eval in_context=true`` puts retrieved passages in the
context window of a baseline trained from scratch (no RETRO layers), exactly as it does for a pretrained LM."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from retrolm.core.errors import RetrolmError
from retrolm.models.hf import padded_token_nll
from retrolm.models.retro import RetroModel


class DecoderLM(nn.Module):
    """The interface of :class:`retrolm.models.hf.CausalLM` that in-context scoring uses, over a ``RetroModel``
    without chunked cross-attention."""

    def __init__(self, model: RetroModel, name: str) -> None:
        super().__init__()
        if model.config.retro_layers:
            raise RetrolmError(f"{name}: in-context reading is for a decoder without RETRO layers (a baseline); "
                               "a RETRO model reads its neighbours through chunked cross-attention")
        self.model, self.name, self.path = model, name, None

    @property
    def context_len(self) -> int:
        return int(self.model.config.seq_len)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> None:
        return None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def token_nll(self, rows: list[list[int]], n_targets: list[int], batch_size: int = 8) -> list[Tensor]:
        """Negative log-likelihood (nats) of the last ``n_targets[i]`` tokens of each ``rows[i]``. Rows are padded on
        the right (causal attention: padding after a token never changes its prediction)."""
        return padded_token_nll(lambda ids, mask: self.model(ids).logits, rows, n_targets, self.device,
                                batch_size, context=(self.name, self.context_len))
