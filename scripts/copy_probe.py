#!/usr/bin/env python3
"""Does a model copy from its context? Its loss on the second copy of a repeated passage against the first.

A model with induction heads (Olsson et al. 2022) predicts a passage it has just seen far better the second time;
one without them gains nothing. RETRO-fitting with ``encoder=base`` starts from the base's own way of reading its
context, so it can only start from reading if the base copies; this measures it.

    .venv/bin/python scripts/copy_probe.py --db runs/evidence-retro/cpu/db \\
        runs/evidence-retro/cpu/baseline-medium-1000/checkpoints/step-000500 --out docs/results/copy-probe/tiny.json

Each model reads ``--spans`` passages of ``--len`` tokens (whole stored chunks of the database, which must hold the
model's token ids) followed by the same passage again; reported: mean loss (nats per token) on the first copy (after
its first token) and on the second, and the relative drop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retrolm.core.io import write_json
from retrolm.db.view import DatabaseView
from retrolm.models.loading import load_model


def probe(ref: str, db: DatabaseView, spans: int, length: int, seed: int, batch: int = 8) -> dict:
    """Mean loss on the first and on the second copy of ``spans`` repeated passages of ``length`` tokens."""
    loaded = load_model(ref)
    model = loaded.model
    per_chunk = db.chunk_len
    n = -(-length // per_chunk)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, db.store.n_chunks - n, spans)
    first, second = [], []
    with torch.no_grad():
        for b in range(0, spans, batch):
            ids = np.stack([db.store.tokens(np.arange(s, s + n)).reshape(-1)[:length] for s in starts[b : b + batch]])
            x = torch.from_numpy(ids.astype(np.int64))
            seq = torch.cat([x, x], 1)
            out = model(seq[:, :-1])
            logits = out if isinstance(out, torch.Tensor) else out.logits
            nll = F.cross_entropy(logits.transpose(1, 2).float(), seq[:, 1:], reduction="none")
            first.append(nll[:, : length - 1])  # predicting tokens 1 … L−1 of the first copy
            second.append(nll[:, length:])  # predicting tokens 1 … L−1 of the second copy
    a, b = float(torch.cat(first).mean()), float(torch.cat(second).mean())
    return {"model": loaded.name, "kind": loaded.kind, "first_copy_nats": a, "second_copy_nats": b,
            "drop": 1 - b / a, "spans": spans, "length": length, "seed": seed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="retrolm checkpoints or Hugging Face models (their tokenizer = the db's)")
    ap.add_argument("--db", required=True, help="database whose stored chunks give the passages")
    ap.add_argument("--spans", type=int, default=128)
    ap.add_argument("--len", dest="length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    db = DatabaseView.open(args.db)
    rows = [probe(m, db, args.spans, args.length, args.seed) for m in args.models]
    for r in rows:
        print(f"{r['model']}: first copy {r['first_copy_nats']:.3f} nats/token, second {r['second_copy_nats']:.3f} "
              f"({-r['drop']:+.1%})")
    if args.out:
        write_json(args.out, {"db": str(args.db), "command": " ".join(sys.argv), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
