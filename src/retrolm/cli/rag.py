"""``retrolm rag``, ``retrolm rag-eval`` and ``retrolm rag-multiplier``: test-time retrieval over a database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, AsJson, ConfigFile, Quiet, app, command_config, print_json, print_table
from retrolm.core.errors import RetrolmError
from retrolm.core.io import output_folder, write_json
from retrolm.eval.multiplier import load_points, multiplier_report, plot_multiplier
from retrolm.infer.rag import RagConfig, RagPipeline
from retrolm.infer.rag_eval import RagEvalConfig, run_rag_eval

Db = Annotated[str | None, typer.Option("--db", help="Retrieval database folder, or (rag only) a shards file.")]
ReaderOpt = Annotated[str | None, typer.Option("--reader", help="Reading LM: HF folder, smollm2-135m or hub name.")]


@app.command("rag", context_settings=EXTRA)
def rag_cmd(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question.")],
    db: Db = None,
    reader: ReaderOpt = None,
    query: Annotated[str | None, typer.Option("--query", help="Search with this instead of the question (the "
                                              "reader still reads the question).")] = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Answer a question: retrieve → (rerank →) read (→ self-consistency / cross-document consistency), and show the
    passages that support the answer.

    Extra ``key=value`` arguments override RagConfig fields, e.g. ``top_n=20 passages=3 cross_doc=true samples=5``.
    Reranking is on with ``reranker=MODEL`` (or ``rerank=true``: the reader judges its own candidates)."""
    cfg = command_config(RagConfig, ctx, config, db=db, reader=reader)
    if query is not None and cfg.db is None:
        raise RetrolmError("--query is what retrieval searches with: it needs --db")
    answer = RagPipeline.load(cfg).answer(question, query)
    if as_json:
        print_json(answer.to_dict())
        return
    typer.echo(f"answer: {answer.answer}")
    typer.echo(f"mode: {answer.mode}; {answer.flops.total:.3g} FLOPs")
    for i in answer.support:
        p = answer.passages[i]
        text = " ".join(p.text.split())
        where = f"{p.shard}: " if p.shard else ""
        hop = f"hop {p.hop} " if p.hop > 1 else ""
        typer.echo(f"\n[{i + 1}] {p.doc_id} ({where}chunk {p.chunk_id}, {hop}retrieval rank {p.rank + 1})\n    "
                   f"{text[:400]}{'…' if len(text) > 400 else ''}")


@app.command("rag-eval", context_settings=EXTRA)
def rag_eval_cmd(
    ctx: typer.Context,
    db: Db = None,
    data: Annotated[str | None, typer.Option("--data", help="QA JSONL file.")] = None,
    reader: ReaderOpt = None,
    out: Annotated[str | None, typer.Option("--out", help="Report folder (default runs/rag-eval).")] = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Closed book vs retrieval (vs rerank, self-consistency, cross-document consistency) on a QA file: EM / F1, FLOPs
    per question, contamination, and clean-only scores in OUT/rag.json.

    Extra ``key=value`` arguments override RagEvalConfig fields, e.g. ``max_questions=100 samples=5 cross_doc=true
    noise=[unrelated.jsonl] baselines=baselines.yaml``."""
    cfg = command_config(RagEvalConfig, ctx, config, db=db, data=data, reader=reader, out_dir=out)
    result = run_rag_eval(cfg, show_progress=not quiet)
    if as_json:
        print_json(result)
        return
    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:.1f}"

    rows = [[m, pct(s["em"]), pct(s["f1"]), str(s["n"]), f"{s['flops_per_question']:.3g}", pct(s["clean"]["em"]),
             pct(s["clean"]["f1"])] for m, s in result["summary"].items()]
    c = result["contamination"]
    print_table(f"{cfg.out_dir}/rag.json ({100 * c['fraction']:.1f}% contaminated, {c['n']}-gram overlap)",
                ["config", "EM", "F1", "n", "FLOPs/question", "EM clean", "F1 clean"], rows)


@app.command("rag-multiplier")
def rag_multiplier_cmd(
    baselines: Annotated[Path, typer.Option("--baselines", help="YAML/JSON list of no-retrieval models: name, metric, "
                                            "flops (or params and tokens).")],
    systems: Annotated[Path, typer.Option("--systems", help="YAML/JSON list of retrieval systems: name, metric, flops "
                                          "(or params and tokens), test_flops_per_question.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for multiplier.json and multiplier.png.")],
    kind: Annotated[str, typer.Option(help="bpb (log-linear fit, lower is better) or accuracy (bounded "
                                      "sigmoid).")] = "bpb",
    chance: Annotated[float, typer.Option(help="Accuracy at chance (the sigmoid's floor).")] = 0.0,
    ceiling: Annotated[float, typer.Option(help="Best possible accuracy (the sigmoid's ceiling).")] = 1.0,
    queries: Annotated[float, typer.Option(help="Questions whose test-time FLOPs are charged.")] = 0.0,
    as_json: AsJson = False,
) -> None:
    """The compute multiplier: fit the baselines' metric against pretraining FLOPs and invert it at each system."""
    sys_points = load_points(systems, "systems")
    report = multiplier_report(load_points(baselines), sys_points, kind, chance, ceiling, queries)
    out = output_folder(out, "rag-multiplier")
    write_json(out / "multiplier.json", report)
    plot_multiplier(out / "multiplier.png", report, sys_points, "bits per byte" if kind == "bpb" else "accuracy")
    if as_json:
        print_json(report)
        return

    def num(x: float | None, f: str = ".3g") -> str:
        return "–" if x is None else format(x, f)

    print_table(f"compute multiplier ({out / 'multiplier.json'})",
                ["system", "metric", "equivalent FLOPs", "multiplier", "with test-time FLOPs"],
                [[name, num(m["metric"], ".4g"), num(m["equivalent_flops"]), num(m["multiplier"]),
                  num(m["multiplier_with_test_time"])] for name, m in report["systems"].items()])
