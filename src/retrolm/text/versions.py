"""Two versions of a corpus (e.g. the kernel documentation of 6.1 and 6.12): label every document of the new version
by how much of it the old version already holds, and split off a seeded, labelled held-out sample.

Labels are by content, not by path (files move):

* **identical** — its text equals the text of some old document;
* **changed** — not identical, but more than ``new_max_overlap`` of its word n-grams (n = 8) occur in one old document;
* **new** — at most ``new_max_overlap`` (default 30%) of its n-grams occur in any single old document.

``overlap`` is the largest share of the document's distinct n-grams found in one old document, and ``best_match`` is
that document. ``translations/`` are kept out of the held-out sample (they repeat the English text in other words).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrolm.core.errors import RetrolmError
from retrolm.core.io import atomic_path, write_json
from retrolm.text.corpus import Document, iter_documents

BUCKETS = ("identical", "changed", "new")
_WORD = re.compile(r"\w+")


def word_ngrams(text: str, n: int = 8) -> np.ndarray:
    """Sorted unique 64-bit hashes of the word n-grams of ``text`` (lower-cased words)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        words = words + [""] * (n - len(words)) if words else []
    grams = {" ".join(words[i : i + n]) for i in range(max(0, len(words) - n + 1))}
    return np.unique(np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                               for g in grams], dtype=np.uint64))


class NgramIndex:
    """Which documents hold each word n-gram: sorted (hash, document) pairs, searched with ``searchsorted``."""

    def __init__(self, texts: Iterable[str], n: int = 8) -> None:
        hashes, owners = [], []
        for i, text in enumerate(texts):
            h = word_ngrams(text, n)
            hashes.append(h)
            owners.append(np.full(len(h), i, dtype=np.int64))
        self.n_docs = len(hashes)
        all_h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        all_o = np.concatenate(owners) if owners else np.zeros(0, np.int64)
        order = np.argsort(all_h, kind="stable")
        self.hashes, self.owners, self.n = all_h[order], all_o[order], n

    def best_match(self, text: str) -> tuple[int, float]:
        """(document with the largest share of ``text``'s n-grams, that share); (-1, 0) if none share any."""
        h = word_ngrams(text, self.n)
        if not len(h) or not self.n_docs:
            return -1, 0.0
        lo, hi = np.searchsorted(self.hashes, h, "left"), np.searchsorted(self.hashes, h, "right")
        hits = np.concatenate([self.owners[a:b] for a, b in zip(lo, hi, strict=True) if b > a] or [np.zeros(0, int)])
        if not len(hits):
            return -1, 0.0
        counts = np.bincount(hits, minlength=self.n_docs)
        best = int(counts.argmax())
        return best, float(counts[best]) / len(h)


@dataclass
class Label:
    """The label of one new-version document."""

    id: str
    bucket: str
    overlap: float
    best_match: str | None


def label_versions(old: list[Document], new: list[Document], new_max_overlap: float = 0.3, n: int = 8
                   ) -> list[Label]:
    """Label every document of ``new`` against ``old`` (see the module docstring)."""
    if not 0 <= new_max_overlap < 1:
        raise RetrolmError(f"new_max_overlap must be in [0, 1), got {new_max_overlap}")
    by_text = {hashlib.sha256(d.text.encode()).hexdigest(): d.id for d in old}
    index = NgramIndex((d.text for d in old), n)
    labels = []
    for d in new:
        same = by_text.get(hashlib.sha256(d.text.encode()).hexdigest())
        if same is not None:
            labels.append(Label(d.id, "identical", 1.0, same))
            continue
        best, share = index.best_match(d.text)
        labels.append(Label(d.id, "changed" if share > new_max_overlap else "new", round(share, 4),
                            old[best].id if best >= 0 else None))
    return labels


def truncate(text: str, max_chars: int | None) -> str:
    """The first ``max_chars`` characters of ``text``, cut at the last line break before the limit if there is one."""
    if not max_chars or len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars]


def split_versions(old_paths: list[str | Path], new_paths: list[str | Path], out_dir: str | Path,
                   per_bucket: int = 10, seed: int = 0, max_chars: int | None = None, new_max_overlap: float = 0.3,
                   exclude: str = r"(^|/)translations/", min_chars: int = 1000) -> dict:
    """Label the new version against the old one and write to ``out_dir``:

    * ``heldout.jsonl`` — a seeded sample of ``per_bucket`` new-version documents per bucket (``translations/`` and
      documents shorter than ``min_chars`` left out), each with ``bucket``, ``overlap`` and ``best_match``;
      ``heldout-<bucket>.jsonl`` the same per bucket; documents are cut to ``max_chars`` characters (at a line break)
      when given;
    * ``rest.jsonl`` — every other new-version document (to add to a database of the old version);
    * ``labels.json`` — the label of every new-version document and the counts per bucket.

    Returns the counts.
    """
    old, new = list(iter_documents(old_paths, warn=False)), list(iter_documents(new_paths, warn=False))
    labels = label_versions(old, new, new_max_overlap)
    rng = np.random.default_rng(seed)
    skip = re.compile(exclude) if exclude else None
    held: dict[str, list[int]] = {}
    for bucket in BUCKETS:
        pool = [i for i, lab in enumerate(labels) if lab.bucket == bucket and not (skip and skip.search(lab.id))
                and len(new[i].text) >= min_chars]
        picked = rng.choice(pool, size=min(per_bucket, len(pool)), replace=False) if pool else []
        held[bucket] = sorted(int(i) for i in picked)
    chosen = {i for ids in held.values() for i in ids}
    out = Path(out_dir)

    def record(i: int) -> dict:
        lab = labels[i]
        return {"id": lab.id, "text": truncate(new[i].text, max_chars), "bucket": lab.bucket,
                "overlap": lab.overlap, "best_match": lab.best_match}

    def write(path: Path, rows: Iterable[dict]) -> None:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    write(out / "heldout.jsonl", (record(i) for b in BUCKETS for i in held[b]))
    for b in BUCKETS:
        write(out / f"heldout-{b}.jsonl", (record(i) for i in held[b]))
    write(out / "rest.jsonl", ({"id": d.id, "text": d.text} for i, d in enumerate(new) if i not in chosen))
    counts = {"all": {b: sum(lab.bucket == b for lab in labels) for b in BUCKETS},
              "heldout": {b: len(held[b]) for b in BUCKETS}, "old_docs": len(old), "new_docs": len(new)}
    write_json(out / "labels.json", {"counts": counts, "new_max_overlap": new_max_overlap, "seed": seed,
                                     "labels": [vars(lab) for lab in labels]})
    return counts
