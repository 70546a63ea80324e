"""Building a database folder from a corpus, in resumable stages: tokenizer → segment → embeddings → index → meta.

A build is staged in ``OUT.partial/``; every finished stage stays on disk (the tokenizer, the segment folder, one
``.npy`` per ``shard_size`` chunks of embeddings, the index), so re-running the same build after a crash continues
where it stopped and gives the same database as an uninterrupted run. ``meta.json`` is written last; the staging
folder is then renamed into place. The same stages serve ``add`` (a new segment), ``compact`` (an index over kept
vectors) and held-out evaluation data (:func:`tokenize_corpus`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrolm.core.config import save_config
from retrolm.core.errors import RetrolmError
from retrolm.core.io import exclusive_lock, load_npy, read_json, save_npy, write_json
from retrolm.core.versions import library_versions
from retrolm.db.chunks import ChunkStore, SegmentWriter, token_dtype
from retrolm.db.index import INDEX_KINDS, VectorIndex
from retrolm.db.lexical import LexicalIndex
from retrolm.db.meta import (
    FORMAT,
    FORMAT_VERSION,
    file_records,
    now,
    recover_interrupted_swap,
    referenced_files,
    staging_path,
    swap_into_place,
    update_counts,
)
from retrolm.text.corpus import Document, corpus_fingerprint, in_shard, iter_documents, parse_shard
from retrolm.text.encoder import DEFAULT_ENCODER, EncoderTokenizer, SentenceEncoder
from retrolm.text.tokenizer import LMTokenizer, parse_train_spec, resolve_tokenizer

logger = logging.getLogger(__name__)

DOC_BATCH_CHARS = 4 << 20  # characters tokenized per call into the Rust tokenizer
DEFAULT_CPU_BATCH = 128  # chunks per encoder forward pass; larger batches do not help on a CPU
DEFAULT_GPU_BATCH = 1024


@dataclass
class BuildConfig:
    """How a retrieval database is built (saved as ``build.yaml`` inside it)."""

    chunk_len: int = 64
    """Tokens per chunk (RETRO: 64). Fixed for the life of the database."""
    encoder: str = DEFAULT_ENCODER
    """Frozen sentence encoder: Hugging Face name, short name or local folder."""
    tokenizer: str = "train:32000"
    """LM tokenizer: ``train:N`` (byte-level BPE trained on the corpus), a tokenizer.json, or a model (e.g. the LM
    that will read the database: ``smollm2-135m``)."""
    index: str = "auto"
    """Dense index kind: auto (exact when small, approximate when large), flat, ivfpq, hnsw, or none (no dense keys:
    no encoder runs; the database is searched with BM25 only)."""
    index_factory: str | None = None
    """Explicit FAISS index_factory string, overriding the kind's default."""
    bm25: bool = False
    """Also store a BM25 index over the chunks (needs ``retrolm[bm25]``)."""
    batch_size: int | None = None
    """Chunks per encoder forward pass (default 128 on a CPU, 1024 on a GPU)."""
    shard_size: int = 8192
    """Chunks per embedding shard: the unit of resumption after a crash."""
    tokenize_workers: int | None = None
    """Processes that pre-tokenize shards for the encoder ahead of it (decode LM tokens, run the encoder's tokenizer);
    None, 0 or 1 → one thread of this process. On an H200 (2026-12-04) one thread pre-tokenized 25k chunks/s, faster
    than the encoder's 38k-chunks/s padded batches let the build go, while 8 spawned processes made the whole
    build 3× slower (start-up, and 8 tokenizers with their own thread pools on 16 cores)."""
    encoder_max_length: int = 256
    """Encoder tokens kept per chunk text."""
    exact_length_batches: bool = True
    """Cut encoder batches at exact WordPiece counts (:func:`retrolm.text.encoder.length_batches`: batches of one
    count, from ``batch_size`` rows down to ``exact_batch_min``), so that most chunks run without padding or attention
    mask; false pads batches of similar length, as before 2026-12-04. The embeddings are the same either way (to float
    rounding)."""
    exact_batch_min: int | None = None
    """Fewest rows of one WordPiece count that run as a batch of their own (default ``batch_size // 8``); fewer are
    padded together with other counts' leftovers."""
    sort_shards: int | None = None
    """Embedding shards whose chunks are sorted by WordPiece count together before they are cut into batches: more
    chunks of each count, so less padding. Default 8 on a GPU (a fraction of a second of work each), 1 elsewhere (a
    crash loses what was embedded since the last shard written)."""
    device: str | None = None
    """Encoder device (default: CUDA if available)."""
    seed: int = 0
    """Seed for index training samples."""
    shard: str | None = None
    """``I/N``: this database is shard I (from 0) of a database split N ways, and keeps only the documents whose id
    hashes to I (:func:`retrolm.text.corpus.shard_of`), so N machines can each build their part from the same corpus
    and search them together (:mod:`retrolm.retrieval.sharded`). A ``train:N`` tokenizer is still trained on the
    whole corpus, so every shard gets the same one. Not to be confused with ``shard_size``'s embedding shards."""

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_len <= 4096:
            raise RetrolmError(f"chunk_len must be in [1, 4096], got {self.chunk_len}")
        if self.index not in (*INDEX_KINDS, "none"):
            raise RetrolmError(f"index must be one of {', '.join(INDEX_KINDS)} or none, got {self.index!r}")
        if self.index == "none" and not self.bm25:
            raise RetrolmError("index=none leaves the database unsearchable: add bm25=true (--bm25)")
        if self.index == "none" and self.index_factory:  # it was ignored without a word
            raise RetrolmError(f"index=none builds no vector index: index_factory {self.index_factory!r} would be "
                               "ignored")
        if (self.batch_size is not None and self.batch_size < 1) or self.shard_size < 1:
            raise RetrolmError("batch_size and shard_size must be positive")
        if (self.exact_batch_min is not None and self.exact_batch_min < 1) or (
                self.sort_shards is not None and self.sort_shards < 1):
            raise RetrolmError("exact_batch_min and sort_shards must be positive")
        if self.tokenize_workers is not None and self.tokenize_workers < 0:
            raise RetrolmError(f"tokenize_workers must be >= 0, got {self.tokenize_workers}")
        if self.shard is not None:
            parse_shard(self.shard)

    @property
    def dense(self) -> bool:
        return self.index != "none"

    def pretokenize_processes(self, device_type: str) -> int:
        """Worker processes of the pre-tokenization stage (0 = one thread in this process), for an encoder on
        ``device_type``: the same on every device since the H200 measurement above."""
        n = self.tokenize_workers or 0
        return n if n > 1 else 0

    def shards_sorted_together(self, device_type: str) -> int:
        """``sort_shards``, or the default for the encoder's device type."""
        return self.sort_shards or (8 if device_type == "cuda" else 1)

    def encoder_batch_size(self, device_type: str) -> int:
        """``batch_size``, or the default for the encoder's device type ("cuda", "cpu", ...)."""
        return self.batch_size or (DEFAULT_GPU_BATCH if device_type == "cuda" else DEFAULT_CPU_BATCH)


# --------------------------------------------------------------------------------------------- segments
def _doc_batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= DOC_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_into_segment(
    docs: Iterable[Document],
    tokenizer: LMTokenizer,
    folder: Path,
    chunk_len: int,
    first_chunk: int,
    first_doc: int,
    show_progress: bool = False,
) -> dict:
    """Tokenize documents and write them as one segment into ``folder`` (atomically: tmp folder + rename)."""
    if (folder / "segment.json").is_file():
        logger.info("resuming: segment %s already written", folder.name)
        return read_json(folder / "segment.json")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SegmentWriter(tmp, chunk_len, token_dtype(tokenizer.vocab_size), tokenizer.pad_id, first_chunk, first_doc)
    with tqdm(desc="tokenize", unit="doc", disable=not show_progress, leave=False) as bar:
        for batch in _doc_batches(docs):
            for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
                if len(ids) == 0:
                    logger.warning("skipping %s: no tokens", doc.source)
                    continue
                writer.add(doc.id, doc.source, len(doc.text.encode("utf-8")), ids)
            bar.update(len(batch))
    info = writer.close()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return info


def tokenize_corpus(
    paths: Sequence[str | Path], tokenizer: LMTokenizer, chunk_len: int, folder: Path, max_docs: int | None = None
) -> ChunkStore:
    """Tokenize and chunk documents (e.g. a held-out set) exactly as a database does, into ``folder``."""
    seg = Path(folder) / "seg-000000"
    docs = itertools.islice(iter_documents(paths), max_docs)
    tokenize_into_segment(docs, tokenizer, seg, chunk_len, 0, 0)
    return ChunkStore.open([seg], chunk_len, tokenizer.pad_id)


# ------------------------------------------------------------------------------------------- embeddings
IDS_FOLDER = "encoder-ids"


def pretokenize_shard(store: ChunkStore, tokenizer: LMTokenizer, wordpiece: EncoderTokenizer, start: int, stop: int,
                      folder: Path, name: str) -> None:
    """The pre-tokenization stage for chunks [start, stop): decode the LM tokens to text and run the encoder's Rust
    tokenizer over the batch once, storing ``name.ids.npy`` (the ids end to end) and ``name.lengths.npy`` ((n, 2):
    ids per chunk, 1 if the text was cut at the encoder's max_length). The lengths file is written last: it marks
    the shard done."""
    pieces, cut = wordpiece.token_ids(store.texts(np.arange(start, stop), tokenizer))
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    save_npy(folder / f"{name}.ids.npy", flat.astype(np.uint16 if flat.size == 0 or flat.max() < 2**16 else np.int32))
    save_npy(folder / f"{name}.lengths.npy", np.stack([[len(x) for x in pieces], cut.astype(np.int64)], 1)
             .astype(np.int32).reshape(-1, 2))


_WORKER: dict = {}  # what a pre-tokenization worker process loaded once (its initializer)


def _worker_init(segments: list[Path], chunk_len: int, pad_id: int, tokenizer: LMTokenizer, source: str,
                 max_length: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    _WORKER.update(store=ChunkStore.open(segments, chunk_len, pad_id), tokenizer=tokenizer,
                   wordpiece=EncoderTokenizer(source, max_length))


def _worker_pretokenize(start: int, stop: int, folder: Path, name: str) -> None:
    pretokenize_shard(_WORKER["store"], _WORKER["tokenizer"], _WORKER["wordpiece"], start, stop, folder, name)


def _pretokenize_pool(store: ChunkStore, tokenizer: LMTokenizer, encoder: SentenceEncoder, processes: int
                      ) -> tuple[Executor, Callable[..., None]]:
    """Where the pre-tokenization stage runs: ``processes`` spawned workers (each loads the store, the LM tokenizer
    and only the encoder's tokenizer, once) or, with 0, one thread of this process."""
    if not processes:
        return ThreadPoolExecutor(max_workers=1), functools.partial(pretokenize_shard, store, tokenizer,
                                                                   encoder.wordpiece)
    init = ([seg.folder for seg in store.segments], store.chunk_len, store.pad_id, tokenizer, encoder.source,
            encoder.max_length)
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=init)
    return pool, _worker_pretokenize


def encoder_token_stats(folder: Path, max_length: int) -> dict:
    """Encoder tokens per chunk over every pre-tokenized shard of ``folder`` (mean, p50, p95, max) and how many chunk
    texts were cut at ``max_length``: how long a chunk's text is for the encoder, and what truncation cost."""
    parts = [load_npy(p) for p in sorted(folder.glob("*.lengths.npy"))]
    if not parts:
        return {}
    rows = np.concatenate(parts)
    n = rows[:, 0]
    return {"chunks": len(n), "mean": round(float(n.mean()), 2), "p50": int(np.percentile(n, 50)),
            "p95": int(np.percentile(n, 95)), "max": int(n.max()), "max_length": max_length,
            "truncated": int(rows[:, 1].sum())}


def embed_shards(
    store: ChunkStore,
    tokenizer: LMTokenizer,
    encoder: SentenceEncoder,
    folder: Path,
    config: BuildConfig,
    show_progress: bool = False,
) -> list[Path]:
    """Embed every chunk of ``store`` into ``folder/NNNNN.npy`` shards, skipping shards already on disk.

    Two stages with their own files and resume points: pre-tokenization (``encoder-ids/`` next to ``folder``, see
    :func:`pretokenize_shard`) runs ahead on worker threads, and the encoder loop only gathers id batches from it
    (``sort_shards`` shards at a time, cut by WordPiece count), so decoding and WordPiece tokenization never hold the
    device up.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ids_dir = folder.parent / IDS_FOLDER
    ids_dir.mkdir(parents=True, exist_ok=True)
    first, n = store.first_chunk, store.n_chunks
    starts = range(first, first + n, config.shard_size)
    shards = [folder / f"{i:05d}.npy" for i in range(len(starts))]
    todo = [(i, s, p) for i, (s, p) in enumerate(zip(starts, shards, strict=True)) if not p.is_file()]
    if len(todo) < len(shards):
        logger.info("resuming: %d of %d embedding shards already done", len(shards) - len(todo), len(shards))
    done = n - sum(min(config.shard_size, first + n - s) for _, s, _ in todo)
    batch_size = config.encoder_batch_size(encoder.device.type)

    # Pre-tokenization runs ahead of the encoder on one thread (or on `tokenize_workers` spawned processes, which
    # only pay off on a corpus large enough to amortise their start-up; see BuildConfig.tokenize_workers).
    pool, work = _pretokenize_pool(store, tokenizer, encoder, config.pretokenize_processes(encoder.device.type))
    with tqdm(total=n, initial=done, desc="embed", unit="chunk", disable=not show_progress) as bar, pool:
        ahead = {}
        for i, start, _ in todo:
            name = f"{i:05d}"
            if not (ids_dir / f"{name}.lengths.npy").is_file():
                ahead[i] = pool.submit(work, start, min(start + config.shard_size, first + n), ids_dir, name)
        window = config.shards_sorted_together(encoder.device.type)
        for w in range(0, len(todo), window):
            part, ids, lengths = todo[w : w + window], [], []
            for i, _, _ in part:
                if i in ahead:
                    ahead.pop(i).result()
                lengths.append(load_npy(ids_dir / f"{i:05d}.lengths.npy")[:, 0])
                ids.append(load_npy(ids_dir / f"{i:05d}.ids.npy").astype(np.int64))
            prepared = encoder.prepare_ids(np.concatenate(ids), np.concatenate(lengths), batch_size,
                                           exact=config.exact_length_batches, min_exact=config.exact_batch_min)
            vecs, at = encoder.encode_prepared(prepared), 0
            for (_, _, path), rows in zip(part, lengths, strict=True):
                save_npy(path, vecs[at : at + len(rows)])
                at += len(rows)
            bar.update(prepared.n)
    return shards


def shard_blocks(shards: Sequence[Path]) -> Iterator[np.ndarray]:
    for p in shards:
        yield np.ascontiguousarray(load_npy(p), dtype=np.float32)


def shard_sample(shards: Sequence[Path], n_total: int, n_sample: int, seed: int) -> np.ndarray:
    """A deterministic random sample of the embeddings, for training an approximate index."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n_total, size=min(n_sample, n_total), replace=False))
    out, offset = [], 0
    for p in shards:
        arr = load_npy(p, mmap=True)
        sel = pick[(pick >= offset) & (pick < offset + len(arr))] - offset
        out.append(np.asarray(arr[sel], dtype=np.float32))
        offset += len(arr)
    return np.ascontiguousarray(np.concatenate(out))


def make_index(
    dim: int,
    n: int,
    blocks: Callable[[], Iterable[np.ndarray]],
    sample: Callable[[int], np.ndarray],
    kind: str = "auto",
    factory: str | None = None,
    seed: int = 0,
) -> VectorIndex:
    """The one way an index is made (build and compact): create for ``n`` vectors, train on ``sample(n_wanted)`` if
    the kind needs it, then add the vectors ``blocks()`` yields, in chunk-id order."""
    index = VectorIndex.create(dim, kind=kind, n_vectors=n, factory=factory, seed=seed)
    if index.needs_training and n:
        t = time.perf_counter()
        index.train(sample(index.min_train_vectors))
        logger.info("trained %s index in %.1fs", index.factory, time.perf_counter() - t)
    for vecs in blocks():
        index.add(vecs)
    return index


# ---------------------------------------------------------------------------------------------- the build
def build_database(
    corpus: Sequence[str | Path], out: Path, config: BuildConfig, overwrite: bool = False, show_progress: bool = True
) -> None:
    """Build a database folder ``out`` from corpus paths (resumable; see the module docstring).

    An existing database at ``out`` is left intact until the new one is complete (and only replaced with
    ``overwrite``).
    """
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        # a finished build replaces the folder by renaming: the shell's current directory would vanish under it
        raise RetrolmError(f"{out}: is the current directory (or holds it); build into a folder named from outside it")
    recover_interrupted_swap(out)
    if (out / "meta.json").is_file():
        old = _existing_meta(out, overwrite)
        if old.get("chunk_len") not in (None, config.chunk_len) and not overwrite:
            raise RetrolmError(
                f"{out}: existing database has chunk_len {old.get('chunk_len')}, asked for {config.chunk_len}; "
                "build into a new folder or pass --overwrite"
            )
        if not overwrite:
            raise RetrolmError(f"{out}: database already exists (use `db add` to append, or --overwrite)")
    elif out.exists() and any(out.iterdir()):
        raise RetrolmError(f"{out}: folder exists and is not a retrolm database")
    for c in map(Path, corpus):
        if c.is_dir() and out.resolve().is_relative_to(c.resolve()):
            raise RetrolmError(f"{out}: output folder is inside the corpus folder {c}; choose another --out")
        if c.exists() and c.resolve().is_relative_to(out.resolve()):  # --overwrite would delete it with the folder
            raise RetrolmError(f"{c}: is inside the database folder {out} that the build replaces; move it out first")
    staging = staging_path(out)
    plan = {"format_version": FORMAT_VERSION, "config": asdict(config), "corpus": corpus_fingerprint(corpus)}
    # a finished build keeps its plan's digest in meta.json once plan.json is gone (the mark of a finished build), so
    # that one left unswapped by a crash is not installed for other inputs
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()
    with exclusive_lock(staging, what="build"):
        # again under the lock: a build of the same folder that finished while this one waited must not be replaced
        # without --overwrite (the check above ran before the wait)
        if (out / "meta.json").is_file() and not overwrite:
            if not any(c.name != ".lock" for c in staging.iterdir()):  # only made by this wait: leave no debris
                shutil.rmtree(staging, ignore_errors=True)
            raise RetrolmError(f"{out}: database already exists (built by another process meanwhile; use `db add` "
                               "to append, or --overwrite)")
        plan_path = staging / "plan.json"
        finished = staging / "meta.json"
        stale = read_json(plan_path) != plan if plan_path.is_file() else \
            finished.is_file() and read_json(finished).get("plan_sha256") != digest
        if stale:
            logger.warning("%s: discarding a partial build made with other inputs or settings", staging)
            for child in staging.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        if not (staging / "meta.json").is_file():
            write_json(plan_path, plan)
            try:
                _build_stages(corpus, staging, config, show_progress)
            except (RetrolmError, OSError):
                # Bad input (or a full disk) before any work worth keeping: leave no half-made folder behind.
                if not any((staging / "embeddings").glob("*.npy")):
                    shutil.rmtree(staging, ignore_errors=True)
                raise
        meta = read_json(finished)
        if meta.get("plan_sha256") != digest:
            write_json(finished, dict(meta, plan_sha256=digest))
        shutil.rmtree(staging / "embeddings", ignore_errors=True)
        shutil.rmtree(staging / IDS_FOLDER, ignore_errors=True)
        for name in ("tokenizer.name.json", "plan.json"):
            (staging / name).unlink(missing_ok=True)
        # swapped while the build lock is held (its file travels with the folder): a build waiting for the lock then
        # finds the database in place, instead of a staging folder that vanishes under it
        if (out / "meta.json").is_file():
            with exclusive_lock(out):  # a writer busy with the database being replaced finishes first
                swap_into_place(staging, out)
        else:
            swap_into_place(staging, out)


def _existing_meta(out: Path, overwrite: bool) -> dict:
    """The ``meta.json`` of the database at ``out``. A folder whose ``meta.json`` is someone else's is never replaced,
    even with ``overwrite``; a damaged description of a database (its ``segments/`` are there) is, with it."""
    try:
        meta = read_json(out / "meta.json", "database description (meta.json)")
    except RetrolmError:
        meta = None
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        return meta
    if overwrite and (out / "segments").is_dir():
        logger.warning("%s: replacing a database whose meta.json is damaged", out)
        return {}
    if (out / "segments").is_dir():
        raise RetrolmError(f"{out / 'meta.json'}: damaged database description; --overwrite rebuilds the database")
    raise RetrolmError(f"{out}: folder exists and is not a retrolm database (its meta.json is not one)")


def _stage_tokenizer(corpus: Sequence[str | Path], staging: Path, spec: str) -> LMTokenizer:
    tok_path, name_path = staging / "tokenizer.json", staging / "tokenizer.name.json"
    if tok_path.is_file() and name_path.is_file():
        return LMTokenizer.from_file(tok_path, name=read_json(name_path)["name"])
    # training reads the corpus once more: its warnings were (or will be) given by the tokenizing pass
    texts = (d.text for d in iter_documents(corpus, warn=False)) if parse_train_spec(spec) else None
    tokenizer = resolve_tokenizer(spec, texts)
    write_json(name_path, {"name": tokenizer.name})
    tokenizer.save(tok_path)
    return tokenizer


def _build_stages(corpus: Sequence[str | Path], staging: Path, config: BuildConfig, show_progress: bool) -> None:
    # Load the encoder first: a bad encoder name should fail before any work is done.
    encoder = SentenceEncoder(config.encoder, device=config.device, max_length=config.encoder_max_length) \
        if config.dense else None
    if encoder is not None and config.index_factory:  # a bad factory string fails now, not after the embedding
        VectorIndex.create(encoder.dim, kind=config.index, factory=config.index_factory)
    tokenizer = _stage_tokenizer(corpus, staging, config.tokenizer)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    seg = staging / "segments" / "seg-000000"
    shard = parse_shard(config.shard) if config.shard else None
    info = tokenize_into_segment(in_shard(iter_documents(corpus), shard), tokenizer, seg, config.chunk_len, 0, 0,
                                 show_progress)
    if info["n_chunks"] == 0:
        where = f" in shard {config.shard} (no document id hashes to it: use fewer parts)" if shard else ""
        raise RetrolmError(f"{', '.join(map(str, corpus))}: corpus produced no tokens{where}")
    store = ChunkStore.open([seg], config.chunk_len, tokenizer.pad_id)
    timings["tokenize_s"] = time.perf_counter() - t
    index_meta = None
    if encoder is not None:
        t = time.perf_counter()
        shards = embed_shards(store, tokenizer, encoder, staging / "embeddings", config, show_progress)
        timings["embed_s"] = time.perf_counter() - t
        encoder_tokens = encoder_token_stats(staging / IDS_FOLDER, encoder.max_length)
        logger.info("encoder tokens per chunk: mean %s, p95 %s, max %s; %s of %s chunk texts cut at %s",
                    *(encoder_tokens.get(k) for k in ("mean", "p95", "max", "truncated", "chunks", "max_length")))
        t = time.perf_counter()
        index_file = "index-v1.faiss"
        index = None
        if (staging / index_file).is_file():
            try:
                index = VectorIndex.load(staging / index_file, mmap=True)
            except RetrolmError as e:  # e.g. left truncated by a full disk: it is made again from the shards
                logger.warning("%s; making it again", e)
        if index is None:
            made = make_index(encoder.dim, store.n_chunks, lambda: shard_blocks(shards),
                              lambda n: shard_sample(shards, store.n_chunks, n, config.seed),
                              config.index, config.index_factory, config.seed)
            made.save(staging / index_file)
            index = VectorIndex.load(staging / index_file, mmap=True)
        # the factory string asked for: a loaded index's is read back from its structure, and some (RR, L2norm,
        # residual quantizers) do not read back as a string FAISS parses, which compaction needs
        index_meta = {"kind": index.kind, "factory": config.index_factory or index.factory, "file": index_file}
        timings["index_s"] = time.perf_counter() - t
    bm25_dir = None
    if config.bm25:
        t = time.perf_counter()
        bm25_dir = "bm25-v1"
        if not (staging / bm25_dir / "n_chunks.txt").is_file():
            LexicalIndex.build(lambda ids: store.texts(ids, tokenizer), store.n_chunks, show_progress).save(
                staging / bm25_dir)
        timings["bm25_s"] = time.perf_counter() - t
    save_config(config, staging / "build.yaml")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": 1,
        "created": now(),
        "updated": now(),
        "build_id": uuid.uuid4().hex,  # tells two builds of the same folder apart (e.g. for precomputed neighbours)
        "chunk_len": config.chunk_len,
        "tokenizer": {
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "sha256": tokenizer.sha256,
            "pad_id": tokenizer.pad_id,
            "eos_id": tokenizer.eos_id,
        },
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "encoder": encoder.describe() if encoder is not None else None,
        "index": index_meta,
        "bm25": bm25_dir,
        "segments": [seg.name],
        "tombstones": None,
        "shard": {"index": shard[0], "count": shard[1]} if shard else None,
        # Wall time of the stages run by the last (possibly resumed) invocation.
        "build_stats": {k: round(v, 3) for k, v in timings.items()},
        "software": library_versions(),  # e.g. the BM25 scorer's release decides which neighbours a search returns
    }
    if encoder is not None:
        meta["build_stats"]["encoder_tokens"] = encoder_tokens
    update_counts(meta, store.n_docs, store.n_chunks, store.doc_n_chunks, np.zeros(store.n_docs, dtype=bool))
    meta["files"] = file_records(staging, referenced_files(meta, staging))
    write_json(staging / "meta.json", meta)
