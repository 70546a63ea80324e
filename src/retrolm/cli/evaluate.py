"""``retrolm eval`` and ``retrolm scale db-size | neighbours``."""

from __future__ import annotations

from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, AsJson, ConfigFile, Quiet, app, command_config, print_json, print_table, scale_app
from retrolm.core.errors import RetrolmError
from retrolm.eval import EvalConfig, ScaleConfig, run_eval, scale_db_size, scale_neighbours

# Options shared by `eval` and `scale ...`; every other field of EvalConfig: --config or key=value.
Ckpt = Annotated[str | None, typer.Option(
    "--checkpoint", help="RETRO / baseline checkpoint or run folder, HF folder, hub name or smollm2-135m.")]
EvalDb = Annotated[str | None, typer.Option("--db", help="Retrieval database (evaluation documents are excluded).")]
EvalData = Annotated[list[str] | None, typer.Option("--data", help="Held-out corpus path (repeatable).")]
Baselines = Annotated[list[str] | None, typer.Option("--baseline", help="Baseline checkpoint (repeatable).")]
EvalOut = Annotated[str | None, typer.Option("--out", help="Report folder (default runs/eval).")]


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
    config: ConfigFile = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Bits-per-byte with and without retrieval (and of baselines) on held-out documents, with leakage analysis.

    Extra ``key=value`` arguments override EvalConfig fields, e.g. ``near_dup_threshold=0 max_docs=100``."""
    cfg = command_config(EvalConfig, ctx, config, checkpoint=checkpoint, db=db, data=data, baselines=baseline,
                         out_dir=out, neighbours=neighbours, retrieval=False if no_retrieval else None)
    result = run_eval(cfg, show_progress=not quiet)
    if as_json:
        print_json(result)
        return

    def row(name: str, s: dict) -> list[str]:
        return [name, f"{s['bpb']:.4f}", f"{s['perplexity']:.2f}", f"{s['tokens']:,}"]

    rows = [row(name, s) for name, s in result["summary"].items()]
    if "novel" in result:
        rows += [row(f"{name} (novel chunks)", s) for name, s in result["novel"]["summary"].items()]
    print_table(f"held-out bits per byte (report: {cfg.out_dir}/report.md)",
                ["model / mode", "bits/byte", "perplexity", "tokens"], rows)


def _print_scaling(result: dict, key: str, out_dir: str, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    rows = [[str(r.get(key, "")) + (" + noise" if r.get("noise") else ""), f"{r['db_chunks']:,}" if "db_chunks" in r
             else "", f"{r['bpb']:.4f}"] for r in result["rows"]]
    rows += [[name, "", f"{s['bpb']:.4f}"] for name, s in result["references"].items()]
    print_table(f"bits per byte vs {key} (report: {out_dir})", [key, "database chunks", "bits/byte"], rows)


def _numbers(text: str | None, flag: str, kind: type = float) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RetrolmError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values:  # an empty list would silently fall back to the default sweep
        raise RetrolmError(f"{flag} {text!r}: expected comma-separated numbers")
    return values


@scale_app.command("db-size", context_settings=EXTRA)
def scale_db_cmd(
    ctx: typer.Context,
    checkpoint: Ckpt = None,
    db: EvalDb = None,
    data: EvalData = None,
    baseline: Baselines = None,
    out: EvalOut = None,
    fractions: Annotated[str | None, typer.Option(help="Comma-separated database fractions "
                                                  "(default 0.125,0.25,0.5,1).")] = None,
    noise: Annotated[list[str] | None, typer.Option(help="Unrelated corpus added to a copy of the database.")] = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """The same model (RETRO, or a pretrained LM reading in context) with growing fractions of the database's
    documents retrievable (and plus noise)."""
    cfg = command_config(ScaleConfig, ctx, config, checkpoint=checkpoint, db=db, data=data, baselines=baseline,
                         out_dir=out, fractions=_numbers(fractions, "--fractions"), noise=noise)
    _print_scaling(scale_db_size(cfg, show_progress=not quiet), "fraction", cfg.out_dir, as_json)


@scale_app.command("neighbours", context_settings=EXTRA)
def scale_k_cmd(
    ctx: typer.Context,
    checkpoint: Ckpt = None,
    db: EvalDb = None,
    data: EvalData = None,
    baseline: Baselines = None,
    out: EvalOut = None,
    ks: Annotated[str | None, typer.Option(help="Comma-separated neighbour counts (default 1,2,4,8,16).")] = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """The same model reading k = 1, 2, 4, ... neighbours per chunk (RETRO) or passages per retrieval (a pretrained
    LM) at evaluation."""
    cfg = command_config(ScaleConfig, ctx, config, checkpoint=checkpoint, db=db, data=data, baselines=baseline,
                         out_dir=out, ks=_numbers(ks, "--ks", int))
    _print_scaling(scale_neighbours(cfg, show_progress=not quiet), "k", cfg.out_dir, as_json)
