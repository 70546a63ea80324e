"""Generation with sources shown: RETRO samples with a KV cache, retrieving once per completed chunk.

The prompt is left-padded to a chunk boundary (as Wang et al. 2023 do for RETRO), so even a short prompt is a complete
chunk whose neighbours condition the very first generated chunk. Each time the model completes a chunk, that chunk's
text is the query; its k neighbours (chunk + continuation) are encoded once and read by the next chunk through
chunked cross-attention. Every generated chunk reports the database chunks it was conditioned on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from retrolm.core.device import default_device
from retrolm.core.errors import RetrolmError
from retrolm.db import Hit
from retrolm.infer.sampling import check_sampling, sample
from retrolm.models import RetroModel
from retrolm.retrieval import Retriever
from retrolm.retrieval.neighbours import MAX_NEIGHBOURS
from retrolm.text.tokenizer import LMTokenizer

logger = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """``retrolm generate``: what to continue, with which model and database, and how to sample."""

    checkpoint: str = ""
    """A retrolm checkpoint or run folder, or a pretrained causal LM (HF folder, short name such as smollm2-135m, or
    hub name), which then reads retrieved text in its context."""
    prompt: str = ""
    """Text to continue."""
    db: str | None = None
    """Retrieval database, or a shards file (a causal LM only); None → retrieval off."""
    retriever: str = "auto"
    """auto | dense | bm25 | hybrid (auto: dense if the database has dense keys, else BM25)."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    neighbours: int | None = None
    """Neighbours per retrieval (RETRO: None → as trained; in-context: passages, None → 1)."""
    stride: int = 32
    """In-context retrieval: tokens generated per retrieval."""
    query_tokens: int = 32
    """In-context retrieval: the query is this many of the most recent tokens."""
    context_tokens: int = 1024
    """In-context retrieval: most recent tokens kept after the passages."""
    continuation: bool = True
    """In-context retrieval: a passage is the retrieved chunk plus its continuation."""
    seed: int = 0
    stop_at_eos: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_p)
        if self.neighbours is not None and not 1 <= self.neighbours <= MAX_NEIGHBOURS:
            raise RetrolmError(f"generate: number of neighbours must be in 1..{MAX_NEIGHBOURS}, got {self.neighbours}")
        if not self.checkpoint:
            raise RetrolmError("generate: --checkpoint is required")
        if not self.prompt.strip():
            raise RetrolmError("generate: the prompt is empty (--prompt)")
        if min(self.stride, self.query_tokens, self.context_tokens) < 1:
            raise RetrolmError("generate: stride, query_tokens and context_tokens must be positive")
        default_device(self.device)  # here, not as a traceback once the model is loaded


@dataclass
class GeneratedChunk:
    """A span of generated text and the retrieved chunks it was conditioned on (empty without retrieval)."""

    text: str
    sources: list[Hit] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    """The chunk's token ids (decoding them gives ``text``)."""


@dataclass
class Generation:
    """The result of a generation."""

    prompt: str
    text: str
    """Generated continuation (without the prompt)."""
    chunks: list[GeneratedChunk]
    """The continuation split at the model's retrieval steps, each with its sources."""
    new_tokens: int
    seconds: float
    retrieval: bool
    prompt_tokens_dropped: int = 0
    """Tokens cut from the start of a prompt longer than the model's context (the most recent ones are kept)."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


def fit_prompt(ids: list[int], pad_id: int, chunk_len: int, context: int) -> tuple[list[int], int]:
    """Left-pad ``ids`` to a whole chunk; if that leaves no room in ``context``, keep the most recent whole chunks
    (one chunk of room). Returns the prompt and how many of its tokens were dropped."""
    pad = (-len(ids)) % chunk_len
    padded = [pad_id] * pad + ids
    if len(padded) < context:
        return padded, 0
    kept = padded[len(padded) - (context - chunk_len):]  # the cut lies past the padding (at least one chunk in)
    dropped = len(padded) - len(kept) - pad
    logger.warning("prompt of %d tokens does not fit the context of %d: generating from its last %d tokens",
                   len(ids), context, len(kept))
    return kept, dropped


class _NeighbourSlots:
    """The (1, n_chunks, K, R) neighbour tensors a RETRO model reads, filled chunk by chunk, and their sources."""

    def __init__(self, retriever: Retriever, k: int, n_chunks: int, device: torch.device) -> None:
        m = retriever.db.chunk_len
        self.retriever, self.k, self.tokenizer = retriever, k, retriever.db.tokenizer
        self.tokens = torch.zeros(1, n_chunks, k, 2 * m, dtype=torch.long, device=device)
        self.mask = torch.zeros(1, n_chunks, k, 2 * m, dtype=torch.bool, device=device)
        self.sources: dict[int, list[Hit]] = {}
        self.build = retriever.db.meta.get("build_id")

    def fill(self, u: int, chunk: list[int]) -> None:
        """Retrieve with chunk ``u``'s tokens; its neighbours (chunk + continuation) go into slot ``u``."""
        result = self.retriever.search([self.tokenizer.decode(chunk)], self.k)
        db = self.retriever.db
        if db.meta.get("build_id") != self.build:  # its tokens may be of another vocabulary or chunk length
            raise RetrolmError(f"{db.path}: the database was rebuilt during generation; generate again")
        toks, mask = self.retriever.db.store.neighbour_tokens(result.ids[0])
        self.tokens[0, u], self.mask[0, u] = torch.from_numpy(toks), torch.from_numpy(mask)
        self.sources[u] = result.hits(0)


@torch.no_grad()
def generate(
    model: RetroModel,
    tokenizer: LMTokenizer,
    prompt: str,
    retriever: Retriever | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_neighbours: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> Generation:
    """Continue ``prompt`` with a RETRO model; with a ``retriever`` (and RETRO layers) retrieve for every chunk.

    Sampling is greedy at ``temperature`` 0, else temperature + nucleus (``top_p``) with a seeded generator. A prompt
    longer than the model's context keeps its most recent whole chunks (with a warning; see ``prompt_tokens_dropped``).
    Generation stops at EOS (unless ``stop_at_eos`` is False) or after ``max_new_tokens``.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    cfg, m = model.config, model.config.chunk_len
    device = next(model.parameters()).device
    if retriever is not None:
        check_database(model, tokenizer, retriever)
    if not prompt.strip():
        raise RetrolmError("generate: the prompt is empty")
    raw = tokenizer.encode(prompt)
    # the prompt is cut to whole chunks of a whole-chunk context (a context of 100 with chunks of 64 kept 36 tokens,
    # and the chunks after were booked to the wrong neighbours), with a chunk of room to generate in
    whole = cfg.seq_len // m * m
    if whole < 2 * m:
        raise RetrolmError(f"generate: the model's context of {cfg.seq_len} tokens holds fewer than two chunks of "
                           f"{m}: no room for a prompt chunk and a generated one")
    ids, dropped = fit_prompt(raw, tokenizer.pad_id, m, whole)
    # the left padding, which a model that reads a token mask (a pretrained base) keeps out of its attention
    n_pad = len(ids) - len(raw) if not dropped else 0
    max_new = min(max_new_tokens, cfg.seq_len - len(ids))
    if max_new < max_new_tokens:  # the model has no positions past seq_len: say so instead of stopping short
        logger.warning("generate: the prompt (%d tokens with padding) leaves %d of the model's %d positions; "
                       "generating %d tokens, not %d", len(ids), max_new, cfg.seq_len, max_new, max_new_tokens)
    k = cfg.num_neighbours if num_neighbours is None else num_neighbours
    if k < 1:
        raise RetrolmError(f"generate: number of neighbours must be >= 1, got {k}")
    slots = _NeighbourSlots(retriever, k, (len(ids) + max_new) // m + 1, device) if retriever is not None else None
    for u in range(len(ids) // m if slots else 0):  # every prompt chunk is complete: retrieve for all before prefill
        slots.fill(u, ids[u * m : (u + 1) * m])

    gen = torch.Generator().manual_seed(seed)
    cache = model.init_cache(1, len(ids) + max_new, device=device)

    def step(tokens: list[int]) -> torch.Tensor:
        end = (cache.pos + len(tokens)) // m + 1
        nb = None if slots is None else slots.tokens[:, :end]
        mk = None if slots is None else slots.mask[:, :end]
        kw = {}
        if cache.pos == 0 and n_pad and getattr(model, "reads_token_mask", False):
            kw["attention_mask"] = (torch.arange(len(tokens), device=device) >= n_pad)[None]
        return model(torch.tensor([tokens], dtype=torch.long, device=device), nb, mk, cache=cache, **kw).logits[0, -1]

    t0 = time.perf_counter()
    logits = step(ids)
    out: list[int] = []
    while len(out) < max_new:
        tok = sample(logits, temperature, top_p, gen)
        if stop_at_eos and tok in tokenizer.stop_ids:
            break
        out.append(tok)
        pos = len(ids) + len(out) - 1  # position of the token just sampled
        if slots is not None and (pos + 1) % m == 0:  # it completes chunk u: retrieve before feeding it
            full = ids + out
            slots.fill(pos // m, full[pos + 1 - m : pos + 1])
        if len(out) < max_new:
            logits = step([tok])
    seconds = time.perf_counter() - t0

    # Generated chunk j (positions [j*m, (j+1)*m)) reads the neighbours of chunk j-1.
    first, sources = len(ids) // m, slots.sources if slots is not None else {}
    spans = [out[i : i + m] for i in range(0, len(out), m)]
    chunks = [GeneratedChunk(text, sources.get(first + i - 1, []), span)
              for i, (span, text) in enumerate(zip(spans, tokenizer.decode_spans(spans), strict=True))]
    return Generation(prompt, tokenizer.decode(out), chunks, len(out), seconds, slots is not None, dropped)


def check_database(model: RetroModel, tokenizer: LMTokenizer, retriever: Retriever) -> None:
    """A RETRO model reads neighbours as token ids: the database must share its tokenizer and chunk length."""
    db = retriever.db
    if not model.config.retro_layers:
        raise RetrolmError("this checkpoint has no RETRO layers; generate without --db")
    if db.chunk_len != model.config.chunk_len:
        raise RetrolmError(f"{db.path}: chunk_len {db.chunk_len} differs from the model's {model.config.chunk_len}")
    if db.tokenizer.sha256 != tokenizer.sha256:
        raise RetrolmError(f"{db.path}: tokenizer differs from the one the model was trained with")


def format_generation(g: Generation, max_source_chars: int = 160) -> str:
    """Human-readable text with, under every generated chunk, the database chunks it was conditioned on."""
    lines = [f"prompt: {g.prompt}", ""]
    if g.prompt_tokens_dropped:
        lines += [f"(the first {g.prompt_tokens_dropped} prompt tokens did not fit the context and were dropped)", ""]
    for i, c in enumerate(g.chunks):
        lines.append(f"[chunk {i}] {c.text}")
        for h in c.sources:
            snippet = " ".join(h.text.split())[:max_source_chars]
            where = f"{h.shard}: " if getattr(h, "shard", None) else ""  # a sharded database's part
            lines.append(f"    ← {h.doc_id} ({where}chunk {h.chunk_id}, score {h.score:.3f}): {snippet}")
    lines.append("")
    lines.append(f"{g.new_tokens} tokens in {g.seconds:.2f}s ({g.tokens_per_s:.1f} tok/s), "
                 f"retrieval {'on' if g.retrieval else 'off'}")
    return "\n".join(lines)
