"""The retrieval database: a self-describing folder of chunks, their frozen-encoder keys and indexes, kept up to date
without retraining anything.

Layout (``meta.json`` is the commit point: a change becomes visible only when it is rewritten)::

    DB/
      meta.json              format version, tokenizer, encoder (+ weights fingerprint), chunk_len, counts, index,
                             segments, tombstones, and the size and SHA-256 of every file it references
      build.yaml             the BuildConfig that created the database
      tokenizer.json         the LM tokenizer (chunks are stored as its token ids)
      segments/seg-000000/   chunk tokens, lengths, document index, position; documents table (see chunks.py)
      index-v3.faiss         FAISS index over all stored chunks (ids = chunk ids), versioned
      bm25-v3/               optional BM25 index over the same chunks
      tombstones-v3.npy      bool per document: deleted documents are never returned by search

Live updates need no retraining: ``add`` writes a new segment and appends its vectors to the index; ``delete`` marks
documents deleted (filtered inside the indexes at search time); ``compact`` rewrites everything without them.

Writers take the database's lock (a second writer waits), then re-read ``meta.json``: a writer never acts on a view
of the database that another writer has since changed. Every file is written to a temporary name and renamed; an
``add`` is staged in ``DB/.staging-add/`` and resumable like a build.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from retrolm.core.errors import RetrolmError
from retrolm.core.io import commit_dir, exclusive_lock, read_json, save_npy, write_json
from retrolm.core.versions import library_versions
from retrolm.db.build import BuildConfig, build_database, embed_shards, make_index, shard_blocks, tokenize_into_segment
from retrolm.db.chunks import ChunkStore, SegmentWriter, token_dtype
from retrolm.db.index import VectorIndex
from retrolm.db.lexical import LENGTHS, LexicalIndex
from retrolm.db.meta import FORMAT_VERSION, db_path, file_records, now, referenced_files, update_counts
from retrolm.db.view import DatabaseView, meta_stamp
from retrolm.text.corpus import Document, belongs, corpus_fingerprint, iter_documents

logger = logging.getLogger(__name__)

STAGING_ADD = ".staging-add"


def compile_filters(match: str | None, blocklist: str | Path | None) -> list[re.Pattern]:
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
            terms = [t.strip() for t in path.read_text(encoding="utf-8-sig").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise RetrolmError(f"{path}: cannot read blocklist ({e})") from None
        terms = [t for t in terms if t and not t.startswith("#")]
        if not terms:
            raise RetrolmError(f"{path}: blocklist has no terms")
        # whole words: no word character on either side (\b needs one inside, so "C++" or ".NET" never matched)
        patterns.append(re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in terms) + r")(?!\w)",
                                   re.IGNORECASE))
    return patterns


class Database(DatabaseView):
    """A retrieval database folder: :meth:`build` one, :meth:`open` it, :meth:`add`, :meth:`delete`, :meth:`compact`."""

    @classmethod
    def build(
        cls,
        corpus: Sequence[str | Path],
        out: str | Path,
        config: BuildConfig | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> Database:
        """Build a database from corpus paths into folder ``out`` (resumable; see :mod:`retrolm.db.build`)."""
        out = db_path(out)
        build_database(corpus, out, config or BuildConfig(), overwrite=overwrite, show_progress=show_progress)
        db = cls.open(out)
        logger.info("built %s: %d documents, %d chunks", out, db.store.n_docs, db.store.n_chunks)
        return db

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the write lock with an up-to-date view, and no debris of crashed writers."""
        with exclusive_lock(self.path):
            self.reload()
            self._clean_orphans()
            yield

    # ---- live updates
    def add(self, corpus: Sequence[str | Path], replace: bool = False, show_progress: bool = True,
            duplicate_hint: str = "use --replace") -> dict:
        """Append documents; new chunks are searchable as soon as this returns. No existing data is rebuilt.

        A document whose id is already live is an error (its message ending in ``duplicate_hint``), unless ``replace``
        (then the old one is deleted).
        Resumable like :meth:`build`. Returns counts of what was added/replaced.
        """
        here = self.path.resolve()
        for c in map(Path, corpus):
            if c.exists() and (here.is_relative_to(c.resolve()) or c.resolve().is_relative_to(here)):
                # its own files (meta.json, tokenizer.json, the staging folder) would become documents
                raise RetrolmError(f"{c}: is the database {self.path} or holds it; add another corpus")
        with self._writing():
            staging = self.path / STAGING_ADD
            plan = {"version": self.meta["version"], "build_id": self.meta.get("build_id"), "replace": replace,
                    "corpus": corpus_fingerprint(corpus)}
            if (staging / "plan.json").is_file() and read_json(staging / "plan.json") != plan:
                shutil.rmtree(staging)
            staging.mkdir(exist_ok=True)
            write_json(staging / "plan.json", plan)
            try:
                result = self._add_staged(staging, corpus, replace, show_progress, duplicate_hint)
            except (RetrolmError, OSError):
                if not any((staging / "embeddings").glob("*.npy")):  # nothing worth resuming
                    shutil.rmtree(staging, ignore_errors=True)
                raise
            shutil.rmtree(staging, ignore_errors=True)
        return result

    def _add_staged(self, staging: Path, corpus: Sequence[str | Path], replace: bool, show_progress: bool,
                    duplicate_hint: str) -> dict:
        live = {d: i for i, d in enumerate(self.store.doc_ids) if not self.deleted_docs[i]}
        by_name: dict[str, list[str]] = {}  # live ids by their last path part, for --replace's hint below
        if replace:
            for d in live:
                by_name.setdefault(d.rsplit("/", 1)[-1], []).append(d)

        shard, elsewhere = self.shard, [0]

        def checked(docs: Iterable[Document]) -> Iterator[Document]:
            for doc in docs:  # fail early, before any embedding work
                if not belongs(doc.id, shard):
                    elsewhere[0] += 1  # another shard's document: its own database takes it
                    continue
                if doc.id in live and not replace:
                    raise RetrolmError(
                        f"{doc.source}: document id {doc.id!r} is already in {self.path} ({duplicate_hint})")
                if replace and doc.id not in live and (same := [d for d in by_name.get(doc.id, []) if d != doc.id]):
                    # a file's id is its path under the folder given: the edited file given alone gets its bare name
                    logger.warning("%s: document id %r replaces nothing; %s holds %s (a file's id is its path under "
                                   "the folder given: add the folder, not the file, to replace it)", doc.source,
                                   doc.id, self.path, ", ".join(map(repr, same[:3])))
                yield doc

        seg_name = self._next_segment_name()
        seg = staging / seg_name
        info = tokenize_into_segment(checked(iter_documents(corpus)), self.tokenizer, seg, self.chunk_len,
                                     self.store.n_chunks, self.store.n_docs, show_progress)
        if info["n_docs"] == 0:  # every document belongs to other shards: nothing to commit
            return {"docs_added": 0, "chunks_added": 0, "docs_replaced": 0, "docs_other_shards": elsewhere[0]}
        new_store = ChunkStore.open([seg], self.chunk_len, self.tokenizer.pad_id)
        replaced = [live[d] for d in new_store.doc_ids if d in live]
        version = self.meta["version"] + 1
        meta = dict(self.meta, version=version, segments=[*self.meta["segments"], seg_name])
        moves = [(seg, self.path / "segments" / seg_name)]
        if self.index is not None:
            enc = self.meta["encoder"]
            config = BuildConfig(chunk_len=self.chunk_len, encoder=enc["name"], encoder_max_length=enc["max_length"],
                                 device=self.device)
            shards = embed_shards(new_store, self.tokenizer, self.encoder, staging / "embeddings", config,
                                  show_progress)
            index = VectorIndex.load(self.path / self.meta["index"]["file"], mmap=False)
            for vecs in shard_blocks(shards):
                index.add(vecs)
            index_file = f"index-v{version}.faiss"
            index.save(staging / index_file)
            meta["index"] = dict(meta["index"], file=index_file)
            moves.append((staging / index_file, self.path / index_file))
        deleted = np.concatenate([self.deleted_docs, np.zeros(info["n_docs"], dtype=bool)])
        deleted[replaced] = True
        # Move the finished parts into the database, then commit by rewriting meta.json.
        for src, dst in moves:
            commit_dir(src, dst) if src.is_dir() else os.replace(src, dst)
        self._commit(meta, deleted)
        return {"docs_added": info["n_docs"], "chunks_added": info["n_chunks"], "docs_replaced": len(replaced),
                "docs_other_shards": elsewhere[0]}

    def delete(
        self,
        doc_ids: Sequence[str] = (),
        match: str | None = None,
        blocklist: str | Path | None = None,
        show_progress: bool = True,
    ) -> list[str]:
        """Delete documents by id and/or every live document whose text matches a regex or a blocklist term.

        Deleted chunks are never returned by search again (they are filtered inside the indexes at once;
        :meth:`compact` reclaims the space). Returns the ids deleted.
        """
        patterns = compile_filters(match, blocklist)
        if not doc_ids and not patterns:
            raise RetrolmError("delete needs document ids, --match or --blocklist")
        with self._writing():
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
                self._commit(dict(self.meta, version=self.meta["version"] + 1), self.deleted_docs | target)
        return [self.store.doc_ids[i] for i in np.flatnonzero(target)]

    def compact(self, show_progress: bool = True) -> dict:
        """Rewrite the database without deleted documents: one segment, fresh indexes, no tombstones.

        Chunk ids change (precomputed neighbours must be recomputed: the database ``version`` says so).
        Vectors are taken from the index, so no re-embedding; with a PQ index they are re-quantised.
        """
        with self._writing():
            keep_docs = np.flatnonzero(~self.deleted_docs)
            version = self.meta["version"] + 1
            seg_name = self._next_segment_name()
            tmp = self.path / ".staging-compact"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                info = self._compact_into(tmp, keep_docs, version, seg_name, show_progress)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed compaction (a full disk) leaves nothing behind
            self._clean_orphans()
        return {"docs": info["n_docs"], "chunks": info["n_chunks"]}

    def _compact_into(self, tmp: Path, keep_docs: np.ndarray, version: int, seg_name: str, show_progress: bool
                      ) -> dict:
        """Write the compacted segment and index into ``tmp``, move them in, commit."""
        writer = SegmentWriter(tmp / seg_name, self.chunk_len, token_dtype(self.tokenizer.vocab_size),
                               self.tokenizer.pad_id, 0, 0)
        kept_chunks = []
        for i in tqdm(keep_docs, desc="compact", unit="doc", disable=not show_progress, leave=False):
            first, n = int(self.store.doc_first_chunk[i]), int(self.store.doc_n_chunks[i])
            writer.add(self.store.doc_ids[i], self.store.doc_source(int(i)), int(self.store.doc_n_bytes[i]),
                       self.store.doc_tokens(int(i)))
            kept_chunks.append(np.arange(first, first + n))
        info = writer.close()
        kept = np.concatenate(kept_chunks) if kept_chunks else np.zeros(0, np.int64)
        meta = dict(self.meta, version=version, segments=[seg_name])
        if self.index is not None:
            old = self.index
            kind, factory = old.kind, self._index_factory()
            need = VectorIndex.create(old.dim, kind=old.kind, factory=factory).fewest_train_vectors
            if len(kept) < need:  # too few to train the same kind of index again (none kept: it would stay untrained)
                logger.warning("%s: compaction keeps %d chunks, fewer than the %d a %s index trains on; the compacted "
                               "index is exact (flat)", self.path, len(kept), need, factory)
                kind, factory = "auto", None
            index = make_index(
                old.dim, len(kept),
                lambda: (old.reconstruct(kept[s : s + 65536]) for s in range(0, len(kept), 65536)),
                lambda n: old.reconstruct(np.sort(np.random.default_rng(0).choice(kept, min(n, len(kept)),
                                                                                    replace=False))),
                kind=kind, factory=factory)
            meta["index"] = dict(meta["index"], kind=index.kind, factory=index.factory,
                                 file=f"index-v{version}.faiss")
            index.save(tmp / meta["index"]["file"])
            os.replace(tmp / meta["index"]["file"], self.path / meta["index"]["file"])
        commit_dir(tmp / seg_name, self.path / "segments" / seg_name)
        self._commit(meta, np.zeros(info["n_docs"], dtype=bool))
        return info

    def _index_factory(self) -> str:
        """The FAISS factory string of this database's index, to build it again (compaction): the one build.yaml asked
        for when it builds this kind of index (not after a compaction fell back to flat), else the one meta.json
        records (an earlier release recorded it as read back from the index: RR32, L2norm or residual quantizers do not
        parse, fsr reads back as fs), else the one read back now."""
        old = self.index
        assert old is not None
        asked = None
        if (self.path / "build.yaml").is_file():
            try:
                asked = (yaml.safe_load((self.path / "build.yaml").read_text()) or {}).get("index_factory")
            except (OSError, yaml.YAMLError, AttributeError):
                asked = None
        # build.yaml's first: an earlier release recorded the string read back, which FAISS may parse as another
        # index (IVF8,PQ8x4fsr read back as ...x4fs); what was asked is refused below if the kind has changed since
        for factory in dict.fromkeys(f for f in (asked, (self.meta.get("index") or {}).get("factory"), old.factory)
                                     if isinstance(f, str) and f):
            try:
                VectorIndex.create(old.dim, kind=old.kind, factory=factory)
                return factory
            except RetrolmError:
                continue
        raise RetrolmError(f"{self.path}: cannot build its {old.kind} index again (factory {old.factory!r} is not "
                           "one FAISS parses; build.yaml names none): rebuild the database to compact it")

    def store_bm25(self, show_progress: bool = True) -> None:
        """Build and store a BM25 index over the chunks (kept up to date by later adds and compactions)."""
        with self._writing():
            folder = self.meta.get("bm25")
            if folder and (self.path / folder / LENGTHS).is_file():
                return  # already stored, and kept up to date by every write since
            # none stored, or one stored before its chunk lengths were (which sharded search needs): made again
            self._commit(dict(self.meta, version=self.meta["version"] + 1, bm25=True), self.deleted_docs,
                         show_progress=show_progress, rebuild_bm25=True)

    def _commit(self, meta: dict, deleted_docs: np.ndarray, show_progress: bool = False,
                rebuild_bm25: bool = False) -> None:
        """Rebuild the BM25 index if the chunk set changed, write tombstones, then meta.json (the commit point), then
        reload this object's view."""
        store = ChunkStore.open([self.path / "segments" / s for s in meta["segments"]], self.chunk_len,
                                self.tokenizer.pad_id)
        if meta.get("bm25") and (rebuild_bm25 or meta["segments"] != self.meta["segments"] or
                                 not self.meta.get("bm25")):
            meta["bm25"] = f"bm25-v{meta['version']}"
            LexicalIndex.build(lambda ids: store.texts(ids, self.tokenizer), store.n_chunks, show_progress).save(
                self.path / meta["bm25"])
        elif meta.get("bm25"):
            meta["bm25"] = self.meta["bm25"]  # the stored index still covers these chunks (a folder name, never True)
        tomb = None
        if deleted_docs.any():
            tomb = f"tombstones-v{meta['version']}.npy"
            save_npy(self.path / tomb, deleted_docs)
        # software: the libraries of the last write, which may have rebuilt the BM25 index or added keys
        meta = dict(meta, tombstones=tomb, updated=now(), format_version=FORMAT_VERSION, software=library_versions())
        update_counts(meta, store.n_docs, store.n_chunks, store.doc_n_chunks, deleted_docs)
        meta["files"] = file_records(self.path, referenced_files(meta, self.path), known=self.meta.get("files"))
        write_json(self.path / "meta.json", meta)
        self._stamp = meta_stamp(self.path)  # this view wrote it: nothing to re-read at the next search
        self._load(meta, verify=False)
        self._clean_orphans()

    def _next_segment_name(self) -> str:
        """A segment name never used by a live segment: one past the highest (compaction renumbers nothing)."""
        used = [int(name.split("-", 1)[1]) for name in self.meta["segments"]]
        return f"seg-{max(used, default=-1) + 1:06d}"

    def _clean_orphans(self) -> None:
        """Remove files a crashed writer left behind that meta.json does not reference (call only under the lock,
        with a freshly read meta.json: another writer's new files are referenced by then)."""
        keep = {(self.meta.get("index") or {}).get("file"), self.meta.get("tombstones"), self.meta.get("bm25")}
        for p in self.path.iterdir():
            stale = p.name.startswith(("index-v", "tombstones-v", "bm25-")) and p.name not in keep
            if p.is_dir() and (stale or p.name.endswith(".tmp")):
                shutil.rmtree(p, ignore_errors=True)
            elif stale or p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
        segs = self.path / "segments"
        for p in segs.iterdir() if segs.is_dir() else ():
            if p.name not in self.meta["segments"]:
                shutil.rmtree(p, ignore_errors=True)


def noisy_copy(db: DatabaseView, path: Path, noise: Sequence[str | Path], show_progress: bool = False) -> Database:
    """A copy of ``db`` at ``path`` with the ``noise`` documents added (unrelated text for robustness runs), reused
    when it already holds exactly them: the same build and version of ``db`` (a rebuilt database starts again at
    version 1) and the same noise files, unchanged."""
    marker = path / "noise.json"
    want = {"source_version": db.meta["version"], "source": str(db.path.resolve()), "noise": [str(n) for n in noise],
            "source_build": db.meta.get("build_id"), "noise_files": corpus_fingerprint(noise)}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return Database.open(path)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(db.path, path)
    noisy = Database.open(path)
    noisy.add(noise, show_progress=show_progress, duplicate_hint="noise must be other documents than the database's")
    write_json(marker, want)
    return Database.open(path)
