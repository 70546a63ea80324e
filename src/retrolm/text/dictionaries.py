"""Two English dictionaries as corpora: WordNet 3.0 (one document per synset) and GCIDE (one per entry).

Both ship in Debian (``wordnet-base``, ``dict-gcide``); :mod:`retrolm.text.sources` fetches them and calls the
readers here, which only parse files already on disk. They serve as a store with knowledge a small model lacks (the
definitions of rare words) and as the source of the ``dict-def`` benchmark (:mod:`retrolm.text.qa`): questions ask
WordNet's definition of a word, and the store is the other dictionary, which words its definitions differently.

* WordNet ``data.{noun,verb,adj,adv}`` lines: ``offset lexfile ss_type w_cnt word lex_id ... | gloss``. A document is
  ``{"id": "wordnet/noun/00982679", "text": "lemma, lemma (noun): gloss", "lemmas", "pos", "lexfile",
  "definition"}``; the definition is the gloss before its first quoted example.
* GCIDE is a dictd database: ``gcide.index`` lines ``headword<TAB>offset<TAB>length`` (base64 numbers) into the
  dictzip-compressed ``gcide.dict.dz``. Several headwords may point at one entry (variant spellings); an entry becomes
  one document ``{"id": "gcide/Headword", "text", "headwords"}`` (``#2``, ``#3``… for a headword's later entries),
  with the pronunciation (``\\Ab*ac"tion\\``), source tags (``[1913 Webster]``) and cross-reference braces removed
  and the accent codes (``['e]``) turned into letters.
"""

from __future__ import annotations

import gzip
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from retrolm.core.errors import RetrolmError

WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

# GCIDE's accent codes: a mark and a letter in brackets. Only the common ones are rewritten; any other stays as it is.
_MARKS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", "=": "\u0304", "~": "\u0303", '"': "\u0308", ",": "\u0327",
          ".": "\u0307"}
_LETTERS = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "ng": "ŋ", "deg": "°",
            "sect": "§", "root": "√", "imac": "ī", "aum": "ä", "th": "θ", "yogh": "ȝ"}
_ACCENT = re.compile(r"\[([A-Za-z]{2,5})\]|\[([" + re.escape("".join(_MARKS)) + r"])([A-Za-z])\]|\[([A-Za-z])\^\]")
_PRONUNCIATION = re.compile(r"\s*\\[^\\\n]*\\")  # with the space before it: Gormandize \Gor"mand*ize\,
_SPOKEN = re.compile(r"[ \t]*\([^()\n]*(?:\*|\[[a-z]{1,2}\^\]|\[[=.~'`\"^][a-z]\])[^()\n]*\)")  # (a^b*[a^]k"sh[u^]n)
_TAG = re.compile(r"[ \t]*\[[^\[\]\n]*(?:Webster|WordNet|PJC)[^\[\]\n]*\]")
_BRACES = re.compile(r"[{}]")


def _accent(m: re.Match) -> str:
    if m.group(1):
        return _LETTERS.get(m.group(1), m.group(0))
    if m.group(2):
        return unicodedata.normalize("NFC", m.group(3) + _MARKS[m.group(2)])
    return unicodedata.normalize("NFC", m.group(4) + "\u0306")  # [a^]: a breve


def clean_gcide(entry: str) -> str:
    """An entry's text without pronunciations, source tags and braces, accents as letters, paragraphs on one line."""
    text = _SPOKEN.sub("", _PRONUNCIATION.sub("", entry))
    text = _ACCENT.sub(_accent, _BRACES.sub("", _TAG.sub("", text)))
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n".join(p for p in paragraphs if p)


def _b64(value: str, where: str) -> int:
    n = 0
    for c in value:
        if c not in _B64:
            raise RetrolmError(f"{where}: {value!r} is not a dictd base64 number")
        n = n * 64 + _B64[c]
    return n


def read_gcide(index: Path, dict_dz: Path) -> Iterator[dict]:
    """GCIDE's entries as documents, in file order (see the module docstring)."""
    with gzip.open(dict_dz) as f:  # dictzip is gzip with a random-access table we do not need
        data = f.read()
    heads: dict[tuple[int, int], list[str]] = {}
    with open(index, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise RetrolmError(f"{index}:{line_no}: expected 'headword<TAB>offset<TAB>length'")
            if parts[0].startswith("00-"):  # the database's own description (00-database-url, 00-gcide-short)
                continue
            where = f"{index}:{line_no}"
            heads.setdefault((_b64(parts[1], where), _b64(parts[2], where)), []).append(parts[0])
    seen: dict[str, int] = {}
    for (offset, length), words in sorted(heads.items()):
        raw = data[offset : offset + length]
        try:
            entry = raw.decode("utf-8")
        except UnicodeDecodeError:  # three entries carry Windows-1252 quotes
            entry = raw.decode("cp1252", errors="replace")
        text = clean_gcide(entry)
        if not text:
            continue
        first = words[0]
        seen[first] = seen.get(first, 0) + 1
        doc_id = f"gcide/{first}" + (f"#{seen[first]}" if seen[first] > 1 else "")
        yield {"id": doc_id, "text": text, "headwords": list(dict.fromkeys(words))}


_ADJ_MARKER = re.compile(r"\([a-z]+\)$")  # WordNet's syntactic markers on adjectives: galore(ip)


def read_wordnet(folder: Path) -> Iterator[dict]:
    """WordNet's synsets as documents, nouns, verbs, adjectives then adverbs (see the module docstring)."""
    for name in WORDNET_POS:
        if not (folder / f"data.{name}").is_file():
            raise RetrolmError(f"{folder / f'data.{name}'}: not found (is this WordNet 3.0's dict folder?)")
    for name, pos in WORDNET_POS.items():
        path = folder / f"data.{name}"
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if line.startswith("  "):  # the licence header
                    continue
                head, bar, gloss = line.partition(" | ")
                fields = head.split()
                try:
                    count = int(fields[3], 16)
                    lemmas = [_ADJ_MARKER.sub("", w).replace("_", " ") for w in fields[4 : 4 + 2 * count : 2]]
                    offset, lexfile = fields[0], int(fields[1])
                except (IndexError, ValueError):
                    raise RetrolmError(f"{path}:{line_no}: not a WordNet data line") from None
                gloss = gloss.strip()
                if not bar or not gloss or len(lemmas) != count:
                    raise RetrolmError(f"{path}:{line_no}: not a WordNet data line")
                definition = re.split(r';\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
                yield {"id": f"wordnet/{name}/{offset}", "text": f"{', '.join(lemmas)} ({pos}): {gloss}",
                       "lemmas": lemmas, "pos": pos, "lexfile": lexfile, "definition": definition}


__all__ = ["WORDNET_POS", "clean_gcide", "read_gcide", "read_wordnet"]
