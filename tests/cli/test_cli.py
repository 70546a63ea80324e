"""The CLI contract, one-line errors for bad input, and resuming a build killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, run_cli, search, wiki_docs, write_jsonl
from retrolm.db import BuildConfig, Database


def test_search_and_info_json(built_db, capsys):
    rc, out, _ = run_cli(["db", "search", built_db.path, built_db.chunk_texts([5])[0], "-k", "3", "--json"], capsys)
    assert rc == 0
    hits = json.loads(out)
    assert len(hits) == 3
    assert {"chunk_id", "doc_id", "score", "text", "continuation"} <= set(hits[0])
    assert hits[0]["chunk_id"] == 5
    rc, out, _ = run_cli(["db", "info", built_db.path, "--json"], capsys)
    info = json.loads(out)
    assert rc == 0
    assert {"num_docs", "num_chunks", "chunk_len", "encoder", "tokenizer", "index_type", "bytes_on_disk"} <= set(info)
    assert info["num_docs"] == 40 and info["chunk_len"] == 64 and info["index_type"] == "flat"
    assert info["num_chunks"] == built_db.store.n_chunks and info["bytes_on_disk"] > 0


def test_add_and_delete_through_cli(tmp_path, tiny_encoder, capsys):
    corpus = write_jsonl(tmp_path / "a.jsonl", wiki_docs(8))
    db = tmp_path / "db"
    rc, out, err = run_cli(
        ["db", "build", corpus, "--out", db, "--encoder", tiny_encoder, "--tokenizer", "train:500", "-q"], capsys
    )
    assert rc == 0, err
    more = write_jsonl(tmp_path / "b.jsonl", wiki_docs(4, start=8))
    rc, out, err = run_cli(["db", "add", db, more, "-q"], capsys)
    assert rc == 0 and "added 4 documents" in out
    victim = wiki_docs(1, start=9)[0]
    rc, out, _ = run_cli(["db", "delete", db, "--doc-id", victim["id"], "-q"], capsys)
    assert rc == 0 and "deleted 1 documents" in out
    rc, out, _ = run_cli(["db", "search", db, victim["text"], "-k", "12", "--json"], capsys)
    assert victim["id"] not in {h["doc_id"] for h in json.loads(out)}
    rc, out, _ = run_cli(["db", "info", db, "--json"], capsys)
    assert json.loads(out)["num_docs"] == 11


def test_bad_inputs_give_one_line_errors(tmp_path, built_db, tiny_encoder, capsys):
    rc, _, err = run_cli(["db", "build", tmp_path / "nope", "--out", tmp_path / "x"], capsys)
    assert_one_line_error(rc, err, "nope", "does not exist")

    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(
        ["db", "build", tmp_path / "empty", "--out", tmp_path / "x", "--encoder", tiny_encoder], capsys
    )
    assert_one_line_error(rc, err, "empty", "no documents found")
    assert not (tmp_path / "x.partial").exists() and not (tmp_path / "x").exists()

    rc, _, err = run_cli(["db", "search", tmp_path / "missing-db", "q"], capsys)
    assert_one_line_error(rc, err, "missing-db", "does not exist")

    rc, _, err = run_cli(["db", "add", built_db.path, tmp_path, "--chunk-len", "32"], capsys)
    assert_one_line_error(rc, err, "chunk_len 64, got 32")
    rc, _, err = run_cli(["db", "add", built_db.path, tmp_path, "--encoder", "bert-base-uncased"], capsys)
    assert_one_line_error(rc, err, "built with encoder")
    rc, _, err = run_cli(["db", "build", tmp_path, "--out", built_db.path, "--chunk-len", "32"], capsys)
    assert_one_line_error(rc, err, "existing database has chunk_len 64, asked for 32")

    corpus = write_jsonl(tmp_path / "c" / "c.jsonl", wiki_docs(2))
    rc, _, err = run_cli(["db", "build", corpus, "--out", tmp_path / "y", "--index", "bogus"], capsys)
    assert_one_line_error(rc, err, "index must be one of")
    rc, _, err = run_cli(["db", "build", corpus, "--out", tmp_path / "y", "--encoder", "no/such-model-offline"], capsys)
    assert_one_line_error(rc, err, "no/such-model-offline", "the hub is offline")  # tests run with HF_HUB_OFFLINE=1
    rc, _, err = run_cli(["db", "build", tmp_path / "c", "--out", tmp_path / "c" / "db"], capsys)
    assert_one_line_error(rc, err, "inside the corpus folder")

    # A corrupt index file: named in the error, nothing else touched.
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(built_db.path, broken)
    index_file = broken / json.loads((broken / "meta.json").read_text())["index"]["file"]
    index_file.write_bytes(index_file.read_bytes()[:100])
    rc, _, err = run_cli(["db", "search", broken, "q"], capsys)
    assert_one_line_error(rc, err, str(index_file))
    (broken / "meta.json").write_text("{not json")
    rc, _, err = run_cli(["db", "info", broken], capsys)
    assert_one_line_error(rc, err, "meta.json", "corrupt")


def test_cli_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "retrolm.cli", "db", "info", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'nothing'}: database folder does not exist"


@pytest.mark.slow
def test_build_killed_midway_resumes_to_identical_result(tmp_path, tiny_encoder):
    """SIGKILL a real build (default MiniLM encoder) during embedding; the old database survives, and
    re-running the same command resumes from the finished shards to the same database as a clean build."""
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(90))
    out = tmp_path / "db"
    old_corpus = write_jsonl(tmp_path / "old.jsonl", wiki_docs(3, start=500))
    Database.build([old_corpus], out, BuildConfig(encoder=tiny_encoder, tokenizer="train:400"), show_progress=False)
    cmd = [
        sys.executable,
        "-m",
        "retrolm.cli",
        "db",
        "build",
        str(corpus),
        "--out",
        str(out),
        "--overwrite",
        "--tokenizer",
        "train:1000",
        "--shard-size",
        "16",
        "--batch-size",
        "16",
        "-q",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards = tmp_path / "db.partial" / "embeddings"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(shards.glob("*.npy"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    done_before_kill = len(list(shards.glob("*.npy")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done_before_kill >= 2, proc.stderr.read().decode()
    # The previous database is intact while the new build is unfinished.
    assert Database.open(out).store.n_docs == 3

    r = subprocess.run(cmd, env=dict(env, RETROLM_LOG="INFO"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    resumed = Database.open(out)
    assert resumed.store.n_docs == 90 and not (tmp_path / "db.partial").exists()

    ref_cmd = [c if c != str(out) else str(tmp_path / "ref") for c in cmd if c != "--overwrite"]
    r = subprocess.run(ref_cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ref = Database.open(tmp_path / "ref")
    n = ref.store.n_chunks
    total_shards = -(-n // 16)
    assert done_before_kill < total_shards  # the kill really interrupted the embedding stage
    assert resumed.store.n_chunks == n
    np.testing.assert_array_equal(resumed.store.tokens(np.arange(n)), ref.store.tokens(np.arange(n)))
    assert resumed.store.doc_ids == ref.store.doc_ids
    assert resumed.meta["tokenizer"]["sha256"] == ref.meta["tokenizer"]["sha256"]
    ids = np.arange(n)
    np.testing.assert_allclose(resumed.index.reconstruct(ids), ref.index.reconstruct(ids), atol=1e-6)
    queries = ref.chunk_texts(np.arange(0, n, 11))
    a, b = search(resumed, queries, k=5), search(ref, queries, k=5)
    assert [[h.chunk_id for h in q] for q in a] == [[h.chunk_id for h in q] for q in b]


def test_readme_commands_exist():
    """The README's two commands point at scripts that exist (CI runs the test command itself)."""
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/setup.sh && bash scripts/main.sh" in readme
    assert "bash scripts/setup.sh --dev && .venv/bin/python -m pytest -q" in readme
    for script in ("scripts/setup.sh", "scripts/main.sh"):
        assert Path(REPO / script).is_file()


def test_json_printed_by_a_command_is_strict_json_too(capsys):
    from retrolm.cli.app import print_json

    print_json({"gain": float("nan"), "k": 2})
    assert json.loads(capsys.readouterr().out, parse_constant=lambda t: 1 / 0) == {"gain": None, "k": 2}
