"""Results per group of held-out documents (e.g. the bucket identical / changed / new of a versioned corpus), and
confidence intervals over documents: a single pooled number hides where a gain comes from.

Groups come from a field of the held-out JSONL records (``group_by=bucket``). Intervals are percentile bootstraps
over documents: documents are resampled with replacement and the relative bits-per-byte gain is recomputed on the
pooled nats and bytes of the sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrolm.core.errors import RetrolmError
from retrolm.text.corpus import JSONL_SUFFIXES, jsonl_documents, list_files


def document_field(paths: Sequence[str], field: str) -> dict[str, str]:
    """doc id → the value of ``field`` in the held-out JSONL records (files, or folders of them)."""
    out: dict[str, str] = {}
    # the files ingestion reads (list_files' order and checks); records it skipped (bad JSON, no usable id, empty
    # text) are skipped here too, and ids are the documents' (repaired as ingestion repairs them)
    files = [f for f, _ in list_files(paths) if f.name.lower().endswith(JSONL_SUFFIXES)]
    if not files:
        raise RetrolmError(f"{', '.join(map(str, paths))}: group_by needs JSONL held-out data (a field per record)")
    for f in files:
        for doc, rec in jsonl_documents(f):  # ingestion warned about what it skipped
            if field not in rec:
                raise RetrolmError(f"{f}: record {doc.id!r} has no field {field!r} (group_by)")
            out[doc.id] = str(rec[field])
    return out


def chunk_groups(paths: Sequence[str], field: str, doc_ids: Sequence[str], chunk_doc: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """Group value → bool mask over the held-out chunks, from ``field`` of each chunk's document (``doc_ids`` in the
    order of the held-out store, ``chunk_doc`` its document index per chunk); sorted by group."""
    values = document_field(paths, field)
    doc_group = np.array([values.get(d, "?") for d in doc_ids])
    return {g: doc_group[chunk_doc] == g for g in sorted(set(doc_group.tolist()))}


def gain_interval(on: np.ndarray, off: np.ndarray, chunk_doc: np.ndarray, select: np.ndarray | None = None,
                  n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over documents of the relative gain (off − on) / off of bits per byte on the selected
    chunks, from per-chunk nats ``on`` and ``off`` and the document of each chunk; NaN if nothing is selected.
    (Both sides score the same text, so the bytes cancel in the relative gain.)"""
    sel = np.ones(len(on), dtype=bool) if select is None else select
    docs, inverse = np.unique(chunk_doc[sel], return_inverse=True)
    if not len(docs):
        return float("nan"), float("nan")
    # per-document totals: the bootstrap resamples documents, not chunks (chunks of a document are not independent)
    d_on = np.bincount(inverse, on[sel], len(docs))
    d_off = np.bincount(inverse, off[sel], len(docs))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(docs), size=(n_boot, len(docs)))
    tot_on, tot_off = d_on[pick].sum(1), d_off[pick].sum(1)
    gains = (tot_off - tot_on) / np.where(tot_off > 0, tot_off, np.nan)
    lo, hi = np.nanpercentile(gains, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)
