"""Knowledge injection (SPEC K; Lampinen et al. 2025): the same new facts given to one pretrained LM in the weights
(fine-tuning), in the context (every fact in the prompt), or through retrieval (the facts in a database, the best
``retrieve_k`` read; ``multi_hop_retrieval`` searches ``hops`` times, each later hop with the words of the previous
hop's best fact that the question lacks, which finds a syllogism's second fact), and tested on the facts and on what
follows from them (reversals, syllogisms: see :mod:`retrolm.text.knowledge`). Augmented fine-tuning (K3) adds
inferences to the fine-tuning data: written by the model itself in context (``augmented_model``: few-shot, each
comparison restated the other way round, each leaf's two facts joined into their conclusion; how many it gets right
is reported) or derived by rule (``augmented_rules``, the upper bound of what augmentation can give).

Every condition reads the same items with the same plain prompt (passages, a blank line each, then the question) and
scores multiple choice by the options' log-likelihood (per token by default; ``choice_normalize=pmi`` discounts each
option's likelihood at the start of a text, the premise of this prompt without its question); accuracy per kind of
item with 95% bootstrap intervals over items. The base model is loaded once; each fine-tuned condition starts again
from its weights.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.core.config import save_config
from retrolm.core.device import default_device
from retrolm.core.errors import RetrolmError
from retrolm.core.io import jsonl_values, output_folder, write_bytes, write_json
from retrolm.db import BuildConfig, Database
from retrolm.eval.qa import CHOICE_NORMALIZATIONS, QAItem, load_qa
from retrolm.infer.rag import PassageRetriever, retrieve_hops
from retrolm.infer.reader import Reader
from retrolm.models.hf import CausalLM
from retrolm.text.knowledge import invented_words
from retrolm.text.tokenizer import load_tokenizer
from retrolm.train.finetune import FinetuneConfig, finetune

logger = logging.getLogger(__name__)

CONDITIONS = ("closed_book", "in_context", "retrieval", "multi_hop_retrieval", "fine_tuned", "augmented_model",
              "augmented_rules")
PLAIN_TEMPLATE = "{passages}{question}"


@dataclass
class KnowledgeConfig:
    """``retrolm knowledge``: one knowledge set (``retrolm corpus knowledge``), one reader, the conditions to run."""

    data: str | None = None
    """Folder written by ``retrolm corpus knowledge`` (facts.jsonl, qa.jsonl, inferences.jsonl)."""
    reader: str = "smollm2-135m"
    """The pretrained causal LM (HF folder, short name or hub name)."""
    out_dir: str = "runs/knowledge"
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    retrieve_k: int = 4
    """Facts retrieved per question and hop (BM25 over one fact per document)."""
    hops: int = 2
    """multi_hop_retrieval: retrieval hops, each searching again with the question and the best fact the previous
    hop found (a syllogism's question names the leaf; its first fact names the middle category, whose fact names
    the top)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    demonstrations: int = 3
    """augmented_model: worked examples (with other invented words) before each fact to restate."""
    choice_normalize: str = "mean"
    """How options are compared: log-likelihood per token (mean), in total (sum), or in total less the option's
    likelihood after the prompt without question or facts (pmi), which discounts how likely an invented word's
    spelling is in any context."""
    bootstrap: int = 2000
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.choice_normalize not in CHOICE_NORMALIZATIONS:
            raise RetrolmError(f"choice_normalize must be mean, sum or pmi, got {self.choice_normalize!r}")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or not self.conditions:
            raise RetrolmError(f"conditions: choose from {', '.join(CONDITIONS)}; got {bad or 'none'}")
        if self.retrieve_k < 1 or self.demonstrations < 1 or self.bootstrap < 1 or self.hops < 1:
            raise RetrolmError("retrieve_k, hops, demonstrations and bootstrap must be >= 1")
        default_device(self.device)  # "gpu", or cuda without one: one line now, not a traceback at the first load


def _jsonl(path: Path, lists: tuple[str, ...] = ()) -> list[dict]:
    """The records of facts.jsonl / inferences.jsonl: objects with a string ``id`` and ``text`` (and ``lists``, lists
    of strings), or a one-line error naming the line."""
    if not path.is_file():
        raise RetrolmError(f"{path}: not found (make the set with retrolm corpus knowledge --out {path.parent})")
    rows = []
    for where, obj in jsonl_values(path):
        if not isinstance(obj, dict):
            raise RetrolmError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("id", "text"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise RetrolmError(f"{where}: {key!r} must be a non-empty string")
        for key in lists:
            if not isinstance(obj.get(key), list) or not obj[key] or not all(isinstance(x, str) for x in obj[key]):
                raise RetrolmError(f"{where}: {key!r} must be a non-empty list of fact ids")
        rows.append(obj)
    return rows


def _kind(item: QAItem) -> str:
    """The kind an item is reported under (its ``kind`` field; "unlabelled" without one)."""
    kind = item.meta.get("kind")
    return "unlabelled" if kind is None else str(kind)


def accuracy_interval(correct: Sequence[bool], resamples: int, seed: int) -> tuple[float, float, float]:
    """(accuracy, low, high): the 95% percentile bootstrap over items."""
    x = np.asarray(correct, dtype=float)
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(x, size=(resamples, len(x))).mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


class KnowledgeStudy:
    """Runs the conditions of a :class:`KnowledgeConfig` and writes ``knowledge.json``, ``predictions.jsonl`` and
    ``report.md`` into ``out_dir``."""

    def __init__(self, cfg: KnowledgeConfig) -> None:
        if cfg.data is None:
            raise RetrolmError("knowledge: --data is required (a folder from retrolm corpus knowledge)")
        self.cfg, data = cfg, Path(cfg.data)
        self.facts = _jsonl(data / "facts.jsonl")
        self.inferences = _jsonl(data / "inferences.jsonl", lists=("from",))
        known = {f["id"] for f in self.facts}
        for inf in self.inferences:
            if unknown := [f for f in inf["from"] if f not in known]:
                raise RetrolmError(f"{data / 'inferences.jsonl'}: inference {inf['id']!r} follows from {unknown[0]!r}, "
                                   f"which facts.jsonl does not hold")
        self.items = load_qa(data / "qa.jsonl")
        if any(not it.multiple_choice for it in self.items):
            raise RetrolmError(f"{data / 'qa.jsonl'}: every item must be multiple choice")
        self.out = output_folder(cfg.out_dir, "knowledge")
        self.tok = load_tokenizer(cfg.reader)

    def _reader(self, lm: CausalLM) -> Reader:
        return Reader(lm, self.tok, chat=None, template=PLAIN_TEMPLATE)

    def _base(self) -> CausalLM:
        return CausalLM.from_pretrained(self.cfg.reader, device=self.cfg.device)

    def _choose(self, reader: Reader, passages: Sequence[Sequence[str]] | None) -> list[int]:
        """The chosen option of every item, reading ``passages[i]`` before item i (None: nothing)."""
        out = []
        for i, it in enumerate(self.items):
            reserve = reader.option_room(it.choices)
            if passages and reader.passages_that_fit(it.question, passages[i], reserve) < len(passages[i]):
                raise RetrolmError(f"the {len(passages[i])} passages of item {it.id} do not fit the "
                                   f"{reader.lm.context_len}-token context of {reader.lm.name}: fewer facts needed")
            prompt = reader.prompt_ids(it.question, passages[i] if passages else None, reserve=reserve)
            chosen = reader.choose([prompt], [it.choices], self.cfg.choice_normalize)[0].answers[0]
            out.append(it.choices.index(chosen))
        return out

    @functools.cached_property
    def _facts_db(self) -> Database:
        return Database.build([Path(self.cfg.data) / "facts.jsonl"], self.out / "facts-db",  # tiny: built every run
                              BuildConfig(tokenizer=self.cfg.reader, index="none", bm25=True), overwrite=True,
                              show_progress=False)

    def _retrieved(self, hops: int) -> tuple[list[list[str]], list[bool | None]]:
        """The facts BM25 finds for each question (``retrieve_k`` per hop; with one hop a syllogism's question names
        the leaf, so the middle category's fact is found only by chance), and whether they hold every fact the item
        rests on."""
        retriever = PassageRetriever(self._facts_db, "bm25", continuation=False)
        found, _ = retrieve_hops(retriever, [it.search_text() for it in self.items], self.cfg.retrieve_k, hops)
        # None: the item lists no supporting facts (data not written by `retrolm corpus knowledge`)
        support = [set(it.meta["facts"]) <= {p.doc_id for p in ps} if it.meta.get("facts") else None
                   for it, ps in zip(self.items, found, strict=True)]
        return [[p.text.strip() for p in ps] for ps in found], support

    def _demonstration_words(self, n: int) -> list[str]:
        """``n`` invented words for worked examples, none of them (or a prefix of one) a word of the data."""
        taken = {w for f in self.facts for w in f["text"].rstrip(".").split()}
        rng = random.Random(f"demonstrations-{self.cfg.seed}")  # a stream no data seed reproduces
        pool = [w for w in invented_words(4 * n + 40, rng)
                if not any(w.startswith(t) or t.startswith(w) for t in taken)]
        if len(pool) < n:
            raise RetrolmError("could not invent words for the demonstrations that the data does not use")
        return pool[:n]

    def _generated_inferences(self, reader: Reader) -> list[dict]:
        """The inferences the model writes itself (few-shot, greedy), next to the rule's. Demonstrations use words
        the data does not, restate "more" and "less" facts alike, and show syllogisms over three distinct words."""
        d = self.cfg.demonstrations
        names = self._demonstration_words(5 * d)
        compare = "".join(
            f"Statement: {a} is {w} famous than {b}.\nOther way round: {b} is {o} famous than {a}.\n\n"
            for i, (a, b) in enumerate(zip(names[0 : 2 * d : 2], names[1 : 2 * d : 2], strict=True))
            for w, o in [("more", "less") if i % 2 == 0 else ("less", "more")])
        chain = "".join(f"All {a} are {b}. All {b} are {c}.\nSo: All {a} are {c}.\n\n"
                        for a, b, c in zip(names[2 * d : 3 * d], names[3 * d : 4 * d], names[4 * d : 5 * d],
                                           strict=True))
        by_id = {f["id"]: f["text"] for f in self.facts}
        prompts = []
        for inf in self.inferences:
            stated = [by_id[f] for f in inf["from"]]
            if len(stated) == 1:  # a comparison, restated the other way round
                text = f"{compare}Statement: {stated[0]}\nOther way round:"
            else:  # a syllogism: the leaf's fact and its middle category's fact, joined
                text = f"{chain}{stated[0]} {stated[1]}\nSo:"
            prompts.append(self.tok.encode(text))
        readings = reader.generate(prompts, max_new_tokens=32)
        out = []
        for inf, r in zip(self.inferences, readings, strict=True):
            lines = (r.texts[0] or "").strip().splitlines()
            written = lines[0].strip() if lines else ""
            out.append({"id": inf["id"], "written": written, "rule": inf["text"],
                        "correct": " ".join(written.split()) == inf["text"]})
        return out

    def _fine_tuned(self, texts: Sequence[str], name: str, stats: dict) -> Reader:
        lm = self._base()
        t = time.perf_counter()
        losses = finetune(lm, self.tok, texts, self.cfg.finetune)
        stats[name] = {"texts": len(texts), "epoch_losses": [round(x, 4) for x in losses],
                       "seconds": round(time.perf_counter() - t, 1)}
        return self._reader(lm)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "config.yaml")
        facts = [f["text"] for f in self.facts]
        base = self._reader(self._base())
        chosen: dict[str, list[int]] = {}
        finetuning: dict[str, Any] = {}
        augmentation: list[dict] = []
        seconds: dict[str, float] = {}
        support: dict[str, list[bool | None]] = {}
        read: dict[str, list[list[int]]] = {}  # per retrieval condition and item: the options its passages hold
        for cond in cfg.conditions:
            t = time.perf_counter()
            logger.info("knowledge: %s", cond)
            if cond == "closed_book":
                chosen[cond] = self._choose(base, None)
            elif cond == "in_context":
                chosen[cond] = self._choose(base, [facts] * len(self.items))
            elif cond in ("retrieval", "multi_hop_retrieval"):
                passages, support[cond] = self._retrieved(1 if cond == "retrieval" else cfg.hops)
                read[cond] = [options_in(it.choices, ps) for it, ps in zip(self.items, passages, strict=True)]
                chosen[cond] = self._choose(base, passages)
            elif cond == "fine_tuned":
                chosen[cond] = self._choose(self._fine_tuned(facts, cond, finetuning), None)
            elif cond == "augmented_model":
                augmentation = self._generated_inferences(base)
                written = [a["written"] for a in augmentation if a["written"]]
                chosen[cond] = self._choose(self._fine_tuned(facts + written, cond, finetuning), None)
            else:  # augmented_rules
                rules = [x["text"] for x in self.inferences]
                chosen[cond] = self._choose(self._fine_tuned(facts + rules, cond, finetuning), None)
            seconds[cond] = round(time.perf_counter() - t, 1)
        result = self._summary(chosen, finetuning, augmentation, seconds, support, read)
        write_json(self.out / "knowledge.json", result)
        rows = [{"id": it.id, "kind": it.meta.get("kind"), "question": it.question,
                 **({"query": it.query} if it.query is not None else {}), "answer": it.choices[it.answer],
                 **{c: it.choices[chosen[c][i]] for c in chosen},
                 **{f"{c}_options_read": [it.choices[j] for j in read[c][i]] for c in read}}
                for i, it in enumerate(self.items)]
        write_bytes(self.out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                            for r in rows).encode())
        write_bytes(self.out / "report.md", report(result).encode())
        if augmentation:  # what the model wrote, next to the rule
            write_bytes(self.out / "augmentations.jsonl", "".join(json.dumps(a, ensure_ascii=False) + "\n"
                                                                  for a in augmentation).encode())
        return result

    def _by_options_read(self, chosen: dict[str, list[int]], read: dict[str, list[list[int]]], kinds: list[str]
                         ) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """Per retrieval condition and kind: accuracy where the answer was the only option the passages held, where
        other options were read too, and where the answer was not read: whether the reader infers or picks the
        option it read."""
        out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        for cond, options in read.items():
            for kind in kinds:
                groups: dict[str, list[bool]] = {"answer_only": [], "answer_and_others": [], "answer_not_read": []}
                for i, it in enumerate(self.items):
                    if _kind(it) != kind:
                        continue
                    group = ("answer_not_read" if it.answer not in options[i] else
                             "answer_only" if len(options[i]) == 1 else "answer_and_others")
                    groups[group].append(chosen[cond][i] == it.answer)
                out.setdefault(cond, {})[kind] = {g: {"n": len(v), "accuracy": float(np.mean(v)) if v else None}
                                                  for g, v in groups.items()}
        return out

    def _summary(self, chosen: dict[str, list[int]], finetuning: dict, augmentation: list[dict],
                 seconds: dict[str, float], support: dict[str, list[bool | None]], read: dict[str, list[list[int]]]
                 ) -> dict[str, Any]:
        kinds = sorted({_kind(it) for it in self.items})
        table: dict[str, dict[str, Any]] = {}
        found: dict[str, dict[str, Any]] = {}
        for cond, picks in chosen.items():
            table[cond] = {}
            for kind in [*kinds, "all"]:
                idx = [i for i, it in enumerate(self.items) if kind == "all" or _kind(it) == kind]
                acc, lo, hi = accuracy_interval([picks[i] == self.items[i].answer for i in idx], self.cfg.bootstrap,
                                                self.cfg.seed)
                table[cond][kind] = {"accuracy": acc, "ci95": [lo, hi], "n": len(idx)}
                known = [support[cond][i] for i in idx if support.get(cond) and support[cond][i] is not None]
                if known:  # the share of items whose supporting facts were all retrieved
                    found.setdefault(cond, {})[kind] = float(np.mean(known))
        chance = {kind: float(np.mean([1 / len(it.choices) for it in self.items
                                       if kind == "all" or _kind(it) == kind])) for kind in [*kinds, "all"]}
        aug = None
        if augmentation:
            kind = {inf["id"]: "reversal" if len(inf["from"]) == 1 else "syllogism" for inf in self.inferences}
            aug = {"written": len(augmentation), "correct": sum(a["correct"] for a in augmentation),
                   "correct_by_kind": {k: sum(a["correct"] for a in augmentation if kind[a["id"]] == k)
                                       for k in ("reversal", "syllogism")},
                   "written_by_kind": {k: sum(kind[a["id"]] == k for a in augmentation)
                                       for k in ("reversal", "syllogism")}}
        return {"config": asdict(self.cfg), "facts": len(self.facts), "items": len(self.items), "kinds": kinds,
                "chance": chance, "accuracy": table, "support_retrieved": found,
                "by_options_read": self._by_options_read(chosen, read, kinds), "finetuning": finetuning,
                "augmentation": aug,
                "seconds": seconds}


def options_in(choices: Sequence[str], passages: Sequence[str]) -> list[int]:
    """The indices of the options whose words occur, as a phrase, in the passages (a reader that copies what it reads
    prefers those)."""
    text = f" {' '.join(' '.join(p.replace('.', ' ').split()) for p in passages)} "
    return [j for j, c in enumerate(choices) if f" {' '.join(c.replace('.', ' ').split())} " in text]


def report(result: dict[str, Any]) -> str:
    """The results as a markdown page: accuracy per condition and kind of item."""
    kinds = [*result["kinds"], "all"]
    lines = [f"# Knowledge injection: {result['config']['reader']}", "",
             f"{result['facts']} facts, {result['items']} multiple-choice items; accuracy (%) with 95% bootstrap "
             "intervals over items.", "",
             "| condition | " + " | ".join(f"{k} (n={result['accuracy'][next(iter(result['accuracy']))][k]['n']})"
                                        for k in kinds) + " |",
             "|---|" + "---|" * len(kinds),
             "| chance | " + " | ".join(f"{100 * result['chance'][k]:.1f}" for k in kinds) + " |"]
    for cond, row in result["accuracy"].items():
        cells = [f"{100 * row[k]['accuracy']:.1f} [{100 * row[k]['ci95'][0]:.0f}, {100 * row[k]['ci95'][1]:.0f}]"
                 for k in kinds]
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    if result.get("support_retrieved"):
        lines += ["", "Items whose supporting facts were all retrieved (%):", "",
                  "| condition | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for cond, row in result["support_retrieved"].items():
            lines.append(f"| {cond} | " + " | ".join(f"{100 * row[k]:.1f}" if k in row else "–" for k in kinds) + " |")
    if result.get("by_options_read"):
        lines += ["", "Accuracy (%, n) by the options the passages held: the answer alone / the answer and others / "
                      "not the answer:", "", "| condition | kind | answer only | answer and others | answer not read |",
                  "|---|---|---|---|---|"]
        for cond, by_kind in result["by_options_read"].items():
            for kind, groups in by_kind.items():
                cells = [f"{100 * g['accuracy']:.1f} ({g['n']})" if g["n"] else "– (0)" for g in groups.values()]
                lines.append(f"| {cond} | {kind} | " + " | ".join(cells) + " |")
    aug = result.get("augmentation")
    if aug:
        by = ", ".join(f"{n} of {aug['written_by_kind'][k]} {k}s" for k, n in aug["correct_by_kind"].items())
        lines += ["", f"Inferences the model wrote itself (augmented_model) that equal the rule's: {aug['correct']} of "
                      f"{aug['written']} ({by})."]
    for name, ft in result.get("finetuning", {}).items():
        lines.append(f"- {name}: {ft['texts']} texts, loss per epoch {ft['epoch_losses'][0]} → "
                     f"{ft['epoch_losses'][-1]}, {ft['seconds']} s")
    return "\n".join(lines) + "\n"


__all__ = ["CONDITIONS", "KnowledgeConfig", "KnowledgeStudy", "accuracy_interval", "report"]
