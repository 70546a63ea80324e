"""Chunks: documents cut into fixed-length token chunks that never cross a document boundary.

A database stores its chunks in *segments* (one per build or ``add``), each a folder of raw arrays that
are memory-mapped on open (nanoGPT-style ``.bin`` files; shapes and dtypes in ``segment.json``)::

    tokens.bin     (n_chunks, chunk_len)  uint16 or uint32, padded with pad_id after the chunk's length
    lengths.bin    (n_chunks,)            uint16  real tokens in the chunk (< chunk_len only at a document's end)
    doc.bin        (n_chunks,)            int32   document index, global across segments
    pos.bin        (n_chunks,)            int32   chunk index within its document
    docs.parquet   one row per document:  id, source, first_chunk (global), n_chunks, n_tokens, n_bytes

Chunk ids are global and sequential across segments; the chunks of a document are contiguous, so a
chunk's *continuation* is the next row only if that row belongs to the same document.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrolm.core.errors import RetrolmError
from retrolm.core.io import atomic_path, naming_errors, read_json, write_json
from retrolm.text.tokenizer import REPLACEMENT, LMTokenizer, continuation_prefix, missing_bytes

SEGMENT_FILES = ("tokens.bin", "lengths.bin", "doc.bin", "pos.bin")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def chunk_ids(ids: Sequence[int], chunk_len: int, pad_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Cut one document's token ids into ``ceil(len/chunk_len)`` padded chunks and their real lengths."""
    n = len(ids)
    n_chunks = -(-n // chunk_len)
    out = np.full((n_chunks * chunk_len,), pad_id, dtype=dtype)
    out[:n] = ids
    lengths = np.full((n_chunks,), chunk_len, dtype=np.uint16)
    if n % chunk_len:
        lengths[-1] = n % chunk_len
    return out.reshape(n_chunks, chunk_len), lengths


class SegmentWriter:
    """Appends tokenized documents to a new segment folder (written under a temporary name by the caller)."""

    def __init__(self, folder: Path, chunk_len: int, dtype: np.dtype, pad_id: int, first_chunk: int, first_doc: int):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.chunk_len, self.dtype, self.pad_id = chunk_len, np.dtype(dtype), pad_id
        self.first_chunk, self.first_doc = first_chunk, first_doc
        self.files = {name: open(folder / name, "wb") for name in SEGMENT_FILES}  # noqa: SIM115 - closed in close()
        self.n_chunks = 0
        self.docs: dict[str, list] = {k: [] for k in ("id", "source", "first_chunk", "n_chunks", "n_tokens", "n_bytes")}

    def add(self, doc_id: str, source: str, n_bytes: int, ids: Sequence[int]) -> None:
        """Append one document (its UTF-8 size ``n_bytes`` is kept for bits-per-byte evaluation)."""
        if len(ids) == 0:
            return
        toks, lengths = chunk_ids(ids, self.chunk_len, self.pad_id, self.dtype)
        n = len(lengths)
        doc_index = self.first_doc + len(self.docs["id"])
        arrays = {"tokens.bin": toks, "lengths.bin": lengths, "doc.bin": np.full(n, doc_index, dtype=np.int32),
                  "pos.bin": np.arange(n, dtype=np.int32)}
        for name, data in arrays.items():
            with naming_errors(self.folder / name):  # a full disk: name the file in the one-line error
                self.files[name].write(data.tobytes())
        for key, value in (
            ("id", doc_id),
            ("source", source),
            ("first_chunk", self.first_chunk + self.n_chunks),
            ("n_chunks", n),
            ("n_tokens", len(ids)),
            ("n_bytes", n_bytes),
        ):
            self.docs[key].append(value)
        self.n_chunks += n

    def close(self) -> dict:
        for name, f in self.files.items():
            with naming_errors(self.folder / name):
                try:
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    f.close()
        table = pa.table(
            {
                "id": pa.array(self.docs["id"], pa.string()),
                "source": pa.array(self.docs["source"], pa.string()),
                "first_chunk": pa.array(self.docs["first_chunk"], pa.int64()),
                "n_chunks": pa.array(self.docs["n_chunks"], pa.int32()),
                "n_tokens": pa.array(self.docs["n_tokens"], pa.int64()),
                "n_bytes": pa.array(self.docs["n_bytes"], pa.int64()),
            }
        )
        with atomic_path(self.folder / "docs.parquet") as tmp:  # fsynced like the arrays before segment.json
            pq.write_table(table, tmp)
        info = {
            "n_chunks": self.n_chunks,
            "n_docs": len(self.docs["id"]),
            "chunk_len": self.chunk_len,
            "token_dtype": self.dtype.name,
            "first_chunk": self.first_chunk,
            "first_doc": self.first_doc,
        }
        write_json(self.folder / "segment.json", info)
        return info


@dataclass
class Segment:
    """One memory-mapped segment."""

    folder: Path
    n_chunks: int
    n_docs: int
    first_chunk: int
    first_doc: int
    tokens: np.ndarray
    lengths: np.ndarray
    doc: np.ndarray
    pos: np.ndarray
    docs: pa.Table

    @classmethod
    def open(cls, folder: Path, chunk_len: int) -> Segment:
        info = read_json(folder / "segment.json", "segment description")
        if info["chunk_len"] != chunk_len:
            raise RetrolmError(f"{folder}: segment has chunk_len {info['chunk_len']}, database has {chunk_len}")
        n = int(info["n_chunks"])

        def mm(name: str, dtype, shape) -> np.ndarray:
            path = folder / name
            expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise RetrolmError(f"{path}: missing or truncated (expected {expected} bytes)")
            if expected == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(path, dtype=dtype, mode="r", shape=shape)

        try:
            docs = pq.read_table(folder / "docs.parquet")
        except Exception as e:
            raise RetrolmError(f"{folder / 'docs.parquet'}: corrupt or unreadable ({e})") from None
        return cls(
            folder=folder,
            n_chunks=n,
            n_docs=int(info["n_docs"]),
            first_chunk=int(info["first_chunk"]),
            first_doc=int(info["first_doc"]),
            tokens=mm("tokens.bin", info["token_dtype"], (n, chunk_len)),
            lengths=mm("lengths.bin", np.uint16, (n,)),
            doc=mm("doc.bin", np.int32, (n,)),
            pos=mm("pos.bin", np.int32, (n,)),
            docs=docs,
        )


class ChunkStore:
    """A global, read-only view over the segments of a database, addressed by chunk id."""

    def __init__(self, segments: list[Segment], chunk_len: int, pad_id: int):
        self.segments = segments
        self.chunk_len = chunk_len
        self.pad_id = pad_id
        self._starts = [s.first_chunk for s in segments]
        # A store may be a suffix of a database (the new segment of an ``add``): ids start at first_chunk.
        self.first_chunk = segments[0].first_chunk if segments else 0
        self.first_doc = segments[0].first_doc if segments else 0
        self.n_chunks = sum(s.n_chunks for s in segments)
        self.n_docs = sum(s.n_docs for s in segments)
        docs = pa.concat_tables([s.docs for s in segments]) if segments else None
        self.doc_ids: list[str] = docs.column("id").to_pylist() if docs is not None else []
        self.doc_first_chunk = docs.column("first_chunk").to_numpy() if docs is not None else np.zeros(0, np.int64)
        self.doc_n_chunks = docs.column("n_chunks").to_numpy() if docs is not None else np.zeros(0, np.int32)
        self.doc_n_bytes = docs.column("n_bytes").to_numpy() if docs is not None else np.zeros(0, np.int64)
        self.doc_n_tokens = docs.column("n_tokens").to_numpy() if docs is not None else np.zeros(0, np.int64)
        self._doc_index: dict[str, int] | None = None

    @classmethod
    def open(cls, folders: list[Path], chunk_len: int, pad_id: int) -> ChunkStore:
        return cls([Segment.open(f, chunk_len) for f in folders], chunk_len, pad_id)

    def doc_index(self, doc_id: str) -> int | None:
        """Global index of the *last* document with this id (ids are unique among live documents)."""
        if self._doc_index is None:
            self._doc_index = {d: i for i, d in enumerate(self.doc_ids)}
        return self._doc_index.get(doc_id)

    def _gather(self, field: str, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        shape = ids.shape
        ids = ids.reshape(-1)
        lo, hi = self.first_chunk, self.first_chunk + self.n_chunks
        if ids.size and (ids.min() < lo or ids.max() >= hi):
            raise IndexError(f"chunk id out of range [{lo}, {hi})")
        seg_of = np.searchsorted(self._starts, ids, side="right") - 1
        first = getattr(self.segments[0], field) if self.segments else np.zeros((0,))
        out = np.empty((len(ids), *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(seg_of):
            sel = seg_of == s
            seg = self.segments[s]
            out[sel] = getattr(seg, field)[ids[sel] - seg.first_chunk]
        return out.reshape(*shape, *first.shape[1:])

    def tokens(self, ids: np.ndarray) -> np.ndarray:
        """(n, chunk_len) padded token ids of the chunks."""
        return self._gather("tokens", ids)

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        return self._gather("lengths", ids)

    def chunk_doc(self, ids: np.ndarray) -> np.ndarray:
        """Global document index of each chunk."""
        return self._gather("doc", ids)

    def chunk_pos(self, ids: np.ndarray) -> np.ndarray:
        return self._gather("pos", ids)

    def all_chunk_docs(self) -> np.ndarray:
        """Document index of every chunk (n_chunks,) — used to turn deleted documents into a chunk mask."""
        if not self.segments:
            return np.zeros(0, np.int32)
        return np.concatenate([np.asarray(s.doc) for s in self.segments])

    def continuation_ids(self, ids: np.ndarray) -> np.ndarray:
        """Chunk id of the continuation (next chunk of the *same* document) or -1 at a document's end."""
        ids = np.asarray(ids, dtype=np.int64)
        doc = self.chunk_doc(ids) - self.first_doc
        last = self.doc_first_chunk[doc] + self.doc_n_chunks[doc] - 1
        return np.where(ids < last, ids + 1, -1)

    def neighbour_tokens(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RETRO neighbours: chunk + continuation, (n, 2*chunk_len) tokens and a (n, 2*chunk_len) bool mask.

        Ids of -1 (a missing neighbour) give an all-pad, all-False row.
        """
        ids = np.asarray(ids, dtype=np.int64)
        m = self.chunk_len
        n = len(ids)
        toks = np.full((n, 2 * m), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, 2 * m), dtype=bool)
        valid = ids >= 0
        if valid.any():
            vid = ids[valid]
            toks[valid, :m] = self.tokens(vid)
            mask[valid, :m] = np.arange(m) < self.lengths(vid)[:, None]
            cont = np.full(n, -1, dtype=np.int64)
            cont[valid] = self.continuation_ids(vid)
            has = cont >= 0
            if has.any():
                toks[has, m:] = self.tokens(cont[has])
                mask[has, m:] = np.arange(m) < self.lengths(cont[has])[:, None]
        return toks, mask

    def doc_source(self, doc: int) -> str:
        """Where document ``doc`` (global index) came from (``file`` or ``file:line``)."""
        for s in self.segments:
            if s.first_doc <= doc < s.first_doc + s.n_docs:
                return s.docs.column("source")[doc - s.first_doc].as_py()
        raise IndexError(doc)

    def doc_tokens(self, doc: int) -> np.ndarray:
        """All token ids of one document, padding removed."""
        first, n = int(self.doc_first_chunk[doc]), int(self.doc_n_chunks[doc])
        ids = np.arange(first, first + n)
        toks, lens = self.tokens(ids), self.lengths(ids)
        return np.concatenate([t[:k] for t, k in zip(toks, lens, strict=True)])

    def texts(self, ids: np.ndarray | Sequence[int], tokenizer: LMTokenizer) -> list[str]:
        """The chunks as text (padding dropped): what the frozen encoder, BM25 and in-context readers see. A
        character whose bytes the chunk boundary splits (byte-level tokens) is given whole to the chunk it starts in
        and dropped from the next, instead of a U+FFFD on each side."""
        ids = np.asarray(ids, dtype=np.int64)
        toks, lens = self.tokens(ids), self.lengths(ids)
        out = tokenizer.decode_batch([t[:k].tolist() for t, k in zip(toks, lens, strict=True)])
        split = np.array([i for i, t in enumerate(out) if t.startswith(REPLACEMENT) or t.endswith(REPLACEMENT)],
                         dtype=np.int64)
        if len(split) and tokenizer.byte_level:  # rare outside non-Latin text
            fixed = self._whole_characters(ids[split], toks[split], lens[split], tokenizer)
            for i, text in zip(split, fixed, strict=True):
                out[i] = text
        return out

    def _whole_characters(self, ids: np.ndarray, toks: np.ndarray, lens: np.ndarray, tokenizer: LMTokenizer
                          ) -> list[str]:
        """The chunks' texts from their bytes: the continuation bytes they start with dropped (the character began
        in an earlier chunk of the document), the ones their last character lacks taken from the chunks after."""
        first = self.chunk_pos(ids) == 0
        data = [tokenizer.token_bytes(t[:k]) or b"" for t, k in zip(toks, lens, strict=True)]
        data = [d if at_start else d[continuation_prefix(d, 3) :] for d, at_start in zip(data, first, strict=True)]
        need = np.array([missing_bytes(d) for d in data])
        nxt = np.where(need > 0, self.continuation_ids(ids), -1)
        for _ in range(3):  # from as many following chunks as they take (a chunk may be one 1-byte token)
            todo = np.flatnonzero(nxt >= 0)
            if not len(todo):
                break
            t, k = self.tokens(nxt[todo]), self.lengths(nxt[todo])
            for j, row, n in zip(todo, t, k, strict=True):
                head = tokenizer.token_bytes(row[: min(int(n), int(need[j]))]) or b""
                more = continuation_prefix(head, int(need[j]))
                data[j] += head[:more]
                need[j] -= more
                if more < len(head) or need[j] == 0:
                    nxt[j] = -1  # complete (or the text ends the character early: it stays U+FFFD)
            going = np.flatnonzero(nxt >= 0)
            if len(going):
                nxt[going] = self.continuation_ids(nxt[going])
        return [d.decode("utf-8", errors="replace") for d in data]

    def nbytes(self) -> int:
        return sum(sum((s.folder / f).stat().st_size for f in (*SEGMENT_FILES, "docs.parquet")) for s in self.segments)
