"""``retrolm corpus split``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrolm.cli.app import corpus_app
from retrolm.text.corpus import split_corpus


@corpus_app.command("split")
def corpus_split(
    corpus: Annotated[list[Path], typer.Argument(help="Corpus files or folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for train.jsonl and heldout.jsonl.")],
    heldout: Annotated[float, typer.Option(help="Fraction of documents held out.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the hash that assigns documents.")] = 0,
) -> None:
    """Split a corpus by document into train.jsonl (for the database) and heldout.jsonl (for evaluation)."""
    counts = split_corpus(corpus, out, heldout, seed)
    typer.echo(f"{out}: {counts['train']} train documents, {counts['heldout']} held-out documents")
