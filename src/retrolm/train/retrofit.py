"""``retrolm retrofit``: RETRO-fitting a pretrained causal LM on a database — the training loop of ``retrolm train``.

The recipe differs from RETRO from scratch only in its model (:class:`~retrolm.models.retrofit.RetrofitModel`: the
base frozen, or unfrozen, or with LoRA adapters, plus a neighbour encoder and chunked cross-attention), and in how a
checkpoint stores it (only what is trained, plus the base's name and fingerprint). Data, neighbours, optimiser,
schedule, validation bits-per-byte with and without retrieval, checkpoints with checksums and exact resume are the
shared :class:`~retrolm.train.trainer.Trainer`'s.

The database's chunks are token ids of the base's tokenizer, so it must have been built with it
(``retrolm db build … --tokenizer MODEL``); another tokenizer is refused before the base is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from retrolm.core.errors import RetrolmError
from retrolm.models.retrofit import RetrofitModel
from retrolm.text.tokenizer import load_tokenizer
from retrolm.train.config import LoopConfig
from retrolm.train.trainer import Trainer

__all__ = ["RetrofitConfig", "RetrofitTrainer"]


@dataclass
class RetrofitConfig(LoopConfig):
    """``retrolm retrofit``: a pretrained causal LM + RETRO's encoder and chunked cross-attention, trained on a
    database built with the LM's tokenizer."""

    out_dir: str = "runs/retrofit"
    """Run folder: checkpoints/, tensorboard/, neighbours/, config.yaml, metrics.jsonl."""
    base: str = "smollm2-135m"
    """The pretrained causal LM: a local Hugging Face folder, a short name (smollm2-135m) or a hub name."""
    seq_len: int = 256
    """Training sequence length T (a multiple of the database's chunk_len, at most the base's context)."""
    cca_layers: list[int] | None = None
    """1-indexed base layers followed by chunked cross-attention; None → 60%, 80% and 100% of the depth
    (``encoder=base``: every layer)."""
    encoder: str = "retro"
    """``retro``: RETRO's neighbour encoder and zero-initialised CCA (the paper's RETRO-fitting); ``base``: the base
    encodes the neighbours and each cca layer's attention reads them through a trained copy of its own projections,
    so the model reads them as the base reads its context from step 0 (``RetrofitModelConfig.encoder``)."""
    cca_query_offset: int | None = None
    """``encoder=base``: positions between a neighbour's start and the chunk it continues; None → neighbour length."""
    enc_n_layer: int = 2
    """Layers of the neighbour encoder."""
    enc_d_model: int | None = None
    """Encoder width; None → min(256, the base's hidden size)."""
    enc_n_head: int | None = None
    """Encoder attention heads; None → enc_d_model // 64."""
    dropout: float = 0.0
    """Dropout inside the new modules (the frozen base never drops out)."""
    unfreeze: bool = False
    """Train the base's weights too (then use a lower lr, e.g. 1e-4; checkpoints hold the whole base)."""
    lora: bool = False
    """Train LoRA adapters on the base's attention projections instead (exclusive with unfreeze)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (updates scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] | None = None
    """Base modules (name suffixes) that get adapters; None → every linear projection of the attention."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.base:
            raise RetrolmError("retrofit: base is required (--base MODEL)")
        if self.unfreeze and self.lora:
            raise RetrolmError("retrofit: unfreeze and lora are exclusive (LoRA adapts a frozen base)")
        if self.seq_len < 1 or self.lora_r < 1 or self.enc_n_layer < 0:
            raise RetrolmError("retrofit: seq_len and lora_r must be positive, enc_n_layer >= 0")


class RetrofitTrainer(Trainer):
    """The shared training loop with a RETRO-fitted pretrained LM as the model."""

    cfg: RetrofitConfig

    def build_model(self) -> torch.nn.Module:
        """The base (checked against the database's tokenizer first) with the new modules, on the CPU."""
        cfg = self.cfg
        if self.sharded and cfg.encoder == "base":
            raise RetrolmError("encoder=base runs parts of the base's layers outside their forward, which "
                               "distributed=fsdp cannot gather; use distributed=ddp")
        check_tokenizer(cfg.base, self.db)
        model = RetrofitModel.from_base(
            cfg.base, seq_len=cfg.seq_len, chunk_len=self.db.chunk_len, num_neighbours=cfg.num_neighbours,
            retro_layers=tuple(cfg.cca_layers) if cfg.cca_layers is not None else None,
            encoder=cfg.encoder, cca_query_offset=cfg.cca_query_offset,
            enc_n_layer=cfg.enc_n_layer, enc_d_model=cfg.enc_d_model, enc_n_head=cfg.enc_n_head, dropout=cfg.dropout,
            unfreeze=cfg.unfreeze, lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            lora_target_modules=tuple(cfg.lora_target_modules) if cfg.lora_target_modules else None,
        )
        if self.db.tokenizer.vocab_size > model.config.vocab_size:
            raise RetrolmError(f"{cfg.db}: tokenizer has {self.db.tokenizer.vocab_size} ids, more than the "
                               f"{model.config.vocab_size} embeddings of {cfg.base}")
        return model

    def load_model(self, folder: Path) -> None:
        """Resume: the checkpoint's trained weights into the freshly built model (same base, by fingerprint)."""
        if self.sharded:
            self.model.check_trained_folder(folder)
            self._load_sharded(folder)
        else:
            self.model.load_trained_weights(folder, self.device)


def check_tokenizer(base: str, db) -> None:
    """The database's chunk ids must be the base's: same tokenizer (SHA-256 of its tokenizer.json)."""
    base_tok = load_tokenizer(base)
    if base_tok.sha256 != db.tokenizer.sha256:
        raise RetrolmError(
            f"{db.path}: built with tokenizer {db.tokenizer.name} ({db.tokenizer.sha256[:12]}), but the base {base} "
            f"uses {base_tok.name} ({base_tok.sha256[:12]}); rebuild it with `retrolm db build … --tokenizer {base}`"
        )
