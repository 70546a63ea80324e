"""The two dictionaries as corpora: GCIDE's dictd files and WordNet's data files parsed into one document per entry /
synset, and fetched from their Debian packages like any corpus."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import retrolm.text.sources as sources
from retrolm.core.errors import RetrolmError
from retrolm.text.dictionaries import clean_gcide, read_gcide, read_wordnet

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(n: int) -> str:
    out = _B64[n % 64]
    while n >= 64:
        n //= 64
        out = _B64[n % 64] + out
    return out


GCIDE_ENTRIES = [
    (["00-database-short"], b"00-database-short\n   The Collaborative International Dictionary\n"),
    (["Abaction"], b'Abaction \\Ab*ac"tion\\ ([a^]b*[a^]k"sh[u^]n), n.\n   Stealing cattle on a large scale. '
                   b"[Obs.]\n   [1913 Webster]\n"),
    (["Gormandize", "Gourmandize"], b'Gormandize \\Gor"mand*ize\\, Gourmandize \\Gour"mand*ize\\, v. i.\n'
                                    b"   [F. gourmandise.] To eat greedily. See {Gormand}.\n\n   Syn: gorge, glut.\n"
                                    b"        [1913 Webster + WordNet 1.5]\n"),
    (["Bow"], b"Bow \\Bow\\, n.\n   A weapon of caf['e] archers; an [ae]sthete's \x92toy\x92.\n   [PJC]\n"),
    (["Bow"], b"Bow \\Bow\\, v. t.\n   To bend.\n   [Webster 1913 Suppl.]\n"),
    # the index lists plurals under the headword (and sorts them first); no space after the pronunciation; a spoken
    # form across a line break; a run-on form with its syllable marks
    (["Abbacies", "Abbacy"], b'Abbacy \\Ab"ba*cy\\n.; pl. {Abbacies}. (ab"ba*\n   s[i^]) The office of an abbot.\n'
                             b'   -- Ab*ba"cial*ly, adv.\n   [1913 Webster]\n'),
    (["Zzz"], b"   [PJC]\n"),  # nothing left once the tag is gone
    (["Zyx"], b"Quotation that begins with no key.\n"),
]


def write_gcide(folder: Path) -> tuple[Path, Path]:
    data, index = b"", []
    for heads, raw in GCIDE_ENTRIES:
        index += [f"{h}\t{b64(len(data))}\t{b64(len(raw))}" for h in heads]
        data += raw
    index.sort(key=str.lower)  # dictd sorts its index; the reader must not rely on its order
    (folder / "gcide.index").write_text("\n".join(index) + "\n", encoding="utf-8")
    with gzip.open(folder / "gcide.dict.dz", "wb") as f:
        f.write(data)
    return folder / "gcide.index", folder / "gcide.dict.dz"


def test_gcide_entries_become_clean_documents(tmp_path):
    docs = list(read_gcide(*write_gcide(tmp_path)))
    assert [d["id"] for d in docs] == ["gcide/Abaction", "gcide/Gormandize", "gcide/Bow", "gcide/Bow#2", "gcide/Abbacy",
                                       "gcide/Zyx"]
    by_id = {d["id"]: d for d in docs}
    # pronunciation, its spoken form and the source tag gone; the usage label kept
    assert by_id["gcide/Abaction"]["text"] == "Abaction, n.\nStealing cattle on a large scale. [Obs.]" \
        .replace("\n", " ")
    gorm = by_id["gcide/Gormandize"]
    assert gorm["headwords"] == ["Gormandize", "Gourmandize"]  # variant spellings: one document
    assert gorm["text"] == ("Gormandize, Gourmandize, v. i. [F. gourmandise.] To eat greedily. See Gormand.\n"
                            "Syn: gorge, glut.")
    # accent codes as letters; an entry that is not UTF-8 read as Windows-1252
    assert by_id["gcide/Bow"]["text"] == "Bow, n. A weapon of café archers; an æsthete's ’toy’."
    assert by_id["gcide/Bow#2"]["text"] == "Bow, v. t. To bend."
    abbacy = by_id["gcide/Abbacy"]  # named by the key its text begins with, not by its first key
    assert abbacy["headword"] == "Abbacy" and abbacy["headwords"] == ["Abbacies", "Abbacy"]
    assert abbacy["text"] == "Abbacy n.; pl. Abbacies. The office of an abbot. -- Abbacially, adv."
    assert by_id["gcide/Zyx"]["headword"] is None


def test_gcide_breve_and_unknown_codes():
    assert clean_gcide("x [a^]b [e^] [xyzzy] [=o]\n") == "x ăb ĕ [xyzzy] ō"


def test_a_damaged_gcide_index_is_one_line_naming_the_line(tmp_path):
    index, dz = write_gcide(tmp_path)
    index.write_text(index.read_text() + "Broken\tA!\tB\n")
    with pytest.raises(RetrolmError, match=r"gcide\.index:\d+: 'A!' is not a dictd base64 number"):
        list(read_gcide(index, dz))
    index.write_text("no tabs here\n")
    with pytest.raises(RetrolmError, match=r"gcide\.index:1: expected"):
        list(read_gcide(index, dz))


WORDNET = {
    "noun": ["  1 This software and database is being provided to you, the LICENSEE, by Princeton University",
             '00982679 04 n 02 strategic_intelligence 0 SIGINT 0 001 @ 00981830 n 0000 | intelligence required for '
             'policy; "the agency gathers it"  '],
    "verb": ["01168468 34 v 01 gormandize 0 001 @ 01166351 v 0000 01 + 08 00 | eat greedily  "],
    "adj": ["00003700 00 s 02 galore(ip) 0 abounding 0 000 | in great numbers; \"apples galore\"  "],
    "adv": ["00001740 02 r 01 greedily 0 000 | in a greedy manner  ",
            "00001841 02 r 01 galore 0 000 | in great numbers;  "],
}


def write_wordnet(folder: Path) -> Path:
    for name, lines in WORDNET.items():
        (folder / f"data.{name}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_wordnet_synsets_become_documents(tmp_path):
    docs = list(read_wordnet(write_wordnet(tmp_path)))
    assert [d["id"] for d in docs] == ["wordnet/noun/00982679", "wordnet/verb/01168468", "wordnet/adj/00003700",
                                       "wordnet/adv/00001740", "wordnet/adv/00001841"]
    noun, verb, adj, adv, adv2 = docs
    assert adv2["definition"] == "in great numbers"  # a gloss ending in a semicolon
    assert noun["lemmas"] == ["strategic intelligence", "SIGINT"] and noun["lexfile"] == 4
    assert noun["definition"] == "intelligence required for policy"  # the quoted example is not the definition
    assert noun["text"] == ('strategic intelligence, SIGINT (noun): intelligence required for policy; "the agency '
                            'gathers it"')
    assert verb["pos"] == "verb" and verb["definition"] == "eat greedily"
    assert adj["lemmas"] == ["galore", "abounding"] and adj["pos"] == "adjective"  # the (ip) marker dropped
    assert adv["definition"] == "in a greedy manner"


def test_a_damaged_wordnet_file_is_one_line_naming_it(tmp_path):
    write_wordnet(tmp_path)
    for line in ("01168468 34 v 03 gormandize 0 | eat\n",  # says 3 words, holds 1
                 "01168468 34 v 01 gormandize 0 000 eat greedily\n"):  # no gloss
        (tmp_path / "data.verb").write_text(line)
        with pytest.raises(RetrolmError, match=r"data\.verb:1: not a WordNet data line"):
            list(read_wordnet(tmp_path))
    (tmp_path / "data.adv").unlink()  # checked before anything is read
    with pytest.raises(RetrolmError, match=r"data\.adv: not found"):
        list(read_wordnet(tmp_path))


def test_fetching_the_dictionaries_records_the_package_version_with_its_epoch(tmp_path, monkeypatch):
    """Debian writes an epoch as %3a in a package's file name; the record (and a --pin) name it as apt does."""
    def apt(cmd, cwd=None):
        if cmd[:2] == ["apt-get", "download"]:
            name = {"wordnet-base": "wordnet-base_1%3a3.0-37_all.deb", "dict-gcide": "dict-gcide_0.48.5_all.deb"}
            (cwd / name[cmd[-1]]).write_bytes(b"")
        if cmd[0] == "dpkg":
            root = Path(cmd[-1])
            if root.name == "wordnet-base":
                (root / "usr/share/wordnet").mkdir(parents=True)
                write_wordnet(root / "usr/share/wordnet")
            else:
                (root / "usr/share/dictd").mkdir(parents=True)
                write_gcide(root / "usr/share/dictd")

    monkeypatch.setattr(sources, "_run", apt)
    monkeypatch.setattr(sources, "_can_update_apt", lambda: False)
    for name, package, count in (("wordnet", "wordnet-base=1:3.0-37", 5), ("gcide", "dict-gcide=0.48.5", 6)):
        out = sources.fetch_corpus(name, tmp_path)
        record = json.loads((tmp_path / f"{name}.source.json").read_text())
        assert record["package"] == package and record["documents"] == count
        assert len(out.read_text().splitlines()) == count
