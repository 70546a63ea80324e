"""Reproducible QA benchmarks built from the real corpora (no QA set with answers ships offline).

Each builder reads a fetched corpus (``retrolm corpus fetch ...``), draws its questions from the documents of a fixed
test split (a seeded hash of the document id, like ``retrolm corpus split``) in a seeded order, and stores every record
with its provenance: builder and version, corpus file and SHA-256, document, seed and split. The same corpus file, seed
and arguments give the same file, byte for byte.

* ``wiki-entity`` — questions about the entities of Wikipedia lead summaries, answered by their Wikidata short
  description (``"What is 3C 273?"`` → ``"quasar in the constellation Virgo"``); with ``choices=4``,
  multiple choice against the descriptions of other entities of the same topic.
* ``kernel-cloze`` — a sentence of the Linux kernel documentation with one specific word (an identifier, acronym or
  name) blanked out. With ``old`` (the previous kernel's documentation, e.g. the store's), each record says whether the
  exact sentence was already there (``in_old``), and ``balance`` draws half of each: questions the store contains
  verbatim and questions it cannot contain. With ``choices=4``, multiple choice against words blanked out of other
  sentences of the same kind (identifier or name), from the same document where it has enough.
* ``dict-def`` — what a word means (``'What does the word "abaction" mean?'``), answered by its WordNet definition
  (``retrolm corpus fetch wordnet``). Words are lowercase, alphabetic, of one sense in the whole of WordNet (rare and
  unambiguous), one per synset (the test split is drawn by synset, so a synonym's question never shares the answer),
  and share no stem with their definition or the other options. Each record's ``query`` is the word alone: retrieval
  searches with it (see :mod:`retrolm.eval.qa`), the reader reads the question. With ``store`` (the dictionary the
  database is built from, e.g. ``gcide``) only words that head one of its entries are asked (not an inflection or
  run-on form listed under another), each record says whether that entry holds WordNet's definition verbatim
  (``in_store``: GCIDE took some senses from WordNet 1.5), and ``balance`` draws half of each. With ``choices=4``,
  multiple choice against the definitions of other words of the same part of speech and WordNet lexicographer file
  (``noun.animal``…), of a similar length.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

from retrolm.core.errors import RetrolmError
from retrolm.core.io import atomic_path, file_digest, jsonl_values

BUILDER_VERSIONS = {"kernel-cloze": 4, "wiki-entity": 3, "dict-def": 2}
"""Per builder, what changed the questions it makes (recorded in each record's provenance; 1 where absent).
kernel-cloze 2: a word that starts another token of the question ("damon@lists" for DAMON, the prefix's "Linux") is
never the blank. 3 (and wiki-entity 2, dict-def 2): no two options of a question differ only in case (4 of 1,000
kernel-cloze questions had e.g. both "raid5" and "RAID5"); sets without such twins are drawn as before. kernel-cloze
4: a sentence is asked once (3 of 1,000 were asked twice), a blanked sentence other files complete with another word
is not asked, and no wrong option fills the blank into a sentence of the corpus (5 of 1,000 had two right options).
wiki-entity 3: no title names its answer (in 182 of 908 questions the answer was the only option sharing a word with
the title: "What is Tanker (ship)?")."""
SKIP_DESCRIPTIONS = re.compile(r"(?i)wikimedia|disambiguation|topics referred to|list article|^$")
_COMMON_WORDS = """about above after again against also although among another because been before being below between
both cannot could does doing down during each either every few from further have having here hers herself himself
into itself just more most must myself neither once only other ought ours ourselves over same should some such than
that their theirs them themselves then there these they this those through under until upon very were what when where
which while whom whose will with within without would your yours yourself yourselves however therefore thus used using
use uses make makes made many much need needs needed"""
COMMON = frozenset(_COMMON_WORDS.split())
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
_WORD_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*[A-Za-z0-9_]$")
BLANK = "____"


def in_test_split(doc_id: str, seed: int, fraction: float) -> bool:
    """Whether a document belongs to the test split (a seeded hash of its id; stable across corpus versions)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")
    return h % 1_000_000 < fraction * 1_000_000


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL corpus: JSON objects with an ``id``; anything else is a one-line error naming the line."""
    if not path.is_file():
        raise RetrolmError(f"{path}: corpus not found (fetch it with `retrolm corpus fetch`)")
    out = []
    for where, record in jsonl_values(path):
        if not isinstance(record, dict) or "id" not in record:
            raise RetrolmError(f"{where}: expected a JSON object with an 'id'")
        out.append(record)
    return out


class _OldText:
    """Whether a sentence occurs verbatim (whitespace aside) anywhere in an old corpus: files move between versions
    (``x86/`` → ``arch/x86/``), so looking only at the same path misses sentences the store holds."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.by_path = texts
        self.all = "\x00".join(texts.values())
        self._grams: set[int] | None = None

    def holds(self, sentence: str, path: str) -> bool:
        s = _norm_space(sentence)
        if s in self.by_path.get(path, ""):
            return True
        words = s.split()
        if self._grams is None:  # every 8-word window of the old text: a sentence missing one is not there
            self._grams = {hash(tuple(w[i : i + 8])) for w in (t.split() for t in self.by_path.values())
                           for i in range(max(1, len(w) - 7))}
        windows = (hash(tuple(words[i : i + 8])) for i in range(max(1, len(words) - 7)))
        return all(g in self._grams for g in windows) and s in self.all


def _provenance(builder: str, corpus: Path, seed: int, fraction: float, **extra) -> dict:
    return {"builder": builder, "builder_version": BUILDER_VERSIONS.get(builder, 1), "corpus": corpus.name,
            "corpus_sha256": file_digest(corpus), "seed": seed, "split": "test", "test_fraction": fraction, **extra}


def _draw(pools: Iterable[Sequence[str]], answer: str, k: int, rng: random.Random, keep: Callable[[str], bool]
          ) -> list[str]:
    """Up to k wrong options, from each pool in turn for what the earlier ones lacked: not the answer, not one drawn
    already (case aside), and kept by ``keep``."""
    out: list[str] = []
    for pool in pools:
        seen = {answer.lower(), *(o.lower() for o in out)}
        fresh: dict[str, str] = {}  # the first spelling of each word: case twins are one option
        for x in pool:
            if x.lower() not in seen and keep(x):
                fresh.setdefault(x.lower(), x)
        out += rng.sample(list(fresh.values()), min(k - len(out), len(fresh)))
        if len(out) == k:
            break
    return out


def _with_choices(rec: dict, answer: str, choices: int, rng: random.Random, others: Callable[[int], list[str]],
                  need: str) -> dict:
    """``rec`` with ``choices`` shuffled options (``others(k)`` draws the k wrong ones) and the answer's index, or
    with ``answers`` when ``choices`` < 2. Too few wrong options is an error, ``need`` saying what they should have
    been: fewer options would raise the chance rate unannounced."""
    if choices < 2:
        rec["answers"] = [answer]
        return rec
    opts = [*others(choices - 1), answer]
    if len(opts) < choices:
        raise RetrolmError(f"{need}; the corpus has {len(opts) - 1}: ask for fewer --choices")
    rng.shuffle(opts)
    rec.update(choices=opts, answer=opts.index(answer))
    return rec


# --------------------------------------------------------------------------------------------------- wiki-entity
def build_wiki_entity(corpus: str | Path, n: int = 200, seed: int = 0, choices: int = 0, test_fraction: float = 0.1
                      ) -> list[dict]:
    """Questions about Wikipedia entities answered by their short descriptions (see the module docstring)."""
    corpus = Path(corpus)
    docs = [d for d in _read_jsonl(corpus) if isinstance(d.get("description"), str)]
    usable = [d for d in docs if not SKIP_DESCRIPTIONS.search(d["description"].strip())
              and 1 <= len(d["description"].split()) <= 10
              and not _title_gives_away(str(d["id"]), d["description"])]
    if not usable:
        raise RetrolmError(f"{corpus}: no documents with a usable 'description' (is it `retrolm corpus fetch wiki`?)")
    test = sorted((d for d in usable if in_test_split(str(d["id"]), seed, test_fraction)), key=lambda d: str(d["id"]))
    rng = random.Random(seed)
    rng.shuffle(test)
    by_topic: dict[str, list[str]] = {}
    for d in usable:
        by_topic.setdefault(str(d.get("topic")), []).append(d["description"].strip())
    base = _provenance("wiki-entity", corpus, seed, test_fraction, field="description")
    out = []
    for d in test[:n]:
        title, desc = str(d["id"]), d["description"].strip()
        rec = {"id": f"wiki-entity-{len(out):05d}", "question": f"What is {title}?",
               "provenance": {**base, "doc_id": title, "topic": d.get("topic")}}
        others = partial(_distractors, desc, by_topic.get(str(d.get("topic")), []),
                         [x["description"].strip() for x in usable], rng=rng)
        out.append(_with_choices(rec, desc, choices, rng, others,
                                 f"{choices} choices need {choices - 1} other answers than {desc!r}"))
    return out


def _title_gives_away(title: str, description: str) -> bool:
    """Whether the question's title names its answer: a word of the title (its disambiguation too: "Tanker (ship)",
    "Jaws (film)") that the description shares by stem or five letters in a row ("Lake Huron": "One of the Great
    Lakes"), or the description is the title itself."""
    if description.strip().lower() == title.strip().lower():
        return True
    return any(_definition_gives_away(w, description) for w in re.findall(r"[a-z]+", title.lower())
               if len(w) >= 3 and w not in COMMON and w not in _SHORT_WORDS)


def _distractors(answer: str, same_topic: list[str], everything: list[str], k: int, rng: random.Random) -> list[str]:
    def fresh(pool: list[str], have: list[str]) -> list[str]:
        seen = {answer.lower(), *(h.lower() for h in have)}
        unique: dict[str, str] = {}  # the first spelling in sorted order: case twins are one option
        for p in sorted(set(pool)):
            if p.lower() not in seen:
                unique.setdefault(p.lower(), p)
        return list(unique.values())

    picked = rng.sample(fresh(same_topic, []), min(k, len(fresh(same_topic, []))))
    if len(picked) < k:
        pool = fresh(everything, picked)
        if len(pool) < k - len(picked):
            raise RetrolmError(f"{k + 1} choices need {k} other answers than {answer!r}; the corpus has "
                               f"{len(picked) + len(pool)}: ask for fewer --choices")
        picked += rng.sample(pool, k - len(picked))
    return picked


# -------------------------------------------------------------------------------------------------- kernel-cloze
def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of an reStructuredText document (no markup, code, tables or lists), lines joined."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        if not lines or any(not ln or ln[0].isspace() or ln.lstrip()[:1] in "=-*|+#.:`~^" for ln in lines):
            continue
        if not lines[0][0].isalpha():
            continue
        out.append(" ".join(ln.strip() for ln in lines))
    return out


def cloze_sentences(text: str) -> list[str]:
    """Sentences fit for a cloze question: prose, 10–35 words, ending with a full stop, without inline markup."""
    out = []
    for para in _paragraphs(text):
        for s in _SENTENCE_SPLIT.split(para):
            s = s.strip()
            if s.endswith(".") and 10 <= len(s.split()) <= 35 and not re.search(r"[`|*<>\[\]{}\\]|::|https?:", s):
                out.append(s)
    return out


def _blank_score(word: str, first: bool) -> int:
    """How specific a word is: 3 identifier or number-bearing or acronym, 2 a capitalised name, else 0."""
    if first or len(word) < 4 or not _WORD_OK.match(word) or word.lower() in COMMON:
        return 0
    if "_" in word or any(ch.isdigit() for ch in word) or (word.isupper() and len(word) >= 3) or \
            any(ch.isupper() for ch in word[1:]):
        return 3
    return 2 if word[0].isupper() else 0


CLOZE_PREFIX = "Fill in the blank with one word. From the Linux kernel documentation:"
"""What every kernel-cloze question says before its sentence."""


def _bare(token: str) -> str:
    """A token of a sentence without the punctuation around it: the word a blank takes the place of."""
    return token.strip(".,;:()\"'")


def choose_blank(sentence: str, rng: random.Random) -> tuple[str, str] | None:
    """(the sentence with one specific word blanked, that word), or None if it has none."""
    toks = sentence.split()
    stripped = [_bare(t) for t in toks]
    counts: dict[str, int] = {}
    for w in stripped:
        counts[w.lower()] = counts.get(w.lower(), 0) + 1
    # the rest of what the question shows: the other tokens and the question's own words
    context = [t.lower() for t in [*toks, *CLOZE_PREFIX.split()]]

    def elsewhere(i: int) -> bool:
        """The word starts another token ("damon@lists" for DAMON, "LP-111" for LP-11, the prefix's "Linux"): the
        question gives it away. Inside a word it does not ("PECI" in "specification")."""
        found = re.compile(rf"(?<![a-z0-9]){re.escape(stripped[i].lower())}")
        return any(found.search(t) for j, t in enumerate(context) if j != i)

    scored = [(_blank_score(w, i == 0), i) for i, w in enumerate(stripped)
              if counts[w.lower()] == 1 and not elsewhere(i)]
    best = max((s for s, _ in scored), default=0)
    if best < 2:
        return None
    i = rng.choice([i for s, i in scored if s == best])
    toks[i] = toks[i].replace(stripped[i], BLANK, 1)
    return " ".join(toks), stripped[i]


def _norm_space(s: str) -> str:
    return " ".join(s.split())


def build_kernel_cloze(corpus: str | Path, n: int = 200, seed: int = 0, old: str | Path | None = None,
                       balance: bool = True, test_fraction: float = 0.2, choices: int = 0) -> list[dict]:
    """Cloze questions over sentences of the kernel documentation (see the module docstring)."""
    corpus = Path(corpus)
    docs = [d for d in _read_jsonl(corpus) if isinstance(d.get("text"), str)]
    old_texts: dict[str, str] = {}
    if old is not None:
        for d in _read_jsonl(Path(old)):
            old_texts[str(d.get("path") or str(d["id"]).split("/", 1)[-1])] = _norm_space(str(d.get("text", "")))
    old_corpus = _OldText(old_texts)
    rng = random.Random(seed)
    docs = [d for d in docs if "/translations/" not in f"/{d.get('path') or d['id']}"]  # English only
    test = sorted((d for d in docs if in_test_split(str(d.get("path") or d["id"]), seed, test_fraction)),
                  key=lambda d: str(d["id"]))
    rng.shuffle(test)
    # every English sentence of the corpus: an option that fills a question's blank into one of them is right too
    sentences = {_norm_space(s) for d in docs for s in cloze_sentences(d["text"])}
    per_doc: list[list[dict]] = []
    asked: set[str] = set()  # a sentence in two files (or twice in one) is asked once
    for d in test:
        path = str(d.get("path") or str(d["id"]).split("/", 1)[-1])
        cands = []
        for s in cloze_sentences(d["text"]):
            blank = choose_blank(s, rng)
            if blank is None or _norm_space(s) in asked:
                continue
            asked.add(_norm_space(s))
            masked, word = blank
            cand = {"doc_id": str(d["id"]), "path": path, "sentence": s, "masked": masked, "word": word}
            if old is not None:
                cand["in_old"] = old_corpus.holds(s, path)
            cands.append(cand)
        rng.shuffle(cands)
        if cands:
            per_doc.append(cands)
    # a blanked sentence that another sentence of the corpus completes with another word has two right answers: not
    # asked (every sentence indexed at each word a blank may take)
    fills: dict[str, set[str]] = {}
    for sentence in sentences:
        toks = sentence.split()
        for i, w in enumerate(map(_bare, toks)):
            if _blank_score(w, i == 0) >= 2:
                fills.setdefault(" ".join([*toks[:i], toks[i].replace(w, BLANK, 1), *toks[i + 1 :]]), set()).add(w)
    per_doc = [kept for cs in per_doc
               if (kept := [c for c in cs if fills.get(_norm_space(c["masked"]), set()) <= {c["word"]}])]
    picked = _round_robin(per_doc, n, balance and old is not None)
    base = _provenance("kernel-cloze", corpus, seed, test_fraction,
                       old_corpus=Path(old).name if old is not None else None)
    # distractors: words blanked out of other sentences, of the same kind (identifier or name), from the same
    # document first, then the same folder, then anywhere: options the sentence alone cannot tell apart
    by_doc: dict[str, set[str]] = {}
    for cs in per_doc:
        for c in cs:
            by_doc.setdefault(c["path"], set()).add(c["word"])
    every = sorted(set().union(*by_doc.values())) if by_doc else []

    def distractors(c: dict, k: int) -> list[str]:
        kind = _blank_score(c["word"], False)
        folder = c["path"].rsplit("/", 1)[0]
        pools = (sorted(by_doc.get(c["path"], ())),
                 sorted({w for p, ws in by_doc.items() if p.rsplit("/", 1)[0] == folder for w in ws}), every)
        def wrong(w: str) -> bool:  # of the kind, and no sentence of the corpus with it in the blank
            return _blank_score(w, False) == kind and _norm_space(c["masked"].replace(BLANK, w, 1)) not in sentences

        return _draw(pools, c["word"], k, rng, wrong)

    out = []
    for i, c in enumerate(picked):
        rec = {"id": f"kernel-cloze-{i:05d}",
               "question": f"{CLOZE_PREFIX} {c['masked']}",
               "provenance": {**base, **{k: c[k] for k in ("doc_id", "path", "sentence")},
                              **({"in_old": c["in_old"]} if "in_old" in c else {})}}
        out.append(_with_choices(rec, c["word"], choices, rng, partial(distractors, c),
                                 f"{corpus}: {choices} choices need {choices - 1} other blanked words of the kind of "
                                 f"{c['word']!r}"))
    return out


def _round_robin(per_doc: list[list[dict]], n: int, balance: bool, key: str = "in_old") -> list[dict]:
    """Up to n candidates, one per document per round; with ``balance``, alternately ``key`` true and false."""
    if not balance:
        pools = [list(c) for c in per_doc]
        out: list[dict] = []
        while len(out) < n and any(pools):
            for p in pools:
                if p and len(out) < n:
                    out.append(p.pop(0))
        return out
    halves = []
    for flag in (True, False):
        halves.append(_round_robin([[c for c in cs if c[key] == flag] for cs in per_doc], n, False))
    out = []
    for a, b in zip(halves[0], halves[1], strict=False):
        out += [a, b]
    rest = halves[0][len(halves[1]):] + halves[1][len(halves[0]):]
    return (out + rest)[:n]


# ------------------------------------------------------------------------------------------------------ dict-def
_DICT_WORD = re.compile(r"^[a-z]{4,}$")
_SUFFIXES = ("ingly", "ness", "ment", "ally", "ily", "ing", "ous", "ies", "ed", "es", "ly", "al", "er", "y", "s", "e")
_SHORT_WORDS = frozenset({"the", "and", "for", "not", "one", "any", "are", "has", "its", "who", "out", "off", "all",
                          "but", "can", "way", "per"})


def _stem(word: str) -> str:
    """The word without one common English suffix, keeping at least three letters."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _definition_gives_away(word: str, definition: str) -> bool:
    """Whether a definition shares a stem or five letters in a row with the word ("coyly": "in a coy manner",
    "acarpellous": "having no carpels", "chromatogram": "... in chromatography"). Unrelated words that happen to share
    them are dropped too: the pool of questions is large, and a shared spelling would let options be told apart
    without knowing the word."""
    stem = _stem(word)
    grams = {word[i : i + 5] for i in range(len(word) - 4)}
    for token in re.findall(r"[a-z]+", definition.lower()):
        if len(token) < 3 or token in COMMON or token in _SHORT_WORDS:
            continue
        if (len(t := _stem(token)) >= 3 and t in word) or stem in token or any(g in token for g in grams):
            return True
    return False


def _store_entries(store: Path) -> dict[str, list[tuple[str, str]]]:
    """Headword (lowercase) → the store's documents it heads: (id, text lowercased and one-spaced). A document says
    what it heads with ``headword`` (``retrolm corpus fetch gcide``; None: no headword) or else ``headwords``."""
    entries: dict[str, list[tuple[str, str]]] = {}
    for d in _read_jsonl(store):
        if "headword" in d:
            heads = [] if d["headword"] is None else [d["headword"]]
        else:
            heads = d.get("headwords", [str(d["id"]).split("/", 1)[-1]])
        if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
            raise RetrolmError(f"{store}: document {d['id']!r}: 'headword' must be a string or null, 'headwords' a "
                               "list of strings")
        text = _norm_space(str(d.get("text", ""))).lower()
        for head in heads:
            entries.setdefault(head.lower(), []).append((str(d["id"]), text))
    return entries


def build_dict_def(corpus: str | Path, n: int = 200, seed: int = 0, choices: int = 0, store: str | Path | None = None,
                   balance: bool = True, test_fraction: float = 0.2) -> list[dict]:
    """What rare words mean, answered by their WordNet definitions (see the module docstring)."""
    corpus = Path(corpus)
    synsets = [d for d in _read_jsonl(corpus)
               if isinstance(d.get("lemmas"), list) and all(isinstance(w, str) for w in d["lemmas"])
               and isinstance(d.get("definition"), str) and isinstance(d.get("pos"), str)]
    if not synsets:
        raise RetrolmError(f"{corpus}: no synsets with 'lemmas', 'pos' and 'definition' (is it "
                           "`retrolm corpus fetch wordnet`?)")
    senses = Counter(w.lower() for d in synsets for w in set(d["lemmas"]))
    entries = _store_entries(Path(store)) if store is not None else {}
    cands = []
    for d in synsets:  # the test split is drawn by synset: synonyms share their definition
        definition = _norm_space(d["definition"])
        if not 3 <= len(definition.split()) <= 25 or not in_test_split(str(d["id"]), seed, test_fraction):
            continue
        words = sorted(w for w in d["lemmas"] if _DICT_WORD.match(w) and senses[w] == 1
                       and not _definition_gives_away(w, definition) and (store is None or w in entries))
        if not words:
            continue
        word = words[0]  # one question per synset
        cand = {"word": word, "doc_id": str(d["id"]), "pos": d["pos"], "lexfile": d.get("lexfile"),
                "definition": definition}
        if store is not None:
            cand["store_doc_ids"] = [i for i, _ in entries[word]]
            cand["in_store"] = any(definition.lower() in text for _, text in entries[word])
        cands.append(cand)
    cands.sort(key=lambda c: c["word"])
    rng = random.Random(seed)
    rng.shuffle(cands)
    picked = _round_robin([[c] for c in cands], n, balance and store is not None, key="in_store")
    # distractors: definitions of other words of the same part of speech and lexicographer file, of a similar length
    pools: dict[tuple, list[str]] = {}
    for d in synsets:
        definition = _norm_space(d["definition"])
        if 3 <= len(definition.split()) <= 25:
            pools.setdefault((d["pos"], d.get("lexfile")), []).append(definition)
            pools.setdefault((d["pos"],), []).append(definition)
    pools = {k: sorted(set(v)) for k, v in pools.items()}

    def distractors(c: dict, k: int) -> list[str]:
        size = len(c["definition"].split())
        return _draw((pools.get((c["pos"], c["lexfile"]), []), pools.get((c["pos"],), [])), c["definition"], k, rng,
                     lambda x: size / 2 <= len(x.split()) <= size * 2 and not _definition_gives_away(c["word"], x))

    base = _provenance("dict-def", corpus, seed, test_fraction, store=Path(store).name if store is not None else None,
                       store_sha256=file_digest(store) if store is not None else None)
    records = []
    for i, c in enumerate(picked):
        rec = {"id": f"dict-def-{i:05d}", "question": f'What does the word "{c["word"]}" mean?', "query": c["word"],
               "provenance": {**base, **{k: c[k] for k in ("doc_id", "word", "pos")},
                              **{k: c[k] for k in ("store_doc_ids", "in_store") if k in c}}}
        records.append(_with_choices(rec, c["definition"], choices, rng, partial(distractors, c),
                                     f"{corpus}: {choices} choices need {choices - 1} other {c['pos']} definitions "
                                     f"about as long as that of {c['word']!r}"))
    return records


BUILDERS: dict[str, Callable[..., list[dict]]] = {"wiki-entity": build_wiki_entity, "kernel-cloze": build_kernel_cloze,
                                                  "dict-def": build_dict_def}


def build_benchmark(kind: str, corpus: str | Path, out: str | Path, **kwargs) -> int:
    """Build benchmark ``kind`` from ``corpus`` into the JSONL file ``out`` (atomically); returns the record count."""
    if kind not in BUILDERS:
        raise RetrolmError(f"benchmark {kind!r}: unknown; choose from {', '.join(sorted(BUILDERS))}")
    builder = BUILDERS[kind]
    takes = inspect.signature(builder).parameters
    bad = [k for k, v in kwargs.items() if v is not None and k not in takes]
    if bad:
        raise RetrolmError(f"benchmark {kind!r} does not take --{bad[0].replace('_', '-')}")
    records = builder(corpus, **{k: v for k, v in kwargs.items() if v is not None})
    if not records:
        raise RetrolmError(f"{corpus}: no {kind} questions could be built")
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    return len(records)


__all__ = ["BLANK", "BUILDERS", "build_benchmark", "build_dict_def", "build_kernel_cloze", "build_wiki_entity",
           "choose_blank", "cloze_sentences", "in_test_split"]
