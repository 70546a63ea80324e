"""Ingestion: every supported format, and bad files skipped or repaired with a warning naming them."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli, wiki_docs, write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.text.corpus import iter_documents, split_corpus

HTML = """<html><head><title>T</title><script>var tracking = 1;</script></head><body>
<nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<article><h1>Chunked cross-attention</h1>
<p>RETRO splits every training sequence into chunks of sixty-four tokens and retrieves neighbours for each chunk
from a database of two trillion tokens, which it encodes with a frozen BERT model.</p>
<p>The decoder attends to the encoded neighbours through chunked cross-attention, so that each chunk only sees
neighbours retrieved with the previous chunk, which keeps the model causal.</p></article>
<footer>Copyright 2021. Cookie settings.</footer></body></html>"""


def test_folder_of_text_markdown_html(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Alpha document.\nSecond line.")
    (tmp_path / "sub" / "b.md").write_text("# Title\n\nMarkdown body.")
    (tmp_path / "page.html").write_text(HTML)
    docs = {d.id: d for d in iter_documents([tmp_path])}
    assert set(docs) == {"a.txt", "sub/b.md", "page.html"}
    assert docs["a.txt"].text == "Alpha document.\nSecond line."
    html_text = docs["page.html"].text
    assert "chunked cross-attention" in html_text and "sixty-four tokens" in html_text
    assert "tracking" not in html_text and "Cookie" not in html_text  # script and boilerplate removed


def test_jsonl_text_and_contents_fields_and_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1, "text": "one"}\n\n{"id": "two", "contents": "deux"}\n')
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["first row", "second row"]}), tmp_path / "b.parquet")
    docs = [(d.id, d.text) for d in iter_documents([tmp_path / "a.jsonl", tmp_path / "b.parquet"])]
    assert docs == [("1", "one"), ("two", "deux"), ("p1", "first row"), ("p2", "second row")]


def test_a_parquet_file_damaged_inside_is_skipped_with_a_warning(tmp_path, caplog):
    """The footer reads but a page does not: a warning naming the file (it was an OSError traceback)."""
    bad = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": ["1", "2", "3", "4"]}), bad, row_group_size=2)
    column = pq.ParquetFile(bad).metadata.row_group(1).column(0)
    data = bytearray(bad.read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    data[start : start + 8] = b"\xff" * 8  # the page header no longer deserializes
    bad.write_bytes(bytes(data))
    (tmp_path / "a.txt").write_text("fine text")
    with caplog.at_level(logging.WARNING):
        docs = [d.id for d in iter_documents([tmp_path])]
    assert docs == ["a.txt"]
    assert f"skipping the rest of {bad} from row 1: cannot read" in caplog.text


def test_unpaired_surrogate_escapes_in_jsonl_are_replaced(tmp_path, caplog):
    """JSON can escape half an emoji ("\\ud83d"): the tokenizer and every UTF-8 file failed on such text (a
    traceback from `db build`)."""
    (tmp_path / "a.jsonl").write_text('{"id": "x\\udc00", "text": "cut \\ud83d emoji, whole \\ud83d\\ude00"}\n')
    with caplog.at_level(logging.WARNING):
        (doc,) = iter_documents([tmp_path / "a.jsonl"])
    assert doc.text == "cut \ufffd emoji, whole \U0001F600" and doc.id == "x\ufffd"
    assert "a.jsonl:1: unpaired UTF-16 surrogate escapes replaced" in caplog.text
    doc.text.encode("utf-8")


def test_a_file_name_that_is_not_utf8_gives_documents_named_in_utf8(tmp_path, caplog):
    """Python holds such a name's bytes as lone surrogates: the build failed at its end, writing the ids and sources
    (and again at every rerun)."""
    import os

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine text")
    for name in (b"caf\xe9.txt", b"caf\xe8.txt"):
        with open(os.path.join(os.fsencode(folder), name), "w") as f:
            f.write("latin-1 name")
    with open(os.path.join(os.fsencode(folder), b"notes\xff.jsonl"), "w") as f:
        f.write('{"id": "n1", "text": "a record"}\n')
    with caplog.at_level(logging.WARNING):
        docs = list(iter_documents([folder]))
    assert sorted(d.id for d in docs) == ["caf\\xe8.txt", "caf\\xe9.txt", "n1", "ok.txt"]  # two names, two ids
    assert all(d.id.encode("utf-8") and d.source.encode("utf-8") for d in docs)  # every id and source can be written
    assert {d.source for d in docs if d.id == "n1"} == {f"{folder}/notes\\xff.jsonl:1"}
    assert "its name is not valid UTF-8" in caplog.text


def test_bad_files_are_skipped_or_repaired_with_warnings(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "binary.dat").write_bytes(b"\x00\x01\x02garbage\x00")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "text": "ok"}\nnot json\n{"text": "no id"}\n')
    with caplog.at_level(logging.WARNING):
        docs = {d.id: d.text for d in iter_documents([tmp_path])}
    assert docs == {"good.txt": "fine text", "latin1.txt": "caf\ufffd au lait", "x": "ok"}
    log = caplog.text
    assert "binary.dat: binary file" in log
    assert "empty.txt: empty document" in log
    assert "latin1.txt: not valid UTF-8" in log
    assert "bad.jsonl:2: invalid JSON" in log
    assert "bad.jsonl:3: expected an object with an 'id' field" in log


def test_bom_corrupt_gzip_hidden_folders_and_links(tmp_path, caplog):
    """A JSONL file with a byte-order mark keeps its first record, and a text file's text does not start with the
    mark; a corrupt .jsonl.gz is skipped with a warning, an upper-case .JSONL.GZ is read (it was taken for
    binary); hidden folders (.git/) are not corpus; a link to a file the folder holds is read once, not refused."""
    import gzip

    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"id": "first", "text": "one"}\n{"id": "second", '
                                         b'"text": "two"}\n')
    (tmp_path / "bom.md").write_bytes(b"\xef\xbb\xbfHello BOM")
    (tmp_path / "UPPER.JSONL.GZ").write_bytes(gzip.compress(b'{"id": "up", "text": "upper case name"}\n'))
    good = gzip.compress(b'{"id": "z", "text": "zipped"}\n' * 200)
    (tmp_path / "broken.jsonl.gz").write_bytes(good[:40] + bytes(60) + good[100:])
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (tmp_path / "process").mkdir()
    (tmp_path / "process" / "changes.rst").write_text("Minimal requirements to compile the kernel.")
    (tmp_path / "Changes").symlink_to(tmp_path / "process" / "changes.rst")
    with caplog.at_level(logging.WARNING):
        docs = {d.id: d.text for d in iter_documents([tmp_path])}
    assert {"first": "one", "second": "two", "process/changes.rst": "Minimal requirements to compile the kernel.",
            "bom.md": "Hello BOM", "up": "upper case name"}.items() <= docs.items()
    assert not any(i.startswith(".git") for i in docs) and "Changes" not in docs
    assert "broken.jsonl.gz" in caplog.text and "cannot read" in caplog.text


def test_utf16_files_are_text_and_ids_must_be_ids(tmp_path, caplog):
    """A Windows "Unicode" .txt (UTF-16 with its byte-order mark) was skipped as binary for its NUL bytes; a null,
    list or empty id became the document "None", "['x']" or ""."""
    (tmp_path / "win.txt").write_bytes("Grüße aus Windows\r\n".encode("utf-16"))
    (tmp_path / "wide.txt").write_bytes("UTF-32 text".encode("utf-32"))
    (tmp_path / "noise.dat").write_bytes(codecs.BOM_UTF32_LE + bytes(range(256)) * 4)  # binary after the mark
    lines = [{"id": None, "text": "null id"}, {"id": ["x"], "text": "list id"}, {"id": "", "text": "empty id"},
             {"id": 7, "text": "an integer id"}, {"id": 1.0, "text": "a float id column"}, {"id": "ok", "text": "fine"}]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with caplog.at_level(logging.WARNING):
        docs = {d.id: d.text for d in iter_documents([tmp_path])}
    assert docs == {"win.txt": "Grüße aus Windows\r\n", "wide.txt": "UTF-32 text", "7": "an integer id",
                    "1.0": "a float id column", "ok": "fine"}
    assert caplog.text.count("'id' must name the document") == 3 and "noise.dat: binary file" in caplog.text


def test_utf16_jsonl_files_are_read_line_by_line(tmp_path, caplog):
    """A .jsonl saved as Windows "Unicode" (UTF-16 with its mark, here gzipped too) was read as UTF-8 lines, each
    skipped as binary for its NUL bytes: no document. Bytes that do not decode end the file with one warning."""
    import gzip

    lines = [{"id": "a", "text": "Grüße 😀"}, {"id": "b", "text": "two\nlines"}]
    body = "".join(json.dumps(x, ensure_ascii=False) + "\r\n" for x in lines)
    (tmp_path / "win.jsonl").write_bytes(body.encode("utf-16"))
    (tmp_path / "wide.jsonl.gz").write_bytes(gzip.compress(body.replace('"a"', '"c"').replace('"b"', '"d"')
                                                                 .encode("utf-32")))
    (tmp_path / "cut.jsonl").write_bytes(body.replace('"a"', '"e"').replace('"b"', '"f"').encode("utf-16")
                                         + b"\x00\xd8")
    with caplog.at_level(logging.WARNING):
        docs = {d.id: d.text for d in iter_documents([tmp_path])}
    assert docs == {"a": "Grüße 😀", "b": "two\nlines", "c": "Grüße 😀", "d": "two\nlines", "e": "Grüße 😀",
                    "f": "two\nlines"}
    assert "binary" not in caplog.text and "cut.jsonl from line 3: not valid UTF-16" in caplog.text


def test_linked_folders_are_read_once_and_never_loop(tmp_path):
    """A symbolic link to a folder outside the corpus is followed (rglob skipped it without a word); one to a folder
    inside it, or to an ancestor, adds nothing and does not loop; ids are paths under the folder given."""
    outside = tmp_path / "elsewhere" / "sub"
    outside.mkdir(parents=True)
    (outside / "r.txt").write_text("a real file reached through a link")
    corpus = tmp_path / "corpus"
    (corpus / "inner").mkdir(parents=True)
    (corpus / "a.txt").write_text("local doc")
    (corpus / "inner" / "b.txt").write_text("inner doc")
    (corpus / "linked").symlink_to(outside)
    (corpus / "again").symlink_to(corpus / "inner")  # sorts before inner: still read as inner/b.txt, once
    (corpus / "inner" / "loop").symlink_to(corpus)
    (corpus / "up").symlink_to(tmp_path)  # holds the corpus and everything beside it: skipped
    # inside a linked folder, real names win over links to the same folder or file, whatever the listing order
    (outside / "m").mkdir()
    (outside / "m" / "doc.txt").write_text("the doc under its real folder")
    (outside / "a-alias").symlink_to(outside / "m")
    (outside / "z-new.txt").write_text("renamed file")
    (outside / "a-old.txt").symlink_to(outside / "z-new.txt")
    docs = {d.id: d.text for d in iter_documents([corpus])}
    assert docs == {"a.txt": "local doc", "inner/b.txt": "inner doc",
                    "linked/r.txt": "a real file reached through a link",
                    "linked/m/doc.txt": "the doc under its real folder", "linked/z-new.txt": "renamed file"}


def test_long_texts_are_cut_where_a_word_starts_even_at_the_half():
    from retrolm.text.tokenizer import _pieces

    text = "x" * 50 + " " + "y" * 60  # the only place to cut is exactly halfway into a 100-character piece
    assert _pieces(text, 100) == ["x" * 50, " " + "y" * 60]


def test_request_errors(tmp_path):
    with pytest.raises(RetrolmError, match="does not exist"):
        list(iter_documents([tmp_path / "missing"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrolmError, match="no documents found"):
        list(iter_documents([tmp_path / "empty"]))
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(RetrolmError, match=r"dup.jsonl:2: duplicate document id 'a'"):
        list(iter_documents([tmp_path / "dup.jsonl"]))


# --- the train / held-out split -----------------------------------------------------------------------------------


def read_split(out) -> dict[str, list[dict]]:
    return {part: [json.loads(line) for line in (out / f"{part}.jsonl").read_text(encoding="utf-8").splitlines()]
            for part in ("train", "heldout")}


def ids_of(split: dict[str, list[dict]]) -> dict[str, set[str]]:
    return {part: {d["id"] for d in docs} for part, docs in split.items()}


def test_split_is_by_document_id_hash_and_writes_both_files(tmp_path):
    docs = wiki_docs(400)
    counts = split_corpus([write_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "out", heldout=0.25)
    split = read_split(tmp_path / "out")
    assert counts == {"train": len(split["train"]), "heldout": len(split["heldout"])}
    assert counts["train"] + counts["heldout"] == 400
    assert 70 <= counts["heldout"] <= 130  # ~25% (binomial sd ≈ 9)
    # every document lands on exactly one side, with its text unchanged
    by_id = {d["id"]: d["text"] for d in docs}
    both = split["train"] + split["heldout"]
    assert sorted(d["id"] for d in both) == sorted(by_id) and all(by_id[d["id"]] == d["text"] for d in both)
    # held out ⟺ sha256("seed:id") read as a fraction falls below the held-out share (a fixed, documented rule)
    for d in docs:
        x = int.from_bytes(hashlib.sha256(f"0:{d['id']}".encode()).digest()[:8], "big") / 2**64
        assert (d["id"] in ids_of(split)["heldout"]) == (x < 0.25)

    # deterministic, independent of the order of the documents, and stable when documents are added
    split_corpus([write_jsonl(tmp_path / "b.jsonl", docs[::-1])], tmp_path / "rev", heldout=0.25)
    assert ids_of(read_split(tmp_path / "rev")) == ids_of(split)
    more = docs + wiki_docs(200, start=400)
    split_corpus([write_jsonl(tmp_path / "c.jsonl", more)], tmp_path / "more", heldout=0.25)
    grown = ids_of(read_split(tmp_path / "more"))
    assert ids_of(split)["heldout"] <= grown["heldout"] and ids_of(split)["train"] <= grown["train"]
    assert len(grown["heldout"]) > len(ids_of(split)["heldout"])
    # another seed is another split
    split_corpus([tmp_path / "a.jsonl"], tmp_path / "seed1", heldout=0.25, seed=1)
    assert ids_of(read_split(tmp_path / "seed1")) != ids_of(split)
    # a split that leaves one side empty is refused and leaves the split already in the folder as it was
    with pytest.raises(RetrolmError, match="split left one side empty"):
        split_corpus([write_jsonl(tmp_path / "one.jsonl", docs[:1])], tmp_path / "out", heldout=0.25)
    assert ids_of(read_split(tmp_path / "out")) == ids_of(split)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_refuses_a_fraction_outside_0_1(tmp_path, fraction):
    with pytest.raises(RetrolmError, match=rf"held-out fraction must be in \(0, 1\), got {fraction}"):
        split_corpus([write_jsonl(tmp_path / "a.jsonl", wiki_docs(5))], tmp_path / "out", heldout=fraction)
    assert not (tmp_path / "out").exists()


def test_split_that_leaves_a_side_empty_is_an_error(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "a.jsonl", wiki_docs(3))
    with pytest.raises(RetrolmError, match=r"out: split left one side empty \({'train': 3, 'heldout': 0}\)"):
        split_corpus([corpus], tmp_path / "out", heldout=0.001)
    rc, out, err = run_cli(["corpus", "split", corpus, "--out", tmp_path / "cli", "--heldout", "0.5"], capsys)
    assert rc == 0, err
    counts = {part: len(docs) for part, docs in read_split(tmp_path / "cli").items()}
    want = f"{tmp_path / 'cli'}: {counts['train']} train documents, {counts['heldout']} held-out documents"
    assert out.strip() == want


def test_split_never_replaces_its_own_input(tmp_path):
    """Splitting out/train.jsonl into out/ renamed the new files over the input: the first split's held-out
    documents were gone without a word. An output folder inside a corpus folder is read back on a rerun."""
    split_corpus([write_jsonl(tmp_path / "a.jsonl", wiki_docs(40))], tmp_path / "sp", heldout=0.2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "sp").iterdir()}
    with pytest.raises(RetrolmError, match=r"train\.jsonl: the split would replace its own input"):
        split_corpus([tmp_path / "sp" / "train.jsonl"], tmp_path / "sp", heldout=0.3, seed=3)
    with pytest.raises(RetrolmError, match="output folder is inside the corpus folder"):
        split_corpus([tmp_path], tmp_path / "sp2", heldout=0.3)
    assert {p.name: p.read_bytes() for p in (tmp_path / "sp").iterdir()} == before


def test_a_database_or_checkpoint_folder_is_not_a_corpus(built_db, tmp_path, caplog):
    """A database given as a corpus (scale --noise DB) was read as 44 documents: meta.json, tokenizer.json, ...
    Inside a corpus folder such a folder is skipped with a warning."""
    with pytest.raises(RetrolmError, match="a retrolm database, not a corpus"):
        list(iter_documents([built_db.path]))
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(built_db.path, corpus / "db")
    (corpus / "ckpt").mkdir()
    (corpus / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 8)
    (corpus / "notes.md").write_text("a document")
    (corpus / "webapp" / "checkpoints").mkdir(parents=True)  # no model by chance: TensorFlow.js's model.json, a
    (corpus / "webapp" / "model.json").write_text("{}")  # chapter folder called checkpoints
    (corpus / "webapp" / "checkpoints" / "howto.txt").write_text("how to save a game")
    with caplog.at_level(logging.WARNING):
        assert [d.id for d in iter_documents([corpus])] == ["notes.md", "webapp/checkpoints/howto.txt",
                                                            "webapp/model.json"]
    assert "a retrolm database, not corpus text" in caplog.text and "a model checkpoint" in caplog.text
