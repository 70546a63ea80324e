"""``retrolm generate``."""

from __future__ import annotations

from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, AsJson, ConfigFile, app, command_config, print_json
from retrolm.core.io import read_json
from retrolm.db import DatabaseView
from retrolm.infer.generate import GenerateConfig, format_generation, generate
from retrolm.models.loading import load_model
from retrolm.retrieval import get_retriever
from retrolm.text.tokenizer import load_tokenizer


@app.command("generate", context_settings=EXTRA)
def generate_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint folder or run folder (newest checkpoint).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Text to continue.")] = None,
    db: Annotated[str | None, typer.Option(help="Retrieval database; omit for retrieval off.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate (default 128).")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (default 1).")] = None,
    k: Annotated[int | None, typer.Option("-k", help="Neighbours per chunk (default: as trained).")] = None,
    retriever: Annotated[str | None, typer.Option(help="dense | bm25 | hybrid.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Go on past end-of-text.")] = False,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Generate text; every generated chunk lists the database chunks it was conditioned on."""
    cfg = command_config(GenerateConfig, ctx, config, checkpoint=checkpoint, prompt=prompt, db=db,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, neighbours=k,
                         retriever=retriever, seed=seed, device=device, stop_at_eos=False if ignore_eos else None)
    model, folder = load_model(cfg.checkpoint, device=cfg.device)
    tokenizer = load_tokenizer(str(folder))
    ret = None
    if cfg.db is not None:
        database = DatabaseView.open(cfg.db, device=cfg.device)
        record = folder / "database.json"
        database.check_trained_with(read_json(record) if record.is_file() else None, folder)
        ret = get_retriever(database, cfg.retriever)
    g = generate(model, tokenizer, cfg.prompt, ret, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                 top_p=cfg.top_p, num_neighbours=cfg.neighbours, seed=cfg.seed, stop_at_eos=cfg.stop_at_eos)
    if as_json:
        print_json(g.to_dict())
    else:
        typer.echo(format_generation(g))
