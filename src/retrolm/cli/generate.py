"""``retrolm generate``: RETRO (retrieval once per chunk) or any pretrained causal LM (in-context retrieval)."""

from __future__ import annotations

from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, AsJson, ConfigFile, app, command_config, print_json
from retrolm.core.io import read_json_object
from retrolm.db import DatabaseView
from retrolm.eval.incontext import InContextSettings
from retrolm.infer.generate import GenerateConfig, Generation, format_generation, generate
from retrolm.infer.incontext import generate_in_context
from retrolm.models.loading import load_model
from retrolm.retrieval import get_retriever
from retrolm.text.tokenizer import load_tokenizer


@app.command("generate", context_settings=EXTRA)
def generate_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[str | None, typer.Option(help="RETRO checkpoint / run folder, or a pretrained LM (HF folder, "
                                                   "smollm2-135m, hub name).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Text to continue.")] = None,
    db: Annotated[str | None, typer.Option(help="Retrieval database; omit for retrieval off.")] = None,
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
    loaded = load_model(cfg.checkpoint, device=cfg.device)
    tokenizer = load_tokenizer(str(loaded.folder or loaded.name))
    database = DatabaseView.open(cfg.db, device=cfg.device) if cfg.db is not None else None
    ret = get_retriever(database, cfg.retriever) if database is not None else None
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                    stop_at_eos=cfg.stop_at_eos)
    if loaded.kind == "causal_lm":
        settings = InContextSettings(stride=cfg.stride, query_tokens=cfg.query_tokens, passages=cfg.neighbours or 1,
                                     continuation=cfg.continuation, context_tokens=cfg.context_tokens)
        return generate_in_context(loaded.model, tokenizer, cfg.prompt, ret, settings, **sampling)
    if database is not None:
        record = loaded.folder / "database.json"
        database.check_trained_with(read_json_object(record, "database record") if record.is_file() else None,
                                    loaded.folder)
    return generate(loaded.model, tokenizer, cfg.prompt, ret, num_neighbours=cfg.neighbours, **sampling)
