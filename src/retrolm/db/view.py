"""The read side of a database folder: its chunks, frozen-encoder keys, indexes and deleted documents.

:class:`DatabaseView` opens a folder described by ``meta.json`` and answers questions about it: chunk texts and
continuations, vector search with deleted or excluded chunks filtered inside FAISS, counts and sizes. Writers
(:class:`retrolm.db.Database`) extend it. Retrieval by text (dense, BM25, hybrid) is :mod:`retrolm.retrieval`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import resolve_model
from retrolm.core.io import dir_size, load_npy, read_json
from retrolm.db.chunks import ChunkStore
from retrolm.db.index import SearchSettings, VectorIndex
from retrolm.db.lexical import SCORER, LexicalIndex
from retrolm.db.meta import db_path, read_meta, recover_interrupted_swap, verify_files
from retrolm.text.encoder import SentenceEncoder
from retrolm.text.tokenizer import LMTokenizer

logger = logging.getLogger(__name__)

MAX_SCORE = 1.5
"""Keys and queries are unit vectors: an inner product beyond this (or NaN) means the index file is damaged."""


def meta_stamp(path: Path) -> tuple | None:
    """What changes whenever a writer commits (meta.json is replaced by a rename: a new inode)."""
    try:
        st = (path / "meta.json").stat()
    except OSError:  # a rebuild is swapping the folder: keep what is loaded until the next search
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _as_bool_mask(mask: np.ndarray, path: Path) -> np.ndarray:
    """A caller's exclusion mask as bool: 0/1 integers are taken as False/True (``~`` on them is -1/-2, which BM25
    read as "allowed" for every chunk, inverting the exclusion); anything else (chunk ids, scores) is refused."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all():
        return mask.astype(bool)
    raise RetrolmError(f"{path}: exclude_chunks must be a bool mask over chunk ids (True = never return), "
                       f"got {mask.dtype} values")


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


OPEN_ATTEMPTS = 5
"""How often opening a database reads meta.json again when a writer committed while its files were opened."""


class DatabaseView:
    """A database folder opened for reading. Open with :meth:`open`."""

    def __init__(self, path: Path, meta: dict, device: str | None = None, verify: bool = True,
                 stamp: tuple | None = None, follow: bool = False):
        self.path = path
        self.device = device
        self.follow = follow
        self._encoder: SentenceEncoder | None = None
        self._lexical: LexicalIndex | None = None
        self._stamp = stamp
        self._behind = False  # another process changed the chunks and this view kept its own (said once)
        self._matched: tuple | None = None  # this view's documents among another set of segments (see _deleted_in)
        self._load(meta, verify)

    def _load(self, meta: dict, verify: bool = True) -> None:
        """Open the files ``meta`` describes; the view changes only once every one of them opened (a file a writer
        replaced meanwhile leaves it as it was)."""
        path = self.path
        if verify:
            verify_files(path, meta)
        chunk_len: int = meta["chunk_len"]
        tokenizer = LMTokenizer.from_file(path / "tokenizer.json", name=meta["tokenizer"]["name"])
        if tokenizer.sha256 != meta["tokenizer"]["sha256"]:
            raise RetrolmError(f"{path / 'tokenizer.json'}: differs from the tokenizer the database was built with")
        store = ChunkStore.open([path / "segments" / s for s in meta["segments"]], chunk_len, tokenizer.pad_id)
        index_meta = meta.get("index")
        index = VectorIndex.load(path / index_meta["file"], mmap=True) if index_meta else None
        if index is not None and index.ntotal != store.n_chunks:
            raise RetrolmError(f"{path}: index has {index.ntotal} vectors but the segments hold {store.n_chunks} "
                               "chunks")
        deleted = self._tombstones(meta, store.n_docs)
        if self._encoder is not None and meta.get("encoder") != self.meta.get("encoder"):
            self._encoder = None  # the database was rebuilt with another encoder since this object loaded one
        if self._lexical is not None and (meta.get("bm25") != self.meta.get("bm25")
                                          or meta["segments"] != self.meta["segments"]
                                          or meta.get("build_id") != self.meta.get("build_id")):
            # another stored index, chunks added / renumbered under an in-memory one, or a rebuilt database (whose
            # files start again at the same names)
            self._lexical = None
        self.meta, self.chunk_len, self.tokenizer, self.store, self.index = meta, chunk_len, tokenizer, store, index
        self.deleted_docs = deleted
        self._deleted_chunks: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path, device: str | None = None, follow: bool = False):
        """Open an existing database folder. Sizes and checksums of its files are checked (see :mod:`.meta`).

        Deletions made by other processes count from the next search on (see :meth:`refresh`). Additions, a
        compaction or a rebuild renumber what a run may hold (chunk ids, exclusion masks, neighbours): the view keeps
        the chunks it opened, with a warning, unless ``follow`` (a process that only serves searches)."""
        path = db_path(path)
        recover_interrupted_swap(path)
        attempts = 0
        while True:
            stamp = meta_stamp(path)  # before reading: a write in between is picked up by the next refresh
            try:
                return cls(path, read_meta(path), device=device, stamp=stamp, follow=follow)
            except RetrolmError:
                # a writer committed while the files were opened, and removed the version this read named: read
                # the new one (a file missing without a commit is the database's fault, said as it is)
                attempts += 1
                if attempts == OPEN_ATTEMPTS or meta_stamp(path) == stamp:
                    raise

    def refresh(self) -> bool:
        """Take in what other processes wrote since this view last read ``meta.json``; one ``stat`` when nothing
        changed. Every search calls it, so a document another process deleted (or replaced) is never returned again.
        A write that changes the chunks (an add, a compaction, a rebuild) is taken in whole only by a view opened with
        ``follow``; another keeps reading the chunks it opened (their files stay readable while mapped), still hides
        every document deleted since, and says once that it is behind. True if the view changed."""
        stamp = meta_stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return False
        try:
            meta = read_meta(self.path)
        except RetrolmError:  # caught mid-swap: the next search looks again
            return False
        same_chunks = (meta.get("build_id") == self.meta.get("build_id") and meta["segments"] == self.meta["segments"]
                       and meta.get("index") == self.meta.get("index"))
        if self.follow and not same_chunks:
            try:
                return self.reload()
            except RetrolmError:  # a file replaced by a later write meanwhile: the view is as it was; next search
                return False
        try:
            deleted = self._deleted_in(meta)
        except RetrolmError:  # a file replaced by a later write meanwhile: the next search reads that one
            return False
        self._stamp = stamp
        if not same_chunks and not self._behind:
            self._behind = True
            logger.warning("%s: changed by another process (version %s: chunks added or renumbered); this process "
                           "keeps reading the chunks of version %s, without the documents deleted since, until it "
                           "opens the database again", self.path, meta["version"], self.meta["version"])
        changed = bool((deleted != self.deleted_docs).any())
        if same_chunks:  # a BM25 index already loaded (or built in memory) covers the same chunks: it stays
            self.meta = meta
        if changed:
            self.deleted_docs, self._deleted_chunks = deleted, None
        return changed

    def _deleted_in(self, meta: dict) -> np.ndarray:
        """This view's documents that are deleted in the database ``meta`` describes: its tombstones when the view's
        segments are the first of it (the same chunks, or chunks added after them), else (a compaction, a rebuild)
        every document that is no longer live there under the same id, size and source."""
        n = self.store.n_docs
        if meta.get("build_id") == self.meta.get("build_id") and meta["segments"][: len(self.meta["segments"])] == \
                self.meta["segments"]:
            return self.deleted_docs | self._tombstones(meta, n, grown=True)
        key = (meta.get("build_id"), tuple(meta["segments"]))
        if self._matched is None or self._matched[0] != key:
            # once per set of segments (a compaction), not at every later write: which of the other database's
            # documents are each of this view's, by what a compaction keeps and a replacement changes
            store = ChunkStore.open([self.path / "segments" / s for s in meta["segments"]], meta["chunk_len"],
                                    self.tokenizer.pad_id)

            def identity(st: ChunkStore, i: int) -> tuple:
                return st.doc_ids[i], int(st.doc_n_tokens[i]), int(st.doc_n_bytes[i]), st.doc_source(i)

            where: dict[tuple, list[int]] = {}
            for j in range(store.n_docs):
                where.setdefault(identity(store, j), []).append(j)
            pairs = np.asarray([(i, j) for i in range(n) for j in where.get(identity(self.store, i), ())],
                               dtype=np.int64).reshape(-1, 2)
            self._matched = (key, pairs[:, 0], pairs[:, 1], store.n_docs)
        _, owner, other, n_other = self._matched
        gone = self._tombstones(meta, n_other)
        alive = np.bincount(owner, weights=(~gone[other]).astype(np.float64), minlength=n)
        return self.deleted_docs | (alive == 0)

    def _tombstones(self, meta: dict, n_docs: int, grown: bool = False) -> np.ndarray:
        """The deleted-documents mask ``meta`` names (none deleted without one) over ``n_docs`` documents; ``grown``:
        over the first ``n_docs`` of a database that may hold more since."""
        tomb = meta.get("tombstones")
        deleted = load_npy(self.path / tomb).astype(bool) if tomb else np.zeros(n_docs, dtype=bool)
        if len(deleted) < n_docs or (len(deleted) != n_docs and not grown):
            raise RetrolmError(f"{self.path / tomb}: has {len(deleted)} entries for {n_docs} documents")
        return deleted[:n_docs]

    def reload(self) -> bool:
        """Re-read ``meta.json`` (another process may have changed the database) and open what it describes, chunks
        included; True if it had changed."""
        stamp = meta_stamp(self.path)
        meta = read_meta(self.path)
        if meta.get("build_id") == self.meta.get("build_id") and meta["version"] == self.meta["version"]:
            self._stamp = stamp
            return False
        self._load(meta)
        self._stamp, self._behind = stamp, False
        return True

    # ---- components
    @property
    def shard(self) -> tuple[int, int] | None:
        """(I, N) when this database is shard I of N (built with ``shard=I/N``), else None."""
        sh = self.meta.get("shard")
        return (sh["index"], sh["count"]) if sh else None

    @property
    def has_dense(self) -> bool:
        """Whether the database holds frozen-encoder keys (a BM25-only database does not)."""
        return self.index is not None

    @property
    def encoder(self) -> SentenceEncoder:
        """The database's frozen encoder, loaded on first use and checked against the one that made the keys."""
        if self._encoder is None:
            enc = self.meta.get("encoder")
            if not enc:
                raise RetrolmError(f"{self.path}: built without dense keys (BM25 only); search it with BM25")
            name = enc["name"]
            if Path(name).is_absolute() and not Path(name).exists():
                raise RetrolmError(f"{name}: encoder folder recorded in {self.path / 'meta.json'} not found")
            if Path(name).exists() and not Path(name).is_absolute():
                logger.warning("%s: encoder recorded as a relative path (%s), resolved from the current directory",
                               self.path, name)
            encoder = SentenceEncoder(name, device=self.device, max_length=enc["max_length"])
            if encoder.dim != enc["dim"]:
                raise RetrolmError(
                    f"{self.path}: encoder {name!r} now has dim {encoder.dim}, database was built with {enc['dim']}"
                )
            if enc.get("fingerprint") and encoder.fingerprint and encoder.fingerprint != enc["fingerprint"]:
                raise RetrolmError(
                    f"{encoder.path}: encoder weights differ from the ones that made {self.path}'s keys "
                    "(the folder was replaced?); search results would be meaningless"
                )
            self._encoder = encoder
        return self._encoder

    def same_encoder(self, name: str) -> bool:
        """Whether ``name`` (any reference form) is this database's encoder: same resolved name or same weights."""
        enc = self.meta.get("encoder")
        if not enc:
            return False
        ref = resolve_model(name, what="encoder")
        if ref.name == enc["name"]:
            return True
        if ref.local and enc.get("fingerprint"):
            from retrolm.core.hub import weights_fingerprint

            return weights_fingerprint(ref.path) == enc["fingerprint"]
        return False

    def _bm25_folder(self) -> Path | None:
        return self.path / self.meta["bm25"] if self.meta.get("bm25") else None

    def _bm25_scorer(self) -> dict | None:
        """The stored BM25 index's scorer (bm25s release, variant, parameters); None if not recorded."""
        folder = self._bm25_folder()
        if folder is None or not (folder / SCORER).is_file():
            return None
        return read_json(folder / SCORER, "BM25 scorer record")

    @property
    def lexical(self) -> LexicalIndex:
        """The BM25 index: the stored one, or (if the database has none) one built in memory for this session."""
        if self._lexical is None:
            folder = self._bm25_folder()
            if self._behind:
                # the stored index now covers the other process's chunks (a rebuild even reuses its name)
                logger.info("%s: building a BM25 index in memory over the chunks this view kept", self.path)
                self._lexical = LexicalIndex.build(self.chunk_texts, self.store.n_chunks)
            elif folder is not None and not folder.exists():  # a writer replaced it between refresh and here
                raise RetrolmError(f"{self.path}: changed by another process since this view opened it (its BM25 "
                                   f"index {folder.name} is gone); open the database again")
            elif folder is not None:
                self._lexical = LexicalIndex.load(folder, texts=self.chunk_texts)
            else:
                logger.info("%s: no BM25 index stored; building one in memory (`retrolm db bm25` stores it)",
                            self.path)
                self._lexical = LexicalIndex.build(self.chunk_texts, self.store.n_chunks)
        return self._lexical

    @property
    def deleted_chunks(self) -> np.ndarray:
        """Bool mask over chunk ids: True for chunks of deleted documents."""
        if self._deleted_chunks is None:
            self._deleted_chunks = self.deleted_docs[self.store.all_chunk_docs()]
        return self._deleted_chunks

    def live_doc_ids(self) -> list[str]:
        return [d for d, dead in zip(self.store.doc_ids, self.deleted_docs, strict=True) if not dead]

    # ---- chunks
    def document(self, doc_id: str) -> dict | None:
        """A live document as stored: ``source`` (the file it came from), ``chunks`` ([first, end) chunk ids) and
        ``text`` (its chunks' tokens decoded); None when the database holds no live document of that id."""
        store = self.store
        i = store.doc_index(doc_id)
        if i is None or self.deleted_docs[i]:
            return None
        first, n = int(store.doc_first_chunk[i]), int(store.doc_n_chunks[i])
        return {"source": store.doc_source(i), "chunks": [first, first + n],
                "text": self.tokenizer.decode(store.doc_tokens(i).tolist())}

    def chunk_texts(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The chunks as text."""
        return self.store.texts(np.asarray(ids, dtype=np.int64), self.tokenizer)

    def embed(self, texts: Sequence[str], batch_size: int = 128, show_progress: bool = False) -> np.ndarray:
        """Query vectors, formatted exactly like the database's keys."""
        return self.encoder.encode(list(texts), batch_size=batch_size, show_progress=show_progress)

    def exclusion_mask(self, exclude_chunks: np.ndarray | None = None) -> np.ndarray | None:
        """Deleted chunks, OR-ed with a caller's bool mask over chunk ids; None when nothing is excluded."""
        mask = self.deleted_chunks if self.deleted_docs.any() else None
        if exclude_chunks is not None:
            if exclude_chunks.shape != (self.store.n_chunks,):
                raise RetrolmError(f"{self.path}: exclude_chunks must have one entry per chunk ({self.store.n_chunks}; "
                                   "another process may have added to or compacted the database since the mask was "
                                   "made)")
            exclude_chunks = _as_bool_mask(exclude_chunks, self.path)
            mask = exclude_chunks if mask is None else (mask | exclude_chunks)
        return mask

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 5,
        exclude_chunks: np.ndarray | None = None,
        settings: SearchSettings | None = None,
        refresh: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, chunk ids) per query vector; -1 where fewer than k live chunks exist. Deleted documents and
        ``exclude_chunks`` (a bool mask over chunk ids, e.g. evaluation documents) are filtered inside FAISS.
        ``refresh=False``: the caller refreshed the view when it made ``exclude_chunks`` (a retriever's search), which
        must not change under it."""
        if refresh:
            self.refresh()
        if self.index is None:
            raise RetrolmError(f"{self.path}: built without dense keys (BM25 only); search it with BM25")
        if self.store.n_chunks == 0:  # everything deleted and compacted away: nothing to find (hybrid asks for k=0)
            n = len(vectors)
            return np.full((n, max(k, 0)), -np.inf, dtype=np.float32), np.full((n, max(k, 0)), -1, dtype=np.int64)
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k,
                                        exclude=self.exclusion_mask(exclude_chunks), settings=settings)
        found = ids >= 0
        if (ids >= self.store.n_chunks).any() or not np.all(np.abs(scores[found]) <= MAX_SCORE):
            raise RetrolmError(
                f"{self.path / self.meta['index']['file']}: returned impossible results; the index is corrupt "
                f"(check with `retrolm db info --verify {self.path}`, then rebuild)"
            )
        return scores, ids

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        """Turn one row of (scores, ids) into :class:`Hit` objects (missing results dropped)."""
        ok = ids >= 0
        ids, scores = ids[ok], scores[ok]
        if len(ids) == 0:
            return []
        cont = self.store.continuation_ids(ids)
        texts = self.chunk_texts(ids)
        cont_texts = iter(self.chunk_texts(cont[cont >= 0]) if (cont >= 0).any() else [])
        docs, pos = self.store.chunk_doc(ids), self.store.chunk_pos(ids)
        return [
            Hit(int(c), self.store.doc_ids[d], float(s), t, next(cont_texts) if nx >= 0 else "", int(p))
            for c, s, t, nx, d, p in zip(ids, scores, texts, cont, docs, pos, strict=True)
        ]

    # ---- description
    def info(self) -> dict:
        """Counts, components and size on disk (what ``retrolm db info`` prints)."""
        m = self.meta
        size = dir_size(self.path)
        enc, index = m.get("encoder") or {}, m.get("index") or {}
        return {
            "path": str(self.path),
            "build_id": m.get("build_id"),
            "format_version": m["format_version"],
            "version": m["version"],
            "num_docs": m["num_docs"],
            "num_chunks": m["num_chunks"],
            "num_deleted_docs": m["num_docs_stored"] - m["num_docs"],
            "num_chunks_stored": m["num_chunks_stored"],
            "chunk_len": self.chunk_len,
            "tokenizer": m["tokenizer"]["name"],
            "tokenizer_sha256": m["tokenizer"]["sha256"],
            "vocab_size": m["tokenizer"]["vocab_size"],
            "encoder": enc.get("name"),
            "encoder_fingerprint": enc.get("fingerprint"),
            "encoder_dim": enc.get("dim"),
            "index_type": index.get("kind"),
            "index_factory": index.get("factory"),
            "bm25": bool(m.get("bm25")),
            "bm25_scorer": self._bm25_scorer(),
            "shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None,
            "segments": len(m["segments"]),
            "bytes_on_disk": size,
            "bytes_per_chunk": round(size / max(1, m["num_chunks_stored"]), 1),
            "created": m["created"],
            "updated": m["updated"],
            "software": m.get("software"),  # libraries of the last write (None: written before they were recorded)
        }

    def verify(self) -> int:
        """Read every file and compare it with its checksum; returns the number of files checked (0 for a format-1
        database, which records none)."""
        return verify_files(self.path, self.meta, full=True)

    def check_trained_with(self, record: dict | None, model_path: Path) -> None:
        """Refuse this database for a RETRO model trained with neighbours from another frozen encoder (``record`` is
        its checkpoint's ``database.json``): the neighbours would come from an embedding space it never read."""
        if not record or not record.get("encoder") or not self.meta.get("encoder"):
            return
        theirs, ours = record["encoder"], self.meta["encoder"]
        if theirs.get("fingerprint") and ours.get("fingerprint"):
            same = theirs["fingerprint"] == ours["fingerprint"]
        else:
            same = theirs["name"] == ours["name"]
        if not same:
            raise RetrolmError(
                f"{self.path}: built with encoder {ours['name']!r}, but {model_path} was trained with neighbours from "
                f"encoder {theirs['name']!r}; use a database built with the same encoder"
            )

    def check_compatible(
        self, encoder: str | None = None, tokenizer: str | None = None, chunk_len: int | None = None
    ) -> None:
        """Refuse to mix in another encoder, tokenizer or chunk length, with a clear error."""
        m = self.meta
        if chunk_len is not None and chunk_len != self.chunk_len:
            raise RetrolmError(f"{self.path}: database has chunk_len {self.chunk_len}, got {chunk_len}")
        if encoder is not None and not self.same_encoder(encoder):
            have = (m.get("encoder") or {}).get("name")
            raise RetrolmError(f"{self.path}: database was built with encoder {have!r}, got {encoder!r}")
        if tokenizer is not None and tokenizer != m["tokenizer"]["name"]:
            from retrolm.text.tokenizer import load_tokenizer, parse_train_spec

            other = load_tokenizer(tokenizer) if parse_train_spec(tokenizer) is None else None
            if other is None or other.sha256 != m["tokenizer"]["sha256"]:
                raise RetrolmError(
                    f"{self.path}: database was built with tokenizer {m['tokenizer']['name']!r}, got {tokenizer!r}"
                )
