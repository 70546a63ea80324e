"""Synthetic knowledge that no model can already know (SPEC K1, K2; Lampinen et al. 2025): invented words in two
structures, and multiple-choice tests of what follows from the stated facts as well as of the facts themselves.

* **Comparisons**: chains of invented entities ordered by a real adjective. Stated: each adjacent pair, as
  ``"femp is more dangerous than glon."`` or, as often, the same fact the other way round (``"glon is less dangerous
  than femp."``). Tested: the stated sentence (``fact``) and its **reversal** (``reversal``: the pair in the order
  not stated: ``"glon is" → "less dangerous than femp."`` against ``"more dangerous than femp."``).
* **A concept hierarchy**: top categories, each with middle categories, each with leaves. Stated: ``"All <leaf> are
  <middle>."`` and ``"All <middle> are <top>."``. Tested: the stated memberships (``fact``: ``"All <leaf> are" →
  <middle>`` against three other middle categories) and the **syllogism** (``syllogism``: ``"All <leaf> are" →
  <top>`` against the other tops), which no single fact states.

``facts.jsonl`` holds one document per fact (``{"id", "text"}``: a corpus for ``retrolm db build`` or for
fine-tuning); ``qa.jsonl`` the test items in retrolm's QA format (``question``, ``choices``, ``answer``) with their
``kind`` and the ids of the ``facts`` they rest on; ``inferences.jsonl`` what follows from the facts in the same
sentence forms (the reversal of each comparison, the syllogism of each leaf), for augmented fine-tuning with correct
inferences. The same seed and sizes give the same files, byte for byte.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from retrolm.core.errors import RetrolmError
from retrolm.core.io import write_bytes

VERSION = 1
ADJECTIVES = ["dangerous", "valuable", "fragile", "expensive", "poisonous", "famous", "powerful", "colorful",
              "flexible", "popular", "delicate", "transparent", "aggressive", "durable", "curious", "elegant"]
"""Adjectives that compare with "more" / "less" (one per comparison chain)."""
_ONSETS = ["b", "d", "f", "g", "k", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "fl", "gl", "kr", "pl", "sk",
           "sn", "st", "tr", "vl", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ee", "ou"]
_CODAS = ["", "b", "d", "k", "l", "m", "mp", "n", "nd", "p", "rk", "sk", "t", "x"]


@dataclass(frozen=True)
class KnowledgeSpec:
    """Sizes of one synthetic knowledge set."""

    chains: int = 12
    """Comparison chains (one adjective each)."""
    chain_len: int = 4
    """Entities per chain: chain_len - 1 stated comparisons, as many reversals tested."""
    tops: int = 4
    """Top categories of the hierarchy."""
    mids: int = 3
    """Middle categories per top."""
    leaves: int = 3
    """Leaves per middle category: each a stated fact and a syllogism."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.chains > len(ADJECTIVES):
            raise RetrolmError(f"chains: at most {len(ADJECTIVES)} (one adjective each), got {self.chains}")
        if self.chain_len < 2 or self.chains < 0:
            raise RetrolmError("chain_len must be >= 2 and chains >= 0")
        if self.tops < 2 or self.mids < 1 or self.leaves < 1:
            raise RetrolmError("tops must be >= 2 (a syllogism needs another top to choose against), mids and "
                               "leaves >= 1")
        if self.words > MAX_WORDS:
            raise RetrolmError(f"these sizes need {self.words:,} invented words; at most {MAX_WORDS:,} (fewer "
                               "chains, entities per chain, categories or leaves)")

    @property
    def words(self) -> int:
        """Invented words the set names: every entity of every chain and every category."""
        return self.chains * self.chain_len + self.tops * (1 + self.mids * (1 + self.leaves))


MAX_WORDS = 100_000
"""Invented words one set may ask for (about 410,000 of this shape exist, none a prefix of another)."""


def invented_words(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct pronounceable invented words of two syllables (none a prefix of another)."""
    words: set[str] = set()
    prefixes: set[str] = set()  # every proper prefix of a kept word: the check is per letter, not per word kept
    for _ in range(200 * n + 1000):
        if len(words) == n:
            break
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)) + rng.choice(_CODAS)
        if w not in prefixes and not any(w[:i] in words for i in range(1, len(w) + 1)):
            words.add(w)
            prefixes.update(w[:i] for i in range(1, len(w)))
    if len(words) < n:
        raise RetrolmError(f"could not invent {n} distinct words")
    return sorted(words)


def _comparison(a: str, b: str, adjective: str, more: bool) -> str:
    """The sentence saying ``a`` ranks above ``b`` (more) or ``b`` below ``a`` (written from b's side)."""
    return f"{a} is more {adjective} than {b}." if more else f"{b} is less {adjective} than {a}."


def make_knowledge(spec: KnowledgeSpec) -> tuple[list[dict], list[dict], list[dict]]:
    """(facts, test items, inferences) of ``spec`` (see the module docstring)."""
    rng = random.Random(spec.seed)
    words = invented_words(spec.words, rng)
    rng.shuffle(words)
    facts: list[dict] = []
    items: list[dict] = []
    inferences: list[dict] = []

    def fact(text: str, **labels) -> str:
        fid = f"fact-{len(facts):03d}"
        facts.append({"id": fid, "text": text, **labels})
        return fid

    def item(kind: str, question: str, right: str, wrong: list[str], rests_on: list[str]) -> None:
        choices = [right, *wrong]
        rng.shuffle(choices)
        items.append({"id": f"q-{len(items):03d}", "question": question, "choices": choices,
                      "answer": choices.index(right), "kind": kind, "facts": rests_on})

    adjectives = rng.sample(ADJECTIVES, spec.chains)
    for c, adjective in enumerate(adjectives):
        chain = [words.pop() for _ in range(spec.chain_len)]  # chain[0] ranks highest
        for a, b in itertools.pairwise(chain):
            stated_more = rng.random() < 0.5  # half the facts read "more", half "less": no wording is the answer
            fid = fact(_comparison(a, b, adjective, stated_more), structure="comparison", chain=c)
            first, second = (a, b) if stated_more else (b, a)  # who the stated sentence starts with
            word = "more" if stated_more else "less"
            other = "less" if stated_more else "more"
            item("fact", f"{first} is", f"{word} {adjective} than {second}.",
                 [f"{other} {adjective} than {second}."], [fid])
            item("reversal", f"{second} is", f"{other} {adjective} than {first}.",
                 [f"{word} {adjective} than {first}."], [fid])
            inferences.append({"id": f"inf-{len(inferences):03d}", "text": f"{second} is {other} {adjective} than "
                               f"{first}.", "from": [fid]})

    tops = [words.pop() for _ in range(spec.tops)]
    mids = {t: [words.pop() for _ in range(spec.mids)] for t in tops}
    all_mids = [m for t in tops for m in mids[t]]
    for t in tops:
        for m in mids[t]:
            mid_fact = fact(f"All {m} are {t}.", structure="hierarchy")
            other_tops = [x for x in tops if x != t]
            item("fact", f"All {m} are", f"{t}.", [f"{x}." for x in rng.sample(other_tops, min(3, len(other_tops)))],
                 [mid_fact])
            for _ in range(spec.leaves):
                leaf = words.pop()
                leaf_fact = fact(f"All {leaf} are {m}.", structure="hierarchy")
                other_mids = [x for x in all_mids if x != m]
                item("fact", f"All {leaf} are", f"{m}.",
                     [f"{x}." for x in rng.sample(other_mids, min(3, len(other_mids)))], [leaf_fact])
                item("syllogism", f"All {leaf} are", f"{t}.",
                     [f"{x}." for x in rng.sample(other_tops, min(3, len(other_tops)))], [leaf_fact, mid_fact])
                inferences.append({"id": f"inf-{len(inferences):03d}", "text": f"All {leaf} are {t}.",
                                   "from": [leaf_fact, mid_fact]})
    order = list(range(len(facts)))
    rng.shuffle(order)  # stated in no particular order: a chain's facts are not next to each other
    return [facts[i] for i in order], items, inferences


def write_knowledge(spec: KnowledgeSpec, out: str | Path) -> dict[str, int]:
    """Write ``facts.jsonl``, ``qa.jsonl``, ``inferences.jsonl`` and ``spec.json`` into folder ``out``; returns the
    counts (facts, items per kind, inferences)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    facts, items, inferences = make_knowledge(spec)
    for name, rows in (("facts", facts), ("qa", items), ("inferences", inferences)):
        write_bytes(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    counts = {"facts": len(facts), "inferences": len(inferences)}
    for it in items:
        counts[f"items_{it['kind']}"] = counts.get(f"items_{it['kind']}", 0) + 1
    write_bytes(out / "spec.json", json.dumps({"version": VERSION, **asdict(spec), "counts": counts}, indent=2,
                                              sort_keys=True).encode())
    return counts


__all__ = ["ADJECTIVES", "KnowledgeSpec", "invented_words", "make_knowledge", "write_knowledge"]
