"""Ingestion: every supported format, and bad files skipped or repaired with a warning naming them."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrolm.core.errors import RetrolmError
from retrolm.text.corpus import iter_documents

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


def test_request_errors(tmp_path):
    with pytest.raises(RetrolmError, match="does not exist"):
        list(iter_documents([tmp_path / "missing"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrolmError, match="no documents found"):
        list(iter_documents([tmp_path / "empty"]))
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(RetrolmError, match=r"dup.jsonl:2: duplicate document id 'a'"):
        list(iter_documents([tmp_path / "dup.jsonl"]))
