"""Honest evaluation (SPEC R3, R5): bits-per-byte with and without retrieval, leakage, and scaling curves.

:class:`Evaluator` prepares everything once — the checkpoints, the held-out documents tokenized exactly like the
database, the database chunks that must not be retrieved, and the retrieval queries — then scores every held-out
chunk under any setting (retrieval on or off, k neighbours, a database subset). On top of it:

- :func:`run_eval` — ``retrolm eval``: RETRO with retrieval, RETRO with retrieval switched off, and baseline
  checkpoints, all on the same chunks; the leakage curve and the gain on novel chunks; report + plot + JSON.
- :func:`scale_db_size` — ``retrolm scale db-size``: the same model with databases made of growing random
  fractions of the documents (nested subsets, selected by masks inside FAISS: nothing is re-embedded), and with
  unrelated documents added.
- :func:`scale_neighbours` — ``retrolm scale neighbours``: k = 1, 2, 4, … neighbours at evaluation.

Evaluation documents never reach the model through retrieval: database documents with the same id are excluded,
and so are near-duplicates (13-gram Jaccard >= 0.8, as the paper). Bits-per-byte = total nats / ln 2 / UTF-8
bytes of the scored text (each chunk counts its share of its document's bytes); the EOS predicted after a
document's last token is scored, as in training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retrolm.config import save_config
from retrolm.data import IGNORE, RetroSequences, chunk_bytes, tokenize_corpus
from retrolm.database import Database
from retrolm.dedup import find_near_duplicates
from retrolm.errors import RetrolmError
from retrolm.fsutil import write_bytes, write_json
from retrolm.leakage import bits_per_byte, leakage_curve, longest_common_run, overlap_ratio
from retrolm.model import RetroModel
from retrolm.report import markdown_table, plot_lines
from retrolm.train import Checkpoint, load_checkpoint

logger = logging.getLogger(__name__)

RETRO, RETRO_OFF = "retro", "retro_no_retrieval"


def display_name(key: str) -> str:
    """A result key ("retro", "retro_no_retrieval", "baseline:<run>") as a plot label."""
    return {RETRO: "RETRO, retrieval on", RETRO_OFF: "RETRO, retrieval off"}.get(
        key, key.replace("baseline:", "baseline ")
    )


@dataclass
class EvalConfig:
    """What ``retrolm eval`` / ``retrolm scale`` evaluate, and how; saved as config.yaml next to the results."""

    checkpoint: str = ""
    """RETRO (or baseline) checkpoint folder, or a run folder (its newest checkpoint)."""
    db: str = ""
    """Retrieval database used at evaluation (its tokenizer and chunk length must match the checkpoint's)."""
    data: list[str] = field(default_factory=list)
    """Held-out corpus paths (files or folders, any format the database ingests)."""
    baselines: list[str] = field(default_factory=list)
    """Baseline checkpoints (no RETRO layers) scored on the same chunks."""
    out_dir: str = "runs/eval"
    """Where the report, plots, JSON and this config are written."""
    neighbours: int | None = None
    """k neighbours per chunk at evaluation; None → as trained."""
    retrieval: bool = True
    """False → score the checkpoint with retrieval switched off only."""
    leakage_neighbours: int = 10
    """Neighbours whose overlap with a chunk defines r(C) (the paper uses the 10 nearest)."""
    near_dup_threshold: float = 0.8
    """Exclude database documents whose n-gram Jaccard similarity to an evaluation document reaches this; 0 = off."""
    ngram: int = 13
    """n of the n-grams of the near-duplicate test."""
    novel_tokens: int = 8
    """A chunk sharing fewer contiguous tokens than this with its neighbours is *novel* (8 of 64 = 12.5%)."""
    max_docs: int | None = None
    """Evaluate only the first N held-out documents."""
    seq_len: int | None = None
    """Evaluation sequence length (a multiple of chunk_len); None → the shortest training length of the models."""
    batch_size: int = 4
    """Sequences per forward pass."""
    device: str | None = None
    """cpu | cuda (default: cuda if available)."""
    seed: int = 0
    """Seed of the random document order behind database-size subsets."""

    def __post_init__(self) -> None:
        if self.neighbours is not None and self.neighbours < 1:
            raise RetrolmError(f"neighbours must be >= 1, got {self.neighbours}")
        if self.leakage_neighbours < 1 or self.novel_tokens < 1 or self.ngram < 1 or self.batch_size < 1:
            raise RetrolmError("leakage_neighbours, novel_tokens, ngram and batch_size must be positive")
        if not 0.0 <= self.near_dup_threshold <= 1.0:
            raise RetrolmError(f"near_dup_threshold must be in [0, 1], got {self.near_dup_threshold}")
        for name in ("seq_len", "max_docs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RetrolmError(f"{name} must be positive, got {value}")


def _labels(ckpts: list[Checkpoint]) -> list[str]:
    """Short, unique names of checkpoints: their run folders' names (``name#2`` … where two are the same)."""
    names = [c.path.parent.parent.name if c.path.parent.name == "checkpoints" else c.path.name for c in ckpts]
    out: list[str] = []
    for name in names:
        out.append(name if name not in out else f"{name}#{sum(o.split('#')[0] == name for o in out) + 1}")
    return out


@dataclass
class Scores:
    """Per-chunk results of one model under one setting, over all held-out chunks."""

    nats: np.ndarray
    """(n_chunks,) summed negative log-likelihood of the chunk's targets, in nats."""
    tokens: np.ndarray
    """(n_chunks,) targets scored per chunk."""


class Evaluator:
    """Checkpoints, database, held-out chunks, exclusions and queries, prepared once for any number of settings."""

    def __init__(self, cfg: EvalConfig, show_progress: bool = True) -> None:
        if not cfg.checkpoint or not cfg.db or not cfg.data:
            raise RetrolmError("evaluation needs a checkpoint, a database and held-out data")
        self.cfg, self.show = cfg, show_progress
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.db = Database.open(cfg.db)
        self.main = load_checkpoint(cfg.checkpoint, device=self.device)
        self.baselines = [load_checkpoint(b, device=self.device) for b in cfg.baselines]
        for ckpt in (self.main, *self.baselines):
            self._check_compatible(ckpt)
        for b in self.baselines:
            if b.retrieval:
                raise RetrolmError(f"{b.path}: --baseline must be a checkpoint without RETRO layers")
        self.labels = dict(zip(map(id, (self.main, *self.baselines)), _labels([self.main, *self.baselines]),
                               strict=True))
        self.retrieval = cfg.retrieval and self.main.retrieval
        self.k = cfg.neighbours or self.main.model.config.num_neighbours
        m = self.db.chunk_len
        seq_len = cfg.seq_len or min(c.model.config.seq_len for c in (self.main, *self.baselines))
        if seq_len % m or any(seq_len > c.model.config.seq_len for c in (self.main, *self.baselines)):
            raise RetrolmError(f"seq_len {seq_len}: must be a multiple of chunk_len {m} and fit every model")
        self.seq_chunks = seq_len // m

        self._tmp = tempfile.TemporaryDirectory(prefix="retrolm-eval-")
        self.source = tokenize_corpus(cfg.data, self.db.tokenizer, m, Path(self._tmp.name) / "heldout",
                                      max_docs=cfg.max_docs)
        if self.source.n_chunks == 0:
            raise RetrolmError(f"{', '.join(cfg.data)}: held-out data produced no tokens")
        self.n_bytes = chunk_bytes(self.source, self.db.tokenizer)
        self.lengths = self.source.lengths(np.arange(self.source.n_chunks)).astype(np.int64)
        self.exclusion = self._exclusions()
        self._queries: np.ndarray | None = None
        self._scores: dict[tuple, Scores] = {}

    # ---- setup
    def _check_compatible(self, ckpt: Checkpoint) -> None:
        if ckpt.tokenizer.sha256 != self.db.tokenizer.sha256:
            raise RetrolmError(f"{ckpt.path}: trained with another tokenizer than the database {self.db.path} uses")
        if ckpt.model.config.chunk_len != self.db.chunk_len:
            raise RetrolmError(
                f"{ckpt.path}: chunk_len {ckpt.model.config.chunk_len}, the database {self.db.path} has "
                f"{self.db.chunk_len}"
            )

    def _exclusions(self) -> dict[str, Any]:
        """Database chunks never retrieved for evaluation: copies of the held-out documents and near-duplicates."""
        by_id, near, pairs = self.excluded_docs(self.db, np.arange(self.db.store.n_docs))
        self.excluded_chunks = (by_id | near)[self.db.store.all_chunk_docs()]
        return {
            "eval_docs": self.source.n_docs,
            "eval_chunks": self.source.n_chunks,
            "excluded_docs_same_id": int(by_id.sum()),
            "excluded_docs_near_duplicate": int((near & ~by_id).sum()),
            "excluded_chunks": int(self.excluded_chunks.sum()),
            "near_duplicate_pairs": pairs[:100],
        }

    def excluded_docs(self, db: Database, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        """Which of the database documents ``docs`` (global indices) share an id with a held-out document, and which
        are near-duplicates of one: two bool masks over ``db``'s documents (False outside ``docs``), and the pairs."""
        store = db.store
        held_ids = set(self.source.doc_ids)
        by_id = np.zeros(store.n_docs, dtype=bool)
        by_id[docs] = [store.doc_ids[d] in held_ids for d in docs]
        near = np.zeros(store.n_docs, dtype=bool)
        pairs = []
        if self.cfg.near_dup_threshold > 0:
            cand = docs[~db.deleted_docs[docs] & ~by_id[docs]]
            found = find_near_duplicates(
                (self.source.doc_tokens(d) for d in range(self.source.n_docs)),
                (store.doc_tokens(int(d)) for d in cand),
                threshold=self.cfg.near_dup_threshold, n=self.cfg.ngram, show_progress=self.show,
            )
            for f in found:
                near[cand[f.reference]] = True
                pairs.append([self.source.doc_ids[f.query], store.doc_ids[cand[f.reference]], round(f.jaccard, 4)])
        return by_id, near, pairs

    @property
    def queries(self) -> np.ndarray:
        """Query vectors of every held-out chunk (its text through the database's frozen encoder), computed once."""
        if self._queries is None:
            ids = np.arange(self.source.n_chunks)
            toks, lens = self.source.tokens(ids), self.lengths
            texts = self.db.tokenizer.decode_batch([t[:n].tolist() for t, n in zip(toks, lens, strict=True)])
            self._queries = self.db.embed(texts, show_progress=self.show)
        return self._queries

    def neighbours(self, k: int, db: Database | None = None, exclude_chunks: np.ndarray | None = None) -> np.ndarray:
        """(n_chunks, k) database chunk ids retrieved for every held-out chunk, evaluation documents excluded."""
        db = db or self.db
        mask = self.excluded_chunks if exclude_chunks is None else exclude_chunks
        _, ids = db.search_vectors(self.queries, k, exclude_chunks=mask)
        return ids

    def longest_common_runs(self, neighbours: np.ndarray, block: int = 4096) -> np.ndarray:
        """Longest token run each held-out chunk shares with any of its ``neighbours`` (chunk + continuation)."""
        n, K = neighbours.shape
        out = np.zeros(n, dtype=np.int64)
        for s in range(0, n, block):  # bounded memory: one block of neighbour tokens at a time
            ids = np.arange(s, min(s + block, n))
            ntoks, nmask = self.db.store.neighbour_tokens(neighbours[ids].reshape(-1))
            out[ids] = longest_common_run(self.source.tokens(ids), self.lengths[ids],
                                          ntoks.reshape(len(ids), K, -1), nmask.reshape(len(ids), K, -1))
        return out

    # ---- scoring
    @torch.no_grad()
    def score(self, ckpt: Checkpoint, neighbours: np.ndarray | None = None, k: int | None = None,
              db: Database | None = None, desc: str = "score") -> Scores:
        """Per-chunk nats of ``ckpt`` over all held-out chunks, reading ``neighbours[:, :k]`` (None → retrieval off)."""
        db = db or self.db
        model: RetroModel = ckpt.model
        seqs = RetroSequences(self.source, self.seq_chunks, self.db.tokenizer.eos_id, neighbours,
                              db.store if neighbours is not None else None, k, include_tail=True,
                              tokenizer=self.db.tokenizer)
        n, C, m = self.source.n_chunks, self.seq_chunks, self.db.chunk_len
        eos = -1 if self.db.tokenizer.eos_id is None else self.db.tokenizer.eos_id
        nats, count = np.zeros(n), np.zeros(n, dtype=np.int64)
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
               else contextlib.nullcontext())
        bs = self.cfg.batch_size
        for start in tqdm(range(0, len(seqs), bs), desc=desc, unit="batch", disable=not self.show, leave=False):
            batch = seqs.batch(range(start, min(start + bs, len(seqs))), neighbours is not None).to(self.device)
            with amp:
                logits = model(batch.idx, batch.neighbours, batch.neighbour_mask).logits
            ce = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                                 reduction="none")
            B, T = batch.idx.shape
            # A loss belongs to the chunk of the token it predicts, position p + 1 (the next sequence's first chunk
            # for p = T − 1); the EOS after a document's last token belongs to that token's chunk.
            targets = batch.targets.cpu().numpy()
            pos = np.arange(T)[None, :]
            owner = np.where(targets == eos, pos // m, (pos + 1) // m) + (start + np.arange(B))[:, None] * C
            valid = (targets != IGNORE) & (owner < n)
            np.add.at(nats, owner[valid], ce.view(B, T).double().cpu().numpy()[valid])
            np.add.at(count, owner[valid], 1)
        return Scores(nats, count)

    def summary(self, scores: Scores, select: np.ndarray | None = None) -> dict[str, float]:
        """bits-per-byte, nats per token, perplexity and counts over all (or the selected) chunks."""
        sel = np.ones(len(scores.nats), dtype=bool) if select is None else select
        tokens = int(scores.tokens[sel].sum())
        loss = float(scores.nats[sel].sum()) / max(tokens, 1)
        return {
            "bpb": bits_per_byte(scores.nats, self.n_bytes, sel),
            "loss": loss,
            "perplexity": math.exp(loss) if tokens else float("nan"),
            "tokens": tokens,
            "bytes": float(self.n_bytes[sel].sum()),
            "chunks": int(sel.sum()),
        }

    def models(self) -> dict[str, dict]:
        """Name → description of every evaluated checkpoint."""
        out = {}
        for ckpt in (self.main, *self.baselines):
            out[self.labels[id(ckpt)]] = {
                "path": str(ckpt.path),
                "retro": ckpt.retrieval,
                "params": ckpt.model.num_params(),
                "non_embedding_params": ckpt.model.num_params(non_embedding=True),
                "retro_layers": list(ckpt.model.config.retro_layers),
                "train_num_neighbours": ckpt.model.config.num_neighbours,
            }
        return out

    def reference_scores(self) -> dict[str, Scores]:
        """Retrieval-off scores: the main checkpoint without retrieval and every baseline (cached)."""
        out = {}
        key = RETRO_OFF if self.main.retrieval else f"baseline:{self.labels[id(self.main)]}"
        if ("off", "main") not in self._scores:
            self._scores[("off", "main")] = self.score(self.main, desc="retrieval off")
        out[key] = self._scores[("off", "main")]
        for b in self.baselines:
            if ("off", str(b.path)) not in self._scores:
                self._scores[("off", str(b.path))] = self.score(b, desc=f"baseline {self.labels[id(b)]}")
            out[f"baseline:{self.labels[id(b)]}"] = self._scores[("off", str(b.path))]
        return out

    def close(self) -> None:
        self._tmp.cleanup()


# ---------------------------------------------------------------------------------------------------------- eval
def _out_dir(cfg: EvalConfig) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def _gain(a: float, b: float) -> float:
    """Relative reduction of b by a ((b - a) / b); positive = a is better."""
    return (b - a) / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def run_eval(cfg: EvalConfig, show_progress: bool = True) -> dict[str, Any]:
    """``retrolm eval``: score every mode on the same held-out chunks, analyse leakage, write the report.

    Writes ``config.yaml``, ``eval.json``, ``report.md``, ``leakage.png`` and ``per_chunk.npz`` to ``out_dir``
    and returns the content of ``eval.json``.
    """
    out = _out_dir(cfg)
    ev = Evaluator(cfg, show_progress)
    try:
        scores: dict[str, Scores] = {}
        leak_k = max(ev.k, cfg.leakage_neighbours)
        nb = ev.neighbours(leak_k) if ev.retrieval else None  # retrieval off: the database is not searched
        if ev.retrieval:
            scores[RETRO] = ev.score(ev.main, nb, ev.k, desc=f"retrieval on (k={ev.k})")
        scores.update(ev.reference_scores())

        result: dict[str, Any] = {
            "models": ev.models(),
            "db": {"path": str(ev.db.path), "version": ev.db.meta["version"], "chunks": ev.db.store.n_chunks,
                   "live_chunks": int((~ev.db.deleted_chunks).sum())},
            "k": ev.k if ev.retrieval else 0,
            "seq_len": ev.seq_chunks * ev.db.chunk_len,
            "exclusion": ev.exclusion,
            "summary": {name: ev.summary(s) for name, s in scores.items()},
        }
        per_chunk = {f"nats:{k}": s.nats for k, s in scores.items()}
        per_chunk.update(tokens=next(iter(scores.values())).tokens, bytes=ev.n_bytes, lengths=ev.lengths,
                         doc=ev.source.all_chunk_docs())
        if nb is not None:
            # Leakage: overlap of every chunk with its `leakage_neighbours` nearest (exclusions applied).
            lcs = ev.longest_common_runs(nb[:, : cfg.leakage_neighbours])
            overlap = overlap_ratio(lcs, ev.lengths)
            curve = leakage_curve(overlap, ev.n_bytes, {k: s.nats for k, s in scores.items()})
            novel = lcs < cfg.novel_tokens
            novel_summary = {name: ev.summary(s, novel) for name, s in scores.items()}
            result["leakage"] = asdict(curve)
            result["novel"] = {
                "definition": f"fewer than {cfg.novel_tokens} contiguous tokens shared with the "
                              f"{cfg.leakage_neighbours} nearest neighbours",
                "fraction": float(novel.mean()),
                "summary": novel_summary,
            }
            per_chunk.update(lcs=lcs, overlap=overlap, neighbours=nb)
            if RETRO in scores:
                ref = RETRO_OFF
                result["gain"] = {
                    "all": _gain(result["summary"][RETRO]["bpb"], result["summary"][ref]["bpb"]),
                    "novel": _gain(novel_summary[RETRO]["bpb"], novel_summary[ref]["bpb"]),
                }
                for name in scores:
                    if name.startswith("baseline:"):
                        result["gain"][f"vs {name}"] = _gain(result["summary"][RETRO]["bpb"],
                                                             result["summary"][name]["bpb"])
                        result["gain"][f"novel vs {name}"] = _gain(novel_summary[RETRO]["bpb"],
                                                                   novel_summary[name]["bpb"])
            plot_lines(out / "leakage.png", curve.alphas, {display_name(k): v for k, v in curve.bpb.items()},
                       xlabel="max overlap α (r(C) ≤ α)",
                       title="Bits-per-byte on chunks with r(C) ≤ α",
                       secondary=("share of chunks", curve.fraction))
        write_json(out / "eval.json", result)
        with open(out / "per_chunk.npz", "wb") as f:
            np.savez_compressed(f, **per_chunk)
        write_bytes(out / "report.md", _eval_report(cfg, result).encode())
        return result
    finally:
        ev.close()


def gain_text(gain: dict[str, float]) -> list[str]:
    """'vs retrieval off, all chunks: 12.3%', … for the report."""
    out = []
    for key, value in gain.items():
        novel = key.startswith("novel")
        ref = key.split("vs ", 1)[1] if "vs " in key else "retrieval off"
        out.append(f"vs {ref}, {'novel' if novel else 'all'} chunks: {value:+.1%}")
    return out


def _eval_report(cfg: EvalConfig, r: dict[str, Any]) -> str:
    lines = ["# Evaluation", "", f"- checkpoint: `{cfg.checkpoint}`", f"- database: `{r['db']['path']}` (version "
             f"{r['db']['version']}, {r['db']['live_chunks']:,} live chunks)", f"- held-out data: "
             f"{', '.join(f'`{d}`' for d in cfg.data)} — {r['exclusion']['eval_docs']} documents, "
             f"{r['exclusion']['eval_chunks']} chunks", f"- neighbours at evaluation: k = {r['k']}; sequence length "
             f"{r['seq_len']}", f"- excluded from retrieval: {r['exclusion']['excluded_docs_same_id']} documents with "
             f"an evaluation document's id, {r['exclusion']['excluded_docs_near_duplicate']} near-duplicates "
             f"({cfg.ngram}-gram Jaccard ≥ {cfg.near_dup_threshold}); {r['exclusion']['excluded_chunks']} chunks",
             "", "## Bits per byte", ""]
    rows = [[name, s["bpb"], s["loss"], s["perplexity"], s["tokens"], int(s["bytes"])]
            for name, s in r["summary"].items()]
    lines += [markdown_table(["model / mode", "bits/byte", "nats/token", "perplexity", "tokens", "bytes"], rows), ""]
    if "gain" in r:
        lines += ["Bits-per-byte reduction by RETRO with retrieval, relative to the reference (positive = RETRO is "
                  "better): " + "; ".join(gain_text(r["gain"])), ""]
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
    rows = [[name, "RETRO" if d["retro"] else "baseline", d["params"], d["non_embedding_params"],
             str(d["retro_layers"])] for name, d in r["models"].items()]
    lines += [markdown_table(["run", "kind", "params", "non-embedding", "CCA layers"], rows), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- scaling
def scale_neighbours(cfg: EvalConfig, ks: list[int], show_progress: bool = True) -> dict[str, Any]:
    """``retrolm scale neighbours``: RETRO bits-per-byte with k neighbours at evaluation, for each k in ``ks``."""
    if not ks or min(ks) < 1:
        raise RetrolmError(f"neighbour counts must be positive, got {ks}")
    with _scaling_run(cfg, show_progress) as (out, ev):
        nb = ev.neighbours(max(ks))
        rows = [{"k": k, **ev.summary(ev.score(ev.main, nb, k, desc=f"k={k}"))} for k in sorted(ks)]
        result = _scaling_result(ev, "neighbours", rows)
        _write_scaling(out, "scale-neighbours", result, [r["k"] for r in rows], "neighbours k at evaluation",
                       log2x=True)
        return result


def scale_db_size(
    cfg: EvalConfig, fractions: list[float], noise: list[str] | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """``retrolm scale db-size``: RETRO bits-per-byte with databases of growing size.

    A fraction f keeps the first f of the live documents in a seeded random order (nested subsets); the others
    are masked inside FAISS, so the keys are exactly those of the full database and nothing is re-embedded.
    With ``noise`` (corpus paths), those documents are added to a copy of the database (in ``out_dir``) and the
    full database plus noise is evaluated too (SPEC T6: a store that only grows with noise should change little).
    """
    if not fractions or min(fractions) <= 0 or max(fractions) > 1:
        raise RetrolmError(f"database fractions must be in (0, 1], got {fractions}")
    with _scaling_run(cfg, show_progress) as (out, ev):
        store = ev.db.store
        # the noisy copy first: a bad noise corpus (e.g. an id already in the database) fails before any scoring
        noisy = _noisy_copy(ev.db, out / "db-with-noise", noise, show_progress) if noise else None
        order = np.random.default_rng(cfg.seed).permutation(np.flatnonzero(~ev.db.deleted_docs))
        chunk_doc = store.all_chunk_docs()
        rows = []
        for f in sorted(fractions):
            keep_docs = np.zeros(store.n_docs, dtype=bool)
            keep_docs[order[: max(1, round(f * len(order)))]] = True
            mask = ~keep_docs[chunk_doc] | ev.excluded_chunks
            nb = ev.neighbours(ev.k, exclude_chunks=mask)
            s = ev.summary(ev.score(ev.main, nb, ev.k, desc=f"db {f:.0%}"))
            rows.append({"fraction": f, "db_chunks": int((~mask).sum()), **s})
        points = {}
        if noisy is not None:
            # the added documents get the same scrutiny: nothing of the held-out set may come back through them
            by_id, near, _ = ev.excluded_docs(noisy, np.arange(store.n_docs, noisy.store.n_docs))
            mask = (by_id | near)[noisy.store.all_chunk_docs()]
            mask[: store.n_chunks] |= ev.excluded_chunks
            nb = ev.neighbours(ev.k, db=noisy, exclude_chunks=mask)
            s = ev.summary(ev.score(ev.main, nb, ev.k, db=noisy, desc="db + noise"))
            n_noise = noisy.store.n_chunks - store.n_chunks
            row = {"fraction": 1.0, "noise": True, "noise_chunks": n_noise,
                   "db_chunks": int((~mask & ~noisy.deleted_chunks).sum()), **s}
            rows.append(row)
            points[f"+ {n_noise:,} noise chunks"] = (row["db_chunks"], row["bpb"])
        result = _scaling_result(ev, "db_size", rows)
        x = [r["db_chunks"] for r in rows if not r.get("noise")]
        _write_scaling(out, "scale-db-size", result, x, "database chunks (retrievable)", logx=True, points=points)
        return result


@contextlib.contextmanager
def _scaling_run(cfg: EvalConfig, show_progress: bool) -> Iterator[tuple[Path, Evaluator]]:
    """The report folder and a prepared evaluator of a RETRO checkpoint, closed afterwards."""
    out = _out_dir(cfg)
    ev = Evaluator(cfg, show_progress)
    try:
        if not ev.main.retrieval:
            raise RetrolmError(f"{ev.main.path}: a baseline checkpoint does not retrieve; scaling needs RETRO")
        yield out, ev
    finally:
        ev.close()


def _scaling_result(ev: Evaluator, axis: str, rows: list[dict]) -> dict[str, Any]:
    refs = {name: ev.summary(s) for name, s in ev.reference_scores().items()}
    return {"axis": axis, "models": ev.models(), "rows": rows, "references": refs, "exclusion": ev.exclusion}


def _noisy_copy(db: Database, path: Path, noise: list[str], show_progress: bool) -> Database:
    """A copy of ``db`` with the ``noise`` documents added (reused if it already holds exactly them)."""
    marker = path / "noise.json"
    want = {"source_version": db.meta["version"], "source": str(db.path.resolve()), "noise": [str(n) for n in noise]}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return Database.open(path)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(db.path, path)
    noisy = Database.open(path)
    noisy.add(noise, show_progress=show_progress)
    write_json(marker, want)
    return Database.open(path)


def _write_scaling(out: Path, name: str, result: dict, x: list, xlabel: str, *, logx: bool = False,
                   log2x: bool = False, points: dict[str, tuple[float, float]] | None = None) -> None:
    clean = [r for r in result["rows"] if not r.get("noise")]
    series = {"RETRO (retrieval on)": [r["bpb"] for r in clean]}
    hlines = {display_name(name_): s["bpb"] for name_, s in result["references"].items()}
    plot_lines(out / f"{name}.png", x, series, xlabel=xlabel, hlines=hlines, logx=logx, log2x=log2x,
               title=f"Bits-per-byte vs {xlabel}", points=points)
    write_json(out / f"{name}.json", result)
    keys = [k for k in ("k", "fraction", "db_chunks", "noise_chunks") if any(k in r for r in result["rows"])]
    rows = [[*(r.get(k, "") for k in keys), r["bpb"], r["perplexity"]] for r in result["rows"]]
    rows += [[name_, *[""] * (len(keys) - 1), s["bpb"], s["perplexity"]] for name_, s in result["references"].items()]
    text = [f"# {name}", "", f"![{name}]({name}.png)", "", markdown_table([*keys, "bits/byte", "perplexity"], rows), ""]
    write_bytes(out / f"{name}.md", "\n".join(text).encode())
