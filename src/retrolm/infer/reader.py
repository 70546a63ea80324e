"""The reader of test-time retrieval: a causal LM answering a question from passages placed in its prompt.

Prompts use the model's chat template when it has one (system message, then the passages and the question in the
user turn), else a plain template (``{passages}Question: {question}\\nAnswer:``). Short answers are generated in
batches (left padding, one KV cache per batch), greedy or sampled with a seeded generator; ``samples > 1`` shares the
prompt's cache between samples. Generation stops at the end of the turn, or at the first line break after the answer
has begun. Multiple-choice items are answered by the log-likelihood of each option after the prompt.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import resolve_model
from retrolm.eval.qa import choice_prediction
from retrolm.infer.flops import ModelCost
from retrolm.infer.sampling import check_sampling, row_generator, sample
from retrolm.models.hf import CausalLM, pad_rows
from retrolm.text.tokenizer import END_OF_TURN, LMTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = ("Answer the question with a short answer of a few words, without explanation. When passages are "
                  "given, use them.")
DEFAULT_TEMPLATE = "{passages}Question: {question}\nAnswer:"
_PREFIX = re.compile(r"^\s*[*_]*\s*(short answer|final answer|answer)\s*[*_]*\s*[:\-]\s*[*_]*\s*", re.IGNORECASE)
_CITATIONS = re.compile(r"^\s*(\[\d+\]\s*)+|(\s+\[\d+\])+\s*$")
"""Passage numbers ([1], [2] …, as the chat prompt lists passages) that a reader copies before or after its answer."""


def chat_tokenizer(path: str) -> object | None:
    """The ``transformers`` tokenizer of a model folder if it has a chat template, else None."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    except Exception:  # a bare tokenizer.json (e.g. a test model) has no template: the plain prompt is used
        return None
    return tok if getattr(tok, "chat_template", None) else None


def extract_answer(text: str) -> str:
    """The answer in a generation: its first line that holds more than an ``Answer:`` prefix (``**Answer:**`` too),
    passage numbers (``[3]``) or surrounding quotes, without them."""
    for line in text.splitlines():  # a label alone on its line ("**Answer:**") is followed by the answer
        line = _CITATIONS.sub("", _PREFIX.sub("", line))
        if answer := _PREFIX.sub("", line).strip().strip("\"'`*").strip():
            return answer
    return ""


def check_template(template: str) -> None:
    """The plain prompt must place ``{passages}`` and ``{question}`` and nothing else (a template without
    ``{passages}`` would read every question closed book while reporting its passages as read)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:  # an unmatched brace
        raise RetrolmError(f"reader template {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    other = sorted(fields - {"passages", "question"})
    if other:
        raise RetrolmError(f"reader template {template!r}: unknown field {{{other[0]}}} (the fields are {{passages}} "
                           "and {question}; write a literal brace as {{ or }})")
    missing = [f"{{{f}}}" for f in ("passages", "question") if f not in fields]
    if missing:
        raise RetrolmError(f"reader template {template!r} has no {' or '.join(missing)}")


def forward_last(hf: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: object | None = None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, object | None]:
    """(B, V) logits of the last position and the KV cache, for left-padded ``ids``; with ``cache``, ``ids`` follow it
    and ``mask`` covers cache + ids. Works with transformers 4 (``past_key_values``) and 5 (``cache``)."""
    params = _forward_params(hf)
    if positions is None:
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
    kw: dict = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    if cache is not None:
        kw["cache" if "cache" in params else "past_key_values"] = cache
    out = hf(**kw)
    new = out.get("cache", None) if hasattr(out, "get") else None
    return out.logits[:, -1], new if new is not None else getattr(out, "past_key_values", None)


@functools.lru_cache(maxsize=16)
def _forward_signature(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _forward_params(hf: torch.nn.Module) -> frozenset[str]:
    return _forward_signature(type(hf))


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask of rows aligned to the right."""
    return pad_rows(rows, pad, left=True)


@dataclass
class Reading:
    """What the reader produced for one prompt."""

    answers: list[str]
    """One answer per sample (multiple choice: the chosen option's text)."""
    prompt_tokens: int
    prompt_flops: int
    generation_flops: int
    texts: list[str] | None = None
    """The raw generations."""


class Reader:
    """A causal LM that reads passages and answers.

    Args:
        lm: the model.
        tokenizer: its tokenizer (retrolm's wrapper).
        chat: a ``transformers`` tokenizer with a chat template, or None for the plain template.
        system: the system message (chat models).
        template: the plain prompt, with ``{passages}`` and ``{question}``.
        max_passage_tokens: each passage is cut to this many of the reader's tokens.
        examples: demonstrations, (question, answer) pairs shown before the question (chat: as earlier turns; plain:
            as ``Question: … Answer: …`` lines), without passages.
    """

    def __init__(self, lm: CausalLM, tokenizer: LMTokenizer, chat: object | None = None, system: str = DEFAULT_SYSTEM,
                 template: str = DEFAULT_TEMPLATE, max_passage_tokens: int = 192,
                 examples: Sequence[Sequence[str]] = ()) -> None:
        check_template(template)
        if any(len(e) != 2 for e in examples):
            raise RetrolmError("reader examples must be [question, answer] pairs")
        self.lm, self.tok, self.chat, self.system, self.template = lm, tokenizer, chat, system, template
        self.max_passage_tokens, self.examples = max_passage_tokens, [tuple(e) for e in examples]
        self.cost = ModelCost.of(lm.hf, lm.name)
        stops = set(tokenizer.stop_ids)
        if chat is not None:
            stops.add(getattr(chat, "eos_token_id", None))
        for special in END_OF_TURN:  # as the tokenizer's, and also where its vocabulary does not mark them special
            stops.add(tokenizer.tok.token_to_id(special))
        self.stop_ids = {s for s in stops if s is not None}
        self.pad_id = tokenizer.pad_id

    @classmethod
    def load(cls, ref: str, device: str = "cpu", **kwargs) -> Reader:
        """Load a reader by reference (folder, ``smollm2-135m``, hub name)."""
        lm = CausalLM.from_pretrained(ref, device=device)
        resolved = resolve_model(ref, what="reader")
        return cls(lm, load_tokenizer(resolved.path if resolved.local else resolved.name),
                   chat_tokenizer(resolved.path), **kwargs)

    @functools.cached_property
    def _line_break_ids(self) -> tuple[frozenset[int], frozenset[int]]:
        """(tokens whose text holds a line break, tokens that are only whitespace)."""
        breaks, blank = set(), set()
        for i in range(self.tok.vocab_size):
            text = self.tok.tok.decode([i], skip_special_tokens=False)
            if "\n" in text:
                breaks.add(i)
            if not text.strip():
                blank.add(i)
        return frozenset(breaks), frozenset(blank)

    # ------------------------------------------------------------------------------------------------ prompts
    def window(self, text: str, around: str | None) -> str:
        """``text`` cut to the ``max_passage_tokens`` the reader reads of a passage, kept around its part ``around``
        (the chunk a document passage was found by) instead of from its start, where that part would be cut off;
        ``text`` itself when it fits, or when ``around`` is not found in it."""
        t, part = text.strip(), (around or "").strip()
        enc = self.tok.tok.encode(t, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        first = t.find(part) if part else -1
        if len(ids) <= self.max_passage_tokens or first < 0:
            return text
        end = first + len(part)
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > first]
        if not inside or inside[-1] < self.max_passage_tokens:  # read from the start, it is read whole
            return text
        lo, hi = inside[0], inside[-1] + 1
        room = self.max_passage_tokens - (hi - lo)
        if room <= 0:  # the part alone is longer than a passage: its start
            return self.tok.decode_cut(ids[lo : lo + self.max_passage_tokens]).strip()
        start = max(0, min(lo - room // 2, len(ids) - self.max_passage_tokens))
        return self.tok.decode_cut(ids[start : start + self.max_passage_tokens]).strip()

    def _passage(self, text: str) -> str:
        ids = self.tok.encode(text.strip())
        cut = len(ids) > self.max_passage_tokens
        return self.tok.decode_cut(ids[: self.max_passage_tokens]).strip() if cut else text.strip()

    def prompt_text(self, question: str, passages: Sequence[str] | None = None) -> str:
        """The prompt as text (chat template rendered, generation prompt included)."""
        return self._render(question, passages)[0]

    def _render(self, question: str, passages: Sequence[str] | None) -> tuple[str, list[str]]:
        """(the prompt's text, its messages' text in order: questions and passages, where no markup is parsed)."""
        passages = [self._passage(p) for p in passages or []]
        if self.chat is None:
            block = "".join(p + "\n\n" for p in passages)
            shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in self.examples)
            return shots + self.template.format(passages=block, question=question.strip()), []
        user = f"Question: {question.strip()}"
        if passages:
            listed = "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
            user = f"Passages:\n{listed}\n\n{user}"
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for q, a in self.examples:
            messages += [{"role": "user", "content": f"Question: {q}"}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": user})
        text = self.chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, [m["content"] for m in messages]

    def _encode(self, question: str, passages: Sequence[str] | None) -> list[int]:
        text, contents = self._render(question, passages)
        return self.tok.encode_prompt(text, contents) if self.chat is not None else self.tok.encode(text)

    def _room(self, reserve: int) -> int:
        room = self.lm.context_len - reserve
        if room < 1:
            raise RetrolmError(f"{self.lm.name}: {reserve} tokens to generate or score leave no room for a prompt in "
                               f"its context of {self.lm.context_len}")
        return room

    def passages_that_fit(self, question: str, passages: Sequence[str], reserve: int = 64) -> int:
        """How many of ``passages``, best first, fit in the prompt with ``reserve`` tokens left for the answer or
        the options: the lowest-ranked go first (a prompt cut on the left would lose the instructions and the best
        passages instead)."""
        room = self._room(reserve)
        n = len(passages)
        while n > 0 and len(self._encode(question, passages[:n])) > room:
            n -= 1
        return n

    def prompt_ids(self, question: str, passages: Sequence[str] | None = None, reserve: int = 64) -> list[int]:
        """The prompt's token ids (the chat template's special tokens parsed; in the question and the passages
        special-token strings stay text), with ``reserve`` more tokens (the answer to generate, the options to score)
        left in the model's context; a prompt that does not fit is refused (:meth:`passages_that_fit` says how many
        passages do)."""
        ids = self._encode(question, passages)
        if len(ids) > (room := self._room(reserve)):
            what = f"with {len(passages)} passages " if passages else ""
            raise RetrolmError(f"{self.lm.name}: the prompt {what}takes {len(ids)} tokens; with {reserve} kept for the "
                               f"answer or the options, its {self.lm.context_len}-token context has room for {room}")
        return ids

    def _option_ids(self, options: Sequence[str]) -> list[list[int]]:
        lead = "" if self.chat is not None else " "
        return [self.tok.encode(lead + c.strip()) or [self.pad_id] for c in options]

    def option_room(self, options: Sequence[str]) -> int:
        """Tokens the longest of ``options`` takes after a prompt (:meth:`option_nlls` reads them there)."""
        return max(len(c) for c in self._option_ids(options))

    # ------------------------------------------------------------------------------------------------ answers
    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 16, seed: int = 0, batch_size: int = 8) -> list[Reading]:
        """Short answers: ``samples`` generations per prompt (greedy at temperature 0)."""
        check_sampling(max_new_tokens, temperature, top_p)
        if samples < 1:
            raise RetrolmError(f"samples must be >= 1, got {samples}")
        out: list[Reading | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            tokens = self._generate_batch([prompts[i] for i in idx], samples, temperature, top_p, max_new_tokens,
                                          seed)
            for j, i in enumerate(idx):
                rows = tokens[j * samples : (j + 1) * samples]
                texts = [self.tok.decode(r) for r, _ in rows]
                p = len(prompts[i])
                out[i] = Reading([extract_answer(t) for t in texts], p, self.cost.prompt(p),
                                 sum(self.cost.generation(p, n) for _, n in rows), texts)
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], samples: int, temperature: float, top_p: float,
                        max_new_tokens: int, seed: int) -> list[tuple[list[int], int]]:
        """Per row (prompt-major, then sample): the answer tokens and how many tokens were sampled (stop included).
        Each row draws from its own generator, seeded by ``seed``, its prompt and its sample index: a question's
        samples do not depend on the questions batched with it, on the batch size or on the order."""
        dev = self.lm.device
        ids, mask = left_pad(prompts, self.pad_id)
        logits, cache = forward_last(self.lm.hf, ids.to(dev), mask.to(dev))
        if samples > 1:
            if hasattr(cache, "batch_repeat_interleave"):
                cache.batch_repeat_interleave(samples)
                logits = logits.repeat_interleave(samples, 0)
            else:  # a legacy cache: prefill the repeated prompts (the FLOPs charged assume a shared prompt)
                logits, cache = forward_last(self.lm.hf, ids.repeat_interleave(samples, 0).to(dev),
                                             mask.repeat_interleave(samples, 0).to(dev))
            mask = mask.repeat_interleave(samples, 0)
        rows = mask.shape[0]
        gens = [row_generator(seed, prompts[r // samples], r % samples) for r in range(rows)]
        mask = mask.to(dev)
        next_pos = mask.sum(-1, keepdim=True)
        breaks, blank = self._line_break_ids
        toks: list[list[int]] = [[] for _ in range(rows)]
        sampled = [0] * rows
        done = [False] * rows
        for step in range(max_new_tokens):
            for r in range(rows):
                if done[r]:
                    continue
                t = sample(logits[r], temperature, top_p, gens[r])
                sampled[r] += 1
                # a line break ends the answer once there is one: a label alone ("**Answer:**" on its own line, a
                # passage number) is not an answer yet, and extract_answer would find nothing in it
                begun = t in breaks and any(x not in blank for x in toks[r]) and \
                    bool(extract_answer(self.tok.decode(toks[r])))
                if t in self.stop_ids or begun:
                    done[r] = True
                else:
                    toks[r].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            feed = torch.tensor([[toks[r][-1] if toks[r] and not done[r] else self.pad_id] for r in range(rows)],
                                device=dev)
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=dev)], dim=1)
            logits, cache = forward_last(self.lm.hf, feed, mask, cache, positions=next_pos)
            next_pos = next_pos + 1
        return list(zip(toks, sampled, strict=True))

    @torch.no_grad()
    def choose(self, prompts: Sequence[list[int]], choices: Sequence[Sequence[str]], normalize: str = "mean"
               ) -> list[Reading]:
        """Multiple choice: the option with the highest (per-token) log-likelihood after each prompt (see
        :meth:`option_nlls` and :func:`~retrolm.eval.qa.choice_prediction`). FLOPs: the prompt's forward
        (``prompt_flops``) and the options' forwards after it (``generation_flops``; with ``pmi`` also the premise's
        forward and the options' after it). A template that leaves nothing without the question (``{passages}
        {question}``) has the end-of-text token as its premise: the options' likelihood at the start of a text."""
        out = []
        for prompt, opts in zip(prompts, choices, strict=True):
            nlls = self.option_nlls(prompt, opts)
            p = len(prompt)
            scoring = sum(self.cost.prompt(len(x), past=p) for x in nlls)
            prior = None
            if normalize == "pmi":  # the premise: this reader's prompt with no question and no passages
                premise = self.prompt_ids("", reserve=self.option_room(opts)) or self._boundary
                prior = self.option_nlls(premise, opts)
                scoring += self.cost.prompt(len(premise)) + sum(self.cost.prompt(len(x), past=len(premise))
                                                                for x in prior)
            out.append(Reading([opts[choice_prediction(nlls, normalize, prior)]], p, self.cost.prompt(p), scoring))
        return out

    @functools.cached_property
    def _boundary(self) -> list[int]:
        """The premise of a template that leaves nothing without the question: the end-of-text token."""
        for t in (self.tok.eos_id, self.tok.pad_id):
            if t is not None:
                return [t]
        raise RetrolmError(f"{self.lm.name}: pmi needs a premise, and this template leaves none without the question "
                           "and the tokenizer has no end-of-text token: use a template with text around {question}")

    @torch.no_grad()
    def option_nlls(self, prompt: list[int], options: Sequence[str]) -> list[list[float]]:
        """Per option, the NLL (nats) of each of its tokens after ``prompt``. The prompt is read once; its KV cache is
        copied to one row per option and the options are read in one batch (right-padded)."""
        dev = self.lm.device
        cids = self._option_ids(options)
        k, width = len(cids), max(len(c) for c in cids)
        ids, mask = left_pad([prompt], self.pad_id)
        last, cache = forward_last(self.lm.hf, ids.to(dev), mask.to(dev))
        if hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(k)
        else:  # a legacy cache: read the prompt once per option
            _, cache = forward_last(self.lm.hf, ids.repeat(k, 1).to(dev), mask.repeat(k, 1).to(dev))
        opt = torch.full((k, width), self.pad_id, dtype=torch.long)
        opt_mask = torch.zeros((k, width), dtype=torch.long)
        for r, c in enumerate(cids):
            opt[r, : len(c)] = torch.tensor(c)
            opt_mask[r, : len(c)] = 1
        full_mask = torch.cat([mask.repeat(k, 1), opt_mask], dim=1).to(dev)
        positions = (len(prompt) + torch.arange(width)).repeat(k, 1).to(dev)
        logits = forward_all(self.lm.hf, opt.to(dev), full_mask, cache, positions)  # (k, width, V)
        # option token j is predicted by the prompt's last position (j = 0) or by option token j - 1
        pred = torch.cat([last[:1].expand(k, -1)[:, None], logits[:, :-1]], dim=1).float()
        logp = torch.log_softmax(pred, dim=-1).gather(-1, opt.to(dev)[..., None])[..., 0].cpu()
        return [(-logp[r, : len(c)]).tolist() for r, c in enumerate(cids)]


def forward_all(hf: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: object,
                positions: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of ``ids`` read after ``cache`` (``mask`` covers cache + ids)."""
    params = _forward_params(hf)
    kw: dict = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True,
                "cache" if "cache" in params else "past_key_values": cache}
    return hf(**kw).logits


__all__ = ["DEFAULT_SYSTEM", "DEFAULT_TEMPLATE", "Reader", "Reading", "chat_tokenizer", "check_template",
           "extract_answer", "forward_all", "forward_last", "left_pad"]
