"""Latency of ``retrolm serve`` over real HTTP: the service runs in uvicorn on a local port (a background thread) and
a client sends requests one after another, as the page does.

Queries are the first ``--query-words`` words of chunks drawn with ``--seed`` from the database itself (so searches
have something to find); questions for ``/api/answer`` are the same texts with a question mark; prompts for
``/api/generate`` are the same texts. Reported per endpoint: requests, p50 / p95 / max latency in ms (the first request
of each endpoint is a warm-up, not counted), and for search the retriever.

    python benchmarks/bench_serve.py --db runs/quickstart/db --reader smollm2-135m --n 50 --answers 10 --generations 5
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from retrolm.serve import ServeConfig, Service
from retrolm.serve.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(client: httpx.Client, n: int, request) -> list[float]:
    """Milliseconds of ``n`` requests after one warm-up (``request(i)`` sends the i-th and returns the response)."""
    request(0).raise_for_status()
    out = []
    for i in range(1, n + 1):
        t = time.perf_counter()
        request(i).raise_for_status()
        out.append(1000 * (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--reader", default=None, help="LM for /api/answer and /api/generate (omit: search only)")
    ap.add_argument("--retrievers", default="auto", help="comma-separated: auto, dense, bm25, hybrid")
    ap.add_argument("--n", type=int, default=50, help="searches per retriever")
    ap.add_argument("--answers", type=int, default=10)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per generation")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--query-words", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    service = Service(ServeConfig(db=args.db, reader=args.reader))
    load_s = time.perf_counter() - t0
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    store = service.db.store
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(store.n_chunks, size=max(args.n, args.answers, args.generations) + 1, replace=False)
    texts = [" ".join(t.split()[: args.query_words]) or "the" for t in service.db.chunk_texts(np.sort(picks))]
    rows = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        for kind in args.retrievers.split(","):
            ret = None if kind == "auto" else kind
            ms = timed(client, args.n, lambda i, ret=ret: client.get("/api/search", params={
                "q": texts[i], "k": args.k, **({"retriever": ret} if ret else {})}))
            rows.append({"endpoint": "/api/search", "setting": f"{service._retriever(ret).name}, k={args.k}", "ms": ms})
        if args.reader:
            ms = timed(client, args.answers, lambda i: client.post("/api/answer", json={"question": texts[i] + "?"}))
            rows.append({"endpoint": "/api/answer", "setting": f"top_n={service.cfg.rag.top_n}, "
                         f"passages={service.cfg.rag.passages}", "ms": ms})
            ms = timed(client, args.generations, lambda i: client.post("/api/generate", json={
                "prompt": texts[i], "max_new_tokens": args.new_tokens}))
            rows.append({"endpoint": "/api/generate", "setting": f"{args.new_tokens} tokens, in context", "ms": ms})
    server.should_exit = True

    import torch

    print(f"{platform.node()} ({platform.machine()}, {torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}; "
          f"{args.db}: {store.n_chunks:,} chunks; reader {args.reader}; service loaded in {load_s:.1f} s")
    print("| endpoint | setting | requests | p50 ms | p95 ms | max ms |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        ms = np.asarray(r["ms"])
        r.update(p50=float(np.percentile(ms, 50)), p95=float(np.percentile(ms, 95)), max=float(ms.max()), n=len(ms))
        print(f"| {r['endpoint']} | {r['setting']} | {r['n']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['max']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"db": args.db, "reader": args.reader, "load_s": load_s,
                                         "rows": [{k: v for k, v in r.items() if k != "ms"} for r in rows]}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
