"""Leakage analysis: how much of each evaluation chunk was simply present in what it retrieved.

For an evaluation chunk C and its retrieved neighbours (each a database chunk plus its continuation),
r(C) = (length of the longest run of consecutive tokens that C shares with any one neighbour) / (tokens in C).
r = 1: the chunk is in the database verbatim; r = 0: not a single token in common. The paper (Borgeaud et al.
2021, Fig. 6) reports bits-per-byte over the chunks with r(C) <= alpha for alpha from 0 to 1 and calls a chunk
*novel* when it shares fewer than 8 contiguous tokens with its neighbours (alpha = 12.5% for 64-token chunks;
here r(C) < 12.5% of the chunk's own length, so that a short last chunk is not novel by its length alone): a gain
that persists on novel chunks is generalisation, not copying.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrolm.train.scoring import bits_per_byte

ALPHAS = tuple(i / 16 for i in range(17))
"""The alpha grid of the leakage curve: 0, 1/16, …, 1 (contains the paper's 12.5%)."""


def longest_common_run(
    chunks: np.ndarray, lengths: np.ndarray, neighbours: np.ndarray, neighbour_mask: np.ndarray, block: int = 512
) -> np.ndarray:
    """Longest run of consecutive tokens each chunk shares with any of its neighbours.

    Args:
        chunks: (N, m) token ids; only the first ``lengths[i]`` of row i are real.
        lengths: (N,) real tokens per chunk.
        neighbours: (N, K, R) neighbour token ids (chunk + continuation).
        neighbour_mask: (N, K, R) True = real token; a run never crosses a masked position or two neighbours.

    Returns:
        (N,) int: the longest common substring length, in tokens (0 when nothing is shared).

    Dynamic programming over the chunk's positions, vectorised over chunks, neighbours and neighbour positions:
    ``run[j]`` = length of the common run ending at chunk position i and neighbour position j.
    """
    chunks, neighbours = np.asarray(chunks), np.asarray(neighbours)
    n, m = chunks.shape
    out = np.zeros(n, dtype=np.int64)
    for s in range(0, n, block):
        c, nb, nm = chunks[s : s + block], neighbours[s : s + block], np.asarray(neighbour_mask[s : s + block], bool)
        real = np.arange(m)[None, :] < np.asarray(lengths[s : s + block])[:, None]  # (b, m)
        run = np.zeros(nb.shape, dtype=np.int32)
        best = np.zeros(len(c), dtype=np.int32)
        for i in range(m):
            eq = (nb == c[:, i, None, None]) & nm & real[:, i, None, None]
            prev = np.zeros_like(run)
            prev[:, :, 1:] = run[:, :, :-1]
            run = np.where(eq, prev + 1, 0)
            best = np.maximum(best, run.max(axis=(1, 2)))
        out[s : s + block] = best
    return out


def overlap_ratio(lcs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """r(C): the longest common run divided by the chunk's real length."""
    return np.asarray(lcs, dtype=np.float64) / np.maximum(1, np.asarray(lengths))


def novel_chunks(overlap: np.ndarray, novel_tokens: int, chunk_len: int) -> np.ndarray:
    """The *novel* chunks: r(C) under ``novel_tokens / chunk_len`` (8 / 64 = 12.5%). As a ratio of the chunk's own
    length, so that a short last chunk found whole among the neighbours is not novel (a token count would call every
    chunk shorter than ``novel_tokens`` novel)."""
    return np.asarray(overlap) < novel_tokens / chunk_len


@dataclass
class LeakageCurve:
    """Bits-per-byte over the chunks with r(C) <= alpha, per model, for every alpha of the grid."""

    alphas: list[float]
    fraction: list[float]
    """Share of evaluation chunks with r(C) <= alpha."""
    bpb: dict[str, list[float]]
    """Model/mode name → bits-per-byte at each alpha."""


def leakage_curve(
    overlap: np.ndarray, n_bytes: np.ndarray, nats: dict[str, np.ndarray], alphas: tuple[float, ...] = ALPHAS
) -> LeakageCurve:
    """The paper's Figure 6 for the given per-chunk nats of each model, all on the same chunks."""
    fraction, bpb = [], {name: [] for name in nats}
    for a in alphas:
        sel = overlap <= a + 1e-9
        fraction.append(float(sel.mean()) if len(sel) else 0.0)
        for name, v in nats.items():
            bpb[name].append(bits_per_byte(v, n_bytes, sel))
    return LeakageCurve(list(alphas), fraction, bpb)


def overlap_by_rank(overlap: np.ndarray, hold: float = 0.5) -> list[dict[str, float]]:
    """What each neighbour rank holds of the text to predict, from an (n_chunks, K) overlap matrix (rows with a NaN
    are skipped): per rank j, the mean overlap, the share of chunks whose rank-j neighbour holds at least ``hold`` of
    it, the share for which rank j is the first neighbour holding the most (and at least ``hold``), and the share
    with such a neighbour anywhere among ranks 1..j. When the last column stops growing after rank 1 or 2, more
    neighbours add text to attend to but nothing to copy."""
    o = np.asarray(overlap, dtype=np.float64)
    o = o[~np.isnan(o).any(axis=1)]
    if not len(o):
        return []
    best = o.argmax(axis=1)  # first maximum: ties go to the better-ranked neighbour
    has = o.max(axis=1) >= hold
    within = np.maximum.accumulate(o, axis=1) >= hold
    return [{"rank": j + 1, "mean_overlap": float(o[:, j].mean()), "holds": float((o[:, j] >= hold).mean()),
             "best": float(((best == j) & has).mean()), "holds_within": float(within[:, j].mean())}
            for j in range(o.shape[1])]
