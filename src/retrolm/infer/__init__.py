"""Inference: generation with sources (RETRO), sampling."""

from retrolm.infer.generate import GeneratedChunk, Generation, format_generation, generate
from retrolm.infer.sampling import nucleus, sample

__all__ = ["GeneratedChunk", "Generation", "format_generation", "generate", "nucleus", "sample"]
