"""``retrolm train``."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, ConfigFile, Quiet, app, command_config
from retrolm.train import TrainConfig, Trainer


@app.command("train", context_settings=EXTRA)
def train(
    ctx: typer.Context,
    config: ConfigFile = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Ignore checkpoints in out_dir.")] = False,
    quiet: Quiet = False,
) -> None:
    """Train RETRO (or the baseline: model.retro_layers=[]) on a database. Extra args are dotted overrides,
    e.g. ``retrolm train --config configs/tiny.yaml steps=500 model.d_model=128``."""
    cfg = command_config(TrainConfig, ctx, config)
    run_recipe(Trainer(cfg), resume=not no_resume, quiet=quiet)


def run_recipe(trainer: Trainer, resume: bool, quiet: bool) -> None:
    """setup → train → cleanup, then one summary line (once, under torchrun)."""
    trainer.setup(resume=resume, show_progress=not quiet)
    metrics = trainer.train()
    trainer.cleanup()
    if trainer.main:
        typer.echo(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    if trainer.world > 1:
        # Everything is written and closed. A rank's exit under torchrun aborted now and then in C++ destructors
        # after Python had finished ("terminate called without an active exception", no Python frame in the
        # fault's dump), failing the whole run: leave without running them.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)
