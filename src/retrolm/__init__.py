"""retrolm: semi-parametric language models (RETRO, REALM, retrieval-augmented evaluation)."""

from __future__ import annotations

__version__ = "0.2.0"
