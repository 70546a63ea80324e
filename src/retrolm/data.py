"""Training and evaluation data for RETRO: chunk-aligned sequences of T tokens with their neighbours.

A sequence is ``seq_chunks`` consecutive chunks of a :class:`ChunkStore` (the database itself, or held-out
documents tokenized the same way), so sequence chunk u *is* stored chunk u and its neighbours are the
precomputed ones. Documents start on chunk boundaries; the padding after a document's last token is
masked out of the loss, and that last token is trained to predict EOS (so generation knows where to stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrolm.chunks import ChunkStore
from retrolm.corpus import iter_documents
from retrolm.tokenizer import LMTokenizer

IGNORE = -100


def tokenize_corpus(paths: Sequence[str | Path], tokenizer: LMTokenizer, chunk_len: int, folder: Path) -> ChunkStore:
    """Tokenize and chunk documents (e.g. a held-out set) exactly as a database does, into ``folder``."""
    from retrolm.database import _tokenize_into_segment

    seg = Path(folder) / "seg-000000"
    _tokenize_into_segment(iter_documents(paths), tokenizer, seg, chunk_len, 0, 0, show_progress=False)
    return ChunkStore.open([seg], chunk_len, tokenizer.pad_id)


@dataclass
class Batch:
    """A training batch. ``neighbours`` is None when retrieval is off."""

    idx: torch.Tensor  # (B, T) input tokens
    targets: torch.Tensor  # (B, T) next tokens, IGNORE where there is nothing to predict
    neighbours: torch.Tensor | None  # (B, C, K, R) neighbour tokens (chunk + continuation)
    neighbour_mask: torch.Tensor | None  # (B, C, K, R) True for real tokens
    n_bytes: torch.Tensor  # (B,) UTF-8 bytes of the target text, for bits-per-byte

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(mv(self.idx), mv(self.targets), mv(self.neighbours), mv(self.neighbour_mask), self.n_bytes)


class RetroSequences:
    """Sequence ``s`` = chunks ``[s*C, (s+1)*C)`` of ``source`` with their neighbours from ``db_store``.

    Args:
        source: the chunks to train/evaluate on.
        seq_chunks: C, chunks per sequence (T = C * chunk_len).
        eos_id: target after a document's last token (None → not trained).
        neighbours: ``(source.n_chunks, K)`` neighbour chunk ids into ``db_store`` (-1 = missing), or None.
        db_store: the database's chunks, where neighbour tokens come from.
        num_neighbours: use only the first K' <= K neighbours.
    """

    def __init__(
        self,
        source: ChunkStore,
        seq_chunks: int,
        eos_id: int | None,
        neighbours: np.ndarray | None = None,
        db_store: ChunkStore | None = None,
        num_neighbours: int | None = None,
    ):
        if neighbours is not None and (db_store is None or len(neighbours) != source.n_chunks):
            raise ValueError("neighbours need db_store and one row per source chunk")
        self.source, self.C, self.eos_id = source, seq_chunks, eos_id
        self.m = source.chunk_len
        self.neighbours, self.db_store = neighbours, db_store
        self.k = num_neighbours or (neighbours.shape[1] if neighbours is not None else 0)
        self._doc = source.all_chunk_docs()
        self._last = np.zeros(source.n_chunks, dtype=bool)  # chunk is the last of its document
        ends = source.doc_first_chunk + source.doc_n_chunks - 1 - source.first_chunk
        self._last[ends] = True

    def __len__(self) -> int:
        return self.source.n_chunks // self.C

    def sequence(self, s: int, with_neighbours: bool = True) -> dict[str, np.ndarray]:
        m, C = self.m, self.C
        ids = np.arange(s * C, (s + 1) * C)
        toks = self.source.tokens(ids + self.source.first_chunk).astype(np.int64)  # (C, m)
        lens = self.source.lengths(ids + self.source.first_chunk).astype(np.int64)
        real = np.arange(m)[None, :] < lens[:, None]  # (C, m)
        flat = toks.reshape(-1)
        nxt = np.empty_like(flat)
        nxt[:-1] = flat[1:]
        last = ids[-1] + 1  # the token after the sequence, if it continues the same document
        nxt[-1] = (self.source.tokens([last + self.source.first_chunk])[0, 0]
                   if last < self.source.n_chunks and not self._last[ids[-1]] else IGNORE)
        targets = np.where(real.reshape(-1), nxt, IGNORE).reshape(C, m)
        # The last real token of a document predicts EOS; the padding after it predicts nothing.
        doc_end = self._last[ids]
        rows = np.flatnonzero(doc_end)
        targets[rows, lens[rows] - 1] = self.eos_id if self.eos_id is not None else IGNORE
        doc_idx = self._doc[ids] - self.source.first_doc
        out = {
            "idx": flat,
            "targets": targets.reshape(-1),
            # Bytes of the text predicted in this sequence: each chunk's share of its document's bytes.
            "n_bytes": np.float64(
                (self.source.doc_n_bytes[doc_idx] * lens / np.maximum(1, self.source.doc_n_tokens[doc_idx])).sum()
            ),
        }
        if with_neighbours and self.neighbours is not None and self.k > 0:
            nb = np.asarray(self.neighbours[ids, : self.k])  # (C, K)
            ntoks, nmask = self.db_store.neighbour_tokens(nb.reshape(-1))
            out["neighbours"] = ntoks.reshape(C, self.k, 2 * m)
            out["neighbour_mask"] = nmask.reshape(C, self.k, 2 * m)
        return out

    def batch(self, seqs: Sequence[int], with_neighbours: bool = True) -> Batch:
        items = [self.sequence(int(s), with_neighbours) for s in seqs]
        has_nb = "neighbours" in items[0]
        return Batch(
            idx=torch.from_numpy(np.stack([i["idx"] for i in items])),
            targets=torch.from_numpy(np.stack([i["targets"] for i in items])),
            neighbours=torch.from_numpy(np.stack([i["neighbours"] for i in items])) if has_nb else None,
            neighbour_mask=torch.from_numpy(np.stack([i["neighbour_mask"] for i in items])) if has_nb else None,
            n_bytes=torch.tensor([i["n_bytes"] for i in items], dtype=torch.float64),
        )
