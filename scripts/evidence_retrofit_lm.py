#!/usr/bin/env python3
"""RETRO-fitting a pretrained LM (issue 11, item 4): SmolLM2-135M, frozen, gets RETRO's neighbour encoder and chunked
cross-attention trained on the kernel-versions corpus of scripts/evidence_retro.py, and is evaluated on the same
held-out 6.12 documents (identical / changed / new against 6.1, and Wikipedia) under both exclusion protocols, next
to the same LM reading the retrieved passages in its context (no training) on the same documents and database.

    .venv/bin/python scripts/evidence_retrofit_lm.py                 # CPU scale (~2 h on 2 cores)
    .venv/bin/python scripts/evidence_retrofit_lm.py --profile gpu   # longer sequences, bigger batches

Shares the data of scripts/evidence_retro.py (runs/evidence-retro/<profile>/{train,heldout}.jsonl); the database is
rebuilt with the LM's tokenizer. Every step is a `retrolm` command; finished steps are skipped on a re-run. Writes
docs/results/retrofit-lm-<profile>/<run>/{eval.json,report.md,...} and docs/results/retrofit-lm-<profile>/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from evidence_incontext import LM, RETROLM, Steps, commands_section, evidence_start, save_page
from evidence_retro import (
    BUCKETS,
    PROTOCOLS,
    REPO,
    change_cells,
    copy_training_files,
    last_checkpoint,
    last_metrics,
    machine,
    pct,
    prepare,
    reader_keys,
)
from evidence_retro import PROFILES as DATA

# Training of the new modules (the base stays frozen). Sized in optimizer steps: the tiny-model study
# (docs/results/retrofit-cpu) found that RETRO-fitting needs a few hundred of them before the gain appears.
# cpu-long: the cpu profile's data, database and training neighbours, twice the steps in a run of its own (the cpu
# run's 2,000 sequences mostly adapted the new layers to the domain); the in-context reader is the cpu page's.
PROFILES = {
    "cpu": {"data": "cpu", "seq_len": 256, "batch_size": 4, "steps": 500, "lr": 1e-3, "save_every": 100},
    "cpu-long": {"data": "cpu", "seq_len": 256, "batch_size": 4, "steps": 1000, "lr": 1e-3, "save_every": 250,
                 "run": "retrofit-smollm2-1000", "incontext": False, "ks": "1,2,4"},
    # cpu-base: `encoder=base` (the base encodes the neighbours, every layer's attention reads them through a trained
    # copy of its own projections): it reads before any training, so step 0 is evaluated too, and the copies are
    # fine-tuned at a fine-tuning lr for 40 steps (a step costs ~8× cpu's: the gradient runs through all 30 layers; an
    # evaluation ~5×: the base encodes every neighbour), so only the model as built and the end are evaluated.
    # The first chunk of each evaluation sequence reads nothing (RETRO's causality), where the in-context reader has a
    # passage in every window: retrofit-ctx3 scores every chunk after 192 tokens of context (`context_chunks=3`, 4×
    # the forward passes), as the in-context reader does; retrofit-k1 reads one neighbour as it reads one passage.
    "cpu-base": {"data": "cpu", "seq_len": 256, "batch_size": 4, "steps": 40, "lr": 5e-5, "save_every": 40,
                 "run": "retrofit-smollm2-base", "config": "retrofit-smollm2-base.yaml", "step0": True,
                 "incontext": False, "along": False,
                 "extra": [("retrofit-k1", "previous", ("-k", "1")),
                           ("retrofit-ctx3", "previous", ("context_chunks=3",))],
                 "note": "The training and the two step-0 evaluations ran by hand, before the script, with the "
                         "commands listed (the step-0 evaluations on a checkpoint written by "
                         "`RetrofitModel.save_pretrained` before `steps=0` existed: bit-identical weights and "
                         "model.json, compared); the script reused their outputs. Training took ~25 min on cores "
                         "shared with evaluations (23 s a step alone), after a 16.5-min BM25 search for the training "
                         "neighbours; each step-0 evaluation 19–26 min beside other jobs. retrofit-k1 (5.5 min) and "
                         "retrofit-ctx3 (29 min alone, 2026-12-06) also ran by hand first, with the commands listed."},
    # cpu-base-long: the same with three times the steps, in a run of its own (how far more steps go)
    "cpu-base-long": {"data": "cpu", "seq_len": 256, "batch_size": 4, "steps": 120, "lr": 5e-5, "save_every": 40,
                      "run": "retrofit-smollm2-base-120", "config": "retrofit-smollm2-base.yaml", "incontext": False,
                      "along": False, "extra": [("retrofit-ctx3", "previous", ("context_chunks=3",))]},
    "smoke": {"data": "smoke", "seq_len": 128, "batch_size": 2, "steps": 4, "lr": 1e-3, "save_every": 2},
    "smoke-base": {"data": "smoke", "seq_len": 128, "batch_size": 2, "steps": 2, "lr": 5e-5, "save_every": 1,
                   "run": "retrofit-smollm2-base", "config": "retrofit-smollm2-base.yaml", "step0": True,
                   "incontext": False},
    "gpu": {"data": "gpu", "seq_len": 1024, "batch_size": 16, "steps": 600, "lr": 1e-3, "save_every": 150},
}


def main() -> None:
    args, p, work, res, step = evidence_start(__doc__, PROFILES, "evidence-retro", "retrofit-lm")

    _, held = prepare(work, DATA[p["data"]], step.log)
    db = work / "db-smollm2"
    step("db build smollm2", [*RETROLM, "db", "build", work / "train.jsonl", "--out", db, "--tokenizer", LM,
                              "--index", "none", "--bm25", "-q"], db / "meta.json")
    run = p.get("run", "retrofit-smollm2")
    fit = work / run
    n = p["steps"]
    fit_args = ["retrofit", "-q", "--config", REPO / "configs" / p.get("config", "retrofit-smollm2.yaml"), "--base",
                LM, "--db", db, f"seq_len={p['seq_len']}", f"batch_size={p['batch_size']}", f"lr={p['lr']}",
                f"save_every={p['save_every']}", "keep_checkpoints=100", f"eval_every={p['save_every']}",
                "tensorboard=false", f"neighbours_dir={work / 'neighbours-smollm2'}"]
    if p.get("step0"):  # the model as built: encoder=base reads before any training
        step(f"{run} step 0", [*RETROLM, *fit_args, "--out", work / f"{run}-step0", "steps=0"],
             last_checkpoint(work / f"{run}-step0", 0))
    step(run, [*RETROLM, *fit_args, "--out", fit, f"steps={n}"], last_checkpoint(fit, n))

    ev = ["--db", db, "--data", held, "-q", "retriever=bm25", "near_dup_measure=containment", "group_by=bucket"]
    evals: list[tuple[str, str, Path]] = []  # (label, protocol, eval folder)

    def evaluate(label: str, checkpoint: Path | str, protocol: str, extra: tuple[str, ...] = ()) -> None:
        out = res / f"{label}-{protocol}"
        step(f"eval {run} {label} {protocol}", [*RETROLM, "eval", "--checkpoint", checkpoint, *ev, "--out", out, *extra,
                                          f"near_dup_threshold={PROTOCOLS[protocol]}"], out / "eval.json")
        evals.append((label, protocol, out))

    if p.get("step0"):
        for protocol in PROTOCOLS:
            evaluate("retrofit-step0", last_checkpoint(work / f"{run}-step0", 0).parent, protocol)
    for s in range(p["save_every"], n, p["save_every"]) if p.get("along", True) else ():  # the gain along the run
        evaluate(f"retrofit-step{s}", fit / "checkpoints" / f"step-{s:06d}", "previous")
    for protocol in PROTOCOLS:
        evaluate("retrofit", fit, protocol)
    # Control: each chunk reads the neighbours of a chunk of another held-out document. The new layers can also learn
    # the domain (the base never saw this corpus in training here); what they give without relevant text shows here.
    evaluate("retrofit-shuffled", fit, "previous", ("shuffle_neighbours=true",))
    for label, protocol, extra in p.get("extra", ()):
        evaluate(label, fit, protocol, extra)
    if p.get("ks"):  # neighbours read at evaluation (trained with k = 2), previous version allowed
        out = res / "scale-k"
        step(f"scale {run} neighbours", [*RETROLM, "scale", "neighbours", "--checkpoint", fit, "--db", db, "--data",
                                         held, "-q", "retriever=bm25", "near_dup_threshold=0", "--ks", p["ks"],
                                         "--out", out], out / "scale-neighbours.json")
    # The same LM reading one passage (chunk + continuation) every 64 tokens, with at most as much of the document
    # before the predicted tokens as the RETRO-fitted model's sequences hold.
    ctx = ("stride=64", "query_tokens=32", f"context_tokens={p['seq_len'] - 64}")
    for protocol in PROTOCOLS if p.get("incontext", True) else ():
        evaluate("in-context", LM, protocol, ctx)
    copy_training_files(res, {run: fit})
    write_page(res, fit, evals, step, args, p)


EXTRA_TEXT = {
    "retrofit-k1": "reads one neighbour per chunk instead of two (`-k 1`)",
    "retrofit-ctx3": "is scored on evaluation sequences that overlap by three chunks (`context_chunks=3`): every chunk "
                     "reads its neighbours and has 192 tokens of context before it, as in the in-context reader's "
                     "windows, and its retrieval-off reference is SmolLM2 on those windows",
}


def write_page(res: Path, fit: Path, evals: list[tuple[str, str, Path]], step: Steps, args: argparse.Namespace,
               p: dict) -> None:
    from retrolm.eval.report import markdown_table

    rows = []
    for label, protocol, out in evals:
        head, tail = change_cells(json.loads((out / "eval.json").read_text()))  # in-context: its own LM-alone ref
        rows.append([label, protocol, *head, *tail])
    m = last_metrics(fit)
    page = [
        f"# RETRO-fitting SmolLM2-135M vs reading passages in its context ({args.profile} profile)",
        "",
        f"Produced by `scripts/evidence_retrofit_lm.py --profile {args.profile}` on {platform.node()} ({machine()}), "
        f"{time.strftime('%Y-%m-%d')}. Data: that of [retro-{p['data']}](../retro-{p['data']}/README.md) (kernel "
        "6.1 and the rest of 6.12 for a share of the paths, plus Wikipedia summaries), the database rebuilt with "
        "SmolLM2's tokenizer (64-token chunks, BM25). " + fitting_text(p) + " "
        + ("In-context: the same SmolLM2, untrained, reads one passage (chunk + continuation) retrieved every 64 "
           f"tokens with the last 32 tokens as the query, and at most {p['seq_len'] - 64} document tokens before the "
           "64 it predicts; its reference is SmolLM2 on the same windows without the passage. "
           if p.get("incontext", True) else
           f"The same LM reading the passages in its context, on the same documents: [retrofit-lm-{p['data']}]"
           f"(../retrofit-lm-{p['data']}/README.md). ")
        + "Change = relative change of held-out bits per byte with "
        "retrieval, negative = better, 95% bootstrap interval over documents; protocols as in retro-"
        f"{p['data']} (previous = only the document itself excluded; strict = also every document holding ≥ 80% of "
        "its 13-grams). retrofit-shuffled is the control: every held-out chunk reads the neighbours of a chunk of "
        "another held-out document (`shuffle_neighbours=true`), so its change is what the new layers give without "
        "relevant text — the frozen base never saw this corpus, and they can learn its domain."
        + "".join(f" {label} {EXTRA_TEXT[label]}." for label, _, _ in p.get("extra", ()) if label in EXTRA_TEXT),
        "",
        f"Training: final train loss {m.get('train/loss', float('nan')):.3f}, "
        f"{m.get('train/tokens_per_s', 0):.0f} tokens/s"
        + (f", {step.seconds[fit.name] / 60:.0f} min" if step.seconds.get(fit.name, 0) >= 60 else "")
        + (f" (BM25 training neighbours: {m['setup/neighbour_seconds'] / 60:.0f} min)."
           if "setup/neighbour_seconds" in m else ".") + (f" {p['note']}" if p.get("note") else ""),
        "",
        "## Held-out change with retrieval (12 documents per bucket)",
        "",
        markdown_table(["model", "protocol", "retrieval off", "retrieval on", "change [95% CI]", *BUCKETS,
                        "novel chunks"], rows),
        "",
        *k_curve(res / "scale-k" / "scale-neighbours.json"),
        *by_position(evals, p["seq_len"] // 64, REPO / "docs" / "results" / f"retrofit-lm-{p['data']}"),
        *commands_section(step.log, step.seconds),
    ]
    save_page(res, page)


def fitting_text(p: dict) -> str:
    """What the page says the RETRO-fitting was."""
    tokens = f"{p['steps']} steps × {p['batch_size']} × {p['seq_len']} tokens = " \
             f"{p['steps'] * p['batch_size'] * p['seq_len'] / 1e6:.2f}M tokens, peak lr {p['lr']}"
    if p.get("config") == "retrofit-smollm2-base.yaml":
        return ("RETRO-fitting with the base reading its neighbours (`retrolm retrofit`, "
                "configs/retrofit-smollm2-base.yaml, `encoder=base`): SmolLM2-135M-Instruct frozen encodes each "
                "neighbour, and every one of its 30 layers' self-attention also reads the neighbours' states at that "
                "layer through a trained copy of its own query/key/value/output projections, one softmax over "
                "context and neighbour (the neighbour placed right before the chunk it continues); k = 2 BM25 "
                "neighbours of each training chunk (own document excluded). retrofit-step0 is the model as built "
                f"(`steps=0`, no training); then {tokens}. With retrieval off the model *is* SmolLM2.")
    return ("RETRO-fitting (`retrolm retrofit`, configs/retrofit-smollm2.yaml): SmolLM2-135M-Instruct frozen; a "
            "2-layer neighbour encoder (256 wide) and chunked cross-attention after layers 18, 24 and 30 train on "
            f"k = 2 BM25 neighbours of each training chunk (own document excluded): {tokens}. Its output "
            "projections start at zero, so with retrieval off the model *is* SmolLM2.")


def by_position(evals: list[tuple[str, str, Path]], seq_chunks: int, incontext: Path) -> list[str]:
    """The page's section on where in a sequence the gain is: a RETRO-style reader's first chunk of each evaluation
    sequence reads nothing, the others read the neighbours of the chunk before; the in-context reader of the same
    documents (``incontext``/in-context-<protocol>) on the same chunks, for comparison."""
    import numpy as np
    import yaml

    from retrolm.eval.groups import gain_interval
    from retrolm.eval.report import markdown_table

    def cells(on: np.ndarray, off: np.ndarray, doc: np.ndarray, sel: np.ndarray) -> str:
        lo, hi = gain_interval(on, off, doc, sel)
        return f"{pct(1 - on[sel].sum() / off[sel].sum())} [{pct(hi)}, {pct(lo)}]"

    def reads_own_neighbours(out: Path) -> bool:  # neither the overlapping sequences nor the control
        cfg = yaml.safe_load((out / "config.yaml").read_text()) or {}
        return cfg.get("context_chunks", 0) == 0 and not cfg.get("shuffle_neighbours", False)

    rows = []
    readers = [(f"{label} ({protocol})", out) for label, protocol, out in evals if reads_own_neighbours(out)]
    readers += [(f"in-context ({protocol}, [page](../{incontext.name}/README.md))",
                 incontext / f"in-context-{protocol}") for protocol in PROTOCOLS]
    for name, out in readers:
        if not (out / "per_chunk.npz").is_file():
            continue
        d = np.load(out / "per_chunk.npz")
        on, off = reader_keys({k.removeprefix("nats:") for k in d.files})
        on, off = d[f"nats:{on}"], d[f"nats:{off}"]
        first = np.arange(len(on)) % seq_chunks == 0
        rows.append([name, cells(on, off, d["doc"], first), cells(on, off, d["doc"], ~first)])
    if not rows:
        return []
    return ["## Where in a sequence the gain is", "",
            f"A RETRO-style reader scores {seq_chunks}-chunk sequences; the first chunk of each reads nothing (no "
            "neighbour was retrieved before it), the others read the neighbours of the chunk before. The in-context "
            "reader retrieves for every 64 tokens, so its gain is spread evenly; shown on the same chunks. Change of "
            "bits per byte, 95% bootstrap over documents, each against its own retrieval-off reference.", "",
            markdown_table(["reader", "first chunk of each sequence", "the other chunks"], rows), ""]


def k_curve(path: Path) -> list[str]:
    """The page's section on neighbours read at evaluation, if that curve was run."""
    if not path.is_file():
        return []
    from retrolm.eval.report import markdown_table

    r = json.loads(path.read_text())
    off = r["references"]["retro_no_retrieval"]["bpb"]
    rows = [[x["k"], f"{x['bpb']:.4f}", f"{x['bpb'] / off - 1:+.1%}"] for x in r["rows"]]
    return ["## Neighbours read at evaluation (trained with k = 2; previous version allowed)", "",
            markdown_table(["k", "bits/byte", "change"], [*rows, ["retrieval off", f"{off:.4f}", "–"]]), "",
            "![neighbours](scale-k/scale-neighbours.png)", ""]


if __name__ == "__main__":
    sys.exit(main())
