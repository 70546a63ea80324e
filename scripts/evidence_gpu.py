#!/usr/bin/env python3
"""Evidence v2 in one GPU slice (issue 11): what ~6 minutes of one GPU can show, in order of importance.

A session is lent ~15 minutes of GPU time in all, so the full ``evidence_retro.py --profile gpu`` (three baselines,
three RETROs, four RETRO-fittings, curves) does not fit. This runs the gpu profile's data (every kernel document,
10,000 Wikipedia summaries, a 32k BPE, 2048-token sequences, 480 steps of 16 sequences) with the frozen encoder's
dense keys built on the GPU and training neighbours searched on the GPU, in this order, each step skipped when done:

1. baseline-medium; RETRO-small (about half its parameters) and its held-out evaluation against baseline-medium;
2. RETRO-fitting of baseline-medium, frozen, with 100% of its tokens (the CPU study found that a few dozen steps
   recover nothing: the CCA needs hundreds of updates) and its evaluation;
3. baseline-small and baseline-large (do the baselines improve with size at equal tokens?);
4. both readers under the strict protocol, and reading another document's neighbours (the shuffled control).

    python scripts/evidence_gpu.py --encoder ENCODER_DIR [--deadline UNIX_SECONDS]

Steps that would not finish before ``--deadline`` are left for a later slice (a re-run continues). Writes
docs/results/retro-gpu-slice/<run>/eval.json ... and docs/results/retro-gpu-slice/README.md with what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from evidence_incontext import RETROLM, Steps, commands_section, is_done, save_page
from evidence_retro import (
    BUCKETS,
    PROFILES,
    PROTOCOLS,
    REPO,
    change_cells,
    copy_training_files,
    last_checkpoint,
    last_metrics,
    machine,
    retrofit_args,
    shape_args,
    training_setup,
)

# rough wall seconds of each step on an H100/H200, to skip what cannot finish before the deadline
COST = {"train": 90, "eval": 45}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="frozen encoder (name or folder) for the dense keys")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="unix time by which to stop starting steps")
    ap.add_argument("--work", type=Path, default=None, help="default runs/evidence-retro/<profile>-slice")
    ap.add_argument("--results", type=Path, default=None, help="default docs/results/retro-<profile>-slice")
    args = ap.parse_args()
    p = PROFILES[args.profile]
    work = args.work or REPO / "runs" / "evidence-retro" / f"{args.profile}-slice"
    res = args.results or REPO / "docs" / "results" / f"retro-{args.profile}-slice"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    step = Steps(work)
    held, db, train_run = training_setup(work, p, step, encoder=args.encoder)

    def time_for(kind: str) -> bool:
        return time.time() + COST[kind] < args.deadline

    runs: dict[str, Path] = {}
    evals: list[tuple[str, str, Path]] = []

    def train(name: str, model: list[str], extra: list[str], n_steps: int | None = None) -> None:
        done = last_checkpoint(work / name, n_steps or int(p["train"]["steps"])).is_file()
        if done or time_for("train"):  # a finished run is always used (train_run skips it)
            runs[name] = train_run(name, model, extra, *([n_steps] if n_steps else []))

    def evaluate(reader: str, protocol: str) -> None:
        """protocol: previous | strict, or shuffled (the control: previous, each chunk reading another document's
        neighbours)."""
        out = res / f"{reader}-{protocol}"
        how = ["near_dup_threshold=0", "shuffle_neighbours=true"] if protocol == "shuffled" else \
            [f"near_dup_threshold={PROTOCOLS[protocol]}"]
        if reader not in runs:
            return
        bases = [a for b in ("baseline-small", "baseline-medium", "baseline-large") if b in runs
                 for a in ("--baseline", runs[b])]
        cmd = [*RETROLM, "eval", "--checkpoint", runs[reader], "--db", db, "--data", held, *bases, "--out", out, "-q",
               "retriever=dense", "group_by=bucket", "near_dup_measure=containment", *how]
        # an eval.json made before every baseline existed is redone (its command had fewer --baseline)
        if not (is_done(cmd, out / "eval.json") or time_for("eval")):
            return
        step(f"eval {reader} {protocol}", cmd, out / "eval.json")
        evals.append((reader, protocol, out))

    size_lr = {size: lr for size, (_, _, _, lr) in p["sizes"].items()}
    train("baseline-medium", shape_args(p, "medium"), [f"lr={size_lr['medium']}"])
    train("retro-small", shape_args(p, "small", retro=True), [f"lr={size_lr['small']}"])
    evaluate("retro-small", "previous")
    if "baseline-medium" in runs:
        n = int(p["train"]["steps"])
        train("retrofit-100pct", shape_args(p, "medium", retro=True),
              [*retrofit_args(runs["baseline-medium"], n), "freeze_init=true", f"lr={p['fit_lr']}"], n)
    evaluate("retrofit-100pct", "previous")
    for size in ("small", "large"):
        train(f"baseline-{size}", shape_args(p, size), [f"lr={size_lr[size]}"])
    for reader in ("retro-small", "retrofit-100pct"):
        evaluate(reader, "strict")
        evaluate(reader, "shuffled")
    copy_training_files(res, runs)
    args.vocab_note = f"{p['vocab']:,}-token BPE trained on it"
    args.encoder_note = Path(args.encoder).name
    args.data_note = data_note(p)
    t = p["train"]
    args.train_note = f"{t['steps']} steps × {t['batch_size']} × {t['model.seq_len']} tokens"
    write_page(res, db, runs, evals, step, args)


def data_note(p: dict) -> str:
    """What the profile's training text is (the page said the gpu profile's whatever the profile)."""
    kernel = ("every kernel document of 6.1 and 6.12" if p["fraction"] >= 1 else
              f"the 6.1 and 6.12 kernel documents of {p['fraction']:.0%} of the paths and the held-out documents' "
              "closest 6.1 files")
    return f"{kernel} (6.12's held-out documents removed) and {p['wiki_docs']:,} Wikipedia summaries"


def write_page(res: Path, db: Path, runs: dict[str, Path], evals: list[tuple[str, str, Path]], step: Steps,
               args: argparse.Namespace) -> None:
    from retrolm.eval.report import markdown_table

    train_rows = []
    for name, path in runs.items():
        m = last_metrics(path)
        nb = m.get("setup/neighbour_seconds")
        train_rows.append([name, m.get("step"), f"{m.get('train/loss', float('nan')):.3f}",
                           f"{m.get('val/bpb', float('nan')):.4f}", f"{m.get('train/tokens_per_s', 0):,.0f}",
                           f"{step.seconds.get(name, 0) / 60:.1f}", "–" if nb is None else f"{nb:.1f}"])
    rows = []
    for reader, protocol, out in evals:
        r = json.loads((out / "eval.json").read_text())
        base = "; ".join(f"{k.split(':', 1)[1]} {v['bpb']:.4f}" for k, v in r["summary"].items()
                         if k.startswith("baseline:"))
        head, tail = change_cells(r)
        rows.append([reader, protocol, *head, *tail, base or "–"])
    meta = json.loads((db / "meta.json").read_text())
    st = meta.get("build_stats", {})
    build = (f"; the build embedded them in {st['embed_s']:.1f} s ({meta['num_chunks'] / st['embed_s']:,.0f} chunks/s, "
             f"{st['encoder_tokens']['mean']:.0f} WordPieces per chunk on average)" if st.get("embed_s") else "")
    page = [
        f"# Evidence v2 in one GPU slice ({args.profile} profile data)",
        "",
        f"Produced by `scripts/evidence_gpu.py` on {platform.node()} ({machine()}), {time.strftime('%Y-%m-%d')}, "
        f"{sum(step.seconds.values()) / 60:.1f} min of steps. Runs that are missing did not fit the slice. Data "
        f"({args.profile} profile): {args.data_note}; database {meta['num_chunks']:,} chunks of 64 tokens "
        f"({args.vocab_note}) with "
        f"{args.encoder_note} keys (flat index){build}; training neighbours k = 2, dense, exact search (a matrix "
        "multiply on the GPU where there is one), own document excluded. Held-out: 12 documents per bucket "
        "(identical / changed / new against 6.1, Wikipedia). Change = relative change of held-out bits per byte "
        "with retrieval against the same model with retrieval off (negative = better), 95% bootstrap interval over "
        "documents.",
        "",
        f"## Training ({args.train_note}; RETRO-fitting: baseline-medium frozen, the same tokens again)",
        "",
        markdown_table(["run", "steps", "final train loss", "val bits/byte", "tokens/s", "minutes",
                        "neighbour search s"], train_rows),
        "",
        "## Held-out change with retrieval",
        "",
        markdown_table(["reader", "protocol", "retrieval off", "retrieval on", "change [95% CI]", *BUCKETS,
                        "novel chunks", "baselines (bits/byte)"], rows),
        "",
        *commands_section(step.log, step.seconds),
    ]
    save_page(res, page)


if __name__ == "__main__":
    sys.exit(main())
