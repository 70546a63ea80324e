"""Crash-safe file writes: everything goes to a temporary name in the same folder, then is renamed.

``os.replace`` is atomic on POSIX within one file system, so a reader (or a resumed build) sees either
the old file or the complete new one, never a torn write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.core.errors import RetrolmError

logger = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
"""Mode of files retrolm writes: what ``open()`` would give (mkstemp's 0600 would hide them from the group)."""


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a file system that cannot is left alone."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with naming_errors(path, temp=tmp_path):
            yield tmp_path
            os.chmod(tmp_path, FILE_MODE)  # some writers (safetensors) replace the file with a 0600 one
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def naming_errors(path: str | Path, temp: Path | None = None) -> Iterator[None]:
    """Give an ``OSError`` raised inside without a file name (a full disk during ``write``), or naming the hidden
    temporary file ``temp`` it was written as, the name ``path``, so that the CLI's one-line message says which file
    could not be written: ``path: No space left on device``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None and (temp is None or os.fspath(e.filename) != os.fspath(temp)):
            raise
        reason = os.strerror(e.errno) if e.errno else (e.strerror or str(e) or type(e).__name__)
        raise OSError(e.errno, reason, str(path)) from e


class _Unbuffered:
    """A file wrapper that numpy does not recognise as a real file: ``np.save`` then writes through ``write`` (in
    16 MB blocks), so a full disk raises ``OSError(ENOSPC)`` instead of numpy's errno-less short-write message."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        return self._f.write(data)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / ±inf float as None: JSON has no such numbers, and Python's ``NaN`` / ``Infinity``
    tokens break strict parsers (jq, JavaScript's ``JSON.parse``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (indented, keys sorted; a missing number, NaN or ±inf, as ``null``)."""
    write_bytes(path, (json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RetrolmError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RetrolmError(f"{path}: corrupt {what} ({e})") from None


def jsonl_values(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``("file:line", value)`` of every non-blank line of a JSONL file a user hands in (questions, benchmark
    corpora), read strictly: a line that is not UTF-8 or not JSON is a one-line error naming it (a leading byte-order
    mark is read). Corpus ingestion, which skips bad lines instead, has its own reader."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise RetrolmError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise RetrolmError(f"{where}: invalid JSON ({e.msg})") from None
            if _SURROGATE_ESCAPE.search(line):  # "\ud800" is valid JSON but no text: tokenizers and files reject it
                check_unicode(json.dumps(value, ensure_ascii=False), where)
            yield where, value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_unicode(text: str, where: str) -> str:
    """``text``, or a one-line error naming ``where`` when it holds half of a UTF-16 pair (a lone surrogate, which
    JSON's ``\\ud800`` and undecodable command-line bytes produce): it cannot be encoded, tokenized or written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RetrolmError(f"{where}: not valid Unicode (a lone surrogate, U+{ord(text[e.start]):04X})") from None
    return text


def read_json_object(path: str | Path, what: str = "JSON file") -> dict:
    """A JSON file that must hold an object (a checkpoint's model.json, database.json, checksums.json)."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise RetrolmError(f"{path}: corrupt {what} (expected a JSON object, found a {type(obj).__name__})")
    return obj


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(_Unbuffered(f), array)


def load_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    path = Path(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise RetrolmError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise RetrolmError(f"{path}: corrupt array file ({e})") from None


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders themselves) to disk: what a third-party writer (bm25s)
    left in the page cache survives a power loss once the folder is renamed into place."""
    for p in sorted(folder.rglob("*"), reverse=True):  # files before the folders that hold them
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(folder)


def commit_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a fully written temporary folder into place (the folder is the unit of atomicity).

    ``final_dir`` must be a name nothing committed refers to yet (a database's next segment): what is there is
    debris of an earlier attempt that crashed before its commit, and is replaced."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def dir_size(path: Path) -> int:
    """Bytes of the files under ``path``; a file or folder removed while it is walked (a writer's staging or temp
    folder, a version a commit retired) counts as gone, not as an error."""
    total = 0
    for root, _, files in os.walk(path):  # os.walk skips a folder that vanished before it was listed
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


LOCK_TIMEOUT_S: float | None = None
"""How long a writer waits for another writer of the same database before giving up (None: ``RETROLM_LOCK_TIMEOUT``
seconds, 600 by default; read when a lock is taken, so a bad value is an error of that command, not of the import)."""


def _lock_timeout() -> float:
    if LOCK_TIMEOUT_S is not None:
        return LOCK_TIMEOUT_S
    raw = os.environ.get("RETROLM_LOCK_TIMEOUT", "600")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise RetrolmError(f"RETROLM_LOCK_TIMEOUT={raw!r}: expected a number of seconds >= 0")
    return value


@contextlib.contextmanager
def exclusive_lock(folder: Path, timeout: float | None = None, what: str = "database", name: str = ".lock"
                   ) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (its file ``name``) so two writers never interleave.

    A second writer waits (saying so once) up to ``timeout`` seconds (``RETROLM_LOCK_TIMEOUT``, 600 by default),
    then fails with a one-line error. Callers must re-read any state they read before taking the lock.
    """
    timeout = _lock_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    said = False
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / name, "a+")  # noqa: SIM115 - closed below, or handed to the caller's with block
        try:
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RetrolmError(
                            f"{folder}: another retrolm process is still writing to this {what} after "
                            f"{timeout:.0f}s; try again when it has finished"
                        ) from None
                    if not said:
                        logger.warning("%s: waiting for another retrolm process writing to this %s", folder, what)
                        said = True
                    time.sleep(0.1)
            # The holder may have moved or replaced the folder meanwhile (a build swaps its staging folder, lock file
            # included, into place): a lock on a file that is no longer folder/.lock guards nothing, so take it again.
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(folder / name))
            except FileNotFoundError:
                same = False
        except BaseException:
            f.close()
            raise
        if same:
            break
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
    with f:
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def folder_holds(path: Path) -> str | None:
    """What retrolm keeps in a folder that an output must not be written into: a database, a model checkpoint (or
    model folder) or a training run; None for any other folder."""
    meta = path / "meta.json"
    if meta.is_file():
        with contextlib.suppress(OSError, ValueError):
            if '"retrolm-db"' in meta.read_text(errors="replace")[:4096]:
                return "a retrolm database"
    # markers a folder of documents does not have by chance (TensorFlow.js writes a model.json; a manual may have a
    # chapter folder called checkpoints)
    if (path / "model.safetensors").is_file() or all((path / n).is_file() for n in ("model.json", "checksums.json")):
        return "a model checkpoint"
    if (path / "checkpoints").is_dir() and any((path / "checkpoints").glob("step-*")):
        return "a training run"
    return None


def output_folder(path: str | Path | None, what: str, run_ok: bool = False) -> Path:
    """``path`` as the folder ``what`` writes its files to, refused in one line when it is empty, a file, or a folder
    holding a database, a checkpoint or (unless ``run_ok``: training resumes there) a training run, whose files it
    would overwrite (a report's config.yaml over a checkpoint's broke its checksums)."""
    if path is None or not str(path).strip():
        raise RetrolmError(f"{what}: no output folder given (out_dir is empty)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RetrolmError(f"{out}: {what} writes a folder here, and this is a file")
    held = folder_holds(out) if out.is_dir() else None
    if held is not None and not (run_ok and held == "a training run"):
        raise RetrolmError(f"{out}: {held}; {what} would write its files into it (give another output folder)")
    return out


QUICK_DIGEST_FULL_BYTES = 64 << 20  # up to this size even a quick digest reads the whole file (~50 ms)


def file_digest(path: str | Path, quick: bool = False) -> str:
    """SHA-256 of a file, hex; ``quick`` hashes a file over 64 MB only in 64 evenly spaced 64 KiB blocks (+ its size).

    The quick digest is what a database checks on every open (cheap at any size, catches truncation and most
    overwrites); ``retrolm db info --verify`` checks the full one.
    """
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    block, blocks = 1 << 16, 64
    with open(path, "rb") as f:
        if not quick or size <= QUICK_DIGEST_FULL_BYTES:
            for piece in iter(lambda: f.read(1 << 20), b""):
                h.update(piece)
        else:
            h.update(str(size).encode())
            for i in range(blocks):
                f.seek((size - block) * i // (blocks - 1))
                h.update(f.read(block))
    return h.hexdigest()
