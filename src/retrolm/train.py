"""Training RETRO (or the same-size baseline decoder) on a retrieval database, with exact resume.

One recipe, torchtune-style: :class:`Trainer` has ``setup / train / evaluate / save_checkpoint``. The data
are chunk-aligned sequences of the database's own chunks with precomputed neighbours (own document
excluded); the baseline differs only by ``model.retro_layers: []`` (same code path, data and loop).

Checkpoints are folders ``out_dir/checkpoints/step-000100/`` holding ``model.safetensors``, ``config.yaml``
(the full TrainConfig, model shape included), ``optimizer.pt`` and ``trainer.pt`` (step, RNG states); the
newest ``keep_checkpoints`` are kept. Multi-GPU: launch with ``torchrun --nproc_per_node N``; each rank
takes its own slice of every batch and gradients are averaged by DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retrolm.config import save_config
from retrolm.data import RetroSequences
from retrolm.database import Database
from retrolm.errors import RetrolmError
from retrolm.model import PRESETS, RetroConfig, RetroModel
from retrolm.neighbours import (
    NeighbourConfig,
    compute_neighbours,
    db_identity,
    load_neighbours,
    save_neighbours,
)
from retrolm.tokenizer import LMTokenizer

logger = logging.getLogger(__name__)


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

    def build(self, vocab_size: int, chunk_len: int, num_neighbours: int) -> RetroConfig:
        if self.preset not in PRESETS:
            raise RetrolmError(f"model.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        over = {k: v for k, v in asdict(self).items() if k != "preset" and v is not None}
        if "retro_layers" in over:
            over["retro_layers"] = tuple(over["retro_layers"])
        return RetroConfig.preset(self.preset, vocab_size=vocab_size, chunk_len=chunk_len,
                                  num_neighbours=num_neighbours, **over)


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.yaml in the run folder and in every checkpoint."""

    db: str = "runs/quickstart/db"
    """Retrieval database: its chunks are the training data and its index serves the neighbours."""
    out_dir: str = "runs/train"
    """Run folder: checkpoints/, tensorboard/, neighbours/, config.yaml, metrics.jsonl."""
    model: ModelSpec = field(default_factory=ModelSpec)
    num_neighbours: int = 2
    """k neighbours per chunk in training."""
    neighbour_exclude: str = "document"
    """document (paper) | sequence (stricter) | none."""
    val_fraction: float = 0.05
    """Share of sequences held out (by a seeded shuffle) for validation."""
    steps: int = 200
    batch_size: int = 8
    """Sequences per optimizer step and rank, before accumulation."""
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 3
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

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise RetrolmError("steps, batch_size and grad_accum must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise RetrolmError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """setup → train (→ evaluate, save_checkpoint) → cleanup."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.step = 0
        self.writer = None

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool = True, show_progress: bool = True) -> None:
        cfg = self.cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            # rank 0 precomputes the neighbours while the others wait at a barrier: allow for a large database
            timeout = datetime.timedelta(minutes=cfg.dist_timeout_minutes)
            torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                                 timeout=timeout)
        default = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(cfg.device or default)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
        self.main = self.rank == 0
        self.show = show_progress and self.main

        self.db = Database.open(cfg.db)
        if self.db.deleted_docs.any():
            # training sequences are runs of stored chunks: deleted text would still be trained on
            raise RetrolmError(f"{cfg.db}: has deleted documents; run `retrolm db compact {cfg.db}` before training")
        self.model_cfg = cfg.model.build(self.db.tokenizer.vocab_size, self.db.chunk_len, cfg.num_neighbours)
        if self.model_cfg.seq_len % self.db.chunk_len:
            raise RetrolmError(
                f"model seq_len {self.model_cfg.seq_len} is not a multiple of chunk_len {self.db.chunk_len}"
            )
        self.retrieval = bool(self.model_cfg.retro_layers)
        seq_chunks = self.model_cfg.seq_len // self.db.chunk_len

        neighbours = None
        if self.retrieval:
            neighbours = self._neighbours(seq_chunks, show_progress)
        self.seqs = RetroSequences(self.db.store, seq_chunks, self.db.tokenizer.eos_id, neighbours, self.db.store,
                                   cfg.num_neighbours, tokenizer=self.db.tokenizer)
        if len(self.seqs) < 2:
            raise RetrolmError(f"{cfg.db}: too little data for sequences of {self.model_cfg.seq_len} tokens")
        order = np.random.default_rng(cfg.seed).permutation(len(self.seqs))
        n_val = max(1, round(cfg.val_fraction * len(order))) if cfg.val_fraction > 0 else 0
        self.val_ids, self.train_ids = order[:n_val], order[n_val:]

        torch.manual_seed(cfg.seed)
        self.model = RetroModel(self.model_cfg).to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused,
        )
        if resume:
            self._maybe_resume()
        self.forward_model = self.model
        if cfg.compile:
            self.forward_model = torch.compile(self.model)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(self.forward_model,
                                                         device_ids=[self.device.index] if fused else None)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            (self.out / "model.json").write_text(json.dumps(self.model_cfg.to_dict(), indent=2))
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.out / "tensorboard"))
                except ImportError:
                    logger.warning("tensorboard is not installed; metrics go to metrics.jsonl only")
        logger.info("model: %.2fM parameters (%s), retrieval %s, %d train / %d val sequences of %d tokens",
                    self.model.num_params() / 1e6, "RETRO" if self.retrieval else "baseline",
                    "on" if self.retrieval else "off", len(self.train_ids), len(self.val_ids), self.model_cfg.seq_len)

    def _neighbours(self, seq_chunks: int, show_progress: bool) -> np.ndarray:
        folder = self.out / "neighbours"
        ncfg = NeighbourConfig(k=self.cfg.num_neighbours, exclude=self.cfg.neighbour_exclude, seq_chunks=seq_chunks)
        if self.main and not self._neighbours_reusable(folder, ncfg):
            nb = compute_neighbours(self.db, config=ncfg, show_progress=show_progress)
            save_neighbours(folder, nb, self.db, ncfg)
        if self.world > 1:  # every rank waits here, whatever it would have decided on its own
            torch.distributed.barrier()
        return load_neighbours(folder, self.db)

    def _neighbours_reusable(self, folder: Path, ncfg: NeighbourConfig) -> bool:
        """A saved neighbour set made with the same settings for this database version (resume, reruns)."""
        if not (folder / "neighbours.json").is_file():
            return False
        saved = json.loads((folder / "neighbours.json").read_text())
        return saved["config"] == asdict(ncfg) and saved.get("db_identity") == db_identity(self.db)

    # ------------------------------------------------------------------ data
    def _batch_ids(self, step: int, micro: int) -> np.ndarray:
        """Sequence ids of micro-batch ``micro`` of ``step`` for this rank: a pure function of (seed, step)."""
        cfg = self.cfg
        per_step = cfg.batch_size * cfg.grad_accum * self.world
        pos = step * per_step
        epoch, offset = divmod(pos, len(self.train_ids))
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(self.train_ids)
        ids = np.concatenate([perm, np.random.default_rng([cfg.seed, epoch + 1]).permutation(self.train_ids)])
        step_ids = ids[offset : offset + per_step]
        start = (micro * self.world + self.rank) * cfg.batch_size
        return step_ids[start : start + cfg.batch_size]

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.show)
        t0, tokens = time.perf_counter(), 0
        while self.step < cfg.steps:
            lr = lr_at(self.step, cfg)
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.model.train()
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                batch = self.seqs.batch(self._batch_ids(self.step, micro), with_neighbours=self.retrieval)
                batch = batch.to(self.device)
                sync = micro == cfg.grad_accum - 1 or self.world == 1
                ctx = contextlib.nullcontext() if sync else self.forward_model.no_sync()
                with ctx, self._autocast():
                    out = self.forward_model(batch.idx, batch.neighbours, batch.neighbour_mask, batch.targets)
                    loss = out.loss / cfg.grad_accum
                loss.backward()
                loss_sum += float(loss.detach())
                tokens += batch.idx.numel() * self.world
            if self.world > 1:  # log the loss of the global batch, not of this rank's slice
                t = torch.tensor([loss_sum], device=self.device)
                torch.distributed.all_reduce(t)
                loss_sum = float(t) / self.world
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                dt = time.perf_counter() - t0
                last = {"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": gnorm,
                        "train/tokens_per_s": tokens / max(dt, 1e-9)}
                self._log(last)
                t0, tokens = time.perf_counter(), 0
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                last.update(self._log(self.evaluate()))
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        return last

    @torch.no_grad()
    def evaluate(self, retrieval: bool | None = None) -> dict[str, float]:
        """Validation loss and bits-per-byte, with retrieval (RETRO) and with it switched off."""
        self.model.eval()
        results = {}
        modes = [True, False] if self.retrieval else [False]
        for mode in modes if retrieval is None else [retrieval]:
            nats, count, nbytes = 0.0, 0, 0.0
            for i in range(0, min(len(self.val_ids), self.cfg.eval_batches * self.cfg.batch_size), self.cfg.batch_size):
                batch = self.seqs.batch(self.val_ids[i : i + self.cfg.batch_size], with_neighbours=mode).to(self.device)
                with self._autocast():
                    logits = self.model(batch.idx, batch.neighbours, batch.neighbour_mask).logits
                valid = batch.targets != -100
                lp = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                                                       ignore_index=-100, reduction="sum")
                nats += float(lp)
                count += int(valid.sum())
                nbytes += float(batch.n_bytes.sum())
            tag = "val" if mode or not self.retrieval else "val_no_retrieval"
            results[f"{tag}/loss"] = nats / max(count, 1)
            results[f"{tag}/bpb"] = nats / math.log(2) / max(nbytes, 1.0)
        self.model.train()
        return results

    def _log(self, metrics: dict[str, float]) -> dict[str, float]:
        if not self.main:
            return metrics
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, self.step)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        logger.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        if not self.main:
            return None
        from safetensors.torch import save_model

        ckpts = self.out / "checkpoints"
        final = ckpts / f"step-{self.step:06d}"
        tmp = ckpts / f".step-{self.step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.model, str(tmp / "model.safetensors"))
        save_config(self.cfg, tmp / "config.yaml")
        (tmp / "model.json").write_text(json.dumps(self.model_cfg.to_dict(), indent=2))
        self.db.tokenizer.save(tmp / "tokenizer.json")  # a checkpoint generates and evaluates without its database
        torch.save(self.opt.state_dict(), tmp / "optimizer.pt")
        torch.save({"step": self.step, "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                    "python_rng": random.getstate(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(ckpts.glob("step-*"))[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _maybe_resume(self) -> None:
        ckpts = sorted((self.out / "checkpoints").glob("step-*"))
        if not ckpts:
            return
        from safetensors.torch import load_model

        last = ckpts[-1]
        load_model(self.model, str(last / "model.safetensors"), device=str(self.device))
        self.opt.load_state_dict(torch.load(last / "optimizer.pt", map_location=self.device, weights_only=False))
        state = torch.load(last / "trainer.pt", weights_only=False)
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        logger.info("resumed from %s", last)

    def cleanup(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.world > 1:
            torch.distributed.destroy_process_group()


@dataclass
class Checkpoint:
    """A trained model loaded from a checkpoint folder, with what it needs to run."""

    model: RetroModel
    """The model, in eval mode."""
    tokenizer: LMTokenizer
    """The LM tokenizer it was trained with (saved in the checkpoint)."""
    config: dict[str, Any]
    """The TrainConfig that produced it, as a plain dict ({} if config.yaml is missing)."""
    path: Path
    """The checkpoint folder (``.../checkpoints/step-NNNNNN``)."""

    @property
    def step(self) -> int:
        return int(self.path.name.split("-")[-1]) if self.path.name.startswith("step-") else 0

    @property
    def retrieval(self) -> bool:
        """True for a RETRO model, False for a baseline decoder without chunked cross-attention."""
        return bool(self.model.config.retro_layers)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder → its newest checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = sorted((path / "checkpoints").glob("step-*"))
        if not found:
            raise RetrolmError(f"{path}: run folder has no checkpoints")
        path = found[-1]
    if not (path / "model.safetensors").is_file():
        raise RetrolmError(f"{path}: not a checkpoint folder (no model.safetensors)")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder (or a run folder: its newest checkpoint) with its tokenizer and config."""
    from safetensors.torch import load_model

    path = resolve_checkpoint(path)
    try:
        model_cfg = RetroConfig.from_dict(json.loads((path / "model.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise RetrolmError(f"{path / 'model.json'}: unreadable ({e})") from None
    import yaml

    train_cfg = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    if (path / "tokenizer.json").is_file():
        tokenizer = LMTokenizer.from_file(path / "tokenizer.json")
    elif (Path(train_cfg.get("db", "")) / "tokenizer.json").is_file():  # checkpoints written before it was saved
        tokenizer = LMTokenizer.from_file(Path(train_cfg["db"]) / "tokenizer.json")
    else:
        raise RetrolmError(f"{path}: no tokenizer.json in the checkpoint and its training database is gone")
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise RetrolmError(
            f"{path}: tokenizer has {tokenizer.vocab_size} entries, the model {model_cfg.vocab_size} embeddings"
        )
    model = RetroModel(model_cfg)
    try:
        load_model(model, str(path / "model.safetensors"), device=str(device))
    except Exception as e:  # safetensors raises several types for truncated / mismatched files
        raise RetrolmError(f"{path / 'model.safetensors'}: cannot load ({e})") from None
    return Checkpoint(model.to(device).eval(), tokenizer, train_cfg, path)
