"""Loading a model by reference, whatever it is: a retrolm checkpoint or run folder (RETRO, its baseline, a
RETRO-fitted model), a local Hugging Face folder, a packaged model's short name (``smollm2-135m``) or a hub name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import find_checkpoint, looks_like_path
from retrolm.models.hf import CausalLM
from retrolm.models.retro import RetroModel
from retrolm.models.retrofit import RetrofitModel
from retrolm.models.weights import read_model_config

ARCHITECTURES: dict[str, type] = {"retro": RetroModel, "retrofit": RetrofitModel}
"""retrolm checkpoint architectures (``model.json``'s ``architecture``) → their classes; extended by other modules."""


@dataclass
class LoadedModel:
    """A model and where it came from."""

    model: nn.Module
    kind: str
    """``retro`` (RETRO or its baseline), ``retrofit`` (a RETRO-fitted pretrained LM) or ``causal_lm`` (a plain
    pretrained LM, read with in-context retrieval)."""
    name: str
    """A label: the checkpoint folder, or the model's name."""
    folder: Path | None
    """The checkpoint folder or local model folder (None for a hub model); it holds the tokenizer."""


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model a reference names, in eval mode on ``device``."""
    folder = find_checkpoint(ref)
    if folder is not None:
        arch = read_model_config(folder).get("architecture", "retro")  # 0.1 checkpoints name no architecture
        if arch not in ARCHITECTURES:
            raise RetrolmError(f"{folder / 'model.json'}: unknown architecture {arch!r}")
        return LoadedModel(ARCHITECTURES[arch].from_pretrained(folder, device=device), arch, str(folder), folder)
    path = Path(ref).expanduser()
    if not path.exists() and looks_like_path(str(ref)):
        raise RetrolmError(f"{ref}: no such checkpoint, run folder or model folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise RetrolmError(f"{ref}: not a retrolm checkpoint or run folder (no model.json), nor a Hugging Face model "
                           "folder (no config.json)")
    lm = CausalLM.from_pretrained(str(ref), device=device)
    return LoadedModel(lm, "causal_lm", lm.name, Path(lm.path) if lm.path else None)
