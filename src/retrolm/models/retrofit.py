"""RETRO-fitting: a frozen pretrained Hugging Face causal LM plus RETRO's neighbour encoder and chunked cross-attention.

The RETRO paper (Borgeaud et al. 2021, "Retrofitting baseline models") freezes a trained transformer, adds the
neighbour encoder and chunked cross-attention (CCA) layers, and trains only those. :class:`RetrofitModel` does that for
any Llama-style (``model.model.layers``) or GPT-2-style (``model.transformer.h``) ``AutoModelForCausalLM`` — the
decoder layer list is found generically — without re-implementing any of its internals: the new modules are attached
with forward hooks on the HF decoder layers::

    idx ─ HF embeddings ─ layer 1 … ─┬─ layer l0 ─ hook: h += CCA_l0(norm(h), E) ─ … ─ layer l1 ─ hook … ─ logits
                                     │ pre-hook on l0: H = its input hidden states
    neighbours ─ HF embeddings (frozen) ─ NeighbourEncoder(·, H of the retrieving chunk) → E (B, C, K, R, d_enc)

* A **pre-hook** on the first CCA layer captures its input hidden states and encodes the neighbours conditioned on
  them, as RETRO does. A **forward hook** on each CCA layer adds ``CCA(norm(h), E)`` to the layer's output hidden
  state (a tensor, or the first element of a tuple for older ``transformers``). The building blocks are RETRO's own
  (:class:`~retrolm.models.retro.NeighbourEncoder`, :class:`~retrolm.models.retro.ChunkedCrossAttention`), so the
  causality (position p reads the neighbours of chunk (p+1)//m − 1) is exactly RETRO's.
* **At initialisation the logits equal the base model's**, bit for bit: each CCA's output projection is zero, so the
  hooks add exact zeros. Its input projections and the encoder are random (std 0.02), so on the first step the output
  projection gets a gradient (the CCA output is not zero before the projection) and from the second step on, every new
  weight does (a zero *gate* in front of a zero projection would starve both). This is the LoRA recipe (B = 0, A
  random), which trains with the usual learning rates.
* The **base is frozen** by default (``requires_grad=False`` and kept in eval mode, so no dropout): retrieval off, the
  hooks do nothing and the output is exactly the base model's, even after training. ``unfreeze=True`` trains every
  base weight too; ``lora=True`` adds LoRA adapters (``peft``) to the base's attention projections and trains those.
* **Checkpoints** (:meth:`RetrofitModel.save_pretrained`) hold only the new weights (plus the LoRA adapters, or the
  whole base when unfrozen) and ``model.json`` names the base and the SHA-256 fingerprint of its weight files;
  :meth:`RetrofitModel.from_pretrained` reloads the base by name and refuses one whose fingerprint differs.

The model has :class:`~retrolm.models.retro.RetroModel`'s interface (``forward(idx, neighbours, neighbour_mask,
targets, cache)``, ``config.retro_layers / chunk_len / seq_len / num_neighbours / neighbour_len``, ``init_cache``,
``wte``), so the trainer, the bits-per-byte scorer, ``retrolm eval`` and ``retrolm generate`` use it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import resolve_model, weights_fingerprint
from retrolm.models.hf import load_hf_causal_lm
from retrolm.models.layers import RMSNorm
from retrolm.models.retro import ChunkedCrossAttention, ModelOutput, NeighbourEncoder, RetroConfig, check_neighbours
from retrolm.models.weights import load_weights, read_model_config, save_weights

__all__ = ["RetrofitCache", "RetrofitModel", "RetrofitModelConfig", "default_cca_layers", "find_decoder_layers"]

logger = logging.getLogger(__name__)

BASE = "base."
"""Prefix of the base model's parameter names inside :class:`RetrofitModel`."""


def default_cca_layers(n_layer: int) -> tuple[int, ...]:
    """A few upper layers: 60%, 80% and 100% of the depth (SmolLM2-135M, 30 layers: 18, 24, 30)."""
    return tuple(sorted({min(n_layer, max(1, round(n_layer * f))) for f in (0.6, 0.8, 1.0)}))


@dataclass
class RetrofitModelConfig:
    """Shape of a RETRO-fitted model: the base it wraps (name, fingerprint, dimensions) and the new modules.

    Written to ``model.json`` (with ``architecture: retrofit``); ``None`` fields are resolved in ``__post_init__``.
    """

    base: str
    """The base model's name as resolved (hub name, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``, or absolute folder);
    ``from_pretrained`` reloads the base by it."""
    base_fingerprint: str | None
    """SHA-256 of the base's weight files (``retrolm.core.hub.weights_fingerprint``); None if it had no local folder."""
    vocab_size: int
    """The base's vocabulary size."""
    n_layer: int
    """Decoder layers of the base."""
    d_model: int
    """Hidden size of the base (the width CCA reads and writes)."""
    n_head: int
    """Attention heads of the CCA layers (default: the base's)."""
    seq_len: int = 512
    """Longest sequence the model accepts (training length; a multiple of chunk_len; at most the base's context)."""
    chunk_len: int = 64
    """m: tokens per retrieval chunk (the database's)."""
    num_neighbours: int = 2
    """k: neighbours per chunk in training."""
    neighbour_len: int | None = None
    """R: tokens per neighbour (chunk + continuation); None → 2·chunk_len."""
    retro_layers: tuple[int, ...] | None = None
    """1-indexed base layers followed by chunked cross-attention; None → ``default_cca_layers(n_layer)``."""
    enc_n_layer: int = 2
    """Layers of the neighbour encoder."""
    enc_d_model: int | None = None
    """Encoder width; None → min(256, d_model)."""
    enc_n_head: int | None = None
    """Encoder heads; None → enc_d_model // 64 (at least 1)."""
    dropout: float = 0.0
    """Dropout inside the new modules."""
    unfreeze: bool = False
    """Train the base's weights too (checkpoints then hold them)."""
    lora: bool = False
    """Add LoRA adapters to the base (``peft``) and train them."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: tuple[str, ...] | None = None
    """Module names (suffixes) that get adapters; None → every linear projection inside the base's attention."""

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise RetrolmError(f"retrofit config: {msg}")

        self.neighbour_len = 2 * self.chunk_len if self.neighbour_len is None else self.neighbour_len
        if self.retro_layers is None:
            self.retro_layers = default_cca_layers(self.n_layer)
        self.retro_layers = tuple(int(i) for i in self.retro_layers)
        check(
            len(self.retro_layers) > 0 and list(self.retro_layers) == sorted(set(self.retro_layers))
            and all(1 <= i <= self.n_layer for i in self.retro_layers),
            f"cca layers {list(self.retro_layers)} must be increasing, 1-indexed layers within 1..{self.n_layer} "
            "(the base's layers)",
        )
        self.enc_d_model = min(256, self.d_model) if self.enc_d_model is None else self.enc_d_model
        self.enc_n_head = max(1, self.enc_d_model // 64) if self.enc_n_head is None else self.enc_n_head
        check(not (self.unfreeze and self.lora), "unfreeze and lora are exclusive (LoRA adapts a frozen base)")
        check(self.lora_r > 0, f"lora_r must be positive, got {self.lora_r}")
        check(self.seq_len > 0 and self.seq_len % self.chunk_len == 0,
              f"seq_len {self.seq_len} must be a positive multiple of chunk_len {self.chunk_len}")
        if self.lora_target_modules is not None:
            self.lora_target_modules = tuple(self.lora_target_modules)
        self.retro_config()  # validates the new modules' shapes (one-line errors)

    def retro_config(self) -> RetroConfig:
        """The RetroConfig that sizes the encoder and the CCA layers (d_model and heads of the base)."""
        return RetroConfig(
            vocab_size=self.vocab_size, seq_len=self.seq_len, n_layer=self.n_layer, n_head=self.n_head,
            d_model=self.d_model, dropout=self.dropout, chunk_len=self.chunk_len, num_neighbours=self.num_neighbours,
            neighbour_len=self.neighbour_len, retro_layers=self.retro_layers, enc_n_layer=self.enc_n_layer,
            enc_d_model=self.enc_d_model, enc_n_head=self.enc_n_head, tie_embeddings=False,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrofitModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RetrolmError(f"retrofit config: unknown field(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list of an HF causal LM (``model.layers``, ``transformer.h``, ``gpt_neox.layers`` …): the
    ``nn.ModuleList`` with ``num_hidden_layers`` entries holding the most parameters."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n:
        lists = [(name, m) for name, m in lists if len(m) == n] or lists
    if not lists:
        raise RetrolmError(f"{type(model).__name__}: no decoder layer list found (no nn.ModuleList of layers)")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _attention_projections(layer: nn.Module) -> tuple[str, ...]:
    """Names (relative to a decoder layer) of the linear projections of its attention, e.g. ``self_attn.q_proj``."""
    out = []
    for name, mod in layer.named_modules():
        parts = name.split(".")
        linear = isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"  # GPT-2's Conv1D is a linear layer
        if linear and any("attn" in p or "attention" in p for p in parts[:-1]):
            out.append(name)
    return tuple(out)


def _base_dims(hf: nn.Module) -> dict[str, int]:
    cfg = hf.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        return {"vocab_size": int(cfg.vocab_size), "d_model": int(cfg.hidden_size),
                "n_head": int(cfg.num_attention_heads)}
    except (AttributeError, TypeError) as e:
        raise RetrolmError(f"{type(hf).__name__}: cannot read the base's vocab/hidden size/heads ({e})") from None


def _context_len(hf: nn.Module) -> int | None:
    cfg = hf.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


@dataclass
class RetrofitCache:
    """Generation state of a :class:`RetrofitModel`: the tokens fed so far, in a buffer of ``max_len`` tokens.

    Deliberately simple (no KV cache): every call runs the full forward pass over the whole buffer — the tokens fed so
    far, then padding that causality keeps out of their logits — and returns the logits of the new positions. Each call
    therefore does exactly the computation of a full forward over ``max_len`` tokens, and the logits equal that pass's
    bit for bit; the price is one ``max_len``-token forward per generated token, fine for the ≤ seq_len-token
    continuations ``retrolm generate`` produces, but not a fast decoder.
    """

    tokens: Tensor
    """(B, max_len) token ids; the first ``pos`` columns are valid."""
    pos: int = 0
    """Number of tokens consumed so far (the position of the next token)."""

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]


class _CrossBlock(nn.Module):
    """One inserted CCA: ``h + drop(CCA(norm(h), E))``; its output projection starts at zero."""

    def __init__(self, rcfg: RetroConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(rcfg.d_model, rcfg.norm_eps)
        self.cca = ChunkedCrossAttention(rcfg)
        self.drop = nn.Dropout(rcfg.dropout)

    def forward(self, h: Tensor, enc: Tensor, enc_mask: Tensor) -> Tensor:
        y = self.cca(self.norm(h), enc, enc_mask)
        return h + self.drop(y).to(h.dtype)


@dataclass
class _Run:
    """What the hooks of one forward pass read: the neighbours, then (after the first CCA layer's pre-hook) E."""

    neighbours: Tensor
    mask: Tensor
    encoded: tuple[Tensor, Tensor] | None = None


class RetrofitModel(nn.Module):
    """A pretrained HF causal LM with RETRO's neighbour encoder and chunked cross-attention attached by hooks.

    Build one with :meth:`from_base` (by model reference) or ``RetrofitModel(hf_model, config)``; load a checkpoint
    with :meth:`from_pretrained`. See the module docstring for the design.
    """

    def __init__(self, hf: nn.Module, config: RetrofitModelConfig) -> None:
        super().__init__()
        dims = _base_dims(hf)
        for key, value in dims.items():
            if key != "n_head" and getattr(config, key) != value:
                raise RetrolmError(f"{config.base}: the base has {key}={value}, the retrofit config "
                                   f"{getattr(config, key)}")
        self.config = config
        self.base = hf
        path, layers = find_decoder_layers(hf)
        if len(layers) != config.n_layer:
            raise RetrolmError(f"{config.base}: the base has {len(layers)} decoder layers ({path}), the retrofit "
                               f"config {config.n_layer}")
        ctx = _context_len(hf)
        if ctx is not None and config.seq_len > ctx:
            raise RetrolmError(f"seq_len {config.seq_len} exceeds the base's context of {ctx} tokens")
        emb = hf.get_input_embeddings()
        if emb is None or emb.weight.shape[1] != config.d_model:
            raise RetrolmError(f"{config.base}: token embeddings are not of the hidden size {config.d_model}")

        rcfg = config.retro_config()
        self.encoder = NeighbourEncoder(rcfg)
        self.cca = nn.ModuleDict({str(i): _CrossBlock(rcfg) for i in config.retro_layers})
        self._init_new_weights(rcfg)

        self.base.requires_grad_(config.unfreeze)
        if config.lora:
            self._add_lora(layers)
        self._layers = list(layers)  # not registered again: they are the base's own modules
        self._run: _Run | None = None
        self._hooks = [self._layers[config.retro_layers[0] - 1].register_forward_pre_hook(self._encode_hook,
                                                                                           with_kwargs=True)]
        for i in config.retro_layers:
            # bound methods (not closures), so that a deep copy's hooks call the copy
            self._hooks.append(self._layers[i - 1].register_forward_hook(functools.partial(self._cca_hook, str(i))))
        self.train(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  **options: Any) -> RetrofitModel:
        """Load the base LM ``ref`` (folder, short name such as ``smollm2-135m``, or hub name) and attach new modules
        shaped by ``options`` (the :class:`RetrofitModelConfig` fields other than the base's)."""
        resolved = resolve_model(ref, what="base model")
        fingerprint = weights_fingerprint(resolved.path) if resolved.local else None
        hf = load_hf_causal_lm(resolved, "cpu", dtype)
        dims = _base_dims(hf)
        config = RetrofitModelConfig(base=resolved.name, base_fingerprint=fingerprint,
                                     n_layer=len(find_decoder_layers(hf)[1]), **dims, **options)
        return cls(hf, config).to(device)

    def _init_new_weights(self, rcfg: RetroConfig) -> None:
        """RETRO's init for the encoder and CCA (N(0, 0.02), residual projections scaled down), then every CCA output
        projection at zero: the model starts exactly at the base."""
        for module, n_layer in ((self.encoder, max(1, rcfg.enc_n_layer)), (self.cca, len(self.config.retro_layers))):
            for name, p in module.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, mean=0.0, std=std)
                elif name.endswith(".bias"):
                    nn.init.zeros_(p)
        for block in self.cca.values():
            nn.init.zeros_(block.cca.attn.proj.weight)
            if block.cca.attn.proj.bias is not None:
                nn.init.zeros_(block.cca.attn.proj.bias)

    def _add_lora(self, layers: nn.ModuleList) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:  # pragma: no cover - peft is a dependency of retrofitting
            raise RetrolmError(f"lora=true needs the peft package ({e})") from None
        cfg = self.config
        targets = cfg.lora_target_modules or _attention_projections(layers[0])
        if not targets:
            raise RetrolmError(f"{cfg.base}: no attention projections found for LoRA; set lora_target_modules")
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(targets))
        try:
            inject_adapter_in_model(lora, self.base)
        except ValueError as e:  # no module matched
            raise RetrolmError(f"{cfg.base}: LoRA ({str(e).splitlines()[0]})") from None
        for name, p in self.base.named_parameters():
            p.requires_grad_("lora_" in name)

    # ------------------------------------------------------------------ properties
    @property
    def wte(self) -> nn.Embedding:
        """The base's (frozen unless unfreeze) token embeddings, which the neighbour encoder also reads."""
        return self.base.get_input_embeddings()

    @property
    def base_frozen(self) -> bool:
        return not (self.config.unfreeze or self.config.lora)

    def train(self, mode: bool = True) -> RetrofitModel:
        """A frozen base stays in eval mode (no dropout): its output is the pretrained model's, exactly."""
        super().train(mode)
        if self.base_frozen:
            self.base.train(False)
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of the whole model (shared ones once); ``non_embedding`` leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def num_new_params(self) -> int:
        """Parameters of the neighbour encoder and the CCA layers."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(BASE))

    def _saved(self, name: str) -> bool:
        """Whether a parameter goes into checkpoints: the new ones, plus what of the base is trained."""
        if not name.startswith(BASE):
            return True
        return self.config.unfreeze or (self.config.lora and "lora_" in name)

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, folder: str | Path) -> None:
        """Write the new weights (+ LoRA adapters or, unfrozen, the base's weights) and ``model.json`` to ``folder``."""
        tensors = {n: p for n, p in self.named_parameters() if self._saved(n)}  # tied weights once
        save_weights(self, folder, {"architecture": "retrofit", **self.config.to_dict()}, tensors)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> RetrofitModel:
        """Reload the base by its recorded name (refusing other weights), attach the new modules, load their weights."""
        folder = Path(folder)
        data = read_model_config(folder)
        data.pop("architecture", None)
        config = RetrofitModelConfig.from_dict(data)
        resolved = resolve_model(config.base, what="base model")
        check_fingerprint(folder, config, weights_fingerprint(resolved.path) if resolved.local else None)
        model = cls(load_hf_causal_lm(resolved, "cpu"), config)
        model.load_trained_weights(folder, device)
        return model.to(device).eval()

    def load_trained_weights(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        """Load what :meth:`save_pretrained` wrote into this model (same base: its fingerprint is checked)."""
        folder = Path(folder)
        check_fingerprint(folder, RetrofitModelConfig.from_dict(
            {k: v for k, v in read_model_config(folder).items() if k != "architecture"}), self.config.base_fingerprint)
        missing = load_weights(self, folder, device, strict=False)
        params = dict(self.named_parameters())  # a tied weight under its first name only
        lost = [n for n in missing if n in params and self._saved(n)]
        if lost:
            raise RetrolmError(f"{Path(folder) / 'model.safetensors'}: misses trained weights: {', '.join(lost[:5])}")

    # ------------------------------------------------------------------ forward
    def init_cache(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> RetrofitCache:
        """Empty generation state for ``batch_size`` sequences of up to ``max_len`` (default seq_len) tokens
        (``dtype`` is accepted for RetroModel's signature; the cache holds token ids)."""
        max_len = self.config.seq_len if max_len is None else max_len
        if not 0 < max_len <= self.config.seq_len:
            raise RetrolmError(f"init_cache: max_len={max_len} must be in 1..seq_len={self.config.seq_len}")
        device = device or self.wte.weight.device
        return RetrofitCache(tokens=torch.zeros(batch_size, max_len, dtype=torch.long, device=device))

    def forward(
        self,
        idx: Tensor,
        neighbours: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
        targets: Tensor | None = None,
        cache: RetrofitCache | None = None,
    ) -> ModelOutput:
        """Next-token logits for ``idx`` (B, T), reading ``neighbours`` (B, C, K, R) where causality allows.

        The contract of :meth:`retrolm.models.retro.RetroModel.forward`: ``neighbours[:, u]`` were retrieved with chunk
        u and are read by positions ≥ (u+1)·m − 1; ids < 0 and ``neighbour_mask`` False are padding; None → retrieval
        off, exactly the base model's output; ``targets`` -100 are ignored. With a ``cache`` (:meth:`init_cache`),
        ``idx`` continues the cached tokens and only its positions' logits are returned (the forward pass covers the
        whole buffer: see :class:`RetrofitCache`); chunks not complete after ``idx`` read no neighbours yet.
        """
        if idx.dim() != 2:
            raise RetrolmError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        limit = self.config.seq_len if cache is None else cache.max_len
        if T == 0 or start + T > limit:
            raise RetrolmError(f"sequence positions [{start}, {start + T}) exceed the model/cache length {limit}")
        neighbours, neighbour_mask = check_neighbours(B, neighbours, neighbour_mask, self.config.neighbour_len)
        full = idx
        if cache is not None:
            cache.tokens[:, start : start + T] = idx
            full = cache.tokens  # the whole buffer: the same computation as a full forward over max_len tokens
            if neighbours is not None:  # chunks that are not complete yet read nothing (their tokens are not known)
                done = (start + T) // self.config.chunk_len
                neighbours, neighbour_mask = neighbours[:, :done], neighbour_mask[:, :done]
        self._run = _Run(neighbours, neighbour_mask) if neighbours is not None else None
        try:
            logits = self.base(input_ids=full, use_cache=False).logits
        finally:
            self._run = None
        if cache is not None:
            logits = logits[:, start : start + T]
            cache.pos += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def _encode_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the first CCA layer: encode every complete chunk's neighbours, conditioned on the chunk's
        hidden states at this layer's input; chunks without neighbours get an all-False mask (CCA reads nothing)."""
        run = self._run
        if run is None:
            return None
        h = self._hidden(args, kwargs)
        m = self.config.chunk_len
        B, T, _ = h.shape
        n_chunks = T // m  # complete chunks: the attending chunks of positions m−1 … T−1
        n_new = min(n_chunks, run.neighbours.shape[1])
        if n_new == 0:
            return None
        nb, nm = run.neighbours[:, :n_new], run.mask[:, :n_new]
        chunk_h = rearrange(h[:, : n_new * m], "b (c m) d -> b c m d", m=m)
        enc = self.encoder(self.wte(nb).to(chunk_h.dtype), nm, chunk_h)  # (B, n_new, K, R, d_enc)
        if n_chunks > n_new:  # chunks retrieved nothing for
            enc = torch.cat([enc, enc.new_zeros(B, n_chunks - n_new, *enc.shape[2:])], dim=1)
            nm = torch.cat([nm, nm.new_zeros(B, n_chunks - n_new, *nm.shape[2:])], dim=1)
        run.encoded = (enc, nm)
        return None

    def _cca_hook(self, key: str, module: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook of CCA layer ``key``: its output hidden state h becomes h + CCA(norm(h), E)."""
        run = self._run
        if run is None or run.encoded is None:
            return None  # retrieval off (or nothing to read yet): the base's output, untouched
        block = self.cca[key]
        if isinstance(output, Tensor):
            return block(output, *run.encoded)
        if isinstance(output, (tuple, list)):  # older transformers: (hidden_states, *extras)
            return type(output)((block(output[0], *run.encoded), *output[1:]))
        raise RetrolmError(f"{type(module).__name__}: unexpected decoder layer output {type(output).__name__}")


def check_fingerprint(folder: Path, config: RetrofitModelConfig, found: str | None) -> None:
    """A checkpoint reads only the base it was trained on: same weight files (when both fingerprints are known)."""
    recorded = config.base_fingerprint
    if recorded is None:
        logger.warning("%s: no base fingerprint recorded; cannot check that %s is the base it was trained on",
                       folder, config.base)
        return
    if found != recorded:
        raise RetrolmError(f"{folder}: trained on base {config.base} with weights {recorded[:12]}…, but that base "
                           f"now has {'no local weights' if found is None else f'weights {found[:12]}…'}; "
                           "restore the original base model")
