"""``meta.json``, the commit point of a database folder: what it holds, and checksums of every file it references.

A change to a database becomes visible only when ``meta.json`` is rewritten (atomically), so a reader sees either
the old state or the new one. Since format 2 the description also records, for every file it references, its size
and SHA-256 (``sha256`` of the whole file, ``quick`` of 64 sampled blocks for files over 64 MB): opening a database
checks sizes and quick digests; ``retrolm db info --verify`` reads everything.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from retrolm.core.errors import RetrolmError
from retrolm.core.io import file_digest, read_json

logger = logging.getLogger(__name__)

FORMAT = "retrolm-db"
FORMAT_VERSION = 2
"""2: file checksums, encoder fingerprint, optional BM25 index, optional dense keys. 1 is read as well (no checks)."""
READABLE_VERSIONS = (1, 2)
STAGING_SUFFIX = ".partial"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def db_path(path: str | Path) -> Path:
    """A database folder as given, made absolute when it has no name of its own (``.``, ``..``, ``""``): staging
    and backup folders are named after it."""
    path = Path(path)
    return path.resolve() if path.name in ("", "..") else path


def staging_path(out: str | Path) -> Path:
    """Where a build of database folder ``out`` is made before it is swapped into place."""
    out = db_path(out)
    return out.with_name(out.name + STAGING_SUFFIX)


SHARD_FILE_SUFFIXES = (".yaml", ".yml")
"""A database argument naming a file with one of these suffixes is a shards file (:mod:`retrolm.retrieval.sharded`)."""


def is_shards_file(path: str | Path) -> bool:
    """Whether ``path`` names a shards file (rather than a database folder)."""
    p = Path(path)
    return p.suffix in SHARD_FILE_SUFFIXES and not p.is_dir()


def needs_folder(path: str | Path | None, what: str) -> None:
    """One line when ``path`` names a shards file where ``what`` needs one database folder."""
    if path and is_shards_file(path):
        raise RetrolmError(f"{path}: a shards file; {what} needs one database folder (run it on each part; db search, "
                           f"db info, rag, generate and serve take a shards file)")


def read_meta(path: Path) -> dict:
    """The description of the database at ``path``, checked to be a finished retrolm database this version reads."""
    if path.name.endswith(STAGING_SUFFIX) or (path / "plan.json").is_file():
        final = path.with_name(path.name.removesuffix(STAGING_SUFFIX))
        raise RetrolmError(f"{path}: unfinished build staging folder, not a database (re-run the build of {final})")
    if path.is_file():
        needs_folder(path, "this")
        raise RetrolmError(f"{path}: a file, not a database folder")
    if not path.is_dir():
        raise RetrolmError(f"{path}: database folder does not exist")
    meta = read_json(path / "meta.json", "database description (meta.json)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RetrolmError(f"{path / 'meta.json'}: not a retrolm database")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise RetrolmError(
            f"{path / 'meta.json'}: format version {meta.get('format_version')} "
            f"(this retrolm reads {', '.join(map(str, READABLE_VERSIONS))}; upgrade retrolm)"
        )
    _check_fields(meta, path / "meta.json")
    return meta


# fields every reader of meta.json relies on, and their types (a hand-edited or damaged file names the field)
_REQUIRED = {"version": int, "chunk_len": int, "segments": list, "tokenizer": dict}
_OPTIONAL = {"index": dict, "bm25": str, "tombstones": str, "files": dict, "encoder": dict}


def _check_fields(meta: dict, where: Path) -> None:
    for key, kind in _REQUIRED.items():
        if key not in meta:
            raise RetrolmError(f"{where}: damaged database description: no {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise RetrolmError(f"{where}: damaged database description: {key!r} is not a {kind.__name__}")
    for key, kind in _OPTIONAL.items():
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise RetrolmError(f"{where}: damaged database description: {key!r} is not a {kind.__name__}")
    if not all(isinstance(s, str) for s in meta["segments"]) or not isinstance(meta["tokenizer"].get("name"), str) \
            or not isinstance(meta["tokenizer"].get("sha256"), str):
        raise RetrolmError(f"{where}: damaged database description: 'segments' or 'tokenizer' malformed")
    if meta.get("index") is not None and not isinstance(meta["index"].get("file"), str):
        raise RetrolmError(f"{where}: damaged database description: 'index' names no file")


def referenced_files(meta: dict, root: Path | None = None) -> list[str]:
    """Paths (relative to the database folder ``root``) of every file the description references; the stored BM25
    index's files (a folder bm25s writes) are listed from ``root``."""
    files = []
    for seg in meta["segments"]:
        files += [f"segments/{seg}/{name}" for name in (*SEGMENT_FILE_NAMES, "segment.json")]
    if meta.get("index"):
        files.append(meta["index"]["file"])
    if meta.get("tombstones"):
        files.append(meta["tombstones"])
    if meta.get("bm25") and root is not None:
        files += sorted(p.relative_to(root).as_posix() for p in (root / meta["bm25"]).rglob("*") if p.is_file())
    return files


SEGMENT_FILE_NAMES = ("tokens.bin", "lengths.bin", "doc.bin", "pos.bin", "docs.parquet")


def file_records(root: Path, files: Iterable[str], known: dict | None = None) -> dict[str, dict]:
    """Size and digests of ``files`` under ``root`` (records in ``known`` are reused: files are never rewritten)."""
    out = {}
    for rel in files:
        if known and rel in known:
            out[rel] = known[rel]
            continue
        p = root / rel
        full = file_digest(p)
        out[rel] = {"size": p.stat().st_size, "sha256": full, "quick": file_digest(p, quick=True)}
    return out


def verify_files(root: Path, meta: dict, full: bool = False) -> int:
    """Check every referenced file against its record; returns the number checked. Raises on the first mismatch."""
    records = meta.get("files")
    if not records:
        return 0
    for rel, rec in records.items():
        p = root / rel
        if not p.is_file():
            raise RetrolmError(f"{p}: missing (referenced by {root / 'meta.json'})")
        size = p.stat().st_size
        if size != rec["size"]:
            raise RetrolmError(f"{p}: corrupt ({size} bytes, {rec['size']} expected); restore it or rebuild")
        digest = file_digest(p) if full else file_digest(p, quick=True)
        if digest != rec["sha256" if full else "quick"]:
            raise RetrolmError(f"{p}: corrupt (checksum mismatch); restore it or rebuild the database")
    return len(records)


def update_counts(meta: dict, n_docs: int, n_chunks: int, doc_n_chunks: np.ndarray, deleted_docs: np.ndarray) -> None:
    """Stored and live document / chunk counts."""
    meta["num_docs_stored"] = n_docs
    meta["num_chunks_stored"] = n_chunks
    meta["num_docs"] = int((~deleted_docs).sum())
    meta["num_chunks"] = int(doc_n_chunks[~deleted_docs].sum()) if n_docs else 0


def swap_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``staging`` folder; the old one survives until the new is in place."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swap(out: Path) -> None:
    """If a crash hit between the two renames of :func:`swap_into_place`, finish it (the new database is complete)
    or undo it (the old one comes back)."""
    old = out.with_name(out.name + ".old")
    if out.exists() or not old.exists():
        return
    staging = staging_path(out)
    if (staging / "meta.json").is_file() and not (staging / "plan.json").exists():
        logger.warning("%s: finishing a replacement interrupted by a crash", out)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        logger.warning("%s: a replacement was interrupted by a crash; the previous database is back", out)
        os.replace(old, out)
