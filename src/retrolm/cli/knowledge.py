"""``retrolm knowledge``: new facts in the weights, in the context or in a database (SPEC K)."""

from __future__ import annotations

from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, ConfigFile, app, command_config, print_table
from retrolm.infer.knowledge import KnowledgeConfig, KnowledgeStudy


@app.command("knowledge", context_settings=EXTRA)
def knowledge_cmd(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option("--data", help="Folder from retrolm corpus knowledge.")] = None,
    reader: Annotated[str | None, typer.Option(help="Pretrained causal LM (default smollm2-135m).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Output folder (default runs/knowledge).")] = None,
    config: ConfigFile = None,
) -> None:
    """Inject synthetic facts into a pretrained LM by fine-tuning, augmented fine-tuning, the context or retrieval,
    and test the facts, their reversals and syllogisms.

    Extra ``key=value`` arguments override KnowledgeConfig fields, e.g. ``conditions=[closed_book,retrieval]
    retrieve_k=2 finetune.epochs=12 finetune.lr=1e-4``."""
    cfg = command_config(KnowledgeConfig, ctx, config, data=data, reader=reader, out_dir=out)
    result = KnowledgeStudy(cfg).run()
    kinds = [*result["kinds"], "all"]
    rows = [[cond, *(f"{100 * row[k]['accuracy']:.1f}" for k in kinds)] for cond, row in result["accuracy"].items()]
    print_table(f"accuracy (%), {result['items']} items; report: {cfg.out_dir}/report.md", ["condition", *kinds],
                [["chance", *(f"{100 * result['chance'][k]:.1f}" for k in kinds)], *rows])
