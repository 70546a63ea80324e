"""``retrolm generate``: RETRO (retrieval once per chunk) or any pretrained causal LM (in-context retrieval)."""

from __future__ import annotations

from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, AsJson, ConfigFile, app, command_config, print_json
from retrolm.core.errors import RetrolmError
from retrolm.db import DatabaseView
from retrolm.infer.generate import GenerateConfig, Generation, format_generation
from retrolm.infer.generator import Generator
from retrolm.retrieval import get_retriever
from retrolm.retrieval.sharded import ShardedRetriever, is_shards_file


@app.command("generate", context_settings=EXTRA)
def generate_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[str | None, typer.Option(help="RETRO checkpoint / run folder, or a pretrained LM (HF folder, "
                                                   "smollm2-135m, hub name).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Text to continue.")] = None,
    db: Annotated[str | None, typer.Option(help="Retrieval database or shards file; omit for retrieval off.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate (default 128).")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (default 1).")] = None,
    k: Annotated[int | None, typer.Option("-k", help="Neighbours (RETRO) or passages (in-context) per "
                                          "retrieval.")] = None,
    retriever: Annotated[str | None, typer.Option(help="auto | dense | bm25 | hybrid.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Go on past end-of-text.")] = False,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Generate text; every generated span lists the database chunks it was conditioned on.

    Extra ``key=value`` arguments override GenerateConfig fields, e.g. ``stride=16 query_tokens=32``."""
    cfg = command_config(GenerateConfig, ctx, config, checkpoint=checkpoint, prompt=prompt, db=db,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, neighbours=k,
                         retriever=retriever, seed=seed, device=device, stop_at_eos=False if ignore_eos else None)
    g = run_generate(cfg)
    if as_json:
        print_json(g.to_dict())
    else:
        typer.echo(format_generation(g))


def run_generate(cfg: GenerateConfig) -> Generation:
    """Load the model (and database), then generate as the model reads: RETRO per chunk, a plain LM in context."""
    gen = Generator.load(cfg.checkpoint, device=cfg.device)
    if cfg.db is not None and is_shards_file(cfg.db):
        gen.check_sharded(cfg.db)
        if not gen.in_context:  # a RETRO checkpoint that retrieves was refused: this one reads nothing
            raise RetrolmError("this checkpoint has no RETRO layers; generate without --db")
        sharded = ShardedRetriever.open(cfg.db, device=cfg.device, retriever=cfg.retriever)
        try:
            return gen.generate(cfg, sharded)
        finally:
            sharded.close()
    database = DatabaseView.open(cfg.db, device=cfg.device) if cfg.db is not None else None
    if database is not None:
        gen.check_database(database)
    return gen.generate(cfg, get_retriever(database, cfg.retriever) if database is not None else None)
