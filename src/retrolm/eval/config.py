"""Typed configs of ``retrolm eval`` and ``retrolm scale`` (YAML + ``key=value``; saved next to the results)."""

from __future__ import annotations

from dataclasses import dataclass, field

from retrolm.core.errors import RetrolmError
from retrolm.db.meta import needs_folder
from retrolm.retrieval.neighbours import MAX_NEIGHBOURS


@dataclass
class EvalConfig:
    """What ``retrolm eval`` / ``retrolm scale`` evaluate, and how; saved as config.yaml next to the results."""

    checkpoint: str = ""
    """RETRO (or baseline) checkpoint folder, or a run folder (its newest checkpoint)."""
    db: str = ""
    """Retrieval database used at evaluation (its tokenizer and chunk length must match the checkpoint's)."""
    data: list[str] = field(default_factory=list)
    """Held-out corpus paths (files or folders, any format the database ingests)."""
    baselines: list[str] = field(default_factory=list)
    """Baseline checkpoints (no RETRO layers) scored on the same chunks."""
    out_dir: str = "runs/eval"
    """Where the report, plots, JSON and this config are written."""
    neighbours: int | None = None
    """k neighbours per chunk at evaluation (RETRO; None → as trained), or passages in the context (in-context
    retrieval; None → 1)."""
    retrieval: bool = True
    """False → score the checkpoint with retrieval switched off only."""
    retriever: str = "auto"
    """auto | dense | bm25 | hybrid: how held-out text retrieves (auto: dense if the database has dense keys, else
    BM25)."""
    stride: int = 32
    """In-context retrieval (a pretrained LM as the checkpoint): tokens predicted per retrieval."""
    query_tokens: int = 32
    """In-context retrieval: the query is this many of the most recent tokens."""
    context_tokens: int = 512
    """In-context retrieval: document tokens kept before the predicted ones (with and without retrieval)."""
    continuation: bool = True
    """In-context retrieval: a passage is the retrieved chunk plus its continuation."""
    in_context: bool = False
    """Read a retrolm decoder without RETRO layers (a baseline trained from scratch) with in-context retrieval, as a
    pretrained LM is read (its windows must fit its seq_len: passage + context_tokens + stride)."""
    leakage_neighbours: int = 10
    """Neighbours whose overlap with a chunk defines r(C) (the paper uses the 10 nearest)."""
    near_dup_threshold: float = 0.8
    """Exclude database documents whose n-gram similarity to an evaluation document reaches this; 0 = off."""
    near_dup_measure: str = "jaccard"
    """jaccard (the RETRO paper's, for whole documents) | containment (share of the evaluation document's n-grams
    inside one database document: use it when the held-out documents are excerpts of files the database may hold)."""
    ngram: int = 13
    """n of the n-grams of the near-duplicate test."""
    novel_tokens: int = 8
    """A chunk is *novel* when the longest run of tokens it shares with its neighbours is under this share of a full
    chunk (8 of 64: r(C) < 12.5%), measured against its own length: a short last chunk copied whole is not novel."""
    max_docs: int | None = None
    """Evaluate only the first N held-out documents."""
    shuffle_neighbours: bool = False
    """Control for trained readers (RETRO, RETRO-fitting): every held-out chunk reads the neighbours retrieved for a
    random chunk of *another* held-out document — text of the same kind, unrelated to the chunk. What gain remains is
    the new layers' own (e.g. a RETRO-fitted model's cross-attention adapting to the domain), not retrieval's. The
    leakage analysis still uses each chunk's own neighbours."""
    group_by: str | None = None
    """A field of the held-out JSONL records (e.g. ``bucket``): results and gains are also reported per group."""
    seq_len: int | None = None
    """Evaluation sequence length (a multiple of chunk_len); None → the shortest training length of the models."""
    context_chunks: int = 0
    """RETRO-style readers: each evaluation sequence after the first repeats the last ``context_chunks`` chunks of
    the one before as context only, and scores the rest. A sequence's first chunk reads no neighbours (nothing was
    retrieved before it), so with 0 one chunk in seq_len/chunk_len is scored without retrieval; with
    seq_len/chunk_len − 1 every chunk reads and has seq_len − chunk_len tokens before it (as the in-context reader's
    ``context_tokens``), at seq_len/chunk_len forward passes per chunk."""
    batch_size: int = 4
    """Sequences per forward pass."""
    device: str | None = None
    """cpu | cuda (default: cuda if available)."""
    seed: int = 0
    """Seed of the random document order behind database-size subsets."""

    def __post_init__(self) -> None:
        needs_folder(self.db, "evaluation")  # before anything is written to the output folder
        if self.neighbours is not None and not 1 <= self.neighbours <= MAX_NEIGHBOURS:
            raise RetrolmError(f"neighbours must be in 1..{MAX_NEIGHBOURS}, got {self.neighbours}")
        if self.context_chunks < 0:
            raise RetrolmError(f"context_chunks must be >= 0, got {self.context_chunks}")
        if self.leakage_neighbours < 1 or self.novel_tokens < 1 or self.ngram < 1 or self.batch_size < 1:
            raise RetrolmError("leakage_neighbours, novel_tokens, ngram and batch_size must be positive")
        if not 0.0 <= self.near_dup_threshold <= 1.0:
            raise RetrolmError(f"near_dup_threshold must be in [0, 1], got {self.near_dup_threshold}")
        if self.near_dup_measure not in ("jaccard", "containment"):
            raise RetrolmError(f"near_dup_measure must be jaccard or containment, got {self.near_dup_measure!r}")
        for name in ("seq_len", "max_docs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RetrolmError(f"{name} must be positive, got {value}")
        if self.retriever not in ("auto", "dense", "bm25", "hybrid"):
            raise RetrolmError(f"retriever must be auto, dense, bm25 or hybrid, got {self.retriever!r}")
        for name in ("stride", "query_tokens", "context_tokens"):
            if getattr(self, name) < 1:
                raise RetrolmError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class ScaleConfig(EvalConfig):
    """``retrolm scale db-size | neighbours``: an evaluation repeated along one axis."""

    fractions: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    """db-size: fractions of the database's documents kept (nested random subsets)."""
    noise: list[str] = field(default_factory=list)
    """db-size: unrelated corpus paths added to a copy of the full database (a store that only grows with noise
    should change little)."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """neighbours: neighbour counts at evaluation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):  # NaN fails the test too
            raise RetrolmError(f"database fractions must be in (0, 1], got {self.fractions}")
        if not self.ks or not all(1 <= k <= MAX_NEIGHBOURS for k in self.ks):
            raise RetrolmError(f"neighbour counts must be in 1..{MAX_NEIGHBOURS}, got {self.ks}")
