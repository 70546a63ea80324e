"""REALM's pre-training masks: salient spans (regex rules, no NER model) and random tokens (the ablation).

Salient spans are found with **regular expressions**, not a trained NER tagger:

* **dates**: ``7 November 1867``, ``November 7, 1867``, ``November 1867``, ``1867-11-07``;
* **numbers**: any run of digits, with ``,``/``.`` separators (years such as ``1867`` included);
* **capitalised spans**: two or more consecutive capitalised words (``Marie Curie``, ``New York City``; a lower-case
  ``of``/``de``/``von``/``van`` may join them: ``University of Paris``), and single capitalised words that do not
  start a sentence (``Warsaw``).

Overlapping matches are merged. As in REALM, one salient span per example is masked (all of its word pieces);
an example without one falls back to random-token masking. Random-token masking masks each word piece with
probability ``mask_prob`` (at least one), BERT-style but always with ``[MASK]``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_MONTH = (r"(?:January|February|March|April|May|June|July|August|September|October|November|December|"
          r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.?")
_DATE = re.compile(
    rf"\b\d{{1,2}}\s+{_MONTH}(?:,?\s+\d{{3,4}})?\b"  # 7 November 1867
    rf"|\b{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{3,4}})?\b"  # November 7, 1867
    rf"|\b{_MONTH}\s+\d{{3,4}}\b"  # November 1867
    r"|\b\d{4}-\d{2}-\d{2}\b"  # 1867-11-07
)
_NUMBER = re.compile(r"\b\d+(?:[.,]\d+)*\b")
_CAP = r"[A-Z][\w'’-]*"
_MULTI_CAP = re.compile(rf"\b{_CAP}(?:\s+(?:(?:of|de|von|van|del|da)\s+)?{_CAP})+")
_SINGLE_CAP = re.compile(rf"\b{_CAP}")
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+|[\"“(]\s*)$")


def salient_spans(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the dates, numbers and capitalised spans of ``text``, merged and sorted."""
    found = [m.span() for pattern in (_DATE, _NUMBER, _MULTI_CAP) for m in pattern.finditer(text)]
    for m in _SINGLE_CAP.finditer(text):
        if not _SENTENCE_START.search(text[: m.start()]):
            found.append(m.span())
    merged: list[tuple[int, int]] = []
    for s, e in sorted(found):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


@dataclass
class MaskedExample:
    """Word-piece ids of one example (no special tokens) with ``[MASK]`` applied, and the MLM labels."""

    ids: list[int]
    labels: list[int]
    """The original id at masked positions, -100 elsewhere."""
    span: tuple[int, int] | None = None
    """The salient character span that was masked (None: random-token masking)."""


def mask_example(text: str, tokenizer, mode: str, rng: random.Random, mask_prob: float = 0.15, max_len: int = 64
                 ) -> MaskedExample:
    """Mask ``text`` for pre-training: ``mode`` is ``salient`` (one salient span) or ``random`` (random tokens)."""
    enc = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_len, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    chosen: list[int] = []
    span = None
    if mode == "salient":
        spans = [(s, e) for s, e in salient_spans(text) if any(a < e and b > s for a, b in offsets)]
        if spans:
            span = spans[rng.randrange(len(spans))]
            chosen = [i for i, (a, b) in enumerate(offsets) if a < span[1] and b > span[0]]
    elif mode != "random":
        raise ValueError(f"masking mode must be salient or random, got {mode!r}")
    if not chosen and ids:
        chosen = [i for i in range(len(ids)) if rng.random() < mask_prob] or [rng.randrange(len(ids))]
    labels = [-100] * len(ids)
    for i in chosen:
        labels[i] = ids[i]
        ids[i] = tokenizer.mask_token_id
    return MaskedExample(ids, labels, span)
