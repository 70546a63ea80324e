"""``retrolm eval``: every mode on the same held-out chunks, the leakage analysis, and the report (JSON, Markdown,
plot). The report folder holds ``config.yaml``, ``eval.json``, ``report.md``, ``leakage.png`` and ``per_chunk.npz``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import MISSING, Field, asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from retrolm.core.config import save_config
from retrolm.core.errors import RetrolmError
from retrolm.core.hub import find_checkpoint
from retrolm.core.io import atomic_path, file_digest, output_folder, write_bytes, write_json
from retrolm.core.versions import library_versions
from retrolm.eval.config import EvalConfig
from retrolm.eval.evaluator import Evaluator, Scores, display_name, neighbours_of_other_documents
from retrolm.eval.groups import chunk_groups, gain_interval
from retrolm.eval.leakage import leakage_curve, novel_chunks, overlap_ratio
from retrolm.eval.report import markdown_table, plot_lines
from retrolm.text.corpus import list_files

RESULT_FILES = ("eval.json", "per_chunk.npz", "report.md", "leakage.png")
"""What ``retrolm eval`` writes next to its config.yaml."""
SCALE_FILES = tuple(f"scale-{axis}.{ext}" for axis in ("neighbours", "db-size") for ext in ("json", "md", "png"))
"""What ``retrolm scale`` writes next to its config.yaml."""


def out_dir(cfg: EvalConfig, own: tuple[str, ...]) -> Path:
    """The report folder, created, with the config that produced it. ``eval`` and ``scale`` share it (and its
    config.yaml) by default, so results are kept only next to a config they belong to: when the settings of the
    evaluation itself (every ``EvalConfig`` field) differ from the ones already there, every result of either command
    is removed; when only this command's own settings differ (a scale axis's ks or fractions), its ``own`` files.
    They are removed before the new config is in place, so a rerun that fails midway leaves none of them."""
    out = output_folder(cfg.out_dir, "eval / scale")
    out.mkdir(parents=True, exist_ok=True)
    path, new = out / "config.yaml", out / ".config.yaml.new"
    save_config(cfg, new)
    inputs, recorded = _inputs(cfg), out / INPUTS_FILE
    if recorded.is_file() and _json_dict(recorded) != inputs:
        # the same settings over other inputs: a run that trained on (`checkpoint: RUN` names its newest checkpoint),
        # an edited database, rewritten held-out files
        for name in RESULT_FILES + SCALE_FILES:
            (out / name).unlink(missing_ok=True)
    elif path.is_file():
        before, after = _config_dict(path), _config_dict(new)
        # where the results go and what ran them do not change them; a field an older config.yaml lacks had its
        # default then
        defaults = {f.name: _default(f) for f in fields(cfg) if f.name not in ("out_dir", "device", "batch_size")}
        shared = [f.name for f in fields(EvalConfig) if f.name in defaults]

        def differ(keys: Iterable[str]) -> bool:
            return any(before.get(k, defaults[k]) != after.get(k, defaults[k]) for k in keys)

        gone = RESULT_FILES + SCALE_FILES if differ(shared) else own if differ(defaults) else ()
        for name in gone:
            (out / name).unlink(missing_ok=True)
    os.replace(new, path)
    write_json(recorded, inputs)
    return out


INPUTS_FILE = ".inputs.json"
"""What a report folder's results were computed from, beyond its config: resolved checkpoints, database state, data."""


def _inputs(cfg: EvalConfig) -> dict:
    def resolved(ref: str) -> str:
        folder = find_checkpoint(ref) if ref else None
        return str(folder.resolve()) if folder is not None else ref

    meta = Path(cfg.db) / "meta.json"
    db = _json_dict(meta) if cfg.db and meta.is_file() else {}
    def digests(paths: Iterable[str]) -> list:
        # a folder by its files: a file rewritten inside it makes other results as well as a named one
        return [file_digest(p, quick=True) if Path(p).is_file() else
                [file_digest(f, quick=True) for f, _ in list_files([p])] if Path(p).is_dir() else p for p in paths]

    return {"checkpoint": resolved(cfg.checkpoint), "baselines": [resolved(b) for b in cfg.baselines],
            "db": {k: db.get(k) for k in ("build_id", "version")}, "data": digests(cfg.data)}


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _json_dict(path: Path) -> dict:
    """A JSON object file, or {} (unreadable: as if it were not there). Not through YAML: it reads JSON's escaped
    surrogate pairs ("\\ud83c\\udf89") as two lone halves."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _config_dict(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _gain(a: float, b: float) -> float:
    """Relative reduction of b by a ((b - a) / b); positive = a is better."""
    return (b - a) / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def run_eval(cfg: EvalConfig, show_progress: bool = True) -> dict[str, Any]:
    """``retrolm eval``: score every mode on the same held-out chunks, analyse leakage, write the report.

    Writes ``config.yaml``, ``eval.json``, ``report.md``, ``leakage.png`` and ``per_chunk.npz`` to ``out_dir``
    and returns the content of ``eval.json``.
    """
    out = out_dir(cfg, RESULT_FILES)
    ev = Evaluator(cfg, show_progress)
    try:
        # the groups are read before any scoring: a group_by the held-out data lacks fails now, not after hours
        groups = chunk_groups(cfg.data, cfg.group_by, ev.source.doc_ids, ev.source.all_chunk_docs()) \
            if cfg.group_by else {}
        if cfg.shuffle_neighbours and (ev.main.in_context or not ev.retrieval):
            raise RetrolmError(f"{cfg.checkpoint}: shuffle_neighbours is a control for models with RETRO layers "
                               "(RETRO, RETRO-fitting)")
        scores: dict[str, Scores] = {}
        doc = ev.source.all_chunk_docs()  # the held-out document of every chunk
        leak_k = max(ev.k, cfg.leakage_neighbours)
        nb = ev.neighbours(leak_k) if ev.retrieval else None  # retrieval off: the database is not searched
        on, off = ev.main_keys
        if ev.retrieval and ev.main.in_context:
            scores[on] = ev.score_in_context(ev.main, True, desc=f"in-context retrieval (k={ev.k})", key=on)
        elif ev.retrieval:
            # what a search for k finds: a fused ranking's first k of a deeper search differ (hybrid fetches each
            # ranking k-deep), and the score must not depend on leakage_neighbours
            read = nb if leak_k == ev.k or ev.retriever.removal_stable else ev.neighbours(ev.k)
            read = neighbours_of_other_documents(read, doc, cfg.seed) if cfg.shuffle_neighbours else read
            scores[on] = ev.score(ev.main, read, ev.k, desc=f"retrieval on (k={ev.k})")
        scores.update(ev.reference_scores())

        result: dict[str, Any] = {
            "models": ev.models(),
            "db": {"path": str(ev.db.path), "version": ev.db.meta["version"], "chunks": ev.db.store.n_chunks,
                   "live_chunks": int((~ev.db.deleted_chunks).sum())},
            "k": ev.k if ev.retrieval else 0,
            "seq_len": ev.seq_chunks * ev.db.chunk_len,
            "exclusion": ev.exclusion,
            "neighbours_read": "shuffled: another document's" if cfg.shuffle_neighbours else "own",
            "summary": {name: ev.summary(s) for name, s in scores.items()},
            "software": library_versions(),
        }
        if ev.main.in_context:
            result["reader"] = {"kind": "in_context", "retriever": ev.retriever.name if ev.retriever else None,
                                "stride": cfg.stride, "query_tokens": cfg.query_tokens, "passages": ev.k,
                                "continuation": cfg.continuation, "context_tokens": cfg.context_tokens,
                                "cost": ev.costs}
        per_chunk = {f"nats:{k}": s.nats for k, s in scores.items()}
        per_chunk.update(tokens=next(iter(scores.values())).tokens, bytes=ev.n_bytes, lengths=ev.lengths,
                         doc=doc)
        novel: np.ndarray | None = None  # without neighbours there is no leakage analysis
        if nb is not None:
            # Leakage: overlap of every chunk with its `leakage_neighbours` nearest (exclusions applied).
            lcs = ev.longest_common_runs(nb[:, : cfg.leakage_neighbours])
            overlap = overlap_ratio(lcs, ev.lengths)
            curve = leakage_curve(overlap, ev.n_bytes, {k: s.nats for k, s in scores.items()})
            novel = novel_chunks(overlap, cfg.novel_tokens, ev.db.chunk_len)
            novel_summary = {name: ev.summary(s, novel) for name, s in scores.items()}
            result["leakage"] = asdict(curve)
            result["novel"] = {
                "definition": f"longest run of tokens shared with the {cfg.leakage_neighbours} nearest neighbours "
                              f"under {cfg.novel_tokens}/{ev.db.chunk_len} of the chunk's length",
                "fraction": float(novel.mean()),
                "summary": novel_summary,
            }
            per_chunk.update(lcs=lcs, overlap=overlap, neighbours=nb)
            if on in scores:
                result["gain"] = {
                    "all": _gain(result["summary"][on]["bpb"], result["summary"][off]["bpb"]),
                    "novel": _gain(novel_summary[on]["bpb"], novel_summary[off]["bpb"]),
                }
                result["gain_ci95"] = {
                    "all": gain_interval(scores[on].nats, scores[off].nats, doc),
                    "novel": gain_interval(scores[on].nats, scores[off].nats, doc, novel),
                }
                for name in scores:
                    if name.startswith("baseline:"):
                        result["gain"][f"vs {name}"] = _gain(result["summary"][on]["bpb"],
                                                             result["summary"][name]["bpb"])
                        result["gain"][f"novel vs {name}"] = _gain(novel_summary[on]["bpb"],
                                                                   novel_summary[name]["bpb"])
            plot_lines(out / "leakage.png", curve.alphas, {display_name(k): v for k, v in curve.bpb.items()},
                       xlabel="max overlap α (r(C) ≤ α)",
                       title="Bits-per-byte on chunks with r(C) ≤ α",
                       secondary=("share of chunks", curve.fraction))
        if groups:  # retrieval off or a baseline too: the bits per byte of each group
            result["groups"] = _groups(ev, groups, scores, on, off, novel)
        write_json(out / "eval.json", result)
        with atomic_path(out / "per_chunk.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **per_chunk)
        write_bytes(out / "report.md", _eval_report(cfg, result).encode())
        return result
    finally:
        ev.close()


def _groups(ev: Evaluator, groups: dict[str, np.ndarray], scores: dict[str, Scores], on: str, off: str,
            novel: np.ndarray | None) -> dict[str, dict]:
    """Summaries per group of documents; with retrieval, gains (with bootstrap intervals over documents); with the
    leakage analysis (``novel``), novel shares and the gain on novel chunks."""
    doc = ev.source.all_chunk_docs()
    out = {}
    for g, sel in groups.items():
        summ = {name: ev.summary(s, sel) for name, s in scores.items()}
        entry: dict[str, Any] = {"docs": len(np.unique(doc[sel])), "chunks": int(sel.sum())}
        if novel is not None:
            entry["novel_fraction"] = float(novel[sel].mean())
        entry["summary"] = summ
        if on in scores:
            entry["gain"] = _gain(summ[on]["bpb"], summ[off]["bpb"])
            entry["gain_ci95"] = gain_interval(scores[on].nats, scores[off].nats, doc, sel)
            if novel is not None:
                entry["gain_novel"] = _gain(ev.summary(scores[on], sel & novel)["bpb"],
                                            ev.summary(scores[off], sel & novel)["bpb"])
        out[g] = entry
    return out


def gain_text(gain: dict[str, float]) -> list[str]:
    """'vs retrieval off, all chunks: 12.3%', … for the report."""
    out = []
    for key, value in gain.items():
        novel = key.startswith("novel")
        ref = key.split("vs ", 1)[1] if "vs " in key else "retrieval off"
        shown = "–" if value is None or math.isnan(value) else f"{value:+.1%}"  # (null once read back from JSON)
        out.append(f"vs {ref}, {'novel' if novel else 'all'} chunks: {shown}")
    return out


def _eval_report(cfg: EvalConfig, r: dict[str, Any]) -> str:
    control = "; **control: each chunk reads another document's neighbours**" if cfg.shuffle_neighbours else ""
    lines = ["# Evaluation", "", f"- checkpoint: `{cfg.checkpoint}`", f"- database: `{r['db']['path']}` (version "
             f"{r['db']['version']}, {r['db']['live_chunks']:,} live chunks)", f"- held-out data: "
             f"{', '.join(f'`{d}`' for d in cfg.data)} — {r['exclusion']['eval_docs']} documents, "
             f"{r['exclusion']['eval_chunks']} chunks", f"- neighbours at evaluation: k = {r['k']}; sequence length "
             f"{r['seq_len']}{control}",
             f"- excluded from retrieval: {r['exclusion']['excluded_docs_same_id']} documents with "
             f"an evaluation document's id, {r['exclusion']['excluded_docs_near_duplicate']} near-duplicates "
             f"({cfg.ngram}-gram {cfg.near_dup_measure} ≥ {cfg.near_dup_threshold}); "
             f"{r['exclusion']['excluded_chunks']} chunks",
             "", "## Bits per byte", ""]
    rows = [[name, s["bpb"], s["loss"], s["perplexity"], s["tokens"], round(s["bytes"])]  # shares: x.9999...
            for name, s in r["summary"].items()]
    lines += [markdown_table(["model / mode", "bits/byte", "nats/token", "perplexity", "tokens", "bytes"], rows), ""]
    if "reader" in r:
        rd = r["reader"]
        lines += [f"Reader: the pretrained LM with in-context retrieval ({rd['retriever']}): every {rd['stride']} "
                  f"tokens the last {rd['query_tokens']} are the query; {rd['passages']} passage(s) "
                  f"({'chunk + continuation' if rd['continuation'] else 'chunk'}) before the last "
                  f"{rd['context_tokens']} tokens of the document. Without retrieval it reads the same window.", ""]
        rows = [[key, c["forward_tokens_per_scored_token"], c["scored_tokens_per_s"], c["seconds"]]
                for key, c in rd["cost"].items()]
        lines += [markdown_table(["mode", "forward tokens per scored token", "scored tokens/s", "seconds"], rows), ""]
    if "gain" in r:
        lines += ["Bits-per-byte reduction with retrieval, relative to the reference (positive = retrieval helps): "
                  + "; ".join(gain_text(r["gain"])), ""]
        if "gain_ci95" in r:
            ci = r["gain_ci95"]
            lines += ["95% bootstrap intervals over documents: all chunks [{:+.1%}, {:+.1%}], novel chunks "
                      "[{:+.1%}, {:+.1%}].".format(*ci["all"], *ci["novel"]), ""]
    if "groups" in r:
        first = next(iter(r["groups"].values()), {})
        gains, novel = "gain" in first, "novel_fraction" in first
        lines += [f"## Per {cfg.group_by}" + (" (95% bootstrap intervals over documents)" if gains else ""), ""]
        names = list(r["summary"])

        def shown(x: float | None) -> str:
            return "–" if x is None or math.isnan(x) else f"{x:+.1%}"

        rows = [[g, d["docs"], d["chunks"], *([f"{d['novel_fraction']:.0%}"] if novel else []),
                 *(d["summary"][n]["bpb"] for n in names),
                 *([f"{shown(d['gain'])} [{shown(d['gain_ci95'][0])}, {shown(d['gain_ci95'][1])}]"] if gains else []),
                 *([shown(d["gain_novel"])] if gains and novel else [])] for g, d in r["groups"].items()]
        header = [cfg.group_by, "docs", "chunks", *(["novel"] if novel else []), *names,
                  *(["gain"] if gains else []), *(["gain on novel"] if gains and novel else [])]
        lines += [markdown_table(header, rows), ""]
    if "leakage" in r:
        leak = r["leakage"]
        lines += ["## Leakage (bits-per-byte over chunks with r(C) ≤ α)", "",
                  f"r(C) = longest common token run between chunk C and its {cfg.leakage_neighbours} nearest "
                  f"neighbours (chunk + continuation) / chunk length. Novel chunks ({r['novel']['definition']}): "
                  f"{r['novel']['fraction']:.1%} of all.", "", "![leakage](leakage.png)", ""]
        names = list(leak["bpb"])
        rows = [[f"{a:.4f}", f"{frac:.1%}", *(leak["bpb"][n][i] for n in names)]
                for i, (a, frac) in enumerate(zip(leak["alphas"], leak["fraction"], strict=True))]
        lines += [markdown_table(["α", "chunks ≤ α", *names], rows), "", "Novel chunks:", ""]
        rows = [[name, s["bpb"], s["chunks"]] for name, s in r["novel"]["summary"].items()]
        lines += [markdown_table(["model / mode", "bits/byte", "chunks"], rows), ""]
    lines += ["## Models", ""]
    kinds = {"causal_lm": "pretrained LM", "retrofit": "RETRO-fitted"}
    rows = [[name, kinds.get(d["kind"], "RETRO" if d["retro"] else "baseline"), d["params"],
             d.get("non_embedding_params", ""), str(d.get("retro_layers", "–"))] for name, d in r["models"].items()]
    lines += [markdown_table(["run", "kind", "params", "non-embedding", "CCA layers"], rows), ""]
    return "\n".join(lines)
