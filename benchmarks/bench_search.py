"""Search benchmark for ``retrolm.index``: latency, recall against exact search, build time and bytes per chunk.

Data never exists in RAM all at once: the database is generated in deterministic blocks (block ``b`` is a pure
function of ``(seed, b)``), each block is added to every index under test and merged into the exact top-10 of
the queries (``faiss.knn`` per block + ``faiss.ResultHeap``), then dropped. So ``--n 10000000`` needs ~1 GB of
RAM beyond the indexes themselves (IVF-PQ: ~60 B per chunk; ``flat``/``hnsw`` keep the raw vectors: leave them
out of ``--kinds`` at 10M on a 24 GB machine).

Data sets (``--data``):

- ``clustered`` (default) resembles sentence embeddings: a Gaussian mixture of 4,096 centres in a 64-d latent
  space (within-cluster std 0.6 against unit-variance centres), mapped to 384-d by a random linear map with a
  decaying spectrum (column j scaled by j^-1/2, so ~75% of the variance lies in 32 directions and ~90% in
  128), plus isotropic noise (~17% of the energy), a shared mean direction (random pairs have cosine
  ~0.05 ± 0.2, like MiniLM), L2-normalised.
- ``random``: uniform on the unit sphere; no structure at all, the worst case for any quantiser.

Queries (``--nq``, default 1,000) are *perturbed* database vectors, never database members: for ``clustered``
the latent of a database vector moved by half the cluster spread and given fresh noise (a "paraphrase";
cosine ~0.84 to its source); for ``random`` the source plus Gaussian noise (cosine ~0.9). Sources are drawn
from the last block, so they are not in the IVF training sample.

Reported per index and search setting: recall of the index against exact search (10-recall@10 = |top-10 ∩
true top-10| / 10; 1-recall@10 = the true nearest neighbour is in the top 10), latency at batch 1 (p50/p99 per
query) and batch 64 (p50/p99 of the batch and p50 per query = batch / 64), training and add time, and the
saved index file size per chunk. Searches run on the index re-loaded from disk with mmap, as a server would.

    python benchmarks/bench_search.py --n 1000000 --kinds flat,ivfpq --out benchmarks/RESULTS_search.md

Refine stage (issue 12: 10-recall@10): ``--refine RFlat,Refine(SQfp16)`` adds each default IVF-PQ factory followed by
that refine stage, searched at every ``--nprobe`` × ``--k-factor``; "refine B" is the refine stage's own bytes per
chunk (included in B/chunk). Exact neighbour search on a torch device (RETRO's training-neighbour precompute):
``--torch-exact`` keeps the keys on ``--torch-device`` (fp16 on CUDA) while they are generated, then measures recall
of its top-10 against the FAISS ground truth, and the throughput of ``--torch-nq`` database vectors as queries against
all keys (with ``--exclude-frac`` of the keys masked), extrapolated to 1M queries. One command for a GPU session:

    python benchmarks/bench_search.py --n 10000000 --kinds ivfpq --refine "RFlat,Refine(SQfp16)" \\
        --nprobe 16,32,64 --k-factor 1,4,8,16 --torch-exact --torch-device cuda --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from retrolm.db.index import SearchSettings, VectorIndex, default_factory, set_num_threads
from retrolm.retrieval.exact import resolve_device, resolve_dtype, topk_inner_product

BLOCK = 100_000
K = 10

# ---------------------------------------------------------------------------------------------------------------
# Synthetic data


@dataclass
class DataSpec:
    """Everything that defines a synthetic database: blocks are pure functions of (spec, block number)."""

    kind: str
    n: int
    dim: int = 384
    seed: int = 0
    latent: int = 64
    n_centres: int = 4096
    spread: float = 0.6  # within-cluster std in latent space (centres have unit variance)
    noise: float = 0.45  # isotropic noise, relative to the latent signal's per-dimension scale
    offset: float = 0.25  # weight of the shared mean direction
    W: np.ndarray = field(init=False, repr=False)
    centres: np.ndarray = field(init=False, repr=False)
    mean: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0])
        w = rng.standard_normal((self.latent, self.dim), dtype=np.float32)
        w *= (np.arange(1, self.latent + 1, dtype=np.float32) ** -0.5)[:, None]  # decaying spectrum
        self.W = w / np.sqrt((w**2).sum(1).mean())
        self.centres = rng.standard_normal((self.n_centres, self.latent), dtype=np.float32)
        mean = rng.standard_normal(self.dim, dtype=np.float32)
        self.mean = mean / np.linalg.norm(mean)

    @property
    def n_blocks(self) -> int:
        return -(-self.n // BLOCK)

    def block_size(self, b: int) -> int:
        return min(BLOCK, self.n - b * BLOCK)

    def _finish(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Latent (n, latent) → unit vectors (n, dim): project, add noise, add the shared direction, normalise."""
        x = z @ self.W  # (n, dim)
        x += (self.noise * np.sqrt(self.latent / self.dim)) * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += self.offset * self.mean
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def latents(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, b])
        c = rng.integers(0, self.n_centres, self.block_size(b))
        return self.centres[c] + self.spread * rng.standard_normal((len(c), self.latent), dtype=np.float32)

    def block(self, b: int) -> np.ndarray:
        """Database vectors ``b * BLOCK ...`` as float32 (n, dim)."""
        rng = np.random.default_rng([self.seed, 2, b])
        if self.kind == "random":
            x = rng.standard_normal((self.block_size(b), self.dim), dtype=np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)
        return self._finish(self.latents(b), rng)

    def queries(self, nq: int) -> tuple[np.ndarray, np.ndarray]:
        """``nq`` perturbed copies of vectors from the last block, and the ids of their sources."""
        b = self.n_blocks - 1
        rng = np.random.default_rng([self.seed, 3])
        rows = np.sort(rng.choice(self.block_size(b), nq, replace=False))
        if self.kind == "random":
            x = self.block(b)[rows]
            q = x + 0.5 / np.sqrt(self.dim) * rng.standard_normal(x.shape, dtype=np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
        else:
            z = self.latents(b)[rows]
            z += 0.5 * self.spread * rng.standard_normal(z.shape, dtype=np.float32)
            q = self._finish(z, rng)
        return np.ascontiguousarray(q, dtype=np.float32), rows + b * BLOCK


# ---------------------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Config:
    """One index under test."""

    kind: str
    factory: str
    index: VectorIndex | None = None
    train_s: float = 0.0
    add_s: float = 0.0
    bytes_per_vector: float = 0.0
    refine_bytes: float = 0.0
    rows: list[dict] = field(default_factory=list)


def recalls(ids: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(10-recall@10, 1-recall@10) of ``ids`` (nq, 10) against exact ``truth`` (nq, 10)."""
    inter = [len(np.intersect1d(a, b)) for a, b in zip(ids, truth, strict=True)]
    r10 = float(np.mean(inter)) / truth.shape[1]
    r1 = float(np.mean([t in row for t, row in zip(truth[:, 0], ids, strict=True)]))
    return r10, r1


def time_search(
    index: VectorIndex, q: np.ndarray, batch: int, settings: SearchSettings, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, list[float]]:
    """Search ``q`` in batches; returns (ids, per-batch seconds)."""
    out, times = [], []
    for i in range(0, len(q), batch):
        t = time.perf_counter()
        _, ids = index.search(q[i : i + batch], K, exclude=exclude, settings=settings)
        times.append(time.perf_counter() - t)
        out.append(ids)
    return np.concatenate(out), times


def pct(xs: list, p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) * 1e3  # ms


def sweep_values(cfg: Config, nprobes: list[int], efs: list[int], k_factors: list[float] | None = None,
                 refine: bool = False) -> list[SearchSettings]:
    kfs = (k_factors or [None]) if refine else [None]
    if cfg.kind == "ivfpq":
        return [SearchSettings(nprobe=v, k_factor=kf) for v in nprobes for kf in kfs]
    if cfg.kind == "hnsw":
        return [SearchSettings(ef_search=v, k_factor=kf) for v in efs for kf in kfs]
    return [SearchSettings(k_factor=kf) for kf in kfs]


def setting_name(st: SearchSettings) -> str:
    name = f"nprobe={st.nprobe}" if st.nprobe else (f"ef={st.ef_search}" if st.ef_search else "exact")
    return name + (f",kf={st.k_factor:g}" if st.k_factor else "")


def bench_torch_exact(keys, queries: np.ndarray, truth: np.ndarray, exclude: np.ndarray, nq: int, key_chunk: int,
                      query_chunk: int, seed: int) -> dict:
    """Recall of exact device top-10 against the FAISS ground truth, and neighbour-precompute throughput."""
    import torch

    def sync() -> None:
        if keys.device.type == "cuda":
            torch.cuda.synchronize(keys.device)

    q = torch.from_numpy(queries).to(keys.device)
    _, ids = topk_inner_product(q, keys, K, None, key_chunk)
    r10, r1 = recalls(ids.cpu().numpy(), truth)
    rng = np.random.default_rng([seed, 5])
    rows = torch.from_numpy(np.sort(rng.choice(len(keys), min(nq, len(keys)), replace=False))).to(keys.device)
    mask = torch.from_numpy(exclude).to(keys.device)
    topk_inner_product(keys[rows[:query_chunk]], keys, K, mask, key_chunk)  # warm-up (kernels, allocator)
    sync()
    t = time.perf_counter()
    for i in range(0, len(rows), query_chunk):
        _, out = topk_inner_product(keys[rows[i : i + query_chunk]], keys, K, mask, key_chunk)
        out.cpu()
    sync()
    secs = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(keys.device) / 2**30 if keys.device.type == "cuda" else float("nan")
    return dict(device=str(keys.device), dtype=str(keys.dtype).removeprefix("torch."), r10=r10, r1=r1, nq=len(rows),
                secs=secs, q_per_s=len(rows) / secs, min_per_1m=1e6 / (len(rows) / secs) / 60, peak_gib=peak,
                key_chunk=key_chunk, query_chunk=query_chunk)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="database size (chunks)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--nq", type=int, default=1000, help="queries (recall, batch-64 latency)")
    p.add_argument("--nq-batch1", type=int, default=300, help="queries timed one at a time")
    p.add_argument("--kinds", default="flat,ivfpq", help="comma-separated kinds with their default factory")
    p.add_argument("--factories", default="", help="extra ';'-separated factory strings to compare")
    p.add_argument("--data", choices=("clustered", "random"), default="clustered")
    p.add_argument("--nprobe", default="8,16,32,64,128", help="nprobe values swept for IVF indexes")
    p.add_argument("--ef", default="32,64,128,256", help="efSearch values swept for HNSW indexes")
    p.add_argument("--refine", default="", help="comma-separated refine stages (RFlat, Refine(SQfp16), Refine(SQ8)) "
                   "appended to the default ivfpq factory, each as an extra index")
    p.add_argument("--k-factor", default="1,4,8,16", help="k_factor values swept for indexes with a refine stage")
    p.add_argument("--torch-exact", action="store_true", help="also benchmark exact search on a torch device")
    p.add_argument("--torch-device", default="auto", help="device of --torch-exact (auto: CUDA if available)")
    p.add_argument("--torch-dtype", default="auto",
                   help="auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16")
    p.add_argument("--torch-nq", type=int, default=65536, help="database vectors used as queries for throughput")
    p.add_argument("--torch-key-chunk", type=int, default=1 << 19, help="keys per matrix multiply")
    p.add_argument("--torch-query-chunk", type=int, default=4096, help="queries per matrix multiply")
    p.add_argument("--exclude-frac", type=float, default=0.1, help="fraction excluded in the exclude-mask timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all CPUs)")
    p.add_argument("--workdir", type=Path, default=None, help="where index files are written (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="append a markdown section with the results to this file")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    set_num_threads(args.threads)
    console = Console()
    started = dt.datetime.now()
    load_before = load_avg()
    t_start = time.perf_counter()

    spec = DataSpec(args.data, args.n, args.dim, seed=args.seed)
    queries, sources = spec.queries(args.nq)

    configs = [Config(kind=k, factory=default_factory(k, args.dim, args.n)) for k in args.kinds.split(",") if k]
    for f in filter(None, (s.strip() for s in args.factories.split(";"))):
        configs.append(Config(kind="auto", factory=f))  # kind inferred from the factory
    for r in filter(None, (s.strip() for s in args.refine.split(","))):
        configs.append(Config(kind="ivfpq", factory=f"{default_factory('ivfpq', args.dim, args.n)},{r}"))
    k_factors = [float(v) for v in args.k_factor.split(",") if v]
    torch_keys = None
    if args.torch_exact:
        import torch

        device = resolve_device(args.torch_device)
        torch_keys = torch.empty((args.n, args.dim), dtype=resolve_dtype(args.torch_dtype, device), device=device)
    for cfg in configs:
        cfg.index = VectorIndex.create(args.dim, cfg.kind, args.n, factory=cfg.factory, seed=args.seed)
        cfg.kind = cfg.index.kind

    # -- training on the first blocks (i.i.d., so an unbiased sample) -------------------------------------------
    n_train = min(max((c.index.max_train_vectors for c in configs if c.index.needs_training), default=0), args.n)
    if n_train:
        blocks = [spec.block(b) for b in tqdm(range(-(-n_train // BLOCK)), desc="train sample", leave=False)]
        train = np.concatenate(blocks)[:n_train]
        del blocks
        for cfg in configs:
            if cfg.index.needs_training:
                t = time.perf_counter()
                cfg.index.train(train[: cfg.index.max_train_vectors])
                cfg.train_s = time.perf_counter() - t
                console.log(
                    f"trained {cfg.factory} on {min(len(train), cfg.index.max_train_vectors):,} in {cfg.train_s:.1f}s"
                )
        del train

    # -- one pass: generate each block, add it everywhere, merge it into the exact top-k -----------------------
    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    gen_s = gt_s = 0.0
    for b in tqdm(range(spec.n_blocks), desc=f"build n={args.n:,}"):
        t = time.perf_counter()
        x = spec.block(b)
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        d, i = faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, i + b * BLOCK)
        gt_s += time.perf_counter() - t
        if torch_keys is not None:
            torch_keys[b * BLOCK : b * BLOCK + len(x)] = torch.from_numpy(x).to(torch_keys.device, torch_keys.dtype)
        for cfg in configs:
            t = time.perf_counter()
            cfg.index.add(x)
            cfg.add_s += time.perf_counter() - t
    heap.finalize()
    truth = heap.I
    console.log(
        f"generated in {gen_s:.0f}s, exact top-{K} in {gt_s:.0f}s; true NN = query source for "
        f"{np.mean(truth[:, 0] == sources):.1%}; mean true top-1/top-10 score "
        f"{heap.D[:, 0].mean():.3f}/{heap.D[:, -1].mean():.3f}"
    )

    # -- save, re-load memory-mapped, search -------------------------------------------------------------------
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_search_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([args.seed, 4])
    exclude = rng.random(args.n) < args.exclude_frac
    torch_row = None
    if torch_keys is not None:
        torch_row = bench_torch_exact(torch_keys, queries, truth, exclude, args.torch_nq, args.torch_key_chunk,
                                      args.torch_query_chunk, args.seed)
        console.log(f"torch exact: {torch_row}")
        del torch_keys
    nprobes = [int(v) for v in args.nprobe.split(",")]
    efs = [int(v) for v in args.ef.split(",")]
    for ci, cfg in enumerate(configs):
        path = workdir / f"index{ci}.faiss"
        cfg.index.save(path)
        cfg.bytes_per_vector = path.stat().st_size / args.n
        cfg.refine_bytes = cfg.index.refine_nbytes / args.n
        cfg.index = None  # free RAM; serve from the mmapped file like the database does
        index = VectorIndex.load(path, mmap=True)
        index.search(queries[:64], K)  # warm-up: page in the coarse structures
        nq1 = min(args.nq_batch1, args.nq) if cfg.kind != "flat" else min(args.nq_batch1, 100)
        for st in tqdm(sweep_values(cfg, nprobes, efs, k_factors, index.has_refine), desc=cfg.factory, leave=False):
            ids, t64 = time_search(index, queries, 64, st)
            _, t1 = time_search(index, queries[:nq1], 1, st)
            r10, r1 = recalls(ids, truth)
            ex_ids, tex = time_search(index, queries, 64, st, exclude=exclude)
            assert not exclude[ex_ids[ex_ids >= 0]].any() and (ex_ids >= 0).all()
            setting = setting_name(st)
            cfg.rows.append(dict(
                setting=setting, r10=r10, r1=r1,
                b1_p50=pct(t1, 50), b1_p99=pct(t1, 99),
                b64_p50=pct(t64, 50), b64_p99=pct(t64, 99), b64_per_q=pct(t64, 50) / 64,
                b64_excl_p50=pct(tex, 50),
            ))  # fmt: skip
        del index
        path.unlink()
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)

    wall = time.perf_counter() - t_start
    report(args, configs, console, started, load_before, load_avg(), wall, gen_s, gt_s, torch_row)


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, faiss {faiss.__version__} "
            f"({faiss.omp_get_max_threads()} OpenMP threads), numpy {np.__version__}")  # fmt: skip


def report(args, configs, console, started, load_before, load_after, wall, gen_s, gt_s, torch_row=None) -> None:
    cols = ["index (factory)", "B/chunk", "refine B", "train s", "add s", "setting", "10-R@10", "1-R@10",
            "b1 p50 ms", "b1 p99 ms", "b64 p50 ms", "b64 p99 ms", "b64 ms/q", "b64 excl ms"]  # fmt: skip
    table = Table(title=f"search, n={args.n:,}, {args.data} {args.dim}-d, {args.nq} queries, k={K}")
    for c in cols:
        table.add_column(c, justify="left" if c in ("index (factory)", "setting") else "right")
    md_rows = []
    for cfg in configs:
        for j, r in enumerate(cfg.rows):
            first = j == 0
            cells = [
                f"{cfg.kind}: {cfg.factory}" if first else "",
                f"{cfg.bytes_per_vector:.1f}" if first else "",
                f"{cfg.refine_bytes:.1f}" if first else "",
                f"{cfg.train_s:.0f}" if first else "",
                f"{cfg.add_s:.0f}" if first else "",
                r["setting"], f"{r['r10']:.3f}", f"{r['r1']:.3f}",
                f"{r['b1_p50']:.2f}", f"{r['b1_p99']:.2f}", f"{r['b64_p50']:.1f}", f"{r['b64_p99']:.1f}",
                f"{r['b64_per_q']:.3f}", f"{r['b64_excl_p50']:.1f}",
            ]  # fmt: skip
            table.add_row(*cells)
            md_rows.append("| " + " | ".join(cells) + " |")
    console.print(table)
    torch_lines = []
    if torch_row is not None:
        t = torch_row
        torch_lines = [
            f"- exact top-{K} on {t['device']} ({t['dtype']}, key chunk {t['key_chunk']:,}, query chunk "
            f"{t['query_chunk']:,}): 10-R@10 {t['r10']:.3f}, 1-R@10 {t['r1']:.3f}; {t['nq']:,} database vectors as "
            f"queries against all {args.n:,} keys ({args.exclude_frac:.0%} masked) in {t['secs']:.1f} s = "
            f"{t['q_per_s']:,.0f} queries/s → {t['min_per_1m']:.1f} min per 1M queries; peak device memory "
            f"{t['peak_gib']:.2f} GiB",
        ]
        console.log(torch_lines[0])
    command = "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    if args.out:
        lines = [
            f"### n = {args.n:,}, {args.data} data, {args.dim}-d",
            "",
            f"- command: `{command}`",
            f"- date: {started:%Y-%m-%d %H:%M}; wall time {wall / 60:.1f} min (data generation {gen_s:.0f} s, "
            f"exact ground truth {gt_s:.0f} s)",
            f"- machine: {machine()}",
            f"- load average (1/5/15 min) before: {load_before}; after: {load_after}"
            + ("  ⚠ other processes shared the CPUs: latencies are pessimistic" if max(
                float(load_before.split()[0]), float(load_after.split()[0])) > 0.5 else ""),
            f"- {args.nq} queries (batch 1 timed on the first {args.nq_batch1}, 100 for flat); "
            f"'b64 excl' = batch 64 with {args.exclude_frac:.0%} of ids excluded through the IDSelector; 'refine B' = "
            "bytes per chunk of the refine stage's vectors (part of B/chunk), 'kf' = its k_factor",
            *torch_lines,
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "|".join("---" if c in ("index (factory)", "setting") else "---:" for c in cols) + "|",
            *md_rows,
            "",
        ]  # fmt: skip
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
        console.log(f"appended to {args.out}")
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, configs=[
            dict(kind=c.kind, factory=c.factory, train_s=c.train_s, add_s=c.add_s,
                 bytes_per_vector=c.bytes_per_vector, refine_bytes=c.refine_bytes, rows=c.rows) for c in configs],
            torch_exact=torch_row), indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
