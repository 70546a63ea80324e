"""``retrolm db build | add | delete | search | info | compact | bm25``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, AsJson, ConfigFile, Quiet, command_config, db_app, print_json
from retrolm.core.errors import RetrolmError
from retrolm.db import BuildConfig, Database, DatabaseView
from retrolm.db.meta import staging_path
from retrolm.retrieval import get_retriever
from retrolm.retrieval.sharded import ShardedRetriever, is_shards_file

DbDir = Annotated[Path, typer.Argument(help="Database folder.")]
Corpus = Annotated[
    list[Path], typer.Argument(help="Corpus files or folders (.txt/.md/.html folders, .jsonl, .parquet).")
]


@db_app.command("build", context_settings=EXTRA)
def db_build(
    ctx: typer.Context,
    corpus: Corpus,
    out: Annotated[Path, typer.Option("--out", "-o", help="Database folder to create.")],
    encoder: Annotated[str | None, typer.Option(help="Frozen encoder: HF name, short name or local folder.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="train:N, a tokenizer.json / folder, or a model name "
                                                  "(e.g. smollm2-135m).")] = None,
    chunk_len: Annotated[int | None, typer.Option(help="Tokens per chunk (default 64).")] = None,
    index: Annotated[str | None, typer.Option(help="auto | flat | ivfpq | hnsw | none (BM25 only).")] = None,
    index_factory: Annotated[str | None, typer.Option(help="Explicit FAISS index_factory string.")] = None,
    bm25: Annotated[bool | None, typer.Option("--bm25", help="Also store a BM25 index.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Chunks per encoder batch.")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Chunks per resumable embedding shard.")] = None,
    device: Annotated[str | None, typer.Option(help="Encoder device (cpu, cuda, ...).")] = None,
    shard: Annotated[str | None, typer.Option(help="I/N: build shard I (from 0) of N, the documents whose id hashes "
                                              "to I; search the N shards together with a shards file.")] = None,
    config: ConfigFile = None,
    resume: Annotated[bool, typer.Option(help="Resume a partial build of the same inputs.")] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing database (kept until the new one is done).")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Build a retrieval database: tokenize, chunk, embed with a frozen encoder, index with FAISS (and/or BM25).

    Extra ``key=value`` arguments override BuildConfig fields, e.g. ``encoder_max_length=128``."""
    # the corpus list takes every argument after the options: a key=value that is not a file is an override
    overrides = [str(c) for c in corpus if "=" in c.parts[0] and not c.exists()]  # tokenizer=/a/b.json too
    corpus = [c for c in corpus if str(c) not in overrides]
    if not corpus:
        raise RetrolmError("db build: no corpus path given")
    cfg = command_config(BuildConfig, ctx, config, overrides, encoder=encoder, tokenizer=tokenizer, chunk_len=chunk_len,
                         index=index, index_factory=index_factory, bm25=bm25, batch_size=batch_size,
                         shard_size=shard_size, device=device, shard=shard)
    if not resume:
        shutil.rmtree(staging_path(out), ignore_errors=True)
    db = Database.build(corpus, out, cfg, overwrite=overwrite, show_progress=not quiet)
    info = db.info()
    keys = " + ".join(k for k, on in ((f"index {info['index_factory']}", info["index_factory"]),
                                      ("BM25", info["bm25"])) if on)
    part = f" (shard {info['shard']})" if info["shard"] else ""
    typer.echo(f"built {out}{part}: {info['num_docs']} documents, {info['num_chunks']} chunks, {keys}, "
               f"{info['bytes_on_disk'] / 1e6:.1f} MB")


@db_app.command("add")
def db_add(
    db_dir: DbDir,
    corpus: Corpus,
    replace: Annotated[bool, typer.Option(help="Replace documents whose id already exists.")] = False,
    encoder: Annotated[str | None, typer.Option(help="Must match the database's encoder (checked).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Must match the database's tokenizer (checked).")] = None,
    chunk_len: Annotated[int | None, typer.Option(help="Must match the database's chunk length (checked).")] = None,
    device: Annotated[str | None, typer.Option(help="Encoder device.")] = None,
    quiet: Quiet = False,
) -> None:
    """Append documents to a database; they are searchable immediately, nothing is rebuilt. A shard takes only the
    documents that hash to it: give every shard the same files."""
    db = Database.open(db_dir, device=device)
    db.check_compatible(encoder=encoder, tokenizer=tokenizer, chunk_len=chunk_len)
    r = db.add(corpus, replace=replace, show_progress=not quiet)
    other = f"; {r['docs_other_shards']} belong to other shards" if r["docs_other_shards"] else ""
    typer.echo(f"added {r['docs_added']} documents ({r['chunks_added']} chunks), replaced {r['docs_replaced']}"
               f"{other}")


@db_app.command("delete")
def db_delete(
    db_dir: DbDir,
    doc_id: Annotated[list[str] | None, typer.Option("--doc-id", help="Document id to delete (repeatable).")] = None,
    match: Annotated[str | None, typer.Option(help="Delete every document whose text matches this regex.")] = None,
    blocklist: Annotated[
        Path | None, typer.Option(help="File of terms, one per line: delete documents containing any.")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Delete documents by id or by content filter; they are never returned by search again."""
    deleted = Database.open(db_dir).delete(doc_ids=doc_id or (), match=match, blocklist=blocklist,
                                           show_progress=not quiet)
    typer.echo(f"deleted {len(deleted)} documents" + (f": {', '.join(deleted[:20])}" if deleted else ""))


@db_app.command("compact")
def db_compact(db_dir: DbDir, quiet: Quiet = False) -> None:
    """Rewrite the database without deleted documents (chunk ids change)."""
    r = Database.open(db_dir).compact(show_progress=not quiet)
    typer.echo(f"compacted {db_dir}: {r['docs']} documents, {r['chunks']} chunks")


@db_app.command("bm25")
def db_bm25(db_dir: DbDir, quiet: Quiet = False) -> None:
    """Build and store a BM25 index over the database's chunks (kept up to date by later adds)."""
    db = Database.open(db_dir)
    db.store_bm25(show_progress=not quiet)
    typer.echo(f"{db_dir}: BM25 index over {db.store.n_chunks} chunks stored in {db.meta['bm25']}/")


MAX_SEARCH_K = 100_000


@db_app.command("search")
def db_search(
    db_dir: DbDir,
    query: Annotated[str, typer.Argument(help="Query text.")],
    k: Annotated[int, typer.Option("-k", help="Number of results.")] = 5,
    retriever: Annotated[str, typer.Option(help="auto | dense | bm25 | hybrid (auto: dense if the database has "
                                           "dense keys).")] = "auto",
    bm25: Annotated[bool, typer.Option("--bm25", help="Same as --retriever bm25.")] = False,
    as_json: AsJson = False,
    device: Annotated[str | None, typer.Option(help="Encoder device.")] = None,
) -> None:
    """Search a database (or the parts a shards file names) with a text query; shows each chunk, its continuation and
    its document. Read-only."""
    if not query.strip():
        raise RetrolmError("search: the query is empty")
    if not 1 <= k <= MAX_SEARCH_K:  # the result arrays are allocated k wide before anything is found
        raise RetrolmError(f"search: -k must be in 1..{MAX_SEARCH_K:,}, got {k}")
    if bm25 and retriever not in ("auto", "bm25"):  # which one was meant is unknown: --bm25 won silently
        raise RetrolmError(f"search: --bm25 and --retriever {retriever} contradict each other; give one")
    kind = "bm25" if bm25 else retriever
    if is_shards_file(db_dir):
        sharded = ShardedRetriever.open(db_dir, device=device, retriever=kind)
        try:
            hits = sharded.search(query, k).hits(0)
        finally:
            sharded.close()
    else:
        hits = get_retriever(DatabaseView.open(db_dir, device=device), kind).search(query, k).hits(0)
    if as_json:
        print_json([h.to_dict() for h in hits])
        return
    if not hits:
        typer.echo("no results")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_lines=True)
    for col in ("#", "score", "doc (chunk)", "text ⟶ continuation"):
        table.add_column(col)
    for rank, h in enumerate(hits, 1):  # database text is text: "[/note]" or "[red]" in it is not markup
        where = f"{h.shard}: " if getattr(h, "shard", None) else ""
        table.add_row(str(rank), f"{h.score:.3f}", escape(f"{h.doc_id}\n({where}chunk {h.chunk_id}, #{h.position})"),
                      f"{escape(h.text.strip())}\n[dim]⟶ {escape(h.continuation.strip()[:300])}[/dim]")
    Console().print(table)


@db_app.command("info")
def db_info(
    db_dir: DbDir,
    as_json: AsJson = False,
    verify: Annotated[bool, typer.Option("--verify", help="Read every file and check its checksum.")] = False,
) -> None:
    """Describe a database: counts, tokenizer, encoder, indexes, size on disk (a shards file: its parts, checked to be
    the parts of one database)."""
    if is_shards_file(db_dir):
        if verify:
            raise RetrolmError(f"{db_dir}: --verify checks one database folder; run it on each part")
        sharded = ShardedRetriever.open(db_dir)
        sharded.close()
        print_json(sharded.describe()) if as_json else typer.echo(_describe_shards(sharded.describe()))
        return
    db = DatabaseView.open(db_dir)
    info = db.info()
    if verify:
        n = db.verify()
        info["verified_files"] = n if n else "no checksums recorded (format 1)"
    if as_json:
        print_json(info)
        return
    width = max(map(len, info))
    for key, value in info.items():
        typer.echo(f"{key:<{width}}  {value}")


def _describe_shards(d: dict) -> str:
    lines = [f"{d['path']}: {d['num_shards']} shards, {d['num_docs']} documents, {d['num_chunks']} chunks; "
             f"chunk_len {d['chunk_len']}, tokenizer {d['tokenizer']}, encoder {d['encoder'] or 'none (BM25 only)'}; "
             f"retriever {d['retriever']}"]
    for s in d["shards"]:
        index = s["index_factory"] or "no dense index"
        lines.append(f"  {s['label'] or '-':>6}  {s['shard']}: {s['num_docs']} documents, {s['num_chunks']} chunks, "
                     f"{index}{' + BM25' if s['bm25'] else ''}")
    return "\n".join(lines)
