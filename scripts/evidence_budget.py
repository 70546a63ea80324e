#!/usr/bin/env python3
"""Is it the budget? (issue 11, "find out why"): the three baselines and RETRO-small of scripts/evidence_retro.py
trained on for more rounds of the same number of steps, each continuing the last (init_from, half the first run's
peak lr, a fresh warm-up and cosine decay, and data_offset so that every round reads sequences the model has not seen
yet), then evaluated per bucket under both protocols and against the control. Do the baselines order by size, does
RETRO-small's reading gain grow with training, and does it overtake the baseline twice its size?

    .venv/bin/python scripts/evidence_budget.py                        # CPU scale: one more round, seed 0
    .venv/bin/python scripts/evidence_budget.py --seeds 0 1 --rounds 2 1  # seed 0: two more rounds; seed 1 (its
                                                                          # baseline-medium and RETRO-small): one
    .venv/bin/python scripts/evidence_budget.py --rounds 3 --swap 0.25 0.5 --baselines  # RETRO-small alone, its
                                                   # last round again with a quarter / half of the neighbours swapped
    .venv/bin/python scripts/evidence_budget.py --rounds 3 --near-dup --baselines  # its last round again with no
                                                   # other version of a chunk's document among its neighbours
    .venv/bin/python scripts/evidence_budget.py --rounds 1 --retro medium --baselines \
        --results docs/results/budget-cpu-retro-medium          # RETRO-medium alone, two rounds

Shares the work folder of scripts/evidence_retro.py (data, database, neighbours and the first round are trained once
for every script). Every step is a `retrolm` command; finished steps are skipped on a re-run. Writes
docs/results/budget-<profile>/<run>-<protocol>/{eval.json,report.md,...} and docs/results/budget-<profile>/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from evidence_incontext import RETROLM, Steps, commands_section, evidence_start, rel, save_page
from evidence_retro import (
    BUCKETS,
    PROFILES,
    PROTOCOLS,
    change_cells,
    copy_training_files,
    corpus_packages,
    last_metrics,
    machine,
    pct,
    shape_args,
    training_setup,
)

SEED_RUNS = {0: ("small", "medium", "large"), 1: ("medium",)}  # baselines trained per seed (seed 1: evidence_retro's)


def run_name(kind: str, size: str, seed: int, total_steps: int, first_steps: int) -> str:
    """``baseline-medium``, ``retro-small-seed1`` (first rounds), ``baseline-large-1000`` (continued to 1,000 steps)."""
    more = f"-{total_steps}" if total_steps != first_steps else ""
    return f"{kind}-{size}{more}" + (f"-seed{seed}" if seed else "")


def continued(train_run: Callable[..., Path], p: dict, kind: str, size: str, seed: int, rounds: int,
              last_extra: Sequence[str] = (), suffix: str = "", n_last: int = 1) -> list[Path]:
    """The run folders of ``kind``-``size`` (``seed``) after its first round and each of ``rounds`` more (trained
    where missing): each round continues the last one's weights at half the first peak lr and reads on
    (``data_offset``). ``last_extra`` settings go to the last ``n_last`` rounds only, whose names then end in
    ``-suffix``."""
    steps, batch = int(p["train"]["steps"]), int(p["train"]["batch_size"])
    shape = shape_args(p, size, retro=kind == "retro")
    lr = p["sizes"][size][3]
    seed_arg = [f"seed={seed}"] if seed else []
    chain: list[Path] = []
    for r in range(rounds + 1):
        # later rounds: half the first peak lr, as the weights are no longer at their initialisation
        extra = [f"init_from={chain[-1]}", f"lr={lr / 2:.3g}", f"data_offset={r * steps * batch}", *seed_arg] \
            if r else [f"lr={lr}", *seed_arg]
        name = run_name(kind, size, seed, (r + 1) * steps, steps)
        if r > rounds - n_last and last_extra:
            extra += last_extra
            name += f"-{suffix}"
        chain.append(train_run(name, shape, extra))
    return chain


def main() -> None:
    def more(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--rounds", type=int, nargs="+", default=[1],
                        help="rounds of training after the first: one number for every seed, or one per seed")
        ap.add_argument("--seeds", type=int, nargs="+", default=[0], choices=sorted(SEED_RUNS))
        ap.add_argument("--swap", type=float, nargs="+", default=[], metavar="SHARE",
                        help="also train the first seed's last RETRO round again with neighbour_swap=SHARE, "
                             "once per share (that share of training chunks read another sequence's neighbours)")
        ap.add_argument("--near-dup", action="store_true",
                        help="also train the first seed's last RETRO round again with "
                             "neighbour_exclude=near_duplicate (no neighbour from another version of the chunk's "
                             "document: the strict protocol in training)")
        ap.add_argument("--swap-rounds", type=int, default=1, metavar="N",
                        help="the variants (--swap, --near-dup) in the last N rounds of the chain, not only the last "
                             "(rounds + 1: all of them, from the initialisation on)")
        ap.add_argument("--baselines", nargs="*", default=None, metavar="SIZE",
                        help="baseline sizes to train for every seed (default: small medium large for seed 0, "
                             "medium for seed 1; none: RETRO alone, no vs-baseline columns)")
        ap.add_argument("--retro", default=None, metavar="SIZE",
                        help="the size of the RETRO model to train (default: the profile's first, small)")

    args, p, work, res, step = evidence_start(__doc__, PROFILES, "evidence-retro", "budget", more)
    if len(args.rounds) not in (1, len(args.seeds)) or min(args.rounds) < 1:
        sys.exit("evidence_budget.py: --rounds takes one number >= 1, or one per seed")
    if any(not 0 < share <= 1 for share in args.swap):
        sys.exit(f"evidence_budget.py: --swap takes shares in (0, 1], got {' '.join(map(str, args.swap))}")
    if args.baselines and not set(args.baselines) <= set(PROFILES[args.profile]["sizes"]):
        sys.exit(f"evidence_budget.py: --baselines takes sizes of {', '.join(PROFILES[args.profile]['sizes'])}")
    more_rounds = dict(zip(args.seeds, args.rounds * len(args.seeds) if len(args.rounds) == 1 else args.rounds,
                           strict=True))
    n_swap = args.swap_rounds
    if not 1 <= n_swap <= more_rounds[min(args.seeds)] + 1:  # checked before anything trains
        sys.exit(f"evidence_budget.py: --swap-rounds takes 1 to {more_rounds[min(args.seeds)] + 1} (the first "
                 "seed's rounds, the first included)")
    if args.retro is not None and args.retro not in PROFILES[args.profile]["sizes"]:
        sys.exit(f"evidence_budget.py: --retro takes one of {', '.join(PROFILES[args.profile]['sizes'])}")
    held, db, train_run = training_setup(work, p, step)
    rsize = retro_size(args, p)

    # runs[seed][(kind, size)] = [run folder after round 0, 1, …]
    runs: dict[int, dict[tuple[str, str], list[Path]]] = {}
    for seed in args.seeds:
        sizes = SEED_RUNS[seed] if args.baselines is None else args.baselines
        models = [("baseline", s) for s in sizes] + [("retro", rsize)]
        runs[seed] = {(kind, size): continued(train_run, p, kind, size, seed, more_rounds[seed])
                      for kind, size in models}
    # the variants of the RETRO model's last round(s) of the first seed: distractors, neighbours without other versions
    first = runs[min(runs)][("retro", rsize)]
    times = f"x{n_swap}" if n_swap > 1 else ""
    variants = {f"neighbour_swap {share:g}": ([f"neighbour_swap={share}"], f"swap{share * 100:.0f}{times}")
                for share in args.swap}
    if args.near_dup:  # their own neighbour folder: the shared one holds the paper's rule's
        variants["near-duplicates excluded"] = (["neighbour_exclude=near_duplicate",
                                                 f"neighbours_dir={work / 'neighbours-near-dup'}"], f"neardup{times}")
    # label -> the chain's varied rounds (the rounds before them are those of the plain chain)
    swap_chains = {label: continued(train_run, p, "retro", rsize, min(runs), len(first) - 1, extra, suffix,
                                    n_swap)[-n_swap:]
                   for label, (extra, suffix) in variants.items()}
    swapped = {label: chain[-1] for label, chain in swap_chains.items()}

    ev = ["--db", db, "--data", held, "-q", "retriever=bm25", "near_dup_measure=containment", "group_by=bucket"]

    def evaluate(retro: Path, baselines: list[Path]) -> None:
        """Both protocols against the baselines of its round, and the control: another document's neighbours."""
        refs = [a for b in baselines for a in ("--baseline", b)]
        for protocol, near in PROTOCOLS.items():
            out = res / f"{retro.name}-{protocol}"
            step(f"eval {retro.name} {protocol}", [*RETROLM, "eval", "--checkpoint", retro, *ev, *refs,
                                                   f"near_dup_threshold={near}", "--out", out], out / "eval.json")
        out = res / f"{retro.name}-shuffled"
        step(f"eval {retro.name} shuffled", [*RETROLM, "eval", "--checkpoint", retro, *ev, "near_dup_threshold=0",
                                             "shuffle_neighbours=true", "--out", out], out / "eval.json")

    for by in runs.values():
        for r, retro in enumerate(by[("retro", rsize)]):
            evaluate(retro, [chain[r] for (kind, _), chain in by.items() if kind == "baseline"])
    for run in swapped.values():
        evaluate(run, [chain[-1] for (kind, _), chain in runs[min(runs)].items() if kind == "baseline"])
    last = runs[min(runs)][("retro", rsize)][-1]
    out = res / f"{last.name}-k"
    step(f"scale {last.name} neighbours previous",
         [*RETROLM, "scale", "neighbours", "--checkpoint", last, *ev, "near_dup_threshold=0", "--ks", "1,2,4",
          "--out", out], out / "scale-neighbours.json")
    trained = {c.name: c for by in runs.values() for chain in by.values() for c in chain}
    copy_training_files(res, trained | {run.name: run for chain in swap_chains.values() for run in chain})
    write_page(res, work, runs, swap_chains, step, args, p)


def retro_size(args: argparse.Namespace, p: dict) -> str:
    """The size of the RETRO chain: ``--retro``, or the profile's first RETRO size."""
    return args.retro or p["retro"][0]


def train_row(run: Path, seed: int, rounds: int, step: Steps) -> list:
    """A run's row of the training table: final loss, the trainer's validation (RETRO: also retrieval off), minutes."""
    m = last_metrics(run)
    return [run.name, seed, rounds, f"{m.get('train/loss', float('nan')):.3f}", f"{m.get('val/bpb', float('nan')):.4f}",
            f"{m['val_no_retrieval/bpb']:.4f}" if "val_no_retrieval/bpb" in m else "–",
            f"{step.seconds_of(run.name) / 60:.1f}"]


def plot_training(path: Path, runs: dict[int, dict[tuple[str, str], list[Path]]], steps: int,
                  swap_chains: dict[str, list[Path]]) -> None:
    """The trainer's validation bits per byte of every chain of runs against the steps it has trained in all (round
    r's step s = r × steps + s; a run's metrics.jsonl counts its own steps from 0); RETRO also with retrieval off.
    ``swap_chains`` (variant -> its rounds, the first seed's RETRO) are drawn from the round they start in."""
    from retrolm.eval.report import plot_lines

    chains = {(seed, kind, size, ""): (0, chain)
              for seed, by in sorted(runs.items()) for (kind, size), chain in by.items()}
    seed = min(runs)
    retro = next(key for key in runs[seed] if key[0] == "retro")
    n_rounds = len(runs[seed][retro])
    chains |= {(seed, *retro, f", {label}"): (n_rounds - len(chain), chain) for label, chain in swap_chains.items()}
    series: dict[str, dict[int, float]] = {}
    for (seed, kind, size, note), (first_round, chain) in chains.items():
        label = f"{kind}-{size}" + (f", seed {seed}" if seed else "") + note
        rows = [((first_round + r) * steps + row["step"], row) for r, run in enumerate(chain)
                for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
        series[label] = {x: row["val/bpb"] for x, row in rows if "val/bpb" in row}
        if kind == "retro":
            series[f"{label}, retrieval off"] = {x: row["val_no_retrieval/bpb"] for x, row in rows
                                                 if "val_no_retrieval/bpb" in row}
    xs = sorted(set().union(*series.values()))
    plot_lines(path, xs, {k: [v.get(x, float("nan")) for x in xs] for k, v in series.items()},
               xlabel="optimizer steps, all rounds", ylabel="trainer's validation bits per byte",
               title=f"Baselines and RETRO-{retro[1]} trained on for more rounds")


def retro_cells(res: Path, retro: Path, baselines: dict[str, Path]) -> tuple[list[str], dict[str, float]]:
    """A RETRO run's held-out cells (retrieval off, on, change, buckets, novel chunks, strict, control, against each
    baseline of ``baselines`` = {size: run}) and those baselines' bits per byte, from its three evaluations."""
    ev = {proto: json.loads((res / f"{retro.name}-{proto}" / "eval.json").read_text())
          for proto in (*PROTOCOLS, "shuffled")}
    s = ev["previous"]["summary"]
    bpb = {size: s[f"baseline:{run.name}"]["bpb"] for size, run in baselines.items()}
    head, tail = change_cells(ev["previous"])
    on = s["retro"]["bpb"]
    vs = [pct(1 - on / bpb[size]) if size in bpb else "–" for size in ("small", "medium", "large")]
    sh = ev["shuffled"]["summary"]
    return [*head, *tail, pct(ev["strict"]["gain"]["all"]),
            f"{sh['retro']['bpb'] / sh['retro_no_retrieval']['bpb'] - 1:+.1%}", *vs], bpb


def write_page(res: Path, work: Path, runs: dict[int, dict[tuple[str, str], list[Path]]],
               swap_chains: dict[str, list[Path]], step: Steps, args: argparse.Namespace, p: dict) -> None:
    from retrolm.eval.report import markdown_table

    steps, batch, seq = (int(p["train"][k]) for k in ("steps", "batch_size", "model.seq_len"))
    rsize = retro_size(args, p)
    swapped = {label: chain[-1] for label, chain in swap_chains.items()}
    base_rows, retro_rows, train_rows = [], [], []
    for seed, by in sorted(runs.items()):
        for r, retro in enumerate(by[("retro", rsize)]):
            tokens = f"{(r + 1) * steps * batch * seq / 1e6:.2f}M"
            baselines = {size: chain[r] for (kind, size), chain in by.items() if kind == "baseline"}
            cells, bpb = retro_cells(res, retro, baselines)
            groups = json.loads((res / f"{retro.name}-previous" / "eval.json").read_text()).get("groups", {})
            for size, run in baselines.items():
                key = f"baseline:{run.name}"
                base_rows.append([seed, r + 1, tokens, f"baseline-{size}", f"{bpb[size]:.4f}",
                                  *(f"{groups[b]['summary'][key]['bpb']:.4f}" if b in groups else "–"
                                    for b in BUCKETS)])
            retro_rows.append([seed, r + 1, tokens, *cells])
        for chain in by.values():
            for r, run in enumerate(chain):
                train_rows.append(train_row(run, seed, r + 1, step))
    swap_rows = []
    if swapped:
        seed = min(runs)
        by = runs[seed]
        plain = by[("retro", rsize)][-1]
        baselines = {size: chain[-1] for (kind, size), chain in by.items() if kind == "baseline"}
        for label, run in (("the paper's recipe", plain), *swapped.items()):
            swap_rows.append([run.name, label, *retro_cells(res, run, baselines)[0]])
        n_rounds = len(by[("retro", rsize)])
        train_rows += [train_row(run, seed, n_rounds - len(chain) + r + 1, step)
                       for chain in swap_chains.values() for r, run in enumerate(chain)]
    whole = args.swap_rounds == len(runs[min(runs)][("retro", rsize)])  # swapped from the start
    last_rounds = "round" if args.swap_rounds == 1 else f"{args.swap_rounds} rounds"
    start = "same initialisation" if whole else "same weights to start from"
    plot_training(res / "training.png", runs, steps, swap_chains)
    k_rows = []
    last = runs[min(runs)][("retro", rsize)][-1]
    kfile = res / f"{last.name}-k" / "scale-neighbours.json"
    if kfile.is_file():
        kr = json.loads(kfile.read_text())
        off = kr["references"]["retro_no_retrieval"]["bpb"]
        k_rows = [[x["k"], f"{x['bpb']:.4f}", f"{x['bpb'] / off - 1:+.1%}"] for x in kr["rows"]]
    flags = (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0] else "") + (
        f" --rounds {' '.join(map(str, args.rounds))}" if args.rounds != [1] else "") + (
        f" --swap {' '.join(f'{x:g}' for x in args.swap)}" if args.swap else "") + (
        " --near-dup" if args.near_dup else "") + (
        f" --baselines {' '.join(args.baselines)}".rstrip() if args.baselines is not None else "") + (
        f" --swap-rounds {args.swap_rounds}" if args.swap_rounds > 1 else "") + (
        f" --retro {args.retro}" if args.retro else "")
    page = [
        f"# Is it the budget? The same models trained on for more rounds ({args.profile} profile)",
        "",
        f"Produced by `scripts/evidence_budget.py --profile {args.profile}{flags}` on {platform.node()} "
        f"({machine()}), {time.strftime('%Y-%m-%d')}. Data, database (BM25), held-out set and the first round of "
        f"every model ({steps} steps × {batch} × {seq} tokens, warm-up and cosine decay) are those in the work folder "
        f"of `scripts/evidence_retro.py --profile {args.profile}` (`{rel(work)}`). Each further round continues the "
        f"last one's weights for another {steps} steps (`init_from`) at half the first round's peak lr, with a fresh "
        "warm-up and cosine decay, and `data_offset` set to the sequences already read, so that it reads on into "
        "sequences the model has not seen (a round is one more copy of the first round's tokens, not a second pass "
        "over them). Rounds are a warm restart, not one longer schedule. Change = relative change of held-out bits "
        f"per byte against the same model with retrieval off, negative = better; vs baseline = RETRO-{rsize} with "
        "retrieval against that baseline at the same round. Protocols: previous = only the held-out document "
        f"itself is excluded; strict = also every document holding ≥ 80% of its 13-grams. Control = RETRO-{rsize} "
        "reading another document's neighbours. Wall times are those of whatever shared the machine's cores. "
        f"Corpora: {corpus_packages()}.",
        "",
        *(["## Baselines, held-out bits per byte (previous version allowed: the baselines read nothing)", "",
           markdown_table(["seed", "rounds", "tokens", "model", "bits/byte", *BUCKETS], base_rows), ""]
          if base_rows else []),
        f"## RETRO-{rsize} (k = 2 BM25 neighbours), held out",
        "",
        markdown_table(["seed", "rounds", "tokens", "retrieval off", "retrieval on", "change [95% CI]", *BUCKETS,
                        "novel chunks", "strict", "control", "vs baseline-small", "vs baseline-medium",
                        "vs baseline-large"], retro_rows),
        "",
        "The trainer's validation split (sequences of the training text held out of training, neighbours found "
        "with their own document excluded, as in training) every 250 steps over all rounds:",
        "",
        "![validation bits per byte over training](training.png)",
        "",
        *([f"## Variants of training: RETRO-{rsize}'s {'' if whole else 'last '}{last_rounds} again, with other "
           "neighbours", "",
           f"The same {last_rounds} as {swap_rows[0][0] if swap_rows else ''} ({start}, data, lr and schedule), "
           "except for what the training chunks read. `neighbour_swap` *s*: each chunk, with probability *s* per "
           "step, reads the neighbours of the same chunk of another sequence in its batch instead of its own, a "
           "neighbour that holds nothing it needs, as on novel text. Near-duplicates excluded "
           "(`neighbour_exclude=near_duplicate`): no chunk's neighbours come from its own document or from one that "
           "holds ≥ 80% of its document's 13-grams (or ≥ 80% of whose 13-grams its document holds), i.e. from "
           "another version of the same file: neighbours that are related text, never a copy, as under the strict "
           "protocol. Does the model learn to pass over (or to use) neighbours that do not continue its chunk "
           "(novel chunks, new files, strict, control), and what does it cost where the neighbours help?", "",
           markdown_table(["run", "variant", "retrieval off", "retrieval on", "change [95% CI]", *BUCKETS,
                           "novel chunks", "strict", "control", "vs baseline-small", "vs baseline-medium",
                           "vs baseline-large"], swap_rows), ""] if swap_rows else []),
        *([f"Neighbours at evaluation ({last.name}, previous version allowed):", "",
           markdown_table(["k", "bits/byte", "change"], k_rows), ""] if k_rows else []),
        "## Training",
        "",
        markdown_table(["run", "seed", "rounds", "final train loss", "trainer's val bits/byte",
                        "val bits/byte, retrieval off", "minutes"], train_rows),
        "",
        *commands_section(step.log, step.seconds),
    ]
    save_page(res, page)


if __name__ == "__main__":
    sys.exit(main())
