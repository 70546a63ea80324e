#!/usr/bin/env python3
"""Print (and optionally write as Markdown) one table comparing `retrolm eval` runs of the same held-out documents
under different settings (e.g. exclusion protocols), per group (``group_by``) with 95% intervals over documents.

    .venv/bin/python scripts/compare_evals.py "previous version allowed=runs/x/eval-prev" "strict=runs/x/eval-strict" \
        [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrolm.eval.report import change as pct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=EVAL_DIR")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        label, folder = spec.split("=", 1)
        runs.append((label, json.loads((Path(folder) / "eval.json").read_text())))
    first = runs[0][1]
    on = next(k for k in first["summary"] if k in ("in_context", "retro"))
    off = "no_retrieval" if on == "in_context" else "retro_no_retrieval"
    header = ["documents", "chunks", "LM alone (bits/byte)"]
    for label, _ in runs:
        header += [f"with retrieval: {label}", "change [95% CI]", "novel chunks"]
    rows = []
    groups = [*first.get("groups", {}), "all"]
    for g in groups:
        base = first["groups"][g] if g != "all" else None
        docs = base["docs"] if base else first["exclusion"]["eval_docs"]
        chunks = base["chunks"] if base else first["exclusion"]["eval_chunks"]
        off_bpb = (base["summary"] if base else first["summary"])[off]["bpb"]
        row = [g, str(docs), str(chunks), f"{off_bpb:.3f}"]
        for _, r in runs:
            src = r["groups"][g] if g != "all" else r
            lo, hi = src["gain_ci95"] if g != "all" else src["gain_ci95"]["all"]
            gain = src["gain"] if g != "all" else src["gain"]["all"]
            novel = src["novel_fraction"] if g != "all" else r["novel"]["fraction"]
            row += [f"{src['summary'][on]['bpb']:.3f}", f"{pct(gain)} [{pct(hi)}, {pct(lo)}]", f"{novel:.0%}"]
        rows.append(row)
    header = ["group", *header]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for line in [header, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)))
    if args.markdown:
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        args.markdown.write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
