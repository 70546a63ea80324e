"""The versions of the libraries a result depends on, saved next to it: a BM25 scorer's or FAISS's release can change
which neighbours a search returns (and with them what a model trains on), a tokenizers release how text splits."""

from __future__ import annotations

from importlib import metadata

RESULT_LIBRARIES = ("retrolm", "torch", "numpy", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "bm25s", "tokenizers",
                    "transformers")
"""Distributions recorded when installed (one of the faiss builds is)."""


def library_versions(names: tuple[str, ...] = RESULT_LIBRARIES) -> dict[str, str]:
    """Installed version of each of ``names`` that is installed, by distribution name."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
