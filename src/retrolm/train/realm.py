"""REALM recipes: pre-training by masked-LM marginal likelihood, open-domain QA fine-tuning, and span prediction.

**Pre-training** (:func:`pretrain`): a sentence x is masked (salient spans, or random tokens as the ablation; see
:mod:`.realm_masking`), embedded by the query encoder, and the top ``k - 1`` documents are retrieved from the current
:class:`~.realm_index.DocumentIndex` (the document x came from excluded: REALM's "trivial candidate"); with the
null document that makes ``k`` candidates (8 by default). The loss is ``-log Σ_z p(y|z,x) p(z|x)`` with p(z|x) a
softmax of the query embedding against the candidates re-embedded by the current document encoder (the stale index
only chooses them, as in REALM) and p(y|z,x) the reader's masked-token likelihood; gradients reach the reader, the
query encoder and the document encoder. Every ``refresh_every`` steps an asynchronous refresh re-embeds the
documents with a snapshot of the document encoder (the swap and its lag are logged). Retrieval utility
(log-likelihood with the best retrieved document minus with the null document) is logged. Runs are resumable
from ``OUT/checkpoints/step-NNNNNN/``.

**Fine-tuning** (:func:`finetune`): questions retrieve their top ``qa_k`` (5) documents from an index that is built
once and kept fixed, as is the document encoder; the loss marginalises the reader's span likelihood of the answer
(every occurrence of the answer's word pieces in a retrieved document) over the retrieved documents. Questions
whose answer is in none of them are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from retrolm.core.config import save_config
from retrolm.core.device import default_device
from retrolm.core.errors import RetrolmError
from retrolm.core.io import output_folder, write_json
from retrolm.db.meta import swap_into_place
from retrolm.models.realm import RealmModel, marginal_log_likelihood, retrieval_utility
from retrolm.train.checkpoints import CheckpointManager, ResumeRefused, set_aside
from retrolm.train.realm_index import DocumentIndex, Documents, IndexRefresher
from retrolm.train.realm_masking import mask_example

logger = logging.getLogger(__name__)


@dataclass
class RealmConfig:
    """REALM pre-training / fine-tuning (``retrolm realm pretrain|finetune``), saved as ``config.yaml``."""

    encoder: str = "minilm"
    """HF encoder the query encoder, document encoder and reader start from (pre-training only)."""
    embed_dim: int | None = 128
    """Retrieval embedding size (None: the encoder's hidden size, no projection)."""
    pooling: str = "cls"
    """Pooling of the retrieval embeddings of a REALM built from an encoder (pre-training, or an encoder given to
    finetune / eval): cls (REALM) or mean (a sentence-transformers encoder's own); a REALM folder keeps its own."""
    normalize: bool = False
    """L2-normalise the retrieval embeddings and score by scaled cosine (like ``pooling``: for a REALM built from
    an encoder; a REALM folder keeps its own): with pooling=mean and embed_dim=null the untrained retriever ranks
    exactly as the frozen sentence encoder (see ``RealmShape``)."""
    k: int = 8
    """Pre-training candidates, the null document included (REALM: 8)."""
    qa_k: int = 5
    """Documents retrieved per question in fine-tuning and evaluation (REALM: 5)."""
    masking: str = "salient"
    """salient (dates, numbers, capitalised spans by regex) or random (random tokens; REALM's ablation)."""
    mask_prob: float = 0.15
    """Random-token masking rate."""
    max_query_len: int = 64
    """Word pieces of a pre-training sentence or question."""
    max_doc_len: int = 128
    """Word pieces of a document, for the document encoder and in the reader."""
    max_answer_len: int = 10
    """Longest predicted answer span, in word pieces."""
    batch_size: int = 8
    lr: float = 3e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    steps: int = 1000
    """Optimizer steps (pre-training or fine-tuning)."""
    refresh_every: int = 500
    """Start an asynchronous index refresh every N pre-training steps (0: never; a stale index)."""
    embed_batch_size: int = 64
    """Documents per document-encoder forward pass when (re)building the index."""
    train_query_encoder: bool = True
    """Fine-tuning: train the query encoder (REALM) or keep it fixed (retrieval stays the initial encoder's)."""
    exclude_source: bool = True
    """Pre-training: a sentence may not retrieve the chunk it was taken from."""
    max_examples: int | None = None
    """Pre-training sentences taken from the documents (None: all)."""
    log_every: int = 10
    save_every: int = 500
    keep: int = 2
    """Checkpoints kept."""
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 2:
            raise RetrolmError(f"k must be at least 2 (the null document and one retrieved document), got {self.k}")
        if self.qa_k < 1:
            raise RetrolmError(f"qa_k must be positive, got {self.qa_k}")
        if self.pooling not in ("cls", "mean"):
            raise RetrolmError(f"pooling must be cls or mean, got {self.pooling!r}")
        if self.masking not in ("salient", "random"):
            raise RetrolmError(f"masking must be salient or random, got {self.masking!r}")
        if not 0 < self.mask_prob <= 1:
            raise RetrolmError(f"mask_prob must be in (0, 1], got {self.mask_prob}")
        for name in ("max_query_len", "max_doc_len", "max_answer_len", "batch_size", "steps", "embed_batch_size",
                     "log_every", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise RetrolmError(f"{name} must be positive, got {getattr(self, name)}")
        if self.refresh_every < 0:
            raise RetrolmError(f"refresh_every must be >= 0, got {self.refresh_every}")


def check_lengths(model: RealmModel, cfg: RealmConfig) -> None:
    """Reader rows ``[CLS] x [SEP] z [SEP]`` hold up to max_query_len + max_doc_len + 3 word pieces: more than the
    encoder's positions was an index error inside it at the first long document."""
    need, limit = cfg.max_query_len + cfg.max_doc_len + 3, model.max_positions
    if limit is not None and need > limit:
        raise RetrolmError(f"max_query_len + max_doc_len + 3 = {need} word pieces per reader row, more than the "
                           f"{limit} positions of {model.shape.source}; lower max_doc_len or max_query_len")


def check_questions(questions: Sequence[str], what: str = "questions") -> None:
    """REALM answers open-ended questions (a span of a document); multiple-choice items are dropped before this."""
    if not questions:
        raise RetrolmError(f"{what}: no open-ended questions (REALM does not use multiple-choice items)")


# --------------------------------------------------------------------------------------------------- reader rows
@dataclass
class ReaderBatch:
    """``[CLS] x [SEP] z [SEP]`` rows for B examples × K candidates, flattened to N = B·K rows."""

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor
    doc_start: list[int]
    """Per row, the position of the document's first word piece."""
    doc_ids: list[list[int]]
    """Per row, the document's word pieces as placed in the row (truncated)."""


def reader_batch(model: RealmModel, xs: Sequence[Sequence[int]], docs: Sequence[Sequence[Sequence[int]]],
                 max_len: int) -> ReaderBatch:
    """Rows for each example's candidates (``docs[b]`` lists K documents' word pieces; ``[]`` is the null
    document)."""
    tok = model.tokenizer
    rows, types, starts, placed = [], [], [], []
    for x, cands in zip(xs, docs, strict=True):
        for z in cands:
            z = list(z)[: max(0, max_len - len(x) - 3)]
            rows.append([tok.cls_token_id, *x, tok.sep_token_id, *z, tok.sep_token_id])
            types.append([0] * (len(x) + 2) + [1] * (len(z) + 1))
            starts.append(len(x) + 2)
            placed.append(z)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    type_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, types, strict=True)):
        ids[i, : len(r)], mask[i, : len(r)], type_ids[i, : len(t)] = torch.tensor(r), 1, torch.tensor(t)
    d = model.device
    return ReaderBatch(ids.to(d), mask.to(d), type_ids.to(d), starts, placed)


def _piece_ids(model: RealmModel, texts: Sequence[str], max_len: int) -> list[list[int]]:
    enc = model.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_len)
    return [list(x) for x in enc["input_ids"]]


def _pieces_with_offsets(model: RealmModel, texts: Sequence[str], max_len: int
                         ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """:func:`_piece_ids` and, per text, the character span of each of its word pieces (one tokenizer pass)."""
    enc = model.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_len,
                          return_offsets_mapping=True)
    return [list(x) for x in enc["input_ids"]], [[(int(a), int(b)) for a, b in x] for x in enc["offset_mapping"]]


def _answer_pieces(model: RealmModel, answers: Sequence[str], max_len: int) -> list[list[int]]:
    """The word pieces of each answer that fits a predicted span (longer ones are left out, not cut: a cut answer's
    prefix would mark documents that lack the answer as holding it)."""
    enc = model.tokenizer(list(answers), add_special_tokens=False)
    return [list(x) for x in enc["input_ids"] if 0 < len(x) <= max_len]


def _query_embeddings(model: RealmModel, xs: Sequence[Sequence[int]]) -> Tensor:
    tok = model.tokenizer
    rows = [[tok.cls_token_id, *x, tok.sep_token_id] for x in xs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return model.embed_queries(ids.to(model.device), mask.to(model.device))  # (B, D)


# ---------------------------------------------------------------------------------------------------- pre-training
@dataclass
class PretrainOutput:
    """One pre-training step's numbers (means over the batch)."""

    loss: Tensor
    """−log p(y|x), differentiable."""
    log_p_z: Tensor
    """(B, K) retrieval log-probabilities, null document in column 0."""
    log_p_y_given_z: Tensor
    """(B, K) reader log-likelihoods of the masked tokens."""
    utility: float
    """Mean retrieval utility (best retrieved document vs the null document), in nats."""
    retrieved: Tensor
    """(B, K-1) document ids."""


def pretrain_step(model: RealmModel, index: DocumentIndex, docs: Documents, texts: Sequence[str],
                  sources: Sequence[int], cfg: RealmConfig, rng: random.Random) -> PretrainOutput:
    """The marginal masked-LM loss of a batch of sentences (``sources``: the document each came from, -1: none)."""
    masked = [mask_example(t, model.tokenizer, cfg.masking, rng, cfg.mask_prob, cfg.max_query_len) for t in texts]
    xs = [m.ids for m in masked]
    q = _query_embeddings(model, xs)  # (B, D)
    _, ids = index.search(q, cfg.k - 1, sources if cfg.exclude_source else None)  # (B, K-1)
    K = ids.shape[1]
    texts_z = docs.texts(ids.flatten().tolist())
    # The stale index only chose the candidates: p(z|x) is computed with the current document encoder (REALM), which
    # is how the document encoder learns and what a refresh then carries into the index.
    enc = model.tokenize(texts_z, cfg.max_doc_len)
    doc_emb = model.embed_documents(enc["input_ids"], enc["attention_mask"]).view(len(xs), K, -1)  # (B, K-1, D)
    log_p_z = model.retrieval_log_probs(q, doc_emb, with_null=True)  # (B, K)
    pieces = _piece_ids(model, texts_z, cfg.max_doc_len)
    cands = [[[], *pieces[b * K : (b + 1) * K]] for b in range(len(xs))]
    batch = reader_batch(model, xs, cands, cfg.max_query_len + cfg.max_doc_len + 3)
    labels = torch.full_like(batch.input_ids, -100)
    for row in range(len(labels)):
        lab = masked[row // (K + 1)].labels
        labels[row, 1 : 1 + len(lab)] = torch.tensor(lab)
    hidden = model.read(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    log_p_y_z = model.mlm_log_likelihood(hidden, labels).view(len(xs), K + 1)  # (B, K)
    loss = -marginal_log_likelihood(log_p_z, log_p_y_z).mean()
    utility = retrieval_utility(log_p_y_z.detach()).mean().item()
    return PretrainOutput(loss, log_p_z, log_p_y_z, utility, ids)


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentences_of(docs: Documents, max_examples: int | None = None, min_words: int = 4) -> list[tuple[str, int]]:
    """Pre-training examples: the sentences of every document, with the document they came from."""
    out: list[tuple[str, int]] = []
    live = docs.live()
    for first in range(0, len(docs), 256):
        ids = [i for i in range(first, min(first + 256, len(docs))) if live is None or live[i]]
        for i, text in zip(ids, docs.texts(ids) if ids else [], strict=True):
            for s in _SENTENCE.split(text):
                if len(s.split()) >= min_words:
                    out.append((s.strip(), i))
                    if max_examples is not None and len(out) >= max_examples:
                        return out
    return out


def _optimizer(model: RealmModel, cfg: RealmConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


INDEX_FILE = "index.pt"
"""A pre-training checkpoint's document index (embeddings, snapshot step): a resumed run reads the index it was
reading, instead of one rebuilt from the resumed weights (which would also undo ``refresh_every=0``)."""


def _save(ckpts: CheckpointManager, model: RealmModel, opt: torch.optim.Optimizer, cfg: RealmConfig, step: int,
          state: dict, index: DocumentIndex | None = None) -> None:
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        save_config(cfg, folder / "config.yaml")
        torch.save(opt.state_dict(), folder / "optimizer.pt")
        torch.save({"step": step, **state}, folder / "trainer.pt")
        if index is not None:
            torch.save({"embeddings": index.embeddings, "step": index.step}, folder / INDEX_FILE)

    ckpts.save(step, write)


def pretrain(docs: Documents, out_dir: str | Path, cfg: RealmConfig, model: RealmModel | None = None,
             examples: Sequence[tuple[str, int]] | None = None, resume: bool = True) -> dict:
    """Pre-train REALM on ``docs`` (sentences of the documents, or ``examples`` as (text, source id or -1)).

    Writes ``OUT/checkpoints/step-NNNNNN/``, ``OUT/final/`` (the model) and ``OUT/pretrain.json`` (the log:
    losses, retrieval utility, refresh lags). Returns the log.
    """
    out = output_folder(out_dir, "realm pretrain", run_ok=True)
    device = default_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    ckpts = CheckpointManager(out / "checkpoints", cfg.keep)
    model = (model or RealmModel.from_encoder(cfg.encoder, cfg.embed_dim, cfg.pooling, cfg.normalize)).to(device)
    check_lengths(model, cfg)
    examples = list(examples) if examples is not None else sentences_of(docs, cfg.max_examples)
    if not examples:
        raise RetrolmError(f"{out}: no pre-training sentences (documents too short?)")
    opt = _optimizer(model, cfg)
    log: dict = {"steps": [], "refreshes": []}
    step = 0
    order: list[int] = []
    # what the order indexes: resumed over other sentences (another database state, max_examples) it would train on
    # other sentences than it says, then stop with an IndexError
    data = {"examples": len(examples), "sha256": hashlib.sha256(json.dumps(examples).encode()).hexdigest()}
    saved_index: DocumentIndex | None = None

    def load(folder: Path) -> None:
        nonlocal model, opt, step, log, order, saved_index
        state = torch.load(folder / "trainer.pt", weights_only=False)
        if state.get("data") not in (None, data):
            raise ResumeRefused(f"{folder}: written over {state['data']['examples']} pre-training sentences, resumed "
                                f"over {data['examples']} others (another database state or max_examples); resume "
                                "with the same data or start afresh (--no-resume)")
        model = RealmModel.from_pretrained(folder, device)
        opt = _optimizer(model, cfg)
        opt.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device))
        step, log, order = state["step"], state["log"], state["order"]
        # the optimizer state brings back the checkpoint's lr and weight decay: this run's config says what applies
        saved = opt.param_groups[0]
        if (saved["lr"], saved["weight_decay"]) != (cfg.lr, cfg.weight_decay):
            logger.warning("%s: resumed with lr %g and weight_decay %g (written with %g and %g): they apply from step "
                           "%d on", folder, cfg.lr, cfg.weight_decay, saved["lr"], saved["weight_decay"], step)
        for group in opt.param_groups:
            group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":  # the reader's dropout masks on the GPU
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        if (folder / INDEX_FILE).is_file():  # the index the run was reading (refresh_every=0: never rebuilt)
            held = torch.load(folder / INDEX_FILE, weights_only=False)
            saved_index = DocumentIndex(held["embeddings"], int(held["step"]), None)

    _recover_final(out)
    if resume and ckpts.resume(load) is not None:
        logger.info("resumed REALM pre-training at step %d", step)
        if step < cfg.steps:  # the model of a shorter run is not what this one ends with (nor its newest checkpoint)
            set_aside(out, ["final"], "resumed to train on")
    else:  # an earlier run's checkpoints (a later resume would go on from them), model and log
        set_aside(out, ["checkpoints", "final", "pretrain.json"], "--no-resume" if not resume else "nothing to resume")
    model.train()
    started = time.perf_counter()
    if saved_index is not None and len(saved_index) == len(docs):
        live = docs.live()  # deletions are the database's now, not the checkpoint's
        first = DocumentIndex(saved_index.embeddings, saved_index.step,
                              None if live is None else torch.from_numpy(live))
    else:
        if saved_index is not None:
            logger.warning("the saved index holds %d documents, the database %d: building it again",
                           len(saved_index), len(docs))
        first = DocumentIndex.build(model, docs, step, cfg.max_doc_len, cfg.embed_batch_size)
    refresher = IndexRefresher(docs, first, cfg.max_doc_len, cfg.embed_batch_size)
    log.setdefault("index_build_seconds", []).append(time.perf_counter() - started)
    if first.step < step and cfg.refresh_every and step % cfg.refresh_every == 0 and step < cfg.steps:
        # the checkpoint was saved as this step's refresh started, with the index before it: start it again (from
        # the same weights), or the run reads a stale index for another refresh_every steps
        refresher.start(model, step)
    try:
        while step < cfg.steps:
            if len(order) < cfg.batch_size:
                more = list(range(len(examples)))
                rng.shuffle(more)
                order += more
            batch = [examples[i] for i in order[: cfg.batch_size]]
            del order[: cfg.batch_size]
            index = refresher.index  # this step's index, whatever a swap does meanwhile
            res = pretrain_step(model, index, docs, [t for t, _ in batch], [s for _, s in batch], cfg, rng)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            done = refresher.poll(step)
            if done is not None:
                log["refreshes"].append({"snapshot_step": done.snapshot_step, "swap_step": done.swap_step,
                                         "lag": done.lag, "seconds": round(done.seconds, 3)})
            if cfg.refresh_every and step % cfg.refresh_every == 0 and step < cfg.steps:
                refresher.start(model, step)
            log["steps"].append({"step": step, "loss": res.loss.item(), "utility": res.utility,
                                 "null_prob": res.log_p_z[:, 0].exp().mean().item(), "index_step": index.step})
            if step % cfg.log_every == 0:
                logger.info("step %d: loss %.4f, retrieval utility %.3f nats, index of step %d", step,
                            res.loss.item(), res.utility, index.step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
                _save(ckpts, model, opt, cfg, step, {"log": log, "rng": rng.getstate(), "order": order,
                                                     "torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
                                                     "data": data}, index=refresher.index)
    finally:
        refresher.close()
    log["seconds"] = time.perf_counter() - started
    _write_final(model, cfg, out)
    write_json(out / "pretrain.json", log)
    return log


def _write_final(model: RealmModel, cfg: RealmConfig, out: Path) -> None:
    """``OUT/final/``, whole or not at all: a kill while writing left a model.json next to half the weights. An
    earlier final/ stays until the new one is in place."""
    staging = out / "final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    save_config(cfg, staging / "config.yaml")
    swap_into_place(staging, out / "final")


def _recover_final(out: Path) -> None:
    """A kill between :func:`_write_final`'s two renames left the old model aside: it comes back."""
    old = out / "final.old"
    if old.is_dir() and not (out / "final").exists():
        os.replace(old, out / "final")


# ------------------------------------------------------------------------------------------------------- QA
def answer_spans(doc: Sequence[int], answers: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Every (start, end) (inclusive, within ``doc``) where an answer's word pieces occur."""
    found = []
    for a in answers:
        n = len(a)
        found += [(i, i + n - 1) for i in range(len(doc) - n + 1) if n and list(doc[i : i + n]) == list(a)]
    return found


@dataclass
class QAOutput:
    loss: Tensor | None
    """−log p(answer|question) averaged over the questions with the answer in a retrieved document (None: no such
    question in the batch)."""
    answered: int
    """Questions in the batch whose answer is in a retrieved document."""
    retrieved: Tensor


def qa_step(model: RealmModel, index: DocumentIndex, docs: Documents, questions: Sequence[str],
            answers: Sequence[Sequence[str]], cfg: RealmConfig) -> QAOutput:
    """The marginal span loss of a batch of questions over their top ``qa_k`` documents (no null document)."""
    xs = _piece_ids(model, questions, cfg.max_query_len)
    q = _query_embeddings(model, xs)
    _, ids = index.search(q, cfg.qa_k)  # (B, K)
    K = ids.shape[1]
    log_p_z = model.retrieval_log_probs(q, index.embeddings[ids].to(q.device), with_null=False)  # (B, K)
    pieces = _piece_ids(model, docs.texts(ids.flatten().tolist()), cfg.max_doc_len)
    batch = reader_batch(model, xs, [pieces[b * K : (b + 1) * K] for b in range(len(xs))],
                         cfg.max_query_len + cfg.max_doc_len + 3)
    spans = []
    for row, z in enumerate(batch.doc_ids):
        golds = _answer_pieces(model, answers[row // K], cfg.max_answer_len)
        spans.append([(s + batch.doc_start[row], e + batch.doc_start[row]) for s, e in answer_spans(z, golds)])
    width = max(1, max(len(s) for s in spans))
    starts = torch.full((len(spans), width), -1, dtype=torch.long)
    ends = starts.clone()
    for row, sp in enumerate(spans):
        for j, (s, e) in enumerate(sp):
            starts[row, j], ends[row, j] = s, e
    has = (starts[:, 0] >= 0).view(len(xs), K).any(dim=1).to(q.device)  # (B,)
    if not has.any():
        return QAOutput(None, 0, ids)
    hidden = model.read(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    start_lp, end_lp = model.span_log_probs(hidden, _doc_positions(batch))
    span_lp = model.span_log_likelihood(start_lp, end_lp, starts.to(q.device), ends.to(q.device)).view(len(xs), K)
    loss = -marginal_log_likelihood(log_p_z, span_lp)[has].mean()
    return QAOutput(loss, int(has.sum()), ids)


def _doc_positions(batch: ReaderBatch) -> Tensor:
    allowed = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for row, (s, z) in enumerate(zip(batch.doc_start, batch.doc_ids, strict=True)):
        allowed[row, s : s + max(1, len(z))] = True  # an empty document: its [SEP] (no answer)
    return allowed


def finetune(model: RealmModel, docs: Documents, questions: Sequence[str], answers: Sequence[Sequence[str]],
             out_dir: str | Path, cfg: RealmConfig) -> dict:
    """Fine-tune for open-domain QA with the document encoder and the index fixed; writes ``OUT/final/`` and
    ``OUT/finetune.json``."""
    out = output_folder(out_dir, "realm finetune", run_ok=True)
    _recover_final(out)
    check_questions(questions)
    check_lengths(model, cfg)
    device = default_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = model.to(device)
    model.doc_encoder.requires_grad_(False)
    if isinstance(model.doc_proj, torch.nn.Linear):
        model.doc_proj.requires_grad_(False)
    if not cfg.train_query_encoder:  # the retriever stays as it starts: only the reader learns
        for part in (model.query_encoder, model.query_proj):
            part.requires_grad_(False)
    index = DocumentIndex.build(model, docs, 0, cfg.max_doc_len, cfg.embed_batch_size)
    opt = _optimizer(model, cfg)
    model.train()
    log: dict = {"steps": []}
    order: list[int] = []
    for step in range(1, cfg.steps + 1):
        if len(order) < cfg.batch_size:
            more = list(range(len(questions)))
            rng.shuffle(more)
            order += more
        pick = order[: cfg.batch_size]
        del order[: cfg.batch_size]
        res = qa_step(model, index, docs, [questions[i] for i in pick], [answers[i] for i in pick], cfg)
        if res.loss is None:
            log["steps"].append({"step": step, "loss": None, "answered": 0})
            continue
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        log["steps"].append({"step": step, "loss": res.loss.item(), "answered": res.answered})
        if step % cfg.log_every == 0:
            logger.info("step %d: loss %.4f (%d/%d answerable)", step, res.loss.item(), res.answered, len(pick))
    if not any(s["loss"] is not None for s in log["steps"]):
        logger.warning("no question had its answer in its top %d documents: the model was not trained", cfg.qa_k)
    model.eval()
    _write_final(model, cfg, out)
    write_json(out / "finetune.json", log)
    return log


def _span_text(text: str, offsets: Sequence[tuple[int, int]], batch: ReaderBatch, row: int, s: int, e: int) -> str:
    """The document text under reader positions ``s..e`` of ``row`` (decoding the word pieces instead would lose
    case, accents and the spacing around punctuation: "U.S." → "u. s.", "CONFIG_SMP" → "config _ smp"). A span on
    an empty document's [SEP] is the empty answer."""
    a, b = s - batch.doc_start[row], e - batch.doc_start[row]
    if not 0 <= a <= b < len(batch.doc_ids[row]):
        return ""
    return text[offsets[a][0] : offsets[b][1]].strip()


@torch.no_grad()
def predict(model: RealmModel, index: DocumentIndex, docs: Documents, questions: Sequence[str], cfg: RealmConfig
            ) -> tuple[list[str], Tensor]:
    """Answer strings (the best span over the top ``qa_k`` documents, by log p(z|x) + log p(start) + log p(end))
    and the retrieved ids (B, qa_k)."""
    check_questions(questions)
    check_lengths(model, cfg)
    model.eval()
    answers, retrieved = [], []
    for b in range(0, len(questions), cfg.batch_size):
        xs = _piece_ids(model, questions[b : b + cfg.batch_size], cfg.max_query_len)
        q = _query_embeddings(model, xs)
        _, ids = index.search(q, cfg.qa_k)
        K = ids.shape[1]
        log_p_z = model.retrieval_log_probs(q, index.embeddings[ids].to(q.device), with_null=False)
        texts_z = docs.texts(ids.flatten().tolist())
        pieces, offsets = _pieces_with_offsets(model, texts_z, cfg.max_doc_len)
        batch = reader_batch(model, xs, [pieces[i * K : (i + 1) * K] for i in range(len(xs))],
                             cfg.max_query_len + cfg.max_doc_len + 3)
        start_lp, end_lp = model.span_log_probs(model.read(batch.input_ids, batch.attention_mask,
                                                           batch.token_type_ids), _doc_positions(batch))
        L = start_lp.shape[1]
        pos = torch.arange(L, device=q.device)
        ok = (pos[None, :] >= pos[:, None]) & (pos[None, :] - pos[:, None] < cfg.max_answer_len)  # (L, L) end ≥ start
        pair = start_lp[:, :, None] + end_lp[:, None, :]  # (N, L, L)
        pair = pair.masked_fill(~ok, float("-inf")) + log_p_z.flatten()[:, None, None]
        for i in range(len(xs)):
            block = pair[i * K : (i + 1) * K].flatten()
            best = int(block.argmax())
            row, s, e = best // (L * L), (best % (L * L)) // L, best % L
            answers.append(_span_text(texts_z[i * K + row], offsets[i * K + row], batch, i * K + row, s, e))
        retrieved.append(ids)
    return answers, torch.cat(retrieved)
