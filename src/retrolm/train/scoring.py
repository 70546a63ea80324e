"""Bits per byte: the one scoring loop behind training validation and ``retrolm eval``.

Bits-per-byte = total negative log-likelihood in nats / ln 2 / UTF-8 bytes of the predicted text. Losses are booked
per chunk: a loss belongs to the chunk of the token it predicts (position p + 1; for the last position of a
sequence, the first chunk of the next sequence), except the EOS predicted after a document's last token, which
belongs to that token's chunk. Each chunk's byte count is its share of its document's bytes (see
:func:`retrolm.train.data.chunk_bytes`), so any set of chunks has a well-defined bits-per-byte.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retrolm.core.device import autocast
from retrolm.train.data import IGNORE, RetroSequences, model_kwargs


@dataclass
class Scores:
    """Per-chunk results of one model under one setting."""

    nats: np.ndarray
    """(n_chunks,) summed negative log-likelihood of the targets booked to each chunk, in nats."""
    tokens: np.ndarray
    """(n_chunks,) targets booked to each chunk."""


def bits_per_byte(nats: np.ndarray, n_bytes: np.ndarray, select: np.ndarray | None = None) -> float:
    """Bits per byte over the selected chunks (NaN if they hold no bytes): total nats / ln 2 / total bytes."""
    if select is not None:
        nats, n_bytes = nats[select], n_bytes[select]
    total = float(np.sum(n_bytes))
    return float(np.sum(nats)) / math.log(2) / total if total > 0 else float("nan")


def book_losses(nats: np.ndarray, count: np.ndarray, ce: np.ndarray, targets: np.ndarray, first_chunk: int,
                chunk_len: int, eos_id: int | None, scored: tuple[int, int] | None = None) -> None:
    """Add the per-position losses ``ce`` (1, T) of the sequence starting at chunk ``first_chunk`` to the chunks that
    own them (in place), keeping only owners in ``scored`` = [lo, hi) if given (see
    :meth:`retrolm.train.data.RetroSequences.scored`)."""
    _, T = targets.shape
    eos = -1 if eos_id is None else eos_id
    pos = np.arange(T)[None, :]
    owner = first_chunk + np.where(targets == eos, pos // chunk_len, (pos + 1) // chunk_len)
    lo, hi = scored if scored is not None else (0, len(nats))
    valid = (targets != IGNORE) & (owner >= lo) & (owner < min(hi, len(nats)))
    np.add.at(nats, owner[valid], ce[valid])
    np.add.at(count, owner[valid], 1)


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    seqs: RetroSequences,
    seq_ids: Sequence[int] | None = None,
    batch_size: int = 4,
    with_neighbours: bool = True,
    device: torch.device | None = None,
    desc: str = "score",
    show_progress: bool = False,
    bf16: bool = True,
) -> Scores:
    """Per-chunk nats of a RETRO-style ``model(idx, neighbours, mask)`` over sequences ``seq_ids`` (default: all) of
    ``seqs``, reading neighbours when ``with_neighbours`` (and the sequences have them); under bf16 autocast on CUDA
    unless ``bf16`` is False."""
    device = device or next(model.parameters()).device
    seq_ids = np.arange(len(seqs)) if seq_ids is None else np.asarray(seq_ids)
    n = seqs.source.n_chunks
    nats, count = np.zeros(n), np.zeros(n, dtype=np.int64)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(seq_ids), batch_size), desc=desc, unit="batch", disable=not show_progress,
                      leave=False):
        ids = seq_ids[start : start + batch_size]
        batch = seqs.batch(ids, with_neighbours).to(device)
        with autocast(device, bf16):
            logits = model(batch.idx, batch.neighbours, batch.neighbour_mask, **model_kwargs(model, batch)).logits
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                             reduction="none").view(batch.idx.shape).double().cpu().numpy()
        targets = batch.targets.cpu().numpy()
        for row, s in enumerate(ids):  # sequences need not be consecutive (validation draws them at random)
            book_losses(nats, count, ce[row : row + 1], targets[row : row + 1], seqs.start(int(s)), seqs.m, seqs.eos_id,
                        seqs.scored(int(s)))
    model.train(was_training)
    return Scores(nats, count)
