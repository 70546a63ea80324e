"""scripts/recompute_bucket.py on a committed evaluation: the bucket recomputed from per_chunk.npz is eval.json's,
and dropping documents gives the corrected number docs/results.md quotes."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_recomputes_the_committed_changed_row_and_the_correction():
    run = REPO / "docs" / "results" / "incontext" / "bm25-s64-previous"
    out = subprocess.run([sys.executable, REPO / "scripts" / "recompute_bucket.py", run, "--drop", "9", "10", "11"],
                         capture_output=True, text=True, check=True).stdout
    assert "changed in eval.json -61.7%, recomputed -61.7%" in out
    assert "without them -57.6% [-69.5%, -40.0%] (3 documents)" in out
