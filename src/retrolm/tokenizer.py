"""The language model's tokenizer: a Hugging Face ``tokenizers`` BPE, loaded or trained on the corpus.

A database owns its tokenizer (saved as ``tokenizer.json`` inside it), because chunk tokens, neighbour
tokens and the language model trained on them must all agree on the vocabulary.

``spec`` strings accepted by :func:`resolve_tokenizer`:

* ``train:N`` — train a byte-level BPE with vocabulary N on the corpus being built (the offline default);
* a path to a ``tokenizer.json`` file, or to a folder containing one (e.g. another database);
* a Hugging Face model name or folder (loaded with ``transformers.AutoTokenizer``; needs the hub or a cache).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from retrolm.errors import RetrolmError
from retrolm.fsutil import write_bytes

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class LMTokenizer:
    """A thin, typed wrapper around :class:`tokenizers.Tokenizer` with the ids retrolm needs."""

    def __init__(self, tokenizer: Tokenizer, name: str):
        # Documents are chunked by us: a tokenizer.json that truncates or pads would silently drop or add tokens.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tok = tokenizer
        self.name = name
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id: int | None = tokenizer.token_to_id(EOS_TOKEN)
        pad = tokenizer.token_to_id(PAD_TOKEN)
        # A tokenizer without a pad token pads with EOS; padded positions are always masked anyway.
        self.pad_id: int = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids for each text, without special tokens (parallel in Rust)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self.tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        write_bytes(path, self.tok.to_str(pretty=False).encode())

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> LMTokenizer:
        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise RetrolmError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(tok, name or str(path))


def train_bpe(texts: Iterable[str], vocab_size: int) -> LMTokenizer:
    """Train a GPT-2-style byte-level BPE (lossless on any UTF-8 text) with ``vocab_size`` entries."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return LMTokenizer(tok, f"bpe-trained-{vocab_size}")


def parse_train_spec(spec: str) -> int | None:
    """``"train:8192"`` → 8192; anything else → None."""
    if not spec.startswith("train:"):
        return None
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 300:
        raise RetrolmError(f"--tokenizer {spec!r}: expected train:N with a vocabulary size N >= 300")
    return n


def load_tokenizer(spec: str) -> LMTokenizer:
    """Load an existing tokenizer (file, folder, or Hugging Face name)."""
    path = Path(spec)
    if path.is_file():
        return LMTokenizer.from_file(path, name=spec)
    if (path / "tokenizer.json").is_file():
        return LMTokenizer.from_file(path / "tokenizer.json", name=spec)
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # OSError offline, ValueError for unknown types
        raise RetrolmError(
            f"--tokenizer {spec!r}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise RetrolmError(f"--tokenizer {spec!r}: only fast (Rust) tokenizers are supported")
    return LMTokenizer(backend, name=spec)


def resolve_tokenizer(spec: str, texts: Iterable[str] | None = None) -> LMTokenizer:
    """Train (``train:N``, needs ``texts``) or load a tokenizer."""
    vocab = parse_train_spec(spec)
    if vocab is None:
        return load_tokenizer(spec)
    if texts is None:
        raise RetrolmError(f"--tokenizer {spec!r}: training needs the corpus texts")
    logger.info("training a byte-level BPE tokenizer with %d entries on the corpus", vocab)
    return train_bpe(texts, vocab)
