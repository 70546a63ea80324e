"""The training loop, with exact resume: RETRO (or the same-size baseline) from scratch, and the base for RETRO-fitting.

One recipe, torchtune-style: :class:`Trainer` has ``setup / train / evaluate / save_checkpoint / cleanup``; a recipe
subclass says which model it trains (:meth:`Trainer.build_model`) and how that model is saved and loaded. The data
are chunk-aligned sequences of the database's own chunks with precomputed neighbours (own document excluded); the
baseline differs only by ``model.retro_layers: []`` (same code path, data and loop).

Checkpoints are folders ``out_dir/checkpoints/step-000100/`` (see :mod:`retrolm.train.checkpoints`). Resume is exact:
the batches are a pure function of (seed, step), and the RNG states (dropout) are restored. A non-finite loss stops
the run before anything is saved. Multi-GPU: launch with ``torchrun --nproc_per_node N``; each rank takes its own
slice of every batch and gradients are averaged by DDP, or with ``distributed=fsdp`` the weights, gradients and
optimizer state are split over the ranks (:mod:`retrolm.train.distributed`); checkpoints are the same either way.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from retrolm.core.config import save_config
from retrolm.core.device import autocast, default_device, peak_memory_gib
from retrolm.core.errors import RetrolmError, first_line
from retrolm.core.hub import find_checkpoint
from retrolm.core.io import exclusive_lock, output_folder, read_json, read_json_object, write_bytes, write_json
from retrolm.db import DatabaseView
from retrolm.models import RetroModel
from retrolm.models.weights import load_weights, read_model_config, read_weights, tied_aliases
from retrolm.retrieval import get_retriever
from retrolm.retrieval.neighbours import (
    NeighbourConfig,
    compute_neighbours,
    db_identity,
    document_families,
    load_neighbours,
    near_duplicate_groups,
    rule_outdated,
    save_neighbours,
)
from retrolm.train.checkpoints import CheckpointManager, ResumeRefused, aside_path, set_aside
from retrolm.train.config import LoopConfig, TrainConfig, lr_at
from retrolm.train.data import IGNORE, RetroSequences, model_kwargs, n_sequences, swap_neighbours
from retrolm.train.distributed import (
    from_main,
    full_model_state,
    full_norm,
    full_optimizer_state,
    load_model_state,
    load_optimizer_state,
    local_bytes,
    optimizer_state_error,
    shard,
)
from retrolm.train.scoring import score_sequences

logger = logging.getLogger(__name__)

RUN_LOCK = ".run.lock"
"""The file a training run locks in its folder from setup to the end of training (not ``.lock``: the neighbour folder's
lock, which may be the same folder)."""


RESUMABLE_CHANGES = frozenset({"dropout", "lora_dropout", "checkpoint_activations", "base", "base_fingerprint"})
"""Model settings a run may resume under changed: regularisation and memory, and the base's location and fingerprint
(a RETRO-fitted base is checked by its own rule: a fingerprint recorded as unknown only warns)."""
DECODER_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "rope_theta", "tie_embeddings", "bias",
                  "norm_eps")
"""What ``init_from`` must share with the model it starts (the decoder); retrieval settings and seq_len may change."""


def config_changes(saved: dict, model: torch.nn.Module, keys: Sequence[str]) -> list[str]:
    """``"key old → new"`` for each of ``keys`` where a checkpoint's ``model.json`` (``saved``) and ``model``'s config
    differ (a key the checkpoint lacks, written by an older version, is not compared)."""
    now = json.loads(json.dumps(model.config.to_dict()))  # as model.json holds it: tuples as lists
    return [f"{k} {saved[k]!r} → {now.get(k)!r}" for k in keys if k in saved and saved[k] != now.get(k)]


def database_record(db: DatabaseView) -> dict:
    """What a checkpoint records about the database it was trained on (checked by eval and generate)."""
    return {"path": str(db.path.resolve()), "chunk_len": db.chunk_len, "tokenizer_sha256": db.tokenizer.sha256,
            "encoder": db.meta.get("encoder")}


def init_from_checkpoint(model: RetroModel, ref: str, db: DatabaseView, freeze: bool) -> list[str]:
    """RETRO-fitting a retrolm model: load every tensor of checkpoint ``ref`` into ``model`` (same names and shapes),
    start each chunked cross-attention at zero output, and optionally freeze the loaded tensors. Returns the names of
    the tensors that stay new (encoder, CCA; none when ``model`` has the checkpoint's shape: continued training)."""
    folder = find_checkpoint(ref)
    if folder is None:
        raise RetrolmError(f"{ref}: init_from must be a retrolm checkpoint or run folder (no model.json)")
    record = folder / "database.json"
    if record.is_file():
        sha = read_json_object(record, "database record").get("tokenizer_sha256")
        if sha and sha != db.tokenizer.sha256:
            raise RetrolmError(f"{folder}: trained with another tokenizer than the database {db.path}")
    saved = read_model_config(folder)
    # same-shaped tensors of another decoder would load without a word
    if saved.get("architecture") == "retro" and (changed := config_changes(saved, model, DECODER_FIELDS)):
        raise RetrolmError(f"{folder}: init_from holds another decoder ({', '.join(changed)}); give model the "
                           "checkpoint's shape (only retrieval settings and seq_len may differ)")
    missing = set(load_weights(model, folder, strict=False))
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(t) for name, t in tensors.items() if name not in missing}
    new = [name for name in missing if id(tensors[name]) not in loaded]  # a tied alias of a loaded tensor is not new
    trainable = new
    if not new and freeze:
        # continuing a frozen RETRO-fitting (e.g. under other settings): keep frozen what that fitting froze
        base = frozen_by(folder)
        if base is None:
            raise RetrolmError(f"{folder}: init_from holds every tensor of the model and was not a frozen "
                               "RETRO-fitting, so freeze_init would leave nothing to train; add model.retro_layers "
                               "to RETRO-fit it")
        held = {id(t) for name, t in tensors.items() if name in base}
        trainable = [name for name, t in tensors.items() if id(t) not in held]
    # Without new tensors and unfrozen this is continued training under a fresh optimizer and schedule (e.g. the
    # fair reference of an unfrozen RETRO-fitting run: the baseline trained on just as long without retrieval).
    for block in model.blocks:
        # a new CCA adds exact zeros at first (the loaded model's predictions are kept); a loaded one keeps its weights
        if block.cca is not None and id(block.cca.attn.proj.weight) not in loaded:
            torch.nn.init.zeros_(block.cca.attn.proj.weight)
            if block.cca.attn.proj.bias is not None:
                torch.nn.init.zeros_(block.cca.attn.proj.bias)
    if freeze:
        fresh = set(trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(name in fresh)
    logger.info("initialised from %s; new tensors: %d%s", folder, len(new),
                f", all but {len(trainable)} frozen" if freeze else "")
    return new


FROZEN_FILE = "frozen.json"
"""A checkpoint's record of the state-dict names its run kept frozen (written only when some were)."""


def frozen_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of ``model`` that training does not change: frozen parameters and buffers. Empty when every
    parameter trains (buffers alone do not make a run frozen)."""
    if all(p.requires_grad for p in model.parameters()):
        return []
    return sorted(name for name, t in model.state_dict(keep_vars=True).items() if not t.requires_grad)


def frozen_by(folder: Path) -> set[str] | None:
    """The tensor names the run that wrote checkpoint ``folder`` kept frozen, or None when that run froze nothing.
    Read from the checkpoint's frozen.json; a checkpoint written before that file existed is answered from its
    config: the names of the checkpoint its ``freeze_init`` fitting started from (followed back through continued
    frozen fittings, which needs those checkpoints to still exist)."""
    from safetensors import safe_open

    record = folder / FROZEN_FILE
    if record.is_file():
        names = read_json(record, "record of frozen tensors")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RetrolmError(f"{record}: expected a list of tensor names")
        return set(names) or None
    cfg_path = folder / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    except yaml.YAMLError:
        raise RetrolmError(f"{cfg_path}: not valid YAML") from None
    if not isinstance(cfg, dict) or not cfg.get("freeze_init") or not cfg.get("init_from"):
        return None
    parent = find_checkpoint(cfg["init_from"])
    if parent is None:
        raise RetrolmError(f"{folder}: continues a frozen RETRO-fitting of {cfg['init_from']}, which is no longer a "
                           "checkpoint, so which tensors stay frozen is unknown")

    def names(checkpoint: Path) -> set[str]:
        try:
            with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
                return set(f.keys())
        except Exception as e:  # missing or truncated file: several exception types
            raise RetrolmError(f"{checkpoint / 'model.safetensors'}: cannot read ({type(e).__name__})") from None

    base = names(parent)
    return frozen_by(parent) if base == names(folder) else base


def neighbour_settings(config: dict) -> dict:
    """The settings that make a neighbour set what it is (a set saved before a setting existed used its default)."""
    config = {**asdict(NeighbourConfig()), **config}
    if config["exclude"] != "near_duplicate":
        del config["near_dup_threshold"]  # only that rule reads it
    return config


def _changes(saved: dict | None, now: dict) -> list[str]:
    """``key old → new`` for each setting of ``now`` that ``saved`` (a checkpoint's record) holds otherwise; none when
    the checkpoint has no record (written before it existed) or either side is empty (a baseline reads no neighbours:
    resuming one as RETRO, or RETRO as one, is another model, which the model check refuses)."""
    if not saved or not now:
        return []
    return [f"{k} {saved.get(k)} → {v}" for k, v in now.items() if saved.get(k) != v] + \
        [f"{k} {v} → none" for k, v in saved.items() if k not in now]


def _saved_neighbour_set(folder: Path) -> dict | None:
    record = folder / "neighbours.json"
    return read_json(record, "neighbour description") if record.is_file() else None


def neighbour_folder(root: Path, ncfg: NeighbourConfig) -> Path:
    """Where the training neighbours of ``ncfg`` live in a neighbours folder: the folder itself when it is empty or
    holds a set of these settings (for this or another database version), else ``by-settings/<digest>/``, so runs
    with other settings sharing the folder keep their own sets instead of replacing each other's."""
    saved = _saved_neighbour_set(root)
    wanted = neighbour_settings(asdict(ncfg))
    if saved is None or neighbour_settings(saved["config"]) == wanted:
        return root
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    return root / "by-settings" / digest


class Trainer:
    """setup → train (→ evaluate, save_checkpoint) → cleanup. Trains RETRO (or its baseline) from scratch."""

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        self.out = output_folder(cfg.out_dir, "train", run_ok=True)
        self._run_lock: contextlib.ExitStack | None = None
        self.step = 0
        self.writer = None
        self.checkpoints = CheckpointManager(self.out / "checkpoints", cfg.keep_checkpoints)
        self._resume = False  # setup's: a RETRO-fitting resumes from its own checkpoints when init_from is gone
        self._near_dup_groups: list[np.ndarray] | None = None
        self.sharded = False
        self._full_model: dict[str, torch.Tensor] | None = None
        self._full_optimizer: dict | None = None

    # ------------------------------------------------------------------ what a recipe trains
    def build_model(self) -> torch.nn.Module:
        """The model to train, on the CPU (RETRO from ``cfg.model``; the vocabulary and chunk length of the db)."""
        assert isinstance(self.cfg, TrainConfig)
        model_cfg = self.cfg.model.build(self.db.tokenizer.vocab_size, self.db.chunk_len, self.cfg.num_neighbours)
        model = RetroModel(model_cfg)
        own = self.checkpoints.all() if self._resume else []
        if self.cfg.init_from and own and find_checkpoint(self.cfg.init_from) is None:
            # resuming a fitting whose starting checkpoint is gone: its own checkpoints hold every tensor, and
            # frozen.json what the fitting froze (the weights come in with the resume)
            if self.cfg.freeze_init:
                frozen = frozen_by(own[-1]) or set()
                for name, p in model.named_parameters():
                    p.requires_grad_(name not in frozen)
            logger.info("%s is gone; resuming from the run's own checkpoints", self.cfg.init_from)
        elif self.cfg.init_from:
            init_from_checkpoint(model, self.cfg.init_from, self.db, self.cfg.freeze_init)
        return model

    @property
    def retrieval(self) -> bool:
        """Whether the model reads neighbours (False for the baseline decoder)."""
        return bool(self.model.config.retro_layers)

    @property
    def seq_len(self) -> int:
        return self.model.config.seq_len

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def save_model(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the model into checkpoint ``folder`` (``state``: its full tensors, gathered from a sharded model)."""
        self.model.save_pretrained(folder, state=state)

    def load_model(self, folder: Path) -> None:
        """Resume: the checkpoint's weights into the freshly built model (sharded: every rank keeps its shard of
        them and of the optimizer state, :meth:`_load_sharded`)."""
        if self.sharded:
            self._load_sharded(folder)
        else:
            load_weights(self.model, folder, self.device)

    def _load_sharded(self, folder: Path) -> None:
        """A checkpoint into the sharded model and its optimizer. Rank 0 alone reads and checks the files (one copy
        of the model in host memory) and tells every rank the verdict before any tensor is sent, so that all fail
        or go on together; the others receive their shards."""
        error = model_state = optimizer_state = None
        if self.main:
            try:
                model_state = self._read_full_model(folder)
                optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
                if (why := optimizer_state_error(self.model, self.opt, optimizer_state)) is not None:
                    error = f"{folder / 'optimizer.pt'}: {why}"
            except RetrolmError as e:
                error = str(e)
            except Exception as e:  # a truncated or foreign file: several exception types
                error = f"{folder}: cannot load ({first_line(e)})"
        if (error := from_main(error)) is not None:
            raise RetrolmError(error)
        load_model_state(self.model, model_state)
        load_optimizer_state(self.model, self.opt, optimizer_state)

    def _read_full_model(self, folder: Path) -> dict[str, torch.Tensor]:
        """Rank 0: the checkpoint's tensors, checked against the model's names and (global) shapes, with tied
        weights under each of their names."""
        path = folder / "model.safetensors"
        state = read_weights(folder)
        model = self.model.state_dict()
        extra = sorted(set(state) - set(model))
        if extra:
            raise RetrolmError(f"{path}: holds tensors the model does not have: {', '.join(extra[:5])}")
        missing = sorted(self.model.saved_names() - set(state))
        if missing:
            raise RetrolmError(f"{path}: misses tensors of the model: {', '.join(missing[:5])}")
        for name, t in state.items():
            if tuple(t.shape) != tuple(model[name].shape):
                raise RetrolmError(f"{path}: {name} has shape {tuple(t.shape)}, the model's is "
                                   f"{tuple(model[name].shape)}")
        for alias, stored in tied_aliases(self.model).items():
            if stored in state:
                state.setdefault(alias, state[stored])
        return state

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool = True, show_progress: bool = True) -> None:
        """Build the model, data and neighbours, and resume from the newest intact checkpoint (unless ``resume`` is
        False); the run folder is this process's until :meth:`train` ends, :meth:`cleanup` or a failed setup."""
        fresh = not self.out.exists()
        try:
            self._setup(resume, show_progress)
        except BaseException:
            if fresh and self.out.is_dir() and {p.name for p in self.out.iterdir()} <= {RUN_LOCK}:
                shutil.rmtree(self.out, ignore_errors=True)  # a run refused at its checks leaves no folder behind
            self._release_run()  # after the removal: another run taking the folder meanwhile keeps its lock file
            raise

    def _setup(self, resume: bool, show_progress: bool) -> None:
        cfg = self.cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            # rank 0 precomputes the neighbours while the others wait at a barrier: allow for a large database
            timeout = datetime.timedelta(minutes=cfg.dist_timeout_minutes)
            torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                                 timeout=timeout)
        default = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = default_device(cfg.device or default)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
        self.main = self.rank == 0
        self.show = show_progress and self.main
        self.sharded = self.world > 1 and cfg.distributed == "fsdp"
        if self.main:  # a second run into the folder wrote every metrics row twice, or saved over the other's model
            self._release_run()
            self._run_lock = contextlib.ExitStack()
            self._run_lock.enter_context(exclusive_lock(self.out, timeout=0, name=RUN_LOCK,
                                                        what="training run (out_dir; or a trainer of this process "
                                                             "that has not ended)"))
        metrics = self.out / "metrics.jsonl"
        earlier = metrics.read_text() if self.main and metrics.is_file() else ""
        if earlier and not earlier.endswith("\n"):  # a row torn by a crash: this run's rows start on a line of its own
            with open(metrics, "a") as f:
                f.write("\n")
        earlier_rows = len(earlier.splitlines())  # before this run's own

        self.db = DatabaseView.open(cfg.db)
        if self.db.deleted_docs.any():
            # training sequences are runs of stored chunks: deleted text would still be trained on
            raise RetrolmError(f"{cfg.db}: has deleted documents; run `retrolm db compact {cfg.db}` before training")
        torch.manual_seed(cfg.seed)
        self._resume = resume
        self.model = self.build_model().to(self.device)
        # every rank builds the same model from the same seed; from here on each draws its own dropout masks (with
        # one seed they drew the same masks on their different batches). Rank 0 goes on as a single process does.
        if self.rank:
            torch.manual_seed(cfg.seed + 1000 * self.rank)
        if self.seq_len % self.db.chunk_len:
            raise RetrolmError(f"sequence length {self.seq_len} is not a multiple of chunk_len {self.db.chunk_len}")
        seq_chunks = self.seq_len // self.db.chunk_len
        # the split and the size of a step are checked before the neighbour search, which can take hours
        n_seqs = n_sequences(self.db.store.n_chunks, seq_chunks)
        if n_seqs < 2:
            raise RetrolmError(f"{cfg.db}: too little data for sequences of {self.seq_len} tokens")
        self._check_parent_split(n_seqs)
        order = np.random.default_rng(cfg.seed).permutation(n_seqs)
        n_val = max(1, round(cfg.val_fraction * len(order))) if cfg.val_fraction > 0 else 0
        self.val_ids, self.train_ids = order[:n_val], order[n_val:]
        if cfg.steps and len(self.train_ids) < self._per_step:  # a step would read past two epochs' permutations
            raise RetrolmError(f"{cfg.db}: {len(self.train_ids)} training sequences of {self.seq_len} tokens, fewer "
                               f"than one step reads ({self._per_step}); lower batch_size or grad_accum")
        if resume and cfg.steps:  # before the search, on the newest checkpoint's record (checked again on loading)
            self._check_reading(*self._newest_reading())
        # steps=0 writes the model as built: nothing reads training neighbours
        neighbours = self._neighbours(seq_chunks, show_progress) if self.retrieval and cfg.steps else None
        family = None
        if neighbours is not None and cfg.neighbour_swap and cfg.neighbour_exclude == "near_duplicate":
            family = document_families(self._near_duplicates())
        self.seqs = RetroSequences(self.db.store, seq_chunks, self.db.tokenizer.eos_id, neighbours, self.db.store,
                                   cfg.num_neighbours, tokenizer=self.db.tokenizer, doc_family=family)

        if self.sharded:  # before the optimizer: it steps the sharded parameters
            units = shard(self.model, cfg.fsdp_reshard_after_forward)
            logger.info("fsdp: %d units + root over %d processes; this one holds %.1f MB of weights", units,
                        self.world, local_bytes(self.model.parameters()) / 1e6)
        params = self.trainable_parameters()
        if not params:
            raise RetrolmError("the model has no trainable parameters")
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        fused = self.device.type == "cuda" and not self.sharded  # sharded: the foreach kernels, as torchtitan's
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused,
        )
        if resume:
            self._resumed_per_step: int | None = None
            self._resumed_order: dict | None = None
            self._resumed_reading: dict | None = None
            self._resumed_optimiser: dict | None = None
            last = self.checkpoints.resume(self._load_checkpoint)
            if last is not None:
                logger.info("resumed from %s", last)
            if self._resumed_per_step not in (None, self._per_step):
                # the data position is step × sequences per step: another count would re-read or skip sequences
                raise RetrolmError(f"{last}: written at {self._resumed_per_step} sequences per step (batch_size × "
                                   f"grad_accum × processes), resumed at {self._per_step}; resume with the same "
                                   "settings or start afresh (--no-resume)")
            changed = [f"{k} {v} → {self._data_order[k]}" for k, v in (self._resumed_order or {}).items()
                       if self._data_order.get(k, v) != v]
            if changed:
                # another seed, split or sequence length reorders the data: the resumed steps would re-read
                # sequences, or train on validation ones, that the first steps did not
                raise RetrolmError(f"{last}: resumed with another data order ({', '.join(changed)}); resume with "
                                   "the same settings or start afresh (--no-resume)")
            self._check_reading(last, self._resumed_reading)
            if last is not None:
                # the optimizer state came back with the checkpoint's settings: the config's are put back in (a
                # checkpoint of an earlier release records none), and the schedule follows the config from here on
                for group, decay in zip(self.opt.param_groups, (cfg.weight_decay, 0.0), strict=True):
                    group.update(weight_decay=decay, betas=(cfg.beta1, cfg.beta2))
            if changed := _changes(self._resumed_optimiser, self._optimiser):
                logger.warning("%s: resumed with other optimiser settings (%s): they apply from step %d on", last,
                               ", ".join(changed), self.step)
            if self.main:  # after the refusals: a refused resume keeps the interrupted run's rows
                self._drop_rows_after(earlier_rows, self.step)
        elif self.main:
            self._set_aside(earlier_rows)
        if self.world > 1:  # no rank looks for checkpoints (steps=0) before rank 0 has set the old ones aside
            torch.distributed.barrier()
        self.forward_model = self.model
        if cfg.compile:
            self.forward_model = torch.compile(self.model)
        if self.world > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(self.forward_model,
                                                         device_ids=[self.device.index] if fused else None)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.out / "tensorboard"))
                except ImportError:
                    logger.warning("tensorboard is not installed; metrics go to metrics.jsonl only")
        n_train = sum(p.numel() for _, p in params)
        n_all = sum(p.numel() for p in self.model.parameters())
        logger.info("model: %.2fM parameters (%.2fM trained), retrieval %s, %d train / %d val sequences of %d tokens",
                    n_all / 1e6, n_train / 1e6, "on" if self.retrieval else "off", len(self.train_ids),
                    len(self.val_ids), self.seq_len)

    def _drop_rows_after(self, earlier_rows: int, step: int) -> None:
        """Resuming at ``step``: the earlier rows of ``metrics.jsonl`` logged after it (between the last checkpoint and
        the interruption) are logged again by the resumed steps; the first copies go."""
        metrics = self.out / "metrics.jsonl"
        if not earlier_rows or not metrics.is_file():
            return
        rows = metrics.read_text().splitlines(keepends=True)

        def after(line: str) -> bool:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row torn by the crash
                return True
            return isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step

        kept = [r for r in rows[:earlier_rows] if not after(r)]
        if len(kept) < earlier_rows:
            write_bytes(metrics, "".join(kept + rows[earlier_rows:]).encode())

    def _set_aside(self, earlier_rows: int) -> None:
        """A fresh start (--no-resume) in a used run folder keeps the earlier run's checkpoints (which a later resume
        would pick up), metrics rows and TensorBoard events (which would read as this run's) in ``*.before-<time>``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        metrics = self.out / "metrics.jsonl"
        if earlier_rows:
            rows = metrics.read_text().splitlines(keepends=True)
            kept = aside_path(metrics, stamp)
            write_bytes(kept, "".join(rows[:earlier_rows]).encode())
            write_bytes(metrics, "".join(rows[earlier_rows:]).encode())  # this run's own setup rows stay
            logger.warning("%s: the earlier run's metrics rows are kept in %s", self.out, kept.name)
        set_aside(self.out, [*(["checkpoints"] if self.checkpoints.all() else []), "tensorboard"], "--no-resume", stamp)

    def _neighbours(self, seq_chunks: int, show_progress: bool) -> np.ndarray:
        root = Path(self.cfg.neighbours_dir) if self.cfg.neighbours_dir else self.out / "neighbours"
        ncfg = NeighbourConfig(k=self.cfg.num_neighbours, exclude=self.cfg.neighbour_exclude, seq_chunks=seq_chunks,
                               retriever=self.cfg.retriever, search=self._neighbour_search(),
                               near_dup_threshold=self.cfg.neighbour_near_dup)
        folder = None
        if self.main:
            # Runs started together on one folder: the first searches, the others wait and reuse its set. The lock
            # dies with its holder, so waiting without a limit cannot outlive a crashed search.
            with exclusive_lock(root, timeout=math.inf, what="neighbour folder"):
                folder = neighbour_folder(root, ncfg)
                if not self._neighbours_reusable(folder, ncfg):
                    retriever = get_retriever(self.db, ncfg.retriever)
                    started = time.perf_counter()
                    groups = self._near_duplicates() if ncfg.exclude == "near_duplicate" else None
                    nb = compute_neighbours(retriever, config=ncfg, show_progress=show_progress, groups=groups)
                    seconds = time.perf_counter() - started
                    logger.info("training neighbours of %d chunks in %.1f s (%s search)", len(nb), seconds,
                                ncfg.search)
                    save_neighbours(folder, nb, self.db, ncfg)
                    # the cost of the neighbours next to the training curve: what share of a run they take
                    self._append_metrics({"step": 0, "setup/neighbour_seconds": round(seconds, 3),
                                          "setup/neighbour_chunks": len(nb)})
        if self.world > 1:  # every rank waits here, whatever it would have decided on its own
            torch.distributed.barrier()
        return load_neighbours(folder or neighbour_folder(root, ncfg), self.db)  # other ranks: where main put it

    def _near_duplicates(self) -> list[np.ndarray]:
        """The database's near-duplicate groups under ``neighbour_near_dup``, found once for the neighbour search and
        the swap's document families."""
        if self._near_dup_groups is None:
            self._near_dup_groups = near_duplicate_groups(self.db, self.cfg.neighbour_near_dup, show_progress=self.show)
        return self._near_dup_groups

    def _neighbour_search(self) -> str:
        """The neighbour search backend: ``auto`` is exact search on the GPU when the dense keys are stored exactly."""
        search = self.cfg.neighbour_search
        if search != "auto":
            return search
        index = self.db.index
        gpu_ok = self.cfg.retriever == "dense" and self.device.type == "cuda"
        return "torch" if gpu_ok and index is not None and index.stores_exact_keys else "faiss"

    def _neighbours_reusable(self, folder: Path, ncfg: NeighbourConfig) -> bool:
        """A saved neighbour set made with the same settings for this database version (resume, reruns), under the
        current exclusion rule (an older set is searched again)."""
        saved = _saved_neighbour_set(folder)
        same = saved is not None and neighbour_settings(saved["config"]) == neighbour_settings(asdict(ncfg))
        return same and saved.get("db_identity") == db_identity(self.db) and not rule_outdated(saved)

    # ------------------------------------------------------------------ data
    @property
    def _data_order(self) -> dict:
        """The settings that decide which sequences step s reads and which are held out (saved in trainer.pt)."""
        cfg = self.cfg
        return {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "data_offset": cfg.data_offset,
                "seq_len": self.seq_len, "sequences": len(self.seqs)}

    @property
    def _reading(self) -> dict:
        """The settings that decide which neighbours training reads (saved in trainer.pt; none for a baseline)."""
        cfg = self.cfg
        if not self.retrieval:
            return {}
        reading = {"retriever": cfg.retriever, "neighbour_exclude": cfg.neighbour_exclude,
                   "num_neighbours": cfg.num_neighbours}
        if cfg.neighbour_exclude == "near_duplicate":
            reading["neighbour_near_dup"] = cfg.neighbour_near_dup
        return reading

    def _check_reading(self, folder: Path | None, saved: dict | None) -> None:
        """Refuse to resume from ``folder`` (trainer.pt's record ``saved``) under other neighbour settings: the later
        steps would read other neighbours (with exclude=none, the text they predict) under a config.yaml that hides
        the first steps' setting."""
        if changed := _changes(saved, self._reading):
            raise RetrolmError(f"{folder}: resumed with other training neighbours ({', '.join(changed)}); resume "
                               "with the same settings, continue it as a new run (init_from) or start afresh "
                               "(--no-resume)")

    def _newest_reading(self) -> tuple[Path | None, dict | None]:
        """The newest checkpoint with a readable trainer.pt and its neighbour settings (None: none, or none saved)."""
        for folder in reversed(self.checkpoints.all()):
            try:
                return folder, torch.load(folder / "trainer.pt", weights_only=False).get("reading")
            except Exception:  # a damaged checkpoint: resuming skips it and checks the one it loads
                continue
        return None, None

    @property
    def _optimiser(self) -> dict:
        """The optimiser and schedule settings (saved in trainer.pt: a resume under others is told which)."""
        return {k: getattr(self.cfg, k) for k in ("lr", "min_lr", "warmup_steps", "steps", "weight_decay", "beta1",
                                                  "beta2", "grad_clip")}

    def _check_parent_split(self, n_seqs: int) -> None:
        """Warn when ``init_from`` was trained under another split: its training sequences may be this run's
        validation ones (validation then reads too well), which resuming refuses but a continuation cannot know."""
        ref = getattr(self.cfg, "init_from", None)
        folder = find_checkpoint(ref) if ref else None
        if folder is None or not (folder / "trainer.pt").is_file():
            return
        try:
            parent = torch.load(folder / "trainer.pt", weights_only=False).get("data_order") or {}
        except Exception:  # an unreadable trainer.pt says nothing about the split; loading the weights checks the rest
            return
        here = {"seed": self.cfg.seed, "val_fraction": self.cfg.val_fraction, "seq_len": self.seq_len,
                "sequences": n_seqs}
        changed = [f"{k} {parent[k]} → {v}" for k, v in here.items() if k in parent and parent[k] != v]
        if changed:
            logger.warning("%s: trained on a split made with other settings (%s): this run's validation sequences may "
                           "include sequences it trained on", folder, ", ".join(changed))

    @property
    def _per_step(self) -> int:
        """Training sequences one optimizer step reads, over all processes."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    def _batch_ids(self, step: int, micro: int) -> np.ndarray:
        """Sequence ids of micro-batch ``micro`` of ``step`` for this rank: a pure function of (seed, step, offset)."""
        cfg = self.cfg
        per_step = self._per_step
        pos = step * per_step + cfg.data_offset
        epoch, offset = divmod(pos, len(self.train_ids))
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(self.train_ids)
        ids = np.concatenate([perm, np.random.default_rng([cfg.seed, epoch + 1]).permutation(self.train_ids)])
        step_ids = ids[offset : offset + per_step]
        start = (micro * self.world + self.rank) * cfg.batch_size
        return step_ids[start : start + cfg.batch_size]

    def _token_weights(self, batches: list) -> list[float]:
        """What each micro-batch's mean loss is multiplied by so that a step's gradient is the mean over every
        scored token of the step, on every process: micro-batches hold different numbers of targets (the padding
        after each document's end predicts nothing), and DDP averages the ranks' gradients. Exactly 1.0 for one
        micro-batch on one process."""
        counts = [int((b.targets != IGNORE).sum()) for b in batches]
        total = float(sum(counts))
        if self.world > 1:
            t = torch.tensor([total], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            total = float(t)
        return [c * self.world / total if total else 0.0 for c in counts]

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, float]:
        """Train to ``steps`` (saving, evaluating and logging as configured); the run folder is given up when it
        ends, by an error too (a retry in the same process may take it)."""
        try:
            return self._train()
        finally:
            self._release_run()

    def _train(self) -> dict[str, float]:
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
            batches = [self.seqs.batch(self._batch_ids(self.step, micro), with_neighbours=self.retrieval)
                       for micro in range(cfg.grad_accum)]
            weights = self._token_weights(batches)
            for micro, batch in enumerate(batches):
                if cfg.neighbour_swap:  # drawn from (seed, step, micro, rank): a resumed run swaps the same chunks
                    rng = np.random.default_rng([cfg.seed, self.step, micro, self.rank])
                    batch = swap_neighbours(batch, cfg.neighbour_swap, rng)
                batch = batch.to(self.device)
                sync = micro == cfg.grad_accum - 1 or self.world == 1
                ctx = contextlib.nullcontext() if sync or self.sharded else self.forward_model.no_sync()
                if self.sharded:  # reduce-scatter the gradients once per step, after the last micro-batch
                    self.model.set_requires_gradient_sync(sync)
                with ctx, autocast(self.device, cfg.bf16):
                    out = self.forward_model(batch.idx, batch.neighbours, batch.neighbour_mask, batch.targets,
                                             **model_kwargs(self.model, batch))
                    # a micro-batch without a scored token still runs backward (DDP expects every rank to)
                    loss = out.loss * weights[micro] if weights[micro] else out.logits.sum() * 0.0
                loss.backward()
                loss_sum += float(loss.detach())
                tokens += batch.idx.numel() * self.world
            if self.world > 1:  # log the loss of the global batch, not of this rank's slice
                t = torch.tensor([loss_sum], device=self.device)
                torch.distributed.all_reduce(t)
                loss_sum = float(t) / self.world
            # grad_clip=0 clips nothing (max_norm=inf still returns the norm that is logged)
            gnorm = full_norm(torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable_parameters()],
                                                             cfg.grad_clip or math.inf))
            if not (math.isfinite(loss_sum) and math.isfinite(gnorm)):  # before the step: weights stay finite
                good = self.checkpoints.all()
                what = "loss" if not math.isfinite(loss_sum) else "gradient norm"
                raise RetrolmError(
                    f"{self.out}: non-finite training {what} at step {self.step + 1}; nothing was saved "
                    f"(last good checkpoint: {good[-1] if good else 'none'}); lower lr or check the data"
                )
            self.opt.step()
            self.step += 1
            logging_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
            held = self._held_mb() if logging_now else 0.0  # before the gradients go
            self.opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
            if logging_now:
                dt = time.perf_counter() - t0
                last = {"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": gnorm,
                        "train/tokens_per_s": tokens / max(dt, 1e-9), "train/state_mb": held}
                if (peak := peak_memory_gib(self.device)) is not None:
                    last["train/peak_memory_gib"] = peak
                self._log(last)
                t0, tokens = time.perf_counter(), 0
            if (self.step % cfg.eval_every == 0 or self.step == cfg.steps) and len(self.val_ids):
                last.update(self._log(self.evaluate()))
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        if cfg.steps == 0 and not self.checkpoints.all():  # the model as built, for eval and generate
            self.save_checkpoint()
        return last

    def _held_mb(self) -> float:
        """MB of training state this process holds: weights, gradients and optimizer moments (its shards under
        fsdp, everything under ddp or alone)."""
        params = list(self.model.parameters())
        moments = [t for state in self.opt.state.values() for t in state.values() if torch.is_tensor(t)]
        return local_bytes([*params, *(p.grad for p in params if p.grad is not None), *moments]) / 1e6

    def evaluate(self, retrieval: bool | None = None) -> dict[str, float]:
        """Validation loss and bits-per-byte, with retrieval (RETRO) and with it switched off (nothing without a
        validation split, ``val_fraction=0``)."""
        ids = self.val_ids[: self.cfg.eval_batches * self.cfg.batch_size]
        if len(ids) == 0:
            return {}
        # bytes of the validation sequences' chunks; the loss of a sequence's last position is booked to the next
        # sequence's first chunk, so the nats are summed over every chunk, not only the sequences' own
        chunks = (ids[:, None] * self.seqs.C + np.arange(self.seqs.C)[None, :]).ravel()
        chunks = chunks[chunks < self.seqs.source.n_chunks]
        n_bytes = float(self.seqs.chunk_bytes[chunks].sum())
        results = {}
        modes = [True, False] if self.retrieval else [False]
        for mode in modes if retrieval is None else [retrieval]:
            scores = score_sequences(self.model, self.seqs, ids, self.cfg.batch_size, with_neighbours=mode,
                                     device=self.device, bf16=self.cfg.bf16)  # validated as it trains
            nats, count = float(scores.nats.sum()), int(scores.tokens.sum())
            tag = "val" if mode or not self.retrieval else "val_no_retrieval"
            results[f"{tag}/loss"] = nats / max(count, 1)
            results[f"{tag}/bpb"] = nats / math.log(2) / max(n_bytes, 1.0)
        return results

    def _append_metrics(self, row: dict) -> None:
        """One line of ``metrics.jsonl`` (the run folder may not exist yet when the neighbours are searched)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _log(self, metrics: dict[str, float]) -> dict[str, float]:
        if not self.main:
            return metrics
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, self.step)
        self._append_metrics({"step": self.step, **metrics})
        logger.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes the checkpoint; every rank must call this (the ranks' GPU RNG states are gathered)."""
        self._cuda_rng_by_rank = self._gather_cuda_rng()
        self._cpu_rng_by_rank = self._gather(torch.get_rng_state()) if self.world > 1 else None
        if self.sharded:  # gathered to rank 0, which writes the single-process format
            saved = self.model.saved_names()
            self._full_model = full_model_state(self.model, saved.__contains__)
            self._full_optimizer = full_optimizer_state(self.model, self.opt)
        if not self.main:
            return None
        try:
            return self.checkpoints.save(self.step, self._write_checkpoint)
        finally:
            self._full_model = self._full_optimizer = None

    def _gather_cuda_rng(self) -> list | None:
        """Each rank's own GPU generator state, in rank order (rank r draws dropout on its device only, so rank 0's
        view of the other devices' generators is not theirs)."""
        if self.device.type != "cuda":
            return None
        return self._gather(torch.cuda.get_rng_state(self.device))

    def _gather(self, own: object) -> list:
        """``own`` of every rank, in rank order (every rank must call this)."""
        if self.world == 1:
            return [own]
        states: list = [None] * self.world
        torch.distributed.all_gather_object(states, own)
        return states

    def _write_checkpoint(self, folder: Path) -> None:
        full = self._full_model  # set only by a sharded run
        weights = full.values() if full is not None else self.model.parameters()
        if not all(bool(torch.isfinite(t).all()) for t in weights if t.is_floating_point()):
            raise RetrolmError(f"{self.out}: non-finite weights at step {self.step}; not saved (earlier checkpoints "
                               "are intact); lower lr or check the data")
        self.save_model(folder, full)
        save_config(self.cfg, folder / "config.yaml")
        self.db.tokenizer.save(folder / "tokenizer.json")  # a checkpoint generates and evaluates without its database
        write_json(folder / "database.json", database_record(self.db))
        if frozen := frozen_names(self.model):  # a continuation keeps these frozen without its ancestors' checkpoints
            write_json(folder / FROZEN_FILE, frozen)
        torch.save(self._full_optimizer if full is not None else self.opt.state_dict(), folder / "optimizer.pt")
        torch.save({"step": self.step, "sequences_per_step": self._per_step, "data_order": self._data_order,
                    "reading": self._reading, "optimiser": self._optimiser,
                    "torch_rng": torch.get_rng_state(),
                    "numpy_rng": np.random.get_state(),
                    "python_rng": random.getstate(),
                    "cuda_rng_by_rank": self._cuda_rng_by_rank, "cpu_rng_by_rank": self._cpu_rng_by_rank},
                   folder / "trainer.pt")

    def _check_same_run(self, folder: Path) -> None:
        """Refuse to resume from a checkpoint of another model or database: it would go on training with other
        token ids or another architecture, and the checkpoints after it would hide that."""
        saved = read_model_config(folder)
        if changed := config_changes(saved, self.model,
                                     sorted(k for k in self.model.config.to_dict() if k not in RESUMABLE_CHANGES)):
            raise ResumeRefused(f"{folder}: resumed with another model ({', '.join(changed[:4])}); resume with the "
                                "same settings or start afresh (--no-resume)")
        record = folder / "database.json"
        if not record.is_file():
            return
        trained = read_json_object(record, "database record")
        if trained.get("tokenizer_sha256") not in (None, self.db.tokenizer.sha256) or \
                trained.get("chunk_len") not in (None, self.db.chunk_len):
            raise ResumeRefused(f"{folder}: trained with another tokenizer or chunk length than {self.db.path} has "
                                "(another database, or rebuilt since); resume with the same database or start afresh "
                                "(--no-resume)")
        if self.retrieval:  # neighbours from another encoder's embedding space
            try:
                self.db.check_trained_with(trained, folder)
            except RetrolmError as e:
                raise ResumeRefused(f"{e} (or start afresh: --no-resume)") from None

    def _load_checkpoint(self, folder: Path) -> None:
        self._check_same_run(folder)
        self.load_model(folder)  # sharded: with the optimizer state
        if not self.sharded:
            self.opt.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device,
                                                weights_only=False))
        state = torch.load(folder / "trainer.pt", weights_only=False)
        self.step = int(state["step"])
        # checked once resuming is done (see setup); checkpoints of older versions lack them
        self._resumed_per_step = state.get("sequences_per_step")
        self._resumed_order = state.get("data_order")
        self._resumed_reading, self._resumed_optimiser = state.get("reading"), state.get("optimiser")
        cpu_by_rank = state.get("cpu_rng_by_rank")  # each rank draws its own dropout masks on the CPU
        own_cpu = cpu_by_rank[self.rank] if cpu_by_rank is not None and len(cpu_by_rank) == self.world else None
        torch.set_rng_state(own_cpu if own_cpu is not None else state["torch_rng"])
        if own_cpu is None and self.rank:  # written by another number of processes: rank 0's state is not this one's
            torch.manual_seed(self.cfg.seed + 1000 * self.rank + self.step)
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        by_rank = state.get("cuda_rng_by_rank")
        if by_rank is not None and self.device.type == "cuda" and len(by_rank) == self.world:
            torch.cuda.set_rng_state(by_rank[self.rank].cpu(), self.device)
        elif state.get("cuda_rng") is not None and torch.cuda.is_available():  # written before per-rank states
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def _release_run(self) -> None:
        if self._run_lock is not None:
            self._run_lock.close()
            self._run_lock = None

    def cleanup(self) -> None:
        self._release_run()
        if self.writer is not None:
            self.writer.close()
        if self.world > 1:
            torch.distributed.destroy_process_group()
