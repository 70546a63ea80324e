"""``retrolm scale``: bits-per-byte of one retrieving model along a scaling axis — database size (nested random
subsets, selected by masks inside the index, plus an optional noisy copy) and neighbours read at evaluation. The model
is a RETRO checkpoint (neighbours in chunked cross-attention) or a pretrained LM (passages in its context)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.core.errors import RetrolmError
from retrolm.core.io import write_bytes, write_json
from retrolm.db import Database, noisy_copy
from retrolm.eval.config import ScaleConfig
from retrolm.eval.evaluator import Evaluator, display_name
from retrolm.eval.groups import chunk_groups
from retrolm.eval.leakage import overlap_by_rank
from retrolm.eval.report import markdown_table, plot_lines
from retrolm.eval.run import out_dir
from retrolm.train import Scores


def scale_neighbours(cfg: ScaleConfig, show_progress: bool = True) -> dict[str, Any]:
    """``retrolm scale neighbours``: RETRO bits-per-byte with k neighbours at evaluation, for each k in ``cfg.ks``.

    For a RETRO reader the result also says what each neighbour rank holds of the text it helps predict (``ranks``,
    see :func:`~retrolm.eval.leakage.overlap_by_rank`): whether the k-th neighbour brings anything to copy. With
    ``group_by`` every row carries the bits-per-byte of each group as well.
    """
    ks = sorted(set(cfg.ks))  # a count given twice is evaluated once
    with _scaling_run(cfg, "scale-neighbours", show_progress) as (out, ev):
        groups = _groups(ev, cfg)
        ranks = None
        if ev.main.in_context:
            scored = ((k, ev.score_in_context(ev.main, True, passages=k, desc=f"k={k}")) for k in ks)
        else:
            nb = ev.neighbours(max(ks))
            ranks = overlap_by_rank(ev.next_chunk_overlap(nb))
            # a fused ranking's first k are not what a search for k finds (each ranking is fetched k-deep)
            prefix = ev.retriever is None or ev.retriever.removal_stable
            scored = ((k, ev.score(ev.main, nb if prefix else ev.neighbours(k), k, desc=f"k={k}")) for k in ks)
        rows = [_row(ev, scores, groups, k=k) for k, scores in scored]
        result = _scaling_result(ev, "neighbours", rows, groups)
        if ranks is not None:
            result["ranks"] = ranks
        _write_scaling(out, "scale-neighbours", result, [r["k"] for r in rows], "neighbours k at evaluation",
                       log2x=True)
        return result


def _groups(ev: Evaluator, cfg: ScaleConfig) -> dict[str, np.ndarray]:
    """Chunk masks of the held-out groups (``group_by``), empty without it."""
    if not cfg.group_by:
        return {}
    return chunk_groups(cfg.data, cfg.group_by, ev.source.doc_ids, ev.source.all_chunk_docs())


def _group_bpb(ev: Evaluator, scores: Scores, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """Bits per byte of ``scores`` over each group's chunks."""
    return {g: ev.summary(scores, sel)["bpb"] for g, sel in groups.items()}


def _row(ev: Evaluator, scores: Scores, groups: dict[str, np.ndarray], **fields) -> dict[str, Any]:
    """One point of a curve: its ``fields``, the summary over all chunks and, with groups, each group's bits/byte."""
    row = {**fields, **ev.summary(scores)}
    if groups:
        row["groups"] = _group_bpb(ev, scores, groups)
    return row


def scale_db_size(cfg: ScaleConfig, show_progress: bool = True) -> dict[str, Any]:
    """``retrolm scale db-size``: RETRO bits-per-byte with databases of growing size.

    A fraction f of ``cfg.fractions`` keeps the first f of the live documents in a seeded random order (nested
    subsets); the others are masked inside FAISS, so the keys are exactly those of the full database and nothing is
    re-embedded.
    With ``cfg.noise`` (corpus paths), those documents are added to a copy of the database (in ``out_dir``) and the
    full database plus noise is evaluated too (a store that only grows with noise should change little).
    """
    fractions, noise = cfg.fractions, cfg.noise
    with _scaling_run(cfg, "scale-db-size", show_progress) as (out, ev):
        groups = _groups(ev, cfg)
        store = ev.db.store
        # the noisy copy first: a bad noise corpus (e.g. an id already in the database) fails before any scoring
        noisy = noisy_copy(ev.db, out / "db-with-noise", noise, show_progress) if noise else None
        order = np.random.default_rng(cfg.seed).permutation(np.flatnonzero(~ev.db.deleted_docs))
        chunk_doc = store.all_chunk_docs()
        rows = []
        for f in sorted(set(fractions)):
            keep_docs = np.zeros(store.n_docs, dtype=bool)
            keep_docs[order[: max(1, round(f * len(order)))]] = True
            mask = ~keep_docs[chunk_doc] | ev.excluded_chunks
            rows.append(_row(ev, _score_with(ev, mask, desc=f"db {f:.0%}"), groups, fraction=f,
                             db_chunks=int((~mask).sum())))
        points = {}
        if noisy is not None:
            # the added documents get the same scrutiny: nothing of the held-out set may come back through them
            by_id, near, _ = ev.excluded_docs(noisy, np.arange(store.n_docs, noisy.store.n_docs))
            mask = (by_id | near)[noisy.store.all_chunk_docs()]
            mask[: store.n_chunks] |= ev.excluded_chunks
            n_noise = noisy.store.n_chunks - store.n_chunks
            row = _row(ev, _score_with(ev, mask, db=noisy, desc="db + noise"), groups, fraction=1.0, noise=True,
                       noise_chunks=n_noise, db_chunks=int((~mask & ~noisy.deleted_chunks).sum()))
            rows.append(row)
            points[f"+ {n_noise:,} noise chunks"] = (row["db_chunks"], row["bpb"])
        result = _scaling_result(ev, "db_size", rows, groups)
        x = [r["db_chunks"] for r in rows if not r.get("noise")]
        _write_scaling(out, "scale-db-size", result, x, "database chunks (retrievable)", logx=True, points=points)
        return result


def _score_with(ev: Evaluator, mask: np.ndarray, db: Database | None = None, desc: str = "score"):
    """The main model's per-chunk scores reading ``db`` (default: the evaluation database) with ``mask``ed chunks
    never retrieved: RETRO through precomputed neighbours, a pretrained LM through passages in its context."""
    if ev.main.in_context:
        return ev.score_in_context(ev.main, True, db=db, exclude_chunks=mask, desc=desc)
    nb = ev.neighbours(ev.k, db=db, exclude_chunks=mask)
    return ev.score(ev.main, nb, ev.k, db=db, desc=desc)


@contextlib.contextmanager
def _scaling_run(cfg: ScaleConfig, name: str, show_progress: bool) -> Iterator[tuple[Path, Evaluator]]:
    """The report folder (the axis's earlier ``name.*`` results removed if they were made with other settings) and a
    prepared evaluator of a RETRO checkpoint, closed afterwards."""
    out = out_dir(cfg, tuple(f"{name}.{ext}" for ext in ("json", "md", "png")))
    ev = Evaluator(cfg, show_progress)
    try:
        if not ev.main.retrieval:
            raise RetrolmError(f"{ev.main.path}: a baseline checkpoint does not retrieve; scaling needs a retrieving "
                               "model (RETRO or a pretrained LM)")
        if not ev.retrieval:  # every row was the score without retrieval, reported as the axis's
            raise RetrolmError("scale: retrieval=false leaves nothing to scale (the axis is what retrieval reads)")
        if cfg.shuffle_neighbours:  # a control of `retrolm eval` that scale did not apply
            raise RetrolmError("scale: shuffle_neighbours is a control of `retrolm eval`, not of a scaling axis")
        yield out, ev
    finally:
        ev.close()


def _scaling_result(ev: Evaluator, axis: str, rows: list[dict], groups: dict[str, np.ndarray] | None = None
                    ) -> dict[str, Any]:
    refs = ev.reference_scores()
    out = {"axis": axis, "main": ev.main_keys[0], "models": ev.models(), "rows": rows,
           "references": {name: ev.summary(s) for name, s in refs.items()}, "exclusion": ev.exclusion}
    if groups:  # the references per group too, so that every row's group can be read as a change
        out["reference_groups"] = {name: _group_bpb(ev, s, groups) for name, s in refs.items()}
    return out


def _write_scaling(out: Path, name: str, result: dict, x: list, xlabel: str, *, logx: bool = False,
                   log2x: bool = False, points: dict[str, tuple[float, float]] | None = None) -> None:
    clean = [r for r in result["rows"] if not r.get("noise")]
    series = {display_name(result["main"]): [r["bpb"] for r in clean]}
    hlines = {display_name(name_): s["bpb"] for name_, s in result["references"].items()}
    plot_lines(out / f"{name}.png", x, series, xlabel=xlabel, hlines=hlines, logx=logx, log2x=log2x,
               title=f"Bits-per-byte vs {xlabel}", points=points)
    write_json(out / f"{name}.json", result)
    keys = [k for k in ("k", "fraction", "db_chunks", "noise_chunks") if any(k in r for r in result["rows"])]
    groups = sorted({g for r in result["rows"] for g in r.get("groups", {})})  # bits/byte per group, if any
    rows = [[*(r.get(k, "") for k in keys), r["bpb"], r["perplexity"], *(r.get("groups", {}).get(g, "")
                                                                          for g in groups)] for r in result["rows"]]
    ref_groups = result.get("reference_groups", {})
    rows += [[name_, *[""] * (len(keys) - 1), s["bpb"], s["perplexity"],
              *(ref_groups.get(name_, {}).get(g, "") for g in groups)] for name_, s in result["references"].items()]
    text = [f"# {name}", "", f"![{name}]({name}.png)", "",
            markdown_table([*keys, "bits/byte", "perplexity", *groups], rows), ""]
    if result.get("ranks"):
        text += ["## What each neighbour rank holds of the next chunk", "",
                 "Share of the chunk that follows a query chunk found verbatim in its rank-j neighbour (chunk + "
                 "continuation), as the longest common run; 'holds' = at least half of it.", "",
                 markdown_table(["rank", "mean overlap", "holds ≥ 50%", "first best", "some rank ≤ j holds"],
                                [[r["rank"], r["mean_overlap"], r["holds"], r["best"], r["holds_within"]]
                                 for r in result["ranks"]]), ""]
    write_bytes(out / f"{name}.md", "\n".join(text).encode())
