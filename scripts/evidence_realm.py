#!/usr/bin/env python3
"""Evidence for REALM (issue 14) at CPU scale: open-domain cloze QA over passages of the Linux 6.1 documentation.

    .venv/bin/python scripts/evidence_realm.py [--profile cpu|smoke|gpu]

Questions: `retrolm corpus qa kernel-cloze` over linux-docs-6.1 (a sentence of a document with one word blanked; the
answer is that word), split by document into fine-tuning and test questions. Store: one ~600-character passage around
each question's sentence (so the answer is only in the store) plus passages cut from other 6.1 documents as
distractors; pre-training reads the store without the test passages (no test sentence is masked in
pre-training). Systems, all with all-MiniLM-L6-v2 as the query encoder, document encoder and reader (mean pooling, no
projection, unit vectors scored by cosine × 20: ``normalize=true``, so the untrained retriever ranks exactly as the
frozen sentence encoder; one row without it shows what the unnormalised inner product of the first runs cost):

* reader without retrieval: a span reader over REALM's null (empty) document has nothing to point at (EM 0 by
  construction; measured anyway);
* reader over the frozen encoder's retrieval: no pre-training, query encoder fixed in fine-tuning;
* full REALM: salient-span pre-training with an index refreshed every N steps, then fine-tuning;
* ablations: random-token masking; an index never refreshed (stale).

Every step is a `retrolm` command (printed and listed in the page); finished steps are skipped on a re-run. Writes
docs/results/realm-<profile>/{<run>/realm.json, pretrain logs, README.md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import sys
import time
from pathlib import Path

from evidence_incontext import RETROLM, commands_section, evidence_start, run, save_page

REPO = Path(__file__).resolve().parents[1]

PROFILES = {
    # the store is kept small so that a background refresh (re-embedding every passage on a shared 2-core CPU) takes
    # about as long as refresh_every steps: a first try with 1,650 passages finished no refresh in 120 steps
    "cpu": {"questions": 450, "distractors": 350, "pretrain_steps": 150, "refresh_every": 30, "finetune_steps": 150,
            "batch_size": 4, "k": 4, "qa_k": 5, "max_doc_len": 64, "max_query_len": 48, "lr": 3e-5},
    "smoke": {"questions": 60, "distractors": 60, "pretrain_steps": 4, "refresh_every": 2, "finetune_steps": 4,
              "batch_size": 2, "k": 3, "qa_k": 3, "max_doc_len": 64, "max_query_len": 32, "lr": 3e-5},
    "gpu": {"questions": 2000, "distractors": 20000, "pretrain_steps": 2000, "refresh_every": 100,
            "finetune_steps": 1000, "batch_size": 16, "k": 8, "qa_k": 5, "max_doc_len": 128, "max_query_len": 64,
            "lr": 3e-5},
}
WINDOW = 600  # characters of a passage
UNNORMALISED = "encoder, unnormalised inner product (normalize=false, the runs before 2026-12-07's fix)"


def passage_around(text: str, sentence: str, rng: random.Random) -> str | None:
    """About WINDOW characters of ``text`` holding ``sentence`` (whitespace-normalised), at a random offset."""
    flat = " ".join(text.split())
    at = flat.find(sentence)
    if at < 0:
        return None
    lo = max(0, min(at, at + len(sentence) - WINDOW) + rng.randint(0, max(0, WINDOW - len(sentence))) // 2)
    lo = max(0, min(lo, at))
    return flat[lo : max(lo + WINDOW, at + len(sentence))]


def prepare(work: Path, p: dict, log: list[str]) -> tuple[Path, Path, Path]:
    """qa-train.jsonl, qa-test.jsonl and passages.jsonl (the store)."""
    data = REPO / "data" / "full"
    run([*RETROLM, "corpus", "fetch", "linux-docs-6.1", "--out", data], log)
    qa_all = work / "qa-all.jsonl"
    run([*RETROLM, "corpus", "qa", "kernel-cloze", "--corpus", data / "linux-docs-6.1.jsonl", "--out", qa_all,
         "-n", p["questions"], "--test-fraction", 0.5, "--seed", 0], log, done=qa_all)
    train, test, store = work / "qa-train.jsonl", work / "qa-test.jsonl", work / "passages.jsonl"
    if store.exists():
        return train, test, store
    records = (json.loads(x) for x in (data / "linux-docs-6.1.jsonl").read_text().splitlines())
    docs = {d["id"]: d["text"] for d in records}
    rng = random.Random(0)
    rows, qa = [], {"train": [], "test": []}
    for line in qa_all.read_text().splitlines():
        q = json.loads(line)
        prov = q["provenance"]
        text = passage_around(docs[prov["doc_id"]], " ".join(prov["sentence"].split()), rng)
        if text is None:
            continue
        rows.append({"id": f"q/{q['id']}", "text": text})
        # fine-tuning vs test questions: by document, so no test passage's document was seen in fine-tuning
        split = "test" if int(hashlib.sha256(prov["doc_id"].encode()).hexdigest()[:8], 16) % 3 == 0 else "train"
        qa[split].append({"id": q["id"], "question": q["question"], "answers": q["answers"],
                          "passage": f"q/{q['id']}"})
    used = {json.loads(x)["provenance"]["doc_id"] for x in qa_all.read_text().splitlines()}
    others = sorted(d for d in docs if d not in used and len(docs[d]) > 2 * WINDOW)
    for d in rng.sample(others, min(p["distractors"], len(others))):
        flat = " ".join(docs[d].split())
        lo = rng.randint(0, len(flat) - WINDOW)
        rows.append({"id": f"x/{d}", "text": flat[lo : lo + WINDOW]})
    rng.shuffle(rows)
    for split, path in (("train", train), ("test", test)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in qa[split]), encoding="utf-8")
    store.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return train, test, store


def main() -> None:
    args, p, work, res, step = evidence_start(__doc__, PROFILES, "evidence-realm", "realm")
    log = step.log

    train, test, store = prepare(work, p, log)
    db = work / "db"
    step("db build", [*RETROLM, "db", "build", store, "--out", db, "--tokenizer", "train:4000", "--index", "none",
                      "--bm25", "-q"], db / "meta.json")
    # pre-training masks sentences of every stored chunk: over the store without the test questions' passages, so
    # that no test sentence is pre-trained on with its answer as the masked span (24 of 155 were, before 2026-12-07)
    held = {json.loads(x)["passage"] for x in test.read_text().splitlines()}
    pre_store, pre_db = work / "passages-pretrain.jsonl", work / "db-pretrain"
    pre_rows = [x for x in store.read_text().splitlines() if json.loads(x)["id"] not in held]
    if not pre_store.exists() or pre_store.read_text().splitlines() != pre_rows:
        pre_store.write_text("".join(x + "\n" for x in pre_rows), encoding="utf-8")
    step("db build pretrain", [*RETROLM, "db", "build", pre_store, "--out", pre_db, "--tokenizer", "train:4000",
                               "--index", "none", "--bm25", "-q"], pre_db / "meta.json")
    shape = ["encoder=minilm", "embed_dim=null", "pooling=mean", "normalize=true", f"max_doc_len={p['max_doc_len']}",
             f"max_query_len={p['max_query_len']}", f"batch_size={p['batch_size']}", f"qa_k={p['qa_k']}",
             f"lr={p['lr']}"]
    pre = {  # name → pre-training overrides
        "realm": ["masking=salient", f"refresh_every={p['refresh_every']}"],
        "random-masking": ["masking=random", f"refresh_every={p['refresh_every']}"],
        "stale-index": ["masking=salient", "refresh_every=0"],
    }
    for name, extra in pre.items():
        out = work / f"pretrain-{name}"
        step(f"pretrain {name}", [*RETROLM, "realm", "pretrain", "--db", pre_db, "--out", out, *shape, *extra,
                                  f"k={p['k']}", f"steps={p['pretrain_steps']}", f"save_every={p['pretrain_steps']}",
                                  "log_every=10"], out / "pretrain.json")
    # fine-tuning: from each pre-trained model, and from the encoder itself with the retriever fixed
    starts = {"frozen-retrieval": ("minilm", ["train_query_encoder=false"])}
    starts.update({name: (work / f"pretrain-{name}", []) for name in pre})
    for name, (ckpt, extra) in starts.items():
        out = work / f"finetune-{name}"
        step(f"finetune {name}", [*RETROLM, "realm", "finetune", "--checkpoint", ckpt, "--db", db, "--data", train,
                                  "--out", out, *shape, *extra, f"steps={p['finetune_steps']}", "log_every=10"],
             out / "final" / "model.json")
    # evaluation: retrieval before pre-training (the encoder itself), after pre-training, and after fine-tuning
    evals = {"encoder (no pre-training, no fine-tuning)": "minilm", UNNORMALISED: "minilm"}
    evals.update({f"pretrained: {name}": work / f"pretrain-{name}" for name in pre})
    evals.update({f"fine-tuned: {name}": work / f"finetune-{name}" for name in starts})
    for label, ckpt in evals.items():
        out = res / slug(label)
        how = ["normalize=false" if label == UNNORMALISED and x == "normalize=true" else x for x in shape]
        step(f"eval {label}", [*RETROLM, "realm", "eval", "--checkpoint", ckpt, "--db", db, "--data", test, "--out",
                               out, *how], out / "realm.json")
    for name in pre:  # the pre-training logs next to the results
        (res / f"pretrain-{name}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / f"pretrain-{name}" / "pretrain.json", res / f"pretrain-{name}" / "pretrain.json")
    no_retrieval = reader_without_retrieval(work / "finetune-realm", test, p)
    write_page(res, work, db, test, evals, no_retrieval, log, step.seconds, args, p)


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def reader_without_retrieval(ckpt: Path, test: Path, p: dict) -> dict:
    """EM / F1 of the fine-tuned full-REALM reader when it may read only the null (empty) document."""
    import torch

    from retrolm.eval.qa import load_qa, mean_scores, score_prediction
    from retrolm.models.realm import RealmModel
    from retrolm.train.realm import RealmConfig, predict
    from retrolm.train.realm_index import DocumentIndex, TextDocuments

    model = RealmModel.from_pretrained(ckpt / "final")
    items = load_qa(test)
    cfg = RealmConfig(qa_k=1, max_doc_len=p["max_doc_len"], max_query_len=p["max_query_len"])
    dim = model.null_embedding.shape[0]
    answers, _ = predict(model, DocumentIndex(torch.zeros(1, dim), 0), TextDocuments([""]),
                         [it.question for it in items], cfg)
    return mean_scores([score_prediction(a, it) for a, it in zip(answers, items, strict=True)])


def source_recall(result: dict, db: Path, test: Path) -> float:
    """% of test questions whose own passage (the one their sentence was cut from) is among the retrieved."""
    import numpy as np

    from retrolm.db import DatabaseView

    view = DatabaseView.open(db)
    passage = {json.loads(x)["id"]: json.loads(x)["passage"] for x in test.read_text().splitlines()}
    hits = 0
    for row in result["predictions"]:
        docs = {view.store.doc_ids[int(d)] for d in view.store.chunk_doc(np.asarray(row["retrieved"]))}
        hits += passage[row["id"]] in docs
    return 100 * hits / max(1, len(result["predictions"]))


def write_page(res: Path, work: Path, db: Path, test: Path, evals: dict, no_retrieval: dict, log: list[str],
               seconds: dict, args: argparse.Namespace, p: dict) -> None:
    from retrolm.eval.report import markdown_table

    rows = [["reader without retrieval (fine-tuned REALM reader, null document only)", "–", "–",
             f"{no_retrieval['em']:.1f}", f"{no_retrieval['f1']:.1f}"]]
    for label in evals:
        r = json.loads((res / slug(label) / "realm.json").read_text())
        rows.append([label, f"{source_recall(r, db, test):.1f}", f"{r['recall_at_k']:.1f}", f"{r['em']:.1f}",
                     f"{r['f1']:.1f}"])
    pre_rows = []
    for name in ("realm", "random-masking", "stale-index"):
        lg = json.loads((work / f"pretrain-{name}" / "pretrain.json").read_text())
        losses = [s["loss"] for s in lg["steps"] if s.get("loss") is not None]
        util = [s["utility"] for s in lg["steps"] if s.get("utility") is not None]  # (NaN is written as null)
        lags = [r["lag"] for r in lg.get("refreshes", [])]
        secs = [r.get("seconds") for r in lg.get("refreshes", []) if r.get("seconds") is not None]
        pre_rows.append([name, len(lg["steps"]), f"{sum(losses[:10]) / max(1, len(losses[:10])):.3f}",
                         f"{sum(losses[-10:]) / max(1, len(losses[-10:])):.3f}",
                         f"{sum(util[-10:]) / max(1, len(util[-10:])):.3f}", len(lags),
                         f"{sum(lags) / len(lags):.1f}" if lags else "–",
                         f"{sum(secs) / len(secs):.0f}" if secs else "–",
                         f"{seconds.get(f'pretrain {name}', 0) / 60:.1f}"])
    n_test = len(test.read_text().splitlines())
    n_train = len((work / "qa-train.jsonl").read_text().splitlines())
    n_store = len((work / "passages.jsonl").read_text().splitlines())
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    page = [
        f"# REALM at {args.profile} scale: open-domain cloze QA over the kernel 6.1 documentation",
        "",
        f"Produced by `scripts/evidence_realm.py --profile {args.profile}` on {platform.node()} ({machine}), "
        f"{time.strftime('%Y-%m-%d')}, {sum(seconds.values()) / 60:.0f} min of wall time in all. No GPU was lent: "
        "every number here is CPU-scale (a few hundred pre-training and fine-tuning examples), far from REALM's.",
        "",
        f"Store: {n_store} passages of ~{WINDOW} characters: one around each question's sentence, the rest cut from "
        f"other 6.1 documents. Questions: {n_train} for fine-tuning and {n_test} for test (split by document), "
        "`retrolm corpus qa kernel-cloze` (one word of a documentation sentence blanked). Encoders: "
        "all-MiniLM-L6-v2 for the query encoder, document encoder and reader; mean pooling, no projection, unit "
        "vectors scored by cosine × 20 (`normalize=true`), so the untrained retriever ranks exactly as the frozen "
        "sentence encoder (the *unnormalised* row scores by the inner product of the raw mean vectors, as every run "
        "did before 2026-12-07's fix: it favours passages with long vectors). "
        f"Pre-training: {p['pretrain_steps']} steps × {p['batch_size']} sentences, k = {p['k']} candidates (null "
        f"document included), index refreshed every {p['refresh_every']} steps by a background thread. Fine-tuning: "
        f"{p['finetune_steps']} steps × {p['batch_size']} questions, top {p['qa_k']} passages, document encoder and "
        "index fixed.",
        "",
        "## Exact match, F1 and retrieval on the test questions",
        "",
        "Source recall = the question's own passage is among the top "
        f"{p['qa_k']}; answer recall = the answer string occurs in one of them (REALM's recall@k: the reader's "
        "ceiling, higher because a blanked word can occur in other passages).",
        "",
        markdown_table(["system", f"source recall@{p['qa_k']}", f"answer recall@{p['qa_k']}", "EM", "F1"], rows),
        "",
        "## Pre-training",
        "",
        markdown_table(["run", "steps", "loss (first 10)", "loss (last 10)", "retrieval utility (last 10)",
                        "refreshes", "mean refresh lag (steps)", "refresh seconds", "minutes"], pre_rows),
        "",
        *commands_section(log, seconds),
    ]
    save_page(res, page)


if __name__ == "__main__":
    sys.exit(main())
