#!/usr/bin/env python3
"""Database build throughput, split into tokenize / embed / index / write, against the bare encoder.

    .venv/bin/python benchmarks/bench_build.py --docs 1200                 # bundled sample, CPU
    python benchmarks/bench_build.py --corpus data/full/linux-docs.jsonl --device cuda --batch-size 4096

"Bare encoder" = only the encoder forward passes over the same chunk texts, pre-tokenized, in padded batches of
texts of similar length, and again in the batches the build now runs: each shard's chunks cut at exact WordPiece counts
(``--padded-batches`` builds with padded batches sorted by WordPiece count, as before 2026-12-04). Target: build
chunks/s >= 0.9 x bare encoder chunks/s on a CPU, >= 0.8x on a GPU (issue 12).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retrolm.db import BuildConfig, Database
from retrolm.text.encoder import SentenceEncoder

REPO = Path(__file__).resolve().parents[1]


def forward_seconds(encoder: SentenceEncoder, batches: list[dict]) -> float:
    """Wall time of the encoder's forward passes over ``batches`` (after one warm-up pass), device work included."""
    encoder.embed_features(batches[0])  # warm-up
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches:
        encoder.embed_features(b)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bare_encoder_rate(encoder: SentenceEncoder, texts: list[str], batch_size: int) -> tuple[float, float, float]:
    """(bare encoder chunks/s, padded encoder tokens per chunk, single-thread tokenization chunks/s)."""
    t = time.perf_counter()
    batches = encoder.prepare(texts, batch_size).batches
    prep_rate = len(texts) / (time.perf_counter() - t)
    tokens = sum(b["attention_mask"].numel() for b in batches)
    return len(texts) / forward_seconds(encoder, batches), tokens / len(texts), prep_rate


def exact_batches_rate(encoder: SentenceEncoder, texts: list[str], batch_size: int, window: int
                       ) -> tuple[float, float]:
    """(bare encoder chunks/s, share of chunks in unpadded batches) on the batches the build runs by default: the
    WordPieces of each ``window`` chunks (the shards sorted together) cut into batches of one count (``prepare_ids``),
    padded only for the leftovers."""
    pieces, _ = encoder.token_ids(texts)
    batches = []
    for s in range(0, len(pieces), window):
        part = pieces[s : s + window]
        batches += encoder.prepare_ids(np.concatenate(part), np.array([len(p) for p in part]), batch_size).batches
    unpadded = sum(len(b["input_ids"]) for b in batches if "attention_mask" not in b) / max(1, len(texts))
    return len(texts) / forward_seconds(encoder, batches), unpadded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "wiki-sample.jsonl")
    ap.add_argument("--docs", type=int, default=None, help="use only the first N documents")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the build's (128 CPU, 1024 GPU)")
    ap.add_argument("--encoder", default=None, help="encoder name or folder (default: the build's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--index", default="auto")
    ap.add_argument("--tokenize-workers", type=int, default=None,
                    help="pre-tokenization processes (default: the build's: one thread)")
    ap.add_argument("--padded-batches", action="store_true",
                    help="build with padded batches of similar length (exact_length_batches=false), as before")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    corpus = args.corpus
    if args.docs:
        corpus = work / "corpus.jsonl"
        with open(args.corpus, encoding="utf-8") as f, open(corpus, "w", encoding="utf-8") as g:
            for i, line in enumerate(f):
                if i >= args.docs:
                    break
                g.write(line)
    extra = {"encoder": args.encoder} if args.encoder else {}
    cfg = BuildConfig(tokenizer="train:32000", batch_size=args.batch_size, device=args.device, index=args.index,
                      tokenize_workers=args.tokenize_workers, exact_length_batches=not args.padded_batches, **extra)
    t = time.perf_counter()
    db = Database.build([corpus], work / "db", cfg, show_progress=False)
    total = time.perf_counter() - t
    stats = {k: v for k, v in db.meta["build_stats"].items() if k.endswith("_s")}
    wordpieces = db.meta["build_stats"].get("encoder_tokens", {})
    n = db.store.n_chunks
    texts = db.chunk_texts(np.arange(n))
    batch_size = cfg.encoder_batch_size(db.encoder.device.type)
    bare, padded_len, prep_rate = bare_encoder_rate(db.encoder, texts, batch_size)
    window = cfg.shard_size * cfg.shards_sorted_together(db.encoder.device.type)
    exact, unpadded = exact_batches_rate(db.encoder, texts, batch_size, window)
    other = total - sum(stats.values())  # tokenizer training, model loading, meta/rename
    rows = {
        "chunks": n,
        "device": str(db.encoder.device),
        "batch_size": batch_size,
        "tokenize_s": stats["tokenize_s"],
        "embed_s": stats["embed_s"],
        "index_s": stats["index_s"],
        "other_s (tokenizer training, model load, write)": round(other, 2),
        "total_s": round(total, 2),
        "build chunks/s (embed+index+tokenize)": round(n / sum(stats.values()), 1),
        "build chunks/s (end to end)": round(n / total, 1),
        "encoder batches": "padded" if args.padded_batches else "exact length",
        "bare encoder chunks/s": round(bare, 1),
        "bare encoder chunks/s, exact-length batches": round(exact, 1),
        "chunks in unpadded batches (exact-length)": f"{unpadded:.0%}",
        "encoder tokens per chunk (padded)": round(padded_len, 1),
        "encoder tokens per chunk (mean / p50 / p95 / max)": "/".join(str(wordpieces.get(k)) for k in
                                                                       ("mean", "p50", "p95", "max")),
        "chunk texts cut at the encoder's max_length": f"{wordpieces.get('truncated')} "
                                                       f"(max_length {wordpieces.get('max_length')})",
        "pre-tokenization processes": cfg.pretokenize_processes(db.encoder.device.type),
        "encoder attention": getattr(db.encoder.model.config, "_attn_implementation", "?"),
        "tokenize for the encoder, one thread, chunks/s": round(prep_rate, 1),
        # against the bare encoder on the batches the build ran (padded ones: the padded loop over text batches)
        "ratio build/bare (stages)": round(n / sum(stats.values()) / (bare if args.padded_batches else exact), 3),
    }
    width = max(map(len, rows))
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
