"""Generation with sources shown (SPEC R6): sample with a KV cache, retrieving once per completed chunk.

The prompt is left-padded to a chunk boundary (as Wang et al. 2023 do for RETRO), so even a short prompt is
a complete chunk whose neighbours condition the very first generated chunk. Each time the model completes
a chunk, that chunk's text is the query; its k neighbours (chunk + continuation) are encoded once and read
by the next chunk through chunked cross-attention. Every generated chunk reports the database chunks it
was conditioned on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from retrolm.database import Database, Hit
from retrolm.errors import RetrolmError
from retrolm.model import RetroModel
from retrolm.tokenizer import LMTokenizer


@dataclass
class GeneratedChunk:
    """A span of generated text and the retrieved chunks it was conditioned on (empty without retrieval)."""

    text: str
    sources: list[Hit] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    """The chunk's token ids (decoding them gives ``text``)."""


@dataclass
class Generation:
    """The result of :func:`generate`."""

    prompt: str
    text: str
    """Generated continuation (without the prompt)."""
    chunks: list[GeneratedChunk]
    """The continuation split at the model's chunk boundaries, each with its sources."""
    new_tokens: int
    seconds: float
    retrieval: bool

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest set whose mass reaches top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


class _Retriever:
    """Neighbours (tokens, mask, hits) for one chunk of token ids."""

    def __init__(self, db: Database, k: int, device: torch.device):
        self.db, self.k, self.device = db, k, device

    def __call__(self, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[Hit]]:
        text = self.db.tokenizer.decode(chunk)
        scores, ids = self.db.search_vectors(self.db.embed([text]), self.k)
        toks, mask = self.db.store.neighbour_tokens(ids[0])
        return (torch.from_numpy(toks).to(self.device), torch.from_numpy(mask).to(self.device),
                self.db.hits(scores[0], ids[0]))


@torch.no_grad()
def generate(
    model: RetroModel,
    tokenizer: LMTokenizer,
    prompt: str,
    database: Database | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_neighbours: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> Generation:
    """Continue ``prompt``; with a ``database`` (and a RETRO model) retrieve for every completed chunk.

    Sampling is greedy at ``temperature`` 0, else temperature + nucleus (``top_p``) with a seeded generator.
    The prompt is left-padded to a whole chunk; a prompt longer than the model's context keeps its most recent
    whole chunks. Generation stops at EOS (unless ``stop_at_eos`` is False) or after ``max_new_tokens``.
    """
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise RetrolmError(
            f"generate: need max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1 "
            f"(got {max_new_tokens}, {temperature}, {top_p})"
        )
    cfg, m = model.config, model.config.chunk_len
    device = next(model.parameters()).device
    retrieval = database is not None and bool(cfg.retro_layers)
    if database is not None and not cfg.retro_layers:
        raise RetrolmError("this checkpoint has no RETRO layers; generate without --db")
    if database is not None and database.chunk_len != m:
        raise RetrolmError(f"{database.path}: chunk_len {database.chunk_len} differs from the model's {m}")
    if database is not None and database.tokenizer.sha256 != tokenizer.sha256:
        raise RetrolmError(f"{database.path}: tokenizer differs from the one the model was trained with")
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.pad_id]
    pad = (-len(ids)) % m  # left-pad so the prompt ends on a chunk boundary
    ids = [tokenizer.pad_id] * pad + ids
    budget = cfg.seq_len - len(ids)
    if budget < 1:  # keep the most recent whole chunks of a long prompt
        ids = ids[len(ids) - (cfg.seq_len - m) :]
        budget = m
    max_new = min(max_new_tokens, budget)
    retriever = _Retriever(database, num_neighbours or cfg.num_neighbours, device) if retrieval else None

    gen = torch.Generator().manual_seed(seed)
    cache = model.init_cache(1, len(ids) + max_new, device=device)
    n_chunks = (len(ids) + max_new) // m + 1
    neighbours = mask = None
    sources: dict[int, list[Hit]] = {}
    if retriever is not None:
        R = 2 * m
        neighbours = torch.zeros(1, n_chunks, retriever.k, R, dtype=torch.long, device=device)
        mask = torch.zeros(1, n_chunks, retriever.k, R, dtype=torch.bool, device=device)
        for u in range(len(ids) // m):  # every prompt chunk is complete: retrieve for all before prefill
            t, mk, hits = retriever(ids[u * m : (u + 1) * m])
            neighbours[0, u, : len(t)], mask[0, u, : len(t)] = t, mk
            sources[u] = hits

    def step(tokens: list[int]) -> torch.Tensor:
        end = (cache.pos + len(tokens)) // m + 1
        nb = None if neighbours is None else neighbours[:, :end]
        mk = None if mask is None else mask[:, :end]
        x = torch.tensor([tokens], dtype=torch.long, device=device)
        return model(x, nb, mk, cache=cache).logits[0, -1]

    t0 = time.perf_counter()
    logits = step(ids)
    out: list[int] = []
    while len(out) < max_new:
        tok = _sample(logits, temperature, top_p, gen)
        if stop_at_eos and tok == tokenizer.eos_id:
            break
        out.append(tok)
        pos = len(ids) + len(out) - 1  # position of the token just sampled
        if retriever is not None and (pos + 1) % m == 0:  # it completes chunk u: retrieve before feeding it
            u = pos // m
            full = ids + out
            t, mk, hits = retriever(full[u * m : (u + 1) * m])
            neighbours[0, u, : len(t)], mask[0, u, : len(t)] = t, mk
            sources[u] = hits
        if len(out) < max_new:
            logits = step([tok])
    seconds = time.perf_counter() - t0

    # Generated chunk j (positions [j*m, (j+1)*m)) reads the neighbours of chunk j-1.
    first = len(ids) // m
    chunks = []
    for j in range(first, first + -(-len(out) // m)):
        span = out[(j - first) * m : (j - first + 1) * m]
        chunks.append(GeneratedChunk(tokenizer.decode(span), sources.get(j - 1, []), span))
    return Generation(prompt, tokenizer.decode(out), chunks, len(out), seconds, retrieval)


def format_generation(g: Generation, max_source_chars: int = 160) -> str:
    """Human-readable text with, under every generated chunk, the database chunks it was conditioned on."""
    lines = [f"prompt: {g.prompt}", ""]
    for i, c in enumerate(g.chunks):
        lines.append(f"[chunk {i}] {c.text}")
        for h in c.sources:
            snippet = " ".join(h.text.split())[:max_source_chars]
            lines.append(f"    ← {h.doc_id} (chunk {h.chunk_id}, score {h.score:.3f}): {snippet}")
    lines.append("")
    lines.append(f"{g.new_tokens} tokens in {g.seconds:.2f}s ({g.tokens_per_s:.1f} tok/s), "
                 f"retrieval {'on' if g.retrieval else 'off'}")
    return "\n".join(lines)
