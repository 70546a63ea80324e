"""The ``retrolm`` command line: one verb per pipeline stage.

``retrolm corpus split`` → ``retrolm db build|add|delete|search|info|compact`` → ``retrolm train`` →
``retrolm eval`` / ``retrolm scale db-size|neighbours`` → ``retrolm generate``.

Errors that are the user's to fix (a missing folder, a corrupt index, a mismatched encoder) are printed as
one line, ``error: <file>: <problem>``, with exit status 2 and no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from retrolm.errors import RetrolmError

app = typer.Typer(
    help="retrolm: semi-parametric language models (retrieval databases, RETRO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Build, update and search retrieval databases.", no_args_is_help=True)
app.add_typer(db_app, name="db")
corpus_app = typer.Typer(help="Prepare corpora.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")
scale_app = typer.Typer(help="Scaling curves: bits-per-byte vs database size or neighbours.", no_args_is_help=True)
app.add_typer(scale_app, name="scale")

DbDir = Annotated[Path, typer.Argument(help="Database folder.")]
Corpus = Annotated[
    list[Path], typer.Argument(help="Corpus files or folders (.txt/.md/.html folders, .jsonl, .parquet).")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
# Options shared by `eval` and `scale ...` (everything else of EvalConfig: --config or dotted key=value overrides)
Ckpt = Annotated[str | None, typer.Option("--checkpoint", help="RETRO or baseline checkpoint / run folder.")]
EvalDb = Annotated[str | None, typer.Option("--db", help="Retrieval database (evaluation documents are excluded).")]
EvalData = Annotated[list[str] | None, typer.Option("--data", help="Held-out corpus path (repeatable).")]
Baselines = Annotated[list[str] | None, typer.Option("--baseline", help="Baseline checkpoint (repeatable).")]
EvalOut = Annotated[str | None, typer.Option("--out", help="Report folder (default runs/eval).")]
EvalYaml = Annotated[Path | None, typer.Option("--config", help="YAML EvalConfig; options override it.")]
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@db_app.command("build")
def db_build(
    corpus: Corpus,
    out: Annotated[Path, typer.Option("--out", "-o", help="Database folder to create.")],
    encoder: Annotated[str | None, typer.Option(help="Frozen encoder: HF name or local folder.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="train:N, a tokenizer.json / folder, or a HF name.")] = None,
    chunk_len: Annotated[int | None, typer.Option(help="Tokens per chunk (default 64).")] = None,
    index: Annotated[str | None, typer.Option(help="auto | flat | ivfpq | hnsw.")] = None,
    index_factory: Annotated[str | None, typer.Option(help="Explicit FAISS index_factory string.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Chunks per encoder batch.")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Chunks per resumable embedding shard.")] = None,
    device: Annotated[str | None, typer.Option(help="Encoder device (cpu, cuda, ...).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML BuildConfig; flags override it.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume a partial build of the same inputs.")] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing database (kept until the new one is done).")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Build a retrieval database: tokenize, chunk, embed with a frozen encoder, index with FAISS."""
    import shutil

    from retrolm.config import load_config
    from retrolm.database import BuildConfig, Database

    cfg = load_config(
        BuildConfig,
        config,
        encoder=encoder,
        tokenizer=tokenizer,
        chunk_len=chunk_len,
        index=index,
        index_factory=index_factory,
        batch_size=batch_size,
        shard_size=shard_size,
        device=device,
    )
    if not resume:
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    db = Database.build(corpus, out, cfg, overwrite=overwrite, show_progress=not quiet)
    info = db.info()
    typer.echo(
        f"built {out}: {info['num_docs']} documents, {info['num_chunks']} chunks, index {info['index_factory']}, "
        f"{info['bytes_on_disk'] / 1e6:.1f} MB"
    )


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
    """Append documents to a database; they are searchable immediately, nothing is rebuilt."""
    from retrolm.database import Database

    db = Database.open(db_dir, device=device)
    db.check_compatible(encoder=encoder, tokenizer=tokenizer, chunk_len=chunk_len)
    r = db.add(corpus, replace=replace, show_progress=not quiet)
    typer.echo(f"added {r['docs_added']} documents ({r['chunks_added']} chunks), replaced {r['docs_replaced']}")


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
    from retrolm.database import Database

    db = Database.open(db_dir)
    deleted = db.delete(doc_ids=doc_id or (), match=match, blocklist=blocklist, show_progress=not quiet)
    typer.echo(f"deleted {len(deleted)} documents" + (f": {', '.join(deleted[:20])}" if deleted else ""))


@db_app.command("compact")
def db_compact(db_dir: DbDir, quiet: Quiet = False) -> None:
    """Rewrite the database without deleted documents (chunk ids change)."""
    from retrolm.database import Database

    r = Database.open(db_dir).compact(show_progress=not quiet)
    typer.echo(f"compacted {db_dir}: {r['docs']} documents, {r['chunks']} chunks")


@db_app.command("search")
def db_search(
    db_dir: DbDir,
    query: Annotated[str, typer.Argument(help="Query text.")],
    k: Annotated[int, typer.Option("-k", help="Number of results.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    device: Annotated[str | None, typer.Option(help="Encoder device.")] = None,
    bm25: Annotated[bool, typer.Option("--bm25", help="Rank lexically with BM25 instead of the dense keys.")] = False,
) -> None:
    """Search a database with a text query; shows each chunk, its continuation and its document."""
    from retrolm.database import Database

    hits = Database.open(db_dir, device=device).search(query, k=k, retriever="bm25" if bm25 else "dense")
    if as_json:
        _print_json([h.to_dict() for h in hits])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True)
    for col in ("#", "score", "doc (chunk)", "text ⟶ continuation"):
        table.add_column(col)
    for rank, h in enumerate(hits, 1):
        table.add_row(
            str(rank),
            f"{h.score:.3f}",
            f"{h.doc_id}\n(chunk {h.chunk_id}, #{h.position})",
            f"{h.text.strip()}\n[dim]⟶ {h.continuation.strip()[:300]}[/dim]",
        )
    Console().print(table)


@db_app.command("info")
def db_info(db_dir: DbDir, as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """Describe a database: counts, tokenizer, encoder, index, size on disk."""
    from retrolm.database import Database

    info = Database.open(db_dir).info()
    if as_json:
        _print_json(info)
    else:
        width = max(map(len, info))
        for key, value in info.items():
            typer.echo(f"{key:<{width}}  {value}")


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="YAML TrainConfig (see configs/).")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Ignore checkpoints in out_dir.")] = False,
    quiet: Quiet = False,
) -> None:
    """Train RETRO (or the baseline: model.retro_layers=[]) on a database. Extra args are dotted overrides,
    e.g. ``retrolm train --config configs/tiny.yaml steps=500 model.d_model=128``."""
    from retrolm.config import load_config
    from retrolm.train import TrainConfig, Trainer

    cfg = load_config(TrainConfig, config, ctx.args)
    trainer = Trainer(cfg)
    trainer.setup(resume=not no_resume, show_progress=not quiet)
    metrics = trainer.train()
    trainer.cleanup()
    if trainer.main:  # under torchrun, one summary line
        typer.echo(json.dumps({k: round(v, 4) for k, v in metrics.items()}))


@app.command("generate")
def generate_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder or run folder (newest checkpoint).")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    db: Annotated[Path | None, typer.Option(help="Retrieval database; omit for retrieval off.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    k: Annotated[int | None, typer.Option("-k", help="Neighbours per chunk (default: as trained).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Go on past end-of-text.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Generate text; every generated chunk lists the database chunks it was conditioned on."""
    from retrolm.database import Database
    from retrolm.generate import format_generation
    from retrolm.train import load_checkpoint

    ckpt = load_checkpoint(checkpoint, device=device)
    database = Database.open(db, device=device) if db is not None else None
    g = ckpt.model.generate(
        prompt, database=database, tokenizer=ckpt.tokenizer, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, num_neighbours=k, seed=seed, stop_at_eos=not ignore_eos,
    )
    if as_json:
        _print_json(g.to_dict())
    else:
        typer.echo(format_generation(g))


@corpus_app.command("split")
def corpus_split(
    corpus: Corpus,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for train.jsonl and heldout.jsonl.")],
    heldout: Annotated[float, typer.Option(help="Fraction of documents held out.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the hash that assigns documents.")] = 0,
) -> None:
    """Split a corpus by document into train.jsonl (for the database) and heldout.jsonl (for evaluation)."""
    from retrolm.corpus import split_corpus

    counts = split_corpus(corpus, out, heldout, seed)
    typer.echo(f"{out}: {counts['train']} train documents, {counts['heldout']} held-out documents")


def _eval_config(ctx: typer.Context, config: Path | None, **options: object):
    from retrolm.config import load_config
    from retrolm.evaluate import EvalConfig

    return load_config(EvalConfig, config, ctx.args, **{k: v for k, v in options.items() if v not in (None, [])})


def _summary_table(title: str, rows: list[list[str]], header: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    Console(width=140).print(table)


@app.command("eval", context_settings=EXTRA)
def eval_cmd(
    ctx: typer.Context,
    checkpoint: Ckpt = None,
    db: EvalDb = None,
    data: EvalData = None,
    baseline: Baselines = None,
    out: EvalOut = None,
    neighbours: Annotated[int | None, typer.Option("--neighbours", "-k", help="k at evaluation.")] = None,
    no_retrieval: Annotated[bool, typer.Option("--no-retrieval", help="Only retrieval off.")] = False,
    config: EvalYaml = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Bits-per-byte with and without retrieval (and of baselines) on held-out documents, with leakage analysis.

    Extra ``key=value`` arguments override EvalConfig fields, e.g. ``near_dup_threshold=0 max_docs=100``."""
    from retrolm.evaluate import run_eval

    cfg = _eval_config(ctx, config, checkpoint=checkpoint, db=db, data=data, baselines=baseline, out_dir=out,
                       neighbours=neighbours, retrieval=False if no_retrieval else None)
    result = run_eval(cfg, show_progress=not quiet)
    if as_json:
        _print_json(result)
        return
    def row(name: str, s: dict) -> list[str]:
        return [name, f"{s['bpb']:.4f}", f"{s['perplexity']:.2f}", f"{s['tokens']:,}"]

    rows = [row(name, s) for name, s in result["summary"].items()]
    if "novel" in result:
        rows += [row(f"{name} (novel chunks)", s) for name, s in result["novel"]["summary"].items()]
    _summary_table(f"held-out bits per byte (report: {cfg.out_dir}/report.md)", rows,
                   ["model / mode", "bits/byte", "perplexity", "tokens"])


def _print_scaling(result: dict, key: str, out_dir: str, as_json: bool) -> None:
    if as_json:
        _print_json(result)
        return
    rows = [[str(r.get(key, "")) + (" + noise" if r.get("noise") else ""), f"{r['db_chunks']:,}" if "db_chunks" in r
             else "", f"{r['bpb']:.4f}"] for r in result["rows"]]
    rows += [[name, "", f"{s['bpb']:.4f}"] for name, s in result["references"].items()]
    _summary_table(f"bits per byte vs {key} (report: {out_dir})", rows, [key, "database chunks", "bits/byte"])


@scale_app.command("db-size", context_settings=EXTRA)
def scale_db_cmd(
    ctx: typer.Context,
    checkpoint: Ckpt = None,
    db: EvalDb = None,
    data: EvalData = None,
    baseline: Baselines = None,
    out: EvalOut = None,
    fractions: Annotated[str, typer.Option(help="Comma-separated database fractions.")] = "0.125,0.25,0.5,1",
    noise: Annotated[list[str] | None, typer.Option(help="Unrelated corpus added to a copy of the database.")] = None,
    config: EvalYaml = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """The same RETRO model with databases built from growing fractions of the documents (and plus noise)."""
    from retrolm.evaluate import scale_db_size

    cfg = _eval_config(ctx, config, checkpoint=checkpoint, db=db, data=data, baselines=baseline, out_dir=out)
    result = scale_db_size(cfg, _floats(fractions, "--fractions"), noise, show_progress=not quiet)
    _print_scaling(result, "fraction", cfg.out_dir, as_json)


@scale_app.command("neighbours", context_settings=EXTRA)
def scale_k_cmd(
    ctx: typer.Context,
    checkpoint: Ckpt = None,
    db: EvalDb = None,
    data: EvalData = None,
    baseline: Baselines = None,
    out: EvalOut = None,
    ks: Annotated[str, typer.Option(help="Comma-separated neighbour counts.")] = "1,2,4,8,16",
    config: EvalYaml = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """The same RETRO model reading k = 1, 2, 4, ... neighbours per chunk at evaluation."""
    from retrolm.evaluate import scale_neighbours

    cfg = _eval_config(ctx, config, checkpoint=checkpoint, db=db, data=data, baselines=baseline, out_dir=out)
    result = scale_neighbours(cfg, [int(k) for k in _floats(ks, "--ks")], show_progress=not quiet)
    _print_scaling(result, "k", cfg.out_dir, as_json)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RetrolmError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _setup_logging() -> None:
    level = os.environ.get("RETROLM_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "httpx", "faiss", "trafilatura", "htmldate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning user-facing errors into one line and exit status 2."""
    _setup_logging()
    try:
        rc = app(args=argv, prog_name="retrolm", standalone_mode=False)
    except RetrolmError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
