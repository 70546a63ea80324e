"""Consistency operators over a reader's answers: self-consistency (a normalised majority vote over samples) and
cross-document consistency (answer from each passage separately, weight each passage by how consistent its answers are
with themselves and with the other passages', return the answer of the most consistent passages and which passages
supported it).

Answers are compared after SQuAD normalisation (:func:`retrolm.eval.qa.normalize_answer`); an answer that normalises
to nothing is an abstention and gets no vote. Multiple-choice answers (``exact=True``) are options, compared as written:
two options that normalise alike ("-1" and "1", "per-CPU" and "per_cpu") are different answers. Tied votes go to the
answer closest to all the others (the largest summed token F1 with every answer: the medoid, which matters for
free-form answers that rarely repeat exactly), then to the answer given first (for passages: the best-ranked one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from retrolm.eval.qa import normalize_answer, token_f1


@dataclass
class Vote:
    """The result of a majority vote."""

    answer: str
    """The winning answer as first written (empty if every answer abstained)."""
    normalized: str
    score: float
    """Votes (or weight) for the winner."""
    share: float
    """``score`` over all non-abstaining votes (0 when all abstained)."""
    support: list[int]
    """Indices of the answers that gave the winner."""
    tally: dict[str, float] = field(default_factory=dict)
    """Normalised answer → votes."""

    def to_dict(self) -> dict:
        return {"answer": self.answer, "share": round(self.share, 4), "support": self.support,
                "tally": {k: round(v, 4) for k, v in self.tally.items()}}


def _key(answer: str, exact: bool) -> str:
    return answer.strip() if exact else normalize_answer(answer)


def majority_vote(answers: Sequence[str], weights: Sequence[float] | None = None, exact: bool = False) -> Vote:
    """Self-consistency: the most frequent normalised answer (weighted if ``weights``; ``exact``: options compared as
    written); ties → the one with the largest summed similarity to all answers (:func:`answer_similarity`, weighted),
    then the first given."""
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(weights)} weights for {len(answers)} answers")
    norms = [_key(a, exact) for a in answers]
    tally: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, n in enumerate(norms):
        if n:
            tally[n] = tally.get(n, 0.0) + (1.0 if weights is None else float(weights[i]))
            first.setdefault(n, i)
    if not tally:
        return Vote("", "", 0.0, 0.0, [], {})
    top = max(tally.values())
    tied = [n for n in tally if tally[n] == top]
    if len(tied) > 1:
        w = [1.0] * len(answers) if weights is None else [float(x) for x in weights]
        centrality = {n: sum(w[j] * answer_similarity(n, norms[j], exact) for j in range(len(answers))) for n in tied}
        best = max(tied, key=lambda n: (centrality[n], -first[n]))
    else:
        best = tied[0]
    total = sum(tally.values())
    support = [i for i, n in enumerate(norms) if n == best]
    return Vote(answers[first[best]].strip(), best, tally[best], tally[best] / total if total else 0.0, support, tally)


@dataclass
class CrossDocVote:
    """Cross-document consistency over the passages of one question."""

    answer: str
    normalized: str
    support: list[int]
    """Passages (indices, in ranked order) whose answer is the winner."""
    passage_answers: list[str]
    """Each passage's own answer (its majority over samples)."""
    self_consistency: list[float]
    """Per passage: share of its samples that agree with its own answer (1 with one sample; 0 if it abstained)."""
    agreement: list[float]
    """Per passage: Σ over the other passages of the token-F1 similarity of their answers to its answer."""
    weights: list[float]
    """Per passage: self_consistency · (1 + agreement)."""
    tally: dict[str, float]
    """Normalised answer → summed weight of the passages giving it."""

    def to_dict(self) -> dict:
        return {"answer": self.answer, "support": self.support, "passage_answers": self.passage_answers,
                "self_consistency": [round(x, 4) for x in self.self_consistency],
                "agreement": [round(x, 4) for x in self.agreement], "weights": [round(x, 4) for x in self.weights],
                "tally": {k: round(v, 4) for k, v in self.tally.items()}}


def answer_similarity(a: str, b: str, exact: bool = False) -> float:
    """Token F1 of two answers after normalisation (1 for equal answers, 0 if either abstains); ``exact``: 1 for the
    same option, else 0."""
    if exact:
        return float(bool(a.strip()) and a.strip() == b.strip())
    if not normalize_answer(a) or not normalize_answer(b):
        return 0.0
    return token_f1(a, [b])


def cross_document_vote(per_passage: Sequence[Sequence[str]], exact: bool = False) -> CrossDocVote:
    """Vote over passages, each of which answered alone (one or more samples each, in ranked order).

    Passage p's answer a_p is the majority of its samples and c_p the share of its samples that gave it; its agreement
    g_p = Σ_{q≠p} sim(a_p, a_q) (token F1, so "in 1970" partly agrees with "1970"); its weight w_p = c_p · (1 + g_p).
    The answer with the largest summed weight wins (ties: the best-ranked passage's), and its supporters are the
    passages whose answer it is. With no agreement anywhere this falls back to the most self-consistent passage,
    then to the best-ranked one. ``exact``: the answers are options, compared as written."""
    own = [majority_vote(list(samples), exact=exact) for samples in per_passage]
    answers = [v.answer for v in own]
    # over all of the passage's samples: abstaining samples count against it (a passage that answered once in four
    # is not fully consistent), unlike Vote.share, which is over the votes cast
    consistency = [v.score / len(samples) if v.normalized else 0.0 for v, samples in zip(own, per_passage, strict=True)]
    agreement = [sum(answer_similarity(answers[p], answers[q], exact) for q in range(len(own)) if q != p)
                 for p in range(len(own))]
    weights = [c * (1.0 + g) for c, g in zip(consistency, agreement, strict=True)]
    tally: dict[str, float] = {}
    first: dict[str, int] = {}
    for p, v in enumerate(own):
        if v.normalized:
            tally[v.normalized] = tally.get(v.normalized, 0.0) + weights[p]
            first.setdefault(v.normalized, p)
    if not tally:
        return CrossDocVote("", "", [], answers, consistency, agreement, weights, {})
    best = max(tally, key=lambda n: (tally[n], -first[n]))
    support = [p for p, v in enumerate(own) if v.normalized == best]
    return CrossDocVote(answers[first[best]], best, support, answers, consistency, agreement, weights, tally)


__all__ = ["CrossDocVote", "Vote", "answer_similarity", "cross_document_vote", "majority_vote"]
