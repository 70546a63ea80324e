"""Loading a model by reference: a retrolm checkpoint or run folder (RETRO, its baseline, a RETRO-fitted model)."""

from __future__ import annotations

from pathlib import Path

import torch

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import find_checkpoint
from retrolm.models.retro import RetroModel
from retrolm.models.weights import read_model_config

ARCHITECTURES = {"retro": RetroModel}


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Path]:
    """The model a reference names, in eval mode on ``device``, and the folder it was loaded from."""
    folder = find_checkpoint(ref)
    if folder is None:
        raise RetrolmError(f"{ref}: not a retrolm checkpoint or run folder (no model.json)")
    arch = read_model_config(folder).get("architecture", "retro")  # checkpoints before 0.2 name no architecture
    if arch not in ARCHITECTURES:
        raise RetrolmError(f"{folder / 'model.json'}: unknown architecture {arch!r}")
    return ARCHITECTURES[arch].from_pretrained(folder, device=device), folder
