#!/usr/bin/env python3
"""What sharding the training state (``distributed=fsdp``) saves per process, against DDP, side by side in one run.

    retrolm db build data/wiki-sample.jsonl --out runs/bench-fsdp/db --tokenizer train:8192 --index none --bm25 -q
    python benchmarks/bench_fsdp.py --db runs/bench-fsdp/db --preset 100m --procs 2 --steps 4
    # on N GPUs: the same with --procs N (each process takes one GPU)

Each mode is one real ``retrolm train`` under ``torchrun --nproc_per_node N`` (RETRO of the preset, BM25 training
neighbours, batch 1 per process). Reported, from rank 0's metrics.jsonl: the MB of weights, gradients and AdamW
moments that process holds after its last step (``train/state_mb``), tokens/s of the last logged step, the training
losses (the two modes take the same steps, so they must agree), rank 0's peak memory up to its last step
(``train/peak_memory_gib``: allocated on a GPU, the process's RSS on a CPU) and the largest process's peak RSS over
the whole run, which includes writing the last checkpoint (under fsdp rank 0 gathers the full weights and optimizer
state into host memory to write the single-process format).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

PEAK_RSS = ("import resource, subprocess, sys; "
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    """One training run under torchrun; its rank-0 metrics and the largest process's peak RSS."""
    run = out / mode
    shutil.rmtree(run, ignore_errors=True)  # its metrics.jsonl is this run's alone
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.procs), "-m", "retrolm.cli",
           "train", "-q", "--no-resume", f"db={args.db}", f"out_dir={run}", f"model.preset={args.preset}",
           f"model.seq_len={args.seq_len}", f"steps={args.steps}", "batch_size=1", "retriever=bm25",
           f"neighbours_dir={out / 'neighbours'}", "log_every=1", f"eval_every={args.steps}", "eval_batches=1",
           f"save_every={args.steps}", "tensorboard=false", "warmup_steps=1", f"distributed={mode}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    # through a wrapper process whose children are this run's alone: their ru_maxrss is the largest one's peak (KiB)
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"{mode}: torchrun failed\n{proc.stderr[-3000:]}")
    peak_rss = int(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    return {"mode": mode, "state_mb": train[-1]["train/state_mb"], "tokens_per_s": train[-1]["train/tokens_per_s"],
            "losses": [r["train/loss"] for r in train], "peak_memory_gib": train[-1].get("train/peak_memory_gib"),
            "run_peak_rss_gib": peak_rss / 2**20, "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True, help="a database with a BM25 index (see above)")
    ap.add_argument("--preset", default="100m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process on a CPU")
    ap.add_argument("--out", default="runs/bench-fsdp")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    out = Path(args.out)
    results = [run_mode(mode, args, out) for mode in ("fsdp", "ddp")]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    print(f"#### bench_fsdp {dt.date.today()} on {platform.node()}: {device}, torch {torch.__version__}; RETRO "
          f"{args.preset}, T={args.seq_len}, batch 1 x {args.procs} processes, {args.steps} steps\n")
    print("| mode | state per process (MB) | tokens/s | rank 0 peak in training (GiB) | largest process, whole run "
          "(GiB) | wall (s) | losses |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['state_mb']:,.0f} | {r['tokens_per_s']:,.0f} | {r['peak_memory_gib']:.2f} | "
              f"{r['run_peak_rss_gib']:.2f} | {r['wall_s']} | {', '.join(f'{x:.4f}' for x in r['losses'])} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
