"""A sharded database against one database of the same corpus: build time, result agreement and search latency.

The corpus is built once whole and once as ``--shards`` parts (``db build --shard I/N``), both BM25-only with
SmolLM2's tokenizer (the main job's settings). Queries are the first ``--query-words`` words of chunks drawn with
``--seed`` from the whole database. Reported:

* build seconds of the whole database and of each part (parts built one after another here; on N machines the
  build takes as long as the slowest part);
* BM25 agreement: top-1 agreement and overlap@10 (share of the whole database's top-10 chunks, by document and
  position, in the merged top-10) and the share of queries with the same ten scores, with BM25 statistics summed
  over the parts (the default, ``global_stats``: Elasticsearch's ``dfs_query_then_fetch``) and with each part's own
  (``query_then_fetch``). With summed statistics every part scores as the whole database: only ties may order apart;
* latency p50 / p95 of one query at a time: the whole database, the parts searched in this process (a thread each)
  and the parts each behind its own ``retrolm serve`` (uvicorn on local ports, in threads of this process: on one
  2-core machine they share its cores, so this is the cost of the protocol, not of N machines);
* with ``--dense-docs M``: the same for dense search (MiniLM, exact index) over the first M documents, where the
  merged top-10 must equal the whole database's.

    python benchmarks/bench_sharded.py --corpus data/full/linux-docs-6.1.jsonl --out runs/bench-sharded --shards 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import uvicorn
import yaml

from retrolm.db import BuildConfig, Database, DatabaseView
from retrolm.retrieval import get_retriever
from retrolm.retrieval.sharded import ShardedRetriever
from retrolm.serve import ServeConfig, Service
from retrolm.serve.app import create_app
from retrolm.text.corpus import iter_documents


def build(corpus: Path, out: Path, cfg: BuildConfig) -> float:
    """Seconds to build ``out`` (0 when it was already built with this config)."""
    if (out / "meta.json").is_file():
        return 0.0
    t = time.perf_counter()
    Database.build([corpus], out, cfg, show_progress=False)
    return time.perf_counter() - t


def serve(db: Path) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Service(ServeConfig(db=str(db)))), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def latency(search, queries: list[str]) -> dict:
    """p50 / p95 ms of one query at a time (one warm-up first)."""
    search(queries[0])
    ms = []
    for q in queries:
        t = time.perf_counter()
        search(q)
        ms.append(1000 * (time.perf_counter() - t))
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def agreement(whole: list[list], parts: list[list]) -> dict:
    """Top-1 agreement and overlap@k of (doc_id, position, score) lists, and the share of queries whose k scores are
    the same (to 1e-5): a tie may put another chunk of the same score at the edge of the top-k."""
    # queries that match nothing (a line of table rules: no BM25 term) are left out: nothing to agree on
    pairs = [(w, p) for w, p in zip(whole, parts, strict=True) if w or p]
    top1 = np.mean([bool(w) and bool(p) and w[0][:2] == p[0][:2] for w, p in pairs])
    overlap = np.mean([len({x[:2] for x in w} & {x[:2] for x in p}) / max(1, len(w)) for w, p in pairs])
    same = np.mean([len(w) == len(p) and np.allclose([x[2] for x in w], [x[2] for x in p], rtol=1e-5)
                    for w, p in pairs])
    return {"queries_with_results": len(pairs), "top1_agreement": round(float(top1), 4),
            "overlap_at_k": round(float(overlap), 4), "same_scores": round(float(same), 4)}


def compare(name: str, whole_db: Path, parts: list[Path], kind: str, queries: list[str], k: int, work: Path,
            **settings) -> dict:
    whole = get_retriever(DatabaseView.open(whole_db), kind)
    file = work / f"{name}-shards.yaml"
    file.write_text(yaml.safe_dump({"shards": [str(p.resolve()) for p in parts], "retriever": kind, **settings}))
    local = ShardedRetriever.open(file)
    key = [[(h.doc_id, h.position, h.score) for h in whole.search([q], k).hits(0)] for q in queries]
    got = [[(h.doc_id, h.position, h.score) for h in local.search(q, k).hits(0)] for q in queries]
    out = {"kind": kind, "chunks": local.num_chunks, **agreement(key, got),
           "latency_whole": latency(lambda q: whole.search([q], k).hits(0), queries),
           "latency_parts_in_process": latency(lambda q: local.search(q, k), queries)}
    served = [serve(p) for p in parts]
    try:
        remote_file = work / f"{name}-remote.yaml"
        remote_file.write_text(yaml.safe_dump({"shards": [u for u, _ in served], "retriever": kind, **settings}))
        remote = ShardedRetriever.open(remote_file)
        same = all([(h.doc_id, h.position) for h in remote.search(q, k).hits(0)] == [x[:2] for x in g]
                   for q, g in zip(queries, got, strict=True))
        out["remote_same_as_in_process"] = same
        out["latency_parts_over_http"] = latency(lambda q: remote.search(q, k), queries)
        remote.close()
    finally:
        for _, s in served:
            s.should_exit = True
    local.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--query-words", type=int, default=12)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--tokenizer", default="smollm2-135m")
    ap.add_argument("--dense-docs", type=int, default=0, help="Also compare dense search over the first M documents.")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    n = a.shards
    result: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
                    "date": time.strftime("%Y-%m-%d %H:%M"), "corpus": str(a.corpus), "shards": n}

    bm25 = dict(tokenizer=a.tokenizer, index="none", bm25=True)
    whole_s = build(a.corpus, a.out / "whole", BuildConfig(**bm25))
    part_s = [build(a.corpus, a.out / f"part-{i}", BuildConfig(**bm25, shard=f"{i}/{n}")) for i in range(n)]
    parts = [a.out / f"part-{i}" for i in range(n)]
    result["build_s"] = {"whole": round(whole_s, 1), "parts": [round(s, 1) for s in part_s]}
    db = DatabaseView.open(a.out / "whole")
    rng = np.random.default_rng(a.seed)
    ids = rng.choice(db.store.n_chunks, size=min(a.queries, db.store.n_chunks), replace=False)
    queries = [" ".join(t.split()[: a.query_words]) for t in db.chunk_texts(np.sort(ids))]
    queries = [q for q in queries if q.strip()]
    result["queries"] = len(queries)
    result["bm25"] = compare("bm25", a.out / "whole", parts, "bm25", queries, a.k, a.out)
    result["bm25"]["chunks_per_part"] = [DatabaseView.open(p).store.n_chunks for p in parts]
    result["bm25_own_statistics"] = compare("bm25-own", a.out / "whole", parts, "bm25", queries, a.k, a.out,
                                            global_stats=False)

    if a.dense_docs:
        subset = a.out / "dense-corpus.jsonl"
        with open(subset, "w", encoding="utf-8") as f:
            for d in itertools.islice(iter_documents([a.corpus], warn=False), a.dense_docs):
                f.write(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n")
        dense = dict(tokenizer=a.tokenizer, encoder=a.encoder, index="flat")
        whole_s = build(subset, a.out / "dense-whole", BuildConfig(**dense))
        part_s = [build(subset, a.out / f"dense-part-{i}", BuildConfig(**dense, shard=f"{i}/{n}")) for i in range(n)]
        dense_parts = [a.out / f"dense-part-{i}" for i in range(n)]
        dq = [" ".join(t.split()[: a.query_words]) for t in DatabaseView.open(a.out / "dense-whole").chunk_texts(
            np.sort(rng.choice(DatabaseView.open(a.out / "dense-whole").store.n_chunks, size=len(queries) // 2,
                               replace=False)))]
        result["dense"] = compare("dense", a.out / "dense-whole", dense_parts, "dense", [q for q in dq if q.strip()],
                                  a.k, a.out)
        result["dense"]["build_s"] = {"whole": round(whole_s, 1), "parts": [round(s, 1) for s in part_s]}
    (a.out / "bench_sharded.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
