"""REALM (Guu et al., 2020): a trainable retriever and a reader, the retrieved document marginalised out.

Three BERT-family encoders, all initialised from one Hugging Face encoder (MiniLM, ``minilm``, by default; any
``AutoModel`` encoder with a WordPiece-style ``[CLS]``/``[SEP]``/``[MASK]`` tokenizer works):

* **Embed_input** (``query_encoder``) and **Embed_doc** (``doc_encoder``): the ``[CLS]`` vector, projected to
  ``embed_dim`` by a linear layer (new, randomly initialised; ``embed_dim=None`` keeps the hidden size and uses no
  projection). The retrieval score is ``f(x, z) = Embed_input(x) · Embed_doc(z)``.
* the **null document** ∅: a learned embedding (``null_embedding``, new) whose score ``Embed_input(x) · e_∅`` competes
  with the retrieved documents; the reader sees it as an empty document (``[CLS] x [SEP] [SEP]``). When no document
  helps, training moves the probability mass onto it.
* the **reader** (``reader``): the encoder over ``[CLS] x [SEP] z [SEP]`` with two heads the sentence-encoder
  checkpoint lacks (both new): a masked-language-model head (dense → GELU → LayerNorm → logits, the decoder tied to
  the reader's word embeddings, plus a bias) for pre-training, and a start/end span head (one linear layer, 2
  outputs) for open-domain QA.

The retriever distribution over the top-k candidates (plus ∅) is ``p(z|x) = softmax_z f(x, z)`` and the marginal
likelihood ``p(y|x) = Σ_z p(y|z,x) p(z|x)`` is computed in log space (:func:`marginal_log_likelihood`), so gradients
reach the reader, the query encoder and, through the retrieved documents re-embedded in the batch, the document
encoder. The index's document embeddings are a snapshot of ``doc_encoder`` (see :mod:`retrolm.train.realm`): as in
REALM, the stale index only chooses the top k, and p(z|x) over them is computed with the current encoders.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import load_error, resolve_model
from retrolm.models.weights import load_weights, read_model_config, save_weights

NEG_INF = float("-inf")
MISSING = -1e4
"""log-likelihood of an answer a document does not contain (exp(MISSING) is 0 in float32)."""
COSINE_SCALE = 20.0
"""With ``normalize``: scores are cosines × this (sentence-transformers' contrastive training scale, the sharpness
MiniLM's retrieval was trained with); a softmax over bare cosines in [-1, 1] is nearly uniform."""


def marginal_log_likelihood(log_p_z: Tensor, log_p_y_given_z: Tensor) -> Tensor:
    """``log Σ_z p(z|x) p(y|z,x)`` per example: (B, K) + (B, K) → (B,), by logsumexp (``-inf`` entries allowed)."""
    return torch.logsumexp(log_p_z + log_p_y_given_z, dim=-1)


def pool(h: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """One vector per row of encoder states (B, L, H) → (B, H): the ``[CLS]`` state (``cls``) or the mean over the
    attention mask's tokens (``mean``). The query encoder, the document encoder and every index snapshot of it pool
    alike."""
    if pooling == "cls":
        return h[:, 0]
    mask = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def retrieval_vectors(h: Tensor, attention_mask: Tensor, shape: RealmShape, proj: nn.Module) -> Tensor:
    """Pooled, projected and (``shape.normalize``) L2-normalised retrieval vectors of encoder states (B, L, H) → (B, D):
    Embed_doc as it is, and Embed_input before its :data:`COSINE_SCALE`."""
    v = proj(pool(h, attention_mask, shape.pooling))
    return F.normalize(v, dim=-1) if shape.normalize else v


def retrieval_utility(log_p_y_given_z: Tensor, null_index: int = 0) -> Tensor:
    """REALM's retrieval utility per example: ``log p(y|z*,x) − log p(y|∅,x)`` for the best real document z*.

    ``log_p_y_given_z`` is (B, K) with the null document in column ``null_index``. Positive: a retrieved document
    helps the reader more than no document at all.
    """
    real = torch.cat([log_p_y_given_z[:, :null_index], log_p_y_given_z[:, null_index + 1:]], dim=1)
    return real.max(dim=1).values - log_p_y_given_z[:, null_index]


@dataclass
class RealmShape:
    """What ``model.json`` records besides the encoder's own config."""

    source: str
    """The HF encoder the three encoders were initialised from (name or folder)."""
    embed_dim: int | None = 128
    """Retrieval embedding size (a new linear projection of the pooled states); None: the hidden size, no
    projection."""
    pooling: str = "cls"
    """How Embed_input / Embed_doc pool the encoder's states: cls (REALM's ``[CLS]``) or mean (over real tokens: the
    pooling sentence-transformers encoders such as MiniLM were trained with, so that with ``embed_dim=None`` an
    untrained REALM ranks documents like the database's frozen encoder only with ``normalize``)."""
    normalize: bool = False
    """L2-normalise Embed_input and Embed_doc (the last step of a sentence-transformers encoder such as MiniLM) and
    score by cosine × :data:`COSINE_SCALE`: with ``pooling=mean`` and ``embed_dim=None`` an untrained REALM then ranks
    documents exactly as the database's frozen encoder does. Without it the inner product of unnormalised mean
    vectors favours documents with long vectors (in a check on Wikipedia passages: the same top 5 as MiniLM for 3
    of 10 queries)."""

    def __post_init__(self) -> None:
        if self.embed_dim is not None and self.embed_dim < 1:
            raise RetrolmError(f"embed_dim must be positive or null, got {self.embed_dim}")
        if self.pooling not in ("cls", "mean"):
            raise RetrolmError(f"pooling must be cls or mean, got {self.pooling!r}")


def _bare_encoder(encoder_config) -> nn.Module:
    """The HF encoder without its pooler (BERT's pooler is trained for next-sentence prediction; REALM pools
    itself); encoders built without one (DistilBERT, ELECTRA, DeBERTa) refuse the argument."""
    from transformers import AutoModel

    # float32 whatever dtype the checkpoint was saved in (its config records it): the new heads are float32
    try:
        return AutoModel.from_config(encoder_config, add_pooling_layer=False, dtype=torch.float32)
    except TypeError as e:
        if "add_pooling_layer" not in str(e):
            raise
        return AutoModel.from_config(encoder_config, dtype=torch.float32)


class MLMHead(nn.Module):
    """BERT's masked-LM transform; the decoder matrix is the reader's word embedding (tied), the bias is new."""

    def __init__(self, hidden: int, vocab: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), word_embeddings, self.bias)  # (N, L, V)


class RealmModel(nn.Module):
    """Query encoder, document encoder, null document and reader (see the module docstring).

    Build one from a Hugging Face encoder with :meth:`from_encoder`; save and reload with :meth:`save_pretrained` /
    :meth:`from_pretrained`. ``tokenizer`` is the encoder's (a ``transformers`` fast tokenizer).
    """

    def __init__(self, encoder_config, tokenizer, shape: RealmShape) -> None:
        super().__init__()
        self.shape, self.tokenizer = shape, tokenizer
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise RetrolmError(f"{shape.source}: tokenizer has no {name.removesuffix('_id')} token; REALM needs a "
                                   "BERT-style tokenizer")
        self.query_encoder = _bare_encoder(encoder_config)
        self.doc_encoder = _bare_encoder(encoder_config)
        self.reader = _bare_encoder(encoder_config)
        # DistilBERT and others have no segment embeddings (and no such argument)
        self._reads_segments = "token_type_ids" in inspect.signature(self.reader.forward).parameters
        h = encoder_config.hidden_size
        d = shape.embed_dim or h
        self.query_proj = nn.Linear(h, d) if shape.embed_dim else nn.Identity()
        self.doc_proj = nn.Linear(h, d) if shape.embed_dim else nn.Identity()
        self.null_embedding = nn.Parameter(torch.zeros(d))
        eps = getattr(encoder_config, "layer_norm_eps", 1e-12)
        self.mlm_head = MLMHead(h, encoder_config.vocab_size, eps)
        self.span_head = nn.Linear(h, 2)
        for lin in (self.query_proj, self.doc_proj, self.mlm_head.dense, self.span_head):
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    # ---- construction, saving, loading
    @classmethod
    def from_encoder(cls, ref: str = "minilm", embed_dim: int | None = 128, pooling: str = "cls",
                     normalize: bool = False) -> RealmModel:
        """Initialise the query encoder, document encoder and reader from one HF encoder (heads are new)."""
        from transformers import AutoModel, AutoTokenizer

        resolved = resolve_model(ref, "REALM encoder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
            encoder = AutoModel.from_pretrained(resolved.path, dtype=torch.float32)  # a half-precision save too
        except Exception as e:  # OSError offline / missing files, ValueError for unknown configs
            raise load_error(resolved, "a REALM encoder", e) from None
        model = cls(encoder.config, tokenizer, RealmShape(resolved.name, embed_dim, pooling, normalize))
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
        for part in (model.query_encoder, model.doc_encoder, model.reader):
            part.load_state_dict(copy.deepcopy(state), strict=False)
        return model

    def save_pretrained(self, folder: str | Path) -> None:
        """``model.safetensors`` (all parts), ``model.json`` (shape + encoder config) and the tokenizer files."""
        config = {"architecture": "realm", "source": self.shape.source, "embed_dim": self.shape.embed_dim,
                  "pooling": self.shape.pooling, "normalize": self.shape.normalize,
                  "encoder": self.query_encoder.config.to_dict()}
        save_weights(self, folder, config)
        self.tokenizer.save_pretrained(str(folder))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> RealmModel:
        """Load a folder written by :meth:`save_pretrained`, in eval mode on ``device``."""
        from transformers import AutoConfig, AutoTokenizer

        folder = Path(folder)
        config = read_model_config(folder)
        if config.get("architecture") != "realm":
            raise RetrolmError(f"{folder / 'model.json'}: not a REALM model (architecture "
                               f"{config.get('architecture')!r})")
        enc = dict(config["encoder"])
        encoder_config = AutoConfig.for_model(enc.pop("model_type"), **enc)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = cls(encoder_config, tokenizer, RealmShape(config["source"], config["embed_dim"],
                                                          config.get("pooling", "cls"), config.get("normalize", False)))
        load_weights(model, folder, device)
        return model.to(device).eval()

    @property
    def device(self) -> torch.device:
        return self.null_embedding.device

    # ---- retriever
    def tokenize(self, texts: Sequence[str], max_len: int) -> dict[str, Tensor]:
        """``[CLS] text [SEP]`` ids and attention mask, padded, on the model's device."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def embed_queries(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Embed_input(x): (B, L) → (B, D)."""
        h = self.query_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        v = retrieval_vectors(h, attention_mask, self.shape, self.query_proj)
        return v * COSINE_SCALE if self.shape.normalize else v

    def embed_documents(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Embed_doc(z): (N, L) → (N, D)."""
        h = self.doc_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return retrieval_vectors(h, attention_mask, self.shape, self.doc_proj)

    def retrieval_log_probs(self, query: Tensor, doc_embeddings: Tensor, with_null: bool = True) -> Tensor:
        """log p(z|x) over the candidates: query (B, D), doc_embeddings (B, K, D) → (B, K+1) with ∅ in column 0
        (or (B, K) without it)."""
        scores = torch.einsum("bd,bkd->bk", query, doc_embeddings)  # (B, K)
        if with_null:
            scores = torch.cat([query @ self.null_embedding.unsqueeze(1), scores], dim=1)  # (B, 1+K)
        return scores.log_softmax(dim=-1)

    # ---- reader
    def read(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Reader hidden states of ``[CLS] x [SEP] z [SEP]`` rows: (N, L) → (N, L, H)."""
        segments = {"token_type_ids": token_type_ids} if self._reads_segments else {}
        return self.reader(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state

    @property
    def max_positions(self) -> int | None:
        """The longest row the encoders take (their position embeddings), None if they have no limit."""
        return getattr(self.reader.config, "max_position_embeddings", None)

    def mlm_log_likelihood(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Σ over masked positions of log p(original token): hidden (N, L, H), labels (N, L) with -100 elsewhere →
        (N,)."""
        sel = labels != -100
        logits = self.mlm_head(hidden[sel], self.reader.get_input_embeddings().weight)  # (M, V)
        token_lp = logits.log_softmax(-1).gather(-1, labels[sel].unsqueeze(-1)).squeeze(-1)  # (M,)
        row = sel.nonzero()[:, 0]
        return torch.zeros(len(labels), dtype=token_lp.dtype, device=hidden.device).index_add(0, row, token_lp)

    def span_log_probs(self, hidden: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
        """log p(start) and log p(end) over the ``allowed`` positions (the document's tokens): (N, L) each."""
        start, end = self.span_head(hidden).unbind(-1)  # (N, L) each
        start = start.masked_fill(~allowed, NEG_INF).log_softmax(-1)
        end = end.masked_fill(~allowed, NEG_INF).log_softmax(-1)
        return start, end

    @staticmethod
    def span_log_likelihood(start_lp: Tensor, end_lp: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
        """log Σ over gold spans of p(start) p(end): starts/ends (N, S), padded with -1 → (N,); :data:`MISSING` for
        rows without a gold span (a document that does not contain the answer). Finite, not ``-inf``, so that the
        gradient of a marginal over such rows stays finite."""
        valid = starts >= 0
        s = start_lp.gather(1, starts.clamp(min=0)) + end_lp.gather(1, ends.clamp(min=0))  # (N, S)
        out = torch.logsumexp(s.masked_fill(~valid, MISSING), dim=-1)
        return torch.where(valid.any(dim=1), out, torch.full_like(out, MISSING))
