"""Two versions of a corpus (e.g. the kernel documentation of 6.1 and 6.12): label every document of the new version
by how much of it the old version already holds, and split off a seeded, labelled held-out sample.

Labels are by content, not by path (files move):

* **identical** — its text equals the text of some old document (after line endings and Unicode normalisation: a
  copy saved with CRLF or in decomposed form is the same text);
* **changed** — not identical, but more than ``new_max_overlap`` of its word n-grams (n = 8) occur in one old document;
* **new** — at most ``new_max_overlap`` (default 30%) of its n-grams occur in any single old document.

``overlap`` is the largest share of the document's distinct n-grams found in one old document, and ``best_match`` is
that document. ``translations/`` are kept out of the held-out sample (they repeat the English text in other words).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrolm.core.errors import RetrolmError
from retrolm.core.io import atomic_path, write_json
from retrolm.text.corpus import Document, check_outputs_apart, iter_documents

BUCKETS = ("identical", "changed", "new")
OUTPUTS = ("heldout.jsonl", "rest.jsonl", "labels.json")
"""What ``split_versions`` writes besides ``heldout-<bucket>.jsonl``."""
_WORD = re.compile(r"\w+")


def _canonical(text: str) -> str:
    """What "the same text" compares: NFC, with CRLF / CR line ends as LF."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def _text_key(text: str) -> str:
    return hashlib.sha256(_canonical(text).encode()).hexdigest()


def word_ngrams(text: str, n: int = 8) -> np.ndarray:
    """Sorted unique 64-bit hashes of the word n-grams of ``text`` (lower-cased words)."""
    words = _WORD.findall(unicodedata.normalize("NFC", text).lower())  # NFD's combining accents would split words
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

    def shared(self, text: str) -> tuple[np.ndarray, int]:
        """Per indexed document, how many of ``text``'s distinct n-grams it holds; and how many ``text`` has."""
        h = word_ngrams(text, self.n)
        if not len(h) or not self.n_docs:
            return np.zeros(self.n_docs, dtype=np.int64), len(h)
        lo, hi = np.searchsorted(self.hashes, h, "left"), np.searchsorted(self.hashes, h, "right")
        hits = np.concatenate([self.owners[a:b] for a, b in zip(lo, hi, strict=True) if b > a] or [np.zeros(0, int)])
        return np.bincount(hits, minlength=self.n_docs), len(h)

    def best_match(self, text: str) -> tuple[int, float]:
        """(document with the largest share of ``text``'s n-grams, that share); (-1, 0) if none share any."""
        counts, size = self.shared(text)
        if not counts.any():
            return -1, 0.0
        best = int(counts.argmax())
        return best, float(counts[best]) / size


@dataclass
class Label:
    """The label of one new-version document."""

    id: str
    bucket: str
    overlap: float
    best_match: str | None


class VersionLabeller:
    """Labels documents against one old version (its texts hashed and its n-grams indexed once)."""

    def __init__(self, old: list[Document], new_max_overlap: float = 0.3, n: int = 8) -> None:
        if not 0 <= new_max_overlap < 1:
            raise RetrolmError(f"new_max_overlap must be in [0, 1), got {new_max_overlap}")
        self.old, self.new_max_overlap = old, new_max_overlap
        self.by_text = {_text_key(d.text): d.id for d in old}
        self.old_text = {d.id: _canonical(d.text) for d in old}
        self.index = NgramIndex((d.text for d in old), n)

    def label(self, doc: Document) -> Label:
        same = self.by_text.get(_text_key(doc.text))
        if same is not None:
            return Label(doc.id, "identical", 1.0, same)
        best, share = self.index.best_match(doc.text)
        return Label(doc.id, "changed" if share > self.new_max_overlap else "new", round(share, 4),
                     self.old[best].id if best >= 0 else None)

    def label_excerpt(self, doc: Document) -> Label:
        """The label of part of a document: as :meth:`label`, but identical when the part is verbatim text of the
        old document it shares most with (the whole-text hash of :meth:`label` never matches a part)."""
        lab = self.label(doc)
        if (lab.bucket != "identical" and lab.best_match is not None
                and _canonical(doc.text) in self.old_text[lab.best_match]):
            return Label(doc.id, "identical", 1.0, lab.best_match)
        return lab


def label_versions(old: list[Document], new: list[Document], new_max_overlap: float = 0.3, n: int = 8
                   ) -> list[Label]:
    """Label every document of ``new`` against ``old`` (see the module docstring)."""
    labeller = VersionLabeller(old, new_max_overlap, n)
    return [labeller.label(d) for d in new]


def truncate(text: str, max_chars: int | None) -> str:
    """The first ``max_chars`` characters of ``text``, cut at the last line break before the limit if there is one in
    its second half, else at the last space (a word is not cut in two), with no line end (CR) left dangling."""
    if not max_chars or len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    if cut <= max_chars // 2:
        cut = text.rfind(" ", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars].rstrip("\r")


def split_versions(old_paths: list[str | Path], new_paths: list[str | Path], out_dir: str | Path,
                   per_bucket: int = 10, seed: int = 0, max_chars: int | None = None, new_max_overlap: float = 0.3,
                   exclude: str = r"(^|/)translations/", min_chars: int = 1000) -> dict:
    """Label the new version against the old one and write to ``out_dir``:

    * ``heldout.jsonl`` — a seeded sample of ``per_bucket`` new-version documents per bucket (``translations/`` and
      documents shorter than ``min_chars`` left out), each with ``bucket``, ``overlap`` and ``best_match``;
      ``heldout-<bucket>.jsonl`` the same per bucket; documents are cut to ``max_chars`` characters (at a line break)
      when given, and a document whose excerpt falls in another bucket (a changed file may begin with new text, a
      new one with old text) is replaced by another draw; a changed or new excerpt carries its ``excerpt_overlap``;
    * ``rest.jsonl`` — every other new-version document (to add to a database of the old version), except copies
      of a held-out excerpt (documents holding more than ``new_max_overlap`` of its n-grams; listed in labels.json);
    * ``labels.json`` — the label of every new-version document and the counts per bucket.

    Returns the counts.
    """
    out = Path(out_dir)
    check_outputs_apart([*old_paths, *new_paths], out, (*OUTPUTS, *(f"heldout-{b}.jsonl" for b in BUCKETS)),
                        "corpus versions")
    old, new = list(iter_documents(old_paths)), list(iter_documents(new_paths))  # the one pass: bad lines are said
    labeller = VersionLabeller(old, new_max_overlap)
    labels = [labeller.label(d) for d in new]
    excerpts: dict[int, Label] = {}

    def excerpt_label(i: int) -> Label:
        """The label of what is stored of document ``i``: a changed or new document's excerpt is labelled again (its
        first ``max_chars`` characters may be all old text, or all new); an identical document's excerpt is old text."""
        if i not in excerpts:
            text = truncate(new[i].text, max_chars)
            same = text == new[i].text or labels[i].bucket == "identical"
            excerpts[i] = labels[i] if same else labeller.label_excerpt(Document(new[i].id, text, new[i].source))
        return excerpts[i]

    rng = np.random.default_rng(seed)
    spare_rng = np.random.default_rng([seed, 1])  # replacements only: the first draws stay those of older versions
    skip = re.compile(exclude) if exclude else None
    held: dict[str, list[int]] = {}
    for bucket in BUCKETS:
        pool = [i for i, lab in enumerate(labels) if lab.bucket == bucket and not (skip and skip.search(lab.id))
                and len(new[i].text) >= min_chars]
        picked = [int(i) for i in rng.choice(pool, size=min(per_bucket, len(pool)), replace=False)] if pool else []
        kept = [i for i in picked if excerpt_label(i).bucket == bucket]
        if len(kept) < len(picked):  # an excerpt in another bucket than its document: draw another document
            for i in spare_rng.permutation(sorted(set(pool) - set(picked))):
                if len(kept) == len(picked):
                    break
                if excerpt_label(int(i)).bucket == bucket:
                    kept.append(int(i))
        held[bucket] = sorted(kept)
    chosen = {i for ids in held.values() for i in ids}
    # other new-version documents holding more than new_max_overlap of a held-out excerpt (a copy or near-copy: two
    # files of one text, a template filled twice) stay out of rest.jsonl: a store of old + rest would hold the text
    # of a document labelled new
    held_ids = sorted(chosen)
    index = NgramIndex(truncate(new[i].text, max_chars) for i in held_ids)
    sizes = np.bincount(index.owners, minlength=index.n_docs)  # each excerpt's distinct n-grams
    copies: dict[int, dict] = {}
    for i, d in enumerate(new):
        if i in chosen or not held_ids:
            continue
        share = index.shared(d.text)[0] / np.maximum(sizes, 1)  # of each held-out excerpt's n-grams, held by d
        j = int(share.argmax())
        if share[j] > new_max_overlap:
            copies[i] = {"id": d.id, "copy_of": new[held_ids[j]].id, "overlap": round(float(share[j]), 4)}
    left_out = chosen | set(copies)

    def record(i: int) -> dict:
        lab, part = labels[i], excerpt_label(i)
        row = {"id": lab.id, "text": truncate(new[i].text, max_chars), "bucket": lab.bucket,
               "overlap": lab.overlap, "best_match": lab.best_match}
        if part is not lab:  # the stored excerpt's own share of one old document
            row["excerpt_overlap"] = part.overlap
        return row

    def write(path: Path, rows: Iterable[dict]) -> None:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    write(out / "heldout.jsonl", (record(i) for b in BUCKETS for i in held[b]))
    for b in BUCKETS:
        write(out / f"heldout-{b}.jsonl", (record(i) for i in held[b]))
    write(out / "rest.jsonl", ({"id": d.id, "text": d.text} for i, d in enumerate(new) if i not in left_out))
    counts = {"all": {b: sum(lab.bucket == b for lab in labels) for b in BUCKETS},
              "heldout": {b: len(held[b]) for b in BUCKETS}, "old_docs": len(old), "new_docs": len(new),
              "rest": len(new) - len(left_out), "rest_copies_left_out": len(copies)}
    write_json(out / "labels.json", {"counts": counts, "new_max_overlap": new_max_overlap, "seed": seed,
                                     "rest_copies_left_out": list(copies.values()),
                                     "labels": [vars(lab) for lab in labels]})
    return counts
