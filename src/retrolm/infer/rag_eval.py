"""``retrolm rag-eval``: test-time retrieval evaluated on a QA file (SPEC T4–T7).

Every configuration adds one stage to the one before and all of them read the same questions:

=================  ==================================================================================================
closed_book        the reader alone
retrieval          + the top ``passages`` retrieved passages in the prompt
rerank             + the ``top_n`` candidates reranked, the best ``passages`` read   (unless ``rerank=false``)
self_consistency   + ``samples`` sampled answers, normalised majority vote                      (``samples>1``)
cross_doc          + each of ``cross_doc_passages`` passages answered alone, consistency vote   (``cross_doc=true``)
=================  ==================================================================================================

``self_consistency`` and ``cross_doc`` build on the reranked passages when reranking is on, else on the retrieved
ones. Multiple-choice items are scored by option log-likelihood, which is deterministic: their self-consistency
answer is their reranked answer. The folder gets ``rag.json`` (``summary[config]`` with ``em``, ``f1``, ``n``,
``flops_per_question``, the same scores on clean and contaminated items, FLOPs by stage), ``predictions.jsonl``,
``report.md`` and ``config.yaml``; with ``noise=[...]`` the retrieval configurations are evaluated again on a copy of
the store with the unrelated corpus added (``robustness``); with ``baselines=FILE`` the compute multiplier of each
configuration (``multiplier``, ``multiplier.png``).

A run that stops (a crash, a killed job) resumes: every finished block of questions is appended to
``progress.jsonl`` in the folder, under a fingerprint of the settings, the QA file and the database, and the same
command evaluates only the blocks that are not there (``rag.json`` counts them in ``resumed_blocks``; the stages'
``seconds`` include their earlier times). Other settings, another QA file or noise file, an edited database, a
reader folder with other weights or another retrolm version start over. The file is removed once the report is
written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from retrolm import __version__
from retrolm.core.config import save_config
from retrolm.core.errors import RetrolmError
from retrolm.core.hub import model_identity
from retrolm.core.io import atomic_path, file_digest, output_folder, write_bytes, write_json
from retrolm.core.versions import library_versions
from retrolm.db import DatabaseView, noisy_copy
from retrolm.db.meta import needs_folder
from retrolm.eval.multiplier import Point, fit_metric, load_points, multiplier_report, plot_multiplier
from retrolm.eval.qa import CONTAMINATION_SCOPES, QAItem, contamination, load_qa, mean_scores, score_prediction
from retrolm.eval.report import markdown_table
from retrolm.infer.consistency import majority_vote
from retrolm.infer.flops import STAGES, StageFlops, mean_flops, pretraining_flops
from retrolm.infer.rag import MODES, Passage, RagConfig, RagPipeline, reading_flops
from retrolm.text.corpus import corpus_fingerprint

logger = logging.getLogger(__name__)

PROGRESS_FORMAT = 1
"""The layout of ``progress.jsonl`` rows (part of the fingerprint: a file of another layout starts over)."""


@dataclass
class RagEvalConfig(RagConfig):
    """``retrolm rag-eval``: the pipeline's settings plus what to evaluate and report."""

    data: str | None = None
    """QA JSONL file (``{"id", "question", "answers"}`` or ``{"id", "question", "choices", "answer"}`` per line)."""
    out_dir: str = "runs/rag-eval"
    """Report folder."""
    max_questions: int | None = None
    """Evaluate only the first N questions."""
    contamination_n: int = 13
    """Word n-gram length of the contamination check (the paper: 16 for MMLU, 26 for Math-500)."""
    contamination_scope: str = "item"
    """item: n-grams of question + answer; parts: the answer on its own too, whole when it is shorter than n words and
    has ``contamination_min_words`` (finds a short answer held verbatim; see :mod:`retrolm.eval.qa`)."""
    contamination_min_words: int = 5
    noise: list[str] = field(default_factory=list)
    """Robustness: unrelated corpus paths added to a copy of the store; the retrieval configurations run again."""
    block: int = 16
    """Questions per block (every stage runs on a block before the next block starts)."""
    baselines: str | None = None
    """YAML/JSON of no-retrieval models ({name, metric (EM or accuracy in %), flops or params + tokens}): the compute
    multiplier of every configuration."""
    multiplier_metric: str = "em"
    """Which score the multiplier fits: em or f1."""
    queries: int | None = None
    """Questions whose test-time FLOPs are charged in the multiplier (default: the questions evaluated)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        needs_folder(self.db, "rag-eval")  # before anything is written to the output folder
        if self.max_questions is not None and self.max_questions < 1:
            raise RetrolmError(f"max_questions must be >= 1, got {self.max_questions}")
        if self.multiplier_metric not in ("em", "f1"):
            raise RetrolmError(f"multiplier_metric must be em or f1, got {self.multiplier_metric!r}")
        if self.block < 1 or self.contamination_n < 1 or self.contamination_min_words < 1:
            raise RetrolmError("block, contamination_n and contamination_min_words must be >= 1")
        if self.contamination_scope not in CONTAMINATION_SCOPES:
            raise RetrolmError(f"contamination_scope must be item or parts, got {self.contamination_scope!r}")
        if self.queries is not None and self.queries < 0:
            raise RetrolmError(f"queries must be >= 0, got {self.queries}")


@dataclass
class Prediction:
    """One configuration's answer to one item."""

    answer: str
    flops: StageFlops
    passages: list[str] = field(default_factory=list)
    """The documents of the passages read, in the order read."""
    support: list[int] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)

    def to_dict(self, item: QAItem) -> dict:
        return {"answer": self.answer, **score_prediction(self.answer, item), "flops": self.flops.total,
                "passages": self.passages, "support": self.support,
                **({"samples": self.samples} if len(self.samples) > 1 else {})}

    def state(self) -> dict:
        """Everything the report needs, as JSON (a block of ``progress.jsonl``)."""
        return {"answer": self.answer, "flops": {s: getattr(self.flops, s) for s in STAGES},
                "passages": self.passages, "support": self.support, "samples": self.samples}

    @classmethod
    def from_state(cls, d: dict) -> Prediction:
        """The prediction :meth:`state` wrote (KeyError / TypeError / ValueError on anything else)."""
        flops = {s: int(d["flops"][s]) for s in STAGES}
        if not isinstance(d["answer"], str) or not all(isinstance(x, list) for x in (d["passages"], d["support"],
                                                                                     d["samples"])):
            raise TypeError("not a prediction")
        return cls(d["answer"], StageFlops(**flops), [str(x) for x in d["passages"]], [int(x) for x in d["support"]],
                   [str(x) for x in d["samples"]])


def _docs(passages: list[Passage]) -> list[str]:
    return [p.doc_id for p in passages]


class Progress:
    """The blocks a run has finished (``progress.jsonl``): a first line with the run's fingerprint, then one line
    per block, ``{"fingerprint", "pass", "start", "ids", "predictions": {config: [...]}, "seconds": {...}}``, flushed
    to disk as each block ends. A line that is torn by a crash or not such a row, and anything after it, is dropped
    when the run resumes; a row of another fingerprint (a second run writing to the same folder) is never used."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint, self.done, self.restored = path, fingerprint, {}, 0
        kept = []
        if path.is_file():
            # split on line feeds only: str.splitlines() also splits on U+2028 and U+0085 inside an answer
            lines = [x for x in path.read_text(encoding="utf-8", errors="replace").split("\n") if x]
            head = _json_line(lines[0]) if lines else None
            if head is not None and head.get("fingerprint") == fingerprint:
                for line in lines[1:]:
                    row = _json_line(line)
                    done = _block(row, fingerprint)
                    if done is None:
                        break
                    self.done[(row["pass"], row["start"])] = (row["ids"], *done)
                    kept.append(line)
                logger.info("%s: resuming after %d finished blocks", path, len(kept))
            else:
                logger.info("%s: made with other settings, questions, database or retrolm: starting over", path)
        with atomic_path(path) as tmp:  # only whole lines remain, so the next one starts on a line of its own
            tmp.write_text("".join(x + "\n" for x in [json.dumps({"fingerprint": fingerprint}), *kept]),
                           encoding="utf-8")

    def get(self, name: str, start: int, ids: list[str]) -> tuple[dict[str, list[Prediction]], dict] | None:
        """A finished block's predictions and seconds, or None (also when it holds other questions)."""
        held = self.done.get((name, start))
        if held is None or held[0] != ids:
            return None
        self.restored += 1
        return held[1], held[2]

    def put(self, name: str, start: int, ids: list[str], preds: dict[str, list[Prediction]], seconds: dict) -> None:
        row = {"fingerprint": self.fingerprint, "pass": name, "start": start, "ids": ids, "seconds": seconds,
               "predictions": {m: [p.state() for p in ps] for m, ps in preds.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _json_line(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _block(row: dict | None, fingerprint: str) -> tuple[dict[str, list[Prediction]], dict] | None:
    """A progress row's predictions and seconds, or None when it is not a finished block of this run."""
    if row is None or row.get("fingerprint") != fingerprint:
        return None
    ids, preds, seconds = row.get("ids"), row.get("predictions"), row.get("seconds")
    if (not isinstance(row.get("pass"), str) or not isinstance(row.get("start"), int) or not isinstance(ids, list)
            or not isinstance(preds, dict) or not isinstance(seconds, dict)):
        return None
    try:
        out = {str(m): [Prediction.from_state(p) for p in ps] for m, ps in preds.items()}
    except (KeyError, TypeError, ValueError):
        return None
    if any(len(ps) != len(ids) for ps in out.values()):
        return None
    return out, {str(k): float(v) for k, v in seconds.items() if isinstance(v, int | float)}


def fingerprint(cfg: RagEvalConfig) -> str:
    """What a run's answers depend on: every setting that changes a prediction, the QA file's bytes, the noise files,
    the database's state (its ``meta.json``, which every edit rewrites), the reader's and reranker's weights (a folder's
    or a packaged model's by quick digests, a hub model's cached revision) and retrolm's version and progress format."""
    ignored = ("out_dir", "max_questions", "queries", "baselines", "multiplier_metric", "contamination_n",
               "contamination_scope", "contamination_min_words")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ignored}
    h = hashlib.sha256(json.dumps([PROGRESS_FORMAT, __version__, settings], sort_keys=True,
                                  default=str).encode())
    h.update(file_digest(cfg.data).encode())
    h.update(json.dumps(corpus_fingerprint(cfg.noise or [])).encode())
    for ref in (cfg.reader, cfg.reranker):
        ref = str(ref).removeprefix("cross-encoder:") if ref else None  # a reranker's model comes after the prefix
        if ref and ref != "reader":
            h.update(model_identity(ref).encode())
    db = Path(cfg.db)
    h.update((db / "meta.json" if db.is_dir() else db).read_bytes())
    return h.hexdigest()


def evaluate_block(pipe: RagPipeline, items: list[QAItem], closed_book: bool = True,
                   timer: dict[str, float] | None = None) -> dict[str, list[Prediction]]:
    """Every enabled configuration on a block of items (stages shared between configurations run once)."""
    c, timer = pipe.cfg, timer if timer is not None else {}
    qs = [it.question for it in items]
    out: dict[str, list[Prediction]] = {}

    def timed(name: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        timer[name] = timer.get(name, 0.0) + time.perf_counter() - t
        return result

    if closed_book:
        out["closed_book"] = [Prediction(r.answers[0], reading_flops(r))
                              for r in timed("closed_book", pipe.read, items, None)]
    passages, base_flops = timed("retrieve", pipe.retrieve, [it.search_text() for it in items])
    def shown(passages: list[list[Passage]]) -> list[list[Passage]]:  # what is read: the first k that fit
        return pipe.fit(items, [ps[: c.passages] for ps in passages])

    read = shown(passages)
    reads = timed("retrieval", pipe.read, items, read)
    out["retrieval"] = [Prediction(r.answers[0], f + reading_flops(r), _docs(ps), list(range(len(ps))))
                        for r, f, ps in zip(reads, base_flops, read, strict=True)]
    if pipe.reranker is not None:
        passages, rr = timed("rerank_scoring", pipe.rerank, qs, passages)
        base_flops = [a + b for a, b in zip(base_flops, rr, strict=True)]
        read = shown(passages)
        reads = timed("rerank", pipe.read, items, read)
        out["rerank"] = [Prediction(r.answers[0], f + reading_flops(r), _docs(ps), list(range(len(ps))))
                         for r, f, ps in zip(reads, base_flops, read, strict=True)]
    if c.samples > 1:
        # option likelihoods are deterministic: a multiple-choice item keeps the answer it had before sampling
        short = [i for i, it in enumerate(items) if not it.multiple_choice]
        reads = timed("self_consistency", pipe.read, [items[i] for i in short], [read[i] for i in short],
                      c.samples, c.sample_temperature) if short else []
        sampled = dict(zip(short, reads, strict=True))
        base = out["rerank" if "rerank" in out else "retrieval"]
        out["self_consistency"] = []
        for i, (f, ps) in enumerate(zip(base_flops, read, strict=True)):
            if i not in sampled:
                out["self_consistency"].append(base[i])
                continue
            r = sampled[i]
            vote = majority_vote(r.answers)
            out["self_consistency"].append(Prediction(vote.answer, f + reading_flops(r), _docs(ps),
                                                      list(range(len(ps))), r.answers))
    if c.cross_doc:
        each = timed("cross_doc", pipe.read_each, items, passages)
        out["cross_doc"] = []
        for it, rs, f, ps in zip(items, each, base_flops, passages, strict=True):
            vote, candidates, support, total = pipe.vote_across_documents(it, ps, rs, f)
            out["cross_doc"].append(Prediction(vote.answer, total, _docs(candidates), support,
                                               [a for r in rs for a in r.answers]))
    return out


def evaluate(pipe: RagPipeline, items: list[QAItem], block: int = 16, closed_book: bool = True,
             show_progress: bool = False, desc: str = "rag-eval", progress: Progress | None = None
             ) -> tuple[dict[str, list[Prediction]], dict]:
    """All configurations on all items, block by block; returns predictions per configuration and seconds per
    stage. With ``progress``, blocks it holds are taken from it and every other block is added to it."""
    preds: dict[str, list[Prediction]] = {}
    timer: dict[str, float] = {}
    for start in tqdm(range(0, len(items), block), desc=desc, unit=f"x{block} questions", disable=not show_progress):
        part = items[start : start + block]
        ids = [it.id for it in part]
        done = progress.get(desc, start, ids) if progress is not None else None
        if done is None:
            seconds: dict[str, float] = {}
            done = evaluate_block(pipe, part, closed_book, seconds), seconds
            if progress is not None:
                progress.put(desc, start, ids, *done)
        for mode, ps in done[0].items():
            preds.setdefault(mode, []).extend(ps)
        for stage, sec in done[1].items():
            timer[stage] = timer.get(stage, 0.0) + sec
    return preds, {k: round(v, 1) for k, v in timer.items()}


def summarize(items: list[QAItem], preds: dict[str, list[Prediction]], contaminated: list[bool]) -> dict:
    """Per configuration: scores on all / clean / contaminated items, FLOPs per question (total and by stage)."""
    clean = [not f for f in contaminated]
    out = {}
    for mode in [m for m in MODES if m in preds]:
        scores = [score_prediction(p.answer, it) for p, it in zip(preds[mode], items, strict=True)]
        flops = mean_flops([p.flops for p in preds[mode]])
        out[mode] = {**mean_scores(scores), "flops_per_question": flops["total"], "flops_by_stage": flops,
                     "clean": mean_scores(scores, clean), "contaminated": mean_scores(scores, contaminated)}
    return out


def _chance(items: list[QAItem]) -> float:
    """Expected accuracy (%) of guessing: 1/choices on multiple-choice items, 0 on the others."""
    return 100 * sum(1 / len(it.choices) for it in items if it.multiple_choice) / len(items)


def _baselines(cfg: RagEvalConfig, items: list[QAItem]) -> list[Point] | None:
    """The multiplier's baselines, read and fitted before anything is evaluated, so that a bad file fails at once
    instead of after the evaluation."""
    if cfg.baselines is None:
        return None
    points = load_points(cfg.baselines)
    fit_metric(points, "accuracy", _chance(items), 100.0)
    return points


def _multiplier(cfg: RagEvalConfig, items: list[QAItem], baselines: list[Point] | None, summary: dict, reader: dict,
                out: Path) -> dict:
    if baselines is None:
        return {"status": "not computed: give baselines=FILE (no-retrieval models of several sizes with known "
                          "pretraining FLOPs)"}
    pre = reader.get("pretraining")
    if pre is None:
        return {"status": f"not computed: the pretraining tokens of {reader['name']} are not known"}
    systems = [Point(mode, pre["flops"], s[cfg.multiplier_metric], s["flops_per_question"])
               for mode, s in summary.items()]
    report = multiplier_report(baselines, systems, "accuracy", _chance(items), 100.0,
                               len(items) if cfg.queries is None else cfg.queries)
    plot_multiplier(out / "multiplier.png", report, systems, f"{cfg.multiplier_metric} (%)")
    return report


def run_rag_eval(cfg: RagEvalConfig, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate every configuration, check contamination (and robustness, the multiplier when asked), write the
    report folder; returns the content of ``rag.json``."""
    if cfg.data is None or cfg.db is None:
        raise RetrolmError("rag-eval needs --data QA.jsonl and --db DB")
    t0 = time.perf_counter()
    out = output_folder(cfg.out_dir, "rag-eval")
    items = load_qa(cfg.data, cfg.max_questions)
    baselines = _baselines(cfg, items)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    db = DatabaseView.open(cfg.db, device=cfg.device)
    t = time.perf_counter()
    contam = contamination(items, db, cfg.contamination_n, cfg.contamination_scope, cfg.contamination_min_words)
    contam_s = time.perf_counter() - t
    pipe = RagPipeline.load(cfg, db, evaluation=True)
    pipe.check_fits(items, str(cfg.data))
    progress = Progress(out / "progress.jsonl", fingerprint(cfg))
    preds, seconds = evaluate(pipe, items, cfg.block, show_progress=show_progress, progress=progress)
    seconds["contamination"] = round(contam_s, 1)
    summary = summarize(items, preds, contam.flags)
    lm = pipe.reader.lm
    params = lm.num_params()
    reader = {"name": lm.name, "params": params, "matmul_params": pipe.reader.cost.matmul_params,
              "chat_template": pipe.reader.chat is not None, "pretraining": pretraining_flops(lm.name, params)}
    result: dict[str, Any] = {
        "data": str(cfg.data), "n": len(items), "multiple_choice": sum(it.multiple_choice for it in items),
        "db": {"path": str(db.path), "chunks": db.store.n_chunks, "documents": db.store.n_docs,
               "retriever": pipe.retriever.kind if pipe.retriever else None},
        "reader": reader, "reranker": pipe.reranker.describe() if pipe.reranker else None,
        "config": asdict(cfg), "contamination": contam.to_dict(), "summary": summary,
        "summary_clean": {m: s["clean"] for m, s in summary.items()},
        "software": library_versions(),
    }
    if cfg.noise:
        noisy = noisy_copy(db, out / "db-with-noise", cfg.noise, show_progress)
        npreds, nsec = evaluate(pipe.with_database(noisy), items, cfg.block, closed_book=False,
                                show_progress=show_progress, desc="rag-eval + noise", progress=progress)
        seconds["robustness"] = round(sum(nsec.values()), 1)
        result["robustness"] = {"noise": cfg.noise, "noise_chunks": noisy.store.n_chunks - db.store.n_chunks,
                                "summary": summarize(items, npreds, contam.flags)}
    result["multiplier"] = _multiplier(cfg, items, baselines, summary, reader, out)
    seconds["total"] = round(time.perf_counter() - t0, 1)  # this process: stages include the resumed blocks' times
    result["seconds"] = seconds
    result["resumed_blocks"] = progress.restored
    write_json(out / "rag.json", result)
    with atomic_path(out / "predictions.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, it in enumerate(items):
            row = {"id": it.id, "question": it.question, **({"query": it.query} if it.query is not None else {}),
                   "gold": it.answers, "contaminated": contam.flags[i],
                   **{m: ps[i].to_dict(it) for m, ps in preds.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_bytes(out / "report.md", report_markdown(result).encode())
    progress.remove()
    return result


def report_markdown(result: dict) -> str:
    """The evaluation as Markdown: scores, clean-only scores and FLOPs per configuration."""
    c = result["contamination"]

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:.1f}"

    rows = [[m, pct(s["em"]), pct(s["f1"]), s["n"], f"{s['flops_per_question']:.3g}", pct(s["clean"]["em"]),
             pct(s["clean"]["f1"]), s["clean"]["n"]] for m, s in _ordered(result["summary"])]
    lines = [f"# Test-time retrieval: {result['data']}", "",
             f"Reader {result['reader']['name']}; {result['n']} questions; retriever {result['db']['retriever']} over "
             f"{result['db']['chunks']:,} chunks; contaminated ({c['n']}-gram overlap with the store"
             f"{_answer_scope(c)}): "
             f"{c['contaminated']} of {c['items']} ({100 * c['fraction']:.1f}%).", "",
             markdown_table(["config", "EM", "F1", "n", "FLOPs/question", "EM (clean)", "F1 (clean)", "n (clean)"],
                            rows), ""]
    if "robustness" in result:
        r = result["robustness"]
        lines += [f"## Robustness: + {r['noise_chunks']:,} chunks of unrelated text", "",
                  markdown_table(["config", "EM", "F1", "n"],
                                 [[m, pct(s["em"]), pct(s["f1"]), s["n"]] for m, s in _ordered(r["summary"])]), ""]
    mult = result.get("multiplier") or {}
    if "systems" in mult:
        lines += ["## Compute multiplier", "", "![multiplier](multiplier.png)", "",
                  markdown_table(["config", "equivalent FLOPs", "multiplier", "with test-time FLOPs"],
                                 [[m, "–" if v["equivalent_flops"] is None else f"{v['equivalent_flops']:.3g}",
                                   v["multiplier"], v["multiplier_with_test_time"]]
                                  for m, v in _ordered(mult["systems"])]), ""]
    return "\n".join(lines)


def _answer_scope(c: dict) -> str:
    """How a ``parts`` check also looked at the answer, for the report."""
    if c.get("scope") != "parts":
        return ""
    return f"; answers also on their own, whole from {c['min_words']} words"


def _ordered(by_mode: dict) -> list[tuple[str, Any]]:
    """Configurations in pipeline order (rag.json stores them sorted by name)."""
    return [(m, by_mode[m]) for m in MODES if m in by_mode]


__all__ = [
    "Prediction",
    "Progress",
    "RagEvalConfig",
    "evaluate",
    "evaluate_block",
    "fingerprint",
    "report_markdown",
    "run_rag_eval",
    "summarize",
]
