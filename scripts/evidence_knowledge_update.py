#!/usr/bin/env python3
"""Knowledge update without retraining (issue 11, item 6): SmolLM2-135M with in-context BM25 retrieval predicts
held-out Linux 6.12 documents while the database changes — {6.1 only, 6.1 + the rest of 6.12}, then the 6.1 versions
of the held-out documents are deleted with `retrolm db delete` — and the model itself never changes.

    .venv/bin/python scripts/evidence_knowledge_update.py [--work runs/evidence-knowledge] [--per-bucket 6]

Every step is a `retrolm` command (listed on the results page); finished steps are skipped on a re-run. Writes
docs/results/knowledge-update/<run>/{eval.json,report.md,config.yaml} and docs/knowledge-update.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from evidence_incontext import LM, REPO, RETROLM, commands_section, prepare_kernel, run, table

READ = ["retriever=bm25", "stride=64", "query_tokens=32", "context_tokens=256", "near_dup_threshold=0",
        "group_by=bucket"]
STEPS = [  # (run name, database, what the database holds)
    ("db-6.1", "db-6.1", "6.1 only"),
    ("db-6.1+6.12-rest", "db-6.1+6.12-rest", "6.1 + every 6.12 document except the held-out ones"),
    ("after-delete", "db-6.1+6.12-rest-deleted", "the same, after `db delete` of the held-out documents' 6.1 "
     "versions"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "evidence-knowledge")
    ap.add_argument("--per-bucket", type=int, default=6)
    ap.add_argument("--max-chars", type=int, default=1600)
    args = ap.parse_args()
    work, log, seconds = args.work, [], {}
    data, kernel = prepare_kernel(work, args, log)
    build = ["--tokenizer", LM, "--index", "none", "--bm25", "-q"]
    seconds["build 6.1"] = run([*RETROLM, "db", "build", data / "linux-docs-6.1.jsonl", "--out", work / "db-6.1",
                                *build], log, done=work / "db-6.1" / "meta.json")
    rest = work / "db-6.1+6.12-rest"
    seconds["build 6.1+6.12 rest"] = run([*RETROLM, "db", "build", data / "linux-docs-6.1.jsonl",
                                          kernel / "rest.jsonl", "--out", rest, *build], log,
                                         done=rest / "meta.json")
    deleted = work / "db-6.1+6.12-rest-deleted"
    labels = json.loads((kernel / "labels.json").read_text())["labels"]
    held = {json.loads(x)["id"] for x in (kernel / "heldout.jsonl").read_text().splitlines()}
    old_versions = sorted({lab["best_match"] for lab in labels
                           if lab["id"] in held and lab["bucket"] in ("identical", "changed")})
    if not (deleted / "meta.json").exists():
        shutil.rmtree(deleted, ignore_errors=True)
        shutil.copytree(rest, deleted)
        log.append(f"cp -r {rest.relative_to(REPO)} {deleted.relative_to(REPO)}")
        ids = [a for d in old_versions for a in ("--doc-id", d)]
        run([*RETROLM, "db", "delete", deleted, *ids, "-q"], log)
    else:
        log.append(f"retrolm db delete {deleted.relative_to(REPO)} --doc-id ... ({len(old_versions)} ids, skipped)")
    out_root = REPO / "docs" / "results" / "knowledge-update"
    for name, db, _ in STEPS:
        out = out_root / name
        seconds[name] = run([*RETROLM, "eval", "--checkpoint", LM, "--db", work / db, "--data",
                             kernel / "heldout.jsonl", "--out", out, "-q", *READ], log, done=out / "eval.json")
    write_page(out_root, log, seconds, args, old_versions)


def write_page(out_root: Path, log: list[str], seconds: dict, args: argparse.Namespace, deleted: list[str]) -> None:
    results = {name: json.loads((out_root / name / "eval.json").read_text()) for name, _, _ in STEPS}
    first = results[STEPS[0][0]]
    buckets = list(first["groups"])
    header = ["bucket", "docs", "no database"] + [f"{what} ({name})" for name, _, what in STEPS]
    rows = []
    for g in [*buckets, "all"]:
        if g == "all":
            row = [g, first["exclusion"]["eval_docs"], f"{first['summary']['no_retrieval']['bpb']:.3f}"]
        else:
            row = [g, first["groups"][g]["docs"], f"{first['groups'][g]['summary']['no_retrieval']['bpb']:.3f}"]
        for name, _, _ in STEPS:
            r = results[name]
            if g == "all":
                bpb, gain, (lo, hi) = r["summary"]["in_context"]["bpb"], r["gain"]["all"], r["gain_ci95"]["all"]
            else:
                d = r["groups"][g]
                bpb, gain, (lo, hi) = d["summary"]["in_context"]["bpb"], d["gain"], d["gain_ci95"]
            row.append(f"{bpb:.3f} ({-gain:+.1%} [{-hi:+.1%}, {-lo:+.1%}])")
        rows.append(row)
    page = [
        "# Knowledge update by editing the database, not the model",
        "",
        f"Produced by `scripts/evidence_knowledge_update.py --per-bucket {args.per_bucket} --max-chars "
        f"{args.max_chars}` on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, shared "
        f"with other jobs), {time.strftime('%Y-%m-%d')}. CPU only (no GPU was lent for this work).",
        "",
        "The reader is SmolLM2-135M-Instruct (never trained here) with in-context BM25 retrieval: every 64 tokens the "
        "last 32 retrieve one passage (chunk + continuation) placed before the last 256 tokens. Held-out: a seeded "
        "sample of Linux 6.12 documents labelled by content against 6.1 (`retrolm corpus versions`), cut to ~1,600 "
        "characters. Only the held-out document itself is excluded from retrieval (no near-duplicate exclusion: "
        "what the database holds is the variable here). Cells: bits per byte with retrieval (relative change against "
        "the same model without retrieval, 95% bootstrap interval over documents).",
        "",
        table(header, rows),
        "",
        *([(out_root / "findings.md").read_text()] if (out_root / "findings.md").exists() else []),
        f"Deleted in the last step ({len(deleted)} documents): " + ", ".join(f"`{d}`" for d in deleted) + ".",
        "",
        *commands_section(log, seconds),
    ]
    (REPO / "docs" / "knowledge-update.md").write_text("\n".join(page))
    print("wrote docs/knowledge-update.md")


if __name__ == "__main__":
    main()
