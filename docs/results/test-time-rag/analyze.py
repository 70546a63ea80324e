"""Paired comparisons of a rag-eval run (docs/test-time-rag.md): each configuration against closed book, with a 95%
bootstrap interval over questions, on all / clean / contaminated items, and on questions whose text the store holds
verbatim or not (kernel-cloze: the sentence, in_old; dict-def: the definition in the word's entry, in_store); plus how
often the read passages include the question's source document (dict-def: the word's entry in the store).

    .venv/bin/python docs/results/test-time-rag/analyze.py RUN_DIR QA.jsonl [metric]
"""

from __future__ import annotations

import json
import sys

import numpy as np

MODES = ("closed_book", "retrieval", "rerank", "self_consistency", "cross_doc")


def interval(diff: np.ndarray, seed: int = 0, n: int = 10_000) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(1)
    return 100 * diff.mean(), 100 * np.quantile(boots, 0.025), 100 * np.quantile(boots, 0.975)


def main(run: str, qa_path: str, metric: str = "em") -> None:
    with open(f"{run}/predictions.jsonl") as f:
        preds = [json.loads(x) for x in f]
    with open(qa_path) as f:
        qa = {r["id"]: r for r in map(json.loads, f)}
    modes = [m for m in MODES if m in preds[0]]
    groups = {"all": [True] * len(preds), "clean": [not p["contaminated"] for p in preds],
              "contaminated": [p["contaminated"] for p in preds]}
    for label, other in (("in_old", "new sentence"), ("in_store", "definition not in store")):
        if label in qa[preds[0]["id"]]["provenance"]:
            groups[f"{label} (verbatim in store)"] = [qa[p["id"]]["provenance"][label] for p in preds]
            groups[other] = [not g for g in groups[f"{label} (verbatim in store)"]]
    print(f"| group | n | {' | '.join(modes)} |")
    print("|---|---|" + "---|" * len(modes))
    for g, keep in groups.items():
        sel = [p for p, k in zip(preds, keep, strict=True) if k]
        if not sel:
            continue
        base = np.array([p["closed_book"][metric] for p in sel])
        cells = []
        for m in modes:
            score = np.array([p[m][metric] for p in sel])
            if m == "closed_book":
                cells.append(f"{100 * score.mean():.1f}")
            else:
                d, lo, hi = interval(score - base)
                cells.append(f"{100 * score.mean():.1f} ({d:+.1f} [{lo:+.1f}, {hi:+.1f}])")
        print(f"| {g} | {len(sel)} | {' | '.join(cells)} |")
    src = []  # the documents of the store the answer comes from
    for p in preds:
        prov = qa[p["id"]]["provenance"]
        src.append(set(prov["store_doc_ids"]) if "store_doc_ids" in prov else
                   {f"6.1/{prov['path']}" if "path" in prov else prov.get("doc_id")})
    for m in modes[1:]:
        first = np.mean([(p[m]["passages"] or [None])[0] in s for p, s in zip(preds, src, strict=True)])
        read = np.mean([bool(s & set(p[m]["passages"])) for p, s in zip(preds, src, strict=True)])
        print(f"{m}: source document first {100 * first:.0f}%, among the passages read {100 * read:.0f}%")


if __name__ == "__main__":
    main(*sys.argv[1:])
