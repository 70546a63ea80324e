#!/usr/bin/env python3
"""A bucket's relative change in bits per byte, recomputed from an evaluation's per_chunk.npz without some of its
documents (no model run again): how docs/results.md corrected the *changed* rows whose excerpts were verbatim old
text (2026-12-07).

    .venv/bin/python scripts/recompute_bucket.py docs/results/incontext/bm25-s64-previous --drop 9 10 11

``--drop``: document indices of the held-out file (the ``doc`` column of per_chunk.npz). The bucket's documents are
found from eval.json's per-bucket counts (the held-out file lists identical, changed, new, then other buckets, in the
order of its ``group_by`` groups). Prints the eval.json value, the recomputed one (they must agree), the dropped
documents' own change and the change without them with a 95% bootstrap interval over documents.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ORDER = ("identical", "changed", "new")


def change(nats_on: np.ndarray, nats_off: np.ndarray, doc: np.ndarray, docs: list[int]) -> float:
    """Relative change of bits per byte over ``docs`` (same bytes on both sides: the ratio of summed nats)."""
    m = np.isin(doc, docs)
    return float(nats_on[m].sum() / nats_off[m].sum() - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="an evaluation folder holding eval.json and per_chunk.npz")
    ap.add_argument("--bucket", default="changed", choices=ORDER)
    ap.add_argument("--drop", type=int, nargs="+", required=True)
    args = ap.parse_args()
    groups = json.loads((args.run / "eval.json").read_text())["groups"]
    z = np.load(args.run / "per_chunk.npz")
    on = next(k for k in ("nats:retro", "nats:in_context") if k in z.files)
    off = "nats:retro_no_retrieval" if on == "nats:retro" else "nats:no_retrieval"
    first = sum(groups[b]["docs"] for b in ORDER[: ORDER.index(args.bucket)])
    docs = list(range(first, first + groups[args.bucket]["docs"]))
    kept = [d for d in docs if d not in args.drop]
    rng = np.random.default_rng(0)
    sums = np.array([[z[on][z["doc"] == d].sum(), z[off][z["doc"] == d].sum()] for d in kept])
    boot = [s[:, 0].sum() / s[:, 1].sum() - 1 for s in (sums[rng.integers(0, len(kept), len(kept))]
                                                        for _ in range(2000))]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    print(f"{args.run}: {args.bucket} in eval.json {-groups[args.bucket]['gain']:+.1%}, recomputed "
          f"{change(z[on], z[off], z['doc'], docs):+.1%}; dropped documents alone "
          f"{change(z[on], z[off], z['doc'], args.drop):+.1%}; without them "
          f"{change(z[on], z[off], z['doc'], kept):+.1%} [{lo:+.1%}, {hi:+.1%}] ({len(kept)} documents)")


if __name__ == "__main__":
    main()
