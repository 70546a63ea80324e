"""``retrolm realm pretrain|finetune|eval``: REALM over a database's chunks (see :mod:`retrolm.train.realm`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, AsJson, ConfigFile, app, command_config, print_json, print_table
from retrolm.core.errors import RetrolmError
from retrolm.core.hub import find_checkpoint
from retrolm.db import DatabaseView
from retrolm.eval.qa import load_qa
from retrolm.eval.realm import evaluate_realm
from retrolm.models.realm import RealmModel
from retrolm.train.realm import RealmConfig, check_questions, finetune, pretrain
from retrolm.train.realm_index import DatabaseDocuments

realm_app = typer.Typer(help="REALM: a trainable retriever marginalised over the top-k (pretrain, finetune, eval).",
                        no_args_is_help=True)
app.add_typer(realm_app, name="realm")

Db = Annotated[Path, typer.Option("--db", help="Database folder whose chunks are the documents.")]
Out = Annotated[Path, typer.Option("--out", help="Output folder.")]
Checkpoint = Annotated[str, typer.Option("--checkpoint", help="A REALM model folder, or a run folder (its final/ "
                                          "model, else its newest checkpoint); or an encoder (minilm, a hub name or "
                                          "folder): an untrained REALM starting from it.")]
Data = Annotated[Path, typer.Option("--data", help="QA JSONL: {\"id\", \"question\", \"answers\"} per line.")]


def model_folder(path: Path) -> Path:
    """The model folder of ``--checkpoint``: itself, its ``final/``, or its newest checkpoint."""
    folder = path / "final" if (path / "final" / "model.json").is_file() else find_checkpoint(path)
    if folder is None:
        raise RetrolmError(f"{path}: not a REALM model or run folder (no model.json)")
    return folder


def load_realm(ref: str, cfg: RealmConfig) -> RealmModel:
    """A REALM model from a model folder or a run folder; or, given an encoder (a short or hub name, or a Hugging Face
    folder), an untrained REALM whose three encoders start from it (``embed_dim``, ``pooling`` and ``normalize`` from
    ``cfg``): the "no REALM pre-training" baselines."""
    from retrolm.core.device import default_device

    device = default_device(cfg.device)
    if is_encoder(Path(ref)):  # the reference as typed: ./folder must not become a hub name "folder"
        return RealmModel.from_encoder(ref, cfg.embed_dim, cfg.pooling, cfg.normalize).to(device).eval()
    return RealmModel.from_pretrained(model_folder(Path(ref)), device)


def is_encoder(path: Path) -> bool:
    """``--checkpoint`` names an encoder, not a REALM model or run folder."""
    run = any((path / name).exists() for name in ("final/model.json", "checkpoints", "model.json"))
    return not run and (not path.exists() or (path / "config.json").is_file())


@realm_app.command("pretrain", context_settings=EXTRA)
def pretrain_cmd(ctx: typer.Context, db: Db, out: Out, config: ConfigFile = None,
                 no_resume: Annotated[bool, typer.Option("--no-resume", help="Start over.")] = False,
                 as_json: AsJson = False) -> None:
    """Pre-train REALM (masked-LM marginal likelihood over k candidates incl. the null document, asynchronous index
    refresh) on the sentences of the database's chunks; resumable.

    Extra ``key=value`` arguments override RealmConfig fields, e.g. ``steps=2000 refresh_every=100 masking=random``."""
    cfg = command_config(RealmConfig, ctx, config)
    log = pretrain(DatabaseDocuments(DatabaseView.open(db, device=cfg.device)), out, cfg, resume=not no_resume)
    summary = _summary(log)
    if as_json:
        print_json(summary)
        return
    print_table(f"REALM pre-training ({out})", list(summary), [[str(v) for v in summary.values()]])


def _summary(log: dict) -> dict:
    last = [s for s in log["steps"][-10:] if s.get("loss") is not None]
    lags = [r["lag"] for r in log.get("refreshes", [])]
    return {"steps": len(log["steps"]),
            "loss": round(sum(s["loss"] for s in last) / len(last), 4) if last else None,
            "utility": round(sum(s.get("utility", 0.0) for s in last) / len(last), 4) if last else None,
            "refreshes": len(lags), "mean_lag": round(sum(lags) / len(lags), 2) if lags else None}


@realm_app.command("finetune", context_settings=EXTRA)
def finetune_cmd(ctx: typer.Context, checkpoint: Checkpoint, db: Db, data: Data, out: Out, config: ConfigFile = None,
                 as_json: AsJson = False) -> None:
    """Fine-tune for open-domain QA: top ``qa_k`` documents, document encoder and index fixed, answer = a span.

    Extra ``key=value`` arguments override RealmConfig fields, e.g. ``steps=500 lr=1e-4``."""
    cfg = command_config(RealmConfig, ctx, config)
    items = [it for it in load_qa(data) if not it.multiple_choice]
    check_questions(items, str(data))
    model = load_realm(checkpoint, cfg)
    docs = DatabaseDocuments(DatabaseView.open(db, device=cfg.device))
    log = finetune(model, docs, [it.question for it in items], [it.answers for it in items], out, cfg)
    trained = [s for s in log["steps"] if s["loss"] is not None]
    summary = {"steps": len(log["steps"]), "steps_with_answers": len(trained),
               "loss": round(sum(s["loss"] for s in trained[-10:]) / len(trained[-10:]), 4) if trained else None}
    if as_json:
        print_json(summary)
        return
    print_table(f"REALM fine-tuning ({out})", list(summary), [[str(v) for v in summary.values()]])


@realm_app.command("eval", context_settings=EXTRA)
def eval_cmd(ctx: typer.Context, checkpoint: Checkpoint, db: Db, data: Data, out: Out, config: ConfigFile = None,
             as_json: AsJson = False) -> None:
    """Open-domain QA exact match / F1 and retrieval recall@k, written to OUT/realm.json.

    The config defaults to the checkpoint's ``config.yaml`` (its lengths and ``qa_k``); ``--config`` and extra
    ``key=value`` arguments override it."""
    if config is None and not is_encoder(Path(checkpoint)):
        saved = model_folder(Path(checkpoint)) / "config.yaml"
        config = saved if saved.is_file() else None
    cfg = command_config(RealmConfig, ctx, config)
    model = load_realm(checkpoint, cfg)
    items = load_qa(data)
    check_questions([it for it in items if not it.multiple_choice], str(data))
    docs = DatabaseDocuments(DatabaseView.open(db, device=cfg.device))
    result = evaluate_realm(model, docs, items, cfg, out)
    summary = {k: result[k] for k in ("em", "f1", "n", "recall_at_k", "k")}
    if as_json:
        print_json(summary)
        return
    print_table(f"REALM open-domain QA ({out / 'realm.json'})", list(summary), [[str(v) for v in summary.values()]])
