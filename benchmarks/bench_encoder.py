#!/usr/bin/env python3
"""The frozen encoder's own speed, apart from any build: forward passes on fixed-shape batches of random WordPiece ids
(every row the full length, so no padding, unless ``--pad`` asks for some), for a grid of lengths and batch sizes,
plus what a fresh process pays to import the build (the start-up cost of each pre-tokenization worker process).

    python benchmarks/bench_encoder.py --encoder ENCODER_DIR --lengths 64,128 --batches 256,1024,4096 --json out.json
    python benchmarks/bench_encoder.py --encoder ENCODER_DIR --lengths 80 --batches 1024 --pad 0,0.2   # mask cost

Speed does not depend on the ids' values. Each point: 3 warm-up batches, then as many batches as fit in ``--seconds``
(at least 5), synchronised, on the same ``SentenceEncoder`` the build uses (dtype fp16 on a GPU, mean pooling).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from retrolm.text.encoder import SentenceEncoder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_point(enc: SentenceEncoder, length: int, batch: int, seconds: float, pad: float = 0.0) -> dict:
    """``pad`` > 0: rows of random real lengths (uniform in [length·(1 − 2·pad), length]) padded to ``length``, so a
    share ``pad`` of the positions is padding and the attention needs a mask, as in the build's sorted batches."""
    vocab = int(enc.model.config.vocab_size)
    ids = torch.randint(1000, vocab, (batch, length))
    mask = torch.ones_like(ids)
    if pad > 0:
        real = torch.randint(max(1, round(length * (1 - 2 * pad))), length + 1, (batch,))
        mask = (torch.arange(length)[None, :] < real[:, None]).long()
        ids = ids * mask
    feats = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    gpu_feats = {k: v.to(enc.device) for k, v in feats.items()}
    for _ in range(3):
        enc.embed_features(gpu_feats, to_cpu=False)
    sync(enc.device)
    n, t = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t < seconds:
        enc.embed_features(gpu_feats, to_cpu=False)
        n += 1
        if n % 5 == 0:
            sync(enc.device)
    sync(enc.device)
    dt = time.perf_counter() - t
    # the build's path: host batches copied in, vectors copied out each batch
    m, t2 = 0, time.perf_counter()
    while m < 5 or time.perf_counter() - t2 < seconds / 2:
        enc.embed_features(feats, to_cpu=True)
        m += 1
    dt2 = time.perf_counter() - t2
    return {"length": length, "batch": batch, "pad": pad, "chunks_per_s": round(n * batch / dt, 1),
            "chunks_per_s_with_copies": round(m * batch / dt2, 1),
            "encoder_tokens_per_s": round(n * batch * length / dt, 1)}


def import_seconds(module: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return round(time.perf_counter() - t, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=None, help="encoder name or folder (default: the build's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--lengths", default="64,128")
    ap.add_argument("--batches", default="256,1024")
    ap.add_argument("--seconds", type=float, default=1.5, help="timed seconds per point")
    ap.add_argument("--pad", default="0", help="comma-separated shares of padded positions (0 = no mask needed)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    enc = SentenceEncoder(**({"name": args.encoder} if args.encoder else {}), device=args.device)
    where = torch.cuda.get_device_name() if enc.device.type == "cuda" else platform.machine()
    print(f"{platform.node()}: {where}, torch {torch.__version__}, dtype {enc.dtype}, "
          f"attention {getattr(enc.model.config, '_attn_implementation', '?')}")
    rows = []
    for length in map(int, args.lengths.split(",")):
        for batch in map(int, args.batches.split(",")):
            for pad in map(float, args.pad.split(",")):
                r = time_point(enc, length, batch, args.seconds, pad)
                rows.append(r)
                print(json.dumps(r))
    starts = {m: import_seconds(m) for m in ("torch", "retrolm.db.build")}
    print("fresh-process import seconds:", json.dumps(starts))
    if args.json:
        args.json.write_text(json.dumps({"device": where, "dtype": str(enc.dtype), "points": rows,
                                         "import_seconds": starts}, indent=2))


if __name__ == "__main__":
    main()
