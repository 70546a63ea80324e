"""The chunk store on hand-made documents: exact chunking, ids global across segments, continuations that never cross a
document, and the on-disk checks (no encoder or tokenizer involved)."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from retrolm.core.errors import RetrolmError
from retrolm.db.chunks import ChunkStore, Segment, SegmentWriter, chunk_ids, token_dtype

M, PAD = 4, 0
# (id, tokens): 5 tokens = chunks of 4 + 1; 8 = exactly 2 chunks; 3 = one short chunk; an empty document is skipped
DOCS_A = [("a", [11, 12, 13, 14, 15]), ("empty", []), ("b", [21, 22, 23, 24, 25, 26, 27, 28])]
DOCS_B = [("c", [31, 32, 33]), ("d", [41, 42, 43, 44, 45, 46, 47, 48, 49])]


class CharTokenizer:
    """Token id t decodes to chr(t) (so a chunk's text is its ids as characters)."""

    def decode_batch(self, batch):
        return ["".join(chr(t) for t in ids) for ids in batch]


def write_segment(folder, docs, first_chunk: int, first_doc: int, dtype=np.uint16) -> dict:
    w = SegmentWriter(folder, M, np.dtype(dtype), PAD, first_chunk, first_doc)
    for doc_id, ids in docs:
        w.add(doc_id, f"src/{doc_id}.txt", 10 * len(ids), ids)
    return w.close()


@pytest.fixture()
def store(tmp_path) -> ChunkStore:
    """Two segments: a (chunks 0-1), b (2-3) in the first; c (4), d (5-7) in the second."""
    info = write_segment(tmp_path / "s0", DOCS_A, 0, 0)
    write_segment(tmp_path / "s1", DOCS_B, info["n_chunks"], info["n_docs"])
    return ChunkStore.open([tmp_path / "s0", tmp_path / "s1"], M, PAD)


def test_chunk_ids_cuts_and_pads():
    toks, lens = chunk_ids([1, 2, 3, 4, 5], 4, 9, np.dtype(np.uint16))
    assert toks.dtype == np.uint16 and lens.dtype == np.uint16
    np.testing.assert_array_equal(toks, [[1, 2, 3, 4], [5, 9, 9, 9]])
    np.testing.assert_array_equal(lens, [4, 1])
    toks, lens = chunk_ids(list(range(1, 9)), 4, 9, np.dtype(np.uint32))
    assert toks.dtype == np.uint32 and toks.shape == (2, 4)
    np.testing.assert_array_equal(lens, [4, 4])  # an exact multiple: no short chunk
    toks, lens = chunk_ids([7], 4, 0, np.dtype(np.uint16))
    np.testing.assert_array_equal(toks, [[7, 0, 0, 0]])
    np.testing.assert_array_equal(lens, [1])
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_segment_files_and_description(tmp_path):
    (tmp_path / "s").mkdir()  # a staged folder may already exist
    info = write_segment(tmp_path / "s", DOCS_A, 10, 3)
    assert info == {"n_chunks": 4, "n_docs": 2, "chunk_len": M, "token_dtype": "uint16", "first_chunk": 10,
                    "first_doc": 3}
    assert json.loads((tmp_path / "s" / "segment.json").read_text()) == info
    seg = Segment.open(tmp_path / "s", M)
    np.testing.assert_array_equal(seg.tokens, [[11, 12, 13, 14], [15, 0, 0, 0], [21, 22, 23, 24], [25, 26, 27, 28]])
    np.testing.assert_array_equal(seg.lengths, [4, 1, 4, 4])
    np.testing.assert_array_equal(seg.doc, [3, 3, 4, 4])  # global document indices (the empty one has none)
    np.testing.assert_array_equal(seg.pos, [0, 1, 0, 1])
    docs = seg.docs.to_pydict()
    assert docs == {"id": ["a", "b"], "source": ["src/a.txt", "src/b.txt"], "first_chunk": [10, 12],
                    "n_chunks": [2, 2], "n_tokens": [5, 8], "n_bytes": [50, 80]}
    assert (seg.n_chunks, seg.n_docs, seg.first_chunk, seg.first_doc) == (4, 2, 10, 3)
    assert not seg.tokens.flags.writeable and not seg.doc.flags.writeable  # mapped read-only


def test_segment_open_refuses_a_damaged_or_mismatched_segment(tmp_path):
    write_segment(tmp_path / "s", DOCS_A, 0, 0)
    with pytest.raises(RetrolmError, match=r"s: segment has chunk_len 4, database has 8"):
        Segment.open(tmp_path / "s", 8)
    tokens = tmp_path / "s" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(RetrolmError, match=r"tokens.bin: missing or truncated \(expected 32 bytes\)"):
        Segment.open(tmp_path / "s", M)
    write_segment(tmp_path / "t", DOCS_A, 0, 0)
    (tmp_path / "t" / "lengths.bin").unlink()
    with pytest.raises(RetrolmError, match=r"lengths.bin: missing or truncated \(expected 8 bytes\)"):
        Segment.open(tmp_path / "t", M)
    write_segment(tmp_path / "u", DOCS_A, 0, 0)
    (tmp_path / "u" / "docs.parquet").write_bytes(b"not parquet")
    with pytest.raises(RetrolmError, match=r"docs.parquet: corrupt or unreadable"):
        Segment.open(tmp_path / "u", M)
    with pytest.raises(RetrolmError, match=r"segment.json: segment description not found"):
        Segment.open(tmp_path / "missing", M)
    info = write_segment(tmp_path / "empty", [("e", [])], 0, 0)  # a segment with no chunks opens as empty arrays
    assert info["n_chunks"] == 0
    seg = Segment.open(tmp_path / "empty", M)
    assert seg.tokens.shape == (0, M) and seg.lengths.shape == (0,) and seg.docs.num_rows == 0
    # with the same column types as any other segment (they are concatenated)
    write_segment(tmp_path / "v", DOCS_A, 0, 0)
    types = [str(t) for t in Segment.open(tmp_path / "v", M).docs.schema.types]
    assert [str(t) for t in seg.docs.schema.types] == types == ["string", "string", "int64", "int32", "int64", "int64"]
    assert (seg.tokens.dtype, seg.lengths.dtype, seg.doc.dtype, seg.pos.dtype) == (np.uint16, np.uint16, np.int32,
                                                                                    np.int32)
    store = ChunkStore([Segment.open(tmp_path / "v", M), seg], M, PAD)
    assert store.n_docs == 2 and store.doc_ids == ["a", "b"] and store.all_chunk_docs().dtype == np.int32


class FullDisk:
    """A file whose writes fail like a full disk does (an OSError that names no file)."""

    def __init__(self, f, on: str):
        self.f, self.on = f, on

    def __getattr__(self, name):
        if name == self.on:
            def fail(*args):
                raise OSError(errno.ENOSPC, "No space left on device")
            return fail
        return getattr(self.f, name)


@pytest.mark.parametrize("name", ["tokens.bin", "pos.bin"])
def test_a_full_disk_names_the_segment_file(tmp_path, monkeypatch, name):
    w = SegmentWriter(tmp_path / "s", M, np.dtype(np.uint16), PAD, 0, 0)
    w.files[name] = FullDisk(w.files[name], "write")
    with pytest.raises(OSError) as exc:
        w.add("a", "x", 5, [1, 2, 3, 4, 5])
    assert exc.value.filename == str(tmp_path / "s" / name) and exc.value.errno == errno.ENOSPC
    w = SegmentWriter(tmp_path / "t", M, np.dtype(np.uint16), PAD, 0, 0)
    w.add("a", "x", 5, [1, 2, 3, 4, 5])
    w.files[name] = FullDisk(w.files[name], "flush")
    with pytest.raises(OSError) as exc:
        w.close()
    assert exc.value.filename == str(tmp_path / "t" / name)
    w = SegmentWriter(tmp_path / "u", M, np.dtype(np.uint16), PAD, 0, 0)
    w.add("a", "x", 5, [1, 2, 3, 4, 5])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("retrolm.db.chunks.pq.write_table", full)
    with pytest.raises(OSError) as exc:
        w.close()
    assert exc.value.filename == str(tmp_path / "u" / "docs.parquet")


def test_store_addresses_chunks_globally_across_segments(store):
    assert (store.n_chunks, store.n_docs, store.first_chunk, store.first_doc) == (8, 4, 0, 0)
    assert store.doc_ids == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(store.doc_first_chunk, [0, 2, 4, 5])
    np.testing.assert_array_equal(store.doc_n_chunks, [2, 2, 1, 3])
    np.testing.assert_array_equal(store.doc_n_tokens, [5, 8, 3, 9])
    np.testing.assert_array_equal(store.doc_n_bytes, [50, 80, 30, 90])
    np.testing.assert_array_equal(store.tokens([7, 1, 4]), [[49, 0, 0, 0], [15, 0, 0, 0], [31, 32, 33, 0]])
    np.testing.assert_array_equal(store.lengths(np.arange(8)), [4, 1, 4, 4, 3, 4, 4, 1])
    np.testing.assert_array_equal(store.chunk_doc(np.arange(8)), [0, 0, 1, 1, 2, 3, 3, 3])
    np.testing.assert_array_equal(store.chunk_pos(np.arange(8)), [0, 1, 0, 1, 0, 0, 1, 2])
    np.testing.assert_array_equal(store.all_chunk_docs(), [0, 0, 1, 1, 2, 3, 3, 3])
    assert store.chunk_doc(np.array([[3, 4], [5, 0]])).tolist() == [[1, 2], [3, 0]]  # any shape of ids
    assert store.tokens(np.array([[2], [6]])).shape == (2, 1, M)
    assert store.tokens(np.zeros(0, dtype=np.int64)).shape == (0, M)
    for bad in ([8], [-1], [0, 8]):
        with pytest.raises(IndexError, match=r"chunk id out of range \[0, 8\)"):
            store.tokens(bad)
    assert [store.doc_index(d) for d in ("a", "b", "c", "d", "zz")] == [0, 1, 2, 3, None]
    assert [store.doc_source(d) for d in range(4)] == ["src/a.txt", "src/b.txt", "src/c.txt", "src/d.txt"]
    with pytest.raises(IndexError, match=r"^4$"):
        store.doc_source(4)
    for d, (_, ids) in enumerate([DOCS_A[0], DOCS_A[2], *DOCS_B]):
        assert store.doc_tokens(d).tolist() == ids  # padding removed, chunks joined back
    assert store.texts([0, 1, 7], CharTokenizer()) == ["\x0b\x0c\x0d\x0e", "\x0f", "1"]
    assert store.nbytes() == sum(p.stat().st_size for s in store.segments for p in s.folder.iterdir()
                                 if p.name != "segment.json")


def test_continuations_and_neighbour_tokens_stay_inside_a_document(store):
    np.testing.assert_array_equal(store.continuation_ids(np.arange(8)), [1, -1, 3, -1, -1, 6, 7, -1])
    toks, mask = store.neighbour_tokens(np.array([0, 1, 5, 6, -1, 4]))
    assert toks.shape == (6, 2 * M) and mask.dtype == bool
    np.testing.assert_array_equal(toks, [
        [11, 12, 13, 14, 15, 0, 0, 0],  # chunk 0 + its continuation, chunk 1
        [15, 0, 0, 0, 0, 0, 0, 0],  # a document's last chunk has no continuation
        [41, 42, 43, 44, 45, 46, 47, 48],
        [45, 46, 47, 48, 49, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],  # a missing neighbour
        [31, 32, 33, 0, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(mask, [
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
    ])
    toks, mask = store.neighbour_tokens(np.array([-1, -1]))
    assert (toks == PAD).all() and not mask.any()


def test_a_store_of_later_segments_keeps_global_ids(store, tmp_path):
    """The new segment of an ``add`` alone: chunk and document ids start where the database's left off."""
    tail = ChunkStore.open([tmp_path / "s1"], M, PAD)
    assert (tail.first_chunk, tail.first_doc, tail.n_chunks, tail.n_docs) == (4, 2, 4, 2)
    np.testing.assert_array_equal(tail.tokens([4, 7]), store.tokens([4, 7]))
    np.testing.assert_array_equal(tail.chunk_doc([4, 5]), [2, 3])
    np.testing.assert_array_equal(tail.continuation_ids(np.arange(4, 8)), [-1, 6, 7, -1])
    with pytest.raises(IndexError, match=r"chunk id out of range \[4, 8\)"):
        tail.tokens([3])
    empty = ChunkStore([], M, PAD)
    assert empty.n_chunks == 0 and empty.n_docs == 0 and empty.doc_ids == [] and empty.all_chunk_docs().shape == (0,)
    assert (empty.first_chunk, empty.first_doc) == (0, 0)
    for name, dtype in (("doc_first_chunk", np.int64), ("doc_n_chunks", np.int32), ("doc_n_bytes", np.int64),
                        ("doc_n_tokens", np.int64)):
        array = getattr(empty, name)
        assert array.shape == (0,) and array.dtype == dtype, name
        assert getattr(store, name).dtype == dtype, name  # the same types as a store's columns


@pytest.mark.parametrize("m", [1, 2, M])
def test_a_character_split_by_a_chunk_boundary_is_kept_whole_in_the_chunk_it_starts(tmp_path, m):
    """Byte-level tokens can cut a character's UTF-8 bytes between two chunks: each chunk decoded alone gave U+FFFD
    on both sides (what the encoder, BM25 and readers saw). The character now goes whole to the chunk it starts in,
    so a document's chunk texts join to its text, however many chunks it spans (chunks of 1 or 2 tokens); a U+FFFD
    the text itself holds stays, and an added token that is not special keeps its text."""
    from tokenizers import AddedToken

    from retrolm.text.tokenizer import LMTokenizer, train_bpe

    bpe = train_bpe(["plain ascii words only " * 50], 300).tok  # no merges across the bytes of é, –, 😀
    bpe.add_tokens([AddedToken("<br>", special=False)])
    tok = LMTokenizer(bpe, "bpe")
    texts = {"x": "ab😀cd é–f 😀😀 g<br>é", "y": "a\ufffdb😀"}
    w = SegmentWriter(tmp_path / "s", m, np.dtype(np.uint16), tok.pad_id, 0, 0)
    for doc_id, text in texts.items():
        w.add(doc_id, doc_id, len(text.encode()), tok.encode(text))
    w.close()
    store = ChunkStore.open([tmp_path / "s"], m, tok.pad_id)
    chunks = store.texts(np.arange(store.n_chunks), tok)
    old = tok.decode_batch([store.tokens(np.array([c]))[0][: store.lengths(np.array([c]))[0]].tolist()
                            for c in range(store.n_chunks)])
    assert sum("\ufffd" in t for t in old) > 4  # the split characters (the case this is about)
    for d, text in enumerate(texts.values()):
        first, n = int(store.doc_first_chunk[d]), int(store.doc_n_chunks[d])
        assert "".join(chunks[first : first + n]) == text
    assert sum(t.count("\ufffd") for t in chunks) == 1  # the document's own
