#!/usr/bin/env python3
"""Why RETRO-fitting recovered nothing with 5% of the tokens (issue 11): the same RETRO-fitting of baseline-medium
(frozen, CCA in its middle and last layers) with more update steps for the same tokens, a larger learning rate, and
20% / 100% of the baseline's tokens, plus checkpoints of the longest run evaluated along the way: is it the budget,
the schedule, or the method? And the same 100% run with the baseline's weights unfrozen, with distractors
(neighbour_swap) from its first step, and continued for a second phase with distractors or with its own neighbours.

    .venv/bin/python scripts/evidence_retrofit.py                # CPU scale (shares runs/evidence-retro/cpu)
    .venv/bin/python scripts/evidence_retrofit.py --profile gpu
    .venv/bin/python scripts/evidence_retrofit.py --runs fit-100pct fit-100pct-unfrozen   # a subset of the runs

Shares the work folder of scripts/evidence_retro.py (data, database, neighbours, baseline-medium and its 5% run are
trained once for both). Every step is a `retrolm` command; finished steps are skipped on a re-run. Writes
docs/results/retrofit-<profile>/<run>/{eval.json,report.md,...} and docs/results/retrofit-<profile>/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from evidence_budget import continued
from evidence_incontext import RETROLM, Steps, commands_section, evidence_start, rel, save_page
from evidence_retro import (
    BUCKETS,
    PROFILES,
    PROTOCOLS,
    change_cells,
    last_metrics,
    machine,
    pct,
    retrofit_args,
    shape_args,
    training_setup,
)

# (run, share of baseline-medium's tokens, batch size, learning rate, frozen) relative to the profile's batch and
# RETRO-fitting lr (fit_lr frozen, fit_lr_unfrozen unfrozen). "retrofit-frozen" is evidence_retro's 5% run (same
# command, trained once). The batch-4 run spends the same tokens in 4× the steps. The unfrozen run trains the
# baseline's weights too, at the lower lr evidence_retro uses for its unfrozen 5% run.
VARIANTS = [
    ("retrofit-frozen", 0.05, 1, 1.0, True),
    ("fit-5pct-b4", 0.05, 0.25, 1.0, True),
    ("fit-5pct-lr10", 0.05, 1, 10 / 3, True),
    ("fit-20pct", 0.20, 1, 1.0, True),
    ("fit-100pct", 1.00, 1, 1.0, True),
    ("fit-100pct-unfrozen", 1.00, 1, 1.0, False),
    ("fit-100pct-swap50", 1.00, 1, 1.0, True),
]
# further settings of a variant: half the chunks read another sequence's neighbours (distractors, as in
# scripts/evidence_budget.py --swap), against the cost a fitted frozen decoder pays on novel text
SETTINGS = {"fit-100pct-swap50": ["neighbour_swap=0.5"]}
# (run, the variant it continues, further share of the baseline's tokens, settings): a second phase of a finished
# frozen fitting (what it froze stays frozen) at half its peak lr, reading on past its sequences. Distractors after
# the model reads, as for RETRO from scratch (scripts/evidence_budget.py --swap), against the same phase with its own
# neighbours.
CONTINUED = [("fit-100pct-then-swap50", "fit-100pct", 0.5, ["neighbour_swap=0.5"]),
             ("fit-100pct-then-own", "fit-100pct", 0.5, [])]
ALONG = (0.1, 0.2, 0.5)  # checkpoints of the longest run evaluated on the way (share of its steps)


def main() -> None:
    def only(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--runs", nargs="+", choices=[v[0] for v in (*VARIANTS, *CONTINUED)], default=None,
                        help="train and evaluate only these variants, and the ones they continue (default: all)")
        ap.add_argument("--base-rounds", type=int, default=0, metavar="N",
                        help="RETRO-fit baseline-medium trained on for N more rounds (scripts/evidence_budget.py's "
                             "runs, trained here where missing), against RETRO from scratch after as many; shares "
                             "are of that baseline's tokens and the fitting reads on past them (default 0)")
        ap.add_argument("--fit-seed", type=int, default=0, metavar="S",
                        help="seed of the RETRO-fitting runs (initialisation of the new layers, dropout, batch order, "
                             "distractor draws); the baseline and RETRO from scratch stay seed 0's. Runs of seed S > 0 "
                             "are named <run>-seedS (default 0)")

    args, p, work, res, step = evidence_start(__doc__, PROFILES, "evidence-retro", "retrofit", only)
    if (args.runs or args.base_rounds or args.fit_seed) and args.results is None:  # a page must not replace another's
        sys.exit(f"evidence_retrofit.py: --runs, --base-rounds and --fit-seed need --results (else they would "
                 f"overwrite {rel(res)}/README.md)")
    if args.base_rounds < 0:
        sys.exit("evidence_retrofit.py: --base-rounds must be >= 0")
    if args.fit_seed < 0:
        sys.exit("evidence_retrofit.py: --fit-seed must be >= 0")

    held, db, train_run = training_setup(work, p, step)
    small = p["retro"][0]
    base = continued(train_run, p, "baseline", "medium", 0, args.base_rounds)[-1]
    # the reference: RETRO from scratch (evidence_retro's run, or evidence_budget's continued to as many tokens)
    scratch = continued(train_run, p, "retro", small, 0, args.base_rounds)[-1]
    fit = shape_args(p, "medium", retro=True)
    batch, steps = int(p["train"]["batch_size"]), int(p["train"]["steps"])
    base_seqs = (args.base_rounds + 1) * steps * batch  # sequences the baseline has read
    # a continued baseline is fitted on sequences it has not read (the first round's fits replay its batches)
    suffix, offset = (f"-{(args.base_rounds + 1) * steps}", [f"data_offset={base_seqs}"]) if args.base_rounds else (
        "", [])
    # the fitting's own seed: the same baseline, another draw of everything the fitting adds
    seed = [f"seed={args.fit_seed}"] if args.fit_seed else []
    suffix += f"-seed{args.fit_seed}" if args.fit_seed else ""
    runs: dict[str, dict] = {}
    wanted = set(args.runs or ()) | {parent for v, parent, _, _ in CONTINUED if args.runs and v in args.runs}
    for variant, share, batch_mult, lr_mult, frozen in VARIANTS:
        if wanted and variant not in wanted:
            continue
        name = variant + suffix
        b = max(1, round(batch * batch_mult))
        n = max(1, round(share * base_seqs / b))
        lr = (p["fit_lr"] if frozen else p["fit_lr_unfrozen"]) * lr_mult
        # evidence_retro's run is given no batch_size (the profile's): with it the two commands differed, and each
        # script retrained the other's run
        batch_arg = [] if variant == "retrofit-frozen" and b == batch else [f"batch_size={b}"]
        extra = [*retrofit_args(base, n), f"freeze_init={str(frozen).lower()}", f"lr={lr:.3g}", *batch_arg,
                 *offset, *seed, *SETTINGS.get(variant, [])]
        if share == 1.0:  # keep checkpoints along the way: the gain as a function of tokens within one run
            extra[extra.index(f"save_every={n}")] = f"save_every={max(1, round(n * ALONG[0]))}"
            extra.append("keep_checkpoints=100")
        runs[name] = {"dir": train_run(name, fit, extra, n), "share": share, "batch": b, "steps": n, "lr": lr,
                      "frozen": frozen, "settings": SETTINGS.get(variant, [])}
    for variant, parent, share, settings in CONTINUED:
        if wanted and variant not in wanted:
            continue
        first = runs[parent + suffix]
        n = max(1, round(share * base_seqs / first["batch"]))
        lr = first["lr"] / 2  # the weights are no longer at their initialisation, as in evidence_budget's rounds
        read = (base_seqs if args.base_rounds else 0) + first["steps"] * first["batch"]
        extra = [*retrofit_args(first["dir"], n), "freeze_init=true", f"lr={lr:.3g}", f"batch_size={first['batch']}",
                 f"data_offset={read}", *seed, *settings]
        runs[variant + suffix] = {"dir": train_run(variant + suffix, fit, extra, n), "share": first["share"] + share,
                                  "batch": first["batch"], "steps": n, "lr": lr, "frozen": True,
                                  "settings": [f"continues {parent + suffix}", *settings]}

    # An unfrozen run also trains the baseline's own weights for its steps: its fair reference is the baseline trained
    # on just as long (same init, lr and schedule) without retrieval layers.
    unfrozen = [r for r in runs.values() if not r["frozen"]]
    continued_base = None
    if unfrozen:
        n = max(r["steps"] for r in unfrozen)
        continued_base = train_run(f"{base.name}-continued", shape_args(p, "medium"),
                                   [*retrofit_args(base, n), f"lr={p['fit_lr_unfrozen']:.3g}", *offset], n)

    ev = ["--db", db, "--data", held, "--baseline", base, "-q", "retriever=bm25", "near_dup_measure=containment",
          "group_by=bucket"]
    evals: list[tuple[str, str, Path]] = []  # (label, protocol, eval folder)

    def evaluate(label: str, checkpoint: Path, protocol: str, frozen: bool = True) -> None:
        out = res / f"{label}-{protocol}"
        refs = [] if frozen or continued_base is None else ["--baseline", continued_base]
        step(f"eval {label} {protocol}", [*RETROLM, "eval", "--checkpoint", checkpoint, *ev, *refs, "--out", out,
                                          f"near_dup_threshold={PROTOCOLS[protocol]}"], out / "eval.json")
        evals.append((label, protocol, out))

    for name, r in runs.items():
        evaluate(name, r["dir"], "previous", r["frozen"])
    evaluate(scratch.name, scratch, "previous")
    longest = max(runs, key=lambda k: (runs[k]["steps"], runs[k]["frozen"]))  # the frozen one of equal length
    for frac in ALONG if runs[longest]["share"] == 1.0 else ():  # only 100% runs keep checkpoints along the way
        s = max(1, round(runs[longest]["steps"] * frac))
        evaluate(f"{longest}-step{s}", runs[longest]["dir"] / "checkpoints" / f"step-{s:06d}", "previous")
    for name, r in runs.items():
        if r["share"] >= 1.0:
            evaluate(name, r["dir"], "strict", r["frozen"])
    write_page(res, work, runs, evals, (base, scratch), step, args, p)


def write_page(res: Path, work: Path, runs: dict[str, dict], evals: list[tuple[str, str, Path]],
               base_scratch: tuple[Path, Path], step: Steps, args: argparse.Namespace, p: dict) -> None:
    from retrolm.eval.report import markdown_table

    base, scratch_run = base_scratch
    scratch = json.loads((res / f"{scratch_run.name}-previous" / "eval.json").read_text())
    train_rows = []
    for name, r in runs.items():
        m = last_metrics(r["dir"])
        kind = ", ".join(["frozen" if r["frozen"] else "unfrozen", *r["settings"]])
        train_rows.append([name, kind, f"{r['share']:.0%}", r["steps"], r["batch"], f"{r['lr']:.3g}",
                           f"{m.get('train/loss', float('nan')):.3f}", f"{m.get('train/tokens_per_s', 0):.0f}",
                           f"{step.seconds.get(name, 0) / 60:.1f}"])
    rows = []
    for label, protocol, out in evals:
        r = json.loads((out / "eval.json").read_text())
        recovered = f"{r['gain']['all'] / scratch['gain']['all']:.0%}" if scratch["gain"]["all"] > 0 else "–"
        head, tail = change_cells(r)
        vs = {k: v for k, v in r["gain"].items() if k.startswith("vs baseline:")}
        cont = next((v for k, v in vs.items() if k.endswith("-continued")), float("nan"))
        first = next((v for k, v in vs.items() if not k.endswith("-continued")), float("nan"))
        rows.append([label, protocol, *head, recovered, pct(first), pct(cont), *tail])
    only = (f" --runs {' '.join(args.runs)}" if args.runs else "") + (
        f" --base-rounds {args.base_rounds}" if args.base_rounds else "") + (
        f" --fit-seed {args.fit_seed}" if args.fit_seed else "") + (
        f" --results {rel(res)}" if args.runs or args.base_rounds or args.fit_seed else "")
    steps, batch, seq = (int(p["train"][k]) for k in ("steps", "batch_size", "model.seq_len"))
    tokens = (args.base_rounds + 1) * steps * batch * seq
    longer = (f" The baseline is {base.name}: baseline-medium trained on for {args.base_rounds} more rounds of "
              f"{steps} steps by `scripts/evidence_budget.py` ({tokens / 1e6:.2f}M tokens in all); the RETRO-fitting "
              "runs read on past the sequences it has read (`data_offset`), and RETRO from scratch is "
              f"{scratch_run.name}, trained on as many tokens the same way." if args.base_rounds else "")
    if args.fit_seed:
        longer += (f" The fitting runs use seed {args.fit_seed} (initialisation of the new layers, dropout, batch "
                   "order, distractor draws); the baseline and RETRO from scratch are seed 0's.")
    page = [
        f"# RETRO-fitting: how many tokens does it take? ({args.profile} profile)",
        "",
        f"Produced by `scripts/evidence_retrofit.py --profile {args.profile}{only}` on {platform.node()} "
        f"({machine()}), "
        f"{time.strftime('%Y-%m-%d')}; data, database, neighbours and baseline-medium are those in the work folder of "
        f"`scripts/evidence_retro.py --profile {args.profile}` "
        f"(`{rel(work)}`).{longer} Every run RETRO-fits {base.name} with its "
        "weights frozen (only the neighbour encoder and the chunked cross-attention in its middle and last layers "
        "train; their output projections start at zero, so every run starts exactly at the baseline), or unfrozen "
        "(every weight trains, at a lower lr), and reads k = 2 BM25 neighbours. A run that continues another "
        "(its base column says so) is a second phase of that frozen fitting: what it froze stays frozen, at half its "
        "peak lr, reading on past its sequences. Share = tokens as a share of the "
        "baseline's training tokens. Change = relative change of held-out bits per byte against the same model with "
        "retrieval off (= baseline-medium when frozen), negative = better; vs baseline = against baseline-medium "
        "itself (what an unfrozen run's change hides: its decoder moved too); vs continued baseline = against "
        "baseline-medium trained on for as many steps as the unfrozen run, from the same weights, with the same lr and "
        "schedule, and no retrieval layers (its fair reference); "
        f"recovered = that change as a share of RETRO from scratch's ({scratch_run.name}, the RETRO of the "
        "evidence run, on the same data and 100% of the tokens; its baseline for that share is its own retrieval-off "
        "score).",
        "",
        "## Training",
        "",
        markdown_table(["run", "base", "share of tokens", "steps", "batch", "peak lr", "final train loss", "tokens/s",
                        "minutes"], train_rows),
        "",
        "## Held-out change with retrieval (12 documents per bucket; 95% interval over documents)",
        "",
        markdown_table(["run", "protocol", "retrieval off", "retrieval on", "change [95% CI]", "recovered",
                        "vs baseline", "vs continued baseline", *BUCKETS, "novel chunks"], rows),
        "",
        *commands_section(step.log, step.seconds),
    ]
    save_page(res, page)


if __name__ == "__main__":
    sys.exit(main())
