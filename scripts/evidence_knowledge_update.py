#!/usr/bin/env python3
"""Knowledge update without retraining (issue 11, item 6): SmolLM2-135M with in-context BM25 retrieval predicts
held-out Linux 6.12 documents while the database changes — {6.1 only, 6.1 + the rest of 6.12}, then the 6.1 versions
of the held-out documents are deleted with `retrolm db delete` — and the model itself never changes. With
`--retrofit-steps N`, the same for SmolLM2 RETRO-fitted with `encoder=base` for N steps on Linux 6.1 (without the
held-out documents' old versions) and scored with every chunk reading (`context_chunks=3`).

    .venv/bin/python scripts/evidence_knowledge_update.py [--work runs/evidence-knowledge] [--per-bucket 6]
        [--retrofit-steps 40]

Every step is a `retrolm` command (listed on the results page); finished steps are skipped on a re-run. Writes
docs/results/knowledge-update/<run>/{eval.json,report.md,config.yaml} (``retrofit-<run>`` for the RETRO-fitted
reader) and docs/knowledge-update.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from evidence_incontext import (
    LM,
    REPO,
    RETROLM,
    Steps,
    commands_section,
    prepare_kernel,
    record_command,
    rel,
    run,
    shown_command,
    table,
)
from evidence_retro import reader_keys

from retrolm.eval.report import change

READ = ["retriever=bm25", "stride=64", "query_tokens=32", "context_tokens=256", "near_dup_threshold=0",
        "group_by=bucket"]
READ_RETROFIT = ["retriever=bm25", "context_chunks=3", "near_dup_threshold=0", "group_by=bucket"]
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
    ap.add_argument("--retrofit-steps", type=int, default=0, help="also RETRO-fit SmolLM2 (encoder=base) for this "
                    "many steps and read with it (0: the in-context reader only)")
    args = ap.parse_args()
    work = args.work
    step = Steps(work)
    log = step.log
    data, kernel = prepare_kernel(work, args, log)
    build = ["--tokenizer", LM, "--index", "none", "--bm25", "-q"]
    step("build 6.1", [*RETROLM, "db", "build", data / "linux-docs-6.1.jsonl", "--out", work / "db-6.1", *build],
         work / "db-6.1" / "meta.json")
    rest = work / "db-6.1+6.12-rest"
    step("build 6.1+6.12 rest", [*RETROLM, "db", "build", data / "linux-docs-6.1.jsonl", kernel / "rest.jsonl",
                                 "--out", rest, *build], rest / "meta.json")
    deleted = work / "db-6.1+6.12-rest-deleted"
    labels = json.loads((kernel / "labels.json").read_text())["labels"]
    held = {json.loads(x)["id"] for x in (kernel / "heldout.jsonl").read_text().splitlines()}
    old_versions = sorted({lab["best_match"] for lab in labels
                           if lab["id"] in held and lab["bucket"] in ("identical", "changed")})
    # done only when the delete finished for these ids (a killed or failed delete left the copy whole, and the next
    # run evaluated "after delete" on a database where nothing was deleted)
    marker, ids = deleted / ".deleted.json", [a for d in old_versions for a in ("--doc-id", d)]
    # both commands listed, run or not: the page's commands make every database its evaluations read
    log.append(f"cp -r {rel(rest)} {rel(deleted)}")
    delete = [*RETROLM, "db", "delete", deleted, *ids, "-q"]
    # done for these ids on a copy of this build of the rest database (rebuilt: rest.jsonl drawn again, whose copies
    # of held-out excerpts depend on --max-chars, with the same held-out documents)
    done = {"ids": old_versions, "rest_build": json.loads((rest / "meta.json").read_text()).get("build_id")}
    if not marker.is_file() or json.loads(marker.read_text()) != done:
        shutil.rmtree(deleted, ignore_errors=True)
        shutil.copytree(rest, deleted)
        run(delete, log)
        marker.write_text(json.dumps(done))
    else:
        log.append(shown_command(delete))
        print(f"[skip] {shown_command(delete)}", flush=True)
    out_root = REPO / "docs" / "results" / "knowledge-update"

    def evaluate(label: str, checkpoint: Path | str, db: str, name: str, read: list[str]) -> None:
        out = out_root / name
        step(label, [*RETROLM, "eval", "--checkpoint", checkpoint, "--db", work / db, "--data",
                     kernel / "heldout.jsonl", "--out", out, "-q", *read], out / "eval.json")

    for name, db, _ in STEPS:
        evaluate(name, LM, db, name, READ)
    if args.retrofit_steps > 0:
        fit, built = retrofit(work, data, old_versions, args.retrofit_steps, step)
        for name, db, _ in STEPS:
            evaluate(f"retrofit {name}", fit, db, f"retrofit-{name}", READ_RETROFIT)
        # The model as built (encoder=base reads before any training), with 6.1 in the store: what the steps add.
        evaluate("retrofit step 0 db-6.1", built, "db-6.1", "step0-retrofit-db-6.1", READ_RETROFIT)
    write_page(out_root, log, step.seconds, args, old_versions)


def retrofit(work: Path, data: Path, old_versions: list[str], steps: int, step: Steps) -> tuple[Path, Path]:
    """RETRO-fit SmolLM2 (``encoder=base``) on Linux 6.1 without the held-out documents' old versions (so that the
    new layers cannot have learned the held-out text from them) → the checkpoint's folder, and that of the model as
    built (``steps=0``: nothing trained, nothing searched)."""
    train = work / "retrofit-train.jsonl"
    skip = set(old_versions)
    docs = [x for x in (data / "linux-docs-6.1.jsonl").read_text().splitlines() if json.loads(x)["id"] not in skip]
    text = "\n".join(docs) + "\n"
    what = f"(retrofit-train.jsonl: linux-docs-6.1.jsonl without the {len(old_versions)} documents deleted below)"
    if not train.exists() or train.read_text() != text:
        # written again when the sample (so the documents left out) or the corpus changed; recorded as an output, so
        # that the database and the run made from the old file are made again
        tmp = train.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(train)
        record_command(train, [what])
    step.log.append(what)
    db = work / "db-6.1-train"
    step("build retrofit db", [*RETROLM, "db", "build", train, "--out", db, "--tokenizer", LM, "--index", "none",
                               "--bm25", "-q"], db / "meta.json")

    def fit(label: str, out: Path, n: int, *settings: str) -> Path:
        done = out / "checkpoints" / f"step-{n:06d}"
        step(label, [*RETROLM, "retrofit", "-q", "--config", REPO / "configs" / "retrofit-smollm2-base.yaml", "--base",
                     LM, "--db", db, "--out", out, f"steps={n}", *settings], done / "model.safetensors")
        return done

    trained = fit("retrofit", work / "retrofit-smollm2-base", steps, f"save_every={steps}", f"eval_every={steps}",
                  "tensorboard=false", f"neighbours_dir={work / 'neighbours'}")
    return trained, fit("retrofit step 0", work / "retrofit-smollm2-base-step0", 0, "tensorboard=false")


def as_built_line(out_root: Path) -> str:
    """One sentence: the model as built against the trained one, 6.1 only; empty if its run is missing."""
    f = out_root / "step0-retrofit-db-6.1" / "eval.json"
    if not f.exists() or not (out_root / "retrofit-db-6.1" / "eval.json").exists():
        return ""
    r, t = (json.loads(x.read_text()) for x in (f, out_root / "retrofit-db-6.1" / "eval.json"))
    lo, hi = r["gain_ci95"]["all"]
    buckets = ", ".join(f"{g} {change(r['groups'][g]['gain'])}" for g in r["groups"])
    return (f"The same model as built, before any training (`steps=0`; 6.1 only): {change(r['gain']['all'])} "
            f"[{change(hi)}, {change(lo)}] ({buckets}; novel chunks {change(r['gain']['novel'])}), against "
            f"{change(t['gain']['all'])} after the training steps.")


def reader_table(out_root: Path, prefix: str = "") -> str | None:
    """The table of one reader (run folders ``<prefix><step>``): per bucket, bits per byte without a database and with
    each one (relative change, 95% interval over documents); None if its runs are missing."""
    if not all((out_root / f"{prefix}{name}" / "eval.json").exists() for name, _, _ in STEPS):
        return None
    results = {name: json.loads((out_root / f"{prefix}{name}" / "eval.json").read_text()) for name, _, _ in STEPS}
    first = results[STEPS[0][0]]
    on, off = reader_keys(first["summary"])
    header = ["bucket", "docs", "no database"] + [f"{what} ({name})" for name, _, what in STEPS]
    rows = []
    for g in [*first["groups"], "all"]:
        part = first if g == "all" else first["groups"][g]
        row = [g, first["exclusion"]["eval_docs"] if g == "all" else part["docs"], f"{part['summary'][off]['bpb']:.3f}"]
        for name, _, _ in STEPS:
            r = results[name]
            if g == "all":
                bpb, gain, (lo, hi) = r["summary"][on]["bpb"], r["gain"]["all"], r["gain_ci95"]["all"]
            else:
                d = r["groups"][g]
                bpb, gain, (lo, hi) = d["summary"][on]["bpb"], d["gain"], d["gain_ci95"]
            row.append(f"{bpb:.3f} ({change(gain)} [{change(hi)}, {change(lo)}])")
        rows.append(row)
    return table(header, rows)


def by_doc_position(out_root: Path, runs: list[tuple[str, str]]) -> str | None:
    """Change of bits per byte by a chunk's position in its document (per-chunk files of each run: (label, run))."""
    rows, positions = [], ("0", "1", "2", "3+")
    for label, name in runs:
        f = out_root / name / "per_chunk.npz"
        if not f.exists():
            return None
        z = np.load(f)
        on, off = (f"nats:{key}" for key in reader_keys({k.removeprefix("nats:") for k in z.files}))
        doc = z["doc"]
        pos = np.zeros(len(doc), dtype=np.int64)
        for i in range(1, len(doc)):
            pos[i] = pos[i - 1] + 1 if doc[i] == doc[i - 1] else 0
        cells = []
        for sel in (pos == 0, pos == 1, pos == 2, pos >= 3):
            cells.append(f"{z[on][sel].sum() / z[off][sel].sum() - 1:+.1%} ({int(sel.sum())})")
        rows.append([label, *cells])
    return table(["reader (6.1 only)", *(f"chunk {p} of its document (chunks)" for p in positions)], rows)


def write_page(out_root: Path, log: list[str], seconds: dict, args: argparse.Namespace, deleted: list[str]) -> None:
    retrofit_table = reader_table(out_root, "retrofit-")
    retrofit_part = [] if retrofit_table is None else [
        "### The same with a RETRO-fitted reader",
        "",
        f"SmolLM2-135M RETRO-fitted with `encoder=base` (`configs/retrofit-smollm2-base.yaml`, {args.retrofit_steps} "
        "steps × 4 × 256 tokens on Linux 6.1 without the 12 deleted documents, BM25 neighbours, own document "
        "excluded; the base frozen, so without a database it is exactly SmolLM2). It reads the neighbours of each "
        "64-token chunk through its attention layers instead of in its context, and is scored with every chunk "
        "reading (`context_chunks=3`: 192 tokens before each scored chunk, whose neighbours were retrieved with the "
        "chunk before it). Same held-out documents and databases; the model was trained once, before the first "
        "column, and never again.",
        "",
        retrofit_table,
        "",
        as_built_line(out_root),
        "",
        "By position in the document (6.1 only; change of bits per byte against each reader's own retrieval-off "
        "reference, all documents pooled). A document's first chunk reads nothing in the in-context reader; in the "
        "RETRO-fitted one it reads the neighbours of the previous document's last chunk (its sequences run across "
        "documents, as RETRO's do).",
        "",
        by_doc_position(out_root, [("in-context", "db-6.1"), ("RETRO-fitted", "retrofit-db-6.1")]) or "",
        "",
    ]
    page = [
        "# Knowledge update by editing the database, not the model",
        "",
        f"Produced by `scripts/evidence_knowledge_update.py --per-bucket {args.per_bucket} --max-chars "
        f"{args.max_chars}{f' --retrofit-steps {args.retrofit_steps}' if args.retrofit_steps else ''}` on "
        f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs), "
        f"{time.strftime('%Y-%m-%d')}. CPU only (no GPU was lent for this work). Packages: {packages()}.",
        "",
        "The reader is SmolLM2-135M-Instruct (never trained here) with in-context BM25 retrieval: every 64 tokens the "
        "last 32 retrieve one passage (chunk + continuation) placed before the last 256 tokens. Held-out: a seeded "
        "sample of Linux 6.12 documents labelled by content against 6.1 (`retrolm corpus versions`), cut to ~1,600 "
        "characters. Only the held-out document itself is excluded from retrieval (no near-duplicate exclusion: "
        "what the database holds is the variable here). Cells: bits per byte with retrieval (relative change against "
        "the same model without retrieval, 95% bootstrap interval over documents).",
        "",
        reader_table(out_root) or "(in-context runs missing)",
        "",
        *retrofit_part,
        *([(out_root / "findings.md").read_text()] if (out_root / "findings.md").exists() else []),
        f"Deleted in the last step ({len(deleted)} documents): " + ", ".join(f"`{d}`" for d in deleted) + ".",
        "",
        *commands_section(log, seconds),
    ]
    (REPO / "docs" / "knowledge-update.md").write_text("\n".join(page))
    print("wrote docs/knowledge-update.md")


def packages() -> str:
    """The Debian packages the corpora came from (the held-out sample follows them)."""
    found = []
    for name in ("linux-docs-6.1", "linux-docs-6.12"):
        src = REPO / "data" / "full" / f"{name}.source.json"
        found.append(f"`{json.loads(src.read_text()).get('package', name)}`" if src.exists() else name)
    return ", ".join(found)


if __name__ == "__main__":
    main()
