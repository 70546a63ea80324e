"""``retrolm retrofit``."""

from __future__ import annotations

from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, ConfigFile, Quiet, app, command_config
from retrolm.cli.train import run_recipe
from retrolm.train.retrofit import RetrofitConfig, RetrofitTrainer


@app.command("retrofit", context_settings=EXTRA)
def retrofit(
    ctx: typer.Context,
    base: Annotated[str | None, typer.Option(help="Pretrained causal LM: HF folder, short name (smollm2-135m) or "
                                             "hub name.")] = None,
    db: Annotated[str | None, typer.Option(help="Database built with the base's tokenizer (db build --tokenizer "
                                           "MODEL).")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder (checkpoints, metrics).")] = None,
    config: ConfigFile = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Ignore checkpoints in the run folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """RETRO-fit a pretrained LM: add a neighbour encoder and chunked cross-attention, train them on a database.

    The base stays frozen unless ``unfreeze=true`` or ``lora=true``. Extra args are dotted overrides, e.g.
    ``retrolm retrofit --base smollm2-135m --db runs/smollm2/db --out runs/rf steps=500 cca_layers=[24,30]``."""
    cfg = command_config(RetrofitConfig, ctx, config, base=base, db=db, out_dir=out)
    run_recipe(RetrofitTrainer(cfg), resume=not no_resume, quiet=quiet)
