#!/usr/bin/env python3
"""Which test questions of the REALM evidence had their sentence among the pre-training sentences, and each system's
exact match without them, from the committed predictions (no model run again).

REALM pre-training masks sentences of every stored chunk, and the store holds the passage of every test question
(`scripts/evidence_realm.py`), so a test sentence can be pre-trained on with its answer as the masked span. The drawn
sentences are recomputed exactly: the first ``steps × batch_size`` of the seeded shuffle of ``sentences_of`` (one
shuffle suffices while fewer sentences are drawn than exist).

    .venv/bin/python scripts/realm_contamination.py runs/evidence-realm/cpu docs/results/realm-cpu
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from retrolm.core.config import load_config
from retrolm.db import DatabaseView
from retrolm.text.qa import CLOZE_PREFIX
from retrolm.train.realm import RealmConfig, sentences_of
from retrolm.train.realm_index import DatabaseDocuments


def _norm(text: str) -> str:
    return " ".join(text.split())


def drawn_sentences(work: Path) -> set[str]:
    """The sentences the pre-training of ``work/pretrain-realm`` drew (all three pre-trainings draw the same)."""
    cfg = load_config(RealmConfig, next((work / "pretrain-realm" / "checkpoints").glob("step-*")) / "config.yaml")
    examples = sentences_of(DatabaseDocuments(DatabaseView.open(work / "db")), cfg.max_examples)
    n = cfg.steps * cfg.batch_size
    if n > len(examples):
        raise SystemExit(f"{n} sentences drawn from {len(examples)}: more than one shuffle, not recomputed here")
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    return {_norm(examples[i][0]) for i in order[:n]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="the evidence run's work folder (db/, pretrain-realm/, qa-test.jsonl)")
    ap.add_argument("results", type=Path, help="the results folder with one realm.json per system")
    args = ap.parse_args()
    drawn = [d for d in drawn_sentences(args.work) if len(d) > 20]
    seen = set()
    for q in map(json.loads, (args.work / "qa-test.jsonl").read_text().splitlines()):
        sentence = _norm(q["question"].removeprefix(CLOZE_PREFIX))
        # the sentence with its answer, or a part of it (a chunk boundary may cut a stored sentence)
        if any(f in d or d in f for f in (sentence.replace("____", a) for a in q["answers"]) for d in drawn):
            seen.add(q["id"])
    print(f"test questions whose sentence (or a part of it) was pre-trained on: {len(seen)}")
    print("| system | EM, all | EM, never drawn | EM, drawn |\n|---|---|---|---|")
    for folder in sorted(p for p in args.results.iterdir() if (p / "realm.json").is_file()):
        preds = json.loads((folder / "realm.json").read_text())["predictions"]
        parts = [preds, [p for p in preds if p["id"] not in seen], [p for p in preds if p["id"] in seen]]
        print(f"| {folder.name} | " + " | ".join(
            f"{100 * sum(p['em'] > 0 for p in ps) / max(1, len(ps)):.1f} ({len(ps)})" for ps in parts) + " |")


if __name__ == "__main__":
    main()
