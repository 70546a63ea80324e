"""Models: RETRO (from scratch), and the pretrained readers around it. Models import only :mod:`retrolm.core`."""

from retrolm.models.retro import PRESETS, ModelOutput, RetroCache, RetroConfig, RetroModel

__all__ = ["PRESETS", "ModelOutput", "RetroCache", "RetroConfig", "RetroModel"]
