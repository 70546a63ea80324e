#!/usr/bin/env python3
"""Why do more neighbours read worse? (issue 11, the curve over k at evaluation). RETRO-small of
scripts/evidence_retro.py trained with k = 2 neighbours and the same model trained with k = 4, each evaluated with
k = 1, 2, 4, 8, 16 BM25 neighbours per bucket under both exclusion protocols, against retrieval off and against the
control (each chunk reads another document's neighbours); and what each neighbour rank holds of the chunk it helps
predict (the share of the next held-out chunk found verbatim in the rank-j neighbour).

    .venv/bin/python scripts/evidence_neighbours.py                  # CPU scale (shares runs/evidence-retro/cpu)
    .venv/bin/python scripts/evidence_neighbours.py --profile gpu

Shares the work folder of scripts/evidence_retro.py (data, database, baseline and the k = 2 run are trained once
for both). Every step is a `retrolm` command; finished steps are skipped on a re-run. Writes
docs/results/neighbours-<profile>/<run>-<protocol>/scale-neighbours.{json,md,png}, <run>-shuffled/eval.json and
docs/results/neighbours-<profile>/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from evidence_incontext import RETROLM, Steps, commands_section, evidence_start, rel, save_page
from evidence_retro import (
    BUCKETS,
    PROFILES,
    PROTOCOLS,
    copy_training_files,
    last_metrics,
    machine,
    shape_args,
    training_setup,
)

TRAIN_KS = (2, 4)  # neighbours per chunk in training; 2 is evidence_retro's run
EVAL_KS = (1, 2, 4, 8, 16)


def run_name(size: str, k: int) -> str:
    return f"retro-{size}" if k == 2 else f"retro-{size}-k{k}"


def main() -> None:
    args, p, work, res, step = evidence_start(__doc__, PROFILES, "evidence-retro", "neighbours")

    held, db, train_run = training_setup(work, p, step)
    size = p["retro"][0]
    lr = p["sizes"][size][3]
    base = train_run(f"baseline-{size}", shape_args(p, size), [f"lr={lr}"])
    runs: dict[str, tuple[Path, int]] = {}
    for k in TRAIN_KS:
        name = run_name(size, k)
        # its own neighbour folder: the cache is keyed by its settings, and k = 2's is shared with evidence_retro
        extra = [] if k == 2 else [f"num_neighbours={k}", f"neighbours_dir={work / f'neighbours-k{k}'}"]
        runs[name] = (train_run(name, shape_args(p, size, retro=True), [f"lr={lr}", *extra]), k)

    common = ["--db", db, "--data", held, "--baseline", base, "-q", "retriever=bm25", "near_dup_measure=containment",
              "group_by=bucket"]
    for name, (run, _) in runs.items():
        for protocol, near in PROTOCOLS.items():
            out = res / f"{name}-{protocol}"
            step(f"scale {name} neighbours {protocol}",
                 [*RETROLM, "scale", "neighbours", "--checkpoint", run, *common, f"near_dup_threshold={near}",
                  "--ks", ",".join(map(str, EVAL_KS)), "--out", out], out / "scale-neighbours.json")
        # the control at the trained k: what the layers give with text unrelated to the chunk
        out = res / f"{name}-shuffled"
        step(f"eval {name} shuffled", [*RETROLM, "eval", "--checkpoint", run, *common, "near_dup_threshold=0",
                                       "shuffle_neighbours=true", "--out", out], out / "eval.json")
    copy_training_files(res, {name: run for name, (run, _) in runs.items()})
    write_page(res, work, runs, step, args, p)


def change(on: float, off: float) -> str:
    return f"{on / off - 1:+.1%}"


def write_page(res: Path, work: Path, runs: dict[str, tuple[Path, int]], step: Steps, args: argparse.Namespace,
               p: dict) -> None:
    from retrolm.eval.report import markdown_table, plot_lines

    rows, ranks, curves = [], {}, {}
    for name, (_, k_train) in runs.items():
        for protocol in PROTOCOLS:
            r = json.loads((res / f"{name}-{protocol}" / "scale-neighbours.json").read_text())
            off = r["references"]["retro_no_retrieval"]["bpb"]
            off_g = r["reference_groups"]["retro_no_retrieval"]
            for x in r["rows"]:
                mark = " (as trained)" if x["k"] == k_train else ""
                rows.append([name, k_train, protocol, f"{x['k']}{mark}", f"{x['bpb']:.4f}", change(x["bpb"], off),
                             *(change(x["groups"][b], off_g[b]) if b in x["groups"] else "–" for b in BUCKETS)])
            rows.append([name, k_train, protocol, "off", f"{off:.4f}", "–", *["–"] * len(BUCKETS)])
            curves[f"{name}, {protocol}"] = [x["bpb"] / off - 1 for x in r["rows"]]
            ranks[protocol] = r.get("ranks", [])  # same database, retriever and exclusions for every run
        s = json.loads((res / f"{name}-shuffled" / "eval.json").read_text())
        off, on = s["summary"]["retro_no_retrieval"]["bpb"], s["summary"]["retro"]["bpb"]
        rows.append([name, k_train, "control: another document's neighbours", str(k_train), f"{on:.4f}",
                     change(on, off), *(change(s["groups"][b]["summary"]["retro"]["bpb"],
                                               s["groups"][b]["summary"]["retro_no_retrieval"]["bpb"])
                                        if b in s["groups"] else "–" for b in BUCKETS)])
    plot_lines(res / "neighbours.png", list(EVAL_KS), curves, xlabel="neighbours k at evaluation",
               ylabel="change of bits per byte vs retrieval off", log2x=True,
               title="RETRO-small trained with k = 2 or 4", hlines={"retrieval off": 0.0})
    rank_rows = [[protocol, x["rank"], f"{x['mean_overlap']:.1%}", f"{x['holds']:.1%}", f"{x['best']:.1%}",
                  f"{x['holds_within']:.1%}"] for protocol, rs in ranks.items() for x in rs]
    train = []
    for name, (run, k_train) in runs.items():
        m = last_metrics(run)
        nb = (f", training neighbours {m['setup/neighbour_seconds'] / 60:.0f} min"
              if "setup/neighbour_seconds" in m else "")
        train.append(f"- {name} (k = {k_train}): trainer's validation {m.get('val/bpb', float('nan')):.4f} bits/byte "
                     f"with retrieval, {m.get('train/tokens_per_s', 0):.0f} tokens/s, "
                     f"{step.seconds_of(name) / 60:.0f} min in all{nb}.")
    size = p["retro"][0]
    d, n_layer, *_ = p["sizes"][size]
    page = [
        f"# Neighbours at evaluation: why more read worse ({args.profile} profile)",
        "",
        f"Produced by `scripts/evidence_neighbours.py --profile {args.profile}` on {platform.node()} ({machine()}), "
        f"{time.strftime('%Y-%m-%d')}. Data, database (BM25), held-out set and RETRO-{size} (d = {d}, {n_layer} "
        f"layers, CCA in the middle and last layers, {p['train']['steps']} steps × {p['train']['batch_size']} × "
        f"{p['train']['model.seq_len']} tokens) are those in the work folder of `scripts/evidence_retro.py --profile "
        f"{args.profile}` (`{rel(work)}`); the second run differs "
        "only in reading k = 4 neighbours of each training chunk instead of 2 (own document excluded). Wall times are "
        "those of whatever shared the machine's cores at the time. Change = relative change of held-out bits per byte "
        "against the same model with retrieval off; "
        "negative = better. Protocols: previous = only the held-out document itself is excluded from retrieval; "
        "strict = also every document holding ≥ 80% of its 13-grams (the old version of an identical file).",
        "",
        *train,
        "",
        "## Bits per byte by neighbours read",
        "",
        markdown_table(["run", "trained k", "protocol", "k at evaluation", "bits/byte", "change", *BUCKETS], rows),
        "",
        "![change by k](neighbours.png)",
        "",
        "## What each neighbour rank holds of the chunk it helps predict",
        "",
        "RETRO reads the neighbours of chunk u while it predicts chunk u+1. For every held-out chunk that has a "
        "successor, the share of that successor found verbatim in the rank-j BM25 neighbour (chunk + continuation), "
        "as the longest common token run over the successor's length: the text a reader could copy from that rank. "
        "'holds' = at least half of it; 'first best' = rank j holds the most (and at least half); the last column "
        "= some neighbour of rank ≤ j holds half.",
        "",
        markdown_table(["protocol", "rank", "mean overlap", "holds ≥ 50%", "first best", "some rank ≤ j holds"],
                       rank_rows),
        "",
        *commands_section(step.log, step.seconds),
    ]
    save_page(res, page)


if __name__ == "__main__":
    sys.exit(main())
