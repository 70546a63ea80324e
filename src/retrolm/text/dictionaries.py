"""Two English dictionaries as corpora: WordNet 3.0 (one document per synset) and GCIDE (one per entry).

Both ship in Debian (``wordnet-base``, ``dict-gcide``); :mod:`retrolm.text.sources` fetches them and calls the
readers here, which only parse files already on disk. They serve as a store with knowledge a small model lacks (the
definitions of rare words) and as the source of the ``dict-def`` benchmark (:mod:`retrolm.text.qa`): questions ask
WordNet's definition of a word, and the store is the other dictionary, which words its definitions differently.

* WordNet ``data.{noun,verb,adj,adv}`` lines: ``offset lexfile ss_type w_cnt word lex_id ... | gloss``. A document is
  ``{"id": "wordnet/noun/00982679", "text": "lemma, lemma (noun): gloss", "lemmas", "pos", "lexfile",
  "definition"}``; the definition is the gloss before its first ``; "`` (where its examples start in nearly every
  gloss; 70 glosses introduce theirs otherwise and keep them).
* GCIDE is a dictd database: ``gcide.index`` lines ``headword<TAB>offset<TAB>length`` (base64 numbers) into the
  dictzip-compressed ``gcide.dict.dz``. Several keys point at one entry (variant spellings, plurals and inflections,
  run-on forms, phrases and names it defines); an entry becomes one document ``{"id": "gcide/Headword", "text",
  "headword", "headwords"}``: ``headword`` is the key its text begins with (None for the few that begin with none,
  named then by their first key), ``headwords`` every key, ``#2``, ``#3``… mark a headword's later entries. The
  pronunciation (``\\Ab*ac"tion\\``) and spoken form, source tags (``[1913 Webster]``), cross-reference braces and
  the syllable marks of run-on forms are removed, and the accent codes (``['e]``) turned into letters.
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
_LETTERS = {"=oo": "o\u035eo", "oo^": "o\u035do", "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð",
            "thorn": "þ", "ng": "ŋ", "deg": "°", "sect": "§", "root": "√", "imac": "ī", "aum": "ä", "th": "θ",
            "yogh": "ȝ"}
_ACCENT = re.compile(r"\[([A-Za-z]{2,5}|=oo|oo\^)\]|\[([" + re.escape("".join(_MARKS)) + r"])([A-Za-z])\]"
                     r"|\[([A-Za-z])\^\]")
_PRONUNCIATION = re.compile(r"\\[^\\]*\\")  # \Ab*ac"tion\ (often with no space after it: \Car"i*na`ted\a.)
_SPOKEN = re.compile(r"\s*\([^()]*\w[*\"`]\w[^()]*\)")  # (ăb*ăk"shŭn): syllable marks inside a word in parentheses
_TAG = re.compile(r"\s*\[[^\[\]]*(?:Webster|WordNet|PJC|Century Dict|RHUD|MW10)[^\[\]]*\]")
_SYLLABLES = re.compile(r"(?<=\w)[*\"`](?=\w)")  # run-on forms keep their marks: -- Bru"tish*ly, adv.
_BRACES = re.compile(r"[{}]")
_BEFORE_COMMA = re.compile(r"\s+(?=[,;])")


def _accent(m: re.Match) -> str:
    if m.group(1):
        return _LETTERS.get(m.group(1), m.group(0))
    if m.group(2):
        return unicodedata.normalize("NFC", m.group(3) + _MARKS[m.group(2)])
    return unicodedata.normalize("NFC", m.group(4) + "\u0306")  # [a^]: a breve


def clean_gcide(entry: str) -> str:
    """An entry's text without pronunciations, spoken forms, source tags, braces and syllable marks, accents as
    letters, each paragraph on one line."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", entry):
        p = " ".join(para.split())  # markup may cross a line break
        p = _SPOKEN.sub("", _ACCENT.sub(_accent, _PRONUNCIATION.sub(" ", p)))  # spoken forms are told by their marks
        p = _SYLLABLES.sub("", _BRACES.sub("", _TAG.sub("", p)))
        p = _BEFORE_COMMA.sub("", " ".join(p.split()))
        if p:
            paragraphs.append(p)
    return "\n".join(paragraphs)


def headword(text: str, keys: list[str]) -> str | None:
    """The index key an entry's text begins with (its headword), or None. The index also lists the plurals,
    inflections, run-on forms, phrases and names an entry defines."""
    low = text.lower()
    for key in sorted(keys, key=lambda k: (-len(k), k)):
        k = key.lower()
        if low.startswith(k) and (len(low) == len(k) or not low[len(k)].isalnum()):
            return key
    return None


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
        keys = list(dict.fromkeys(words))
        head = headword(text, keys)
        name = head or keys[0]
        seen[name] = seen.get(name, 0) + 1
        doc_id = f"gcide/{name}" + (f"#{seen[name]}" if seen[name] > 1 else "")
        yield {"id": doc_id, "text": text, "headword": head, "headwords": keys}


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
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                try:
                    count = int(fields[3], 16)
                    lemmas = [_ADJ_MARKER.sub("", w).replace("_", " ") for w in fields[4 : 4 + 2 * count : 2]]
                    offset, lexfile = fields[0], int(fields[1])
                except (IndexError, ValueError):
                    raise RetrolmError(f"{path}:{line_no}: not a WordNet data line") from None
                gloss = gloss.strip()
                if not gloss or len(lemmas) != count:
                    raise RetrolmError(f"{path}:{line_no}: not a WordNet data line")
                definition = re.split(r';\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
                yield {"id": f"wordnet/{name}/{offset}", "text": f"{', '.join(lemmas)} ({pos}): {gloss}",
                       "lemmas": lemmas, "pos": pos, "lexfile": lexfile, "definition": definition}


__all__ = ["WORDNET_POS", "clean_gcide", "headword", "read_gcide", "read_wordnet"]
