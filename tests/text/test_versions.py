"""Two versions of a corpus: documents of the new one labelled identical / changed / new by content, and a seeded,
labelled held-out sample."""

from __future__ import annotations

import json

import pytest

from conftest import wiki_docs, write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.text.corpus import Document
from retrolm.text.versions import NgramIndex, VersionLabeller, label_versions, split_versions, truncate, word_ngrams


def doc(i: str, text: str) -> Document:
    return Document(i, text, i)


def test_labels_are_by_content_not_by_path():
    base = wiki_docs(4, start=500)
    old = [doc(f"old/{d['id']}", d["text"]) for d in base]
    words = base[1]["text"].split()
    edited = " ".join(words[: int(len(words) * 0.6)] + ["entirely", "rewritten", "ending", "here"] * 3)
    new = [
        doc("new/moved.rst", base[0]["text"]),  # same text under another path: identical
        doc("new/edited.rst", edited),  # most of one old file: changed
        doc("new/fresh.rst", wiki_docs(1, start=900)[0]["text"]),  # unrelated: new
        doc("new/mixed.rst", base[2]["text"][:150] + " " + " ".join(d["text"] for d in wiki_docs(6, start=901))),
    ]
    labels = {lab.id: lab for lab in label_versions(old, new)}
    assert labels["new/moved.rst"].bucket == "identical" and labels["new/moved.rst"].best_match == old[0].id
    assert labels["new/edited.rst"].bucket == "changed" and labels["new/edited.rst"].best_match == old[1].id
    assert 0.3 < labels["new/edited.rst"].overlap < 1
    assert labels["new/fresh.rst"].bucket == "new" and labels["new/fresh.rst"].overlap <= 0.3
    assert labels["new/mixed.rst"].bucket == "new"  # a little shared text does not make it a version of the old one
    with pytest.raises(RetrolmError, match="new_max_overlap"):
        label_versions(old, new, new_max_overlap=1.0)


def test_a_copy_with_other_line_ends_or_unicode_form_is_identical():
    """The same text saved with CRLF line ends or in decomposed Unicode (NFD) is the old document, whole or in part;
    one changed character is not."""
    import unicodedata

    text = "Le café naïve résumé.\nSecond line of the déjà vu file, with more words to count here.\nThird line.\n"
    labeller = VersionLabeller([doc("old/a.rst", text)])
    for copy in (text.replace("\n", "\r\n"), unicodedata.normalize("NFD", text)):
        assert copy != text
        lab = labeller.label(doc("new/a.rst", copy))
        assert (lab.bucket, lab.best_match, lab.overlap) == ("identical", "old/a.rst", 1.0)
        part = labeller.label_excerpt(doc("new/a.rst", copy[: len(copy) // 2]))
        assert (part.bucket, part.best_match) == ("identical", "old/a.rst")
    nfd = labeller.label(doc("new/b.rst", unicodedata.normalize("NFD", text).replace("Third", "Fourth")))
    assert nfd.bucket == "changed" and nfd.overlap > 0.6  # NFD words are the same words, not split at accents


def test_ngram_index_finds_the_best_old_document():
    texts = ["alpha beta gamma delta epsilon zeta eta theta iota kappa", "one two three four five six seven eight"]
    index = NgramIndex(texts, n=8)
    assert index.best_match("alpha beta gamma delta epsilon zeta eta theta") == (0, 1.0)
    best, share = index.best_match("one two three four five six seven eight nine ten")
    assert best == 1 and share == pytest.approx(1 / 3)  # 1 of its 3 distinct 8-grams is in document 1
    assert index.best_match("nothing in common at all here, friends") == (-1, 0.0)
    assert len(word_ngrams("a b c", 8)) == 1  # a text shorter than n is one n-gram


def test_split_versions_writes_a_seeded_labelled_sample(tmp_path):
    base = wiki_docs(30, start=600)
    old = write_jsonl(tmp_path / "old.jsonl", [{"id": f"1/{d['id']}", "text": d["text"]} for d in base])
    new_docs = [{"id": f"2/{d['id']}", "text": d["text"]} for d in base[:20]]  # identical
    new_docs += [{"id": f"2/x/{d['id']}", "text": "Revised. " + d["text"] + "\n" + "Added paragraph. " * 5}
                 for d in base[20:25]]
    new_docs += [{"id": f"2/translations/{d['id']}", "text": d["text"]} for d in wiki_docs(3, start=950)]
    new_docs += [{"id": f"2/n/{d['id']}", "text": d["text"]} for d in wiki_docs(6, start=960)]
    new = write_jsonl(tmp_path / "new.jsonl", new_docs)
    counts = split_versions([old], [new], tmp_path / "a", per_bucket=4, seed=1, max_chars=300, min_chars=0)
    assert counts["all"] == {"identical": 20, "changed": 5, "new": 9} and counts["heldout"] == {
        "identical": 4, "changed": 4, "new": 4}
    held = [json.loads(x) for x in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert [h["bucket"] for h in held] == ["identical"] * 4 + ["changed"] * 4 + ["new"] * 4
    assert not any("translations/" in h["id"] for h in held)  # kept out of the held-out sample
    assert all(len(h["text"]) <= 300 for h in held)
    rest = [json.loads(x)["id"] for x in (tmp_path / "a" / "rest.jsonl").read_text().splitlines()]
    assert len(rest) == len(new_docs) - 12 and not {h["id"] for h in held} & set(rest)
    per_bucket = (tmp_path / "a" / "heldout-changed.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in per_bucket] == [h["id"] for h in held if h["bucket"] == "changed"]
    # the same seed gives the same sample; another seed another one
    split_versions([old], [new], tmp_path / "b", per_bucket=4, seed=1, max_chars=300, min_chars=0)
    assert (tmp_path / "b" / "heldout.jsonl").read_text() == (tmp_path / "a" / "heldout.jsonl").read_text()
    split_versions([old], [new], tmp_path / "c", per_bucket=4, seed=2, max_chars=300, min_chars=0)
    assert (tmp_path / "c" / "heldout.jsonl").read_text() != (tmp_path / "a" / "heldout.jsonl").read_text()


def test_rest_holds_no_copy_of_a_held_out_document_and_outputs_never_replace_inputs(tmp_path):
    """Labels compare with the old version only: a new document with a twin in the new version (two files of one
    text) was held out as "new" while its twin went into rest.jsonl, so a store of old + rest held its text. And
    `corpus versions` wrote over its own input (--new out/rest.jsonl --out out)."""
    old = write_jsonl(tmp_path / "old.jsonl", [{"id": f"o/{d['id']}", "text": d["text"]} for d in wiki_docs(5)])
    twins = wiki_docs(4, start=300)
    new_docs = [{"id": f"n/{d['id']}", "text": d["text"]} for d in twins]
    new_docs += [{"id": f"n/{d['id']}-twin", "text": "Moved here.\n" + d["text"]} for d in twins]
    new = write_jsonl(tmp_path / "new.jsonl", new_docs)
    split_versions([old], [new], tmp_path / "s", per_bucket=2, seed=0, min_chars=0)
    held = [json.loads(x)["id"] for x in (tmp_path / "s" / "heldout.jsonl").read_text().splitlines()]
    rest = [json.loads(x)["id"] for x in (tmp_path / "s" / "rest.jsonl").read_text().splitlines()]
    assert len(held) == 2 and len(rest) == 4  # the held-out documents' twins are left out
    assert all(h.removesuffix("-twin") != r.removesuffix("-twin") for h in held for r in rest)
    labels = json.loads((tmp_path / "s" / "labels.json").read_text())
    assert {c["copy_of"] for c in labels["rest_copies_left_out"]} == set(held)
    assert labels["counts"]["rest"] == 4 and labels["counts"]["rest_copies_left_out"] == 2
    before = (tmp_path / "s" / "rest.jsonl").read_text()
    with pytest.raises(RetrolmError, match=r"rest\.jsonl: corpus versions would replace its own input"):
        split_versions([old], [tmp_path / "s" / "rest.jsonl"], tmp_path / "s", per_bucket=1, min_chars=0)
    assert (tmp_path / "s" / "rest.jsonl").read_text() == before
    with pytest.raises(RetrolmError, match="output folder is inside the corpus folder"):
        split_versions([old], [tmp_path / "s"], tmp_path / "s" / "again", per_bucket=1, min_chars=0)


def test_a_held_out_excerpt_is_labelled_by_what_is_stored(tmp_path):
    """A changed file whose first characters are all new text is a *new* excerpt, and one whose first characters
    are verbatim old text (the change further down) an *identical* one: with max_chars neither is held out as
    changed (another changed file is drawn instead), and every changed excerpt shares > 30% with one old file and
    holds text the old one does not."""
    base = [d for d in wiki_docs(40, start=600) if len(d["text"]) > 400][:7]
    old = write_jsonl(tmp_path / "old.jsonl", [{"id": f"1/{d['id']}", "text": d["text"]} for d in base])
    fresh = [d for d in wiki_docs(30, start=960) if len(d["text"]) > 400]
    # a change inside the excerpt: changed as a document and as an excerpt
    new_docs = [{"id": f"2/mid/{d['id']}", "text": d["text"][:100] + " Revised here. " + d["text"][100:]}
                for d in base[:3]]
    # new text first (longer than the excerpt), then the whole old file: changed as a document, new as an excerpt
    new_docs += [{"id": f"2/head/{d['id']}", "text": f["text"][:400] + "\n" + d["text"] * 3}
                 for d, f in zip(base[3:5], fresh, strict=False)]
    # old text first, the change past the excerpt: changed as a document, identical as an excerpt
    new_docs += [{"id": f"2/tail/{d['id']}", "text": d["text"] + "\n" + "Added paragraph. " * 5} for d in base[5:7]]
    new = write_jsonl(tmp_path / "new.jsonl", new_docs)
    counts = split_versions([old], [new], tmp_path / "a", per_bucket=4, seed=0, max_chars=250, min_chars=0)
    assert counts["all"]["changed"] == 7  # documents are labelled whole
    held = [json.loads(x) for x in (tmp_path / "a" / "heldout-changed.jsonl").read_text().splitlines()]
    assert sorted(h["id"] for h in held) == sorted(d["id"] for d in new_docs[:3])
    old_text = {f"2/mid/{d['id']}": d["text"] for d in base[:3]}
    assert all(h["excerpt_overlap"] > 0.3 and h["text"] not in old_text[h["id"]] for h in held)


def test_truncate_cuts_at_a_line_break():
    text = "first line\nsecond line\nthird line that is long"
    assert truncate(text, 30) == "first line\nsecond line"
    assert truncate(text, None) == text and truncate(text, 1000) == text
    assert truncate("no breaks at all here", 8) == "no break"
    assert truncate("The capital of France is Paris. " * 3, 40) == "The capital of France is Paris. The"  # not "capi"
    assert truncate("line one\r\nline two is longer\r\nthird", 30) == "line one\r\nline two is longer"


def test_bad_lines_of_either_version_are_reported(tmp_path, caplog):
    """The labelling is the only pass over both versions: a line it cannot read is said, not dropped silently."""
    import logging

    base = wiki_docs(4, start=500)
    old = write_jsonl(tmp_path / "old.jsonl", base)
    new = tmp_path / "new.jsonl"
    write_jsonl(new, base)
    with open(new, "a") as f:
        f.write('{broken json\n{"id": "nt", "txt": "no text field"}\n')
    with caplog.at_level(logging.WARNING):
        counts = split_versions([old], [new], tmp_path / "out", per_bucket=1, seed=0, min_chars=0)
    assert sum(counts["all"].values()) == 4
    assert "new.jsonl:5: invalid JSON" in caplog.text and "new.jsonl:6" in caplog.text
