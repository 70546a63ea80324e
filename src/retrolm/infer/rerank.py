"""Rerankers: score how well each retrieved passage answers a question, so that only the best few are read.

* :class:`LMReranker` — a causal LM judging relevance by its next-token logits for "yes" against "no", the way
  Qwen3-Reranker works (the same system message and ``<Instruct>/<Query>/<Document>`` prompt, the ``<think>`` block
  only for templates that have one). The offline default is the reader itself (SmolLM2-135M-Instruct).
* :class:`CrossEncoderReranker` — any Hugging Face sequence-classification cross-encoder (e.g. an MS MARCO MiniLM)
  given as a folder or name: the logit of the positive class.

Both return one score per passage (higher = more relevant) and the FLOPs they spent.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import load_error, resolve_model
from retrolm.infer.flops import ModelCost
from retrolm.infer.reader import Reader, chat_tokenizer, forward_last, left_pad
from retrolm.models.hf import CausalLM
from retrolm.text.tokenizer import LMTokenizer, load_tokenizer

RERANK_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                 'Note that the answer can only be "yes" or "no".')
"""Qwen3-Reranker's system message."""
RERANK_INSTRUCT = "Given a question, judge whether the document contains the answer to the question"
PLAIN_TEMPLATE = "Query: {query}\nDocument: {document}\nDoes the document answer the query (yes or no)? Answer:"
"""The prompt of a model without a chat template; the next token is compared between " yes" and " no"."""


class Reranker(ABC):
    """Scores passages for a question."""

    name = "reranker"

    @abstractmethod
    def score(self, question: str, passages: Sequence[str]) -> tuple[list[float], int]:
        """(one score per passage, higher = more relevant; FLOPs spent)."""

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "name": self.name}


class LMReranker(Reranker):
    """A causal LM's log-probability of "yes" (against "no") as the next token after a relevance prompt.

    Args:
        lm: the model (the reader's own, or another causal LM).
        tokenizer: its tokenizer.
        chat: a ``transformers`` tokenizer with a chat template, or None (plain prompt).
        max_passage_tokens: each passage is cut to this many tokens.
        batch_size: passages per forward.
    """

    def __init__(self, lm: CausalLM, tokenizer: LMTokenizer, chat: object | None = None,
                 max_passage_tokens: int = 192, batch_size: int = 8) -> None:
        self.lm, self.tok, self.chat = lm, tokenizer, chat
        self.name = lm.name
        self.max_passage_tokens, self.batch_size = max_passage_tokens, batch_size
        self.cost = ModelCost.of(lm.hf, lm.name)
        lead = "" if chat is not None else " "
        yes, no = tokenizer.encode(lead + "yes"), tokenizer.encode(lead + "no")
        if not yes or not no or yes[0] == no[0]:
            raise RetrolmError(f"{lm.name}: cannot tell 'yes' from 'no' in its vocabulary; it cannot rerank")
        self.yes, self.no = yes[0], no[0]
        self.think = chat is not None and "<think>" in (getattr(chat, "chat_template", "") or "")

    @classmethod
    def of_reader(cls, reader: Reader, batch_size: int = 8) -> LMReranker:
        """The reader's own model as reranker (nothing loaded twice)."""
        return cls(reader.lm, reader.tok, reader.chat, reader.max_passage_tokens, batch_size)

    def prompt_text(self, question: str, passage: str) -> str:
        return self._render(question, passage)[0]

    def _render(self, question: str, passage: str) -> tuple[str, list[str]]:
        """(the relevance prompt's text, its messages' text in order)."""
        ids = self.tok.encode(passage.strip())
        cut = len(ids) > self.max_passage_tokens
        doc = self.tok.decode_cut(ids[: self.max_passage_tokens]).strip() if cut else passage.strip()
        if self.chat is None:
            return PLAIN_TEMPLATE.format(query=question.strip(), document=doc), []
        user = f"<Instruct>: {RERANK_INSTRUCT}\n<Query>: {question.strip()}\n<Document>: {doc}"
        text = self.chat.apply_chat_template([{"role": "system", "content": RERANK_SYSTEM},
                                              {"role": "user", "content": user}],
                                             tokenize=False, add_generation_prompt=True)
        return text + ("<think>\n\n</think>\n\n" if self.think else ""), [RERANK_SYSTEM, user]

    def _encode(self, question: str, passage: str) -> list[int]:
        """The relevance prompt's ids: special-token strings in the question and the passage stay text."""
        text, contents = self._render(question, passage)
        return self.tok.encode_prompt(text, contents) if self.chat is not None else self.tok.encode(text)

    def prompt_ids(self, question: str, passage: str) -> list[int]:
        """The prompt's ids, fitted to the model's context by cutting the passage further (never the question or
        the instructions: the yes/no position ends the prompt)."""
        room = self.lm.context_len
        ids = self._encode(question, passage)
        if len(ids) <= room:
            return ids
        doc = self.tok.encode(passage.strip())[: self.max_passage_tokens]
        keep = len(doc) - (len(ids) - room)
        while keep > 0:  # a cut text may tokenise a little longer at the cut: shorten until it fits
            ids = self._encode(question, self.tok.decode_cut(doc[:keep]))
            if len(ids) <= room:
                return ids
            keep -= max(1, len(ids) - room)
        self.check_question(question)
        return self._encode(question, "")

    def check_question(self, question: str) -> None:
        """Refuse a question whose relevance prompt alone (no passage) fills the model's context."""
        n, room = len(self._encode(question, "")), self.lm.context_len
        if n >= room:
            raise RetrolmError(f"the reranker's prompt for question {question[:60]!r} takes {n} tokens with no "
                               f"passage, no room in the {room}-token context of {self.name}")

    @torch.no_grad()
    def score(self, question: str, passages: Sequence[str]) -> tuple[list[float], int]:
        rows = [self.prompt_ids(question, p) for p in passages]
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = left_pad(rows[start : start + self.batch_size], self.tok.pad_id)
            logits, _ = forward_last(self.lm.hf, ids.to(self.lm.device), mask.to(self.lm.device))
            pair = torch.log_softmax(logits[:, [self.yes, self.no]].float(), dim=-1)
            scores += pair[:, 0].cpu().tolist()
        return scores, sum(self.cost.prompt(len(r)) for r in rows)


class CrossEncoderReranker(Reranker):
    """A sequence-classification cross-encoder reading (question, passage) pairs.

    Args:
        ref: folder or hub name.
        device: where it runs.
        max_length: tokens per pair.
        batch_size: pairs per forward.
    """

    def __init__(self, ref: str, device: str = "cpu", max_length: int = 512, batch_size: int = 16) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        resolved = resolve_model(ref, what="reranker")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
            model, info = AutoModelForSequenceClassification.from_pretrained(resolved.path, output_loading_info=True)
        except Exception as e:  # OSError offline / missing files, ValueError for other architectures
            raise load_error(resolved, "a cross-encoder", e) from None
        if missing := sorted(info.get("missing_keys") or []):
            # a plain encoder (a sentence embedder, a base BERT) gets a freshly initialised, random head: its scores
            # would order passages at random, differently at every load
            raise RetrolmError(f"{resolved.name}: not a cross-encoder: its checkpoint has no {', '.join(missing[:3])} "
                               f"(a sequence-classification head trained for relevance is needed)")
        self.model = model.to(device).eval()
        self.name, self.device = resolved.name, device
        self.max_length, self.batch_size = max_length, batch_size
        self.cost = ModelCost.of(self.model, resolved.name, bidirectional=True)

    @torch.no_grad()
    def score(self, question: str, passages: Sequence[str]) -> tuple[list[float], int]:
        scores: list[float] = []
        flops = 0
        for start in range(0, len(passages), self.batch_size):
            batch = list(passages[start : start + self.batch_size])
            enc = self.tokenizer([question] * len(batch), batch, truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            s = logits[:, 0] if logits.shape[1] == 1 else torch.log_softmax(logits, -1)[:, -1]
            scores += s.cpu().tolist()
            flops += sum(self.cost.prompt(int(n)) for n in enc["attention_mask"].sum(-1).tolist())
        return scores, flops


def is_cross_encoder(path: str) -> bool:
    """Whether a model folder holds a sequence-classification model (by its config's architectures)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        arch = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in arch)


def load_reranker(ref: str | None, reader: Reader, device: str = "cpu", batch_size: int = 8) -> Reranker:
    """The reranker named by ``ref``: None or ``"reader"`` = the reader's LM judging yes/no; ``"cross-encoder:REF"``
    or a folder holding a sequence-classification model = :class:`CrossEncoderReranker`; any other causal LM =
    :class:`LMReranker`."""
    if ref is None or ref in ("", "reader"):
        return LMReranker.of_reader(reader, batch_size)
    if ref.startswith("cross-encoder:"):
        return CrossEncoderReranker(ref.split(":", 1)[1], device, batch_size=batch_size)
    resolved = resolve_model(ref, what="reranker")
    if resolved.local and is_cross_encoder(resolved.path):
        return CrossEncoderReranker(ref, device, batch_size=batch_size)
    lm = CausalLM.from_pretrained(ref, device=device)
    tok = load_tokenizer(resolved.path if resolved.local else resolved.name)
    return LMReranker(lm, tok, chat_tokenizer(resolved.path), reader.max_passage_tokens, batch_size)


__all__ = ["PLAIN_TEMPLATE", "RERANK_INSTRUCT", "RERANK_SYSTEM", "CrossEncoderReranker", "LMReranker", "Reranker",
           "is_cross_encoder", "load_reranker"]
