"""Per-group results and bootstrap intervals over documents."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.eval.groups import document_field, gain_interval


def test_gain_interval_resamples_documents():
    # three documents of two chunks each; per-document gains 50%, 50%, 50% → the interval collapses to 50%
    doc = np.array([0, 0, 1, 1, 2, 2])
    off = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 5.0])
    on = off / 2
    assert gain_interval(on, off, doc) == pytest.approx((0.5, 0.5))
    # gains 0% and 100% in two equal-sized documents: the interval spans both ends, the pooled gain (50%) inside
    doc2 = np.array([0, 1])
    lo, hi = gain_interval(np.array([4.0, 0.0]), np.array([4.0, 4.0]), doc2, n_boot=2000)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)
    # a selection restricts the documents (and chunks) resampled; an empty one gives NaN
    sel = np.array([False, False, True, True, False, False])
    on3 = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert gain_interval(on3, off, doc, sel) == pytest.approx((0.5, 0.5))
    assert np.isnan(gain_interval(on, off, doc, np.zeros(6, dtype=bool))).all()
    # one document gains all, the other (nine chunks) nothing: over documents the interval spans 0..1; resampling
    # chunks would have given (0.7, 1.0)
    doc4, off4 = np.array([0] + [1] * 9), np.ones(10)
    on4 = np.array([1.0] + [0.0] * 9)
    assert gain_interval(on4, off4, doc4, n_boot=2000) == pytest.approx((0.0, 1.0))


def test_document_field(tmp_path):
    f = write_jsonl(tmp_path / "h.jsonl", [{"id": "a", "text": "x", "bucket": "new"},
                                           {"id": 7, "text": "y", "bucket": "changed"}])
    assert document_field([str(f)], "bucket") == {"a": "new", "7": "changed"}
    with pytest.raises(RetrolmError, match="no field 'topic'"):
        document_field([str(f)], "topic")
    (tmp_path / "d.txt").write_text("plain")
    with pytest.raises(RetrolmError, match="JSONL"):
        document_field([str(tmp_path / "d.txt")], "bucket")
    # the files ingestion reads: gzipped JSONL in a folder too, and lines it skips (bad JSON, no id) skipped here
    import gzip

    folder = tmp_path / "held"
    folder.mkdir()
    with gzip.open(folder / "more.jsonl.gz", "wt") as fz:
        fz.write('{"id": "b", "text": "z", "bucket": "identical"}\n{not json\n{"text": "no id"}\n')
    (folder / "notes.txt").write_text("ignored")
    assert document_field([str(f), str(folder)], "bucket") == {"a": "new", "7": "changed", "b": "identical"}
    # records ingestion makes no document of (empty text, a null id) need no field: group_by stopped on them
    g = write_jsonl(tmp_path / "g.jsonl", [{"id": "c", "text": "kept", "bucket": "new"}, {"id": "d", "text": " "},
                                           {"id": None, "text": "no usable id"}])
    assert document_field([str(g)], "bucket") == {"c": "new"}
