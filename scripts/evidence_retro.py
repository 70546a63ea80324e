#!/usr/bin/env python3
"""Evidence v2 for RETRO (issue 11): baselines at three sizes, RETRO from scratch and RETRO-fitting (frozen and
unfrozen, ≤ 5% of the baseline's tokens) trained on two versions of the Linux kernel documentation (6.1 and the
non-held-out part of 6.12) plus Wikipedia, evaluated on held-out 6.12 documents labelled identical / changed / new
against 6.1 and on held-out Wikipedia summaries, under both exclusion protocols; then curves over neighbours at
evaluation and database size (with an equal amount of unrelated text added).

    .venv/bin/python scripts/evidence_retro.py                   # CPU scale: tiny models, a quarter of the docs
    .venv/bin/python scripts/evidence_retro.py --profile gpu     # one GPU slice per training run

Every step is a `retrolm` command (printed and listed in the results page); finished steps are skipped on a re-run.
Writes docs/results/retro-<profile>/<run>/{eval.json,report.md,leakage.png,config.yaml,...} and
docs/results/retro-<profile>/README.md (tables, settings, commands, wall time of each step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from evidence_incontext import RETROLM, Steps, commands_section, evidence_start, run, save_page

from retrolm.eval.report import change as pct  # the other evidence scripts import it from here

REPO = Path(__file__).resolve().parents[1]

# (d_model, n_layer, n_head, peak lr): the lr shrinks with width, as it must for the bigger model to be better at
# equal tokens.
PROFILES = {
    "cpu": {
        "fraction": 0.25, "wiki_docs": 2000, "vocab": 8192, "noise_docs": 497,
        "sizes": {"small": (128, 4, 4, 3e-3), "medium": (192, 5, 6, 2e-3), "large": (256, 6, 8, 1.5e-3)},
        "retro": ["small"],  # RETRO-medium would add ~35 min on 2 cores
        "train": {"model.seq_len": 256, "steps": 500, "batch_size": 16, "min_lr": 1e-4, "warmup_steps": 40,
                  "eval_every": 250, "save_every": 250, "eval_batches": 4, "log_every": 50},
        "fit_lr": 3e-3, "fit_lr_unfrozen": 1e-3,
    },
    # minutes on a CPU, to check the pipeline end to end (numbers are meaningless)
    "smoke": {
        "fraction": 0.03, "wiki_docs": 100, "vocab": 2000, "noise_docs": 20,
        "sizes": {"small": (64, 2, 2, 3e-3), "medium": (96, 2, 2, 2e-3), "large": (128, 2, 2, 1.5e-3)},
        "retro": ["small"],
        "train": {"model.seq_len": 256, "steps": 20, "batch_size": 4, "warmup_steps": 2, "eval_every": 20,
                  "save_every": 20, "eval_batches": 1, "log_every": 10},
        "fit_lr": 3e-3, "fit_lr_unfrozen": 1e-3,
    },
    # One GPU: every document, models up to ~110M parameters, 2048-token sequences.
    "gpu": {
        "fraction": 1.0, "wiki_docs": 10000, "vocab": 32000, "noise_docs": 497,
        "sizes": {"small": (384, 6, 6, 1e-3), "medium": (576, 8, 8, 8e-4), "large": (768, 12, 12, 6e-4)},
        "retro": ["small", "medium", "large"],
        "train": {"model.seq_len": 2048, "steps": 480, "batch_size": 16, "min_lr": 1e-4, "warmup_steps": 40,
                  "eval_every": 240, "save_every": 480, "eval_batches": 8, "log_every": 40, "bf16": True},
        "fit_lr": 1e-3, "fit_lr_unfrozen": 3e-4,
    },
}
PROTOCOLS = {"previous": 0.0, "strict": 0.8}  # near-duplicate threshold (containment of 13-grams): 0 = off
HELD_WIKI = 12


def path_of(doc_id: str) -> str:
    """The path of a kernel document without its version prefix (6.1/… and 6.12/… name the same file)."""
    return doc_id.split("/", 1)[1] if "/" in doc_id else doc_id


def keep(path: str, fraction: float) -> bool:
    """A stable, seeded choice of paths (both versions of a file are kept or dropped together)."""
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) < fraction * 2**32


def prepare(work: Path, p: dict, log: list[str]) -> tuple[Path, Path]:
    """train.jsonl (kernel 6.1 + the rest of 6.12 for a fraction of the paths, + Wikipedia) and heldout.jsonl (the
    labelled 6.12 sample + Wikipedia summaries that are not in train.jsonl)."""
    train, held = work / "train.jsonl", work / "heldout.jsonl"
    if held.exists():  # prepared already (or carried to a machine that cannot fetch)
        return train, held
    data = REPO / "data" / "full"
    run([*RETROLM, "corpus", "fetch", "linux-docs-6.1", "linux-docs-6.12", "wiki", "python-docs", "--out", data], log)
    kernel = work / "kernel"
    run([*RETROLM, "corpus", "versions", "--old", data / "linux-docs-6.1.jsonl", "--new",
         data / "linux-docs-6.12.jsonl", "--out", kernel, "--per-bucket", 12, "--max-chars", 4000, "--seed", 0], log,
        done=kernel / "heldout.jsonl")
    labels = json.loads((kernel / "labels.json").read_text())["labels"]
    held_kernel = [json.loads(x) for x in (kernel / "heldout.jsonl").read_text().splitlines()]
    # the held-out documents' closest 6.1 files stay in the subset: without them "identical" would have nothing to find
    held_ids = {d["id"] for d in held_kernel}
    must = {path_of(x["best_match"]) for x in labels if x["id"] in held_ids and x.get("best_match")}
    rows = []
    for name in ("linux-docs-6.1.jsonl",):
        rows += [json.loads(x) for x in (data / name).read_text().splitlines()]
    rows += [json.loads(x) for x in (kernel / "rest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if keep(path_of(r["id"]), p["fraction"]) or path_of(r["id"]) in must]
    wiki = [json.loads(x) for x in (data / "wiki.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(wiki)
    # summaries are short (median ~460 characters; only 10 of 10,033 reach 1,500): ≥ 600 leaves 2–4 chunks each
    held_wiki = [w for w in wiki[: 20 * HELD_WIKI] if len(w["text"]) >= 600][:HELD_WIKI]
    if len(held_wiki) < HELD_WIKI:
        raise SystemExit(f"only {len(held_wiki)} Wikipedia summaries long enough to hold out")
    taken = {w["id"] for w in held_wiki}
    rows += [{"id": f"wiki/{w['id']}", "text": w["text"]} for w in wiki[20 * HELD_WIKI:][: p["wiki_docs"]]
             if w["id"] not in taken]
    random.Random(1).shuffle(rows)
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = [json.dumps(d, ensure_ascii=False) for d in held_kernel]
    out += [json.dumps({"id": f"wiki/{w['id']}", "text": w["text"][:4000], "bucket": "wikipedia"}, ensure_ascii=False)
            for w in held_wiki]
    held.write_text("\n".join(out) + "\n", encoding="utf-8")
    noise = work / "noise.jsonl"  # unrelated text for the "store grows with noise" point
    lines = (data / "python-docs.jsonl").read_text(encoding="utf-8").splitlines()[: p["noise_docs"]]
    noise.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return train, held


def shape_args(p: dict, size: str, retro: bool = False) -> list[str]:
    """``model.*`` overrides of one size: the baseline decoder (no CCA), or with ``retro`` CCA in the middle and last
    layers."""
    d, n_layer, n_head, _ = p["sizes"][size]
    cca = [max(1, n_layer // 2), n_layer] if retro else []
    return [f"model.d_model={d}", f"model.n_layer={n_layer}", f"model.n_head={n_head}", f"model.retro_layers={cca}"]


def retrofit_args(base: Path, n_steps: int) -> list[str]:
    """RETRO-fitting ``base``: a short warm-up and one checkpoint at the end."""
    return [f"init_from={base}", f"warmup_steps={max(1, min(40, n_steps // 5))}", "eval_every=1000000",
            f"save_every={n_steps}"]


def last_checkpoint(run: Path, n_steps: int) -> Path:
    """The weights a finished run of ``n_steps`` leaves: a run's step is skipped when they exist."""
    return run / "checkpoints" / f"step-{n_steps:06d}" / "model.safetensors"


def training_setup(work: Path, p: dict, step: Steps, encoder: str | None = None
                   ) -> tuple[Path, Path, Callable[..., Path]]:
    """Data, database and a ``train_run(name, model_args, extra, n_steps)`` that trains one run in ``work/name``
    (skipped when its last checkpoint exists) with the profile's shared settings, and returns its folder. Every run
    reads the same neighbours of the same chunks: searched once, in one shared folder. Without ``encoder`` they are
    BM25's; with it the database holds that encoder's keys instead (flat index) and training reads dense neighbours."""
    train, held = prepare(work, p, step.log)
    db = work / "db"
    keys = ["--encoder", encoder, "--index", "flat"] if encoder else ["--index", "none", "--bm25"]
    step("db build", [*RETROLM, "db", "build", train, "--out", db, "--tokenizer", f"train:{p['vocab']}", *keys, "-q"],
         db / "meta.json")
    common = [f"{k}={v}" for k, v in p["train"].items()]
    common += [f"db={db}", "num_neighbours=2", f"retriever={'dense' if encoder else 'bm25'}", "tensorboard=false",
               f"neighbours_dir={work / 'neighbours'}"]

    def train_run(name: str, model: list[str], extra: list[str], n_steps: int = p["train"]["steps"]) -> Path:
        out = work / name
        step(name, [*RETROLM, "train", "-q", *common, *model, *extra, f"steps={n_steps}", f"out_dir={out}"],
             last_checkpoint(out, n_steps))
        return out

    return held, db, train_run


def main() -> None:
    args, p, work, res, step = evidence_start(__doc__, PROFILES, "evidence-retro", "retro")
    log = step.log

    held, db, train_run = training_setup(work, p, step)
    runs: dict[str, Path] = {}
    for size, (_, _, _, lr) in p["sizes"].items():
        runs[f"baseline-{size}"] = train_run(f"baseline-{size}", shape_args(p, size),
                                             [f"lr={lr}"])
        if size in p["retro"]:
            runs[f"retro-{size}"] = train_run(f"retro-{size}", [*shape_args(p, size, retro=True)], [f"lr={lr}"])
    # RETRO-fitting the middle baseline with 5% of its steps (same batch, so 5% of its tokens)
    fit_steps = max(1, p["train"]["steps"] // 20)
    fit = shape_args(p, "medium", retro=True)
    fit_common = retrofit_args(runs["baseline-medium"], fit_steps)
    runs["retrofit-frozen"] = train_run("retrofit-frozen", fit, [*fit_common, "freeze_init=true",
                                                                 f"lr={p['fit_lr']}"], fit_steps)
    runs["retrofit-unfrozen"] = train_run("retrofit-unfrozen", fit, [*fit_common, f"lr={p['fit_lr_unfrozen']}"],
                                          fit_steps)

    # Evaluation: every reader of neighbours under both protocols, per bucket, against all three baselines.
    baselines = [a for size in p["sizes"] for a in ("--baseline", runs[f"baseline-{size}"])]
    readers = [f"retro-{s}" for s in p["retro"]] + ["retrofit-frozen", "retrofit-unfrozen"]
    ev_args = ["retriever=bm25", "near_dup_measure=containment", "group_by=bucket"]
    for reader in readers:
        for protocol, near in PROTOCOLS.items():
            out = res / f"{reader}-{protocol}"
            step(f"eval {reader} {protocol}", [*RETROLM, "eval", "--checkpoint", runs[reader], "--db", db, "--data",
                                               held, *baselines, "--out", out, "-q", *ev_args,
                                               f"near_dup_threshold={near}"], out / "eval.json")
    # In-context retrieval with the middle baseline (no RETRO layers): passages in its 256-token window
    for protocol, near in PROTOCOLS.items():
        out = res / f"incontext-baseline-medium-{protocol}"
        step(f"eval incontext baseline-medium {protocol}",
             [*RETROLM, "eval", "--checkpoint", runs["baseline-medium"], "--db", db, "--data", held, "--out", out,
              *baselines, "-q", *ev_args, f"near_dup_threshold={near}", "in_context=true", "stride=64",
              "query_tokens=32",
              f"context_tokens={int(p['train']['model.seq_len']) - 208}"], out / "eval.json")  # + passage ≤ ~140
    readers.append("incontext-baseline-medium")
    # Curves for the middle RETRO model (previous version allowed: the setting where the store matters).
    curve = f"retro-{p['retro'][-1]}"
    sc = ["--checkpoint", runs[curve], "--db", db, "--data", held, "--baseline", runs[f"baseline-{p['retro'][-1]}"],
          "-q", "retriever=bm25", "near_dup_threshold=0"]
    step("scale neighbours", [*RETROLM, "scale", "neighbours", *sc, "--ks", "1,2,4,8,16", "--out", res / "scale-k"],
         res / "scale-k" / "scale-neighbours.json")
    step("scale db-size", [*RETROLM, "scale", "db-size", *sc, "--fractions", "0.1,0.25,0.5,1", "--noise",
                           work / "noise.jsonl", "--out", res / "scale-db"], res / "scale-db" / "scale-db-size.json")
    copy_training_files(res, runs)
    write_page(res, work, runs, readers, log, step.seconds, args, p)


def copy_training_files(res: Path, runs: dict[str, Path]) -> None:
    """Each run's training curve and settings next to the results: ``res/train/<run>/{metrics.jsonl,config.yaml}``."""
    for name, path in runs.items():
        (res / "train" / name).mkdir(parents=True, exist_ok=True)
        for f in ("metrics.jsonl", "config.yaml"):
            if (path / f).is_file():
                shutil.copyfile(path / f, res / "train" / name / f)


def last_metrics(path: Path) -> dict:
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    out: dict = {}
    for r in rows:
        out.update(r)
    return out


BUCKETS = ("identical", "changed", "new", "wikipedia")


def reader_keys(summary: dict) -> tuple[str, str]:
    """The (retrieval on, retrieval off) keys of an ``eval.json`` summary: an in-context reader's, or RETRO's."""
    return ("in_context", "no_retrieval") if "in_context" in summary else ("retro", "retro_no_retrieval")


def change_cells(r: dict) -> tuple[list[str], list[str]]:
    """An evaluation (``eval.json``, RETRO or in-context) as table cells: [retrieval off, retrieval on, change with its
    95% interval] and [change per bucket of ``BUCKETS``..., change on novel chunks]."""
    s, (lo, hi) = r["summary"], r["gain_ci95"]["all"]
    on, off = reader_keys(s)
    groups = r.get("groups", {})
    head = [f"{s[off]['bpb']:.4f}", f"{s[on]['bpb']:.4f}", f"{pct(r['gain']['all'])} [{pct(hi)}, {pct(lo)}]"]
    return head, [*(pct(groups[b]["gain"]) if b in groups else "–" for b in BUCKETS), pct(r["gain"]["novel"])]


def corpus_packages(data: Path = REPO / "data" / "full") -> str:
    """The package versions the fetched corpora came from (their ``*.source.json``), for a results page: Debian
    serves newer point releases over time, and ``retrolm corpus fetch --pin`` gets these back."""
    found = [json.loads(f.read_text()).get("package") for f in sorted(data.glob("*.source.json"))]
    return ", ".join(f"`{p}`" for p in found if p) or "not recorded"


def machine() -> str:
    """The GPU (if any), architecture, CPU count and the libraries that decide neighbours and tokens, for a results
    page's first line (a BM25 scorer's release changed a rerun's neighbours once: docs/results.md)."""
    import torch

    from retrolm.core.versions import library_versions

    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    libs = ", ".join(f"{k} {v}" for k, v in library_versions().items() if k != "retrolm")
    return f"{gpu}{platform.machine()}, {os.cpu_count()} CPUs; {libs}"


def write_page(res: Path, work: Path, runs: dict[str, Path], readers: list[str], log: list[str],
               seconds: dict[str, float], args: argparse.Namespace, p: dict) -> None:
    """README.md of the results folder: what was trained, bits per byte per bucket and protocol, curves, costs."""
    from retrolm.eval.report import markdown_table

    first = json.loads((res / f"{readers[0]}-previous" / "eval.json").read_text())
    models = {k: v for r in readers for k, v in
              json.loads((res / f"{r}-previous" / "eval.json").read_text())["models"].items()
              if "non_embedding_params" in v}
    train_rows = []
    for name, path in runs.items():
        m = last_metrics(path)
        info = next((v for k, v in models.items() if k == name), None)
        train_rows.append([name, f"{info['params'] / 1e6:.2f}M" if info else "–",
                           f"{info['non_embedding_params'] / 1e6:.2f}M" if info else "–",
                           m.get("step"), f"{m.get('train/loss', float('nan')):.3f}",
                           f"{m.get('val/bpb', float('nan')):.4f}", f"{m.get('train/tokens_per_s', 0):.0f}",
                           f"{seconds.get(name, 0) / 60:.1f}"])
    overall, per_bucket = [], []
    base_names = [k.split(":", 1)[1] for k in first["summary"] if k.startswith("baseline:")]

    def base_cells(summary: dict) -> list[str]:
        # "baseline-medium#2": the in-context run scores baseline-medium both as its reader and as a baseline
        got = {k.split(":", 1)[1].split("#")[0]: v["bpb"] for k, v in summary.items() if k.startswith("baseline:")}
        return [f"{got[n]:.4f}" if n in got else "–" for n in base_names]

    for reader in readers:
        for protocol in PROTOCOLS:
            r = json.loads((res / f"{reader}-{protocol}" / "eval.json").read_text())
            s = r["summary"]
            on, off = reader_keys(s)
            lo, hi = r["gain_ci95"]["all"]
            overall.append([reader, protocol, f"{s[off]['bpb']:.4f}", f"{s[on]['bpb']:.4f}",
                            f"{pct(r['gain']['all'])} [{pct(hi)}, {pct(lo)}]", pct(r["gain"]["novel"]),
                            f"{r['novel']['fraction']:.0%}", *base_cells(s)])
            for g, d in r.get("groups", {}).items():
                glo, ghi = d["gain_ci95"]
                per_bucket.append([reader, protocol, g, d["chunks"], f"{d['novel_fraction']:.0%}",
                                   f"{d['summary'][off]['bpb']:.4f}", f"{d['summary'][on]['bpb']:.4f}",
                                   f"{pct(d['gain'])} [{pct(ghi)}, {pct(glo)}]",
                                   *base_cells(d["summary"])])
    by_k = json.loads((res / "scale-k" / "scale-neighbours.json").read_text())
    by_db = json.loads((res / "scale-db" / "scale-db-size.json").read_text())
    total = sum(seconds.values())
    page = [
        f"# RETRO, RETRO-fitting and baselines on two versions of the kernel docs ({args.profile} profile)",
        "",
        f"Produced by `scripts/evidence_retro.py --profile {args.profile}` on {platform.node()} ({machine()}), "
        f"{time.strftime('%Y-%m-%d')}, {total / 60:.0f} min of wall time in all (each step below). Corpora: "
        f"{corpus_packages()}.",
        "",
        f"Training data: {p['fraction']:.0%} of the kernel documentation's paths (both versions of each kept path: "
        "6.1, and 6.12 except the held-out documents) plus the held-out documents' closest 6.1 files, plus "
        f"{p['wiki_docs']} Wikipedia summaries; the database is the same text (64-token chunks of a {p['vocab']}-token "
        "BPE trained on it, BM25 keys). Held-out: 12 documents per bucket of 6.12 labelled identical / changed / new "
        "against 6.1 by content (`retrolm corpus versions`; first ~4,000 characters), and 12 Wikipedia summaries. "
        "RETRO reads k = 2 BM25 neighbours (trained with its own document excluded). Protocols: *previous* = only the "
        "document itself excluded (its 6.1 version stays retrievable); *strict* = also every database document "
        "holding ≥ 80% of the held-out document's 13-grams. Change = relative change of bits per byte with retrieval "
        "vs the same model with retrieval off (negative = better), 95% bootstrap interval over documents.",
        "",
        "## Training (equal tokens; RETRO-fitting: 5% of them, starting from baseline-medium)",
        "",
        markdown_table(["run", "params", "non-embedding", "steps", "final train loss", "val bits/byte", "tokens/s",
                        "minutes"], train_rows),
        "",
        "## All held-out documents",
        "",
        markdown_table(["model", "protocol", "retrieval off", "retrieval on", "change [95% CI]", "change on novel",
                        "novel chunks", *base_names], overall),
        "",
        "## Per bucket",
        "",
        markdown_table(["model", "protocol", "bucket", "chunks", "novel", "retrieval off", "retrieval on",
                        "change [95% CI]", *base_names], per_bucket),
        "",
        f"## Neighbours at evaluation ({readers[len(p['retro']) - 1]}, trained with k = 2, previous version allowed)",
        "",
        "![neighbours](scale-k/scale-neighbours.png)",
        "",
        markdown_table(["k", "bits/byte"], [[r["k"], f"{r['bpb']:.4f}"] for r in by_k["rows"]]),
        "",
        "## Database size, and an equal amount of unrelated text (Python docs) added",
        "",
        "![database size](scale-db/scale-db-size.png)",
        "",
        markdown_table(["fraction", "retrievable chunks", "noise chunks added", "bits/byte"],
                       [[r["fraction"], r["db_chunks"], r.get("noise_chunks", 0), f"{r['bpb']:.4f}"]
                        for r in by_db["rows"]]),
        "",
        "References (retrieval off): " + "; ".join(f"{k} {v['bpb']:.4f}" for k, v in by_db["references"].items()),
        "",
        *commands_section(log, seconds),
    ]
    save_page(res, page)


if __name__ == "__main__":
    sys.exit(main())
