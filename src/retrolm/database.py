"""The retrieval database: a self-describing folder of chunks, their frozen-encoder keys and a FAISS index.

Layout (``meta.json`` is the commit point: a change becomes visible only when it is rewritten)::

    DB/
      meta.json              format version, tokenizer, encoder, chunk_len, counts, index, segments, tombstones
      build.yaml             the BuildConfig that created the database
      tokenizer.json         the LM tokenizer (chunks are stored as its token ids)
      segments/seg-000000/   chunk tokens, lengths, document index, position; documents table (see chunks.py)
      index-v3.faiss         FAISS index over all stored chunks (ids = chunk ids), versioned
      tombstones-v3.npy      bool per document: deleted documents are never returned by search

Live updates (SPEC R7, R8) need no retraining: ``add`` writes a new segment and appends its vectors to the
index; ``delete`` marks documents deleted (filtered inside FAISS at search time); ``compact`` rewrites
everything without the deleted documents.

Crash safety: a build is staged in ``DB.partial/`` and resumed from its finished stages (tokenizer,
segment, embedding shards, index); the finished folder is renamed into place. ``add`` stages inside
``DB/.staging-add/`` the same way. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrolm.chunks import ChunkStore, SegmentWriter, token_dtype
from retrolm.config import save_config
from retrolm.corpus import Document, corpus_fingerprint, iter_documents
from retrolm.embed import DEFAULT_ENCODER, Encoder, Prepared
from retrolm.errors import RetrolmError
from retrolm.fsutil import (
    commit_dir,
    dir_size,
    exclusive_lock,
    load_npy,
    read_json,
    save_npy,
    write_json,
)
from retrolm.index import INDEX_KINDS, SearchSettings, VectorIndex
from retrolm.tokenizer import LMTokenizer, parse_train_spec, resolve_tokenizer

logger = logging.getLogger(__name__)

FORMAT = "retrolm-db"
FORMAT_VERSION = 1
_DOC_BATCH = 512  # documents tokenized per call into the Rust tokenizer
DEFAULT_CPU_BATCH = 128  # chunks per encoder forward pass; larger batches do not help on a CPU
DEFAULT_GPU_BATCH = 1024
PREP_WORKERS_GPU = 4  # shards decoded + tokenized ahead of a GPU encoder


@dataclass
class BuildConfig:
    """How a retrieval database is built."""

    chunk_len: int = 64
    """Tokens per chunk (RETRO: 64). Fixed for the life of the database."""
    encoder: str = DEFAULT_ENCODER
    """Frozen sentence encoder: Hugging Face name or local folder."""
    tokenizer: str = "train:32000"
    """LM tokenizer: ``train:N`` (byte-level BPE trained on the corpus), a tokenizer.json, or a HF name."""
    index: str = "auto"
    """Index kind: auto (exact when small, approximate when large), flat, ivfpq or hnsw."""
    index_factory: str | None = None
    """Explicit FAISS index_factory string, overriding the kind's default."""
    batch_size: int | None = None
    """Chunks per encoder forward pass (default 128 on a CPU, 1024 on a GPU)."""
    shard_size: int = 8192
    """Chunks per embedding shard: the unit of resumption after a crash."""
    encoder_max_length: int = 256
    """Encoder tokens kept per chunk text."""
    device: str | None = None
    """Encoder device (default: CUDA if available)."""
    seed: int = 0
    """Seed for index training samples."""

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_len <= 4096:
            raise RetrolmError(f"chunk_len must be in [1, 4096], got {self.chunk_len}")
        if self.index not in INDEX_KINDS:
            raise RetrolmError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
        if (self.batch_size is not None and self.batch_size < 1) or self.shard_size < 1:
            raise RetrolmError("batch_size and shard_size must be positive")

    def encoder_batch_size(self, device_type: str) -> int:
        """``batch_size``, or the default for the encoder's device type ("cuda", "cpu", ...)."""
        return self.batch_size or (DEFAULT_GPU_BATCH if device_type == "cuda" else DEFAULT_CPU_BATCH)


@dataclass
class Hit:
    """One search result: a chunk, its continuation, and where it came from."""

    chunk_id: int
    doc_id: str
    score: float
    text: str
    continuation: str
    position: int
    """Chunk index within its document."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Staged:
    """What an ingestion run produced in a staging folder."""

    segment: Path
    info: dict
    shards: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- ingestion
def _tokenize_into_segment(
    docs: Iterable[Document],
    tokenizer: LMTokenizer,
    folder: Path,
    chunk_len: int,
    first_chunk: int,
    first_doc: int,
    show_progress: bool,
) -> dict:
    """Tokenize documents and write them as one segment into ``folder`` (atomically: tmp folder + rename)."""
    if (folder / "segment.json").is_file():
        logger.info("resuming: segment %s already written", folder.name)
        return read_json(folder / "segment.json")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SegmentWriter(tmp, chunk_len, token_dtype(tokenizer.vocab_size), tokenizer.pad_id, first_chunk, first_doc)
    bar = tqdm(desc="tokenize", unit="doc", disable=not show_progress, leave=False)
    batch: list[Document] = []

    def flush() -> None:
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
            if not ids:
                logger.warning("skipping %s: no tokens", doc.source)
                continue
            writer.add(doc.id, doc.source, len(doc.text.encode("utf-8")), ids)
        bar.update(len(batch))
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= _DOC_BATCH:
            flush()
    flush()
    bar.close()
    info = writer.close()
    commit_dir(tmp, folder)
    return info


def _chunk_texts(store: ChunkStore, tokenizer: LMTokenizer, ids: np.ndarray) -> list[str]:
    """Chunks as text: what the encoder sees (queries are embedded from text the same way)."""
    toks, lens = store.tokens(ids), store.lengths(ids)
    return tokenizer.decode_batch([t[:k].tolist() for t, k in zip(toks, lens, strict=True)])


def _embed_shards(
    store: ChunkStore,
    tokenizer: LMTokenizer,
    encoder: Encoder,
    folder: Path,
    config: BuildConfig,
    show_progress: bool,
) -> list[Path]:
    """Embed every chunk of ``store`` into ``folder/NNNNN.npy`` shards, skipping shards already on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    first, n = store.segments[0].first_chunk, store.n_chunks
    starts = range(first, first + n, config.shard_size)
    shards = [folder / f"{i:05d}.npy" for i in range(len(starts))]
    todo = [(s, p) for s, p in zip(starts, shards, strict=True) if not p.is_file()]
    if len(todo) < len(shards):
        logger.info("resuming: %d of %d embedding shards already done", len(shards) - len(todo), len(shards))
    bar = tqdm(
        total=n,
        initial=n - sum(min(config.shard_size, first + n - s) for s, _ in todo),
        desc="embed",
        unit="chunk",
        disable=not show_progress,
    )
    batch_size = config.encoder_batch_size(encoder.device.type)

    def prepare(start: int) -> Prepared:
        ids = np.arange(start, min(start + config.shard_size, first + n))
        return encoder.prepare(_chunk_texts(store, tokenizer, ids), batch_size)

    # The next shards are decoded and tokenized on worker threads (the Rust tokenizers release the GIL) while the
    # encoder runs this one: on a GPU the encoder is fast enough that doing it in line would leave it idle most of
    # the time. On a CPU the encoder is the bottleneck and one worker is plenty.
    workers = PREP_WORKERS_GPU if encoder.device.type == "cuda" else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead = [pool.submit(prepare, start) for start, _ in todo[:workers]]
        for i, (_, path) in enumerate(todo):
            prepared = ahead.pop(0).result()
            if i + workers < len(todo):
                ahead.append(pool.submit(prepare, todo[i + workers][0]))
            save_npy(path, encoder.encode_prepared(prepared))
            bar.update(prepared.n)
    bar.close()
    return shards


def _iter_shards(shards: Sequence[Path]) -> Iterator[np.ndarray]:
    for p in shards:
        yield np.ascontiguousarray(load_npy(p), dtype=np.float32)


def _train_sample(shards: Sequence[Path], n_total: int, n_sample: int, seed: int) -> np.ndarray:
    """A deterministic random sample of the embeddings for training an approximate index."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n_total, size=min(n_sample, n_total), replace=False))
    out, offset = [], 0
    for p in shards:
        arr = load_npy(p, mmap=True)
        sel = pick[(pick >= offset) & (pick < offset + len(arr))] - offset
        out.append(np.asarray(arr[sel], dtype=np.float32))
        offset += len(arr)
    return np.ascontiguousarray(np.concatenate(out))


def _build_index(shards: Sequence[Path], n: int, dim: int, config: BuildConfig, path: Path) -> VectorIndex:
    if path.is_file():
        logger.info("resuming: index already built")
        return VectorIndex.load(path, mmap=False)
    index = VectorIndex.create(dim, kind=config.index, n_vectors=n, factory=config.index_factory, seed=config.seed)
    if index.needs_training:
        t = time.perf_counter()
        index.train(_train_sample(shards, n, index.min_train_vectors, config.seed))
        logger.info("trained %s index in %.1fs", index.factory, time.perf_counter() - t)
    for vecs in _iter_shards(shards):
        index.add(vecs)
    index.save(path)
    return index


def _compile_filters(match: str | None, blocklist: str | Path | None) -> list[re.Pattern]:
    """The content filters of a delete: a user regex and/or a blocklist of terms (whole words, any case)."""
    patterns = []
    if match:
        try:
            patterns.append(re.compile(match))
        except re.error as e:
            raise RetrolmError(f"--match {match!r}: invalid regular expression ({e})") from None
    if blocklist is not None:
        path = Path(blocklist)
        try:
            terms = [t.strip() for t in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise RetrolmError(f"{path}: cannot read blocklist ({e})") from None
        terms = [t for t in terms if t and not t.startswith("#")]
        if not terms:
            raise RetrolmError(f"{path}: blocklist has no terms")
        patterns.append(re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.IGNORECASE))
    return patterns


# ---------------------------------------------------------------------------------------------- database
class Database:
    """A retrieval database folder. Create with :meth:`build`, open with :meth:`open`."""

    def __init__(self, path: Path, meta: dict, device: str | None = None):
        self.path = path
        self.meta = meta
        self.device = device
        self.chunk_len: int = meta["chunk_len"]
        self.tokenizer = LMTokenizer.from_file(path / "tokenizer.json", name=meta["tokenizer"]["name"])
        self.store = ChunkStore.open(
            [path / "segments" / s for s in meta["segments"]], self.chunk_len, self.tokenizer.pad_id
        )
        self.index = VectorIndex.load(path / meta["index"]["file"], mmap=True)
        if self.index.ntotal != self.store.n_chunks:
            raise RetrolmError(
                f"{path}: index has {self.index.ntotal} vectors but the segments hold {self.store.n_chunks} chunks"
            )
        tomb = meta.get("tombstones")
        self.deleted_docs = load_npy(path / tomb).astype(bool) if tomb else np.zeros(self.store.n_docs, dtype=bool)
        if len(self.deleted_docs) != self.store.n_docs:
            raise RetrolmError(f"{path / tomb}: has {len(self.deleted_docs)} entries for {self.store.n_docs} documents")
        self._deleted_chunks: np.ndarray | None = None
        self._encoder: Encoder | None = None

    # ---- opening and building
    @classmethod
    def open(cls, path: str | Path, device: str | None = None) -> Database:
        """Open an existing database folder (read-only until :meth:`add`/:meth:`delete`)."""
        path = Path(path)
        _recover_interrupted_swap(path)
        if not path.is_dir():
            raise RetrolmError(f"{path}: database folder does not exist")
        meta = read_json(path / "meta.json", "database description (meta.json)")
        if meta.get("format") != FORMAT:
            raise RetrolmError(f"{path / 'meta.json'}: not a retrolm database")
        if meta.get("format_version") != FORMAT_VERSION:
            raise RetrolmError(
                f"{path / 'meta.json'}: format version {meta.get('format_version')} "
                f"(this retrolm reads {FORMAT_VERSION})"
            )
        return cls(path, meta, device=device)

    @classmethod
    def build(
        cls,
        corpus: Sequence[str | Path],
        out: str | Path,
        config: BuildConfig | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> Database:
        """Build a database from corpus paths into folder ``out``.

        Resumable: re-running the same call after a crash continues from the last finished stage and
        gives the same database as an uninterrupted build. An existing database at ``out`` is left intact
        until the new one is complete (and only replaced with ``overwrite``).
        """
        config = config or BuildConfig()
        out = Path(out)
        _recover_interrupted_swap(out)
        if (out / "meta.json").is_file():
            old = read_json(out / "meta.json", "database description (meta.json)")
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
        staging = out.with_name(out.name + ".partial")
        plan = {"format_version": FORMAT_VERSION, "config": asdict(config), "corpus": corpus_fingerprint(corpus)}
        with exclusive_lock(staging):
            plan_path = staging / "plan.json"
            if plan_path.is_file() and read_json(plan_path) != plan:
                logger.warning("%s: discarding a partial build made with other inputs or settings", staging)
                for child in staging.iterdir():
                    if child.name != ".lock":
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not (staging / "meta.json").is_file():
                write_json(plan_path, plan)
                try:
                    cls._build_stages(corpus, staging, config, show_progress)
                except RetrolmError:
                    # Bad input found before any work worth keeping: leave no half-made folder behind.
                    if not (staging / "segments").exists():
                        shutil.rmtree(staging, ignore_errors=True)
                    raise
            shutil.rmtree(staging / "embeddings", ignore_errors=True)
            (staging / "plan.json").unlink(missing_ok=True)
        (staging / ".lock").unlink(missing_ok=True)
        _swap_into_place(staging, out)
        db = cls.open(out)
        logger.info("built %s: %d documents, %d chunks", out, db.store.n_docs, db.store.n_chunks)
        return db

    @staticmethod
    def _build_stages(corpus: Sequence[str | Path], staging: Path, config: BuildConfig, show_progress: bool) -> None:
        # Load the encoder first: a bad encoder name should fail before any work is done.
        encoder = Encoder(config.encoder, device=config.device, max_length=config.encoder_max_length)
        tok_path = staging / "tokenizer.json"
        if tok_path.is_file():
            tokenizer = LMTokenizer.from_file(tok_path, name=read_json(staging / "tokenizer.name.json")["name"])
        else:
            texts = (d.text for d in iter_documents(corpus)) if parse_train_spec(config.tokenizer) else None
            tokenizer = resolve_tokenizer(config.tokenizer, texts)
            write_json(staging / "tokenizer.name.json", {"name": tokenizer.name})
            tokenizer.save(tok_path)

        timings: dict[str, float] = {}
        t = time.perf_counter()
        seg = staging / "segments" / "seg-000000"
        info = _tokenize_into_segment(iter_documents(corpus), tokenizer, seg, config.chunk_len, 0, 0, show_progress)
        if info["n_chunks"] == 0:
            raise RetrolmError(f"{', '.join(map(str, corpus))}: corpus produced no tokens")
        store = ChunkStore.open([seg], config.chunk_len, tokenizer.pad_id)
        timings["tokenize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        shards = _embed_shards(store, tokenizer, encoder, staging / "embeddings", config, show_progress)
        timings["embed_s"] = time.perf_counter() - t
        t = time.perf_counter()
        index_file = "index-v1.faiss"
        index = _build_index(shards, store.n_chunks, encoder.dim, config, staging / index_file)
        timings["index_s"] = time.perf_counter() - t
        (staging / "tokenizer.name.json").unlink()
        save_config(config, staging / "build.yaml")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": 1,
            "created": now,
            "updated": now,
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
            "encoder": encoder.describe(),
            "index": {"kind": index.kind, "factory": index.factory, "file": index_file},
            "segments": [seg.name],
            "tombstones": None,
            # Wall time of the stages run by the last (possibly resumed) invocation.
            "build_stats": {k: round(v, 3) for k, v in timings.items()},
        }
        _update_counts(meta, store, np.zeros(store.n_docs, dtype=bool))
        write_json(staging / "meta.json", meta)

    # ---- properties
    @property
    def encoder(self) -> Encoder:
        """The database's frozen encoder, loaded on first use."""
        if self._encoder is None:
            enc = self.meta["encoder"]
            self._encoder = Encoder(enc["name"], device=self.device, max_length=enc["max_length"])
            if self._encoder.dim != enc["dim"]:
                raise RetrolmError(
                    f"{self.path}: encoder {enc['name']!r} now has dim {self._encoder.dim}, "
                    f"database was built with {enc['dim']}"
                )
        return self._encoder

    @property
    def deleted_chunks(self) -> np.ndarray:
        """Bool mask over chunk ids: True for chunks of deleted documents."""
        if self._deleted_chunks is None:
            self._deleted_chunks = self.deleted_docs[self.store.all_chunk_docs()]
        return self._deleted_chunks

    def live_doc_ids(self) -> list[str]:
        return [d for d, dead in zip(self.store.doc_ids, self.deleted_docs, strict=True) if not dead]

    # ---- search
    def chunk_texts(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        return _chunk_texts(self.store, self.tokenizer, np.asarray(ids, dtype=np.int64))

    def embed(self, texts: Sequence[str], batch_size: int = 128, show_progress: bool = False) -> np.ndarray:
        """Query vectors, formatted exactly like the database's keys."""
        return self.encoder.encode(list(texts), batch_size=batch_size, show_progress=show_progress)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 5,
        exclude_docs: Sequence[Sequence[int]] | None = None,
        settings: SearchSettings | None = None,
        exclude_chunks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, chunk ids) per query vector; -1 where fewer than k live chunks exist.

        Deleted documents, and ``exclude_chunks`` (a bool mask over chunk ids that applies to every query, e.g.
        evaluation documents or a database-size subset), are filtered inside FAISS. ``exclude_docs[i]`` lists
        global document indices that query i must not retrieve (e.g. its own document when precomputing RETRO
        neighbours); those are handled by over-fetching and filtering.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        mask = self.deleted_chunks if self.deleted_docs.any() else None
        if exclude_chunks is not None:
            if exclude_chunks.shape != (self.store.n_chunks,):
                raise RetrolmError(f"{self.path}: exclude_chunks must have one entry per chunk ({self.store.n_chunks})")
            mask = exclude_chunks if mask is None else (mask | exclude_chunks)
        nq = len(vectors)
        if not exclude_docs or not any(len(e) for e in exclude_docs):
            return self.index.search(vectors, k, exclude=mask, settings=settings)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        todo = np.arange(nq)
        fetch = 2 * k
        while len(todo):
            s, i = self.index.search(vectors[todo], min(fetch, self.index.ntotal), exclude=mask, settings=settings)
            docs = np.where(i >= 0, self.store.chunk_doc(np.maximum(i, 0)), -1)
            still = []
            for row, q in enumerate(todo):
                keep = (i[row] >= 0) & ~np.isin(docs[row], np.asarray(exclude_docs[q]))
                got = int(keep.sum())
                if got >= k or fetch >= self.index.ntotal or (i[row] < 0).any():
                    take = np.flatnonzero(keep)[:k]
                    scores[q, : len(take)], ids[q, : len(take)] = s[row, take], i[row, take]
                else:
                    still.append(q)
            todo = np.asarray(still, dtype=np.int64)
            fetch *= 4
        return scores, ids

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        """Turn one row of (scores, ids) into :class:`Hit` objects (missing results dropped)."""
        ok = ids >= 0
        ids, scores = ids[ok], scores[ok]
        if len(ids) == 0:
            return []
        cont = self.store.continuation_ids(ids)
        texts = self.chunk_texts(ids)
        cont_texts = self.chunk_texts(cont[cont >= 0]) if (cont >= 0).any() else []
        it = iter(cont_texts)
        docs, pos = self.store.chunk_doc(ids), self.store.chunk_pos(ids)
        return [
            Hit(int(c), self.store.doc_ids[d], float(s), t, next(it) if nx >= 0 else "", int(p))
            for c, s, t, nx, d, p in zip(ids, scores, texts, cont, docs, pos, strict=True)
        ]

    def search(
        self,
        query: str | Sequence[str],
        k: int = 5,
        exclude_doc_ids: Sequence[str] = (),
        settings: SearchSettings | None = None,
        retriever: str = "dense",
    ) -> list[Hit] | list[list[Hit]]:
        """Search by text. A single query returns ``list[Hit]``; a list of queries, one list per query.

        ``retriever="dense"`` (default) embeds the query with the frozen encoder and searches the FAISS index;
        ``"bm25"`` ranks the same chunks lexically (needs ``retrolm[bm25]``; no ``exclude_doc_ids``).
        """
        if k < 1:
            raise RetrolmError(f"k must be >= 1, got {k}")
        single = isinstance(query, str)
        queries = [query] if single else list(query)
        if retriever == "bm25":
            if exclude_doc_ids:
                raise RetrolmError("exclude_doc_ids is not supported with the BM25 retriever")
            from retrolm.bm25 import BM25Index

            scores, ids = BM25Index.for_database(self).search(queries, k)
            results = [self.hits(s, i) for s, i in zip(scores, ids, strict=True)]
            return results[0] if single else results
        if retriever != "dense":
            raise RetrolmError(f"retriever must be dense or bm25, got {retriever!r}")
        excl = [i for i in (self.store.doc_index(d) for d in exclude_doc_ids) if i is not None]
        scores, ids = self.search_vectors(
            self.embed(queries), k, exclude_docs=[excl] * len(queries) if excl else None, settings=settings
        )
        results = [self.hits(s, i) for s, i in zip(scores, ids, strict=True)]
        return results[0] if single else results

    # ---- live updates
    def add(self, corpus: Sequence[str | Path], replace: bool = False, show_progress: bool = True) -> dict:
        """Append documents; new chunks are searchable as soon as this returns. No existing data is rebuilt.

        A document whose id is already live is an error, unless ``replace`` (then the old one is deleted).
        Resumable like :meth:`build`. Returns counts of what was added/replaced.
        """
        with exclusive_lock(self.path):
            self._clean_orphans()
            staging = self.path / ".staging-add"
            plan = {"version": self.meta["version"], "replace": replace, "corpus": corpus_fingerprint(corpus)}
            if (staging / "plan.json").is_file() and read_json(staging / "plan.json") != plan:
                shutil.rmtree(staging)
            staging.mkdir(exist_ok=True)
            write_json(staging / "plan.json", plan)

            live = {d: i for i, d in enumerate(self.store.doc_ids) if not self.deleted_docs[i]}

            def checked(docs: Iterable[Document]) -> Iterator[Document]:
                for doc in docs:  # fail early, before any embedding work
                    if doc.id in live and not replace:
                        raise RetrolmError(
                            f"{doc.source}: document id {doc.id!r} is already in {self.path} (use --replace)"
                        )
                    yield doc

            seg_name = self._next_segment_name()
            seg = staging / seg_name
            info = _tokenize_into_segment(
                checked(iter_documents(corpus)),
                self.tokenizer,
                seg,
                self.chunk_len,
                self.store.n_chunks,
                self.store.n_docs,
                show_progress,
            )
            new_store = ChunkStore.open([seg], self.chunk_len, self.tokenizer.pad_id)
            replaced = [live[d] for d in new_store.doc_ids if d in live]
            config = BuildConfig(
                chunk_len=self.chunk_len,
                encoder=self.meta["encoder"]["name"],
                encoder_max_length=self.meta["encoder"]["max_length"],
                device=self.device,
            )
            shards = _embed_shards(
                new_store, self.tokenizer, self.encoder, staging / "embeddings", config, show_progress
            )
            version = self.meta["version"] + 1
            index_file = f"index-v{version}.faiss"
            index = VectorIndex.load(self.path / self.meta["index"]["file"], mmap=False)
            for vecs in _iter_shards(shards):
                index.add(vecs)
            index.save(staging / index_file)

            deleted = np.concatenate([self.deleted_docs, np.zeros(info["n_docs"], dtype=bool)])
            deleted[replaced] = True
            meta = dict(self.meta, version=version, segments=[*self.meta["segments"], seg_name])
            meta["index"] = dict(meta["index"], file=index_file)
            # Move the finished parts into the database, then commit by rewriting meta.json.
            commit_dir(seg, self.path / "segments" / seg_name)
            os.replace(staging / index_file, self.path / index_file)
            self._commit(meta, deleted)
            shutil.rmtree(staging, ignore_errors=True)
        return {"docs_added": info["n_docs"], "chunks_added": info["n_chunks"], "docs_replaced": len(replaced)}

    def delete(
        self,
        doc_ids: Sequence[str] = (),
        match: str | None = None,
        blocklist: str | Path | None = None,
        show_progress: bool = True,
    ) -> list[str]:
        """Delete documents by id and/or every live document whose text matches a regex or a blocklist term.

        Deleted chunks are never returned by search again (they are filtered inside the index at once;
        :meth:`compact` reclaims the space). Returns the ids deleted.
        """
        patterns = _compile_filters(match, blocklist)
        if not doc_ids and not patterns:
            raise RetrolmError("delete needs document ids, --match or --blocklist")
        with exclusive_lock(self.path):
            self._clean_orphans()
            target = np.zeros(self.store.n_docs, dtype=bool)
            missing = []
            for d in doc_ids:
                i = self.store.doc_index(d)
                if i is None or self.deleted_docs[i]:
                    missing.append(d)
                else:
                    target[i] = True
            if missing:
                logger.warning("not in the database (or already deleted): %s", ", ".join(missing[:10]))
            if patterns:
                live = np.flatnonzero(~self.deleted_docs)
                for i in tqdm(live, desc="filter", unit="doc", disable=not show_progress, leave=False):
                    text = self.tokenizer.decode(self.store.doc_tokens(int(i)).tolist())
                    if any(p.search(text) for p in patterns):
                        target[i] = True
            if target.any():
                meta = dict(self.meta, version=self.meta["version"] + 1)
                self._commit(meta, self.deleted_docs | target)
        return [self.store.doc_ids[i] for i in np.flatnonzero(target)]

    def compact(self, show_progress: bool = True) -> dict:
        """Rewrite the database without deleted documents: one segment, a fresh index, no tombstones.

        Chunk ids change (precomputed neighbours must be recomputed: the database ``version`` says so).
        Vectors are taken from the index, so no re-embedding; with a PQ index they are re-quantised.
        """
        with exclusive_lock(self.path):
            self._clean_orphans()
            keep_docs = np.flatnonzero(~self.deleted_docs)
            version = self.meta["version"] + 1
            seg_name = self._next_segment_name()
            tmp = self.path / ".staging-compact"
            shutil.rmtree(tmp, ignore_errors=True)
            writer = SegmentWriter(
                tmp / seg_name, self.chunk_len, token_dtype(self.tokenizer.vocab_size), self.tokenizer.pad_id, 0, 0
            )
            kept_chunks = []
            sources = self.store.segments
            for i in tqdm(keep_docs, desc="compact", unit="doc", disable=not show_progress, leave=False):
                first, n = int(self.store.doc_first_chunk[i]), int(self.store.doc_n_chunks[i])
                src = _doc_source(sources, int(i))
                writer.add(self.store.doc_ids[i], src, int(self.store.doc_n_bytes[i]), self.store.doc_tokens(int(i)))
                kept_chunks.append(np.arange(first, first + n))
            info = writer.close()
            kept = np.concatenate(kept_chunks) if kept_chunks else np.zeros(0, np.int64)
            index = VectorIndex.create(
                self.index.dim, kind=self.index.kind, n_vectors=len(kept), factory=self.index.factory
            )
            vecs = np.ascontiguousarray(self.index.reconstruct(kept), dtype=np.float32) if len(kept) else None
            if vecs is not None:
                if index.needs_training:
                    rng = np.random.default_rng(0)
                    n_train = min(len(vecs), index.min_train_vectors)
                    index.train(vecs[np.sort(rng.choice(len(vecs), n_train, replace=False))])
                index.add(vecs)
            index_file = f"index-v{version}.faiss"
            index.save(tmp / index_file)
            commit_dir(tmp / seg_name, self.path / "segments" / seg_name)
            os.replace(tmp / index_file, self.path / index_file)
            meta = dict(self.meta, version=version, segments=[seg_name])
            meta["index"] = dict(meta["index"], file=index_file)
            self._commit(meta, np.zeros(info["n_docs"], dtype=bool))
            shutil.rmtree(tmp, ignore_errors=True)
            self._clean_orphans()
        return {"docs": info["n_docs"], "chunks": info["n_chunks"]}

    def _commit(self, meta: dict, deleted_docs: np.ndarray) -> None:
        """Write tombstones, then meta.json (the commit point), then reload this object's view."""
        tomb = None
        if deleted_docs.any():
            tomb = f"tombstones-v{meta['version']}.npy"
            save_npy(self.path / tomb, deleted_docs)
        meta = dict(meta, tombstones=tomb, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        store = ChunkStore.open(
            [self.path / "segments" / s for s in meta["segments"]], self.chunk_len, self.tokenizer.pad_id
        )
        _update_counts(meta, store, deleted_docs)
        write_json(self.path / "meta.json", meta)
        encoder = self._encoder
        self.__init__(self.path, meta, device=self.device)  # type: ignore[misc]
        self._encoder = encoder
        self._clean_orphans()

    def _next_segment_name(self) -> str:
        """A segment name never used by a live segment: one past the highest (compaction renumbers nothing)."""
        used = [int(name.split("-", 1)[1]) for name in self.meta["segments"]]
        return f"seg-{max(used, default=-1) + 1:06d}"

    def _clean_orphans(self) -> None:
        """Remove files a crashed writer left behind that meta.json does not reference."""
        from retrolm.bm25 import index_key

        keep = {self.meta["index"]["file"], self.meta.get("tombstones"), f"bm25-{index_key(self)}"}
        for p in self.path.iterdir():
            stale = p.name.startswith(("index-v", "tombstones-v", "bm25-")) and p.name not in keep
            if p.is_dir() and stale:
                shutil.rmtree(p, ignore_errors=True)
            elif stale or p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
        segs = self.path / "segments"
        for p in segs.iterdir() if segs.is_dir() else ():
            if p.name not in self.meta["segments"]:
                shutil.rmtree(p, ignore_errors=True)

    # ---- description
    def info(self) -> dict:
        """Counts, components and size on disk (what ``retrolm db info`` prints)."""
        m = self.meta
        size = dir_size(self.path)
        return {
            "path": str(self.path),
            "version": m["version"],
            "num_docs": m["num_docs"],
            "num_chunks": m["num_chunks"],
            "num_deleted_docs": m["num_docs_stored"] - m["num_docs"],
            "num_chunks_stored": m["num_chunks_stored"],
            "chunk_len": self.chunk_len,
            "tokenizer": m["tokenizer"]["name"],
            "vocab_size": m["tokenizer"]["vocab_size"],
            "encoder": m["encoder"]["name"],
            "encoder_dim": m["encoder"]["dim"],
            "index_type": m["index"]["kind"],
            "index_factory": m["index"]["factory"],
            "segments": len(m["segments"]),
            "bytes_on_disk": size,
            "bytes_per_chunk": round(size / max(1, m["num_chunks_stored"]), 1),
            "created": m["created"],
            "updated": m["updated"],
        }

    def check_compatible(
        self, encoder: str | None = None, tokenizer: str | None = None, chunk_len: int | None = None
    ) -> None:
        """Refuse to mix in another encoder, tokenizer or chunk length, with a clear error."""
        m = self.meta
        if chunk_len is not None and chunk_len != self.chunk_len:
            raise RetrolmError(f"{self.path}: database has chunk_len {self.chunk_len}, got {chunk_len}")
        if encoder is not None and encoder != m["encoder"]["name"]:
            raise RetrolmError(
                f"{self.path}: database was built with encoder {m['encoder']['name']!r}, got {encoder!r}"
            )
        if tokenizer is not None and tokenizer != m["tokenizer"]["name"]:
            other = resolve_tokenizer(tokenizer) if parse_train_spec(tokenizer) is None else None
            if other is None or other.sha256 != m["tokenizer"]["sha256"]:
                raise RetrolmError(
                    f"{self.path}: database was built with tokenizer {m['tokenizer']['name']!r}, got {tokenizer!r}"
                )


def _doc_source(segments, doc: int) -> str:
    for s in segments:
        if s.first_doc <= doc < s.first_doc + s.n_docs:
            return s.docs.column("source")[doc - s.first_doc].as_py()
    raise IndexError(doc)


def _update_counts(meta: dict, store: ChunkStore, deleted_docs: np.ndarray) -> None:
    meta["num_docs_stored"] = store.n_docs
    meta["num_chunks_stored"] = store.n_chunks
    meta["num_docs"] = int((~deleted_docs).sum())
    meta["num_chunks"] = int(store.doc_n_chunks[~deleted_docs].sum()) if store.n_docs else 0


def _swap_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``staging`` folder; the old one survives until the new is in place."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _recover_interrupted_swap(out: Path) -> None:
    """If a crash hit between the two renames of :func:`_swap_into_place`, finish or undo it."""
    old = out.with_name(out.name + ".old")
    if out.exists() or not old.exists():
        return
    staging = out.with_name(out.name + ".partial")
    if (staging / "meta.json").is_file() and not (staging / "embeddings").exists():
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, out)
