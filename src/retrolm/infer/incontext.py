"""Generation by a pretrained causal LM reading retrieved text in its context (In-Context RALM), with sources.

Every ``stride`` generated tokens the last ``query_tokens`` tokens (prompt included) are the query; the retrieved
passages are placed before the most recent ``context_tokens`` tokens, the KV cache is rebuilt over that context, and
the next ``stride`` tokens are decoded from the cache. Each generated span reports the passages it read.
"""

from __future__ import annotations

import time

import torch

from retrolm.core.errors import RetrolmError
from retrolm.eval.incontext import InContextSettings, passages_text
from retrolm.infer.generate import GeneratedChunk, Generation
from retrolm.infer.sampling import check_sampling, sample
from retrolm.models.hf import CausalLM
from retrolm.retrieval import Retriever
from retrolm.text.tokenizer import LMTokenizer


@torch.no_grad()
def generate_in_context(
    lm: CausalLM,
    tokenizer: LMTokenizer,
    prompt: str,
    retriever: Retriever | None = None,
    settings: InContextSettings | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> Generation:
    """Continue ``prompt`` with ``lm``; with a ``retriever``, re-retrieve every ``settings.stride`` tokens."""
    check_sampling(max_new_tokens, temperature, top_p)
    settings = settings or InContextSettings()
    if not prompt.strip():
        raise RetrolmError("generate: the prompt is empty")
    ids = tokenizer.encode(prompt)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    chunks: list[GeneratedChunk] = []
    t0 = time.perf_counter()
    first_span = min(settings.stride, max_new_tokens)
    if lm.context_len - first_span < 2:
        raise RetrolmError(f"generate: stride {settings.stride} leaves no room for a context in the "
                           f"{lm.context_len}-token context of {lm.name}")
    dropped = 0
    while len(out) < max_new_tokens:
        # what the context may hold before the span is decoded: a last, shorter span leaves more of it
        room = lm.context_len - min(settings.stride, max_new_tokens - len(out))
        history = ids + out
        hits = []
        if retriever is not None:
            query = tokenizer.decode(history[-settings.query_tokens :])
            hits = retriever.search([query], settings.passages).hits(0)
        passage = tokenizer.encode(passages_text(hits, settings.continuation)) if hits else []
        keep = min(len(history), settings.context_tokens)
        if keep + len(passage) > room:
            # The document's recent text keeps at least half the room and the passages get the rest: the worst ones
            # are dropped first (they come first in the text), then the best is cut from its front, keeping the
            # continuation next to the document. Only the passages that remain are reported as sources.
            keep = min(keep, max(room - len(passage), room // 2))
            while len(hits) > 1 and len(passage) > room - keep:
                hits = hits[:-1]
                passage = tokenizer.encode(passages_text(hits, settings.continuation))
            passage = passage[max(0, len(passage) - (room - keep)) :]
            hits = hits if passage else []
        context = passage + history[len(history) - keep :]
        if not out:
            dropped = len(ids) - keep  # prompt tokens the first span could not see
        span, done = _decode(lm, context, min(settings.stride, max_new_tokens - len(out)), temperature, top_p, gen,
                             tokenizer.stop_ids if stop_at_eos else frozenset())
        out += span
        if span:
            chunks.append(GeneratedChunk("", hits, span))  # its text once every span is known (below)
        if done:
            break
    for chunk, text in zip(chunks, tokenizer.decode_spans([c.token_ids for c in chunks]), strict=True):
        chunk.text = text  # a character split between two spans whole in the first (not U+FFFD on both sides)
    return Generation(prompt, tokenizer.decode(out), chunks, len(out), time.perf_counter() - t0, retriever is not None,
                      dropped)


def _decode(lm: CausalLM, context: list[int], n: int, temperature: float, top_p: float, gen: torch.Generator,
            stop_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Up to ``n`` tokens after ``context``, one forward per token over a KV cache; True if a stop token ended it."""
    logits, cache = lm.step(context)
    span: list[int] = []
    for _ in range(n):
        tok = sample(logits, temperature, top_p, gen)
        if tok in stop_ids:
            return span, True
        span.append(tok)
        if len(span) == n:
            break
        logits, cache = lm.step([tok], cache)
    return span, False
