"""Question answering as an evaluation: QA items from JSONL, SQuAD-normalised exact match and token F1, multiple choice
by log-likelihood, and contamination of test items by n-gram overlap with the datastore.

A QA file holds one JSON object per line::

    {"id": "q1", "question": "...", "answers": ["...", "..."]}                       # short answer
    {"id": "q2", "question": "...", "choices": ["...", "...", "..."], "answer": 1}   # multiple choice (MMLU style)

An optional ``query`` is what retrieval searches with instead of the question, for a benchmark whose questions wrap
their content in words of the format (``What does the word "cystolith" mean?`` → ``cystolith``): in a dictionary,
*what*, *word* and *mean* are frequent enough that BM25 prefers a chunk repeating them to the one entry that holds the
rare word. The reader and the reranker still read the question. ``rag-eval``, ``rag`` pipelines given QA items and the
knowledge study search with it; REALM, whose retriever is trained on the question, does not.

Any other field (e.g. ``provenance``) is kept in :attr:`QAItem.meta`. A bad record is a one-line error naming the file
and line. Scores follow the official SQuAD v1.1 script: answers are lower-cased, stripped of punctuation, of the
articles *a*, *an*, *the* and of extra whitespace; EM and F1 take the best gold answer.

Contamination (the test item itself, not just its answer, appears in the datastore): an item is contaminated when any
word n-gram of its text (question followed by its gold answer; for multiple choice the correct choice) occurs in a
live document of the store, after the same normalisation. An item shorter than n words is checked as a whole. With
``scope="parts"`` the answer is also checked on its own: its n-grams, or the whole answer when it is shorter than n
words and has at least ``min_words`` words. That finds a short answer held verbatim (a definition of nine words),
which every n-gram of question + answer misses because it spans the question's wording. The
paper this follows used n = 16 on MMLU and n = 26 on Math-500; GPT-3's analysis used 13 (the default here).
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrolm.core.errors import RetrolmError
from retrolm.core.io import jsonl_values
from retrolm.db import DatabaseView

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_WORD = re.compile(r"\w+")


# ---------------------------------------------------------------------------------------------------------- items
@dataclass
class QAItem:
    """One test question."""

    id: str
    question: str
    answers: list[str]
    """Gold answers (any of them counts); for multiple choice, the correct choice."""
    choices: list[str] | None = None
    """Multiple choice: the options (scored by log-likelihood)."""
    answer: int | None = None
    """Multiple choice: index of the correct option in :attr:`choices`."""
    meta: dict = field(default_factory=dict)
    """Every other field of the record (provenance, labels, ...)."""
    query: str | None = None
    """What retrieval searches with, when it is not the question (see the module docstring)."""

    @property
    def multiple_choice(self) -> bool:
        return self.choices is not None

    def text(self) -> str:
        """What contamination is checked on: the question followed by the gold answer."""
        return f"{self.question} {self.answers[0] if self.answers else ''}".strip()

    def search_text(self) -> str:
        """What retrieval searches with: the query if the record has one, else the question."""
        return self.query if self.query is not None else self.question


def _record(obj: object, where: str) -> QAItem:
    if not isinstance(obj, dict):
        raise RetrolmError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("id", "question") if k not in obj]
    if missing:
        raise RetrolmError(f"{where}: missing field {missing[0]!r}")
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        raise RetrolmError(f"{where}: 'question' must be a non-empty string")
    query = obj.get("query")
    if query is not None and (not isinstance(query, str) or not query.strip()):
        raise RetrolmError(f"{where}: 'query' must be a non-empty string when given")
    meta = {k: v for k, v in obj.items() if k not in ("id", "question", "answers", "choices", "answer", "query")}
    if "choices" in obj:
        choices, answer = obj["choices"], obj.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                       for c in choices):
            raise RetrolmError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise RetrolmError(f"{where}: 'answer' must be the index of the correct choice (0..{len(choices) - 1})")
        return QAItem(str(obj["id"]), question, [choices[answer]], list(choices), answer, meta, query)
    answers = obj.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise RetrolmError(f"{where}: 'answers' must be a non-empty list of non-empty strings "
                           "(or give 'choices' and 'answer')")
    return QAItem(str(obj["id"]), question, list(answers), meta=meta, query=query)


def load_qa(path: str | Path, max_questions: int | None = None) -> list[QAItem]:
    """The QA items of a JSONL file (the first ``max_questions``), checked line by line; duplicate ids are errors."""
    path = Path(path)
    if not path.is_file():
        raise RetrolmError(f"{path}: QA file not found")
    items: list[QAItem] = []
    seen: set[str] = set()
    for where, obj in itertools.islice(jsonl_values(path), max_questions):  # no line past the limit is read
        item = _record(obj, where)
        if item.id in seen:
            raise RetrolmError(f"{where}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise RetrolmError(f"{path}: no questions")
    return items


# ------------------------------------------------------------------------------------------------------- scoring
def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)  # both empty (e.g. an answer that is only an article) count as a match
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token F1 against the best gold answer."""
    return max(_f1(prediction, g) for g in golds)


def _chosen_option(prediction: str, choices: Sequence[str]) -> int | None:
    """The option a prediction names: the one it is as written, else the only one it equals after normalisation (two
    options may normalise alike: "-1" and "1", "per-CPU" and "per_cpu")."""
    written = [i for i, c in enumerate(choices) if c.strip() == prediction.strip()]
    if written:
        return written[0]
    alike = [i for i, c in enumerate(choices) if normalize_answer(c) == normalize_answer(prediction)]
    return alike[0] if len(alike) == 1 else None


def score_prediction(prediction: str, item: QAItem) -> dict[str, float]:
    """``{"em", "f1"}`` of a prediction; for multiple choice the prediction is the chosen option's text and both are
    accuracy."""
    if item.multiple_choice:  # the option picked (a set may repeat the gold option: either copy is right)
        chosen = _chosen_option(prediction, item.choices)
        acc = float(chosen is not None and item.choices[chosen].strip() == item.choices[item.answer].strip())
        return {"em": acc, "f1": acc}
    return {"em": exact_match(prediction, item.answers), "f1": token_f1(prediction, item.answers)}


def mean_scores(scores: Sequence[dict[str, float]], keep: Sequence[bool] | None = None
                ) -> dict[str, float | int | None]:
    """Mean EM and F1 (in %) and the count, over the items where ``keep`` is true (all by default); None for no
    items."""
    chosen = [s for i, s in enumerate(scores) if keep is None or keep[i]]
    n = len(chosen)
    out: dict[str, float | int | None] = {"n": n}
    for key in ("em", "f1"):
        out[key] = round(100 * sum(s[key] for s in chosen) / n, 2) if n else None
    return out


CHOICE_NORMALIZATIONS = ("mean", "sum", "pmi")
"""How option log-likelihoods are compared: per token (mean), in total (sum), or in total against the option's own
likelihood after the task's format alone (pmi)."""


def choice_prediction(nlls: Sequence[Sequence[float]], normalize: str = "mean",
                      prior_nlls: Sequence[Sequence[float]] | None = None) -> int:
    """The option with the highest log-likelihood: ``nlls[c]`` are the per-token NLLs of option c; ``normalize``
    "mean" (per token, the default: longer options are not penalised), "sum", or "pmi": the total minus the option's
    total after a premise without the question (``prior_nlls``, the domain-conditional PMI of Holtzman et al. 2021),
    so that an option likely in any context (short, common words, familiar spelling) is not chosen for that."""
    if normalize not in CHOICE_NORMALIZATIONS:
        raise RetrolmError(f"choice normalisation must be mean, sum or pmi, got {normalize!r}")
    if normalize == "pmi":
        if prior_nlls is None or len(prior_nlls) != len(nlls):
            raise RetrolmError("pmi needs each option's NLLs after the premise alone")
        totals = [float(np.sum(x)) - float(np.sum(y)) for x, y in zip(nlls, prior_nlls, strict=True)]
    else:
        totals = [float(np.sum(x)) / (max(1, len(x)) if normalize == "mean" else 1) for x in nlls]
    return int(np.argmin(totals))


# ------------------------------------------------------------------------------------------------- contamination
def words(text: str) -> list[str]:
    """The normalised words of a text (SQuAD normalisation, then split into word characters)."""
    return _WORD.findall(normalize_answer(text))


@dataclass
class Contamination:
    """Which test items overlap the datastore."""

    n: int
    """n-gram length in words."""
    flags: list[bool]
    """Per item (in order): contaminated."""
    ids: list[str]
    evidence: dict[str, str] = field(default_factory=dict)
    """Item id → one overlapping n-gram (for the report)."""
    documents: int = 0
    """Store documents scanned."""
    scope: str = "item"
    """What was checked: the item's text (question + answer) or its parts apart (see the module docstring)."""
    min_words: int = 0
    """``scope="parts"``: a part shorter than n words is checked whole if it has at least this many."""

    @property
    def fraction(self) -> float:
        return sum(self.flags) / len(self.flags) if self.flags else 0.0

    def to_dict(self) -> dict:
        return {"n": self.n, "scope": self.scope, **({"min_words": self.min_words} if self.scope == "parts" else {}),
                "fraction": round(self.fraction, 4), "contaminated": sum(self.flags),
                "items": len(self.flags), "documents_scanned": self.documents,
                "contaminated_ids": [i for i, f in zip(self.ids, self.flags, strict=True) if f],
                "evidence": self.evidence}


CONTAMINATION_SCOPES = ("item", "parts")


def item_ngrams(items: Sequence[QAItem], n: int, scope: str = "item", min_words: int = 5
                ) -> list[set[tuple[str, ...]]]:
    """Per item, the word n-grams of its whole text (an item shorter than n words: that text as one gram); with
    ``scope="parts"`` also its answer's own: its n-grams, or the whole answer as one gram when it is shorter than n
    words and has at least ``min_words`` (so ``parts`` flags every item ``item`` does, and more)."""
    if n < 1:
        raise RetrolmError(f"contamination n must be >= 1, got {n}")
    if scope not in CONTAMINATION_SCOPES:
        raise RetrolmError(f"contamination scope must be item or parts, got {scope!r}")
    if min_words < 1:
        raise RetrolmError(f"contamination min_words must be >= 1, got {min_words}")
    out = []
    for item in items:
        grams: set[tuple[str, ...]] = set()
        w = words(item.text())
        if w:  # no words: nothing to find (the empty gram would match every document)
            grams |= {tuple(w)} if len(w) < n else {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}
        a = words(item.answers[0]) if scope == "parts" and item.answers else []
        if len(a) >= n:
            grams |= {tuple(a[i : i + n]) for i in range(len(a) - n + 1)}
        elif len(a) >= min_words:
            grams.add(tuple(a))
        out.append(grams)
    return out


def find_contamination(items: Sequence[QAItem], documents: Iterable[str], n: int = 13, scope: str = "item",
                       min_words: int = 5) -> Contamination:
    """Flag the items any of whose n-grams (see :func:`item_ngrams`) occurs in one of ``documents``.

    Only runs of consecutive document words that all occur in some test item can hold a match, so a document is
    scanned word by word against the test vocabulary and only those runs are cut into grams."""
    grams = item_ngrams(items, n, scope, min_words)
    owners: dict[tuple[str, ...], list[int]] = {}
    for i, gs in enumerate(grams):
        for g in gs:
            owners.setdefault(g, []).append(i)
    by_len: dict[int, set[tuple[str, ...]]] = {}
    for g in owners:
        by_len.setdefault(len(g), set()).add(g)
    vocab = {w for g in owners for w in g}
    flags = [False] * len(items)
    evidence: dict[str, str] = {}
    scanned = 0
    for text in documents:
        scanned += 1
        doc = words(text)
        run: list[str] = []
        for w in [*doc, None]:  # None closes the last run
            if w is not None and w in vocab:
                run.append(w)
                continue
            for length, wanted in by_len.items():
                for s in range(len(run) - length + 1):
                    g = tuple(run[s : s + length])
                    if g in wanted:
                        for i in owners[g]:
                            if not flags[i]:
                                flags[i] = True
                                evidence[items[i].id] = " ".join(g)
            run = []
    return Contamination(n, flags, [it.id for it in items], evidence, scanned, scope,
                         min_words if scope == "parts" else 0)


def store_documents(db: DatabaseView, batch_size: int = 256) -> Iterator[str]:
    """The text of every live document of a database (decoded from its stored tokens)."""
    store = db.store
    live = np.flatnonzero(~db.deleted_docs)
    for start in range(0, len(live), batch_size):
        docs = live[start : start + batch_size]
        yield from db.tokenizer.decode_batch([store.doc_tokens(int(d)).tolist() for d in docs])


def contamination(items: Sequence[QAItem], db: DatabaseView, n: int = 13, scope: str = "item", min_words: int = 5
                  ) -> Contamination:
    """:func:`find_contamination` against the live documents of a database."""
    return find_contamination(items, store_documents(db), n, scope, min_words)


__all__ = ["CONTAMINATION_SCOPES", "Contamination", "QAItem", "choice_prediction", "contamination", "exact_match",
           "find_contamination", "item_ngrams", "load_qa", "mean_scores", "normalize_answer", "score_prediction",
           "store_documents", "token_f1", "words"]
