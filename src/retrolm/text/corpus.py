"""Corpus ingestion: folders of text/Markdown/HTML, JSONL, Parquet → a stream of :class:`Document`.

Formats (chosen by file name):

* ``.txt .md .rst`` and other text files — one document per file, id = path relative to the given root;
* ``.jsonl`` / ``.jsonl.gz`` — one document per line: ``{"id": ..., "text": ...}`` or ``{"id", "contents"}``
  (pyserini's convention);
* ``.parquet`` — one document per row with an ``id`` column and a ``text`` or ``contents`` column;
* ``.html .htm`` — main text extracted with trafilatura (boilerplate, menus and scripts removed).

Bad files never crash ingestion: binary files and empty files are skipped and invalid UTF-8 is repaired,
each with a warning that names the file. Problems with the request itself (a path that does not exist,
no documents at all, the same id twice) raise :class:`RetrolmError`.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from retrolm.core.errors import RetrolmError
from retrolm.core.io import atomic_path, folder_holds

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".markdown"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
"""File names read as one document per line (JSON with an ``id``)."""
TEXT_KEYS = ("text", "contents")
# Files we know are not documents; everything else in a folder is sniffed and read as text.
SKIP_SUFFIXES = {".pyc", ".so", ".o", ".a", ".zip", ".tar", ".whl", ".png", ".jpg", ".jpeg", ".gif", ".pdf", ".ico"}


Warn = Callable[..., None]
"""How readers report skipped or repaired input: ``logger.warning``-style (format string, args)."""


def _silent(*_: object) -> None:
    pass


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a unique id, its text, and where it came from (``file`` or ``file:line``)."""

    id: str
    text: str
    source: str


_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
              (codecs.BOM_UTF16_BE, "utf-16"))
"""Byte-order marks of UTF-32 and UTF-16 text, UTF-32 first: its little-endian mark begins with UTF-16's."""


def _decode(data: bytes, source: str, warn: Warn) -> str | None:
    """Bytes → text, or None for a binary file. Invalid UTF-8 is replaced (with a warning), not fatal."""
    for bom, codec in _WIDE_BOMS:
        if data.startswith(bom):  # a Windows "Unicode" text file (its NUL bytes are not binary)
            try:
                return data.decode(codec)
            except UnicodeDecodeError:  # a binary file that happens to start with the mark
                break
    if b"\x00" in data[:8192]:
        warn("skipping %s: binary file", source)
        return None
    try:  # utf-8-sig: a byte-order mark is not text (Windows editors write one)
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        warn("repairing %s: not valid UTF-8 (%s); invalid bytes replaced", source, e.reason)
        return data.decode("utf-8-sig", errors="replace")


def _html_to_text(html: str) -> str:
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=True, favor_recall=True) or ""


def _read_file_document(path: Path, doc_id: str, warn: Warn) -> Iterator[Document]:
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        warn("skipping %s: cannot read (%s)", source, e.strerror or e)
        return
    text = _decode(data, source, warn)
    if text is None:
        return
    if path.suffix.lower() in HTML_SUFFIXES:
        text = _html_to_text(text)
    if not text.strip():
        warn("skipping %s: empty document", source)
        return
    yield Document(id=doc_id, text=text, source=source)


def _record_text(record: dict, source: str, warn: Warn) -> str | None:
    for key in TEXT_KEYS:
        value = record.get(key)
        if isinstance(value, str):
            return value
    warn("skipping %s: record has no string 'text' or 'contents' field", source)
    return None


_UNDECODABLE, _MARK = "retrolm-undecodable", "\udc00"
codecs.register_error(_UNDECODABLE, lambda e: (_MARK, e.end))


def _jsonl_lines(f: BinaryIO, path: Path, warn: Warn) -> Iterator[tuple[int, str | None]]:
    """``(line number, text or None)`` of a JSONL stream. UTF-8 is decoded line by line (a bad line is repaired or
    skipped alone); a file that starts with a UTF-16/32 byte-order mark (Windows "Unicode") is decoded as a whole
    stream, since its newlines are not single bytes."""
    head = f.peek(4)[:4] if hasattr(f, "peek") else b""
    for bom, codec in _WIDE_BOMS:
        if head.startswith(bom):
            # bytes that do not decode come through as a lone surrogate (decoding never makes one otherwise), so the
            # lines before them are kept; they end the file, as a corrupt .gz does: where the next line starts is
            # unknown
            text = io.TextIOWrapper(f, encoding=codec, errors=_UNDECODABLE, newline="\n")
            for lineno, line in enumerate(text, start=1):
                if _MARK in line:
                    warn("skipping the rest of %s from line %d: not valid %s", path, lineno, codec.upper())
                    return
                yield lineno, line
            return
    for lineno, raw in enumerate(f, start=1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte-order mark is not part of the JSON
            raw = raw[len(codecs.BOM_UTF8) :]
        yield lineno, _decode(raw, f"{path}:{lineno}", warn)


def jsonl_records(path: Path, warn: Warn = _silent) -> Iterator[tuple[str, dict]]:
    """``(source, record)`` of every JSON object with an ``id`` in a ``.jsonl`` / ``.jsonl.gz`` / ``.ndjson`` file, as
    ingestion reads them: undecodable bytes repaired, bad lines and an unreadable rest skipped (with ``warn``)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, line in _jsonl_lines(f, path, warn):
                source = f"{path}:{lineno}"
                if line is None or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    warn("skipping %s: invalid JSON (%s)", source, e.msg)
                    continue
                if not isinstance(record, dict) or "id" not in record:
                    warn("skipping %s: expected an object with an 'id' field", source)
                    continue
                yield source, record
    except (OSError, EOFError, zlib.error) as e:  # a corrupt .gz raises zlib.error, not OSError
        warn("skipping the rest of %s: cannot read (%s)", path, e)


def _unpaired_surrogates_replaced(text: str, source: str, warn: Warn) -> str:
    """JSON may escape half of a UTF-16 pair ("\\ud800", e.g. an emoji cut in two): such a string cannot be written
    as UTF-8 (the tokenizer and every file would fail), so each half is replaced, with a warning."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        warn("repairing %s: unpaired UTF-16 surrogate escapes replaced", source)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _usable_id(value: object) -> bool:
    """Whether a record's id names a document: null, NaN, an empty string, a list or an object do not (they became
    "None", "nan", "['x']" ...); numbers and booleans keep their text as before ("1.0": a float id column)."""
    if value is None or isinstance(value, list | dict) or (isinstance(value, float) and value != value):
        return False
    return not isinstance(value, str) or bool(value.strip())


def jsonl_documents(path: Path, warn: Warn = _silent) -> Iterator[tuple[Document, dict]]:
    """``(document, its record)`` of every record of a JSONL file that ingestion makes a document (records without a
    usable id or text skipped, with ``warn``): what reads other fields of held-out records pairs them the same way."""
    for source, record in jsonl_records(path, warn):
        text = _record_text(record, source, warn)
        if text is None:
            continue
        if not _usable_id(record["id"]):
            warn("skipping %s: 'id' must name the document (a non-empty string or a number), got %s", source,
                 json.dumps(record["id"])[:40])
            continue
        if not text.strip():
            warn("skipping %s: empty document", source)
            continue
        yield Document(id=_unpaired_surrogates_replaced(str(record["id"]), source, warn),
                       text=_unpaired_surrogates_replaced(text, source, warn), source=source), record


def _read_jsonl(path: Path, warn: Warn) -> Iterator[Document]:
    for doc, _ in jsonl_documents(path, warn):
        yield doc


def _read_parquet(path: Path, warn: Warn) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        warn("skipping %s: not a readable Parquet file (%s)", path, e)
        return
    names = pf.schema_arrow.names
    text_col = next((k for k in TEXT_KEYS if k in names), None)
    if "id" not in names or text_col is None:
        warn("skipping %s: Parquet needs an 'id' column and a 'text' or 'contents' column", path)
        return
    row = 0
    batches = pf.iter_batches(columns=["id", text_col], batch_size=4096)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged page or column chunk further in: the rows before it are kept
            warn("skipping the rest of %s from row %d: cannot read (%s)", path, row + 1, str(e).splitlines()[0])
            return
        if batch is None:
            return
        for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            row += 1
            source = f"{path}:row{row}"
            if not _usable_id(doc_id):
                warn("skipping %s: 'id' must name the document (a non-empty string or a number), got %r", source,
                     doc_id)
                continue
            if not isinstance(text, str) or not text.strip():
                warn("skipping %s: empty document", source)
                continue
            yield Document(id=str(doc_id), text=text, source=source)


def _named_in_utf8(text: str) -> str:
    """A string made from a file name that is not valid UTF-8 (Python holds its bytes as lone surrogates, which no
    file or tokenizer takes), with those bytes written as backslash escapes (two such names stay two ids)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_path(path: Path, root: Path, warn: Warn) -> Iterator[Document]:
    docs = _read_path_as_named(path, root, warn)
    if (shown := _named_in_utf8(str(path))) == str(path):
        yield from docs
        return
    # the documents' ids and sources come from the name: repaired (the build failed at its end, at every rerun)
    warn("reading %s: its name is not valid UTF-8; the undecodable bytes of its documents' ids and sources are "
         "written as \\xNN", shown)
    for doc in docs:
        yield Document(id=_named_in_utf8(doc.id), text=doc.text, source=_named_in_utf8(doc.source))


def _read_path_as_named(path: Path, root: Path, warn: Warn) -> Iterator[Document]:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(path, warn)
    elif name.endswith(".parquet"):
        yield from _read_parquet(path, warn)
    elif path.suffix.lower() in SKIP_SUFFIXES:
        warn("skipping %s: not a text format", path)
    else:
        doc_id = path.name if path == root else path.relative_to(root).as_posix()
        yield from _read_file_document(path, doc_id, warn)


def list_files(paths: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """Expand corpus paths into ``(file, root)`` pairs in a stable order.

    A missing path is an error, and so is a file reached twice (``a.jsonl a.jsonl``, or a folder and a file inside it):
    its documents would be stored twice under the same ids. Inside a folder, hidden files and folders (``.git/``) are
    not corpus, and a symbolic link to a file the folder already holds is skipped (Debian's documentation packages
    keep old names as links to the renamed files).
    """
    out: list[tuple[Path, Path]] = []
    seen: dict[Path, Path] = {}
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise RetrolmError(f"{root}: corpus path does not exist")
        if root.is_dir() and (held := folder_holds(root)) is not None:  # its meta.json and tokenizer read as text
            raise RetrolmError(f"{root}: {held}, not a corpus (give the folder or files of the documents)")
        files, links = ([root], []) if root.is_file() else _folder_files(root)
        for f in files:
            _add_file(f, root, seen, out)
        for f in links:  # after the folder's real files, so a link never displaces its target
            key = f.resolve()
            if key in seen and seen[key].is_relative_to(root):
                continue
            _add_file(f, root, seen, out)
    return out


def _folder_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(the folder's own files, then what is reached through symbolic links: the files of linked folders, then links
    to files), each sorted, hidden names left out. Linked folders are followed (``rglob`` skipped them without a
    word) after the folder's own tree, real subfolders before links, each real folder once; a link to a folder inside
    the corpus adds nothing, and one to a folder that holds the corpus is skipped with a warning (it would read
    everything beside the corpus)."""
    root_real = os.path.realpath(root)

    def holds_corpus(link: str) -> bool:
        target = os.path.realpath(link)
        return root_real == target or root_real.startswith(target.rstrip(os.sep) + os.sep)

    def identity(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def unreadable(e: OSError) -> None:
        logger.warning("skipping %s: cannot read the folder (%s)", e.filename, e.strerror)

    direct: list[Path] = []
    via_folder: list[Path] = []
    file_links: list[Path] = []
    visited: set[tuple[int, int]] = set()
    folder_links: list[Path] = []

    def visit(dirpath: str, dirnames: list[str], filenames: list[str], files: list[Path]
              ) -> tuple[list[str], list[str]]:
        """Record the files of ``dirpath``; return its real subfolders and its linked ones (those that hold the
        corpus left out), each sorted."""
        real, links = [], []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, d)
            if (held := folder_holds(Path(path))) is not None:
                logger.warning("skipping %s: %s, not corpus text", path, held)
            elif not os.path.islink(path):
                real.append(d)
            elif holds_corpus(path):
                logger.warning("skipping %s: a link to a folder that holds the corpus", path)
            else:
                links.append(d)
        for name in filenames:
            f = Path(dirpath) / name
            if not name.startswith(".") and f.is_file():
                (file_links if f.is_symlink() else files).append(f)
        return real, links

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):  # the folder's own tree first
        visited.add(identity(dirpath))
        real, links = visit(dirpath, dirnames, filenames, direct)
        folder_links += [Path(dirpath) / d for d in links]
        dirnames[:] = real
    for link in sorted(folder_links):
        if not os.path.isdir(link):  # a broken link
            continue
        for dirpath, dirnames, filenames in os.walk(link, followlinks=True, onerror=unreadable):
            if identity(dirpath) in visited:  # inside the corpus, or read through another link already
                dirnames[:] = []
                continue
            visited.add(identity(dirpath))
            real, links = visit(dirpath, dirnames, filenames, via_folder)
            dirnames[:] = real + links  # real subfolders first: a link to one of them then adds nothing
    return sorted(direct), sorted(via_folder) + sorted(file_links)


def _add_file(f: Path, root: Path, seen: dict[Path, Path], out: list[tuple[Path, Path]]) -> None:
    key = f.resolve()
    if key in seen:
        raise RetrolmError(f"{f}: corpus file given twice (also reached as {seen[key]})")
    seen[key] = f
    out.append((f, root))


def iter_documents(paths: Iterable[str | Path], *, unique_ids: bool = True, warn: bool = True) -> Iterator[Document]:
    """Stream the documents of every corpus path, in a deterministic order.

    Raises :class:`RetrolmError` if a path is missing or given twice, if no document at all was found, or (with
    ``unique_ids``) if two documents share an id, within a file or across files. ``warn=False`` silences the
    warnings about skipped or repaired input (for a second pass over the same corpus).
    """
    paths = list(paths)
    seen: dict[str, str] = {}
    count = 0
    say: Warn = logger.warning if warn else _silent
    for file, root in list_files(paths):
        for doc in _read_path(file, root, say):
            if unique_ids:
                if doc.id in seen:
                    raise RetrolmError(f"{doc.source}: duplicate document id {doc.id!r} (first seen in {seen[doc.id]})")
                seen[doc.id] = doc.source
            count += 1
            yield doc
    if count == 0:
        raise RetrolmError(f"{', '.join(map(str, paths))}: no documents found (empty corpus)")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` (shard I of N, counted from 0) as ``(I, N)``."""
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise RetrolmError(f"shard must be I/N (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise RetrolmError(f"shard {spec!r}: need 0 <= I < N")
    return i, n


def shard_of(doc_id: str, n_shards: int) -> int:
    """The shard that holds document ``doc_id`` in a database split ``n_shards`` ways: a hash of the id alone, so every
    machine routes a document the same way, whatever file or order it comes in."""
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_shards


def belongs(doc_id: str, shard: tuple[int, int] | None) -> bool:
    """Whether document ``doc_id`` belongs to ``shard`` = (I, N) (every document belongs to None: no split)."""
    return shard is None or shard_of(doc_id, shard[1]) == shard[0]


def in_shard(docs: Iterable[Document], shard: tuple[int, int] | None) -> Iterator[Document]:
    """The documents of ``docs`` that belong to ``shard`` = (I, N); all of them for None."""
    return (doc for doc in docs if belongs(doc.id, shard))


def corpus_fingerprint(paths: Iterable[str | Path]) -> list[list]:
    """Cheap identity of a corpus (resolved path, size, mtime of every file) to decide whether to resume."""
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f, _ in list_files(paths)]


def check_outputs_apart(paths: Iterable[str | Path], out: Path, names: Iterable[str], what: str) -> None:
    """Refuse outputs ``out/<names>`` that would replace one of the corpus ``paths`` (written by renaming over it: its
    documents lost) or an ``out`` inside a corpus folder (a rerun would read the last outputs as corpus)."""
    targets = {(out / name).resolve() for name in names}
    for p in map(Path, paths):
        if p.resolve() in targets:
            raise RetrolmError(f"{p}: {what} would replace its own input; choose another --out")
        if p.is_dir() and out.resolve().is_relative_to(p.resolve()):
            raise RetrolmError(f"{out}: output folder is inside the corpus folder {p}; choose another --out")


def split_corpus(
    paths: Iterable[str | Path], out_dir: str | Path, heldout: float = 0.05, seed: int = 0
) -> dict[str, int]:
    """Split documents into ``out_dir/train.jsonl`` and ``out_dir/heldout.jsonl`` by document.

    A document is held out when a hash of ``(seed, id)`` falls below ``heldout``: the split depends only on the ids,
    not on their order, so adding documents later never moves an existing one across. Returns the counts.
    """
    if not 0.0 < heldout < 1.0:
        raise RetrolmError(f"held-out fraction must be in (0, 1), got {heldout}")
    out = Path(out_dir)
    check_outputs_apart(paths := list(paths), out, ("train.jsonl", "heldout.jsonl"), "the split")
    counts = {"train": 0, "heldout": 0}
    with (
        atomic_path(out / "train.jsonl") as t,
        atomic_path(out / "heldout.jsonl") as h,
        open(t, "w", encoding="utf-8") as ft,
        open(h, "w", encoding="utf-8") as fh,
    ):
        for doc in iter_documents(paths):
            digest = hashlib.sha256(f"{seed}:{doc.id}".encode()).digest()
            part = "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout else "train"
            line = json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n"
            (fh if part == "heldout" else ft).write(line)
            counts[part] += 1
        if not counts["heldout"] or not counts["train"]:  # inside: an earlier split in out_dir stays as it was
            raise RetrolmError(f"{out}: split left one side empty ({counts}); use more documents or another fraction")
    return counts
