"""BM25 search when many chunks tie at the k-th place: the cost of ordering ties lower chunk id first.

    .venv/bin/python benchmarks/bench_bm25_ties.py [--chunks 200000] [--queries 64] [-k 10]

A store whose every chunk holds the word "common" (each also a word of its own): the query "common" ties every chunk,
"common alpha5" ties all but one. Prints the wall time and the first ids per query. Run it under the source of
another commit (``PYTHONPATH=OTHER/src``) to compare.
"""

from __future__ import annotations

import argparse
import time

from retrolm.db.lexical import LexicalIndex


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args()
    texts = [f"common alpha{i} beta{i}" for i in range(args.chunks)]
    index = LexicalIndex.build(lambda ids: [texts[i] for i in ids], args.chunks)
    for query in ("common", "common alpha5"):
        t = time.perf_counter()
        _, ids = index.search([query] * args.queries, args.k)
        took = time.perf_counter() - t
        print(f"{query!r} x {args.queries}, k={args.k}: {took:.2f} s, first ids {ids[0][:4].tolist()}")


if __name__ == "__main__":
    main()
