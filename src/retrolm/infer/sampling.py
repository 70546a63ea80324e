"""Choosing the next token: greedy, or temperature + nucleus (top-p) sampling with a seeded generator."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from retrolm.core.errors import RetrolmError


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """One clear error for a nonsensical setting."""
    if max_new_tokens < 1 or not 0 <= temperature < math.inf or not 0 < top_p <= 1:  # NaN fails every comparison
        raise RetrolmError(
            f"generate: need max_new_tokens >= 1, a finite temperature >= 0 and 0 < top_p <= 1 "
            f"(got {max_new_tokens}, {temperature}, {top_p})"
        )


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (V,) restricted to the smallest set of most likely tokens whose mass reaches ``top_p``,
    renormalised."""
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # a token is kept if the mass before it is still short of top_p
    keep[0] = True  # the likeliest always (a top_p below the dtype's smallest number kept none: NaN)
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """The next token from ``logits`` (V,): argmax at temperature 0, else a draw from the tempered nucleus."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or one float32 holds as 0 (its draws were NaN)
        return int(logits.argmax())
    logits = logits.float().cpu()
    # shifted first: at a tiny temperature the quotient of the logits themselves overflows to inf (then NaN)
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def row_generator(seed: int, prompt: Sequence[int], index: int = 0) -> torch.Generator:
    """A generator for one sequence, seeded by ``seed``, the prompt's tokens and the sample ``index``: what is drawn
    for a prompt does not depend on what else is generated in the same batch or call."""
    digest = hashlib.blake2b(np.asarray(prompt, dtype=np.int64).tobytes(), digest_size=8,
                             key=f"{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
