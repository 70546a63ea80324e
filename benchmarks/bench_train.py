#!/usr/bin/env python3
"""Training-step throughput, MFU and peak memory of RETRO against the same-size baseline decoder; generation speed.

    # the issue's shape on a GPU: d=768, 12 layers, 12 heads, vocab 32k, T=2048, chunk 64, k=2 neighbours of 128
    # tokens, 2-layer encoder, CCA at [6, 9, 12], batch 8, bf16 autocast
    python benchmarks/bench_train.py --shape paper --compile both --out benchmarks/RESULTS.md
    # a CPU-sized shape (the default without CUDA)
    python benchmarks/bench_train.py --shape cpu --db runs/quickstart/db

Throughput counts decoder tokens (B x T per step) over timed steps after warm-up; one step = forward, backward and
a fused AdamW update on random tokens and random neighbours (speed does not depend on the values). FLOPs per step are
counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real step (matmuls and attention, forward + backward),
so the encoder's and the CCA's work are included for RETRO; MFU = achieved FLOP/s over the device's dense bf16 peak
(``--peak-tflops`` overrides; on a CPU the peak is a measured fp32 matmul rate). Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU and the process's peak RSS on a CPU.

Generation speed (``--db``): tokens/s of greedy sampling with the KV cache, with retrieval (one query embedding and
one FAISS search per completed chunk) and without, for a model of the same shape over that database's vocabulary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from retrolm.core.device import peak_memory_gib
from retrolm.models.retro import RetroConfig, RetroModel

SHAPES = {
    # the issue's benchmark shape (and the paper's 12-layer layout)
    "paper": dict(vocab_size=32000, seq_len=2048, n_layer=12, n_head=12, d_model=768, chunk_len=64,
                  num_neighbours=2, retro_layers=(6, 9, 12), enc_n_layer=2, batch=8),
    # small enough for a 2-core CPU to time a few steps
    "cpu": dict(vocab_size=8192, seq_len=512, n_layer=6, n_head=4, d_model=256, chunk_len=64,
                num_neighbours=2, retro_layers=(3, 6), enc_n_layer=2, batch=2),
}

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> tuple[float, str]:
    if override:
        return override, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value, f"{key} dense bf16"
        return float("nan"), "unknown GPU"
    # CPU: what a large fp32 matmul achieves here is the practical ceiling
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e12, "measured fp32 matmul"


def make_batch(cfg: RetroConfig, batch: int, device: torch.device, retro: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g)
    out = {"idx": idx[:, :-1].to(device), "targets": idx[:, 1:].to(device)}
    if retro:
        c = cfg.seq_len // cfg.chunk_len
        nb = torch.randint(0, cfg.vocab_size, (batch, c, cfg.num_neighbours, cfg.neighbour_len), generator=g)
        out["neighbours"] = nb.to(device)
    return out


def time_training(cfg: RetroConfig, batch: int, device: torch.device, compile_model: bool, steps: int,
                  warmup: int) -> dict:
    torch.manual_seed(0)
    model = RetroModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_model else model
    data = make_batch(cfg, batch, device, bool(cfg.retro_layers))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)

    def step() -> float:
        with amp:
            loss = fwd(data["idx"], data.get("neighbours"), targets=data["targets"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    with FlopCounterMode(display=False) as counter:
        with amp:
            loss = model(data["idx"], data.get("neighbours"), targets=data["targets"]).loss
        loss.backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    mem = peak_memory_gib(device) * 2**30
    return {
        "params_M": model.num_params() / 1e6,
        "step_s": median,
        "tokens_per_s": batch * cfg.seq_len / median,
        "flops_per_step": flops,
        "tflops": flops / median / 1e12,
        "peak_mem_GiB": mem / 2**30,
    }


def time_generation(shape: dict, db_path: Path, device: torch.device, n_tokens: int) -> list[dict]:
    from retrolm.db import Database
    from retrolm.infer import generate
    from retrolm.retrieval import DenseRetriever

    db = Database.open(db_path, device=str(device))
    kw = {k: v for k, v in shape.items() if k != "batch"}
    cfg = RetroConfig(**{**kw, "vocab_size": db.tokenizer.vocab_size, "chunk_len": db.chunk_len})
    torch.manual_seed(0)
    model = RetroModel(cfg).to(device).eval()
    prompt = db.chunk_texts([0])[0]
    rows = []
    for retrieval in (True, False):
        retriever = DenseRetriever(db) if retrieval else None
        generate(model, db.tokenizer, prompt, retriever, max_new_tokens=2 * db.chunk_len, stop_at_eos=False)  # warm-up
        g = generate(model, db.tokenizer, prompt, retriever, max_new_tokens=n_tokens, stop_at_eos=False)
        rows.append({"retrieval": retrieval, "new_tokens": g.new_tokens, "tokens_per_s": g.tokens_per_s})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: paper on CUDA, cpu otherwise")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--enc-d-model", type=int, default=None, help="neighbour encoder width (default: d_model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--compile", choices=("no", "yes", "both"), default="no")
    ap.add_argument("--checkpoint-activations", default="none",
                    help="comma-separated modes to time: none, encoder (recompute the neighbour encoder in the "
                         "backward pass), all (also the decoder blocks); the baseline has no encoder to recompute")
    ap.add_argument("--models", default="retro,baseline",
                    help="which to time: retro, baseline, both comma-separated, or 'none' (generation only)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--db", type=Path, default=None, help="database for the generation benchmark")
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="append a markdown section to this file")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    shape = dict(SHAPES[args.shape or ("paper" if device.type == "cuda" else "cpu")])
    if args.seq_len:
        shape["seq_len"] = args.seq_len
    if args.enc_d_model:  # a narrower encoder: heads of 64 like the decoder's
        shape.update(enc_d_model=args.enc_d_model, enc_n_head=max(1, args.enc_d_model // 64))
    batch = args.batch or shape.pop("batch")
    shape.pop("batch", None)
    gpu = device.type == "cuda"
    steps, warmup = args.steps or (20 if gpu else 3), args.warmup or (5 if gpu else 1)
    peak, peak_src = peak_tflops(device, args.peak_tflops)

    results = []
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    wanted = {m.strip().lower() for m in args.models.split(",")}
    modes = [m.strip() for m in args.checkpoint_activations.split(",") if m.strip()]
    for name, layers in (("RETRO", shape["retro_layers"]), ("baseline", ())):
        if name.lower() not in wanted:
            continue
        for mode in modes if layers else [m for m in modes if m != "encoder"]:
            for comp in compiles:
                cfg = RetroConfig(**{**shape, "retro_layers": layers, "checkpoint_activations": mode})
                r = time_training(cfg, batch, device, comp, steps, warmup)
                r.update(model=name, compiled=comp, checkpoint=mode, mfu=r["tflops"] / peak)
                results.append(r)
                print(json.dumps(r))
    gen = time_generation({**shape, "batch": batch}, args.db, device, args.gen_tokens) if args.db else []

    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    where = f"{platform.node()}: " + (torch.cuda.get_device_name(device) if gpu else cpu)
    title = (f"bench_train {dt.date.today()} on {where}, torch {torch.__version__}; d={shape['d_model']}, "
             f"L={shape['n_layer']}, T={shape['seq_len']}, B={batch}, CCA at {list(shape['retro_layers'])}, "
             f"encoder width {shape.get('enc_d_model', shape['d_model'])}, "
             f"k={shape['num_neighbours']}, peak {peak:.1f} TFLOP/s ({peak_src})")
    table = Table(title=title)
    for col in ("model", "compiled", "recompute", "params (M)", "tokens/s", "step (s)", "TFLOP/step", "TFLOP/s", "MFU",
                "peak mem (GiB)"):
        table.add_column(col, justify="right")
    rows = []
    for r in results:
        row = [r["model"], "yes" if r["compiled"] else "no", r["checkpoint"], f"{r['params_M']:.1f}",
               f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.3f}", f"{r['flops_per_step'] / 1e12:.2f}",
               f"{r['tflops']:.2f}", f"{r['mfu']:.1%}",
               f"{r['peak_mem_GiB']:.2f}"]
        rows.append(row)
        table.add_row(*row)
    console = Console(width=160)
    console.print(table)
    for g in gen:
        console.print(f"generation, retrieval {'on ' if g['retrieval'] else 'off'}: {g['tokens_per_s']:.1f} tokens/s "
                      f"({g['new_tokens']} tokens, batch 1, greedy, KV cache)")
    if args.json:
        args.json.write_text(json.dumps({"title": title, "train": results, "generate": gen}, indent=2))
    if args.out:
        cmd = "python benchmarks/bench_train.py " + " ".join(argv or __import__("sys").argv[1:])
        lines = [f"\n### {title}\n", f"`{cmd}`\n"]
        if rows:
            lines += ["| model | compiled | recompute | params (M) | tokens/s | step (s) | TFLOP/step | TFLOP/s | MFU "
                      "| peak mem (GiB) |", "|" + "---|" * 10, *("| " + " | ".join(r) + " |" for r in rows)]
        lines += [f"\nGeneration ({g['new_tokens']} tokens, batch 1, greedy): retrieval "
                  f"{'on' if g['retrieval'] else 'off'} {g['tokens_per_s']:.1f} tokens/s" for g in gen]
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
