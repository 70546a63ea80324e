"""Benchmarks built from real corpora: reproducible (same seed → same bytes), drawn from a fixed test split, with
provenance in every record, and loadable as QA files."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from conftest import WIKI_SAMPLE, assert_one_line_error, run_cli, write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.eval.qa import load_qa
from retrolm.text.qa import (
    BLANK,
    build_benchmark,
    build_dict_def,
    build_kernel_cloze,
    choose_blank,
    cloze_sentences,
    in_test_split,
)


def test_wiki_entity_is_reproducible_and_traceable(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert build_benchmark("wiki-entity", WIKI_SAMPLE, a, n=30, seed=3) == 30
    build_benchmark("wiki-entity", WIKI_SAMPLE, b, n=30, seed=3)
    assert a.read_bytes() == b.read_bytes()
    records = [json.loads(x) for x in a.read_text().splitlines()]
    docs = {d["id"]: d for d in map(json.loads, WIKI_SAMPLE.read_text().splitlines())}
    for r in records:
        p = r["provenance"]
        assert p["builder"] == "wiki-entity" and p["seed"] == 3 and p["split"] == "test" and p["builder_version"] == 3
        assert len(p["corpus_sha256"]) == 64
        assert in_test_split(p["doc_id"], 3, p["test_fraction"])
        assert r["answers"] == [docs[p["doc_id"]]["description"]] and p["doc_id"] in r["question"]
    assert len(load_qa(a)) == 30
    other = tmp_path / "c.jsonl"
    build_benchmark("wiki-entity", WIKI_SAMPLE, other, n=30, seed=4)
    assert other.read_bytes() != a.read_bytes()
    mc = tmp_path / "mc.jsonl"
    build_benchmark("wiki-entity", WIKI_SAMPLE, mc, n=10, seed=3, choices=4)
    items = load_qa(mc)
    assert [it.question for it in items] == [json.loads(x)["question"] for x in a.read_text().splitlines()][:10]
    for it in items:
        assert len(it.choices) == 4 and len({c.lower() for c in it.choices}) == 4
        assert it.answers == [docs[it.meta["provenance"]["doc_id"]]["description"]]


KERNEL_NEW = [
    {"id": f"6.12/Documentation/net/doc{i}.rst", "path": f"Documentation/net/doc{i}.rst", "text": text}
    for i, text in enumerate([
        "Title\n=====\n\nThe packet_mmap interface lets user space share a ring buffer with the kernel driver.\n"
        "It has been rewritten for this release so that the TPACKET_V3 format supports variable frames.\n\n"
        "  code block that is skipped\n",
        "The NAPI budget decides how many packets the poll function of a driver may process at once.\n\n"
        "* a list item that is skipped because of markup\n\n"
        "Drivers call netif_napi_add when they set up their receive queues during the probe.\n",
    ])
]
KERNEL_OLD = [
    {"id": "6.1/Documentation/net/doc0.rst", "path": "Documentation/net/doc0.rst",
     "text": "The packet_mmap interface lets user space share a ring buffer\nwith the kernel driver.\n"},
    {"id": "6.1/Documentation/net/doc1.rst", "path": "Documentation/net/doc1.rst", "text": "Old text only.\n"},
]


def test_kernel_cloze_marks_sentences_of_the_old_version(tmp_path):
    new = write_jsonl(tmp_path / "new.jsonl", KERNEL_NEW)
    old = write_jsonl(tmp_path / "old.jsonl", KERNEL_OLD)
    recs = build_kernel_cloze(new, n=10, seed=0, old=old, test_fraction=1.0)
    by_sentence = {r["provenance"]["sentence"]: r for r in recs}
    assert set(by_sentence) == {  # prose only: no title, code, list item
        "The packet_mmap interface lets user space share a ring buffer with the kernel driver.",
        "It has been rewritten for this release so that the TPACKET_V3 format supports variable frames.",
        "The NAPI budget decides how many packets the poll function of a driver may process at once.",
        "Drivers call netif_napi_add when they set up their receive queues during the probe."}
    in_old = {s: r["provenance"]["in_old"] for s, r in by_sentence.items()}
    assert {r["provenance"]["builder_version"] for r in recs} == {4}  # the blank is never inside another token
    assert sum(in_old.values()) == 1 and in_old[next(s for s in in_old if "packet_mmap" in s)]  # line breaks ignored
    for s, r in by_sentence.items():
        (answer,) = r["answers"]
        assert r["question"].endswith(s.replace(answer, BLANK, 1)) and answer in {
            "packet_mmap", "TPACKET_V3", "NAPI", "netif_napi_add"}
    assert [r["provenance"]["in_old"] for r in recs[:2]] == [True, False]  # balanced: old and new alternate
    assert build_kernel_cloze(new, n=10, seed=0, old=old, test_fraction=1.0) == recs
    mc = build_kernel_cloze(new, n=10, seed=0, old=old, test_fraction=1.0, choices=3)
    for r in mc:
        assert len(r["choices"]) == 3 and r["choices"][r["answer"]] in r["provenance"]["sentence"]
    # 5 choices need 4 other identifiers: the corpus blanks only 3 (2 options would have doubled the chance rate)
    with pytest.raises(RetrolmError, match=r"5 choices need 4 other blanked words of the kind of .*; the corpus "
                                           r"has [0-3]: ask for fewer --choices"):
        build_kernel_cloze(new, n=10, seed=0, old=old, test_fraction=1.0, choices=5)


def test_kernel_cloze_asks_a_sentence_once_and_never_offers_a_second_right_answer(tmp_path):
    """A sentence in two files was asked twice; a wrong option could fill the blank into a sentence the corpus holds
    (uac2 vs mass_storage in "The function name to use ... is mass_storage."); a blanked sentence other files
    complete with another word has two right answers."""
    template = "The function name to use when creating the function directory is {}."
    docs = [{"id": f"6.12/Documentation/usb/{n}.rst", "path": f"Documentation/usb/{n}.rst",
             "text": template.format(w) + "\n\nThe gadget driver registers GadgetFS_" + n + " with the composite "
                     "framework during its bind callback.\n"} for n, w in (("a", "mass_storage"), ("b", "uac2"))]
    docs.append({"id": "6.12/Documentation/usb/c.rst", "path": "Documentation/usb/c.rst",
                 "text": "The gadget driver registers GadgetFS_a with the composite framework during its bind "
                         "callback.\n"})  # doc a's second sentence, again
    corpus = write_jsonl(tmp_path / "usb.jsonl", docs)
    for seed in range(6):
        recs = build_kernel_cloze(corpus, n=10, seed=seed, test_fraction=1.0, balance=False)
        sentences = [r["provenance"]["sentence"] for r in recs]
        assert len(sentences) == len(set(sentences))  # asked once
        assert all(r["answers"][0] not in ("mass_storage", "uac2") for r in recs)  # two files, two answers
    # completed otherwise by a file outside the test split, or with the blank on another word of it
    names = [f"Documentation/usb/f{i}.rst" for i in range(40)]
    test, train = (next(n for n in names if in_test_split(n, 0, 0.5) is flag) for flag in (True, False))
    split = write_jsonl(tmp_path / "split.jsonl", [
        {"id": f"6.12/{test}", "path": test, "text": "The probe routine sets CONFIG_FOO_BAR when the device answers "
                                                     "the first request."},
        {"id": f"6.12/{train}", "path": train, "text": "The probe routine sets CONFIG_BAZ_QUX when the device answers "
                                                       "the first request."}])
    assert build_kernel_cloze(split, n=10, seed=0, test_fraction=0.5, balance=False) == []
    # offered as a wrong option, a word must not complete the question into a sentence of the corpus
    only_a = write_jsonl(tmp_path / "a.jsonl", [docs[0], {**docs[1], "id": "6.1/other", "path": "other"}])
    for seed in range(6):
        for r in build_kernel_cloze(only_a, n=10, seed=seed, test_fraction=0.5, balance=False, choices=2):
            if r["choices"][r["answer"]] == "mass_storage":
                assert "uac2" not in r["choices"]


def test_wiki_entity_asks_no_title_that_names_its_answer(tmp_path):
    """"What is Tanker (ship)?" had one option with "ship": 182 of 908 questions were answered by the title."""
    from retrolm.text.qa import build_wiki_entity

    docs = [{"id": "Tanker (ship)", "description": "Ship designed to transport liquids", "topic": "t"},
            {"id": "Lake Huron", "description": "One of the Great Lakes of North America", "topic": "t"},
            {"id": "Zorblat", "description": "Fictional mineral used in tests", "topic": "t"},
            {"id": "Quenmir", "description": "Invented river of a made-up land", "topic": "t"}]
    recs = build_wiki_entity(write_jsonl(tmp_path / "w.jsonl", docs), n=10, seed=0, test_fraction=1.0)
    assert sorted(r["provenance"]["doc_id"] for r in recs) == ["Quenmir", "Zorblat"]


def test_in_old_is_by_content_so_moved_files_count(tmp_path):
    """A sentence of a file that moved between versions is in the store even though no old file has its path."""
    moved = [{"id": "6.12/Documentation/arch/x86/boot.rst", "path": "Documentation/arch/x86/boot.rst",
              "text": "The boot protocol hands the kernel a zero page filled in by GRUB at startup.\n"}]
    old = write_jsonl(tmp_path / "old.jsonl", [
        {"id": "6.1/Documentation/x86/boot.rst", "path": "Documentation/x86/boot.rst",
         "text": "Intro.\n\nThe boot protocol hands the kernel a zero page\nfilled in by GRUB at startup.\n"}])
    (rec,) = build_kernel_cloze(write_jsonl(tmp_path / "new.jsonl", moved), n=5, old=old, test_fraction=1.0)
    assert rec["provenance"]["in_old"] is True
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "6.1/x", "path": "x", "text": "The boot protocol hands "
                                                   "the kernel a zero page filled in by GRUB at boot time."}])
    (rec,) = build_kernel_cloze(write_jsonl(tmp_path / "new.jsonl", moved), n=5, old=other, test_fraction=1.0)
    assert rec["provenance"]["in_old"] is False  # most of its words, not the sentence


def test_bad_corpus_lines_and_too_many_choices_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    for content, message in [(b'{"id": "a", "text": "ok"}\n\xff\xfe\n', r"bad.jsonl:2: not UTF-8"),
                             (b'[1, 2]\n', r"bad.jsonl:1: expected a JSON object with an 'id'"),
                             (b'{"text": "no id"}\n', r"bad.jsonl:1: expected a JSON object with an 'id'")]:
        bad.write_bytes(content)
        with pytest.raises(RetrolmError, match=message):
            build_kernel_cloze(bad)
    bad.write_bytes(b'\xef\xbb\xbf' + json.dumps(KERNEL_NEW[0]).encode() + b"\n")  # a BOM is not an error
    assert build_kernel_cloze(bad, test_fraction=1.0)
    with pytest.raises(RetrolmError, match=r"10000 choices need 9999 other answers .* ask for fewer --choices"):
        build_benchmark("wiki-entity", WIKI_SAMPLE, tmp_path / "q.jsonl", n=5, choices=10000)


def test_cloze_helpers():
    assert cloze_sentences("Short one.\n\nThis sentence has far too few words.") == []
    assert choose_blank("the cat sat on the mat with another cat today.", random.Random(0)) is None  # nothing specific
    masked, word = choose_blank("Call kmalloc_array before you touch the buffer of this device.", random.Random(0))
    assert word == "kmalloc_array" and masked == f"Call {BLANK} before you touch the buffer of this device."
    # a word that appears inside another token of the sentence would give itself away: never the blank
    # (the question's own prefix included: it names Linux); inside a word it gives nothing away
    for sentence, leak in [("DAMON uses the mailing lists (damon@lists.linux.dev) for its patches.", "DAMON"),
                           ("Set explicit LP-11 or LP-111 state for the Synopsys lanes.", "LP-11"),
                           ("Boot Linux with these Synopsys options for the board.", "Linux")]:
        for seed in range(20):
            got = choose_blank(sentence, random.Random(seed))
            assert got is None or got[1] != leak, (sentence, seed)
    assert {choose_blank("The PECI bus follows the specification.", random.Random(seed))[1]
            for seed in range(10)} == {"PECI"}


def test_corpus_qa_cli(tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    rc, stdout, err = run_cli(["corpus", "qa", "wiki-entity", "--corpus", WIKI_SAMPLE, "--out", out, "-n", "5",
                               "--choices", "3"], capsys)
    assert rc == 0, err
    assert "5 wiki-entity questions" in stdout
    assert all(len(it.choices) == 3 for it in load_qa(out))
    rc, _, err = run_cli(["corpus", "qa", "wiki-entity", "--corpus", WIKI_SAMPLE, "--out", out, "--old", out],
                         capsys)
    assert rc == 2 and "does not take --old" in err
    rc, _, err = run_cli(["corpus", "qa", "trivia", "--corpus", WIKI_SAMPLE, "--out", out], capsys)
    assert rc == 2 and "unknown" in err
    for option, value, message in [("--choices", "1", "--choices 1: a multiple-choice question needs >= 2 options"),
                                   ("--test-fraction", "5", "--test-fraction 5.0: a share of the documents"),
                                   ("--test-fraction", "0", "--test-fraction 0.0: a share of the documents")]:
        rc, _, err = run_cli(["corpus", "qa", "wiki-entity", "--corpus", WIKI_SAMPLE, "--out", tmp_path / "bad.jsonl",
                              option, value], capsys)
        assert_one_line_error(rc, err, message)
    assert not (tmp_path / "bad.jsonl").exists()
    with pytest.raises(RetrolmError, match="usable 'description'"):
        build_benchmark("wiki-entity", write_jsonl(tmp_path / "k.jsonl", KERNEL_NEW), out)


def synset(i: int, lemmas: list[str], definition: str, pos: str = "noun", lexfile: int = 4) -> dict:
    return {"id": f"wordnet/{pos}/{i:08d}", "text": f"{', '.join(lemmas)} ({pos}): {definition}", "lemmas": lemmas,
            "pos": pos, "lexfile": lexfile, "definition": definition}


WORDNET = [
    synset(1, ["abaction"], "stealing cattle on a large scale"),
    synset(2, ["cystolith"], "a calculus formed in the bladder"),
    synset(3, ["toccata"], "a baroque composition for a keyboard instrument"),  # no entry in the store
    synset(4, ["bank"], "a sloping land beside a body of water"),  # two senses: ambiguous
    synset(5, ["bank"], "a financial institution that accepts deposits", lexfile=14),
    synset(6, ["Paris", "capital of France"], "the capital and largest city of France"),  # not a lowercase word
    synset(7, ["greedily"], "in a greedy manner", pos="adverb", lexfile=2),  # the definition gives it away
    synset(15, ["coyly"], "in a shy and modest manner", pos="adverb", lexfile=2),
    synset(16, ["moodily"], "in a moody manner", pos="adverb", lexfile=2),  # a stem, not the word, gives it away
    synset(8, ["gormandize"], "eat immoderately and greedily", pos="verb", lexfile=34),
    synset(14, ["eat up"], "eat a large amount of food quickly", pos="verb", lexfile=34),  # not one word
    synset(11, ["glut"], "overeat or eat immodestly", pos="verb", lexfile=34),
    synset(9, ["quire"], "a collection of twenty four sheets of paper"),
    synset(10, ["rampart"], "an embankment built around a space for defensive purposes"),
    synset(17, ["decolonise", "decolonize"], "make a former dependency independent", pos="verb", lexfile=40),
    synset(12, ["cobble"], "a rounded stone used for paving", lexfile=6),
    synset(13, ["yawl"], "a sailing vessel with two masts, the smaller one abaft the rudder post and several further "
                         "words that make its definition too long for a question to be fair", lexfile=6),
    # never asked (several words): distractors of other lexicographer files and lengths, and one naming a word
    *(synset(20 + i, [f"stone {i}"], f"a kind of building stone number {i} from the quarry", lexfile=6)
      for i in range(6)),
    synset(30, ["long thing"], "a definition of the same lexicographer file that is far too long to stand beside any "
                               "short one"),
    synset(31, ["plant deposit"], "a deposit like the cystoliths found in the leaves of nettles"),
]
GCIDE = [
    {"id": "gcide/Abaction", "text": "Abaction, n. Stealing cattle on a large scale. [Obs.]", "headword": "Abaction",
     "headwords": ["Abaction"]},
    {"id": "gcide/Cystolith", "text": "Cystolith, n. 1. (Bot.) A concretion of mineral matter.\n2. (Med.) A "
                                      "urinary calculus.", "headword": "Cystolith", "headwords": ["Cystolith"]},
    {"id": "gcide/Gormandize", "text": "Gormandize, v. i. To eat greedily.", "headword": "Gormandize",
     "headwords": ["Gormandize", "Gourmandize"]},
    {"id": "gcide/Quire", "text": "Quire, n. A collection of twenty-four sheets of paper.", "headword": "Quire",
     "headwords": ["Quire"]},
    {"id": "gcide/Rampart", "text": "Rampart, n. That which secures; a bulwark.", "headword": "Rampart",
     "headwords": ["Rampart", "Cobble"]},  # cobble is listed under rampart but heads nothing
    {"id": "gcide/Glut", "text": "Glut, v. t. To swallow greedily. Overeat or eat immodestly", "headword": "Glut",
     "headwords": ["Glut"]},
    {"id": "gcide/Coyly", "text": "Coyly, adv. In a coy manner.", "headword": "Coyly", "headwords": ["Coyly"]},
    {"id": "gcide/Decolonise", "text": "Decolonise, v. To make a former dependency independent.",
     "headword": "Decolonise", "headwords": ["Decolonise", "Decolonize"]},
]


def test_dict_def_asks_rare_unambiguous_words_the_store_defines(tmp_path):
    wordnet, gcide = write_jsonl(tmp_path / "wn.jsonl", WORDNET), write_jsonl(tmp_path / "gc.jsonl", GCIDE)
    alone = build_benchmark("dict-def", wordnet, tmp_path / "all.jsonl", n=20, test_fraction=1.0)
    asked = {it.query for it in load_qa(tmp_path / "all.jsonl")}
    # not bank (two senses), Paris, greedily and moodily (their definitions name their stem), yawl (over 25 words);
    # one question for decolonise / decolonize
    assert alone == len(asked) == 10
    assert asked == {"abaction", "cystolith", "toccata", "coyly", "gormandize", "quire", "rampart", "glut", "cobble",
                     "decolonise"}
    # the test split is drawn by synset
    half = build_dict_def(wordnet, n=20, test_fraction=0.5, seed=2)
    assert 0 < len(half) < 10
    assert {r["provenance"]["doc_id"] for r in half} == {
        d["id"] for d in WORDNET if d["lemmas"][0] in asked and in_test_split(d["id"], 2, 0.5)}
    recs = build_dict_def(wordnet, n=20, store=gcide, test_fraction=1.0, choices=3)
    by_word = {r["provenance"]["word"]: r for r in recs}
    assert set(by_word) == {"abaction", "cystolith", "gormandize", "quire", "rampart", "glut", "coyly", "decolonise"}
    # verbatim (case and spaces aside) in the word's own entry, or not: the hyphen of "twenty-four" is a difference
    in_store = {w: r["provenance"]["in_store"] for w, r in by_word.items()}
    assert in_store == {"abaction": True, "cystolith": False, "gormandize": False, "quire": False, "rampart": False,
                        "glut": True, "coyly": False, "decolonise": True}
    assert [r["provenance"]["in_store"] for r in recs[:6]] == [True, False] * 3  # balanced, then the rest
    assert by_word["gormandize"]["provenance"]["store_doc_ids"] == ["gcide/Gormandize"]
    assert recs[0]["provenance"]["store_sha256"] == hashlib.sha256(gcide.read_bytes()).hexdigest()
    defs = {d["lemmas"][0]: d for d in WORDNET}
    for w, r in by_word.items():
        assert r["query"] == w and r["question"] == f'What does the word "{w}" mean?'
        gold = r["choices"][r["answer"]]
        assert gold == defs[w]["definition"] and len(set(r["choices"])) == 3
        others = [d for d in WORDNET if d["definition"] in r["choices"] and d["definition"] != gold]
        assert all(d["pos"] == defs[w]["pos"] for d in others)  # same part of speech, similar length
        assert all(len(gold.split()) / 2 <= len(d["definition"].split()) <= 2 * len(gold.split()) for d in others)
    for seed in range(10):  # options come from the word's lexicographer file first, and never name the word
        for r in build_dict_def(wordnet, n=20, store=gcide, test_fraction=1.0, choices=3, seed=seed):
            if r["provenance"]["pos"] == "noun" and r["provenance"]["word"] != "cobble":
                assert {d["lexfile"] for d in WORDNET if d["definition"] in r["choices"]} == {4}
            if r["provenance"]["word"] == "cystolith":
                assert not any("cystoliths" in c for c in r["choices"])
    assert build_dict_def(wordnet, n=20, store=gcide, test_fraction=1.0, choices=3) == recs
    assert build_dict_def(wordnet, n=20, store=gcide, test_fraction=1.0, choices=3, seed=1) != recs
    with pytest.raises(RetrolmError, match=r"4 choices need 3 other (verb|adverb) definitions about as long as that "
                                           r"of '(gormandize|glut|coyly)'; the corpus has 2: ask for fewer --choices"):
        build_dict_def(wordnet, n=20, store=gcide, test_fraction=1.0, choices=4)
    with pytest.raises(RetrolmError, match=r"no synsets .* `retrolm corpus fetch wordnet`"):
        build_dict_def(gcide)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "gcide/X", "text": "X", "headwords": "X"}])
    with pytest.raises(RetrolmError, match=r"bad\.jsonl: document 'gcide/X': 'headword' must be a string or null"):
        build_dict_def(wordnet, store=bad)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{**WORDNET[0], "pos": ["noun"]}])  # not a synset: skipped, no traceback
    with pytest.raises(RetrolmError, match=r"no synsets"):
        build_dict_def(odd)


def test_no_two_options_differ_only_in_case():
    """Options were distinct from the answer case aside, but one pool could give both "raid5" and "RAID5" (4 of 1,000
    kernel-cloze questions): a test-taker rules the pair out, and option_index finds two matches."""
    import random

    from retrolm.text.qa import _distractors, _draw

    for seed in range(40):
        rng = random.Random(seed)
        drawn = _draw([["RAID5", "raid5", "raid1"], ["Raid1", "mdadm", "md0"]], "raid10", 3, rng, lambda w: True)
        assert len(drawn) == 3 and len({d.lower() for d in drawn}) == 3
        picked = _distractors("NUMA", ["FORM2", "Form2", "numa"], ["domainID", "form2", "node"], 3, rng)
        assert len(picked) == 3 and len({p.lower() for p in picked}) == 3 and "numa" not in {p.lower() for p in picked}
