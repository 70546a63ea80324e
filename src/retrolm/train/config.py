"""Typed configs of the training recipes: the shared loop (:class:`LoopConfig`) and RETRO from scratch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from retrolm.core.errors import RetrolmError
from retrolm.models import PRESETS, RetroConfig
from retrolm.retrieval.neighbours import EXCLUDE_RULES, MAX_NEIGHBOURS


@dataclass
class ModelSpec:
    """Model shape: a preset from retrolm.model.PRESETS plus overrides (vocab and chunk length come from the db)."""

    preset: str = "tiny"
    """tiny | 25m | 100m | 150m."""
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    seq_len: int | None = None
    """Training sequence length T (a multiple of the database's chunk_len)."""
    retro_layers: list[int] | None = None
    """Decoder layers with chunked cross-attention; [] = the baseline decoder without retrieval."""
    enc_n_layer: int | None = None
    """Layers of the neighbour encoder (paper: 2)."""
    enc_d_model: int | None = None
    """Encoder width (default: d_model); a narrower encoder makes RETRO cheaper."""
    enc_n_head: int | None = None
    dropout: float | None = None
    checkpoint_activations: str | None = None
    """none | encoder | all: recompute those activations in the backward pass (less memory, same results; encoder
    took RETRO at the paper's width from 17.6 to 12.1 GiB for 11% of its throughput on an H200)."""

    def build(self, vocab_size: int, chunk_len: int, num_neighbours: int) -> RetroConfig:
        if self.preset not in PRESETS:
            raise RetrolmError(f"model.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        over = {k: v for k, v in asdict(self).items() if k != "preset" and v is not None}
        if "retro_layers" in over:
            over["retro_layers"] = tuple(over["retro_layers"])
        return RetroConfig.preset(self.preset, vocab_size=vocab_size, chunk_len=chunk_len,
                                  num_neighbours=num_neighbours, **over)


@dataclass
class LoopConfig:
    """The training loop shared by every recipe (RETRO from scratch, RETRO-fitting): data, optimiser, schedule,
    evaluation and checkpoints. Saved as config.yaml in the run folder and in every checkpoint."""

    db: str = "runs/quickstart/db"
    """Retrieval database: its chunks are the training data and its index serves the neighbours."""
    out_dir: str = "runs/train"
    """Run folder: checkpoints/, tensorboard/, neighbours/, config.yaml, metrics.jsonl."""
    num_neighbours: int = 2
    """k neighbours per chunk in training."""
    neighbour_exclude: str = "document"
    """document (paper) | near_duplicate (also every document holding >= neighbour_near_dup of the chunk's document's
    13-grams, or >= that share of whose 13-grams it holds: other versions of the same text, so that training reads
    related text, never a copy) | sequence (every document of the training sequence) | none."""
    neighbour_near_dup: float = 0.8
    """The containment threshold of ``neighbour_exclude=near_duplicate`` (the strict evaluation protocol's 0.8)."""
    retriever: str = "dense"
    """dense | bm25 | hybrid: how training neighbours are found."""
    neighbour_search: str = "auto"
    """auto | faiss | torch: how the training neighbours are searched. torch = exact inner product by matrix multiply
    on the GPU against the stored keys (dense retriever, flat or hnsw index); auto picks it when CUDA is available and
    the index stores exact keys, else the index's own FAISS search on the host."""
    neighbour_swap: float = 0.0
    """Share of training chunks (drawn per step) that read the neighbours of the same chunk of the next sequence in
    the batch instead of their own: distractors that teach the model to pass over neighbours holding nothing it needs,
    as most of a web-scale store's neighbours do for novel text. 0 = the paper's recipe; validation is never swapped.
    Best set when continuing a run that already reads its neighbours: from the first step it delays learning to read
    (docs/results.md, *Distractors in training*)."""
    neighbours_dir: str | None = None
    """Where the precomputed training neighbours are kept (default OUT/neighbours). Runs on the same database may share
    one folder: the first run with given neighbour settings (k, exclusion, retriever, sequence length) computes them,
    the others reuse them, waiting if it is still searching; other settings keep their own set in
    ``by-settings/<digest>/`` (a set made for another database version is recomputed in place)."""
    val_fraction: float = 0.05
    """Share of sequences held out (by a seeded shuffle) for validation."""
    data_offset: int = 0
    """Training sequences of the seeded order to skip before the first batch. Batches are a function of (seed, step),
    so a run continued with init_from would replay the batches of the run it continues; give it that run's
    steps × batch_size × grad_accum × ranks to read on to the sequences it has not seen."""
    steps: int = 200
    """Optimiser steps; 0 writes the model as built (checkpoint step-000000) and trains nothing — e.g. a RETRO-fitting
    with ``encoder=base``, which reads its neighbours before any training."""
    batch_size: int = 8
    """Sequences per optimizer step and rank, before accumulation."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    lr: float = 1e-3
    """Peak learning rate (after linear warmup; cosine decay to min_lr at the last step)."""
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    """AdamW weight decay of matrices (vectors are not decayed)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Gradient norm clipping (0: none)."""
    eval_every: int = 50
    """Steps between validation evaluations (bits per byte with and without retrieval)."""
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 3
    """Newest checkpoints kept (a checkpoint is never deleted for a newer one that is not good)."""
    log_every: int = 10
    seed: int = 0
    device: str | None = None
    """cpu | cuda | cuda:1 … (default: cuda if available)."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    compile: bool = False
    """torch.compile the model."""
    tensorboard: bool = True
    dist_timeout_minutes: int = 120
    """torchrun: how long ranks wait for each other (rank 0 alone precomputes the neighbours at setup)."""
    distributed: str = "ddp"
    """torchrun with several processes: ddp (each process holds the whole model, gradients are averaged) | fsdp
    (FSDP2: parameters, gradients and optimizer state are split over the processes, each decoder block gathered only
    while it runs — for models whose training state does not fit one device). Same batches, same results."""
    fsdp_reshard_after_forward: bool = True
    """fsdp: free each block's gathered weights after its forward and gather them again for backward (ZeRO-3); false
    keeps them until backward (less communication, more memory)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise RetrolmError("batch_size and grad_accum must be positive, steps >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise RetrolmError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.data_offset < 0:
            raise RetrolmError(f"data_offset must be >= 0, got {self.data_offset}")
        if self.neighbour_exclude not in EXCLUDE_RULES:
            raise RetrolmError(f"neighbour_exclude must be one of {', '.join(EXCLUDE_RULES)}, "
                               f"got {self.neighbour_exclude!r}")
        if not 0.0 < self.neighbour_near_dup <= 1.0:
            raise RetrolmError(f"neighbour_near_dup must be in (0, 1], got {self.neighbour_near_dup}")
        if not 0.0 <= self.neighbour_swap <= 1.0:
            raise RetrolmError(f"neighbour_swap must be in [0, 1], got {self.neighbour_swap}")
        if self.neighbour_swap and self.batch_size < 2:
            raise RetrolmError("neighbour_swap needs batch_size >= 2 (a chunk reads another sequence's neighbours)")
        if self.num_neighbours < 1 or self.keep_checkpoints < 1:
            raise RetrolmError("num_neighbours and keep_checkpoints must be positive")
        if self.num_neighbours > MAX_NEIGHBOURS:
            raise RetrolmError(f"num_neighbours must be at most {MAX_NEIGHBOURS}, got {self.num_neighbours}")
        for name in ("eval_every", "eval_batches", "save_every", "log_every"):
            if getattr(self, name) < 1:  # checked here, not as a ZeroDivisionError after the neighbour search
                raise RetrolmError(f"{name} must be >= 1, got {getattr(self, name)}")
        finite = all(math.isfinite(v) for v in (self.lr, self.min_lr, self.weight_decay))  # inf / NaN failed later
        if not finite or not self.lr > 0 or self.min_lr < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise RetrolmError(f"lr must be > 0 and min_lr, warmup_steps, weight_decay >= 0 (got lr={self.lr}, "
                               f"min_lr={self.min_lr}, warmup_steps={self.warmup_steps}, "
                               f"weight_decay={self.weight_decay})")
        if self.min_lr > self.lr:  # the cosine "decay" would climb from lr to min_lr
            raise RetrolmError(f"min_lr ({self.min_lr}) must be at most lr ({self.lr}): lower min_lr with lr")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise RetrolmError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.grad_clip >= 0:  # a negative bound turned every step into gradient ascent
            raise RetrolmError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.retriever not in ("dense", "bm25", "hybrid"):
            raise RetrolmError(f"retriever must be dense, bm25 or hybrid, got {self.retriever!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise RetrolmError(f"distributed must be ddp or fsdp, got {self.distributed!r}")
        if self.neighbour_search not in ("auto", "faiss", "torch"):
            raise RetrolmError(f"neighbour_search must be auto, faiss or torch, got {self.neighbour_search!r}")


@dataclass
class TrainConfig(LoopConfig):
    """``retrolm train``: RETRO (or the same-size baseline decoder) from scratch on a database."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """Model shape (vocabulary and chunk length come from the database)."""
    init_from: str | None = None
    """RETRO-fitting a retrolm model: a checkpoint or run folder (e.g. a baseline decoder) whose tensors initialise
    every tensor of the same name; ``model`` must give the same shape, and ``model.retro_layers`` adds chunked
    cross-attention, whose output projections start at zero (the model starts exactly as the loaded one). With the
    checkpoint's own shape and no ``freeze_init`` it is continued training under this run's optimizer and schedule."""
    freeze_init: bool = False
    """Freeze the loaded tensors: only the new ones (neighbour encoder, CCA) train, as in the paper's RETRO-fitting.
    With ``init_from`` a frozen RETRO-fitting of the same shape, that fitting is continued (e.g. under other settings)
    and what it froze stays frozen (each checkpoint of a frozen run records it in ``frozen.json``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze_init and not self.init_from:
            raise RetrolmError("freeze_init needs init_from (the checkpoint whose weights are frozen)")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay toward min_lr, which step ``cfg.steps`` would use: the last update (step
    ``steps - 1``) is one step short of it. Kept so, as every committed run was trained with it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
