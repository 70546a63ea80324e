"""Compute accounting of test-time retrieval: FLOPs per question and stage, and readers' pretraining FLOPs.

A transformer forward pass is counted as Kaplan et al. (2020, table 1) count it, with both attention products: a
token that attends to ``c`` positions costs ``2 · P + 4 · L · c · d_attn`` FLOPs, where ``P`` is the number of weights
in matrix multiplications (every ``nn.Linear`` and, for a tied or untied LM head, the head; not the input embedding,
which is a lookup), ``L`` the layers and ``d_attn`` the attention width (heads × head dim); one multiply-add is 2
FLOPs. A causal prompt of ``T`` tokens after ``past`` cached ones therefore costs
``Σ_{t=1..T} (2P + 4 L (past + t) d_attn)``, and a bidirectional encoder (the sentence encoder, a cross-encoder) of
``T`` tokens ``T · (2P + 4 L T d_attn)``. Norms, softmax and activations are left out (under 1% here).

Search is counted as the arithmetic it does: exact inner-product search over ``N`` keys of dimension ``d`` is
``2 · d · N`` per query (approximate indexes do less; they are counted as exact, an upper bound); BM25 adds one score
per posting of each query term and compares every chunk's score once for the top-k.

Pretraining FLOPs are ``6 · N · D`` (Kaplan et al.; N parameters, D training tokens) where ``D`` is published:
:data:`PRETRAINING_TOKENS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

PRETRAINING_TOKENS: dict[str, tuple[float, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": (2e12, "SmolLM2 model card and paper (Allal et al. 2025, arXiv "
                                                  "2502.02737): SmolLM2-135M was pretrained on 2T tokens"),
    "HuggingFaceTB/SmolLM2-135M": (2e12, "SmolLM2 model card (arXiv 2502.02737): 2T pretraining tokens"),
    "HuggingFaceTB/SmolLM2-360M-Instruct": (4e12, "SmolLM2 model card (arXiv 2502.02737): 4T pretraining tokens"),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": (11e12, "SmolLM2 model card (arXiv 2502.02737): 11T pretraining tokens"),
}
"""Published pretraining token counts by hub name: (tokens, where the number comes from)."""


@dataclass(frozen=True)
class ModelCost:
    """What a forward pass of a transformer costs (see the module docstring)."""

    name: str
    matmul_params: int
    """Weights in matrix multiplications (Linear layers and the LM head)."""
    n_layer: int
    d_attn: int
    """Attention width: heads × head dim."""
    params: int = 0
    """All parameters (for pretraining FLOPs)."""
    bidirectional: bool = False
    """Every token attends to the whole input (encoders) instead of the positions before it."""

    @classmethod
    def of(cls, module: nn.Module, name: str = "", bidirectional: bool = False) -> ModelCost:
        """Read the cost parameters off a ``transformers`` model (Linear and GPT-2 Conv1D weights, each counted once
        even when shared)."""
        seen: set[int] = set()
        matmul = 0
        for m in module.modules():
            linear = isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # GPT-2's layers are Conv1D
            if linear and id(m.weight) not in seen:
                seen.add(id(m.weight))
                matmul += m.weight.numel()
        cfg = getattr(module, "config", None)
        n_layer = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 0)
        heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0) or 0)
        hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0)
        head_dim = int(getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0))
        params = sum(p.numel() for p in module.parameters())
        return cls(name or str(getattr(cfg, "_name_or_path", "")), matmul, n_layer, heads * head_dim, params,
                   bidirectional)

    def per_token(self, context: int) -> int:
        """One token attending to ``context`` positions."""
        return 2 * self.matmul_params + 4 * self.n_layer * context * self.d_attn

    def prompt(self, tokens: int, past: int = 0) -> int:
        """A prompt of ``tokens`` tokens after ``past`` cached ones (bidirectional: ``tokens`` attend to all)."""
        if tokens <= 0:
            return 0
        if self.bidirectional:
            return tokens * self.per_token(past + tokens)
        # Σ_{t=1..T} (2P + 4 L (past + t) d) = 2PT + 4 L d (past·T + T(T+1)/2)
        attended = past * tokens + tokens * (tokens + 1) // 2
        return 2 * self.matmul_params * tokens + 4 * self.n_layer * self.d_attn * attended

    def generation(self, prompt_tokens: int, new_tokens: int) -> int:
        """Decoding ``new_tokens`` after a prompt of ``prompt_tokens``: the prompt's forward yields the first token,
        and each further token needs one forward of the token before it (``new_tokens - 1`` forwards at contexts
        ``prompt_tokens + 1 …``). The prompt itself is :meth:`prompt`."""
        return self.prompt(max(0, new_tokens - 1), past=prompt_tokens)


def pretraining_flops(name: str, params: int) -> dict | None:
    """``{"flops", "params", "tokens", "source"}`` for a reader whose pretraining tokens are published, else None."""
    known = PRETRAINING_TOKENS.get(name)
    if known is None:
        return None
    tokens, source = known
    return {"flops": 6.0 * params * tokens, "params": params, "tokens": tokens,
            "source": f"6·N·D with N = {params:,} parameters counted in the loaded model and D = {tokens:.3g} tokens "
                      f"({source})"}


def dense_search_flops(dim: int, n_chunks: int) -> int:
    """Exact inner-product search of one query over ``n_chunks`` keys of dimension ``dim``."""
    return 2 * dim * n_chunks


def bm25_search_flops(postings: int, n_chunks: int) -> int:
    """BM25 for one query: one add per posting of its terms, one comparison per chunk for the top-k."""
    return postings + n_chunks


STAGES = ("encoder", "search", "reranker", "reader_prompt", "reader_generation")


@dataclass
class StageFlops:
    """FLOPs spent on one question, by stage."""

    encoder: int = 0
    """Embedding the query (dense and hybrid retrieval)."""
    search: int = 0
    """Searching the index (dense inner products, BM25 postings)."""
    reranker: int = 0
    """Scoring the candidate passages."""
    reader_prompt: int = 0
    """The reader's prompt forwards (one per prompt: samples share the prompt's cache)."""
    reader_generation: int = 0
    """The reader's decoding forwards, over all samples (or scoring the options of a multiple-choice item)."""

    @property
    def total(self) -> int:
        return sum(getattr(self, s) for s in STAGES)

    def __add__(self, other: StageFlops) -> StageFlops:
        return StageFlops(*(getattr(self, s) + getattr(other, s) for s in STAGES))

    def to_dict(self) -> dict:
        return {**{s: getattr(self, s) for s in STAGES}, "total": self.total}


def mean_flops(rows: list[StageFlops]) -> dict:
    """Mean FLOPs per question, by stage and in total."""
    n = max(1, len(rows))
    return {**{s: sum(getattr(r, s) for r in rows) / n for s in STAGES}, "total": sum(r.total for r in rows) / n}


__all__ = ["PRETRAINING_TOKENS", "STAGES", "ModelCost", "StageFlops", "bm25_search_flops", "dense_search_flops",
           "mean_flops", "pretraining_flops"]
