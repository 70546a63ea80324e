#!/usr/bin/env python3
"""How long a 64-token chunk is for the encoder, per corpus, and how fast the pre-tokenization stage runs.

    .venv/bin/python benchmarks/bench_wordpieces.py [--docs 2000] [--tokenizer smollm2-135m] CORPUS.jsonl ...

For each corpus: the first ``--docs`` documents cut into 64-token chunks of the LM tokenizer, decoded to text and
tokenized by the encoder's tokenizer (all-MiniLM-L6-v2's WordPiece by default) exactly as the database build's
pre-tokenization stage does (:func:`retrolm.db.build.pretokenize_shard`, one process): WordPieces per chunk (mean,
p50, p95, max), the share cut at 128 and at the build's cap of 256, chunks/s of the stage on one core, and the padded
length of encoder batches (1024 chunks, within shards of 8192) when a shard is sorted by characters (before the
stage existed) or by WordPieces (2026-12-01), and with the GPU build's exact-length batches (8 shards sorted together,
batches of one WordPiece count down to 128 rows; 2026-12-04) with the share of chunks they run unpadded: what the
encoder actually computes on.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from retrolm.core.hub import resolve_model
from retrolm.db.build import encoder_token_stats, pretokenize_shard, tokenize_corpus
from retrolm.text.encoder import DEFAULT_ENCODER, EncoderTokenizer, length_batches
from retrolm.text.tokenizer import resolve_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="+", type=Path)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--tokenizer", default="smollm2-135m", help="LM tokenizer of the chunks")
    ap.add_argument("--encoder", default=DEFAULT_ENCODER)
    ap.add_argument("--max-length", type=int, default=256, help="the build's encoder_max_length")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core: the rate of one worker process
    lm = resolve_tokenizer(args.tokenizer, None)
    wordpiece = EncoderTokenizer(str(resolve_model(args.encoder, what="encoder").path), args.max_length)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; LM tokenizer {args.tokenizer}, "
          f"encoder {args.encoder}, max_length {wordpiece.max_length}")
    print("| corpus | chunks | WordPieces mean / p50 / p95 / max | > 128 | cut at 256 "
          "| pre-tokenize chunks/s (1 core) | padded per chunk, sorted by characters / by WordPieces / exact-length "
          "| unpadded chunks (exact-length) |")
    print("|---|---:|---|---:|---:|---:|---|---:|")
    for path in args.corpus:
        with tempfile.TemporaryDirectory() as tmp:
            store = tokenize_corpus([path], lm, 64, Path(tmp) / "seg", max_docs=args.docs)
            out = Path(tmp) / "ids"
            out.mkdir()
            t = time.perf_counter()
            pretokenize_shard(store, lm, wordpiece, store.first_chunk, store.first_chunk + store.n_chunks, out, "all")
            rate = store.n_chunks / (time.perf_counter() - t)
            stats = encoder_token_stats(out, wordpiece.max_length)
            lengths = np.load(out / "all.lengths.npy")[:, 0]
            chars = np.array([len(t) for t in store.texts(np.arange(store.n_chunks) + store.first_chunk, lm)])
            exact = exact_batches(lengths)
        print(f"| {path.name} | {stats['chunks']:,} | {stats['mean']} / {stats['p50']} / {stats['p95']} / "
              f"{stats['max']} | {(lengths > 128).mean():.1%} | {stats['truncated']} | {rate:,.0f} | "
              f"{padded(lengths, -chars):.1f} / {padded(lengths, -lengths):.1f} / {exact[0]:.1f} | {exact[1]:.0%} |")


def padded(lengths: np.ndarray, key: np.ndarray, batch: int = 1024, shard: int = 8192) -> float:
    """Mean padded length per chunk when each shard is sorted by ``key`` and cut into batches."""
    total = 0
    for s in range(0, len(lengths), shard):
        ordered = lengths[s : s + shard][np.argsort(key[s : s + shard], kind="stable")]
        total += sum(ordered[b : b + batch].max() * len(ordered[b : b + batch]) for b in range(0, len(ordered), batch))
    return total / len(lengths)


def exact_batches(lengths: np.ndarray, batch: int = 1024, window: int = 8 * 8192) -> tuple[float, float]:
    """(mean padded length per chunk, share of chunks in unpadded batches) with the GPU build's default batching:
    ``window`` chunks sorted together and cut by :func:`length_batches`."""
    total = unpadded = 0
    for s in range(0, len(lengths), window):
        part = lengths[s : s + window]
        for rows in length_batches(part, batch)[1]:
            total += part[rows].max() * len(rows)
            unpadded += len(rows) if part[rows].min() == part[rows].max() else 0
    return total / len(lengths), unpadded / len(lengths)


if __name__ == "__main__":
    main()
