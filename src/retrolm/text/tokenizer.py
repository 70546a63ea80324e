"""The language model's tokenizer: a Hugging Face ``tokenizers`` BPE, loaded or trained on the corpus.

A database owns its tokenizer (saved as ``tokenizer.json`` inside it), because chunk tokens, neighbour
tokens and the language model trained on them must all agree on the vocabulary.

``spec`` strings accepted by :func:`resolve_tokenizer`:

* ``train:N`` — train a byte-level BPE with vocabulary N on the corpus being built (the offline default);
* a path to a ``tokenizer.json`` file, or to a folder containing one (e.g. another database);
* a retrolm checkpoint folder (it carries the tokenizer its model was trained with);
* a Hugging Face model name, short name or folder (see :mod:`retrolm.core.hub`; e.g. ``smollm2-135m``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import find_checkpoint, resolve_model
from retrolm.core.io import write_bytes

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
PIECE_CHARS = 1 << 16
"""Texts longer than this are tokenized (and trained on) in pieces cut before a space (a pre-token boundary), so a
20 MB one-line document costs tens of MB of tokenizer memory instead of gigabytes, and gets the same ids."""


def _pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters, each cut placed before a space that follows a non-space
    character (where byte-level BPE pre-tokenization starts a new word anyway); no such place → a hard cut."""
    out, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = end
        while cut >= start + size // 2 and not (text[cut] == " " and not text[cut - 1].isspace()):
            cut -= 1
        if cut < start + size // 2:  # no such place in the second half: a hard cut
            cut = end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte → the printable character its tokens spell it with."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


REPLACEMENT = "\ufffd"
"""What decoding puts for bytes that are not a whole UTF-8 character."""


def missing_bytes(data: bytes) -> int:
    """How many continuation bytes the last character of ``data`` lacks (0 when it is complete)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # the last character's first byte: its high bits give its length
            size = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return max(0, size - back)
    return 0


def continuation_prefix(data: bytes, limit: int) -> int:
    """How many of the first ``limit`` bytes of ``data`` are UTF-8 continuation bytes (10xxxxxx), in a row."""
    n = 0
    while n < min(limit, len(data)) and data[n] & 0xC0 == 0x80:
        n += 1
    return n


def _pieces_are_exact(spec: dict) -> bool:
    """Whether encoding a text in :func:`_pieces` gives the ids of the whole: true for byte-level BPE (GPT-2,
    SmolLM2, Llama 3, ``train:N``), where a space starts a pre-token anyway; not where the normalizer or a
    Metaspace pre-tokenizer marks the start of the text (Llama 2, Mistral: "▁" prepended), which every piece would
    get (a space added per cut). ``spec``: the tokenizer.json."""

    def types(node: object) -> set[str]:
        if isinstance(node, dict):
            return {str(node.get("type"))} | {t for v in node.values() for t in types(v)}
        if isinstance(node, list):
            return {t for v in node for t in types(v)}
        return set()

    pre, norm = types(spec.get("pre_tokenizer")), types(spec.get("normalizer"))
    return "ByteLevel" in pre and "Metaspace" not in pre and "Prepend" not in norm


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>", "<end_of_turn>")
"""Special tokens that end a chat turn or a text in common formats (ChatML, Llama 3, Phi, Llama 2, GPT-2, Gemma)."""


class LMTokenizer:
    """A thin, typed wrapper around :class:`tokenizers.Tokenizer` with the ids retrolm needs."""

    def __init__(self, tokenizer: Tokenizer, name: str, eos_token: str | None = None, pad_token: str | None = None):
        # Documents are chunked by us: a tokenizer.json that truncates or pads would silently drop or add tokens.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        # Document text is text: "<|endoftext|>" or "<filename>" written in a document (kernel 6.1's
        # kbuild/modules.rst has the latter, SmolLM2's vocabulary the special token) are its characters, not a special
        # token that would end the document in training and vanish from decoded chunk text. Prompts rendered from a
        # chat template go through encode_prompt instead. (Not saved in tokenizer.json: its hash does not change.)
        tokenizer.encode_special_tokens = True
        self.tok = tokenizer
        self.name = name
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        # Documents end with "<|endoftext|>" where the vocabulary has it (GPT-2, SmolLM2: the separator of pre-training
        # documents), else with the tokenizer's own EOS (an instruct model's is the end of a chat turn).
        eos = tokenizer.token_to_id(EOS_TOKEN)
        own_eos = tokenizer.token_to_id(eos_token) if eos_token else None
        self.eos_id: int | None = eos if eos is not None else own_eos
        # Generation stops at either, and at the end-of-turn markers of common chat formats: an instruct model
        # (SmolLM2's "<|im_end|>") ends its answer with one, and past it writes turns of its own
        added = tokenizer.get_added_tokens_decoder()
        turn_ends = {i for i, t in added.items() if t.special and t.content in END_OF_TURN}
        self.stop_ids: frozenset[int] = frozenset({i for i in (self.eos_id, own_eos) if i is not None} | turn_ends)
        """Token ids that end a generated text."""
        pad = tokenizer.token_to_id(pad_token or PAD_TOKEN)
        # A tokenizer without a pad token pads with EOS; padded positions are always masked anyway.
        self.pad_id: int = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def __setstate__(self, state: dict) -> None:
        # A Rust tokenizer is pickled as its JSON, which leaves encode_special_tokens out: a copy sent to a worker
        # process would parse "<|endoftext|>" in a document as the special token again.
        self.__dict__.update(state)
        self.tok.encode_special_tokens = True

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        """Token ids for each text, without special tokens (parallel in Rust). A text over ``PIECE_CHARS`` is encoded
        in pieces (byte-level tokenizers only) and its ids come back as a uint32 array (a list of 10M Python ints
        would take ~400 MB)."""
        if all(len(t) <= PIECE_CHARS for t in texts) or not self._pieces_safe:
            return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
        return [self._encode_long(t) if len(t) > PIECE_CHARS else self.encode(t) for t in texts]

    def _encode_long(self, text: str) -> np.ndarray:
        parts = [np.asarray(self.tok.encode(piece, add_special_tokens=False).ids, dtype=np.uint32)
                 for piece in _pieces(text)]
        return np.concatenate(parts)

    def encode(self, text: str) -> list[int]:
        if len(text) <= PIECE_CHARS or not self._pieces_safe:
            return self.tok.encode(text, add_special_tokens=False).ids
        return self._encode_long(text).tolist()

    def encode_prompt(self, text: str, contents: Sequence[str] = ()) -> list[int]:
        """Ids of a prompt rendered from a chat template, as the model's own tokenizer encodes it (the template's
        special tokens, ``<|im_start|>`` and the like, parsed as such), except that inside ``contents`` (the messages'
        text, in the order the template renders them: questions and passages from users and documents) a
        special-token string stays characters, as :meth:`encode` keeps it: a passage quoting ``<|im_end|>`` cannot
        end its turn. A content is found verbatim or stripped (templates that trim messages); one not found is
        parsed as the template is, with a warning."""
        enc = self._prompt_tok.encode(text, add_special_tokens=False)
        if not any(c and self._special_re.search(c) for c in contents):
            return enc.ids  # the usual case
        inside, cursor = [], 0
        for c in contents:  # in order, each searched after the last (template text before it cannot be claimed)
            quoted = bool(c and self._special_re.search(c))
            for form in (c, c.strip()):
                at = text.find(form, cursor) if form else -1
                if at >= 0:
                    if quoted:
                        inside.append((at, at + len(form)))
                    cursor = at + len(form)
                    break
            else:
                if not quoted:
                    continue
                logger.warning("%s: a message holding a special-token string is not in the rendered prompt as "
                               "written: its special-token strings are read as special tokens", self.name)
        ids: list[int] = []
        special = set(self._special_ids.values())
        # the template's tokenization is kept; only the special tokens a message wrote become their characters' ids
        for i, (a, b) in zip(enc.ids, enc.offsets, strict=True):
            if i in special and any(lo <= a and b <= hi for lo, hi in inside):
                ids += self.encode(text[a:b])
            else:
                ids.append(i)
        return ids

    @functools.cached_property
    def _special_ids(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @functools.cached_property
    def _special_re(self) -> re.Pattern[str]:
        names = sorted(self._special_ids, key=len, reverse=True)  # the longest first: "<|im_end|>" before "<|im"
        return re.compile("|".join(map(re.escape, names))) if names else re.compile(r"(?!)")

    @functools.cached_property
    def _prompt_tok(self) -> Tokenizer:
        """The same tokenizer parsing special tokens in its input (a copy: the document one stays literal)."""
        tok = Tokenizer.from_str(self.tok.to_str())
        tok.encode_special_tokens = False
        return tok

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def decode_cut(self, ids: Sequence[int]) -> str:
        """The text of a slice cut out of a token stream (a passage cut to a length, a window of a document): a
        character whose bytes the cut splits (byte-level tokens) is left out at either end, instead of a U+FFFD."""
        if not self.byte_level:  # byte-fallback tokens decode a split character to U+FFFD
            return self.decode(ids).strip("\ufffd")
        data = self.token_bytes(ids) or b""
        data = data[continuation_prefix(data, 3):]
        tail = 0  # bytes of a last character whose end was cut off
        for back in range(1, min(4, len(data)) + 1):
            b = data[-back]
            if b & 0xC0 != 0x80:  # the last character's first byte: 110xxxxx needs 2 bytes, 1110xxxx 3, 11110xxx 4
                need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
                tail = back if back < need else 0
                break
        return data[: len(data) - tail].decode("utf-8", errors="replace")

    def decode_spans(self, spans: Sequence[Sequence[int]]) -> list[str]:
        """The texts of consecutive spans of one token stream (generated chunks), joining to the whole's text: a
        character whose bytes a span boundary splits (byte-level tokens) is whole in the span it starts in, instead
        of a U+FFFD on each side."""
        if len(spans) < 2:
            return [self.decode(s) for s in spans]
        if not self.byte_level:  # each span's text as what it adds to the decoded stream (a Metaspace "▁" is a
            out, done, ids = [], "", []  # space only inside a text: decoded alone, a span loses its first one)
            for s in spans:
                ids += list(s)
                text = self.decode(ids)
                out.append(text[len(done):] if text.startswith(done) else self.decode(s))
                done = text
            return out
        data = [self.token_bytes(s) or b"" for s in spans]
        whole = b"".join(data)
        ends = np.cumsum([len(d) for d in data]).tolist()
        out, start = [], 0
        for j, end in enumerate(ends):
            if j < len(ends) - 1:  # past the continuation bytes (at most 3) of a character begun before the cut
                end += continuation_prefix(whole[end : end + 3], 3)
            out.append(whole[start:end].decode("utf-8", errors="replace"))
            start = max(start, end)
        return out

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self.tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=True)

    # what only long texts and split characters need, from the tokenizer.json parsed once, on first use
    @functools.cached_property
    def _spec(self) -> dict:
        return json.loads(self.tok.to_str())

    @functools.cached_property
    def _pieces_safe(self) -> bool:
        return _pieces_are_exact(self._spec)

    @functools.cached_property
    def byte_level(self) -> bool:
        """Whether tokens are byte strings (GPT-2-style byte-level BPE): :meth:`token_bytes` works."""
        return (self._spec.get("decoder") or {}).get("type") == "ByteLevel"

    @functools.cached_property
    def _byte_table(self) -> dict[int, bytes]:
        to_byte = {c: b for b, c in _byte_level_alphabet().items()}
        added = self.tok.get_added_tokens_decoder()
        table: dict[int, bytes] = {}
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i in added:  # decoded as their text, unless special (decode skips those)
                table[i] = b"" if added[i].special else added[i].content.encode()
            elif all(c in to_byte for c in token):
                table[i] = bytes(to_byte[c] for c in token)
        return table

    def token_bytes(self, ids: Sequence[int]) -> bytes | None:
        """The UTF-8 bytes the tokens stand for (special tokens dropped, as :meth:`decode` drops them), for a
        byte-level tokenizer; None for any other (its tokens are not byte strings)."""
        if not self.byte_level:
            return None
        return b"".join(self._byte_table.get(int(i), b"") for i in ids)

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
    # long texts in pieces, as encode() does: the same words are counted, without gigabytes for a one-line document
    tok.train_from_iterator((piece for text in texts for piece in _pieces(text)), trainer=trainer)
    return LMTokenizer(tok, f"bpe-trained-{vocab_size}")


MAX_TRAINED_VOCAB = 1 << 24
"""The largest vocabulary ``train:N`` trains (16.8M; language models use 32k-256k)."""


def parse_train_spec(spec: str) -> int | None:
    """``"train:8192"`` → 8192; anything else → None."""
    if not spec.startswith("train:"):
        return None
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        n = 0
    if not 300 <= n <= MAX_TRAINED_VOCAB:  # past the top the trainer failed with an OverflowError after reading
        raise RetrolmError(f"--tokenizer {spec!r}: expected train:N with a vocabulary size 300 <= N <= "
                           f"{MAX_TRAINED_VOCAB:,}")
    return n


def _special_tokens(folder: Path) -> dict[str, str]:
    """EOS and pad tokens named by a Hugging Face ``tokenizer_config.json`` (the LM's own end-of-text)."""
    cfg_path = folder / "tokenizer_config.json"
    if not cfg_path.is_file():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}

    def token(key: str) -> str | None:
        value = cfg.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return {k: v for k, v in (("eos_token", token("eos_token")), ("pad_token", token("pad_token"))) if v}


def load_tokenizer(spec: str) -> LMTokenizer:
    """Load an existing tokenizer: a tokenizer.json, a folder holding one (database, checkpoint, HF model), or a
    Hugging Face name / short name."""
    path = Path(spec).expanduser()
    if path.is_file():
        return LMTokenizer.from_file(path, name=spec)
    if path.is_dir():
        path = find_checkpoint(path) or path  # a run folder → its newest checkpoint
    else:
        ref = resolve_model(spec, what="tokenizer")
        path, spec = Path(ref.path), ref.name
        if not ref.local:
            return _hub_tokenizer(spec)
    if (path / "tokenizer.json").is_file():
        tok = LMTokenizer.from_file(path / "tokenizer.json", name=spec)
        special = _special_tokens(path)
        return LMTokenizer(tok.tok, spec, **special) if special else tok
    if (path / "model.json").is_file() or (path / "meta.json").is_file():  # retrolm's own folders always hold one
        what = "checkpoint" if (path / "model.json").is_file() else "database"
        raise RetrolmError(f"{path}: {what} has no tokenizer.json (restore it from a copy, or from the database the "
                           "model was trained on)")
    return _hub_tokenizer(str(path))


def _hub_tokenizer(spec: str) -> LMTokenizer:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # OSError offline, ValueError for unknown types
        raise RetrolmError(
            f"{spec}: cannot load as a tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise RetrolmError(f"{spec}: only fast (Rust) tokenizers are supported")
    return LMTokenizer(backend, name=spec, eos_token=hf.eos_token, pad_token=hf.pad_token)


def resolve_tokenizer(spec: str, texts: Iterable[str] | None = None) -> LMTokenizer:
    """Train (``train:N``, needs ``texts``) or load a tokenizer."""
    vocab = parse_train_spec(spec)
    if vocab is None:
        return load_tokenizer(spec)
    if texts is None:
        raise RetrolmError(f"--tokenizer {spec!r}: training needs the corpus texts")
    logger.info("training a byte-level BPE tokenizer with %d entries on the corpus", vocab)
    return train_bpe(texts, vocab)
