"""A model loaded once that continues prompts the way it reads: RETRO retrieves once per completed chunk, a plain
pretrained causal LM reads retrieved passages in its context. ``retrolm generate`` makes one; ``retrolm serve`` keeps
one for every request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from retrolm.core.errors import RetrolmError
from retrolm.core.io import read_json_object
from retrolm.db import DatabaseView
from retrolm.eval.incontext import InContextSettings
from retrolm.infer.generate import GenerateConfig, Generation, generate
from retrolm.infer.incontext import generate_in_context
from retrolm.models.loading import load_model
from retrolm.retrieval import Retriever
from retrolm.text.tokenizer import LMTokenizer, load_tokenizer


@dataclass
class Generator:
    """A loaded model, its tokenizer and how it reads (``kind`` as :class:`retrolm.models.loading.LoadedModel`)."""

    model: nn.Module
    tokenizer: LMTokenizer
    kind: str
    name: str
    folder: Path | None = None

    @classmethod
    def load(cls, ref: str, device: str = "cpu") -> Generator:
        """A RETRO / RETRO-fitted checkpoint or run folder, or a pretrained causal LM (folder, short or hub name)."""
        loaded = load_model(ref, device=device)
        return cls(loaded.model, load_tokenizer(str(loaded.folder or loaded.name)), loaded.kind, loaded.name,
                   loaded.folder)

    @property
    def in_context(self) -> bool:
        """True for a plain causal LM: it reads retrieved passages in its context (no cross-attention)."""
        return self.kind == "causal_lm"

    @property
    def retrieves(self) -> bool:
        """Whether it reads retrieved text: a causal LM in its context, RETRO through its CCA layers (a baseline
        checkpoint, without them, does not)."""
        config = getattr(self.model, "config", None)
        return self.in_context or self.kind != "retro" or bool(getattr(config, "retro_layers", ()))

    def check_database(self, db: DatabaseView) -> None:
        """A model with retrieval layers reads neighbours of the database it was trained with (same tokenizer and
        chunk length; its checkpoint's ``database.json``); a plain LM reads any database's text."""
        if self.in_context or self.folder is None or not self.retrieves:
            return
        record = self.folder / "database.json"
        db.check_trained_with(read_json_object(record, "database record") if record.is_file() else None, self.folder)

    def check_sharded(self, shards: str) -> None:
        """Over the parts of a sharded database only a causal LM generates with retrieval (it reads their text): a
        model with retrieval layers reads its neighbours' token ids from one database folder."""
        if not self.in_context and self.retrieves:
            raise RetrolmError(f"{shards}: a RETRO model reads its neighbours' tokens from one database folder; over "
                               f"shards, generate with a causal LM (it reads passages in its context)")

    def generate(self, cfg: GenerateConfig, retriever: Retriever | None = None) -> Generation:
        """Continue ``cfg.prompt`` with ``cfg``'s sampling settings (``cfg.checkpoint`` and ``cfg.db`` are not read:
        this model, and ``retriever``'s database checked with :meth:`check_database`, are used)."""
        sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                        stop_at_eos=cfg.stop_at_eos)
        if self.in_context:
            settings = InContextSettings(stride=cfg.stride, query_tokens=cfg.query_tokens, passages=cfg.neighbours or 1,
                                         continuation=cfg.continuation, context_tokens=cfg.context_tokens)
            return generate_in_context(self.model, self.tokenizer, cfg.prompt, retriever, settings, **sampling)
        return generate(self.model, self.tokenizer, cfg.prompt, retriever, num_neighbours=cfg.neighbours, **sampling)


__all__ = ["Generator"]
